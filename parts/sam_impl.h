/* ======================================================================== */
/* IMPLEMENTATION: SAM forward pass. Owns msx_sam (arch, borrowed weights,  */
/* derived weight copies, oneDNN matmul primitives) and msx_sam_ws (per-    */
/* thread activations, oneDNN memory objects, streams and scratchpads):     */
/* the ViT image encoder, the prompt encoder and the mask decoder of        */
/* segment-anything (conventions: tests/data/golden/sam/README.md).         */
/* Every large GEMM/conv-shaped op runs as a oneDNN matmul created once per */
/* shape in msx_sam_create; the glue (LayerNorm, softmax, rel-pos, GELU,    */
/* gathers) is OpenMP C. Token-side decoder ops (at most 71 rows) are plain */
/* C loops: their cost is negligible next to the image-side matmuls.        */
/* ======================================================================== */

#include <dnnl.h>
#ifndef _OPENMP
#error "medsamix.h: the SAM section needs OpenMP (compile and link with -fopenmp)"
#endif
#include <omp.h>

#define MSX__SAM_MAX_MM 48
/* Below this many FLOP per encode (the 256-px demo models: 0.5 GFLOP) the
   OpenMP fork/join and oneDNN threading cost more than a second thread
   gains (measured on 2 shared cores: 2 threads 12-300 ms vs 1 thread 12 ms
   per demo encode), so such models always evaluate on one thread; run
   several evaluations concurrently instead. */
#ifndef MSX_SAM_SMALL_FLOPS
#define MSX_SAM_SMALL_FLOPS 2e10
#endif
#ifndef MSX__SAM_ROWBLK
#define MSX__SAM_ROWBLK 256 /* query rows per global-attention work item */
#endif
#define MSX__SAM_LN_EPS_ENC 1e-6f
#define MSX__SAM_LN_EPS_DEC 1e-5f

/* One oneDNN matmul shape: C[M×N] (row stride ldc) = A[M×K] (lda) · B[K×N]
   (+ bias[N]) (+ C if sum) then optional eltwise. B is either row-major K×N
   (ldb) or, with trans_b, the N×K row-major matrix of a torch Linear/Conv. */
typedef struct msx__sam_mm {
    int M, K, N, lda, ldb, ldc, trans_b, bias, post, sum; /* post: 0, 1 gelu_erf, 2 relu */
    /* oneDNN fixes a primitive's thread count when it is created (the OpenMP
       ICV at execution is not enough): prim runs on the model's n_threads,
       prim1 on one thread (1-thread workspaces and inside parallel loops). */
    dnnl_primitive_t prim, prim1;
    dnnl_memory_desc_t md[4]; /* src, weights, bias, dst */
    size_t scratch;
} msx__sam_mm;

typedef struct msx__sam_blk {
    const float *n1w, *n1b, *qkvw, *qkvb, *projw, *projb, *n2w, *n2b, *fc1w, *fc1b, *fc2w, *fc2b;
    const float *rph, *rpw; /* rel-pos tables actually used (raw or resized) */
    float *rph_i, *rpw_i;   /* owned resized tables (get_rel_pos interpolation) or NULL */
    int win;                /* window size, 0 = global attention */
    int gh, gw;             /* attention grid (window or token grid) */
} msx__sam_blk;

typedef struct msx__sam_attw { const float *qw, *qb, *kw, *kb, *vw, *vb, *ow, *ob; } msx__sam_attw;

typedef struct msx__sam_declayer {
    msx__sam_attw self, t2i, i2t;
    const float *n1w, *n1b, *n2w, *n2b, *n3w, *n3b, *n4w, *n4b, *l1w, *l1b, *l2w, *l2b;
} msx__sam_declayer;

struct msx_sam {
    msx_sam_arch a;
    msx_sam_options opt;
    const msx_checkpoint *ck;
    int nt_max;            /* threads the primitives were created for */
    int H, W, T, C, D, hd; /* token grid, tokens, embed dim, out dim, head dim */
    int Di, dh;            /* decoder cross-attention internal dim, head dim */
    int c1, c2, D4, D8;    /* mask_downscaling and output_upscaling channels */
    int nt_tok_max;        /* 1 + mask tokens + MSX_SAM_MAX_POINTS + 2 */
    int any_win, any_glob, Hp, Wp, mb;
    int small;             /* < MSX_SAM_SMALL_FLOPS per encode: evaluations run on 1 thread */
    dnnl_engine_t eng;
    msx__sam_mm mm[MSX__SAM_MAX_MM];
    int n_mm;
    /* op indices */
    int op_patch, op_qkv, op_proj, op_fc1, op_fc2, op_gqk, op_gqk_r, op_gav, op_gav_r, op_wqk, op_wav;
    int op_grh, op_grh_r, op_grw, op_grw_r, op_wrel;
    int op_neck1, op_neck2, op_md1, op_md2, op_md3, op_dproj_in, op_dproj_out, op_up1, op_up2;
    /* weights (borrowed) */
    const float *pos, *patch_w, *patch_b, *neck0, *neck1w, *neck1b, *neck2, *neck3w, *neck3b;
    msx__sam_blk *blk;
    const float *pe_gauss, *point_emb[4], *not_a_point, *no_mask, *md0w, *md0b, *md1w, *md1b, *md3w, *md3b,
        *md4w, *md4b, *md6w, *md6b;
    msx__sam_declayer *dl;
    msx__sam_attw fin;
    const float *nfw, *nfb, *iou_tok, *mask_tok, *up0w, *up1w, *up1b, *up3w;
    const float **hyp_w, **hyp_b; /* num_mask_tokens × 3 */
    const float **iou_w, **iou_b; /* iou_head_depth */
    /* derived copies (owned; rewritten by msx_sam_refresh) */
    float *neck2_packed; /* D × (3·3·D), columns (ky, kx, cin) */
    float *up0b_rep, *up3b_rep;
    float *dense_pe_tok, *dense_pe_chw;
};

struct msx_sam_ws {
    const msx_sam *m;
    int nt, nslots;
    dnnl_stream_t *stream;     /* per slot */
    dnnl_memory_t *mem;        /* slot × n_mm × 4 */
    dnnl_memory_t *scr_mem;    /* per slot */
    unsigned char *scr;        /* nslots × scr_sz */
    size_t scr_sz;
    volatile int dnnl_err;
    /* encoder */
    float *x, *xn, *big, *slot_buf, *n1, *n2, *emb_tok, *emb_chw;
    size_t slot_sz;
    int have_emb;
    float *tap_patch, *tap_blocks;
    /* prompt encoder / decoder */
    float *sparse, *dense_tok, *dense_chw, *keys, *kp, *ia, *ib, *ic, *io;
    float *tok, *tok_pe, *tq, *tk, *tv, *ta, *th, *hyper, *hid, *hid2;
    float *mi1, *md1, *mi2, *md2, *u1y, *u1, *u2y, *u2, *att_buf;
    size_t att_sz;
    int n_sparse;
};

/* ---- small numeric kernels -------------------------------------------------- */

/* Cephes-style expf, written so the compiler vectorises it in simd loops:
   2^n · p(r), |r| ≤ ln2/2, ~2 ulp on [-87, 88]; inputs are clamped there. */
static float msx__sam_exp(float x) {
    float t, fx, r, r2, p, sc;
    int32_t n;
    uint32_t bits;
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    t = x * 1.44269504088896341f + 127.5f; /* > 0: truncation == floor */
    n = (int32_t)t;
    fx = (float)(n - 127);
    r = x - fx * 0.693359375f;
    r = r + fx * 2.12194440e-4f;
    r2 = r * r;
    p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;
    bits = (uint32_t)n << 23;
    memcpy(&sc, &bits, 4);
    return p * sc;
}

/* Exact (erf) GELU with erf from Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7,
   the same formula oneDNN's gelu_erf uses); tanh-approximated GELU would be
   4.7e-4 off per activation (golden README, "Tolerances"). */
static float msx__sam_gelu(float x) {
    float z = x * 0.70710678118654752f;
    float az = z < 0 ? -z : z;
    float t = 1.0f / (1.0f + 0.3275911f * az);
    float p = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
    float e = 1.0f - p * msx__sam_exp(-az * az);
    e = z < 0 ? -e : e;
    return 0.5f * x * (1.0f + e);
}


/* Row kernels of the attention softmax and the small dot products. Written
   with AVX2/FMA intrinsics when the compiler targets them (gcc -O2 does not
   vectorise the omp-simd reductions reliably); portable C otherwise. */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MSX__SAM_AVX2 1
static __m256 msx__sam_exp8(__m256 x) {
    __m256 t, fx, r, r2, p;
    __m256i n;
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(127.5f));
    n = _mm256_cvttps_epi32(t);
    fx = _mm256_cvtepi32_ps(_mm256_sub_epi32(n, _mm256_set1_epi32(127)));
    r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fmadd_ps(fx, _mm256_set1_ps(2.12194440e-4f), r);
    r2 = _mm256_mul_ps(r, r);
    p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
}
static float msx__sam_hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_shuffle_ps(a, a, 1));
    return _mm_cvtss_f32(a);
}
static float msx__sam_hmax8(__m256 v) {
    __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_max_ps(a, _mm_movehl_ps(a, a));
    a = _mm_max_ss(a, _mm_shuffle_ps(a, a, 1));
    return _mm_cvtss_f32(a);
}
#endif

static float msx__sam_dot(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0;
#ifdef MSX__SAM_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    s = msx__sam_hsum8(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* s[j] = s[j]·scale + add (+ addv[j] if addv); returns max_j s[j]. */
static float msx__sam_row_affine_max(float *s, int n, float scale, float add, const float *addv, float mx) {
    int j = 0;
#ifdef MSX__SAM_AVX2
    __m256 vs = _mm256_set1_ps(scale), va = _mm256_set1_ps(add), vm = _mm256_set1_ps(mx);
    for (; j + 8 <= n; j += 8) {
        __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(s + j), vs, va);
        if (addv) v = _mm256_add_ps(v, _mm256_loadu_ps(addv + j));
        _mm256_storeu_ps(s + j, v);
        vm = _mm256_max_ps(vm, v);
    }
    mx = msx__sam_hmax8(vm);
#endif
    for (; j < n; j++) {
        float v = s[j] * scale + add;
        if (addv) v += addv[j];
        s[j] = v;
        mx = v > mx ? v : mx;
    }
    return mx;
}

/* s[j] = exp(s[j] - mx); returns the sum. */
static float msx__sam_row_expsum(float *s, int n, float mx) {
    int j = 0;
    float sum = 0;
#ifdef MSX__SAM_AVX2
    __m256 vm = _mm256_set1_ps(mx), acc = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
        __m256 e = msx__sam_exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
        _mm256_storeu_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = msx__sam_hsum8(acc);
#endif
    for (; j < n; j++) {
        float e = msx__sam_exp(s[j] - mx);
        s[j] = e;
        sum += e;
    }
    return sum;
}

static void msx__sam_row_scale(float *s, int n, float f) {
    int j = 0;
#ifdef MSX__SAM_AVX2
    __m256 vf = _mm256_set1_ps(f);
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), vf));
#endif
    for (; j < n; j++) s[j] *= f;
}

static void msx__sam_gelu_inplace(float *x, size_t n, int nt) {
    long i, nb = (long)(n / 1024 + 1);
#pragma omp parallel for num_threads(nt) schedule(static) if (n > 65536)
    for (i = 0; i < nb; i++) {
        size_t j = (size_t)i * 1024, e = j + 1024 < n ? j + 1024 : n;
#ifdef MSX__SAM_AVX2
        const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), sgn = _mm256_set1_ps(-0.0f);
        for (; j + 8 <= e; j += 8) {
            __m256 v = _mm256_loadu_ps(x + j), z = _mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f));
            __m256 az = _mm256_andnot_ps(sgn, z), t, p, er;
            t = _mm256_div_ps(one, _mm256_fmadd_ps(az, _mm256_set1_ps(0.3275911f), one));
            p = _mm256_fmadd_ps(t, _mm256_set1_ps(1.061405429f), _mm256_set1_ps(-1.453152027f));
            p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
            p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
            p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
            p = _mm256_mul_ps(p, t);
            er = _mm256_fnmadd_ps(p, msx__sam_exp8(_mm256_mul_ps(_mm256_xor_ps(az, sgn), az)), one);
            er = _mm256_or_ps(er, _mm256_and_ps(z, sgn)); /* erf(-z) = -erf(z) */
            _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, er)));
        }
#endif
        for (; j < e; j++) x[j] = msx__sam_gelu(x[j]);
    }
}

/* Row-wise LayerNorm (nn.LayerNorm / SAM's LayerNorm2d over channels): biased
   variance, (x - mean) / sqrt(var + eps) · w + b. In place allowed. */
