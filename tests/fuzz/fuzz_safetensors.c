/* tests/fuzz/fuzz_safetensors.c - libFuzzer harness for the safetensors parser.
   Built and run by tools/fuzz.sh (clang -fsanitize=fuzzer,address,undefined). */
#define MEDSAMIX_IMPLEMENTATION
#include "../../medsamix.h"
#include "fuzz_targets.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!msx_fuzz_safetensors(data, size)) abort(); /* contract broken: report as a crash */
    return 0;
}
