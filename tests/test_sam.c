/* test_sam.c - SAM forward pass against the official PyTorch golden vectors
   (tests/data/golden/sam/{tiny_a,tiny_b}), plus concurrency and refresh. */
#define MEDSAMIX_IMPLEMENTATION
/* the tiny golden models are "small" (1 thread always); 0 keeps the
   multi-threaded paths (parallel attention items, oneDNN on n threads) tested */
#define MSX_SAM_SMALL_FLOPS 0
#include "../medsamix.h"
#include "test.h"

static const msx_tensor *need(const msx_checkpoint *c, const char *key, int k) {
    char name[128];
    snprintf(name, sizeof name, "case%d.%s", k, key);
    return msx_ckpt_find(c, name);
}

/* Max |c - ref| and the number of elements outside 1e-4 + 1e-4·|ref|. */
static int cmp(const char *what, const float *c, const float *ref, size_t n, double *maxerr) {
    size_t i;
    int bad = 0;
    double mx = 0;
    for (i = 0; i < n; i++) {
        double e = fabs((double)c[i] - (double)ref[i]);
        if (!(e <= 1e-4 + 1e-4 * fabs((double)ref[i]))) bad++;
        if (!(e <= mx)) mx = e;
    }
    if (maxerr && mx > *maxerr) *maxerr = mx;
    MSX_CHECK(bad == 0, "%s: %d of %zu elements outside tolerance (max err %.3g)", what, bad, n, mx);
    return bad;
}

/* Binary masks identical except where |ref| < 1e-4. */
static void cmp_sign(const char *what, const float *c, const float *ref, size_t n) {
    size_t i;
    int bad = 0;
    for (i = 0; i < n; i++)
        if (fabs(ref[i]) >= 1e-4 && ((c[i] > 0) != (ref[i] > 0))) bad++;
    MSX_CHECK(bad == 0, "%s: %d mask pixels flip sign", what, bad);
}

/* Fills the prompt of case k from the golden file. */
static void case_prompt(const msx_checkpoint *g, int k, msx_prompt *p) {
    const msx_tensor *t;
    memset(p, 0, sizeof *p);
    if ((t = need(g, "box_input", k))) p->box = (const float *)t->data;
    if ((t = need(g, "point_coords_input", k))) {
        p->points = (const float *)t->data;
        p->n_points = (int)t->shape[1];
        p->labels = (const int *)need(g, "point_labels_input", k)->data;
    }
    if ((t = need(g, "mask_input", k))) p->mask_input = (const float *)t->data;
}

static const char *const KEYS[] = {"low_res_masks_multi", "iou_multi", "low_res_masks_single", "iou_single"};