static void msx__sam_ln(const float *x, int ldx, float *y, int ldy, int rows, int C, const float *w,
                        const float *b, float eps, int nt) {
    int i;
#pragma omp parallel for num_threads(nt) schedule(static) if (rows > 16)
    for (i = 0; i < rows; i++) {
        const float *xi = x + (size_t)i * ldx;
        float *yi = y + (size_t)i * ldy;
        double s = 0, ss = 0;
        float mean, rstd;
        int c;
#pragma omp simd reduction(+ : s)
        for (c = 0; c < C; c++) s += xi[c];
        mean = (float)(s / C);
#pragma omp simd reduction(+ : ss)
        for (c = 0; c < C; c++) {
            double d = (double)(xi[c] - mean);
            ss += d * d;
        }
        rstd = (float)(1.0 / sqrt(ss / C + (double)eps));
#pragma omp simd
        for (c = 0; c < C; c++) yi[c] = (xi[c] - mean) * rstd * w[c] + b[c];
    }
}

/* y[M×N] = x[M×K] · Wᵀ + b (W: N×K torch Linear), optional ReLU. For the
   token side of the decoder (M ≤ 71) and the M = 1 heads. */
static void msx__sam_lin(const float *x, int ldx, int M, int K, const float *W, const float *b, int N, float *y,
                         int ldy, int relu, int nt) {
    long it;
#pragma omp parallel for num_threads(nt) schedule(static) if ((long)M * N * K > (1L << 22))
    for (it = 0; it < (long)M * N; it++) {
        int i = (int)(it / N), n = (int)(it % N);
        float s = msx__sam_dot(x + (size_t)i * ldx, W + (size_t)n * K, K);
        s += b ? b[n] : 0.0f;
        if (relu && s < 0) s = 0;
        y[(size_t)i * ldy + n] = s;
    }
}

/* Plain multi-head attention on already projected q, k, v (decoder):
   out_i,h = softmax(q_i,h · k_j,hᵀ / sqrt(dh)) · v_j,h. `buf`: nt × nk floats. */
static void msx__sam_mha(const float *q, int ldq, int nq, const float *k, int ldk, const float *v, int ldv, int nk,
                         int heads, int dh, float *out, int ldo, float *buf, int nt) {
    long it;
    float sq = sqrtf((float)dh);
#pragma omp parallel for num_threads(nt) schedule(static) if ((long)nq * nk * dh * heads > 32768)
    for (it = 0; it < (long)nq * heads; it++) {
        int i = (int)(it / heads), h = (int)(it % heads), j, d;
        const float *qi = q + (size_t)i * ldq + h * dh;
        float *s = buf + (size_t)omp_get_thread_num() * nk, *o = out + (size_t)i * ldo + h * dh;
        float mx = -INFINITY, inv;
        for (j = 0; j < nk; j++) {
            float t = msx__sam_dot(qi, k + (size_t)j * ldk + h * dh, dh) / sq; /* official: attn / math.sqrt(c_per_head) */
            s[j] = t;
            mx = t > mx ? t : mx;
        }
        inv = 1.0f / msx__sam_row_expsum(s, nk, mx);
        for (d = 0; d < dh; d++) o[d] = 0;
        for (j = 0; j < nk; j++) {
            const float *vj = v + (size_t)j * ldv + h * dh;
            float p = s[j] * inv;
            for (d = 0; d < dh; d++) o[d] += p * vj[d];
        }
    }
}

static void msx__sam_add(float *y, const float *a, const float *b, size_t n, int nt) {
    long i;
#pragma omp parallel for simd num_threads(nt) schedule(static) if (n > 65536)
    for (i = 0; i < (long)n; i++) y[i] = a[i] + b[i];
}

/* [rows × cols] -> [cols × rows] */
static void msx__sam_transpose(const float *src, int rows, int cols, float *dst, int nt) {
    int i;
#pragma omp parallel for num_threads(nt) schedule(static) if ((long)rows * cols > 65536)
    for (i = 0; i < cols; i++) {
        int j;
        for (j = 0; j < rows; j++) dst[(size_t)i * rows + j] = src[(size_t)j * cols + i];
    }
}

/* ---- oneDNN plumbing ---------------------------------------------------------- */

static msx_result msx__sam_dnnl(dnnl_status_t st, const char *what) {
    if (st == dnnl_success) return MSX_OK;
    return msx__err(MSX_E_DNNL, "SAM: oneDNN %s failed (status %d)", what, (int)st);
}

/* Finds or creates the matmul for a shape; returns its index or -1. */
static int msx__sam_mm_add(msx_sam *m, int M, int K, int N, int lda, int ldb, int ldc, int trans_b, int bias,
                           int post, int sum) {
    msx__sam_mm *o;
    dnnl_dims_t ad, bd, cd, bid, as, bs, cs;
    dnnl_matmul_desc_t desc;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t po = NULL;
    dnnl_primitive_desc_t pd = NULL;
    dnnl_status_t st;
    const dnnl_memory_desc_t *smd;
    int i;
    for (i = 0; i < m->n_mm; i++) {
        o = &m->mm[i];
        if (o->M == M && o->K == K && o->N == N && o->lda == lda && o->ldb == ldb && o->ldc == ldc &&
            o->trans_b == trans_b && o->bias == bias && o->post == post && o->sum == sum)
            return i;
    }
    if (m->n_mm == MSX__SAM_MAX_MM) { msx__err(MSX_E_LIMIT, "SAM: too many matmul shapes"); return -1; }
    o = &m->mm[m->n_mm];
    memset(o, 0, sizeof *o);
    o->M = M; o->K = K; o->N = N; o->lda = lda; o->ldb = ldb; o->ldc = ldc;
    o->trans_b = trans_b; o->bias = bias; o->post = post; o->sum = sum;
    ad[0] = M; ad[1] = K; as[0] = lda; as[1] = 1;
    bd[0] = K; bd[1] = N;
    if (trans_b) { bs[0] = 1; bs[1] = ldb; } else { bs[0] = ldb; bs[1] = 1; }
    cd[0] = M; cd[1] = N; cs[0] = ldc; cs[1] = 1;
    bid[0] = 1; bid[1] = N;
    st = dnnl_memory_desc_init_by_strides(&o->md[0], 2, ad, dnnl_f32, as);
    if (st == dnnl_success) st = dnnl_memory_desc_init_by_strides(&o->md[1], 2, bd, dnnl_f32, bs);
    if (st == dnnl_success) st = dnnl_memory_desc_init_by_tag(&o->md[2], 2, bid, dnnl_f32, dnnl_ab);
    if (st == dnnl_success) st = dnnl_memory_desc_init_by_strides(&o->md[3], 2, cd, dnnl_f32, cs);
    if (st == dnnl_success) st = dnnl_matmul_desc_init(&desc, &o->md[0], &o->md[1], bias ? &o->md[2] : NULL, &o->md[3]);
    if (st == dnnl_success) st = dnnl_primitive_attr_create(&attr);
    if (st == dnnl_success) st = dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user);
    if (st == dnnl_success && (post || sum)) {
        st = dnnl_post_ops_create(&po);
        if (st == dnnl_success && sum) st = dnnl_post_ops_append_sum(po, 1.0f);
        if (st == dnnl_success && post == 1) st = dnnl_post_ops_append_eltwise(po, 1.0f, dnnl_eltwise_gelu_erf, 0, 0);
        if (st == dnnl_success && post == 2) st = dnnl_post_ops_append_eltwise(po, 1.0f, dnnl_eltwise_relu, 0, 0);
        if (st == dnnl_success) st = dnnl_primitive_attr_set_post_ops(attr, po);
    }
    for (i = 0; i < 2 && st == dnnl_success; i++) {
        int saved = omp_get_max_threads();
        omp_set_num_threads(i == 0 ? m->nt_max : 1);
        st = dnnl_primitive_desc_create(&pd, &desc, attr, m->eng, NULL);
        if (st == dnnl_success) {
            size_t sz;
            smd = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
            sz = smd ? dnnl_memory_desc_get_size(smd) : 0;
            if (sz > o->scratch) o->scratch = sz;
            st = dnnl_primitive_create(i == 0 ? &o->prim : &o->prim1, pd);
        }
        omp_set_num_threads(saved);
        if (pd) dnnl_primitive_desc_destroy(pd);
        pd = NULL;
    }
    if (po) dnnl_post_ops_destroy(po);
    if (attr) dnnl_primitive_attr_destroy(attr);
    if (st != dnnl_success) {
        if (o->prim) dnnl_primitive_destroy(o->prim);
        if (o->prim1) dnnl_primitive_destroy(o->prim1);
        o->prim = o->prim1 = NULL;
        msx__err(MSX_E_DNNL, "SAM: oneDNN matmul %d×%d×%d (lda %d ldb %d ldc %d) could not be created (status %d)",
                 M, K, N, lda, ldb, ldc, (int)st);
        return -1;
    }
    return m->n_mm++;
}

/* Runs matmul `op` on slot `slot` of the workspace; errors are recorded in
   ws->dnnl_err (this is called from parallel loops). */
static void msx__sam_mm_run(const msx_sam *m, msx_sam_ws *ws, int slot, int op, const float *a, const float *b,
                            const float *bias, float *c) {
    const msx__sam_mm *o = &m->mm[op];
    dnnl_memory_t *mem = ws->mem + ((size_t)slot * m->n_mm + (size_t)op) * 4;
    dnnl_exec_arg_t args[5];
    int n = 0;
    dnnl_status_t st;
    st = dnnl_memory_set_data_handle(mem[0], (void *)a);
    if (st == dnnl_success) st = dnnl_memory_set_data_handle(mem[1], (void *)b);
    if (st == dnnl_success) st = dnnl_memory_set_data_handle(mem[3], c);
    if (st == dnnl_success && o->bias) st = dnnl_memory_set_data_handle(mem[2], (void *)bias);
    if (st != dnnl_success) { ws->dnnl_err = (int)st; return; }
    args[n].arg = DNNL_ARG_SRC; args[n++].memory = mem[0];
    args[n].arg = DNNL_ARG_WEIGHTS; args[n++].memory = mem[1];
    args[n].arg = DNNL_ARG_DST; args[n++].memory = mem[3];
    if (o->bias) { args[n].arg = DNNL_ARG_BIAS; args[n++].memory = mem[2]; }
    if (o->scratch) { args[n].arg = DNNL_ARG_SCRATCHPAD; args[n++].memory = ws->scr_mem[slot]; }
    st = dnnl_primitive_execute(ws->nt == 1 || omp_in_parallel() ? o->prim1 : o->prim, ws->stream[slot], n, args);
    if (st == dnnl_success) st = dnnl_stream_wait(ws->stream[slot]);
    if (st != dnnl_success) ws->dnnl_err = (int)st;
}

/* ---- weights ------------------------------------------------------------------ */

/* Looks up an F32 tensor by printf-style name and checks its shape
   (expected dims d[0..nd), -1 = any). */
static MSX__PRINTF(6, 7) msx_result msx__sam_w(const msx_checkpoint *ck, const float **out, const msx_tensor **tout,
                                              int nd, const int64_t *d, const char *fmt, ...) {
    char name[256];
    va_list ap;
    const msx_tensor *t;
    int i, ok;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    t = msx_ckpt_find(ck, name);
    if (!t)
        return msx__err(MSX_E_KEY_MISMATCH, "SAM: tensor '%s' is missing from the checkpoint%s%s", name,
                        ck->path ? " " : "", ck->path ? ck->path : "");
    if (t->dtype != MSX_F32)
        return msx__err(MSX_E_UNSUPPORTED, "SAM: tensor '%s' is %s in memory; convert with msx_ckpt_to_f32 first",
                        name, msx_dtype_name(t->dtype));
    ok = t->ndim == nd;
    for (i = 0; ok && i < nd; i++)
        if (d[i] >= 0 && t->shape[i] != d[i]) ok = 0;
    if (!ok) {
        char a[96], b[96];
        int p = 0, q = 0;
        for (i = 0; i < nd && p < 80; i++) p += snprintf(a + p, sizeof a - (size_t)p, i ? "×%lld" : "%lld", (long long)d[i]);
        for (i = 0; i < t->ndim && q < 80; i++)
            q += snprintf(b + q, sizeof b - (size_t)q, i ? "×%lld" : "%lld", (long long)t->shape[i]);
        if (!nd) snprintf(a, sizeof a, "scalar");
        if (!t->ndim) snprintf(b, sizeof b, "scalar");
        return msx__err(MSX_E_SHAPE, "SAM: tensor '%s' has shape %s, the architecture expects %s (-1 = any)", name, b, a);
    }
    *out = (const float *)t->data;
    if (tout) *tout = t;
    return MSX_OK;
}

static int64_t *msx__sam_dims(int64_t *d, int64_t a, int64_t b, int64_t c, int64_t e) {
    d[0] = a; d[1] = b; d[2] = c; d[3] = e;
    return d;
}

/* get_rel_pos (official image_encoder.py): resize a table of L rows to
   2·size−1 rows with 1-D linear interpolation, align_corners=False. */
static void msx__sam_resize_relpos(const float *src, int L, int hd, float *dst, int Lo) {
    int i, c;
    float scale = (float)L / (float)Lo;
    for (i = 0; i < Lo; i++) {
        float s = scale * ((float)i + 0.5f) - 0.5f, l1, l0;
        int i0, i1;
        if (s < 0) s = 0;
        i0 = (int)s;
        if (i0 > L - 1) i0 = L - 1;
        i1 = i0 + (i0 < L - 1);
        l1 = s - (float)i0;
        l0 = 1.0f - l1;
        for (c = 0; c < hd; c++) dst[(size_t)i * hd + c] = l0 * src[(size_t)i0 * hd + c] + l1 * src[(size_t)i1 * hd + c];
    }
}

