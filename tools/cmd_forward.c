/* medsamix forward / bench: the SAM forward pass on golden-format cases, and
   the ViT-B timing against the oneDNN GEMM peak measured in the same run. */
#include "../medsamix.h"
#include "cli.h"
#include <dnnl.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

/* ---- forward ------------------------------------------------------------------ */

static void forward_usage(FILE *f) {
    fprintf(f, "usage: medsamix forward --model M.pth [--config C.json] --cases IN.safetensors --out OUT.safetensors\n"
               "                        [--precision fp32|bf16] [--threads N]\n"
               "For every caseK in IN with caseK.input (1x3xSxS, preprocessed) and optionally caseK.box_input (1x4),\n"
               "caseK.point_coords_input (1xNx2) + caseK.point_labels_input (1xN, I32), caseK.mask_input (1x1x4hx4w),\n"
               "writes caseK.image_embeddings, .sparse, .dense, .low_res_masks_multi, .iou_multi,\n"
               ".low_res_masks_single and .iou_single (layouts of tests/data/golden/sam/README.md).\n");
}

static int shape_is(const msx_tensor *t, msx_dtype dt, int nd, int64_t a, int64_t b, int64_t c, int64_t d) {
    int64_t e[4];
    int i;
    e[0] = a; e[1] = b; e[2] = c; e[3] = d;
    if (t->dtype != dt || t->ndim != nd) return 0;
    for (i = 0; i < nd; i++)
        if (e[i] >= 0 && t->shape[i] != e[i]) return 0;
    return 1;
}

static const char *shape_str(const msx_tensor *t) {
    static char buf[128];
    int i, p = 0;
    p += snprintf(buf + p, sizeof buf - (size_t)p, "%s [", msx_dtype_name(t->dtype));
    for (i = 0; i < t->ndim; i++) p += snprintf(buf + p, sizeof buf - (size_t)p, i ? ", %lld" : "%lld", (long long)t->shape[i]);
    snprintf(buf + p, sizeof buf - (size_t)p, "]");
    return buf;
}

static msx_result add4(msx_checkpoint *o, const char *cs, const char *key, int nd, int64_t a, int64_t b, int64_t c,
                       int64_t d, const float *data) {
    char name[160];
    int64_t s[4];
    s[0] = a; s[1] = b; s[2] = c; s[3] = d;
    snprintf(name, sizeof name, "%s.%s", cs, key);
    return msx_ckpt_add(o, name, MSX_F32, nd, s, data, NULL);
}

