/* tests/fuzz/fuzz_nifti.h - the NIfTI fuzz entry point, shared by
   tests/fuzz/fuzz_nifti.c and tests/test_nifti.c (which replays
   tests/fuzz/regressions/nifti-*). Include after medsamix.h with
   MEDSAMIX_IMPLEMENTATION. */
#ifndef MSX_FUZZ_NIFTI_H
#define MSX_FUZZ_NIFTI_H
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static msx_result msx_fuzz_nifti_last;

/* Contract: an error leaves a message and an empty volume; a success gives
   dims within the limits, finite values (every one touched) and a
   normalisation that succeeds. Returns 0 on a violation. */
static int msx_fuzz_nifti(const unsigned char *d, size_t n) {
    char path[256];
    const char *tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    int gz = n >= 2 && d[0] == 0x1f && d[1] == 0x8b, ok = 1;
    msx_volume v;
    msx_result r;
    snprintf(path, sizeof path, "%s/msx_fuzz_%ld.nii%s", tmp, (long)getpid(), gz ? ".gz" : "");
    if (msx_write_file_atomic(path, d, n) != MSX_OK) return 1; /* the machine, not the reader */
    memset(&v, 0, sizeof v);
    r = msx_volume_load(path, &v);
    msx_fuzz_nifti_last = r;
    if (r != MSX_OK) ok = v.data == NULL && msx_last_error()[0] != 0;
    else {
        size_t k, nv = (size_t)v.nx * v.ny * v.nz;
        unsigned char *u8 = (unsigned char *)malloc(nv ? nv : 1);
        ok = v.nx >= 1 && v.ny >= 1 && v.nz >= 1 && v.nx <= MSX_MAX_VOLUME_SIDE && v.ny <= MSX_MAX_VOLUME_SIDE &&
             v.nz <= MSX_MAX_VOLUME_SIDE && (v.nifti_version == 1 || v.nifti_version == 2) && u8 != NULL;
        for (k = 0; ok && k < nv; k++) ok = v.data[k] == v.data[k] && v.data[k] - v.data[k] == 0; /* finite */
        if (ok) ok = msx_volume_to_u8(&v, u8) == MSX_OK;
        free(u8);
    }
    msx_volume_free(&v);
    remove(path);
    return ok;
}
#endif