#define MSX__SAM_TRY(x) do { msx_result r_ = (x); if (r_ != MSX_OK) return r_; } while (0)

static msx_result msx__sam_attw_bind(const msx_checkpoint *ck, msx__sam_attw *w, int D, int Di, const char *pfx) {
    int64_t d[4];
    MSX__SAM_TRY(msx__sam_w(ck, &w->qw, NULL, 2, msx__sam_dims(d, Di, D, 0, 0), "%s.q_proj.weight", pfx));
    MSX__SAM_TRY(msx__sam_w(ck, &w->qb, NULL, 1, msx__sam_dims(d, Di, 0, 0, 0), "%s.q_proj.bias", pfx));
    MSX__SAM_TRY(msx__sam_w(ck, &w->kw, NULL, 2, msx__sam_dims(d, Di, D, 0, 0), "%s.k_proj.weight", pfx));
    MSX__SAM_TRY(msx__sam_w(ck, &w->kb, NULL, 1, msx__sam_dims(d, Di, 0, 0, 0), "%s.k_proj.bias", pfx));
    MSX__SAM_TRY(msx__sam_w(ck, &w->vw, NULL, 2, msx__sam_dims(d, Di, D, 0, 0), "%s.v_proj.weight", pfx));
    MSX__SAM_TRY(msx__sam_w(ck, &w->vb, NULL, 1, msx__sam_dims(d, Di, 0, 0, 0), "%s.v_proj.bias", pfx));
    MSX__SAM_TRY(msx__sam_w(ck, &w->ow, NULL, 2, msx__sam_dims(d, D, Di, 0, 0), "%s.out_proj.weight", pfx));
    MSX__SAM_TRY(msx__sam_w(ck, &w->ob, NULL, 1, msx__sam_dims(d, D, 0, 0, 0), "%s.out_proj.bias", pfx));
    return MSX_OK;
}

static void msx__sam_pe(const float *G, int D2, float x, float y, float *out);

/* Resolves every weight pointer, checks shapes, and rewrites the derived
   copies. first = 1 (msx_sam_create) allocates the derived buffers; later
   calls (msx_sam_refresh) allocate nothing and fail if a shape changed. */
static msx_result msx__sam_bind(msx_sam *m, int first) {
    const msx_checkpoint *ck = m->ck;
    const msx_sam_arch *a = &m->a;
    int C = m->C, D = m->D, hd = m->hd, i, j, k;
    int64_t d[4];
    char p[160];
    MSX__SAM_TRY(msx__sam_w(ck, &m->patch_w, NULL, 4, msx__sam_dims(d, C, a->in_chans, a->patch_size, a->patch_size),
                            "image_encoder.patch_embed.proj.weight"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->patch_b, NULL, 1, msx__sam_dims(d, C, 0, 0, 0), "image_encoder.patch_embed.proj.bias"));
    m->pos = NULL;
    if (a->use_abs_pos) {
        const msx_tensor *t = msx_ckpt_find(ck, "image_encoder.pos_embed");
        if (t && t->ndim == 4 && (t->shape[1] != m->H || t->shape[2] != m->W))
            return msx__err(MSX_E_UNSUPPORTED,
                            "SAM: image_encoder.pos_embed is a %lld×%lld grid but img_size %d gives %d×%d tokens; "
                            "pos_embed interpolation is not implemented (use the checkpoint's img_size)",
                            (long long)t->shape[1], (long long)t->shape[2], a->img_size, m->H, m->W);
        MSX__SAM_TRY(msx__sam_w(ck, &m->pos, NULL, 4, msx__sam_dims(d, 1, m->H, m->W, C), "image_encoder.pos_embed"));
    }
    for (i = 0; i < a->depth; i++) {
        msx__sam_blk *b = &m->blk[i];
        snprintf(p, sizeof p, "image_encoder.blocks.%d", i);
        MSX__SAM_TRY(msx__sam_w(ck, &b->n1w, NULL, 1, msx__sam_dims(d, C, 0, 0, 0), "%s.norm1.weight", p));
        MSX__SAM_TRY(msx__sam_w(ck, &b->n1b, NULL, 1, d, "%s.norm1.bias", p));
        MSX__SAM_TRY(msx__sam_w(ck, &b->n2w, NULL, 1, d, "%s.norm2.weight", p));
        MSX__SAM_TRY(msx__sam_w(ck, &b->n2b, NULL, 1, d, "%s.norm2.bias", p));
        MSX__SAM_TRY(msx__sam_w(ck, &b->projb, NULL, 1, d, "%s.attn.proj.bias", p));
        MSX__SAM_TRY(msx__sam_w(ck, &b->fc2b, NULL, 1, d, "%s.mlp.lin2.bias", p));
        MSX__SAM_TRY(msx__sam_w(ck, &b->qkvw, NULL, 2, msx__sam_dims(d, 3 * C, C, 0, 0), "%s.attn.qkv.weight", p));
        MSX__SAM_TRY(msx__sam_w(ck, &b->qkvb, NULL, 1, msx__sam_dims(d, 3 * C, 0, 0, 0), "%s.attn.qkv.bias", p));
        MSX__SAM_TRY(msx__sam_w(ck, &b->projw, NULL, 2, msx__sam_dims(d, C, C, 0, 0), "%s.attn.proj.weight", p));
        MSX__SAM_TRY(msx__sam_w(ck, &b->fc1w, NULL, 2, msx__sam_dims(d, a->mlp_dim, C, 0, 0), "%s.mlp.lin1.weight", p));
        MSX__SAM_TRY(msx__sam_w(ck, &b->fc1b, NULL, 1, msx__sam_dims(d, a->mlp_dim, 0, 0, 0), "%s.mlp.lin1.bias", p));
        MSX__SAM_TRY(msx__sam_w(ck, &b->fc2w, NULL, 2, msx__sam_dims(d, C, a->mlp_dim, 0, 0), "%s.mlp.lin2.weight", p));
        b->rph = b->rpw = NULL;
        if (a->use_rel_pos) {
            const msx_tensor *th, *tw;
            const float *rh, *rw;
            int need_h = 2 * b->gh - 1, need_w = 2 * b->gw - 1;
            MSX__SAM_TRY(msx__sam_w(ck, &rh, &th, 2, msx__sam_dims(d, -1, hd, 0, 0), "%s.attn.rel_pos_h", p));
            MSX__SAM_TRY(msx__sam_w(ck, &rw, &tw, 2, d, "%s.attn.rel_pos_w", p));
            if (th->shape[0] < 1 || tw->shape[0] < 1)
                return msx__err(MSX_E_SHAPE, "SAM: %s.attn.rel_pos_h/w has no rows", p);
            b->rph = rh;
            b->rpw = rw;
            if (th->shape[0] != need_h || tw->shape[0] != need_w) {
                if (first) {
                    b->rph_i = (float *)MSX_MALLOC((size_t)(need_h + need_w) * hd * sizeof(float));
                    if (!b->rph_i) return msx__err(MSX_E_NOMEM, "SAM: out of memory (rel-pos tables)");
                    b->rpw_i = b->rph_i + (size_t)need_h * hd;
                } else if (!b->rph_i) {
                    return msx__err(MSX_E_SHAPE, "SAM: %s.attn.rel_pos_h changed shape since msx_sam_create", p);
                }
                msx__sam_resize_relpos(rh, (int)th->shape[0], hd, b->rph_i, need_h);
                msx__sam_resize_relpos(rw, (int)tw->shape[0], hd, b->rpw_i, need_w);
                b->rph = b->rph_i;
                b->rpw = b->rpw_i;
            } else if (b->rph_i) {
                return msx__err(MSX_E_SHAPE, "SAM: %s.attn.rel_pos_h changed shape since msx_sam_create", p);
            }
        }
    }
    MSX__SAM_TRY(msx__sam_w(ck, &m->neck0, NULL, 4, msx__sam_dims(d, D, C, 1, 1), "image_encoder.neck.0.weight"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->neck2, NULL, 4, msx__sam_dims(d, D, D, 3, 3), "image_encoder.neck.2.weight"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->neck1w, NULL, 1, msx__sam_dims(d, D, 0, 0, 0), "image_encoder.neck.1.weight"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->neck1b, NULL, 1, d, "image_encoder.neck.1.bias"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->neck3w, NULL, 1, d, "image_encoder.neck.3.weight"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->neck3b, NULL, 1, d, "image_encoder.neck.3.bias"));
    /* prompt encoder */
    MSX__SAM_TRY(msx__sam_w(ck, &m->pe_gauss, NULL, 2, msx__sam_dims(d, 2, D / 2, 0, 0),
                            "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"));
    for (i = 0; i < 4; i++)
        MSX__SAM_TRY(msx__sam_w(ck, &m->point_emb[i], NULL, 2, msx__sam_dims(d, 1, D, 0, 0),
                                "prompt_encoder.point_embeddings.%d.weight", i));
    MSX__SAM_TRY(msx__sam_w(ck, &m->not_a_point, NULL, 2, d, "prompt_encoder.not_a_point_embed.weight"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->no_mask, NULL, 2, d, "prompt_encoder.no_mask_embed.weight"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->md0w, NULL, 4, msx__sam_dims(d, m->c1, 1, 2, 2), "prompt_encoder.mask_downscaling.0.weight"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->md0b, NULL, 1, msx__sam_dims(d, m->c1, 0, 0, 0), "prompt_encoder.mask_downscaling.0.bias"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->md1w, NULL, 1, d, "prompt_encoder.mask_downscaling.1.weight"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->md1b, NULL, 1, d, "prompt_encoder.mask_downscaling.1.bias"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->md3w, NULL, 4, msx__sam_dims(d, m->c2, m->c1, 2, 2), "prompt_encoder.mask_downscaling.3.weight"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->md3b, NULL, 1, msx__sam_dims(d, m->c2, 0, 0, 0), "prompt_encoder.mask_downscaling.3.bias"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->md4w, NULL, 1, d, "prompt_encoder.mask_downscaling.4.weight"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->md4b, NULL, 1, d, "prompt_encoder.mask_downscaling.4.bias"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->md6w, NULL, 4, msx__sam_dims(d, D, m->c2, 1, 1), "prompt_encoder.mask_downscaling.6.weight"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->md6b, NULL, 1, msx__sam_dims(d, D, 0, 0, 0), "prompt_encoder.mask_downscaling.6.bias"));
    /* mask decoder */
    for (i = 0; i < a->dec_depth; i++) {
        msx__sam_declayer *L = &m->dl[i];
        char q[200];
        snprintf(p, sizeof p, "mask_decoder.transformer.layers.%d", i);
        snprintf(q, sizeof q, "%s.self_attn", p);
        MSX__SAM_TRY(msx__sam_attw_bind(ck, &L->self, D, D, q));
        snprintf(q, sizeof q, "%s.cross_attn_token_to_image", p);
        MSX__SAM_TRY(msx__sam_attw_bind(ck, &L->t2i, D, m->Di, q));
        snprintf(q, sizeof q, "%s.cross_attn_image_to_token", p);
        MSX__SAM_TRY(msx__sam_attw_bind(ck, &L->i2t, D, m->Di, q));
        msx__sam_dims(d, D, 0, 0, 0);
        MSX__SAM_TRY(msx__sam_w(ck, &L->n1w, NULL, 1, d, "%s.norm1.weight", p));
        MSX__SAM_TRY(msx__sam_w(ck, &L->n1b, NULL, 1, d, "%s.norm1.bias", p));
        MSX__SAM_TRY(msx__sam_w(ck, &L->n2w, NULL, 1, d, "%s.norm2.weight", p));
        MSX__SAM_TRY(msx__sam_w(ck, &L->n2b, NULL, 1, d, "%s.norm2.bias", p));
        MSX__SAM_TRY(msx__sam_w(ck, &L->n3w, NULL, 1, d, "%s.norm3.weight", p));
        MSX__SAM_TRY(msx__sam_w(ck, &L->n3b, NULL, 1, d, "%s.norm3.bias", p));
        MSX__SAM_TRY(msx__sam_w(ck, &L->n4w, NULL, 1, d, "%s.norm4.weight", p));
        MSX__SAM_TRY(msx__sam_w(ck, &L->n4b, NULL, 1, d, "%s.norm4.bias", p));
        MSX__SAM_TRY(msx__sam_w(ck, &L->l2b, NULL, 1, d, "%s.mlp.lin2.bias", p));
        MSX__SAM_TRY(msx__sam_w(ck, &L->l1w, NULL, 2, msx__sam_dims(d, a->dec_mlp_dim, D, 0, 0), "%s.mlp.lin1.weight", p));
        MSX__SAM_TRY(msx__sam_w(ck, &L->l1b, NULL, 1, msx__sam_dims(d, a->dec_mlp_dim, 0, 0, 0), "%s.mlp.lin1.bias", p));
        MSX__SAM_TRY(msx__sam_w(ck, &L->l2w, NULL, 2, msx__sam_dims(d, D, a->dec_mlp_dim, 0, 0), "%s.mlp.lin2.weight", p));
    }
    MSX__SAM_TRY(msx__sam_attw_bind(ck, &m->fin, D, m->Di, "mask_decoder.transformer.final_attn_token_to_image"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->nfw, NULL, 1, msx__sam_dims(d, D, 0, 0, 0), "mask_decoder.transformer.norm_final_attn.weight"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->nfb, NULL, 1, d, "mask_decoder.transformer.norm_final_attn.bias"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->iou_tok, NULL, 2, msx__sam_dims(d, 1, D, 0, 0), "mask_decoder.iou_token.weight"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->mask_tok, NULL, 2, msx__sam_dims(d, a->num_mask_tokens, D, 0, 0), "mask_decoder.mask_tokens.weight"));
    MSX__SAM_TRY(msx__sam_w(ck, &m->up0w, NULL, 4, msx__sam_dims(d, D, m->D4, 2, 2), "mask_decoder.output_upscaling.0.weight"));
    {
        const float *b0, *b3;
        MSX__SAM_TRY(msx__sam_w(ck, &b0, NULL, 1, msx__sam_dims(d, m->D4, 0, 0, 0), "mask_decoder.output_upscaling.0.bias"));
        MSX__SAM_TRY(msx__sam_w(ck, &m->up1w, NULL, 1, d, "mask_decoder.output_upscaling.1.weight"));
        MSX__SAM_TRY(msx__sam_w(ck, &m->up1b, NULL, 1, d, "mask_decoder.output_upscaling.1.bias"));
        MSX__SAM_TRY(msx__sam_w(ck, &m->up3w, NULL, 4, msx__sam_dims(d, m->D4, m->D8, 2, 2), "mask_decoder.output_upscaling.3.weight"));
        MSX__SAM_TRY(msx__sam_w(ck, &b3, NULL, 1, msx__sam_dims(d, m->D8, 0, 0, 0), "mask_decoder.output_upscaling.3.bias"));
        if (first) {
            m->up0b_rep = (float *)MSX_MALLOC((size_t)4 * (m->D4 + m->D8) * sizeof(float));
            if (!m->up0b_rep) return msx__err(MSX_E_NOMEM, "SAM: out of memory");
            m->up3b_rep = m->up0b_rep + 4 * m->D4;
        }
        /* ConvTranspose2d k2 s2 as a matmul: output column o·4 + ky·2 + kx */
        for (i = 0; i < 4 * m->D4; i++) m->up0b_rep[i] = b0[i / 4];
        for (i = 0; i < 4 * m->D8; i++) m->up3b_rep[i] = b3[i / 4];
    }
    for (i = 0; i < a->num_mask_tokens; i++) {
        for (j = 0; j < 3; j++) {
            int out = j == 2 ? m->D8 : D;
            MSX__SAM_TRY(msx__sam_w(ck, &m->hyp_w[i * 3 + j], NULL, 2, msx__sam_dims(d, out, D, 0, 0),
                                    "mask_decoder.output_hypernetworks_mlps.%d.layers.%d.weight", i, j));
            MSX__SAM_TRY(msx__sam_w(ck, &m->hyp_b[i * 3 + j], NULL, 1, msx__sam_dims(d, out, 0, 0, 0),
                                    "mask_decoder.output_hypernetworks_mlps.%d.layers.%d.bias", i, j));
        }
    }
    for (j = 0; j < a->iou_head_depth; j++) {
        int in = j == 0 ? D : a->iou_head_hidden, out = j == a->iou_head_depth - 1 ? a->num_mask_tokens : a->iou_head_hidden;
        MSX__SAM_TRY(msx__sam_w(ck, &m->iou_w[j], NULL, 2, msx__sam_dims(d, out, in, 0, 0),
                                "mask_decoder.iou_prediction_head.layers.%d.weight", j));
        MSX__SAM_TRY(msx__sam_w(ck, &m->iou_b[j], NULL, 1, msx__sam_dims(d, out, 0, 0, 0),
                                "mask_decoder.iou_prediction_head.layers.%d.bias", j));
    }
    /* derived: neck 3×3 weights as D × (ky, kx, cin) rows for the im2col matmul */
    if (first) {
        m->neck2_packed = (float *)msx__aligned_alloc((size_t)D * 9 * D * sizeof(float));
        m->dense_pe_tok = (float *)msx__aligned_alloc((size_t)2 * m->T * D * sizeof(float));
        if (!m->neck2_packed || !m->dense_pe_tok) return msx__err(MSX_E_NOMEM, "SAM: out of memory");
        m->dense_pe_chw = m->dense_pe_tok + (size_t)m->T * D;
    }
    for (i = 0; i < D; i++)
        for (k = 0; k < 9; k++)
            for (j = 0; j < D; j++) m->neck2_packed[((size_t)i * 9 + k) * D + j] = m->neck2[((size_t)i * D + j) * 9 + k];
    /* dense PE at pixel centres ((j+0.5)/w, (i+0.5)/h) */
    for (i = 0; i < m->H; i++)
        for (j = 0; j < m->W; j++)
            msx__sam_pe(m->pe_gauss, D / 2, ((float)j + 0.5f) / (float)m->W, ((float)i + 0.5f) / (float)m->H,
                        m->dense_pe_tok + ((size_t)i * m->W + j) * D);
    for (i = 0; i < m->T; i++)
        for (j = 0; j < D; j++) m->dense_pe_chw[(size_t)j * m->T + i] = m->dense_pe_tok[(size_t)i * D + j];
    return MSX_OK;
}