static void golden(const char *cfg, msx_checkpoint *ck, const msx_sam_arch *arch) {
    char path[256];
    msx_checkpoint *g = NULL;
    msx_sam *m = NULL;
    msx_sam_ws *ws = NULL;
    msx_sam_options opt;
    const msx_tensor *ref;
    int k, i, n;
    double emax[16];
    static float lr[3 * 64 * 64 * 16], iou[3];
    memset(emax, 0, sizeof emax);
    memset(&opt, 0, sizeof opt);
    snprintf(path, sizeof path, "golden/sam/%s/cases.safetensors", cfg);
    MSX_CHECK_OK(msx_safetensors_load(msx_test_path(path), &g));
    if (!g) return;
    MSX_CHECK_OK(msx_sam_create(ck, arch, &opt, &m));
    if (m) MSX_CHECK_OK(msx_sam_ws_create(m, &ws));
    if (ws) MSX_CHECK_OK(msx_sam_ws_enable_taps(ws));
    if (!ws) { msx_sam_free(m); msx_ckpt_free(g); return; }
    ref = msx_ckpt_find(g, "dense_pe");
    {
        const float *t = msx_sam_ws_tap(ws, "dense_pe", &n);
        MSX_CHECK(ref && t && n == ref->numel, "dense_pe size");
        if (ref && t && n == ref->numel) cmp("dense_pe", t, (const float *)ref->data, (size_t)n, &emax[0]);
    }
    for (k = 0; k < 6; k++) {
        char what[128];
        msx_prompt p;
        const msx_tensor *in = need(g, "input", k);
        const char *const taps[] = {"patch_embed", "neck", "sparse", "dense"};
        MSX_CHECK(in != NULL, "%s case%d has no input", cfg, k);
        if (!in) continue;
        MSX_CHECK_OK(msx_sam_encode(m, ws, (const float *)in->data, NULL));
        for (i = 0; i < arch->depth; i++) {
            char key[32];
            const float *t;
            snprintf(key, sizeof key, "block%d", i);
            t = msx_sam_ws_tap(ws, key, &n);
            ref = need(g, key, k);
            snprintf(what, sizeof what, "%s case%d %s", cfg, k, key);
            MSX_CHECK(t && ref && n == ref->numel, "%s: missing or size", what);
            if (t && ref && n == ref->numel) cmp(what, t, (const float *)ref->data, (size_t)n, &emax[1]);
        }
        case_prompt(g, k, &p);
        for (i = 0; i < 2; i++) {
            int multi = i == 0, nout = multi ? 3 : 1, j;
            const msx_tensor *rm = need(g, KEYS[2 * i], k), *ri = need(g, KEYS[2 * i + 1], k);
            /* every case of the golden file holds both outputs: a missing key is a failure, not a skip */
            MSX_CHECK(rm != NULL, "%s case%d: golden key %s missing", cfg, k, KEYS[2 * i]);
            MSX_CHECK(ri != NULL, "%s case%d: golden key %s missing", cfg, k, KEYS[2 * i + 1]);
            MSX_CHECK_OK(msx_sam_decode(m, ws, NULL, &p, multi, lr, iou));
            snprintf(what, sizeof what, "%s case%d %s", cfg, k, KEYS[2 * i]);
            {
                int64_t hw = arch->img_size / arch->patch_size;
                MSX_CHECK(rm && rm->numel == (int64_t)nout * 16 * hw * hw, "%s: reference size", what);
            }
            if (rm) {
                cmp(what, lr, (const float *)rm->data, (size_t)rm->numel, &emax[2 + 2 * i]);
                cmp_sign(what, lr, (const float *)rm->data, (size_t)rm->numel);
            }
            snprintf(what, sizeof what, "%s case%d %s", cfg, k, KEYS[2 * i + 1]);
            if (ri) cmp(what, iou, (const float *)ri->data, (size_t)nout, &emax[3 + 2 * i]);
            for (j = 0; j < 4; j++) {
                const float *t = msx_sam_ws_tap(ws, taps[j], &n);
                ref = need(g, taps[j], k);
                snprintf(what, sizeof what, "%s case%d %s", cfg, k, taps[j]);
                MSX_CHECK(t && ref && n == ref->numel, "%s: missing or size (%d vs %lld)", what, n,
                          ref ? (long long)ref->numel : -1LL);
                if (t && ref && n == ref->numel) cmp(what, t, (const float *)ref->data, (size_t)n, &emax[6 + j]);
            }
        }
        /* image_embeddings through the emb argument, decode from a given embedding */
        {
            const msx_tensor *re = need(g, "image_embeddings", k), *rm = need(g, "low_res_masks_single", k);
            static float emb[64 * 64 * 256];
            MSX_CHECK_OK(msx_sam_encode(m, ws, (const float *)in->data, emb));
            snprintf(what, sizeof what, "%s case%d image_embeddings", cfg, k);
            if (re) cmp(what, emb, (const float *)re->data, (size_t)re->numel, &emax[10]);
            if (re) {
                MSX_CHECK_OK(msx_sam_decode(m, ws, (const float *)re->data, &p, 0, lr, iou));
                snprintf(what, sizeof what, "%s case%d single from ref emb", cfg, k);
                if (rm) cmp(what, lr, (const float *)rm->data, (size_t)rm->numel, NULL);
            }
        }
    }
    printf("%s max |err|: dense_pe %.2e blocks %.2e lr_multi %.2e iou_multi %.2e lr_single %.2e iou_single %.2e "
           "patch_embed %.2e neck %.2e sparse %.2e dense %.2e emb %.2e\n",
           cfg, emax[0], emax[1], emax[2], emax[3], emax[4], emax[5], emax[6], emax[7], emax[8], emax[9], emax[10]);
    msx_sam_ws_free(ws);
    msx_sam_free(m);
    msx_ckpt_free(g);
}

/* Two workspaces on one model in two OpenMP threads == sequential runs;
   refresh after a weight change changes the output, restoring restores it. */