static int run_case(const msx_sam *m, msx_sam_ws *ws, const msx_checkpoint *in, const char *cs, msx_checkpoint *o,
                    const char *cases_path) {
    const msx_sam_arch *a = msx_sam_get_arch(m);
    int h = a->img_size / a->patch_size, D = a->out_chans, S = a->img_size, n, i;
    char name[160];
    const msx_tensor *t, *tb, *tp, *tl, *tm;
    msx_prompt p;
    float *emb = NULL, *lr = NULL, iou[3];
    const float *tap;
    int rc = 1;
    memset(&p, 0, sizeof p);
#define LOOK(var, key) (snprintf(name, sizeof name, "%s.%s", cs, key), var = msx_ckpt_find(in, name))
    LOOK(t, "input");
    if (!shape_is(t, MSX_F32, 4, 1, a->in_chans, S, S)) {
        fprintf(stderr, "forward: %s: %s.input is %s, expected F32 [1, %d, %d, %d]\n", cases_path, cs, shape_str(t), a->in_chans, S, S);
        return 1;
    }
    for (i = 0; i < (int)t->numel; i++)
        if (!isfinite(((const float *)t->data)[i])) {
            fprintf(stderr, "forward: %s: %s.input has a NaN or infinite value at element %d\n", cases_path, cs, i);
            return 1;
        }
    if (LOOK(tb, "box_input")) {
        if (!shape_is(tb, MSX_F32, 2, 1, 4, 0, 0)) {
            fprintf(stderr, "forward: %s: %s.box_input is %s, expected F32 [1, 4]\n", cases_path, cs, shape_str(tb));
            return 1;
        }
        p.box = (const float *)tb->data;
    }
    LOOK(tp, "point_coords_input");
    LOOK(tl, "point_labels_input");
    if (tp || tl) {
        if (!tp || !tl) {
            fprintf(stderr, "forward: %s: %s has only one of point_coords_input / point_labels_input\n", cases_path, cs);
            return 1;
        }
        if (!shape_is(tp, MSX_F32, 3, 1, -1, 2, 0) || !shape_is(tl, MSX_I32, 2, 1, tp->shape[1], 0, 0)) {
            fprintf(stderr, "forward: %s: %s points are %s", cases_path, cs, shape_str(tp));
            fprintf(stderr, " and labels %s; expected F32 [1, N, 2] and I32 [1, N]\n", shape_str(tl));
            return 1;
        }
        p.n_points = (int)tp->shape[1];
        p.points = (const float *)tp->data;
        p.labels = (const int *)tl->data;
    }
    if (LOOK(tm, "mask_input")) {
        if (!shape_is(tm, MSX_F32, 4, 1, 1, 4 * h, 4 * h)) {
            fprintf(stderr, "forward: %s: %s.mask_input is %s, expected F32 [1, 1, %d, %d]\n", cases_path, cs, shape_str(tm), 4 * h, 4 * h);
            return 1;
        }
        p.mask_input = (const float *)tm->data;
    }
#undef LOOK
    emb = (float *)malloc((size_t)D * h * h * sizeof(float));
    lr = (float *)malloc((size_t)3 * 16 * h * h * sizeof(float));
    if (!emb || !lr) { fprintf(stderr, "forward: out of memory\n"); goto done; }
    if (msx_sam_encode(m, ws, (const float *)t->data, emb) != MSX_OK) goto fail;
    if (add4(o, cs, "image_embeddings", 4, 1, D, h, h, emb) != MSX_OK) goto fail;
    if (msx_sam_decode(m, ws, NULL, &p, 1, lr, iou) != MSX_OK) goto fail;
    tap = msx_sam_ws_tap(ws, "sparse", &n);
    if (add4(o, cs, "sparse", 3, 1, n / D, D, 0, tap) != MSX_OK) goto fail;
    tap = msx_sam_ws_tap(ws, "dense", &n);
    if (add4(o, cs, "dense", 4, 1, D, h, h, tap) != MSX_OK) goto fail;
    if (add4(o, cs, "low_res_masks_multi", 4, 1, 3, 4 * h, 4 * h, lr) != MSX_OK) goto fail;
    if (add4(o, cs, "iou_multi", 2, 1, 3, 0, 0, iou) != MSX_OK) goto fail;
    if (msx_sam_decode(m, ws, NULL, &p, 0, lr, iou) != MSX_OK) goto fail;
    if (add4(o, cs, "low_res_masks_single", 4, 1, 1, 4 * h, 4 * h, lr) != MSX_OK) goto fail;
    if (add4(o, cs, "iou_single", 2, 1, 1, 0, 0, iou) != MSX_OK) goto fail;
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "forward: %s: %s\n", cs, msx_last_error());
done:
    free(emb);
    free(lr);
    return rc;
}