/* Random-Fourier PE of a point already normalised to [0,1]² (x, y):
   [sin(2π·(2c−1)·G), cos(...)], row 0 of G multiplies x. */
static void msx__sam_pe(const float *G, int D2, float x, float y, float *out) {
    int k;
    float cx = 2.0f * x - 1.0f, cy = 2.0f * y - 1.0f;
    for (k = 0; k < D2; k++) {
        float v = cx * G[k];
        v = v + cy * G[D2 + k];
        v = v * 6.28318530717958648f;
        out[k] = sinf(v);
        out[D2 + k] = cosf(v);
    }
}

/* ---- model ---------------------------------------------------------------- */

static msx_result msx__sam_check_arch(const msx_sam_arch *a) {
    int i;
    if (a->img_size <= 0 || a->patch_size <= 0 || a->img_size % a->patch_size || a->in_chans <= 0)
        return msx__err(MSX_E_ARG, "SAM arch: img_size %d must be a positive multiple of patch_size %d", a->img_size,
                        a->patch_size);
    if (a->embed_dim <= 0 || a->num_heads <= 0 || a->embed_dim % a->num_heads || a->depth <= 0 || a->mlp_dim <= 0)
        return msx__err(MSX_E_ARG, "SAM arch: embed_dim %d / num_heads %d / depth %d / mlp_dim %d invalid", a->embed_dim,
                        a->num_heads, a->depth, a->mlp_dim);
    if (a->window_size < 0 || a->n_global < 0 || a->n_global > 64)
        return msx__err(MSX_E_ARG, "SAM arch: window_size %d / n_global %d invalid", a->window_size, a->n_global);
    for (i = 0; i < a->n_global; i++)
        if (a->global_idx[i] < 0 || a->global_idx[i] >= a->depth)
            return msx__err(MSX_E_ARG, "SAM arch: global_idx[%d] = %d outside 0..%d", i, a->global_idx[i], a->depth - 1);
    if (a->out_chans <= 0 || a->out_chans % 8 || a->prompt_dim != a->out_chans || a->dec_dim != a->out_chans)
        return msx__err(MSX_E_ARG, "SAM arch: out_chans %d, prompt_dim %d and dec_dim %d must be equal multiples of 8",
                        a->out_chans, a->prompt_dim, a->dec_dim);
    if (a->mask_in_chans <= 0 || a->mask_in_chans % 4)
        return msx__err(MSX_E_ARG, "SAM arch: mask_in_chans %d must be a positive multiple of 4", a->mask_in_chans);
    if (a->dec_depth <= 0 || a->dec_heads <= 0 || a->dec_downsample <= 0 || a->dec_dim % a->dec_downsample ||
        (a->dec_dim / a->dec_downsample) % a->dec_heads || a->dec_dim % a->dec_heads || a->dec_mlp_dim <= 0)
        return msx__err(MSX_E_ARG, "SAM arch: decoder depth %d heads %d downsample %d mlp %d do not divide dim %d",
                        a->dec_depth, a->dec_heads, a->dec_downsample, a->dec_mlp_dim, a->dec_dim);
    if (a->num_mask_tokens < 4 || a->iou_head_depth < 2 || a->iou_head_hidden <= 0)
        return msx__err(MSX_E_ARG, "SAM arch: num_mask_tokens %d (need >= 4), iou_head_depth %d (>= 2), hidden %d",
                        a->num_mask_tokens, a->iou_head_depth, a->iou_head_hidden);
    return MSX_OK;
}

static int msx__sam_blk_is_global(const msx_sam_arch *a, int i) {
    int k;
    if (a->window_size == 0) return 1;
    for (k = 0; k < a->n_global; k++)
        if (a->global_idx[k] == i) return 1;
    return 0;
}

/* oneDNN 2.6 implements bf16 matmul only on avx512_core and newer: probe. */
static int msx__sam_bf16_available(dnnl_engine_t eng) {
    dnnl_memory_desc_t a, b, c;
    dnnl_dims_t d = {64, 64};
    dnnl_matmul_desc_t desc;
    dnnl_primitive_desc_t pd = NULL;
    if (dnnl_memory_desc_init_by_tag(&a, 2, d, dnnl_bf16, dnnl_ab) != dnnl_success) return 0;
    if (dnnl_memory_desc_init_by_tag(&b, 2, d, dnnl_bf16, dnnl_ab) != dnnl_success) return 0;
    if (dnnl_memory_desc_init_by_tag(&c, 2, d, dnnl_f32, dnnl_ab) != dnnl_success) return 0;
    if (dnnl_matmul_desc_init(&desc, &a, &b, NULL, &c) != dnnl_success) return 0;
    if (dnnl_primitive_desc_create(&pd, &desc, NULL, eng, NULL) != dnnl_success) return 0;
    dnnl_primitive_desc_destroy(pd);
    return 1;
}

static msx_result msx__sam_create_ops(msx_sam *m) {
    const msx_sam_arch *a = &m->a;
    int T = m->T, C = m->C, D = m->D, hd = m->hd, K = a->in_chans * a->patch_size * a->patch_size;
#define MSX__SAM_OP(dst, ...) do { if ((m->dst = msx__sam_mm_add(m, __VA_ARGS__)) < 0) return msx__errcode; } while (0)
    MSX__SAM_OP(op_patch, T, K, C, K, K, C, 1, 1, 0, 1);
    MSX__SAM_OP(op_qkv, T, C, 3 * C, C, C, 3 * C, 1, 1, 0, 0);
    MSX__SAM_OP(op_proj, T, C, C, C, C, C, 1, 1, 0, 1);
    MSX__SAM_OP(op_fc1, T, C, a->mlp_dim, C, C, a->mlp_dim, 1, 1, 1, 0);
    MSX__SAM_OP(op_fc2, T, a->mlp_dim, C, a->mlp_dim, a->mlp_dim, C, 1, 1, 0, 1);
    if (m->any_glob) {
        int r = T % m->mb;
        /* S[mb×T] = q·kᵀ straight from the qkv rows; O = P·v into the attention output */
        MSX__SAM_OP(op_gqk, m->mb, hd, T, 3 * C, 3 * C, T, 1, 0, 0, 0);
        MSX__SAM_OP(op_gav, m->mb, T, hd, T, 3 * C, C, 0, 0, 0, 0);
        /* rel-pos: q·R[r] for every table row r (then indexed by qh − kh + size − 1) */
        MSX__SAM_OP(op_grh, m->mb, hd, 2 * m->H - 1, 3 * C, hd, 2 * m->H - 1, 1, 0, 0, 0);
        MSX__SAM_OP(op_grw, m->mb, hd, 2 * m->W - 1, 3 * C, hd, 2 * m->W - 1, 1, 0, 0, 0);
        m->op_gqk_r = m->op_gav_r = m->op_grh_r = m->op_grw_r = -1;
        if (r) {
            MSX__SAM_OP(op_gqk_r, r, hd, T, 3 * C, 3 * C, T, 1, 0, 0, 0);
            MSX__SAM_OP(op_gav_r, r, T, hd, T, 3 * C, C, 0, 0, 0, 0);
            MSX__SAM_OP(op_grh_r, r, hd, 2 * m->H - 1, 3 * C, hd, 2 * m->H - 1, 1, 0, 0, 0);
            MSX__SAM_OP(op_grw_r, r, hd, 2 * m->W - 1, 3 * C, hd, 2 * m->W - 1, 1, 0, 0, 0);
        }
    }
    if (m->any_win) {
        int n = a->window_size * a->window_size;
        MSX__SAM_OP(op_wqk, n, hd, n, hd, hd, n, 1, 0, 0, 0);
        MSX__SAM_OP(op_wav, n, n, hd, n, hd, hd, 0, 0, 0, 0);
        MSX__SAM_OP(op_wrel, n, hd, 2 * a->window_size - 1, hd, hd, 2 * a->window_size - 1, 1, 0, 0, 0);
    }
    MSX__SAM_OP(op_neck1, T, C, D, C, C, D, 1, 0, 0, 0);
    MSX__SAM_OP(op_neck2, T, 9 * D, D, 9 * D, 9 * D, D, 1, 0, 0, 0);
    MSX__SAM_OP(op_md1, 4 * T, 4, m->c1, 4, 4, m->c1, 1, 1, 0, 0);
    MSX__SAM_OP(op_md2, T, 4 * m->c1, m->c2, 4 * m->c1, 4 * m->c1, m->c2, 1, 1, 0, 0);
    MSX__SAM_OP(op_md3, T, m->c2, D, m->c2, m->c2, D, 1, 1, 0, 0);
    MSX__SAM_OP(op_dproj_in, T, D, m->Di, D, D, m->Di, 1, 1, 0, 0);
    MSX__SAM_OP(op_dproj_out, T, m->Di, D, m->Di, m->Di, D, 1, 1, 0, 1);
    MSX__SAM_OP(op_up1, T, D, 4 * m->D4, D, 4 * m->D4, 4 * m->D4, 0, 1, 0, 0);
    MSX__SAM_OP(op_up2, 4 * T, m->D4, 4 * m->D8, m->D4, 4 * m->D8, 4 * m->D8, 0, 1, 1, 0);
#undef MSX__SAM_OP
    return MSX_OK;
}