static void concurrency_and_refresh(msx_checkpoint *ck, const msx_sam_arch *arch) {
    msx_checkpoint *g = NULL;
    msx_sam *m = NULL;
    msx_sam_ws *ws[2] = {NULL, NULL};
    msx_sam_options opt;
    static float seq[2][3 * 32 * 32], par[2][3 * 32 * 32], after[3 * 32 * 32], back[3 * 32 * 32];
    float iou_s[2][3], iou_p[2][3], iou_tmp[3];
    msx_prompt p[2];
    const float *in[2];
    int k, ok[2] = {0, 0};
    msx_tensor *w;
    float save;
    memset(&opt, 0, sizeof opt);
    opt.n_threads = 2;
    MSX_CHECK_OK(msx_safetensors_load(msx_test_path("golden/sam/tiny_a/cases.safetensors"), &g));
    if (!g) return;
    MSX_CHECK_OK(msx_sam_create(ck, arch, &opt, &m));
    if (!m) { msx_ckpt_free(g); return; }
    for (k = 0; k < 2; k++) {
        MSX_CHECK_OK(msx_sam_ws_create(m, &ws[k]));
        case_prompt(g, k * 3, &p[k]); /* case0 box, case3 box + points */
        in[k] = (const float *)need(g, "input", k * 3)->data;
    }
    if (!ws[0] || !ws[1]) goto done;
    /* same thread count as the concurrent runs: a GEMM may sum in another order with 2 threads */
    for (k = 0; k < 2; k++) MSX_CHECK_OK(msx_sam_ws_set_threads(ws[k], 1));
    for (k = 0; k < 2; k++) {
        MSX_CHECK_OK(msx_sam_encode(m, ws[k], in[k], NULL));
        MSX_CHECK_OK(msx_sam_decode(m, ws[k], NULL, &p[k], 1, seq[k], iou_s[k]));
    }
    memset(par, 0, sizeof par);
#pragma omp parallel for num_threads(2)
    for (k = 0; k < 2; k++) {
        int r;
        for (r = 0; r < 3; r++)
            ok[k] = msx_sam_encode(m, ws[k], in[k], NULL) == MSX_OK &&
                    msx_sam_decode(m, ws[k], NULL, &p[k], 1, par[k], iou_p[k]) == MSX_OK;
    }
    for (k = 0; k < 2; k++) {
        MSX_CHECK(ok[k], "parallel run %d failed", k);
        MSX_CHECK(!memcmp(seq[k], par[k], sizeof seq[k]) && !memcmp(iou_s[k], iou_p[k], sizeof iou_s[k]),
                  "workspace %d: concurrent result differs from the sequential one", k);
    }
    /* refresh: perturb one weight of block 1, then restore it */
    w = msx_ckpt_find(ck, "image_encoder.blocks.1.mlp.lin1.weight");
    MSX_CHECK(w != NULL, "lin1 weight");
    if (w) {
        save = ((float *)w->data)[5];
        ((float *)w->data)[5] += 0.5f;
        MSX_CHECK_OK(msx_sam_refresh(m));
        MSX_CHECK_OK(msx_sam_encode(m, ws[0], in[0], NULL));
        MSX_CHECK_OK(msx_sam_decode(m, ws[0], NULL, &p[0], 1, after, iou_tmp));
        ((float *)w->data)[5] = save;
        MSX_CHECK_OK(msx_sam_refresh(m));
        MSX_CHECK_OK(msx_sam_encode(m, ws[0], in[0], NULL));
        MSX_CHECK_OK(msx_sam_decode(m, ws[0], NULL, &p[0], 1, back, iou_tmp));
        MSX_CHECK(memcmp(after, par[0], sizeof after) != 0, "changing a weight did not change the masks");
        MSX_CHECK(!memcmp(back, seq[0], sizeof back), "restoring the weight did not restore the masks bit-exactly");
    }
    /* the neck 3×3 weights are repacked: a change there must show too */
    w = msx_ckpt_find(ck, "image_encoder.neck.2.weight");
    if (w) {
        const float *e;
        float e0;
        int n;
        save = ((float *)w->data)[4]; /* centre tap of out 0 / in 0 (corner taps of pixel 0 read padding) */
        ((float *)w->data)[4] += 1.0f;
        MSX_CHECK_OK(msx_sam_refresh(m));
        MSX_CHECK_OK(msx_sam_encode(m, ws[0], in[0], NULL));
        e = msx_sam_ws_tap(ws[0], "neck", &n);
        e0 = e[0];
        ((float *)w->data)[4] = save;
        MSX_CHECK_OK(msx_sam_refresh(m));
        MSX_CHECK_OK(msx_sam_encode(m, ws[0], in[0], NULL));
        MSX_CHECK(e0 != e[0], "neck.2 weight change not picked up by msx_sam_refresh");
    }
    /* bad prompts */
    {
        float nanbox[4] = {1, 2, NAN, 4};
        msx_prompt b;
        int lab = 7;
        memset(&b, 0, sizeof b);
        b.box = nanbox;
        MSX_CHECK(msx_sam_decode(m, ws[0], NULL, &b, 1, after, iou_tmp) == MSX_E_ARG, "NaN box accepted");
        memset(&b, 0, sizeof b);
        b.n_points = 1;
        b.points = nanbox;
        b.labels = &lab;
        MSX_CHECK(msx_sam_decode(m, ws[0], NULL, &b, 1, after, iou_tmp) == MSX_E_ARG, "label 7 accepted");
        b.n_points = 65;
        MSX_CHECK(msx_sam_decode(m, ws[0], NULL, &b, 1, after, iou_tmp) == MSX_E_ARG, "65 points accepted");
    }
done:
    msx_sam_ws_free(ws[0]);
    msx_sam_ws_free(ws[1]);
    msx_sam_free(m);
    msx_ckpt_free(g);
}

