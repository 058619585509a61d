/* tests/fuzz/fuzz_nifti.c - libFuzzer harness for the NIfTI reader
   (msx_volume_load: our raw header checks, then nifti_clib, then the
   conversion to float64) and the reference normalisation on what loads.
   nifti_clib reads files, so each input is written to a temporary file
   (.nii.gz when it starts with the gzip magic, else .nii). Built and run by
   tools/fuzz.sh; seeds in tests/fuzz/corpus/nifti. */
#define MEDSAMIX_IMPLEMENTATION
#include "../../medsamix.h"
#include "fuzz_nifti.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!msx_fuzz_nifti(data, size)) abort(); /* contract broken: report as a crash */
    return 0;
}