MSXDEF void msx_sam_free(msx_sam *m) {
    int i;
    if (!m) return;
    for (i = 0; i < m->n_mm; i++) {
        if (m->mm[i].prim) dnnl_primitive_destroy(m->mm[i].prim);
        if (m->mm[i].prim1) dnnl_primitive_destroy(m->mm[i].prim1);
    }
    if (m->eng) dnnl_engine_destroy(m->eng);
    if (m->blk)
        for (i = 0; i < m->a.depth; i++) MSX_FREE(m->blk[i].rph_i);
    MSX_FREE(m->blk);
    MSX_FREE(m->dl);
    MSX_FREE(m->hyp_w);
    MSX_FREE(m->hyp_b);
    MSX_FREE(m->iou_w);
    MSX_FREE(m->iou_b);
    MSX_FREE(m->up0b_rep);
    msx__aligned_free(m->neck2_packed);
    msx__aligned_free(m->dense_pe_tok);
    MSX_FREE(m);
}

MSXDEF msx_result msx_sam_create(const msx_checkpoint *ck, const msx_sam_arch *arch, const msx_sam_options *opt,
                                 msx_sam **out) {
    msx_sam *m;
    msx_sam_arch inferred;
    msx_result r;
    int i, saved;
    dnnl_status_t st;
    if (!out) return msx__err(MSX_E_ARG, "msx_sam_create: out is NULL");
    *out = NULL;
    if (!ck) return msx__err(MSX_E_ARG, "msx_sam_create: checkpoint is NULL");
    if (!arch) {
#ifndef MSX_SKIP_CKPT
        MSX__SAM_TRY(msx_sam_arch_infer(ck, &inferred));
        arch = &inferred;
#else
        return msx__err(MSX_E_ARG, "msx_sam_create: arch is NULL and the checkpoint section (msx_sam_arch_infer) is not built");
#endif
    }
    MSX__SAM_TRY(msx__sam_check_arch(arch));
    m = (msx_sam *)msx__calloc(1, sizeof *m);
    if (!m) return msx__err(MSX_E_NOMEM, "SAM: out of memory");
    m->a = *arch;
    if (opt) m->opt = *opt;
    m->ck = ck;
    m->nt_max = m->opt.n_threads > 0 ? m->opt.n_threads : omp_get_max_threads();
    if (m->nt_max < 1) m->nt_max = 1;
    m->H = m->W = arch->img_size / arch->patch_size;
    m->T = m->H * m->W;
    m->C = arch->embed_dim;
    m->D = arch->out_chans;
    m->hd = m->C / arch->num_heads;
    m->Di = m->D / arch->dec_downsample;
    m->dh = m->Di / arch->dec_heads;
    m->c1 = arch->mask_in_chans / 4;
    m->c2 = arch->mask_in_chans;
    m->D4 = m->D / 4;
    m->D8 = m->D / 8;
    m->nt_tok_max = 1 + arch->num_mask_tokens + MSX_SAM_MAX_POINTS + 2;
    m->mb = m->T < MSX__SAM_ROWBLK ? m->T : MSX__SAM_ROWBLK;
    m->blk = (msx__sam_blk *)msx__calloc((size_t)arch->depth, sizeof *m->blk);
    m->dl = (msx__sam_declayer *)msx__calloc((size_t)arch->dec_depth, sizeof *m->dl);
    m->hyp_w = (const float **)msx__calloc((size_t)arch->num_mask_tokens * 3, sizeof(float *));
    m->hyp_b = (const float **)msx__calloc((size_t)arch->num_mask_tokens * 3, sizeof(float *));
    m->iou_w = (const float **)msx__calloc((size_t)arch->iou_head_depth, sizeof(float *));
    m->iou_b = (const float **)msx__calloc((size_t)arch->iou_head_depth, sizeof(float *));
    if (!m->blk || !m->dl || !m->hyp_w || !m->hyp_b || !m->iou_w || !m->iou_b) {
        msx_sam_free(m);
        return msx__err(MSX_E_NOMEM, "SAM: out of memory");
    }
    for (i = 0; i < arch->depth; i++) {
        msx__sam_blk *b = &m->blk[i];
        if (msx__sam_blk_is_global(arch, i)) {
            b->win = 0;
            b->gh = m->H;
            b->gw = m->W;
            m->any_glob = 1;
        } else {
            b->win = arch->window_size;
            b->gh = b->gw = arch->window_size;
            m->any_win = 1;
        }
    }
    if (m->any_win) {
        m->Hp = (m->H + arch->window_size - 1) / arch->window_size * arch->window_size;
        m->Wp = (m->W + arch->window_size - 1) / arch->window_size * arch->window_size;
    }
    st = dnnl_engine_create(&m->eng, dnnl_cpu, 0);
    if (st != dnnl_success) {
        msx_sam_free(m);
        return msx__sam_dnnl(st, "engine creation");
    }
    if (m->opt.precision == MSX_PREC_BF16) {
        int have = msx__sam_bf16_available(m->eng);
        msx_sam_free(m);
        return msx__err(MSX_E_UNSUPPORTED,
                        have ? "SAM: the bf16 path is not implemented in this build; use fp32"
                             : "SAM: bf16 needs a CPU with AVX512-BF16/AMX: oneDNN %d.%d has no bf16 matmul on this CPU "
                               "(AVX2 only); use fp32",
                        DNNL_VERSION_MAJOR, DNNL_VERSION_MINOR);
    }
    if (m->opt.precision != MSX_PREC_FP32) {
        msx_sam_free(m);
        return msx__err(MSX_E_ARG, "SAM: unknown precision %d", (int)m->opt.precision);
    }
    r = msx__sam_bind(m, 1);
    if (r == MSX_OK) {
        /* primitives are sized for the largest thread count they will run with */
        saved = omp_get_max_threads();
        omp_set_num_threads(m->nt_max);
        r = msx__sam_create_ops(m);
        omp_set_num_threads(saved);
    }
    if (r != MSX_OK) {
        msx_sam_free(m);
        return r;
    }
    m->small = msx_sam_encode_flops(m) < MSX_SAM_SMALL_FLOPS;
    *out = m;
    return MSX_OK;
}

MSXDEF msx_result msx_sam_refresh(msx_sam *m) {
    if (!m) return msx__err(MSX_E_ARG, "msx_sam_refresh: model is NULL");
    return msx__sam_bind(m, 0);
}

MSXDEF const msx_sam_arch *msx_sam_get_arch(const msx_sam *m) { return m ? &m->a : NULL; }

/* ---- workspace -------------------------------------------------------------- */

MSXDEF void msx_sam_ws_free(msx_sam_ws *ws) {
    size_t i, nmem;
    if (!ws) return;
    nmem = (size_t)ws->nslots * (size_t)ws->m->n_mm * 4;
    if (ws->mem)
        for (i = 0; i < nmem; i++)
            if (ws->mem[i]) dnnl_memory_destroy(ws->mem[i]);
    if (ws->scr_mem)
        for (i = 0; i < (size_t)ws->nslots; i++)
            if (ws->scr_mem[i]) dnnl_memory_destroy(ws->scr_mem[i]);
    if (ws->stream)
        for (i = 0; i < (size_t)ws->nslots; i++)
            if (ws->stream[i]) dnnl_stream_destroy(ws->stream[i]);
    MSX_FREE(ws->mem);
    MSX_FREE(ws->scr_mem);
    MSX_FREE(ws->stream);
    msx__aligned_free(ws->scr);
    msx__aligned_free(ws->x);
    msx__aligned_free(ws->tap_patch);
    MSX_FREE(ws);
}