static void errors(msx_checkpoint *ck, const msx_sam_arch *arch) {
    msx_sam *m = NULL;
    msx_sam_options opt;
    msx_sam_arch a = *arch;
    memset(&opt, 0, sizeof opt);
    opt.precision = MSX_PREC_BF16;
    {
        msx_result r = msx_sam_create(ck, arch, &opt, &m);
        printf("bf16: %s: %s\n", msx_result_str(r), msx_last_error());
        MSX_CHECK(r == MSX_OK || r == MSX_E_UNSUPPORTED, "bf16 create: %s", msx_last_error());
        msx_sam_free(m);
        m = NULL;
    }
    opt.precision = MSX_PREC_FP32;
    a.embed_dim = 48;
    a.num_heads = 4;
    MSX_CHECK(msx_sam_create(ck, &a, &opt, &m) == MSX_E_SHAPE, "wrong embed_dim accepted: %s", msx_last_error());
    MSX_CHECK(strstr(msx_last_error(), "patch_embed") != NULL, "message names the tensor: %s", msx_last_error());
    msx_sam_free(m);
}

/* Window size 4 on tiny_a (tables of 5 rows, 7 needed): the get_rel_pos
   linear resize runs; the result must be finite and differ from window 3.
   Row 0 of the resized table equals row 0 of the source (align_corners=False
   clamps the first source coordinate to 0). */
static void relpos_resize(msx_checkpoint *ck, const msx_sam_arch *arch) {
    msx_sam_arch a = *arch;
    msx_sam *m = NULL;
    msx_sam_ws *ws = NULL;
    msx_checkpoint *g = NULL;
    static float e4[64 * 32];
    int i, fin = 1;
    a.window_size = 4;
    MSX_CHECK_OK(msx_safetensors_load(msx_test_path("golden/sam/tiny_a/cases.safetensors"), &g));
    MSX_CHECK_OK(msx_sam_create(ck, &a, NULL, &m));
    if (m) MSX_CHECK_OK(msx_sam_ws_create(m, &ws));
    if (ws && g) {
        const msx_tensor *ref = msx_ckpt_find(g, "case0.image_embeddings");
        MSX_CHECK_OK(msx_sam_encode(m, ws, (const float *)msx_ckpt_find(g, "case0.input")->data, e4));
        for (i = 0; i < 64 * 32; i++) fin &= isfinite(e4[i]) != 0;
        MSX_CHECK(fin, "window-4 embedding has NaN/inf");
        MSX_CHECK(ref && memcmp(e4, ref->data, sizeof e4) != 0, "window 4 gave the window-3 result");
        MSX_CHECK(m->blk[0].rph_i != NULL &&
                      m->blk[0].rph_i[3] == ((const float *)msx_ckpt_find(ck, "image_encoder.blocks.0.attn.rel_pos_h")->data)[3],
                  "resized rel-pos table row 0 differs from the source row 0");
    }
    msx_sam_ws_free(ws);
    msx_sam_free(m);
    msx_ckpt_free(g);
}

int main(void) {
    static const char *const cfgs[2] = {"tiny_a", "tiny_b"};
    int c;
    for (c = 0; c < 2; c++) {
        char path[256], cfgp[256];
        msx_checkpoint *ck = NULL;
        msx_sam_arch arch;
        snprintf(path, sizeof path, "golden/sam/%s/model.pth", cfgs[c]);
        snprintf(cfgp, sizeof cfgp, "golden/sam/%s/config.json", cfgs[c]);
        MSX_CHECK_OK(msx_sam_load(msx_test_path(path), msx_test_path(cfgp), &ck, &arch));
        if (!ck) continue;
        golden(cfgs[c], ck, &arch);
        if (c == 0) {
            msx_sam *m = NULL;
            msx_sam_options opt;
            memset(&opt, 0, sizeof opt);
            /* arch == NULL: inferred from the shapes (decoder heads come from the default 8 = tiny_a's) */
            MSX_CHECK_OK(msx_sam_create(ck, NULL, &opt, &m));
            msx_sam_free(m);
            concurrency_and_refresh(ck, &arch);
            relpos_resize(ck, &arch);
            errors(ck, &arch);
        }
        msx_ckpt_free(ck);
    }
    return msx_test_summary("test_sam");
}