int msx_cmd_forward(int argc, char **argv) {
    const char *model = NULL, *config = NULL, *cases = NULL, *out = NULL, *prec = "fp32";
    int i, threads = 0, rc = 1, ncase = 0;
    msx_checkpoint *ck = NULL, *in = NULL, *o = NULL;
    msx_sam_arch arch;
    msx_sam_options opt;
    msx_sam *m = NULL;
    msx_sam_ws *ws = NULL;
    for (i = 1; i < argc; i += 2) { /* every option but --help takes a value */
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) { forward_usage(stdout); return 0; }
        if (!v) { fprintf(stderr, "forward: %s needs a value (or unknown option)\n\n", argv[i]); forward_usage(stderr); return 2; }
        if (!strcmp(argv[i], "--model")) model = v;
        else if (!strcmp(argv[i], "--config")) config = v;
        else if (!strcmp(argv[i], "--cases")) cases = v;
        else if (!strcmp(argv[i], "--out")) out = v;
        else if (!strcmp(argv[i], "--precision")) prec = v;
        else if (!strcmp(argv[i], "--threads")) { if (!msx_cli_int("forward", argv[i], v, 0, 1024, &threads)) return 2; }
        else { fprintf(stderr, "forward: unknown option '%s'\n\n", argv[i]); forward_usage(stderr); return 2; }
    }
    if (!model || !cases || !out) { fprintf(stderr, "forward: --model, --cases and --out are required\n\n"); forward_usage(stderr); return 2; }
    if (!msx_cli_has_ext(out, ".safetensors")) { fprintf(stderr, "forward: --out %s: the name must end in .safetensors\n", out); return 2; }
    {
        const char *in[3], *outs[1];
        in[0] = model;
        in[1] = cases;
        in[2] = config;
        outs[0] = out;
        if (!msx_cli_check_outputs("forward", in, 3, outs, 1)) return 2;
    }
    memset(&opt, 0, sizeof opt);
    if (!strcmp(prec, "fp32")) opt.precision = MSX_PREC_FP32;
    else if (!strcmp(prec, "bf16")) opt.precision = MSX_PREC_BF16;
    else { fprintf(stderr, "forward: --precision must be fp32 or bf16, not '%s'\n", prec); return 2; }
    if (threads < 0) { fprintf(stderr, "forward: --threads must be >= 0\n"); return 2; }
    opt.n_threads = threads;
    if (msx_sam_load(model, config, &ck, &arch) != MSX_OK) { fprintf(stderr, "forward: %s\n", msx_last_error()); goto end; }
    if (msx_sam_create(ck, &arch, &opt, &m) != MSX_OK || msx_sam_ws_create(m, &ws) != MSX_OK) {
        fprintf(stderr, "forward: %s\n", msx_last_error());
        goto end;
    }
    if (msx_safetensors_load(cases, &in) != MSX_OK) { fprintf(stderr, "forward: %s\n", msx_last_error()); goto end; }
    o = msx_ckpt_new();
    if (!o) { fprintf(stderr, "forward: out of memory\n"); goto end; }
    for (i = 0; i < in->n; i++) {
        const char *nm = in->tensors[i].name;
        size_t L = strlen(nm);
        char cs[128];
        if (strncmp(nm, "case", 4) || L < 6 || strcmp(nm + L - 6, ".input") || L - 6 >= sizeof cs) continue;
        memcpy(cs, nm, L - 6);
        cs[L - 6] = 0;
        if (run_case(m, ws, in, cs, o, cases)) goto end;
        ncase++;
    }
    if (!ncase) { fprintf(stderr, "forward: %s has no caseK.input tensor\n", cases); goto end; }
    {
        const char *meta[4] = {"generator", "medsamix forward", "precision", prec};
        if (msx_safetensors_save(out, o, meta, 2) != MSX_OK) { fprintf(stderr, "forward: %s\n", msx_last_error()); goto end; }
    }
    printf("forward: %d case(s) -> %s\n", ncase, out);
    rc = 0;
end:
    msx_sam_ws_free(ws);
    msx_sam_free(m);
    msx_ckpt_free(ck);
    msx_ckpt_free(in);
    msx_ckpt_free(o);
    return rc;
}

/* ---- bench -------------------------------------------------------------------- */

static void bench_usage(FILE *f) {
    fprintf(f, "usage: medsamix bench [--threads N] [--runs R]\n"
               "Full-size ViT-B SAM (1024 px, embed 768, depth 12, random weights): median image-encoder and\n"
               "prompt+decoder (one box) times over R runs (default 5) after a warm-up, for 1 and 2 threads\n"
               "(or only N), against the oneDNN fp32 GEMM peak of the encoder's matmul shapes measured in the\n"
               "same run. bf16 is reported as unsupported where oneDNN has no bf16 matmul.\n");
}