MSXDEF msx_result msx_sam_ws_create(const msx_sam *m, msx_sam_ws **out) {
    msx_sam_ws *ws;
    const msx_sam_arch *a;
    size_t T, C, D, Di, big, slot, att, total, nmem, i, ntok;
    int s, k, n, mlp;
    float *p;
    dnnl_status_t st = dnnl_success;
    if (!out) return msx__err(MSX_E_ARG, "msx_sam_ws_create: out is NULL");
    *out = NULL;
    if (!m) return msx__err(MSX_E_ARG, "msx_sam_ws_create: model is NULL");
    a = &m->a;
    ws = (msx_sam_ws *)msx__calloc(1, sizeof *ws);
    if (!ws) return msx__err(MSX_E_NOMEM, "SAM: out of memory");
    ws->m = m;
    ws->nt = ws->nslots = m->nt_max;
    T = (size_t)m->T; C = (size_t)m->C; D = (size_t)m->D; Di = (size_t)m->Di;
    mlp = a->mlp_dim;
    big = T * 3 * C;
    if (T * (size_t)mlp > big) big = T * (size_t)mlp;
    if (T * 9 * D > big) big = T * 9 * D;
    if (T * (size_t)(a->in_chans * a->patch_size * a->patch_size) > big) big = T * (size_t)(a->in_chans * a->patch_size * a->patch_size);
    /* per-slot attention buffer (floats, each piece rounded to 16) */
    slot = 0;
    if (m->any_glob) slot = (size_t)m->mb * (T + (size_t)(2 * m->H - 1) + (size_t)(2 * m->W - 1) + 1) + (size_t)m->W + 64;
    if (m->any_win) {
        size_t nw = (size_t)a->window_size * (size_t)a->window_size;
        size_t sw = 4 * nw * (size_t)m->hd + nw * nw + 2 * nw * (size_t)(2 * a->window_size - 1) + nw + (size_t)a->window_size + 128;
        if (sw > slot) slot = sw;
    }
    slot = (slot + 15) / 16 * 16;
    ws->slot_sz = slot;
    ntok = (size_t)m->nt_tok_max;
    att = T > ntok ? T : ntok;
    att = (att + 15) / 16 * 16;
    ws->att_sz = att;
#define MSX__SAM_R16(x) (((size_t)(x) + 15) / 16 * 16)
    total = 2 * MSX__SAM_R16(T * C) + MSX__SAM_R16(big) + slot * (size_t)ws->nslots + 4 * MSX__SAM_R16(T * D) /* n1 n2 emb_tok emb_chw */
            + MSX__SAM_R16(ntok * D) /* sparse */ + 2 * MSX__SAM_R16(T * D) /* dense */ + 2 * MSX__SAM_R16(T * D) /* keys kp */
            + 4 * MSX__SAM_R16(T * Di) + 7 * MSX__SAM_R16(ntok * D) + MSX__SAM_R16(ntok * (size_t)a->dec_mlp_dim) /* th */
            + 2 * MSX__SAM_R16(D > (size_t)a->iou_head_hidden ? D : (size_t)a->iou_head_hidden)
            + MSX__SAM_R16(16 * T) + MSX__SAM_R16(4 * T * (size_t)m->c1) + MSX__SAM_R16(T * 4 * (size_t)m->c1) + MSX__SAM_R16(T * (size_t)m->c2)
            + MSX__SAM_R16(T * 4 * (size_t)m->D4) + MSX__SAM_R16(4 * T * (size_t)m->D4) + MSX__SAM_R16(4 * T * 4 * (size_t)m->D8)
            + MSX__SAM_R16(16 * T * (size_t)m->D8) + att * (size_t)ws->nslots;
    p = (float *)msx__aligned_alloc(total * sizeof(float));
    if (!p) { msx_sam_ws_free(ws); return msx__err(MSX_E_NOMEM, "SAM: out of memory for the workspace (%zu MB)", total * 4 >> 20); }
    ws->x = p;
#define MSX__SAM_TAKE(dst, n) do { ws->dst = p; p += MSX__SAM_R16(n); } while (0)
    p = ws->x;
    MSX__SAM_TAKE(x, T * C);
    MSX__SAM_TAKE(xn, T * C);
    MSX__SAM_TAKE(big, big);
    ws->slot_buf = p; p += slot * (size_t)ws->nslots;
    MSX__SAM_TAKE(n1, T * D);
    MSX__SAM_TAKE(n2, T * D);
    MSX__SAM_TAKE(emb_tok, T * D);
    MSX__SAM_TAKE(emb_chw, T * D);
    MSX__SAM_TAKE(sparse, ntok * D);
    MSX__SAM_TAKE(dense_tok, T * D);
    MSX__SAM_TAKE(dense_chw, T * D);
    MSX__SAM_TAKE(keys, T * D);
    MSX__SAM_TAKE(kp, T * D);
    MSX__SAM_TAKE(ia, T * Di);
    MSX__SAM_TAKE(ib, T * Di);
    MSX__SAM_TAKE(ic, T * Di);
    MSX__SAM_TAKE(io, T * Di);
    MSX__SAM_TAKE(tok, ntok * D);
    MSX__SAM_TAKE(tok_pe, ntok * D);
    MSX__SAM_TAKE(tq, ntok * D);
    MSX__SAM_TAKE(tk, ntok * D);
    MSX__SAM_TAKE(tv, ntok * D);
    MSX__SAM_TAKE(ta, ntok * D);
    MSX__SAM_TAKE(hyper, ntok * D);
    MSX__SAM_TAKE(th, ntok * (size_t)a->dec_mlp_dim);
    MSX__SAM_TAKE(hid, D > (size_t)a->iou_head_hidden ? D : (size_t)a->iou_head_hidden); /* MLP-head hidden rows */
    MSX__SAM_TAKE(hid2, D > (size_t)a->iou_head_hidden ? D : (size_t)a->iou_head_hidden);
    MSX__SAM_TAKE(mi1, 16 * T);
    MSX__SAM_TAKE(md1, 4 * T * (size_t)m->c1);
    MSX__SAM_TAKE(mi2, T * 4 * (size_t)m->c1);
    MSX__SAM_TAKE(md2, T * (size_t)m->c2);
    MSX__SAM_TAKE(u1y, T * 4 * (size_t)m->D4);
    MSX__SAM_TAKE(u1, 4 * T * (size_t)m->D4);
    MSX__SAM_TAKE(u2y, 4 * T * 4 * (size_t)m->D8);
    MSX__SAM_TAKE(u2, 16 * T * (size_t)m->D8);
    ws->att_buf = p;
#undef MSX__SAM_TAKE
    /* oneDNN objects: a stream, a scratchpad and one memory object per (op, arg) for every slot */
    ws->scr_sz = 64;
    for (k = 0; k < m->n_mm; k++)
        if (m->mm[k].scratch > ws->scr_sz) ws->scr_sz = m->mm[k].scratch;
    ws->scr_sz = (ws->scr_sz + 63) / 64 * 64;
    nmem = (size_t)ws->nslots * (size_t)m->n_mm * 4;
    ws->mem = (dnnl_memory_t *)msx__calloc(nmem, sizeof(dnnl_memory_t));
    ws->scr_mem = (dnnl_memory_t *)msx__calloc((size_t)ws->nslots, sizeof(dnnl_memory_t));
    ws->stream = (dnnl_stream_t *)msx__calloc((size_t)ws->nslots, sizeof(dnnl_stream_t));
    ws->scr = (unsigned char *)msx__aligned_alloc(ws->scr_sz * (size_t)ws->nslots);
    if (!ws->mem || !ws->scr_mem || !ws->stream || !ws->scr) { msx_sam_ws_free(ws); return msx__err(MSX_E_NOMEM, "SAM: out of memory"); }
    for (s = 0; s < ws->nslots && st == dnnl_success; s++) {
        dnnl_memory_desc_t smd;
        dnnl_dims_t sd;
        sd[0] = (dnnl_dim_t)ws->scr_sz;
        st = dnnl_stream_create(&ws->stream[s], m->eng, dnnl_stream_default_flags);
        if (st == dnnl_success) st = dnnl_memory_desc_init_by_tag(&smd, 1, sd, dnnl_u8, dnnl_a);
        if (st == dnnl_success) st = dnnl_memory_create(&ws->scr_mem[s], &smd, m->eng, ws->scr + (size_t)s * ws->scr_sz);
        for (k = 0; k < m->n_mm && st == dnnl_success; k++)
            for (n = 0; n < 4 && st == dnnl_success; n++) {
                i = ((size_t)s * m->n_mm + (size_t)k) * 4 + (size_t)n;
                st = dnnl_memory_create(&ws->mem[i], &m->mm[k].md[n], m->eng, DNNL_MEMORY_NONE);
            }
    }
    if (st != dnnl_success) { msx_sam_ws_free(ws); return msx__sam_dnnl(st, "workspace memory/stream creation"); }
    *out = ws;
    return MSX_OK;
}

MSXDEF msx_result msx_sam_ws_enable_taps(msx_sam_ws *ws) {
    size_t n;
    if (!ws) return msx__err(MSX_E_ARG, "msx_sam_ws_enable_taps: workspace is NULL");
    if (ws->tap_patch) return MSX_OK;
    n = (size_t)ws->m->T * (size_t)ws->m->C;
    ws->tap_patch = (float *)msx__aligned_alloc(n * (size_t)(ws->m->a.depth + 1) * sizeof(float));
    if (!ws->tap_patch) return msx__err(MSX_E_NOMEM, "SAM: out of memory for encoder taps");
    ws->tap_blocks = ws->tap_patch + n;
    return MSX_OK;
}

MSXDEF msx_result msx_sam_ws_set_threads(msx_sam_ws *ws, int n_threads) {
    if (!ws) return msx__err(MSX_E_ARG, "msx_sam_ws_set_threads: workspace is NULL");
    if (n_threads < 1 || n_threads > ws->nslots)
        return msx__err(MSX_E_ARG, "msx_sam_ws_set_threads: %d threads; the model was created for 1..%d (msx_sam_options.n_threads)",
                        n_threads, ws->nslots);
    ws->nt = n_threads;
    return MSX_OK;
}

MSXDEF const float *msx_sam_ws_tap(const msx_sam_ws *ws, const char *name, int *n) {
    const msx_sam *m;
    int dummy, i;
    if (!n) n = &dummy;
    *n = 0;
    if (!ws || !name) return NULL;
    m = ws->m;
    if (!strcmp(name, "patch_embed") && ws->tap_patch) { *n = m->T * m->C; return ws->tap_patch; }
    if (!strncmp(name, "block", 5) && ws->tap_blocks) {
        char *e;
        long b = strtol(name + 5, &e, 10);
        if (e != name + 5 && !*e && b >= 0 && b < m->a.depth) { *n = m->T * m->C; return ws->tap_blocks + (size_t)b * m->T * m->C; }
        return NULL;
    }
    if (!strcmp(name, "neck") || !strcmp(name, "image_embeddings")) { *n = m->T * m->D; return ws->emb_chw; }
    if (!strcmp(name, "sparse")) { *n = ws->n_sparse * m->D; return ws->sparse; }
    if (!strcmp(name, "dense")) { *n = m->T * m->D; return ws->dense_chw; }
    if (!strcmp(name, "dense_pe")) { *n = m->T * m->D; return m->dense_pe_chw; }
    (void)i;
    return NULL;
}

/* ---- image encoder ------------------------------------------------------------ */

/* Adds the decomposed rel-pos terms to rows of raw scores, then softmax:
   s = (q·k)·scale + rel_h[qh,kh] + rel_w[qw,kw] (official
   add_decomposed_rel_pos; rel terms from the unscaled q). Row i is query
   number i0 + i of a gh×gw grid; RH/RW (NULL: no rel-pos) hold q·R[r] for
   every table row r (rows × (2gh−1), rows × (2gw−1)), so rel_h[qh,kh] =
   RH[qh − kh + gh − 1]. The rows are left unnormalised: inv[i] = 1/Σ. */
static void msx__sam_softmax_rel(float *S, int ldS, int rows, int i0, int gh, int gw, const float *RH, const float *RW,
                                 float scale, float *rw, float *inv) {
    int i, kh, kw, nk = gh * gw;
    for (i = 0; i < rows; i++) {
        float *s = S + (size_t)i * ldS;
        float mx = -INFINITY;
        if (RH) {
            int pos = i0 + i, qh = pos / gw, qw = pos % gw;
            const float *rhi = RH + (size_t)i * (2 * gh - 1) + qh + gh - 1, *rwi = RW + (size_t)i * (2 * gw - 1) + qw + gw - 1;
            for (kw = 0; kw < gw; kw++) rw[kw] = rwi[-kw];
            for (kh = 0; kh < gh; kh++) mx = msx__sam_row_affine_max(s + (size_t)kh * gw, gw, scale, rhi[-kh], rw, mx);
        } else {
            mx = msx__sam_row_affine_max(s, nk, scale, 0.0f, NULL, mx);
        }
        inv[i] = 1.0f / msx__sam_row_expsum(s, nk, mx);
    }
}

/* Attention of block b: ws->big holds qkv (T × 3C, [q|k|v] head-major),
   result (before proj) goes to ws->xn (T × C). Work items: (head, block of
   query rows) for global attention, (window, head) for windowed attention;
   each thread owns a slot of scratch rows and calls oneDNN single-threaded. */
static void msx__sam_attention(const msx_sam *m, msx_sam_ws *ws, const msx__sam_blk *b) {
    int C = m->C, hd = m->hd, heads = m->a.num_heads, T = m->T, nt = ws->nt, rel = b->rph != NULL;
    float scale = 1.0f / sqrtf((float)hd);
    const float *qkv = ws->big;
    float *ao = ws->xn;
    long it;
    if (!b->win) {
        int mb = m->mb, nb = (T + mb - 1) / mb, Lh = 2 * m->H - 1, Lw = 2 * m->W - 1;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (it = 0; it < (long)heads * nb; it++) {
            int h = (int)(it / nb), blk = (int)(it % nb), slot = omp_get_thread_num(), i;
            int r0 = blk * mb, rows = T - r0 < mb ? T - r0 : mb, full = rows == mb;
            float *S = ws->slot_buf + (size_t)slot * ws->slot_sz, *RH = S + (size_t)mb * T, *RW = RH + (size_t)mb * Lh;
            float *inv = RW + (size_t)mb * Lw, *rw = inv + mb;
            const float *q = qkv + (size_t)r0 * 3 * C + (size_t)h * hd;
            msx__sam_mm_run(m, ws, slot, full ? m->op_gqk : m->op_gqk_r, q, qkv + C + (size_t)h * hd, NULL, S);
            if (rel) {
                msx__sam_mm_run(m, ws, slot, full ? m->op_grh : m->op_grh_r, q, b->rph, NULL, RH);
                msx__sam_mm_run(m, ws, slot, full ? m->op_grw : m->op_grw_r, q, b->rpw, NULL, RW);
            }
            msx__sam_softmax_rel(S, T, rows, r0, m->H, m->W, rel ? RH : NULL, RW, scale, rw, inv);
            msx__sam_mm_run(m, ws, slot, full ? m->op_gav : m->op_gav_r, S, qkv + 2 * C + (size_t)h * hd, NULL,
                            ao + (size_t)r0 * C + (size_t)h * hd);
            for (i = 0; i < rows; i++) msx__sam_row_scale(ao + (size_t)(r0 + i) * C + (size_t)h * hd, hd, inv[i]);
        }
    } else {
        int w = b->win, n = w * w, nwx = m->Wp / w, nwin = (m->Hp / w) * nwx, L = 2 * w - 1;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (it = 0; it < (long)nwin * heads; it++) {
            int win = (int)(it / heads), h = (int)(it % heads), slot = omp_get_thread_num();
            int wy = win / nwx, wx = win % nwx, t, d;
            float *qg = ws->slot_buf + (size_t)slot * ws->slot_sz, *kg = qg + (size_t)n * hd, *vg = kg + (size_t)n * hd;
            float *og = vg + (size_t)n * hd, *S = og + (size_t)n * hd, *RH = S + (size_t)n * n, *RW = RH + (size_t)n * L;
            float *inv = RW + (size_t)n * L, *rw = inv + n;
            const float *bq = b->qkvb + (size_t)h * hd;
            /* gather the window; zero-padded tokens have q/k/v = qkv bias */
            for (t = 0; t < n; t++) {
                int gy = wy * w + t / w, gx = wx * w + t % w;
                const float *src, *sk, *sv;
                if (gy < m->H && gx < m->W) {
                    src = qkv + ((size_t)gy * m->W + gx) * 3 * C + (size_t)h * hd;
                    sk = src + C;
                    sv = src + 2 * C;
                } else {
                    src = bq;
                    sk = bq + C;
                    sv = bq + 2 * C;
                }
                memcpy(qg + (size_t)t * hd, src, (size_t)hd * sizeof(float));
                memcpy(kg + (size_t)t * hd, sk, (size_t)hd * sizeof(float));
                memcpy(vg + (size_t)t * hd, sv, (size_t)hd * sizeof(float));
            }
            msx__sam_mm_run(m, ws, slot, m->op_wqk, qg, kg, NULL, S);
            if (rel) {
                msx__sam_mm_run(m, ws, slot, m->op_wrel, qg, b->rph, NULL, RH);
                msx__sam_mm_run(m, ws, slot, m->op_wrel, qg, b->rpw, NULL, RW);
            }
            msx__sam_softmax_rel(S, n, n, 0, w, w, rel ? RH : NULL, RW, scale, rw, inv);
            msx__sam_mm_run(m, ws, slot, m->op_wav, S, vg, NULL, og);
            for (t = 0; t < n; t++) {
                int gy = wy * w + t / w, gx = wx * w + t % w;
                float *o;
                if (gy >= m->H || gx >= m->W) continue;
                o = ao + ((size_t)gy * m->W + gx) * C + (size_t)h * hd;
                for (d = 0; d < hd; d++) o[d] = og[(size_t)t * hd + d] * inv[t];
            }
        }
    }
}

