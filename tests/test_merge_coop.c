/* TIES on large tensors: the paths the small-tensor tests never reach. For
   two fine-tuned models, the two-pass scheme (no tables, and a caller's
   first call), then the rank tables + one pass + fix-up (msx__ties_coop2):
   tables built (second call) and reused for other drop rates and thread
   counts; zero-delta atoms at the threshold
   (one-key bracket, record overflow and its fallback); a frozen model; 1, 2
   and 3 threads. For three models, the sample-bracket two-pass path. Every
   output is compared byte for byte with ref_ties (tests/ref_ties.h), a
   plain qsort implementation of ref §1.3 that shares no code with the
   library. */
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
                                      {1100000, 3, 2}};
    static const double drops[6] = {0.2, 0.7, 0.0, 1.0, 0.5, 0.3};
    msx_rng r;
    int ci, di, n_ft, nthr;
    msx_rng_seed(&r, 7);
    for (ci = 0; ci < (int)(sizeof cases / sizeof cases[0]); ci++) {
        int64_t n = cases[ci].n, i;
        size_t per = (msx_merge_ties_scratch_floats(n, 3) + 15) & ~(size_t)15, per2;
        float *b = (float *)msx__aligned_alloc((size_t)n * 4), *f[3];
        float *o1 = (float *)msx__aligned_alloc((size_t)n * 4), *o2 = (float *)msx__aligned_alloc((size_t)n * 4);
        uint32_t *scr;
        msx__ties_table tabs[2];
        unsigned char ok = 0;
        per2 = (msx_merge_ties_scratch_floats(n, 2) + 15) & ~(size_t)15;
        if (per2 > per) per = per2;
        scr = (uint32_t *)msx__aligned_alloc(per * 3 * 4);
        for (i = 0; i < 3; i++) f[i] = (float *)msx__aligned_alloc((size_t)n * 4);
        fill(&r, cases[ci].kind, n, b, f);
        for (n_ft = 2; n_ft <= cases[ci].max_ft; n_ft++)
            for (di = 0; di < 6; di++) {
                const float *ft[3] = {f[0], f[1], f[2]};
                ref_ties(o1, b, ft, n_ft, drops[di], 0.9f, n);
                for (nthr = 1; nthr <= 3; nthr++) {
                    int cached;
                    for (cached = 0; cached <= 1; cached++) {
                        msx__ties_coop_state st;
                        memset(o2, 0xFF, (size_t)n * 4);
#pragma omp parallel num_threads(nthr)
                        {
                            msx__ties_coop(o2, b, ft, n_ft, drops[di], 0.9f, n, scr, per, omp_get_thread_num(),
                                           omp_get_num_threads(), &st, cached ? tabs : NULL, cached ? &ok : NULL);
                        }
                        MSX_CHECK(!memcmp(o1, o2, (size_t)n * 4), "n=%lld kind %d n_ft=%d drop=%g threads=%d %s tables differ",
                                  (long long)n, cases[ci].kind, n_ft, drops[di], nthr, cached ? "kept" : "scratch");
                    }
                }
                /* the public single-tensor entry point (one thread, its own scratch) */
                MSX_CHECK_OK(msx_merge_tensor_ties(o2, b, ft, n_ft, drops[di], 0.9, n, NULL));
                MSX_CHECK(!memcmp(o1, o2, (size_t)n * 4), "msx_merge_tensor_ties n=%lld kind %d n_ft=%d drop=%g differs",
                          (long long)n, cases[ci].kind, n_ft, drops[di]);
            }
        /* the kept tables were built once (second call) and are still valid */
        MSX_CHECK(ok == 2, "kind %d: kept tables in state %d", cases[ci].kind, ok);
        if (cases[ci].kind == 2) {
            /* the miss fallback: a model changed under kept tables (the merger's
               sources never do) must still give the exact result and drop the tables */
            const float *ft[2] = {f[0], f[1]};
            msx__ties_coop_state st;
            for (i = 0; i < n; i++) f[0][i] = b[i] + 2.0f * (f[0][i] - b[i]) + 1e-3f;
            ref_ties(o1, b, ft, 2, 0.5, 0.9f, n);
#pragma omp parallel num_threads(2)
            {
                msx__ties_coop(o2, b, ft, 2, 0.5, 0.9f, n, scr, per, omp_get_thread_num(), omp_get_num_threads(), &st,
                               tabs, &ok);
            }
            MSX_CHECK(!memcmp(o1, o2, (size_t)n * 4), "stale tables: result differs");
            MSX_CHECK(ok == 1 && (st.miss[0] || st.miss[1]), "stale tables: miss %d %d, state %d", st.miss[0], st.miss[1], ok);
        }
        if (cases[ci].kind == 0) {
            /* a table bracket is exact: at most n/4096 keys plus one bin */
            uint32_t lo, hx;
            int64_t L, C, k;
            for (k = 1; k <= n; k += n / 97) {
                msx__ties_table_find(&tabs[0], k, &lo, &hx, &L, &C);
                MSX_CHECK(L < k && k <= L + C, "table bracket of k=%lld: L=%lld C=%lld", (long long)k, (long long)L,
                          (long long)C);
            }
        }
        for (i = 0; i < 3; i++) msx__aligned_free(f[i]);
        msx__aligned_free(b);
        msx__aligned_free(o1);
        msx__aligned_free(o2);
        msx__aligned_free(scr);
    }
    return msx_test_summary("test_merge_coop");
}
