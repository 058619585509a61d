/* TIES (docs/semantics.md §2.3; podismine/MedSAMix@9328d4c methods/ties.py)
   written plainly for the tests: qsort for the k-th
   magnitude, no selection, no blocking, no vectors. Shared by test_merge.c
   and test_merge_coop.c. */
#ifndef MSX_TEST_REF_TIES_H
#define MSX_TEST_REF_TIES_H
#include <math.h>
#include <stdlib.h>

/* lam * tau + base must round twice, as in the reference: no FMA contraction
   even in GNU C modes (which default to -ffp-contract=fast) */
#if defined(__clang__)
#pragma float_control(precise, on, push)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static void ref_ties(float *out, const float *base, const float *const *ft, int nft, double r, double lam, int64_t n) {
    int64_t k = (int64_t)((double)n * r), j, ss = 0;
    float *D = (float *)malloc((size_t)(nft * n) * 4), *tmp = (float *)malloc((size_t)n * 4);
    signed char *sg = (signed char *)malloc((size_t)n);
    int i, m;
    for (i = 0; i < nft; i++)
        for (j = 0; j < n; j++) D[i * n + j] = ft[i][j] - base[j];
    if (k > 0)
        for (i = 0; i < nft; i++) {
            float thr;
            for (j = 0; j < n; j++) tmp[j] = fabsf(D[i * n + j]);
            qsort(tmp, (size_t)n, 4, cmp_float);
            thr = tmp[k - 1];
            for (j = 0; j < n; j++)
                if (fabsf(D[i * n + j]) < thr) D[i * n + j] = 0;
        }
    for (j = 0; j < n; j++) {
        float s = D[j];
        for (i = 1; i < nft; i++) s = s + D[i * n + j];
        sg[j] = (signed char)((s > 0) - (s < 0));
        ss += sg[j];
    }
    m = (ss > 0) - (ss < 0);
    for (j = 0; j < n; j++) {
        float acc = 0, tau, p;
        int cnt = 0, s = sg[j] ? sg[j] : m;
        for (i = 0; i < nft; i++) {
            float v = D[i * n + j];
            if ((s > 0 && v > 0) || (s < 0 && v < 0)) { acc = acc + v; cnt++; }
        }
        tau = acc / (float)(cnt > 1 ? cnt : 1);
        p = (float)lam * tau;
        out[j] = base[j] + p;
    }
    free(D);
    free(tmp);
    free(sg);
}

#if defined(__clang__)
#pragma float_control(pop)
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif
#endif