static msx_result msx__sam_encode_impl(const msx_sam *m, msx_sam_ws *ws, const float *input, float *emb) {
    const msx_sam_arch *a = &m->a;
    int T = m->T, C = m->C, D = m->D, H = m->H, W = m->W, P = a->patch_size, S = a->img_size, nt = ws->nt;
    int K = a->in_chans * P * P, i;
    long it;
    /* patch embedding: im2col rows (token), columns (c, ky, kx) as the conv weight */
#pragma omp parallel for num_threads(nt) schedule(static)
    for (it = 0; it < (long)T * a->in_chans; it++) {
        int t = (int)(it / a->in_chans), c = (int)(it % a->in_chans), ty = t / W, tx = t % W, ky;
        float *dst = ws->big + (size_t)t * K + (size_t)c * P * P;
        for (ky = 0; ky < P; ky++)
            memcpy(dst + (size_t)ky * P, input + ((size_t)c * S + (size_t)ty * P + ky) * S + (size_t)tx * P, (size_t)P * sizeof(float));
    }
    if (m->pos) memcpy(ws->x, m->pos, (size_t)T * C * sizeof(float));
    else memset(ws->x, 0, (size_t)T * C * sizeof(float));
    msx__sam_mm_run(m, ws, 0, m->op_patch, ws->big, m->patch_w, m->patch_b, ws->x); /* x = pos + conv */
    if (ws->tap_patch) memcpy(ws->tap_patch, ws->x, (size_t)T * C * sizeof(float));
    for (i = 0; i < a->depth; i++) {
        const msx__sam_blk *b = &m->blk[i];
        msx__sam_ln(ws->x, C, ws->xn, C, T, C, b->n1w, b->n1b, MSX__SAM_LN_EPS_ENC, nt);
        msx__sam_mm_run(m, ws, 0, m->op_qkv, ws->xn, b->qkvw, b->qkvb, ws->big);
        msx__sam_attention(m, ws, b);
        msx__sam_mm_run(m, ws, 0, m->op_proj, ws->xn, b->projw, b->projb, ws->x); /* x += proj(attn) */
        msx__sam_ln(ws->x, C, ws->xn, C, T, C, b->n2w, b->n2b, MSX__SAM_LN_EPS_ENC, nt);
        msx__sam_mm_run(m, ws, 0, m->op_fc1, ws->xn, b->fc1w, b->fc1b, ws->big); /* GELU fused */
        msx__sam_mm_run(m, ws, 0, m->op_fc2, ws->big, b->fc2w, b->fc2b, ws->x);  /* x += mlp */
        if (ws->tap_blocks) memcpy(ws->tap_blocks + (size_t)i * T * C, ws->x, (size_t)T * C * sizeof(float));
        if (ws->dnnl_err) break;
    }
    /* neck: 1×1 conv -> LayerNorm2d -> 3×3 conv (pad 1, im2col) -> LayerNorm2d */
    msx__sam_mm_run(m, ws, 0, m->op_neck1, ws->x, m->neck0, NULL, ws->n1);
    msx__sam_ln(ws->n1, D, ws->n1, D, T, D, m->neck1w, m->neck1b, MSX__SAM_LN_EPS_ENC, nt);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (it = 0; it < (long)T * 9; it++) {
        int t = (int)(it / 9), k = (int)(it % 9), y = t / W + k / 3 - 1, x = t % W + k % 3 - 1;
        float *dst = ws->big + ((size_t)t * 9 + k) * D;
        if (y < 0 || y >= H || x < 0 || x >= W) memset(dst, 0, (size_t)D * sizeof(float));
        else memcpy(dst, ws->n1 + ((size_t)y * W + x) * D, (size_t)D * sizeof(float));
    }
    msx__sam_mm_run(m, ws, 0, m->op_neck2, ws->big, m->neck2_packed, NULL, ws->n2);
    msx__sam_ln(ws->n2, D, ws->emb_tok, D, T, D, m->neck3w, m->neck3b, MSX__SAM_LN_EPS_ENC, nt);
    msx__sam_transpose(ws->emb_tok, T, D, ws->emb_chw, nt);
    if (ws->dnnl_err) return msx__err(MSX_E_DNNL, "SAM encode: a oneDNN matmul failed (status %d)", ws->dnnl_err);
    ws->have_emb = 1;
    if (emb) memcpy(emb, ws->emb_chw, (size_t)T * D * sizeof(float));
    return MSX_OK;
}

MSXDEF msx_result msx_sam_encode(const msx_sam *m, msx_sam_ws *ws, const float *input, float *emb) {
    int saved, nt;
    msx_result r;
    if (!m || !ws || !input) return msx__err(MSX_E_ARG, "msx_sam_encode: NULL model, workspace or input");
    if (ws->m != m) return msx__err(MSX_E_ARG, "msx_sam_encode: the workspace belongs to another model");
    ws->dnnl_err = 0;
    ws->have_emb = 0;
    nt = ws->nt;
    if (m->small) ws->nt = 1;
    saved = omp_get_max_threads(); /* oneDNN takes its thread count from here */
    omp_set_num_threads(ws->nt);
    r = msx__sam_encode_impl(m, ws, input, emb);
    omp_set_num_threads(saved);
    ws->nt = nt;
    return r;
}

/* ---- prompt encoder + mask decoder ------------------------------------------- */

static int msx__sam_finite(const float *v, size_t n) {
    size_t i;
    for (i = 0; i < n; i++)
        if (!isfinite(v[i])) return 0;
    return 1;
}

/* sparse (n_sparse × D) and dense (T × D) prompt embeddings */
static void msx__sam_prompt(const msx_sam *m, msx_sam_ws *ws, const msx_prompt *p) {
    int D = m->D, D2 = D / 2, T = m->T, W = m->W, nt = ws->nt, n = 0, i, c;
    float S = (float)m->a.img_size;
    for (i = 0; i < p->n_points; i++, n++) {
        float *e = ws->sparse + (size_t)n * D;
        int lab = p->labels[i];
        msx__sam_pe(m->pe_gauss, D2, (p->points[2 * i] + 0.5f) / S, (p->points[2 * i + 1] + 0.5f) / S, e);
        if (lab == -1) for (c = 0; c < D; c++) e[c] = m->not_a_point[c];
        else if (lab == 0) for (c = 0; c < D; c++) e[c] += m->point_emb[0][c];
        else if (lab == 1) for (c = 0; c < D; c++) e[c] += m->point_emb[1][c];
    }
    if (p->n_points > 0 && !p->box) { /* padding point: PE zeroed, not_a_point_embed */
        float *e = ws->sparse + (size_t)n * D;
        for (c = 0; c < D; c++) e[c] = m->not_a_point[c];
        n++;
    }
    if (p->box) {
        for (i = 0; i < 2; i++, n++) {
            float *e = ws->sparse + (size_t)n * D;
            msx__sam_pe(m->pe_gauss, D2, (p->box[2 * i] + 0.5f) / S, (p->box[2 * i + 1] + 0.5f) / S, e);
            for (c = 0; c < D; c++) e[c] += m->point_emb[2 + i][c];
        }
    }
    ws->n_sparse = n;
    if (p->mask_input) {
        int W2 = 2 * W, W4 = 4 * W, H2 = 2 * m->H;
        long it;
        /* conv 2×2 s2 (1 -> c1): im2col columns (ky, kx) */
#pragma omp parallel for num_threads(nt) schedule(static)
        for (it = 0; it < (long)H2 * W2; it++) {
            int y = (int)(it / W2), x = (int)(it % W2);
            float *d = ws->mi1 + (size_t)it * 4;
            d[0] = p->mask_input[(size_t)(2 * y) * W4 + 2 * x];
            d[1] = p->mask_input[(size_t)(2 * y) * W4 + 2 * x + 1];
            d[2] = p->mask_input[(size_t)(2 * y + 1) * W4 + 2 * x];
            d[3] = p->mask_input[(size_t)(2 * y + 1) * W4 + 2 * x + 1];
        }
        msx__sam_mm_run(m, ws, 0, m->op_md1, ws->mi1, m->md0w, m->md0b, ws->md1);
        msx__sam_ln(ws->md1, m->c1, ws->md1, m->c1, 4 * T, m->c1, m->md1w, m->md1b, MSX__SAM_LN_EPS_ENC, nt);
        msx__sam_gelu_inplace(ws->md1, (size_t)4 * T * m->c1, nt);
        /* conv 2×2 s2 (c1 -> c2): im2col columns (cin, ky, kx) */
#pragma omp parallel for num_threads(nt) schedule(static)
        for (it = 0; it < (long)T; it++) {
            int y = (int)(it / W), x = (int)(it % W), ci, k;
            float *d = ws->mi2 + (size_t)it * 4 * m->c1;
            for (ci = 0; ci < m->c1; ci++)
                for (k = 0; k < 4; k++)
                    d[ci * 4 + k] = ws->md1[((size_t)(2 * y + k / 2) * W2 + 2 * x + k % 2) * m->c1 + ci];
        }
        msx__sam_mm_run(m, ws, 0, m->op_md2, ws->mi2, m->md3w, m->md3b, ws->md2);
        msx__sam_ln(ws->md2, m->c2, ws->md2, m->c2, T, m->c2, m->md4w, m->md4b, MSX__SAM_LN_EPS_ENC, nt);
        msx__sam_gelu_inplace(ws->md2, (size_t)T * m->c2, nt);
        msx__sam_mm_run(m, ws, 0, m->op_md3, ws->md2, m->md6w, m->md6b, ws->dense_tok);
    } else {
        for (i = 0; i < T; i++) memcpy(ws->dense_tok + (size_t)i * D, m->no_mask, (size_t)D * sizeof(float));
    }
    msx__sam_transpose(ws->dense_tok, T, D, ws->dense_chw, nt);
}

