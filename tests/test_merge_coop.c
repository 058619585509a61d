/* The cooperative TIES path (all threads on one tensor of >= MSX__TIES_COOP_MIN
   elements) must equal the single-thread per-tensor TIES byte for byte. The
   other merge tests use small tensors and never reach it. Reference: the
   per-tensor msx_merge_tensor_ties, itself checked against the golden vectors
   and a brute-force sort in test_merge.c. */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "test.h"

int main(void) {
    /* a full ViT-B MLP matrix, and odd sizes just above the cut-off */
    static const int64_t sizes[3] = {2359296, 1048576 + 13, 1500007};
    static const double drops[5] = {0.2, 0.7, 0.0, 1.0, 0.5};
    msx_rng r;
    int si, di, n_ft, nthr;
    msx_rng_seed(&r, 7);
    for (si = 0; si < 3; si++) {
        int64_t n = sizes[si], i;
        size_t per = (msx_merge_ties_scratch_floats(n, 3) + 15) & ~(size_t)15;
        float *b = (float *)msx__aligned_alloc((size_t)n * 4), *f[3];
        float *o1 = (float *)msx__aligned_alloc((size_t)n * 4), *o2 = (float *)msx__aligned_alloc((size_t)n * 4);
        uint32_t *scr = (uint32_t *)msx__aligned_alloc(per * 3 * 4);
        for (i = 0; i < 3; i++) f[i] = (float *)msx__aligned_alloc((size_t)n * 4);
        /* deltas on a coarse grid: many exact magnitude ties and sign cancellations */
        for (i = 0; i < n; i++) {
            b[i] = (float)msx_rng_uniform(&r);
            f[0][i] = b[i] + (float)((int)(msx_rng_uniform(&r) * 64) - 32) * 1e-3f;
            f[1][i] = b[i] + (float)((int)(msx_rng_uniform(&r) * 64) - 32) * 1e-3f;
            f[2][i] = b[i] + (float)(msx_rng_uniform(&r) - 0.5) * 1e-2f;
        }
        for (n_ft = 2; n_ft <= 3; n_ft++)
            for (di = 0; di < 5; di++)
                for (nthr = 2; nthr <= 3; nthr++) {
                    const float *ft[3] = {f[0], f[1], f[2]};
                    msx__ties_coop_state st;
                    MSX_CHECK_OK(msx_merge_tensor_ties(o1, b, ft, n_ft, drops[di], 0.9, n, NULL));
#pragma omp parallel num_threads(nthr)
                    {
                        msx__ties_coop(o2, b, ft, n_ft, drops[di], 0.9f, n, scr, per, omp_get_thread_num(),
                                       omp_get_num_threads(), &st);
                    }
                    MSX_CHECK(!memcmp(o1, o2, (size_t)n * 4), "n=%lld n_ft=%d drop=%g threads=%d differ",
                              (long long)n, n_ft, drops[di], nthr);
                }
        for (i = 0; i < 3; i++) msx__aligned_free(f[i]);
        msx__aligned_free(b);
        msx__aligned_free(o1);
        msx__aligned_free(o2);
        msx__aligned_free(scr);
    }
    return msx_test_summary("test_merge_coop");
}