static double cpu_now(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return (double)u.ru_utime.tv_sec + 1e-6 * (double)u.ru_utime.tv_usec + (double)u.ru_stime.tv_sec +
           1e-6 * (double)u.ru_stime.tv_usec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Median GFLOP/s of one oneDNN f32 matmul C = A·Bᵀ (+bias), plain layouts. */
static double gemm_gflops(int M, int K, int N, int nthr, int runs, double *cpu_gflops) {
    dnnl_engine_t eng = NULL;
    dnnl_stream_t st = NULL;
    dnnl_memory_desc_t a, b, c, bi;
    dnnl_dims_t ad, bd, cd, bid, as, bs;
    dnnl_matmul_desc_t md;
    dnnl_primitive_desc_t pd = NULL;
    dnnl_primitive_t p = NULL;
    dnnl_memory_t ma = NULL, mb = NULL, mc = NULL, mbi = NULL;
    dnnl_exec_arg_t args[4];
    float *A, *B, *C, *BI;
    double t[32], tcpu[32], g = 0;
    int r, saved = omp_get_max_threads();
    size_t i;
    if (runs > 32) runs = 32;
    A = (float *)malloc((size_t)M * K * sizeof(float));
    B = (float *)malloc((size_t)K * N * sizeof(float));
    C = (float *)malloc((size_t)M * N * sizeof(float));
    BI = (float *)malloc((size_t)N * sizeof(float));
    if (!A || !B || !C || !BI) goto out;
    for (i = 0; i < (size_t)M * K; i++) A[i] = (float)(i % 7) * 0.1f;
    for (i = 0; i < (size_t)K * N; i++) B[i] = (float)(i % 5) * 0.1f;
    for (i = 0; i < (size_t)N; i++) BI[i] = 0.5f;
    omp_set_num_threads(nthr);
    ad[0] = M; ad[1] = K; as[0] = K; as[1] = 1;
    bd[0] = K; bd[1] = N; bs[0] = 1; bs[1] = K;
    cd[0] = M; cd[1] = N; bid[0] = 1; bid[1] = N;
    if (dnnl_engine_create(&eng, dnnl_cpu, 0) != dnnl_success) goto out;
    if (dnnl_stream_create(&st, eng, dnnl_stream_default_flags) != dnnl_success) goto out;
    dnnl_memory_desc_init_by_strides(&a, 2, ad, dnnl_f32, as);
    dnnl_memory_desc_init_by_strides(&b, 2, bd, dnnl_f32, bs);
    dnnl_memory_desc_init_by_tag(&c, 2, cd, dnnl_f32, dnnl_ab);
    dnnl_memory_desc_init_by_tag(&bi, 2, bid, dnnl_f32, dnnl_ab);
    if (dnnl_matmul_desc_init(&md, &a, &b, &bi, &c) != dnnl_success) goto out;
    if (dnnl_primitive_desc_create(&pd, &md, NULL, eng, NULL) != dnnl_success) goto out;
    if (dnnl_primitive_create(&p, pd) != dnnl_success) goto out;
    dnnl_memory_create(&ma, &a, eng, A);
    dnnl_memory_create(&mb, &b, eng, B);
    dnnl_memory_create(&mc, &c, eng, C);
    dnnl_memory_create(&mbi, &bi, eng, BI);
    args[0].arg = DNNL_ARG_SRC; args[0].memory = ma;
    args[1].arg = DNNL_ARG_WEIGHTS; args[1].memory = mb;
    args[2].arg = DNNL_ARG_DST; args[2].memory = mc;
    args[3].arg = DNNL_ARG_BIAS; args[3].memory = mbi;
    dnnl_primitive_execute(p, st, 4, args);
    dnnl_stream_wait(st);
    for (r = 0; r < runs; r++) {
        double t0 = msx_time_now(), c0 = cpu_now();
        dnnl_primitive_execute(p, st, 4, args);
        dnnl_stream_wait(st);
        t[r] = msx_time_now() - t0;
        tcpu[r] = cpu_now() - c0;
    }
    g = 2.0 * M * K * N / median(t, runs) * 1e-9;
    if (cpu_gflops) *cpu_gflops = 2.0 * M * K * N / median(tcpu, runs) * 1e-9;
out:
    omp_set_num_threads(saved);
    if (ma) dnnl_memory_destroy(ma);
    if (mb) dnnl_memory_destroy(mb);
    if (mc) dnnl_memory_destroy(mc);
    if (mbi) dnnl_memory_destroy(mbi);
    if (p) dnnl_primitive_destroy(p);
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (st) dnnl_stream_destroy(st);
    if (eng) dnnl_engine_destroy(eng);
    free(A);
    free(B);
    free(C);
    free(BI);
    return g;
}

static long rss_peak_mb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    if (!f) return -1;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6)) kb = strtol(line + 6, NULL, 10);
    fclose(f);
    return kb < 0 ? -1 : kb / 1024;
}