static msx_result msx__sam_decode_impl(const msx_sam *m, msx_sam_ws *ws, const float *emb, const msx_prompt *p,
                                       int multimask, float *low_res, float *iou) {
    const msx_sam_arch *a = &m->a;
    int T = m->T, D = m->D, Di = m->Di, nt = ws->nt, nm = a->num_mask_tokens, heads = a->dec_heads;
    int Nt, l, i, j, k0, nout, W = m->W, D4 = m->D4, D8 = m->D8, LR = 16 * T;
    long it;
    float *keys = ws->keys, *kp = ws->kp, *q = ws->tok;
    /* image side: keys = embedding (token-major) + dense */
    msx__sam_prompt(m, ws, p);
    if (emb) msx__sam_transpose(emb, D, T, keys, nt);
    else memcpy(keys, ws->emb_tok, (size_t)T * D * sizeof(float));
    msx__sam_add(keys, keys, ws->dense_tok, (size_t)T * D, nt);
    /* tokens = [iou_token, mask_tokens, sparse]; they are also the query PE */
    Nt = 1 + nm + ws->n_sparse;
    memcpy(ws->tok_pe, m->iou_tok, (size_t)D * sizeof(float));
    memcpy(ws->tok_pe + D, m->mask_tok, (size_t)nm * D * sizeof(float));
    memcpy(ws->tok_pe + (size_t)(1 + nm) * D, ws->sparse, (size_t)ws->n_sparse * D * sizeof(float));
    memcpy(q, ws->tok_pe, (size_t)Nt * D * sizeof(float));
    for (l = 0; l < a->dec_depth; l++) {
        const msx__sam_declayer *L = &m->dl[l];
        /* self-attention (layer 0: no PE and no residual, skip_first_layer_pe) */
        const float *qin = q;
        if (l > 0) { msx__sam_add(ws->ta, q, ws->tok_pe, (size_t)Nt * D, 1); qin = ws->ta; }
        msx__sam_lin(qin, D, Nt, D, L->self.qw, L->self.qb, D, ws->tq, D, 0, nt);
        msx__sam_lin(qin, D, Nt, D, L->self.kw, L->self.kb, D, ws->tk, D, 0, nt);
        msx__sam_lin(q, D, Nt, D, L->self.vw, L->self.vb, D, ws->tv, D, 0, nt);
        msx__sam_mha(ws->tq, D, Nt, ws->tk, D, ws->tv, D, Nt, heads, D / heads, ws->hyper, D, ws->att_buf, nt);
        msx__sam_lin(ws->hyper, D, Nt, D, L->self.ow, L->self.ob, D, ws->ta, D, 0, nt);
        if (l == 0) memcpy(q, ws->ta, (size_t)Nt * D * sizeof(float));
        else msx__sam_add(q, q, ws->ta, (size_t)Nt * D, 1);
        msx__sam_ln(q, D, q, D, Nt, D, L->n1w, L->n1b, MSX__SAM_LN_EPS_DEC, 1);
        /* token -> image */
        msx__sam_add(ws->ta, q, ws->tok_pe, (size_t)Nt * D, 1);
        msx__sam_add(kp, keys, m->dense_pe_tok, (size_t)T * D, nt);
        msx__sam_lin(ws->ta, D, Nt, D, L->t2i.qw, L->t2i.qb, Di, ws->tq, Di, 0, nt);
        msx__sam_mm_run(m, ws, 0, m->op_dproj_in, kp, L->t2i.kw, L->t2i.kb, ws->ia);
        msx__sam_mm_run(m, ws, 0, m->op_dproj_in, keys, L->t2i.vw, L->t2i.vb, ws->ib);
        msx__sam_mha(ws->tq, Di, Nt, ws->ia, Di, ws->ib, Di, T, heads, m->dh, ws->hyper, Di, ws->att_buf, nt);
        msx__sam_lin(ws->hyper, Di, Nt, Di, L->t2i.ow, L->t2i.ob, D, ws->ta, D, 0, nt);
        msx__sam_add(q, q, ws->ta, (size_t)Nt * D, 1);
        msx__sam_ln(q, D, q, D, Nt, D, L->n2w, L->n2b, MSX__SAM_LN_EPS_DEC, 1);
        /* MLP (ReLU) */
        msx__sam_lin(q, D, Nt, D, L->l1w, L->l1b, a->dec_mlp_dim, ws->th, a->dec_mlp_dim, 1, nt);
        msx__sam_lin(ws->th, a->dec_mlp_dim, Nt, a->dec_mlp_dim, L->l2w, L->l2b, D, ws->ta, D, 0, nt);
        msx__sam_add(q, q, ws->ta, (size_t)Nt * D, 1);
        msx__sam_ln(q, D, q, D, Nt, D, L->n3w, L->n3b, MSX__SAM_LN_EPS_DEC, 1);
        /* image -> token: q = keys + key_pe (kp unchanged), k = tokens + PE, v = tokens */
        msx__sam_add(ws->ta, q, ws->tok_pe, (size_t)Nt * D, 1);
        msx__sam_mm_run(m, ws, 0, m->op_dproj_in, kp, L->i2t.qw, L->i2t.qb, ws->ic);
        msx__sam_lin(ws->ta, D, Nt, D, L->i2t.kw, L->i2t.kb, Di, ws->tk, Di, 0, nt);
        msx__sam_lin(q, D, Nt, D, L->i2t.vw, L->i2t.vb, Di, ws->tv, Di, 0, nt);
        msx__sam_mha(ws->ic, Di, T, ws->tk, Di, ws->tv, Di, Nt, heads, m->dh, ws->io, Di, ws->att_buf, nt);
        msx__sam_mm_run(m, ws, 0, m->op_dproj_out, ws->io, L->i2t.ow, L->i2t.ob, keys); /* keys += out_proj */
        msx__sam_ln(keys, D, keys, D, T, D, L->n4w, L->n4b, MSX__SAM_LN_EPS_DEC, nt);
    }
    /* final token -> image attention */
    msx__sam_add(ws->ta, q, ws->tok_pe, (size_t)Nt * D, 1);
    msx__sam_add(kp, keys, m->dense_pe_tok, (size_t)T * D, nt);
    msx__sam_lin(ws->ta, D, Nt, D, m->fin.qw, m->fin.qb, Di, ws->tq, Di, 0, nt);
    msx__sam_mm_run(m, ws, 0, m->op_dproj_in, kp, m->fin.kw, m->fin.kb, ws->ia);
    msx__sam_mm_run(m, ws, 0, m->op_dproj_in, keys, m->fin.vw, m->fin.vb, ws->ib);
    msx__sam_mha(ws->tq, Di, Nt, ws->ia, Di, ws->ib, Di, T, heads, m->dh, ws->hyper, Di, ws->att_buf, nt);
    msx__sam_lin(ws->hyper, Di, Nt, Di, m->fin.ow, m->fin.ob, D, ws->ta, D, 0, nt);
    msx__sam_add(q, q, ws->ta, (size_t)Nt * D, 1);
    msx__sam_ln(q, D, q, D, Nt, D, m->nfw, m->nfb, MSX__SAM_LN_EPS_DEC, 1);
    /* output upscaling: ConvT 2×2 s2 -> LayerNorm2d -> GELU -> ConvT 2×2 s2 -> GELU */
    msx__sam_mm_run(m, ws, 0, m->op_up1, keys, m->up0w, m->up0b_rep, ws->u1y);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (it = 0; it < (long)T * 4; it++) {
        int t = (int)(it / 4), k = (int)(it % 4), y = 2 * (t / W) + k / 2, x = 2 * (t % W) + k % 2, o;
        float *d = ws->u1 + ((size_t)y * 2 * W + x) * D4;
        const float *s = ws->u1y + (size_t)t * 4 * D4 + k;
        for (o = 0; o < D4; o++) d[o] = s[o * 4];
    }
    msx__sam_ln(ws->u1, D4, ws->u1, D4, 4 * T, D4, m->up1w, m->up1b, MSX__SAM_LN_EPS_ENC, nt);
    msx__sam_gelu_inplace(ws->u1, (size_t)4 * T * D4, nt);
    msx__sam_mm_run(m, ws, 0, m->op_up2, ws->u1, m->up3w, m->up3b_rep, ws->u2y); /* GELU fused */
#pragma omp parallel for num_threads(nt) schedule(static)
    for (it = 0; it < (long)T * 16; it++) {
        int t = (int)(it / 4), k = (int)(it % 4), W2 = 2 * W, y = 2 * (t / W2) + k / 2, x = 2 * (t % W2) + k % 2, o;
        float *d = ws->u2 + ((size_t)y * 4 * W + x) * D8;
        const float *s = ws->u2y + (size_t)t * 4 * D8 + k;
        for (o = 0; o < D8; o++) d[o] = s[o * 4];
    }
    if (ws->dnnl_err) return msx__err(MSX_E_DNNL, "SAM decode: a oneDNN matmul failed (status %d)", ws->dnnl_err);
    /* hypernetworks on the selected mask tokens, then masks = hyper · upscaled */
    k0 = multimask ? 1 : 0;
    nout = multimask ? 3 : 1;
    for (j = 0; j < nout; j++) {
        int tkn = k0 + j;
        const float *const *hw = m->hyp_w + tkn * 3, *const *hb = m->hyp_b + tkn * 3;
        msx__sam_lin(q + (size_t)(1 + tkn) * D, D, 1, D, hw[0], hb[0], D, ws->hid, D, 1, 1);
        msx__sam_lin(ws->hid, D, 1, D, hw[1], hb[1], D, ws->hid2, D, 1, 1);
        msx__sam_lin(ws->hid2, D, 1, D, hw[2], hb[2], D8, ws->hyper + (size_t)j * D8, D8, 0, 1);
    }
    if (low_res) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (it = 0; it < (long)LR; it++) {
            const float *u = ws->u2 + (size_t)it * D8;
            int jj, c;
            for (jj = 0; jj < nout; jj++) {
                const float *h = ws->hyper + (size_t)jj * D8;
                float s = 0;
                for (c = 0; c < D8; c++) s += h[c] * u[c];
                low_res[(size_t)jj * LR + it] = s;
            }
        }
    }
    if (iou) {
        /* IoU head: MLP(D, hidden, num_mask_tokens, depth) with ReLU between layers */
        const float *in = q;
        int in_dim = D, hidden = a->iou_head_hidden;
        float *bufs[2];
        float out4[64];
        bufs[0] = ws->hid;
        bufs[1] = ws->hid2;
        for (l = 0; l < a->iou_head_depth; l++) {
            int last = l == a->iou_head_depth - 1, od = last ? nm : hidden;
            float *o = last ? out4 : bufs[l & 1];
            if (last && nm > 64) return msx__err(MSX_E_LIMIT, "SAM: more than 64 mask tokens");
            msx__sam_lin(in, in_dim, 1, in_dim, m->iou_w[l], m->iou_b[l], od, o, od, !last, 1);
            in = o;
            in_dim = od;
        }
        for (j = 0; j < nout; j++) iou[j] = out4[k0 + j];
    }
    (void)i;
    return MSX_OK;
}

MSXDEF msx_result msx_sam_decode(const msx_sam *m, msx_sam_ws *ws, const float *emb, const msx_prompt *p, int multimask,
                                 float *low_res, float *iou) {
    int saved, i, nt;
    msx_result r;
    msx_prompt none;
    if (!m || !ws) return msx__err(MSX_E_ARG, "msx_sam_decode: NULL model or workspace");
    if (ws->m != m) return msx__err(MSX_E_ARG, "msx_sam_decode: the workspace belongs to another model");
    if (!emb && !ws->have_emb) return msx__err(MSX_E_STATE, "msx_sam_decode: no embedding: call msx_sam_encode first or pass emb");
    if (!p) { memset(&none, 0, sizeof none); p = &none; }
    if (p->n_points < 0 || p->n_points > MSX_SAM_MAX_POINTS)
        return msx__err(MSX_E_ARG, "msx_sam_decode: %d points (allowed 0..%d)", p->n_points, MSX_SAM_MAX_POINTS);
    if (p->n_points && (!p->points || !p->labels)) return msx__err(MSX_E_ARG, "msx_sam_decode: points or labels is NULL");
    if (p->n_points && !msx__sam_finite(p->points, (size_t)p->n_points * 2))
        return msx__err(MSX_E_ARG, "msx_sam_decode: a point coordinate is NaN or infinite");
    for (i = 0; i < p->n_points; i++)
        if (p->labels[i] < -1 || p->labels[i] > 1)
            return msx__err(MSX_E_ARG, "msx_sam_decode: point %d has label %d (allowed -1, 0, 1)", i, p->labels[i]);
    if (p->box && !msx__sam_finite(p->box, 4)) return msx__err(MSX_E_ARG, "msx_sam_decode: the box has a NaN or infinite coordinate");
    if (p->mask_input && !msx__sam_finite(p->mask_input, (size_t)16 * m->T))
        return msx__err(MSX_E_ARG, "msx_sam_decode: mask_input contains NaN or infinite values");
    if (emb && !msx__sam_finite(emb, (size_t)m->T * m->D))
        return msx__err(MSX_E_ARG, "msx_sam_decode: the image embedding contains NaN or infinite values");
    ws->dnnl_err = 0;
    nt = ws->nt;
    if (m->small) ws->nt = 1;
    saved = omp_get_max_threads();
    omp_set_num_threads(ws->nt);
    r = msx__sam_decode_impl(m, ws, emb, p, multimask, low_res, iou);
    omp_set_num_threads(saved);
    ws->nt = nt;
    return r;
}

/* ---- FLOP counts (multiply-add = 2) ---------------------------------------- */

MSXDEF double msx_sam_encode_flops(const msx_sam *m) {
    const msx_sam_arch *a;
    double T, C, f = 0, D;
    int i;
    if (!m) return 0;
    a = &m->a;
    T = m->T; C = m->C; D = m->D;
    f += 2.0 * T * C * a->in_chans * a->patch_size * a->patch_size;
    for (i = 0; i < a->depth; i++) {
        const msx__sam_blk *b = &m->blk[i];
        f += 2.0 * T * C * (3 * C + C + 2.0 * a->mlp_dim);
        if (b->win) {
            double n = (double)b->win * b->win, nwin = (double)(m->Hp / b->win) * (m->Wp / b->win);
            f += nwin * 2.0 * 2.0 * n * n * C; /* q·kᵀ and P·v over all heads */
        } else {
            f += 2.0 * 2.0 * T * T * C;
        }
    }
    f += 2.0 * T * C * D + 2.0 * T * 9 * D * D;
    return f;
}

MSXDEF double msx_sam_decode_flops(const msx_sam *m, int n_sparse, int with_mask_input) {
    const msx_sam_arch *a;
    double T, D, Di, Nt, f = 0;
    if (!m) return 0;
    a = &m->a;
    T = m->T; D = m->D; Di = m->Di; Nt = 1 + a->num_mask_tokens + n_sparse;
    f += a->dec_depth * (2.0 * T * D * Di * 4 + 2.0 * 2 * T * Nt * Di * 2 + 2.0 * Nt * D * (4 * D + 4 * Di + 2.0 * a->dec_mlp_dim));
    f += 2.0 * T * D * Di * 2 + 2.0 * 2 * T * Nt * Di + 2.0 * Nt * D * 2 * Di;
    f += 2.0 * T * D * 4 * m->D4 + 2.0 * 4 * T * m->D4 * 4 * m->D8 + 2.0 * 16 * T * m->D8 * 3;
    if (with_mask_input) f += 2.0 * 4 * T * 4 * m->c1 + 2.0 * T * 4 * m->c1 * m->c2 + 2.0 * T * m->c2 * D;
    return f;
}
