/* TIES on large tensors: the fast path (msx__ties_tensor above
   MSX__TIES_DIRECT elements: sample bracket, count + gather, exact select,
   the vectorised two-model combine and the zero-sum fix-up) that the
   small-tensor tests never reach, with zero-delta atoms at the threshold
   (one-key brackets), exact cancellations, a frozen model, and three
   models (the plain form). Every output is compared byte for byte with
   ref_ties (tests/ref_ties.h), a plain qsort implementation that shares no
   code with the library, and with the header's own plain definition
   (msx__ties_plain). */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "test.h"
#include "ref_ties.h"

typedef struct {
    int64_t n;
    int kind;      /* 0 coarse grid (ties, cancellations), 1 30% exact zeros, 2 model 1 frozen,
                      3 40% of |delta| exactly 1/64 (an atom inside a histogram bin) */
    int max_ft;    /* 3: also the three-model path */
} coop_case;

static void fill(msx_rng *r, int kind, int64_t n, float *b, float **f) {
    int64_t i;
    for (i = 0; i < n; i++) {
        b[i] = (float)msx_rng_uniform(r);
        switch (kind) {
        case 0:
            f[0][i] = b[i] + (float)((int)(msx_rng_uniform(r) * 64) - 32) * 1e-3f;
            f[1][i] = b[i] + (float)((int)(msx_rng_uniform(r) * 64) - 32) * 1e-3f;
            break;
        case 1: /* the 0.3 drop rate lands at the edge of the zero atom */
            f[0][i] = b[i] + (msx_rng_uniform(r) < 0.3 ? 0.0f : (float)(0.01 * msx_rng_normal(r)));
            f[1][i] = b[i] + (msx_rng_uniform(r) < 0.3 ? 0.0f : (float)(0.01 * msx_rng_normal(r)));
            break;
        case 2:
            f[0][i] = b[i] + (float)(0.01 * msx_rng_normal(r));
            f[1][i] = b[i];
            break;
        default: /* base on a 1/1024 grid so that base +- 1/64 is exact */
            b[i] = (float)(int)(msx_rng_uniform(r) * 1024) / 1024.0f;
            f[0][i] = b[i] + (msx_rng_uniform(r) < 0.4 ? (msx_rng_uniform(r) < 0.5 ? 1.0f : -1.0f) / 64.0f
                                                           : (float)(0.02 * msx_rng_normal(r)));
            f[1][i] = b[i] + (float)(0.02 * msx_rng_normal(r));
            break;
        }
        f[2][i] = b[i] + (float)(msx_rng_uniform(r) - 0.5) * 1e-2f;
    }
}

int main(void) {
    static const coop_case cases[] = {{2359296, 0, 3}, {1048576 + 13, 0, 2}, {1500007, 1, 2}, {1200000, 2, 2},
                                      {1100000, 3, 2}, {65537, 0, 2}};
    static const double drops[6] = {0.2, 0.7, 0.0, 1.0, 0.5, 0.3};
    msx_rng r;
    int ci, di, n_ft;
    msx_rng_seed(&r, 7);
    for (ci = 0; ci < (int)(sizeof cases / sizeof cases[0]); ci++) {
        int64_t n = cases[ci].n, i, na = 0;
        size_t per = msx_merge_ties_scratch_floats(n, 3), per2 = msx_merge_ties_scratch_floats(n, 2);
        float *b = (float *)msx__aligned_alloc((size_t)n * 4), *f[3];
        float *o1 = (float *)msx__aligned_alloc((size_t)n * 4), *o2 = (float *)msx__aligned_alloc((size_t)n * 4);
        uint32_t *scr;
        if (per2 > per) per = per2;
        scr = (uint32_t *)msx__aligned_alloc(per * 4);
        for (i = 0; i < 3; i++) f[i] = (float *)msx__aligned_alloc((size_t)n * 4);
        fill(&r, cases[ci].kind, n, b, f);
        for (n_ft = 2; n_ft <= cases[ci].max_ft; n_ft++)
            for (di = 0; di < 6; di++) {
                const float *ft[3] = {f[0], f[1], f[2]};
                int64_t k = (int64_t)((double)n * drops[di]);
                ref_ties(o1, b, ft, n_ft, drops[di], 0.9f, n);
                memset(o2, 0xFF, (size_t)n * 4);
                msx__ties_tensor(o2, b, ft, n_ft, drops[di], 0.9f, n, scr);
                MSX_CHECK(!memcmp(o1, o2, (size_t)n * 4), "fast path n=%lld kind %d n_ft=%d drop=%g differs",
                          (long long)n, cases[ci].kind, n_ft, drops[di]);
                memset(o2, 0xFF, (size_t)n * 4);
                msx__ties_plain(o2, b, ft, n_ft, k > n ? n : k, 0.9f, n, scr);
                MSX_CHECK(!memcmp(o1, o2, (size_t)n * 4), "plain form n=%lld kind %d n_ft=%d drop=%g differs",
                          (long long)n, cases[ci].kind, n_ft, drops[di]);
                /* the public single-tensor entry point (its own scratch) */
                MSX_CHECK_OK(msx_merge_tensor_ties(o2, b, ft, n_ft, drops[di], 0.9, n, NULL));
                MSX_CHECK(!memcmp(o1, o2, (size_t)n * 4), "msx_merge_tensor_ties n=%lld kind %d n_ft=%d drop=%g differs",
                          (long long)n, cases[ci].kind, n_ft, drops[di]);
            }
        if (cases[ci].kind == 0) { /* the coarse grid holds exact cancellations: the fix-up list is exercised */
            uint32_t tb[2];
            float thr[2];
            const float *ft[2] = {f[0], f[1]};
            msx__ties_thresholds(b, ft, 2, n, (int64_t)((double)n * 0.2), scr, tb);
            memcpy(thr, tb, sizeof thr);
            (void)msx__ties_combine2(o2, b, f[0], f[1], thr[0], thr[1], 0.9f, n, scr, &na);
            MSX_CHECK(na > 0, "n=%lld: no zero-sum element reached the fix-up", (long long)n);
        }
        for (i = 0; i < 3; i++) msx__aligned_free(f[i]);
        msx__aligned_free(b);
        msx__aligned_free(o1);
        msx__aligned_free(o2);
        msx__aligned_free(scr);
    }
    return msx_test_summary("test_merge_coop");
}
