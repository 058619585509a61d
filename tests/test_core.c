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
            msx_clear_error(); /* the message checked below must come from this call */
            MSX_CHECK(msx_safetensors_load_mem(buf, 8 + hl + 8, "bad", &d) != MSX_OK && d == NULL, "bad header %d accepted", (int)i);
            MSX_CHECK(strlen(msx_last_error()) > 10, "no message for bad header %d", (int)i);
        }
        MSX_CHECK(msx_safetensors_load_mem("\xff\xff\xff\xff\xff\xff\xff\x7f{}", 10, "huge", &d) != MSX_OK, "huge header length accepted");
    }
    {   /* RNG known answers. Seeding is splitmix64: its published sequence for
           seed 1234567 (Vigna's splitmix64.c test output) must be the four state
           words. The step is xoshiro256**: from the state {1, 2, 3, 4} the
           reference algorithm (prng.di.unimi.it/xoshiro256starstar.c) gives
           11520, 0, 1509978240, 1215971899390074240; the seed-42 stream and its
           doubles were computed with a separate Python implementation of both
           algorithms written from those sources. */
        static const uint64_t sm[4] = {6457827717110365317ull, 3203168211198807973ull, 9817491932198370423ull,
                                       4593380528125082431ull};
        static const uint64_t step[4] = {11520ull, 0ull, 1509978240ull, 1215971899390074240ull};
        static const uint64_t s42[5] = {1546998764402558742ull, 6990951692964543102ull, 12544586762248559009ull,
                                        17057574109182124193ull, 18295552978065317476ull};
        msx_rng r;
        int i;
        msx_rng_seed(&r, 1234567);
        for (i = 0; i < 4; i++) MSX_CHECK(r.s[i] == sm[i], "splitmix64 word %d: %llu", i, (unsigned long long)r.s[i]);
        r.s[0] = 1; r.s[1] = 2; r.s[2] = 3; r.s[3] = 4;
        for (i = 0; i < 4; i++) {
            uint64_t v = msx_rng_u64(&r);
            MSX_CHECK(v == step[i], "xoshiro256** output %d: %llu, want %llu", i, (unsigned long long)v, (unsigned long long)step[i]);
        }
        msx_rng_seed(&r, 42);
        for (i = 0; i < 5; i++) {
            uint64_t v = msx_rng_u64(&r);
            MSX_CHECK(v == s42[i], "seed 42 output %d: %llu", i, (unsigned long long)v);
        }
        msx_rng_seed(&r, 42);
        MSX_CHECK(msx_rng_uniform(&r) == 0.08386297105988216 && msx_rng_uniform(&r) == 0.3789802506626686,
                  "uniform doubles of seed 42 (top 53 bits / 2^53)");
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