/* A ViT-B SAM with random weights (LayerNorm weights 1, biases small). */
static msx_result random_vitb(msx_checkpoint **out, msx_sam_arch *arch) {
    msx_checkpoint *ck = msx_ckpt_new();
    msx_rng rng;
    int i, n;
    msx_sam_arch_default(arch);
    if (!ck) return MSX_E_NOMEM;
    msx_rng_seed(&rng, 12345);
    n = msx_sam_key_count(arch);
    for (i = 0; i < n; i++) {
        char name[256];
        int nd, d;
        int64_t shape[MSX_MAX_DIMS];
        msx_tensor *t;
        float *x, sd;
        int64_t j, fan = 1;
        msx_result r = msx_sam_key_at(arch, i, name, sizeof name, &nd, shape);
        if (r == MSX_OK) r = msx_ckpt_add(ck, name, MSX_F32, nd, shape, NULL, &t);
        if (r != MSX_OK) { msx_ckpt_free(ck); return r; }
        x = (float *)t->data;
        for (d = 1; d < nd; d++) fan *= shape[d];
        sd = nd >= 2 ? (float)(1.0 / sqrt((double)fan)) : 0.02f;
        if (strstr(name, "norm") && strstr(name, ".weight") && nd == 1) sd = 0;
        if (strstr(name, "rel_pos")) sd = 0.1f;
        if (strstr(name, "pos_embed") || strstr(name, "embed.weight") || strstr(name, "token")) sd = 0.5f;
        for (j = 0; j < t->numel; j++) {
            float u = (float)msx_rng_uniform(&rng) - 0.5f;
            x[j] = sd == 0 && nd == 1 && strstr(name, ".weight") ? 1.0f : u * 3.4641016f * sd;
        }
    }
    *out = ck;
    return MSX_OK;
}

