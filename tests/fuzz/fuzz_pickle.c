/* tests/fuzz/fuzz_pickle.c - libFuzzer harness for the pickle parser.
   Built and run by tools/fuzz.sh (clang -fsanitize=fuzzer,address,undefined). */
#define MEDSAMIX_IMPLEMENTATION
#include "../../medsamix.h"
#include "fuzz_targets.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!msx_fuzz_pickle(data, size)) abort(); /* contract broken: report as a crash */
    return 0;
}
