/* tests/fuzz/fuzz_targets.h - the three fuzz entry points, shared by the
   libFuzzer harnesses (fuzz_*.c) and the regression test
   (tests/test_ckpt_regress.c). Include after medsamix.h with
   MEDSAMIX_IMPLEMENTATION, so the private parsers are visible. */
#ifndef MSX_FUZZ_TARGETS_H
#define MSX_FUZZ_TARGETS_H
#include "mkpth.h"

/* Checks the loader's contract on any result: an error has a message and no
   checkpoint; a success has consistent tensors. Returns 0 on a violation. */
static msx_result msx_fuzz_last; /* result of the last load (for the regression test) */
static int msx_fuzz_check(msx_result r, msx_checkpoint *ck) {
    int i, ok = 1;
    msx_fuzz_last = r;
    if (r != MSX_OK) ok = ck == NULL && msx_last_error()[0] != 0;
    else {
        for (i = 0; i < ck->n && ok; i++) {
            const msx_tensor *t = &ck->tensors[i];
            double s, a;
            ok = t->name && t->data && msx_ckpt_find(ck, t->name) == t;
            msx_tensor_sums(t, &s, &a); /* touches every element: ASan checks the bounds */
        }
    }
    msx_ckpt_free(ck);
    return ok;
}

/* Whole files: zip container + pickle, legacy and safetensors sniffing. */
static int msx_fuzz_zip(const unsigned char *d, size_t n) {
    msx_checkpoint *ck = NULL;
    msx_result r;
    msx_clear_error(); /* a message left by an earlier input must not count for this one */
    r = msx_ckpt_load_mem(d, n, "fuzz.pth", &ck);
    if (r == MSX_OK && ck) {
        msx_sam_arch a;
        if (msx_sam_arch_infer(ck, &a) == MSX_OK) (void)msx_sam_validate(ck, &a);
    }
    return msx_fuzz_check(r, ck);
}

/* The input is data.pkl of a torch archive that also holds four storages
   "0".."3" of 64 bytes, so tensor records can resolve. */
static int msx_fuzz_pickle(const unsigned char *d, size_t n) {
    static unsigned char stor[4][64];
    static const char *const keys[4] = {"0", "1", "2", "3"};
    const void *data[4];
    size_t lens[4];
    mk_buf pkl, f;
    msx_checkpoint *ck = NULL;
    msx_result r;
    int i;
    if (n > ((size_t)1 << 20)) return 1;
    for (i = 0; i < 4; i++) { data[i] = stor[i]; lens[i] = sizeof stor[i]; memset(stor[i], 0x3c + i, sizeof stor[i]); }
    pkl.p = (unsigned char *)d; pkl.n = n; pkl.cap = n;
    memset(&f, 0, sizeof f);
    mk_pth(&f, "archive", &pkl, 4, keys, data, lens, 0);
    msx_clear_error();
    r = msx_ckpt_load_mem(f.p, f.n, "fuzz-pickle.pth", &ck);
    mk_free(&f);
    return msx_fuzz_check(r, ck);
}

static int msx_fuzz_safetensors(const unsigned char *d, size_t n) {
    msx_checkpoint *ck = NULL;
    msx_result r;
    msx_clear_error();
    r = msx_safetensors_load_mem(d, n, "fuzz.safetensors", &ck);
    if (!msx_fuzz_check(r, ck)) return 0;
    ck = NULL;
    msx_clear_error();
    r = msx_ckpt_load_mem(d, n, "fuzz.safetensors", &ck);
    return msx_fuzz_check(r, ck);
}
#endif