int msx_cmd_bench(int argc, char **argv) {
    int i, only = 0, runs = 5, th, ti, r, nth[2];
    msx_checkpoint *ck = NULL;
    msx_sam_arch arch;
    msx_sam_options opt;
    msx_sam *m = NULL;
    msx_sam_ws *ws = NULL;
    float *img = NULL, *lr = NULL, iou[3], box[4] = {300.5f, 280.25f, 700.f, 650.75f};
    msx_prompt p;
    double ef, df, t0;
    int rc = 1, max_thr = omp_get_max_threads();
    for (i = 1; i < argc; i += 2) { /* every option but --help takes a value */
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) { bench_usage(stdout); return 0; }
        if (!v) { fprintf(stderr, "bench: %s needs a value (or unknown option)\n", argv[i]); bench_usage(stderr); return 2; }
        if (!strcmp(argv[i], "--threads")) { if (!msx_cli_int("bench", argv[i], v, 1, 1024, &only)) return 2; }
        else if (!strcmp(argv[i], "--runs")) { if (!msx_cli_int("bench", argv[i], v, 1, 31, &runs)) return 2; }
        else { fprintf(stderr, "bench: unknown option '%s'\n", argv[i]); bench_usage(stderr); return 2; }
    }
    if (runs < 1 || runs > 31 || only < 0) { fprintf(stderr, "bench: --runs must be 1..31, --threads >= 1\n"); return 2; }
    nth[0] = only ? only : 1;
    nth[1] = only ? 0 : (max_thr >= 2 ? 2 : 0);
    if (random_vitb(&ck, &arch) != MSX_OK) { fprintf(stderr, "bench: %s\n", msx_last_error()); return 1; }
    memset(&opt, 0, sizeof opt);
    opt.precision = MSX_PREC_BF16;
    if (msx_sam_create(ck, &arch, &opt, &m) != MSX_OK) printf("bf16: not run: %s\n", msx_last_error());
    else { printf("bf16: available but not benchmarked by this build\n"); msx_sam_free(m); m = NULL; }
    opt.precision = MSX_PREC_FP32;
    opt.n_threads = nth[0] > nth[1] ? nth[0] : nth[1];
    t0 = msx_time_now();
    if (msx_sam_create(ck, &arch, &opt, &m) != MSX_OK || msx_sam_ws_create(m, &ws) != MSX_OK) {
        fprintf(stderr, "bench: %s\n", msx_last_error());
        goto end;
    }
    printf("model + workspace created in %.2f s; peak RSS %ld MB (checkpoint %.0f MB + workspace)\n", msx_time_now() - t0,
           rss_peak_mb(), 4.0 * 93.7e6 / 1048576.0);
    img = (float *)malloc((size_t)3 * 1024 * 1024 * sizeof(float));
    lr = (float *)malloc((size_t)3 * 256 * 256 * sizeof(float));
    if (!img || !lr) { fprintf(stderr, "bench: out of memory\n"); goto end; }
    {
        msx_rng g;
        msx_rng_seed(&g, 7);
        for (i = 0; i < 3 * 1024 * 1024; i++) img[i] = (float)msx_rng_uniform(&g) * 4.0f - 2.0f;
    }
    memset(&p, 0, sizeof p);
    p.box = box;
    ef = msx_sam_encode_flops(m);
    df = msx_sam_decode_flops(m, 2, 0);
    printf("ViT-B 1024: encoder %.1f GFLOP, prompt+decoder %.2f GFLOP (as implemented)\n", ef * 1e-9, df * 1e-9);
    for (ti = 0; ti < 2; ti++) {
        double te[32], td[32], tc[32], pk[32], ratio[32], cratio[32], enc, dec, peak, g;
        static const int shp[3][3] = {{4096, 768, 2304}, {4096, 768, 3072}, {4096, 3072, 768}};
        th = nth[ti];
        if (!th) continue;
        if (msx_sam_ws_set_threads(ws, th) != MSX_OK) { fprintf(stderr, "bench: %s\n", msx_last_error()); goto end; }
        printf("-- %d thread(s)\n", th);
        for (i = 0; i < 3; i++) {
            g = gemm_gflops(shp[i][0], shp[i][1], shp[i][2], th, 5, NULL);
            printf("   oneDNN f32 GEMM %dx%dx%d: %.1f GFLOP/s\n", shp[i][0], shp[i][1], shp[i][2], g);
            fflush(stdout);
        }
        if (msx_sam_encode(m, ws, img, NULL) != MSX_OK) { fprintf(stderr, "bench: %s\n", msx_last_error()); goto end; }
        /* the machine may be shared: the peak is re-measured next to every encode
           (fc1 shape, the encoder's largest GEMM), and the ratio taken per run */
        for (r = 0; r < runs; r++) {
            double cg, c0;
            g = gemm_gflops(4096, 768, 3072, th, 3, &cg);
            t0 = msx_time_now();
            c0 = cpu_now();
            if (msx_sam_encode(m, ws, img, NULL) != MSX_OK) { fprintf(stderr, "bench: %s\n", msx_last_error()); goto end; }
            te[r] = msx_time_now() - t0;
            tc[r] = cpu_now() - c0;
            pk[r] = g;
            ratio[r] = ef / te[r] * 1e-9 / g;
            cratio[r] = ef / tc[r] * 1e-9 / cg;
        }
        if (msx_sam_decode(m, ws, NULL, &p, 0, lr, iou) != MSX_OK) { fprintf(stderr, "bench: %s\n", msx_last_error()); goto end; }
        for (r = 0; r < runs; r++) {
            t0 = msx_time_now();
            if (msx_sam_decode(m, ws, NULL, &p, 0, lr, iou) != MSX_OK) { fprintf(stderr, "bench: %s\n", msx_last_error()); goto end; }
            td[r] = msx_time_now() - t0;
        }
        enc = median(te, runs);
        dec = median(td, runs);
        peak = median(pk, runs);
        printf("   encoder fp32: median %.3f s (min %.3f) over %d runs = %.1f GFLOP/s; GEMM peak next to each run: median %.1f GFLOP/s\n",
               enc, te[0], runs, ef / enc * 1e-9, peak);
        printf("   encoder / GEMM peak: median %.0f %% (wall clock), %.0f %% (CPU time of this process)\n",
               100.0 * median(ratio, runs), 100.0 * median(cratio, runs));
        printf("   prompt+decoder (1 box): median %.1f ms = %.2f %% of the encoder\n", dec * 1e3, 100.0 * dec / enc);
        fflush(stdout);
    }
    printf("peak RSS %ld MB\n", rss_peak_mb());
    rc = 0;
end:
    free(img);
    free(lr);
    msx_sam_ws_free(ws);
    msx_sam_free(m);
    msx_ckpt_free(ck);
    return rc;
}
