/* Core: tensor table, JSON parser limits, safetensors round trip and
   malformed headers. */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "test.h"

int main(void) {
    msx_checkpoint *c = msx_ckpt_new(), *d = NULL;
    int64_t sh[2] = {2, 3};
    float v[6] = {1, -2, 3.5f, 4, 5, -6e-3f};
    msx_tensor *t;
    double s, a;
    MSX_CHECK_OK(msx_ckpt_add(c, "a.weight", MSX_F32, 2, sh, v, &t));
    MSX_CHECK(msx_ckpt_add(c, "a.weight", MSX_F32, 2, sh, v, NULL) == MSX_E_KEY_MISMATCH, "duplicate accepted");
    MSX_CHECK(((uintptr_t)t->data & 63) == 0, "data not 64-byte aligned");
    msx_tensor_sums(t, &s, &a);
    MSX_CHECK(fabs(s - (1 - 2 + 3.5 + 4 + 5 - 6e-3f)) < 1e-6 && fabs(a - (1 + 2 + 3.5 + 4 + 5 + 6e-3f)) < 1e-6, "sums %g %g", s, a);
    {
        const char *meta[] = {"format", "pt"};
        MSX_CHECK_OK(msx_safetensors_save("build/test_core.safetensors", c, meta, 1));
        MSX_CHECK_OK(msx_safetensors_load("build/test_core.safetensors", &d));
        MSX_CHECK(d && d->n == 1 && !memcmp(d->tensors[0].data, v, sizeof v), "round trip differs");
        MSX_CHECK(d && d->metadata_json && strstr(d->metadata_json, "\"format\":\"pt\""), "metadata lost");
        msx_ckpt_free(d);
    }
    {   /* malformed headers: each must fail cleanly */
        static const char *bad[] = {
            "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,16]}}",  /* past the end */
            "{\"x\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}",  /* negative */
            "{\"x\":{\"dtype\":\"F32\",\"shape\":[NaN],\"data_offsets\":[0,4]}}", /* NaN */
            "{\"x\":{\"dtype\":\"Q8\",\"shape\":[1],\"data_offsets\":[0,4]}}",    /* dtype */
            "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
            "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}", /* unterminated */
            "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]",
        };
        size_t i;
        for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            unsigned char buf[512];
            size_t hl = strlen(bad[i]);
            int k;
            for (k = 0; k < 8; k++) buf[k] = (unsigned char)((uint64_t)hl >> (8 * k));
            memcpy(buf + 8, bad[i], hl);
            memset(buf + 8 + hl, 0, 8);
            d = NULL;
            MSX_CHECK(msx_safetensors_load_mem(buf, 8 + hl + 8, "bad", &d) != MSX_OK && d == NULL, "bad header %d accepted", (int)i);
            MSX_CHECK(strlen(msx_last_error()) > 10, "no message for bad header %d", (int)i);
        }
        MSX_CHECK(msx_safetensors_load_mem("\xff\xff\xff\xff\xff\xff\xff\x7f{}", 10, "huge", &d) != MSX_OK, "huge header length accepted");
    }
    {   /* RNG determinism and range */
        msx_rng r1, r2;
        int i, same = 1;
        msx_rng_seed(&r1, 42);
        msx_rng_seed(&r2, 42);
        for (i = 0; i < 100; i++) same &= msx_rng_u64(&r1) == msx_rng_u64(&r2);
        MSX_CHECK(same, "same seed, different stream");
        for (i = 0; i < 1000; i++) { double u = msx_rng_uniform(&r1); if (u < 0 || u >= 1) same = 0; }
        MSX_CHECK(same, "uniform out of [0,1)");
    }
    msx_ckpt_free(c);
    return msx_test_summary("test_core");
}
