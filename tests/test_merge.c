/* tests/test_merge.c - merge methods against the official golden vectors,
   TIES selection against a brute-force sort, key -> group mapping, plans
   and their JSON, the merger end to end, export/re-load, bad input. */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "test.h"
#include "ref_ties.h"

/* ---- helpers ------------------------------------------------------------- */

static const float *tens(const msx_checkpoint *c, const char *prefix, const char *t) {
    char name[256];
    msx_tensor *x;
    snprintf(name, sizeof name, "%s.%s", prefix, t);
    x = msx_ckpt_find(c, name);
    return x ? (const float *)x->data : NULL;
}

static int close_slerp(const float *a, const float *b, int64_t n, double *worst) {
    int64_t i;
    int ok = 1;
    for (i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (d > *worst) *worst = d;
        if (!(d <= 1e-6 + 1e-6 * fabs((double)b[i]))) ok = 0;
    }
    return ok;
}

/* ---- golden vectors (tests/data/golden/merge) ------------------------------ */

static void test_golden(void) {
    void *buf;
    size_t len;
    msx__json *root;
    const msx__json *cases;
    int c, n_done = 0, n_skipped = 0;
    double worst_slerp = 0;
    MSX_CHECK_OK(msx_read_file(msx_test_path("golden/merge/cases.json"), 0, &buf, &len));
    root = msx__json_parse((const char *)buf, len, "cases.json");
    MSX_CHECK(root != NULL, "cases.json: %s", msx_last_error());
    if (!root) { msx_free(buf); return; }
    cases = msx__json_get(root, "cases");
    for (c = 0; cases && c < cases->n; c++) {
        const msx__json *cs = &cases->kids[c], *params = msx__json_get(cs, "params"), *tn = msx__json_get(cs, "tensors");
        const char *file = msx__json_str(cs, "file"), *method = msx__json_str(cs, "method"),
                   *status = msx__json_str(cs, "status");
        int n_src = (int)msx__json_get(cs, "n_src")->num, ok_case = !strcmp(status, "ok"), ti;
        msx_checkpoint *ck = NULL;
        char rel[256];
        if (!strcmp(method, "passthrough")) { n_skipped++; continue; } /* not a searchable method (docs/semantics.md §2.5) */
        /* the reference's SLERP asserts exactly two tensors; msx_merge_tensor_slerp takes two by signature and the
           merger always selects a pair (test_slerp_selection), so this call cannot be expressed: not run */
        if (!strcmp(method, "slerp") && n_src != 2) { n_skipped++; continue; }
        snprintf(rel, sizeof rel, "golden/merge/%s", file);
        MSX_CHECK_OK(msx_safetensors_load(msx_test_path(rel), &ck));
        if (!ck) continue;
        for (ti = 0; ti < tn->n; ti++) {
            const char *t = tn->kids[ti].str;
            const float *base = tens(ck, "base", t), *src[8], *want;
            msx_tensor *bt = msx_ckpt_find(ck, "base.bias7");
            int64_t n;
            float *out;
            int i;
            msx_result r = MSX_OK;
            char bn[128];
            snprintf(bn, sizeof bn, "base.%s", t);
            bt = msx_ckpt_find(ck, bn);
            n = bt->numel;
            for (i = 0; i < n_src; i++) {
                char p[16];
                snprintf(p, sizeof p, "src%d", i);
                src[i] = tens(ck, p, t);
            }
            want = tens(ck, ok_case ? "out" : "pipeline_out", t);
            MSX_CHECK(base && want, "%s: tensors of %s missing", file, t);
            if (!base || !want) continue;
            out = (float *)malloc((size_t)n * sizeof(float));
            if (!strcmp(method, "linear")) {
                const msx__json *w = msx__json_get(params, "weights");
                double wv[8];
                for (i = 0; i < w->n; i++) wv[i] = w->kids[i].num;
                r = msx_merge_tensor_linear(out, src, wv, n_src, n);
            } else if (!strcmp(method, "task_arithmetic")) {
                r = msx_merge_tensor_ta(out, base, src, n_src, msx__json_get(params, "scaling_coefficient")->num, n);
            } else if (!strcmp(method, "ties")) {
                r = msx_merge_tensor_ties(out, base, src, n_src, msx__json_get(params, "param_value_mask_rate")->num,
                                          msx__json_get(params, "scaling_coefficient")->num, n, NULL);
            } else if (!strcmp(method, "slerp")) {
                r = msx_merge_tensor_slerp(out, src[0], src[1], msx__json_get(params, "slerp_t")->num, n);
            }
            /* the pipeline's behaviour: a raising call leaves the base tensor */
            MSX_CHECK((r == MSX_OK) == ok_case, "%s/%s: result %s, status %s", file, t, msx_result_str(r), status);
            if (r != MSX_OK) memcpy(out, base, (size_t)n * sizeof(float));
            if (!strcmp(method, "slerp"))
                MSX_CHECK(close_slerp(out, want, n, &worst_slerp), "%s/%s: slerp beyond 1e-6", file, t);
            else
                MSX_CHECK(memcmp(out, want, (size_t)n * sizeof(float)) == 0, "%s/%s: not bit-exact", file, t);
            free(out);
        }
        n_done++;
        msx_ckpt_free(ck);
    }
    printf("golden merge: %d cases checked, %d skipped (passthrough, three-source slerp), worst slerp |diff| %.3g\n",
           n_done, n_skipped, worst_slerp);
    MSX_CHECK(n_done == 39 && n_skipped == 2, "expected 39 method cases and 2 skipped, ran %d, skipped %d", n_done,
              n_skipped);
    msx__json_free(root);
    msx_free(buf);
}

static void test_slerp_selection(void) {
    void *buf;
    size_t len;
    msx__json *root;
    const msx__json *cases;
    int c;
    MSX_CHECK_OK(msx_read_file(msx_test_path("golden/merge/slerp_selection.json"), 0, &buf, &len));
    root = msx__json_parse((const char *)buf, len, "slerp_selection.json");
    cases = msx__json_get(root, "cases");
    MSX_CHECK(cases && cases->n >= 6, "slerp_selection.json has no cases");
    for (c = 0; cases && c < cases->n; c++) {
        const msx__json *cs = &cases->kids[c], *tv = msx__json_get(cs, "t_values"),
                        *si = msx__json_get(cs, "source_indices");
        double t[8], want = msx__json_get(cs, "slerp_t")->num, got;
        int i, v0, v1;
        for (i = 0; i < tv->n; i++) t[i] = tv->kids[i].num;
        msx_merge_slerp_pair(t, tv->n, &v0, &v1, &got);
        MSX_CHECK(v0 == (int)si->kids[0].num && v1 == (int)si->kids[1].num, "case %d: pair %d,%d", c, v0, v1);
        MSX_CHECK(fabs(got - want) <= 1e-15, "case %d: t %.17g vs %.17g", c, got, want);
    }
    msx__json_free(root);
    msx_free(buf);
}

/* ---- TIES against a brute-force implementation (full sort) ------------------ */

static void test_ties_bruteforce(void) {
    const int64_t N = 150000; /* > MSX__TIES_DIRECT: the bracketed selection */
    /* o2 64-byte aligned like tensor data: the streaming-store path runs */
    float *base = (float *)malloc(N * 4), *f[3], *o1 = (float *)malloc(N * 4), *o2 = (float *)msx__aligned_alloc(N * 4);
    msx_rng rng;
    int kind, i;
    int64_t j;
    const double rates[] = {0.0, 1e-6, 0.2, 0.5, 0.97, 1.0};
    for (i = 0; i < 3; i++) f[i] = (float *)malloc(N * 4);
    msx_rng_seed(&rng, 1234);
    for (kind = 0; kind < 5; kind++) {
        int nft, ri;
        for (j = 0; j < N; j++) {
            base[j] = (float)(0.5 * msx_rng_normal(&rng));
            for (i = 0; i < 3; i++) {
                float d;
                switch (kind) {
                case 0: d = (float)(0.1 * msx_rng_normal(&rng)); break;                         /* Gaussian */
                case 1: d = (float)((int)msx_rng_below(&rng, 7) - 3);                            /* many ties */
                        base[j] = 0; break;
                case 2: d = (float)(1e-3 * (double)j / (double)N * (i + 1)); break;            /* sorted magnitudes */
                case 3: d = msx_rng_uniform(&rng) < 0.6 ? 0.0f : (float)msx_rng_normal(&rng); break; /* unchanged parts */
                default: {
                    /* the sampled chunks (same geometry as msx__ties_thresholds) hold tiny deltas,
                       the rest large: the bracket misses -> fallback */
                    int64_t s64 = N / 64 < 4096 ? 4096 : (N / 64 > MSX__TIES_SAMPLE ? MSX__TIES_SAMPLE : N / 64);
                    int64_t nch = s64 / MSX__TIES_SAMPLE_CHUNK, c;
                    int in = 0;
                    for (c = 0; c < nch && !in; c++) {
                        int64_t pos = (int64_t)((double)c * (double)(N - MSX__TIES_SAMPLE_CHUNK) / (double)(nch - 1));
                        in = j >= pos && j < pos + MSX__TIES_SAMPLE_CHUNK;
                    }
                    d = in ? (float)(1e-6 * msx_rng_uniform(&rng)) : (float)(1.0 + msx_rng_uniform(&rng));
                    break;
                }
                }
                f[i][j] = base[j] + d;
            }
        }
        for (nft = 1; nft <= 3; nft++)
            for (ri = 0; ri < (int)(sizeof rates / sizeof rates[0]); ri++) {
                const float *src[3] = {f[0], f[1], f[2]};
                ref_ties(o1, base, src, nft, rates[ri], 0.7, N);
                MSX_CHECK_OK(msx_merge_tensor_ties(o2, base, src, nft, rates[ri], 0.7, N, NULL));
                MSX_CHECK(memcmp(o1, o2, N * 4) == 0, "ties kind %d nft %d rate %g differs from brute force", kind, nft,
                          rates[ri]);
            }
    }
    /* small tensors (direct path) with random sizes */
    for (kind = 0; kind < 40; kind++) {
        int64_t n = 1 + (int64_t)msx_rng_below(&rng, 3000);
        const float *src[3] = {f[0], f[1], f[2]};
        double r = msx_rng_uniform(&rng);
        ref_ties(o1, base, src, 2, r, 0.5, n);
        MSX_CHECK_OK(msx_merge_tensor_ties(o2, base, src, 2, r, 0.5, n, NULL));
        MSX_CHECK(memcmp(o1, o2, (size_t)n * 4) == 0, "ties n %lld rate %g differs from brute force", (long long)n, r);
    }
    for (i = 0; i < 3; i++) free(f[i]);
    free(base);
    free(o1);
    msx__aligned_free(o2);
}

/* ---- key -> group mapping --------------------------------------------------------- */

/* Key names of a SAM (docs/semantics.md §3): encoder blocks with 14 tensors each,
   the fixed parts with their ViT-B structure. */
static int synth_sam_keys(int depth, char (*keys)[128], int cap) {
    static const char *const blk[14] = {"norm1.weight", "norm1.bias", "attn.rel_pos_h", "attn.rel_pos_w",
                                         "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
                                         "norm2.weight", "norm2.bias", "mlp.lin1.weight", "mlp.lin1.bias",
                                         "mlp.lin2.weight", "mlp.lin2.bias"};
    static const char *const att[4] = {"self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token", NULL};
    static const char *const prj[4] = {"q_proj", "k_proj", "v_proj", "out_proj"};
    int n = 0, b, i, l, a, p;
#define ADD(...) do { if (n < cap) snprintf(keys[n++], 128, __VA_ARGS__); } while (0)
    ADD("image_encoder.pos_embed");
    ADD("image_encoder.patch_embed.proj.weight");
    ADD("image_encoder.patch_embed.proj.bias");
    for (b = 0; b < depth; b++)
        for (i = 0; i < 14; i++) ADD("image_encoder.blocks.%d.%s", b, blk[i]);
    ADD("image_encoder.neck.0.weight"); ADD("image_encoder.neck.1.weight"); ADD("image_encoder.neck.1.bias");
    ADD("image_encoder.neck.2.weight"); ADD("image_encoder.neck.3.weight"); ADD("image_encoder.neck.3.bias");
    ADD("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix");
    for (i = 0; i < 4; i++) ADD("prompt_encoder.point_embeddings.%d.weight", i);
    ADD("prompt_encoder.not_a_point_embed.weight");
    for (i = 0; i < 7; i++)
        if (i != 2 && i != 5) { ADD("prompt_encoder.mask_downscaling.%d.weight", i); ADD("prompt_encoder.mask_downscaling.%d.bias", i); }
    ADD("prompt_encoder.no_mask_embed.weight");
    for (l = 0; l < 2; l++) {
        for (a = 0; att[a]; a++)
            for (p = 0; p < 4; p++) {
                ADD("mask_decoder.transformer.layers.%d.%s.%s.weight", l, att[a], prj[p]);
                ADD("mask_decoder.transformer.layers.%d.%s.%s.bias", l, att[a], prj[p]);
            }
        for (i = 1; i <= 4; i++) { ADD("mask_decoder.transformer.layers.%d.norm%d.weight", l, i); ADD("mask_decoder.transformer.layers.%d.norm%d.bias", l, i); }
        ADD("mask_decoder.transformer.layers.%d.mlp.lin1.weight", l); ADD("mask_decoder.transformer.layers.%d.mlp.lin1.bias", l);
        ADD("mask_decoder.transformer.layers.%d.mlp.lin2.weight", l); ADD("mask_decoder.transformer.layers.%d.mlp.lin2.bias", l);
    }
    for (p = 0; p < 4; p++) {
        ADD("mask_decoder.transformer.final_attn_token_to_image.%s.weight", prj[p]);
        ADD("mask_decoder.transformer.final_attn_token_to_image.%s.bias", prj[p]);
    }
    ADD("mask_decoder.transformer.norm_final_attn.weight"); ADD("mask_decoder.transformer.norm_final_attn.bias");
    ADD("mask_decoder.iou_token.weight"); ADD("mask_decoder.mask_tokens.weight");
    for (i = 0; i < 4; i++)
        if (i != 2) { ADD("mask_decoder.output_upscaling.%d.weight", i); ADD("mask_decoder.output_upscaling.%d.bias", i); }
    for (i = 0; i < 4; i++)
        for (l = 0; l < 3; l++) {
            ADD("mask_decoder.output_hypernetworks_mlps.%d.layers.%d.weight", i, l);
            ADD("mask_decoder.output_hypernetworks_mlps.%d.layers.%d.bias", i, l);
        }
    for (l = 0; l < 3; l++) { ADD("mask_decoder.iou_prediction_head.layers.%d.weight", l); ADD("mask_decoder.iou_prediction_head.layers.%d.bias", l); }
#undef ADD
    return n;
}

static void test_groups(void) {
    static char keys[600][128];
    /* docs/semantics.md §3 (the key lists of merge_utils.py): tensors per fixed group */
    static const int fixed_count[13] = {1, 2, 6, 4, 1, 10, 1, 72, 10, 2, 6, 24, 6};
    const int depths[6] = {12, 24, 32, 4, 2, 6};
    /* ceil(depth / g) layer groups + 13 fixed groups, worked out by hand for g = 1..4 */
    static const int want_groups[6][4] = {{25, 19, 17, 16}, {37, 25, 21, 19}, {45, 29, 24, 21},
                                          {17, 15, 15, 14}, {15, 14, 14, 14}, {19, 16, 15, 15}};
    int di, g, i;
    int n12 = synth_sam_keys(12, keys, 600);
    MSX_CHECK(n12 == 314, "synthesised ViT-B key set has %d keys (ViT-B has 314)", n12);
    for (di = 0; di < 6; di++)
        for (g = 1; g <= 4; g++) {
            int depth = depths[di], n = synth_sam_keys(depth, keys, 600), ng = msx_merge_n_groups(depth, g), k;
            int count[64], not_merged = 0, bad = 0;
            msx_plan *p = NULL;
            memset(count, 0, sizeof count);
            MSX_CHECK(ng == want_groups[di][g - 1], "n_groups depth %d g %d = %d, want %d", depth, g, ng,
                      want_groups[di][g - 1]);
            MSX_CHECK_OK(msx_plan_create(depth, 3, g, &p));
            if (!p) continue;
            MSX_CHECK(p->n_groups == ng, "plan groups %d vs %d", p->n_groups, ng);
            for (i = 0; i < n; i++) {
                char id[MSX_GROUP_ID_LEN];
                int gi, b;
                if (msx_merge_key_group(keys[i], g, id) != MSX_OK) { bad++; continue; }
                if (!id[0]) { not_merged++; continue; }
                gi = msx_plan_find(p, id);
                if (gi < 0) { bad++; continue; }
                count[gi]++;
                if (sscanf(keys[i], "image_encoder.blocks.%d.", &b) == 1 && gi != b / g) bad++;
            }
            MSX_CHECK(bad == 0 && not_merged == 1, "depth %d g %d: %d unmapped, %d never-merged", depth, g, bad, not_merged);
            for (k = 0; k < p->n_layer_groups; k++) {
                int blocks = (k + 1) * g <= depth ? g : depth - k * g; /* remainder chunk: its own group */
                MSX_CHECK(count[k] == 14 * blocks, "depth %d g %d: layer_%d has %d tensors", depth, g, k, count[k]);
            }
            for (k = 0; k < 13; k++)
                MSX_CHECK(count[p->n_layer_groups + k] == fixed_count[k], "depth %d g %d: %s has %d tensors", depth, g,
                          p->ids[p->n_layer_groups + k], count[p->n_layer_groups + k]);
            msx_plan_free(p);
        }
    {
        char id[MSX_GROUP_ID_LEN];
        MSX_CHECK(msx_merge_key_group("image_encoder.blocks.3.foo.weight", 2, id) == MSX_E_KEY_MISMATCH, "unknown block key");
        MSX_CHECK(msx_merge_key_group("model.image_encoder.pos_embed", 2, id) == MSX_E_KEY_MISMATCH, "prefixed key");
        MSX_CHECK(strstr(msx_last_error(), "model.image_encoder.pos_embed") != NULL, "message names the key: %s", msx_last_error());
        MSX_CHECK(msx_merge_key_group("image_encoder.pos_embed", 0, id) == MSX_E_ARG, "granularity 0");
        MSX_CHECK_OK(msx_merge_key_group("image_encoder.blocks.11.attn.qkv.weight", 4, id));
        MSX_CHECK(!strcmp(id, "layer_2"), "block 11 at g 4 -> %s", id);
    }
}

/* ---- plans and JSON ----------------------------------------------------------------- */

static void random_plan(msx_plan *p, msx_rng *rng, int allow_ta) {
    int g, i;
    for (g = 0; g < p->n_groups; g++) {
        msx_group_plan *gp = &p->groups[g];
        memset(gp, 0, sizeof *gp);
        gp->method = (msx_merge_method)msx_rng_below(rng, 4);
        if (gp->method == MSX_MERGE_TASK_ARITHMETIC && !allow_ta) gp->method = MSX_MERGE_TIES;
        for (i = 0; i < p->n_models; i++) {
            gp->weights[i] = msx_rng_uniform(rng);
            gp->t[i] = msx_rng_uniform(rng);
        }
        gp->drop_rate = 0.99 * msx_rng_uniform(rng);
        gp->scale = msx_rng_uniform(rng);
    }
}

static int same_plan(const msx_plan *a, const msx_plan *b) {
    int g, i;
    if (a->n_groups != b->n_groups || a->granularity != b->granularity || a->n_models != b->n_models) return 0;
    for (g = 0; g < a->n_groups; g++) {
        const msx_group_plan *x = &a->groups[g], *y = &b->groups[g];
        if (x->method != y->method || strcmp(a->ids[g], b->ids[g])) return 0;
        switch (x->method) {
        case MSX_MERGE_LINEAR:
            for (i = 0; i < a->n_models; i++) if (x->weights[i] != y->weights[i]) return 0;
            break;
        case MSX_MERGE_SLERP:
            for (i = 0; i < a->n_models; i++) if (x->t[i] != y->t[i]) return 0;
            break;
        case MSX_MERGE_TIES: if (x->drop_rate != y->drop_rate) return 0; /* fall through */
        default: if (x->scale != y->scale) return 0;
        }
    }
    return 1;
}

static msx_result parse_str(const char *s, msx_plan **p) { return msx_plan_parse_json(s, strlen(s), "test.json", p); }

static void test_plan_json(void) {
    msx_plan *p = NULL, *q = NULL;
    msx_rng rng;
    char *js = NULL;
    int k;
    msx_rng_seed(&rng, 7);
    for (k = 0; k < 20; k++) {
        int depth = 1 + (int)msx_rng_below(&rng, 32), g = 1 + (int)msx_rng_below(&rng, 4), nm = 2 + (int)msx_rng_below(&rng, 3);
        MSX_CHECK_OK(msx_plan_create(depth, nm, g, &p));
        random_plan(p, &rng, 1);
        MSX_CHECK_OK(msx_plan_to_json(p, &js));
        MSX_CHECK_OK(msx_plan_parse_json(js, strlen(js), "roundtrip", &q));
        MSX_CHECK(q && same_plan(p, q), "plan JSON round trip (depth %d g %d models %d)", depth, g, nm);
        msx_free(js);
        msx_plan_free(p);
        msx_plan_free(q);
        p = q = NULL;
    }
    /* the example format, with extra keys */
    {
        msx__sb b = {0, 0, 0, 0};
        int g;
        msx__sb_puts(&b, "{\"format\": \"medsamix-plan-v1\", \"granularity\": 2, \"comment\": \"x\", \"groups\": {"
                         "\"layer_0\": {\"method\": \"ties\", \"drop_rate\": 0.3, \"scale\": 0.5, \"note\": 1},"
                         "\"layer_1\": {\"method\": \"linear\", \"weights\": [0.6, 0.59, 0.12]},"
                         "\"special_pos_embed\": {\"method\": \"slerp\", \"t\": [0.93, 0.0, 0.90]},"
                         "\"mask_decoder_group_3\": {\"method\": \"task_arithmetic\", \"scale\": 0.3}");
        for (g = 2; g < 6; g++) msx__sb_printf(&b, ",\"layer_%d\": {\"method\": \"task_arithmetic\", \"scale\": 1}", g);
        msx__sb_puts(&b, ",\"special_patch_embed\": {\"method\": \"linear\", \"weights\": [1,0,0]}");
        msx__sb_puts(&b, ",\"special_neck\": {\"method\": \"linear\", \"weights\": [1,0,0]}");
        for (g = 0; g < 4; g++) msx__sb_printf(&b, ",\"prompt_encoder_group_%d\": {\"method\": \"linear\", \"weights\": [1,1,1]}", g);
        for (g = 0; g < 6; g++)
            if (g != 3) msx__sb_printf(&b, ",\"mask_decoder_group_%d\": {\"method\": \"slerp\", \"t\": [0.1,0.2,0.3]}", g);
        msx__sb_puts(&b, "}}");
        MSX_CHECK_OK(parse_str(b.s, &p));
        if (p) {
            int i0 = msx_plan_find(p, "layer_0"), i1 = msx_plan_find(p, "layer_1"), ip = msx_plan_find(p, "special_pos_embed");
            MSX_CHECK(p->n_layer_groups == 6 && p->n_models == 3 && p->granularity == 2, "example plan shape");
            MSX_CHECK(p->groups[i0].method == MSX_MERGE_TIES && p->groups[i0].drop_rate == 0.3 && p->groups[i0].scale == 0.5, "layer_0");
            MSX_CHECK(p->groups[i1].method == MSX_MERGE_LINEAR && p->groups[i1].weights[2] == 0.12, "layer_1");
            MSX_CHECK(p->groups[ip].method == MSX_MERGE_SLERP && p->groups[ip].t[0] == 0.93, "pos_embed");
            msx_plan_free(p);
            p = NULL;
        }
        /* bad plans: each refused with a message */
        {
            static const struct { const char *from, *to, *what; } muts[] = {
                {"medsamix-plan-v1", "medsamix-plan-v2", "format"},
                {"\"granularity\": 2", "\"granularity\": 0", "granularity"},
                {"\"method\": \"ties\"", "\"method\": \"dare\"", "method"},
                {"\"method\": \"ties\"", "\"method\": \"TIES\"", "method"},
                {"[0.6, 0.59, 0.12]", "[0.6, 0.59]", "weights"},
                {"[0.6, 0.59, 0.12]", "[0.6, -0.59, 0.12]", "weights"},
                {"[0.93, 0.0, 0.90]", "[1.93, 0.0, 0.90]", "t"},
                {"\"drop_rate\": 0.3", "\"drop_rate\": 1.3", "drop_rate"},
                {"\"drop_rate\": 0.3", "\"drop\": 0.3", "drop_rate"},
                {"\"scale\": 0.3}", "\"scale\": \"x\"}", "scale"},
                {"\"scale\": 0.3}", "\"scale\": 1e999}", "scale"},
                {"\"special_neck\"", "\"special_nek\"", "special_neck"},
                {"\"layer_1\"", "\"layer_9\"", "layer_1"},
                {"\"weights\": [0.6, 0.59, 0.12]", "\"weights\": [0.6, 0.59, NaN]", "NaN"},
            };
            size_t i;
            for (i = 0; i < sizeof muts / sizeof muts[0]; i++) {
                char *s = (char *)malloc(b.n + 64), *at = strstr(b.s, muts[i].from);
                msx_result r;
                MSX_CHECK(at != NULL, "mutation %d source text", (int)i);
                if (!at) { free(s); continue; }
                memcpy(s, b.s, (size_t)(at - b.s));
                strcpy(s + (at - b.s), muts[i].to);
                strcat(s, at + strlen(muts[i].from));
                r = parse_str(s, &p);
                MSX_CHECK(r != MSX_OK && p == NULL, "mutation %d (%s) accepted", (int)i, muts[i].what);
                MSX_CHECK(r == MSX_OK || strstr(msx_last_error(), "test.json") != NULL, "message names the file: %s", msx_last_error());
                msx_plan_free(p);
                p = NULL;
                free(s);
            }
        }
        msx__sb_free(&b);
    }
    MSX_CHECK(parse_str("[1,2]", &p) == MSX_E_FORMAT, "array root");
    MSX_CHECK(parse_str("{\"format\": \"medsamix-plan-v1\", \"granularity\": 2, \"groups\": {}}", &p) != MSX_OK, "no groups");
    MSX_CHECK(parse_str("{\"format\": \"medsamix-plan-v1\", \"granularity\": 2, \"groups\": {\"layer_0\": {", &p) == MSX_E_FORMAT, "truncated");
    /* C-level validation */
    MSX_CHECK_OK(msx_plan_create(12, 3, 2, &p));
    {
        msx_group_plan g;
        memset(&g, 0, sizeof g);
        g.method = MSX_MERGE_LINEAR;
        g.weights[0] = 1; g.weights[1] = NAN;
        MSX_CHECK(msx_plan_set_uniform(p, &g) == MSX_E_ARG, "NaN weight");
        g.weights[1] = -1;
        MSX_CHECK(msx_plan_set_uniform(p, &g) == MSX_E_ARG, "negative weight");
        g.method = MSX_MERGE_TASK_ARITHMETIC; g.scale = NAN;
        MSX_CHECK(msx_plan_set_uniform(p, &g) == MSX_E_ARG, "NaN scale");
        g.method = MSX_MERGE_TIES; g.scale = 1; g.drop_rate = -0.1;
        MSX_CHECK(msx_plan_set_uniform(p, &g) == MSX_E_ARG, "negative drop rate");
        g.method = MSX_MERGE_SLERP; g.t[0] = 0.5; g.t[1] = NAN;
        MSX_CHECK(msx_plan_set_uniform(p, &g) == MSX_E_ARG, "NaN t");
        g.method = (msx_merge_method)9;
        MSX_CHECK(msx_plan_set_uniform(p, &g) == MSX_E_ARG, "bad method");
        MSX_CHECK(msx_plan_find(p, "layer_5") == 5 && msx_plan_find(p, "layer_6") == -1 &&
                  msx_plan_find(p, "mask_decoder_group_5") == p->n_groups - 1, "plan_find");
        MSX_CHECK(msx_plan_n_initial(3) == 18, "docs/semantics.md §4.3: 18 initial configs for base + 2");
        MSX_CHECK_OK(msx_plan_set_initial(p, 2));
        MSX_CHECK(p->groups[0].method == MSX_MERGE_LINEAR && p->groups[0].weights[2] == 1 && p->groups[0].weights[0] == 0, "initial 2 = model 2 alone");
        MSX_CHECK_OK(msx_plan_set_initial(p, 17));
        MSX_CHECK(p->groups[3].method == MSX_MERGE_TIES && p->groups[3].scale == 1.0 && p->groups[3].drop_rate == 0.2, "initial 17");
        MSX_CHECK_OK(msx_plan_set_preset(p, "ties_d0.5_s1.0"));
        MSX_CHECK(p->groups[1].method == MSX_MERGE_TIES && p->groups[1].drop_rate == 0.5, "preset ties");
        MSX_CHECK(msx_plan_set_preset(p, "ties_d0.5") == MSX_E_ARG, "bad preset");
    }
    msx_plan_free(p);
}

/* ---- the merger end to end -------------------------------------------------------- */

/* Reference merge of one model written here from the reference's formulas
   (docs/semantics.md §2), sharing no code with the library: float32 in the
   reference's order for linear and task arithmetic, ref_ties for TIES, and
   SLERP in double with its own pair selection (compared within 1e-6, like
   the golden vectors). slerp[i] marks the tensors merged by SLERP. */
#if defined(__clang__)
#pragma float_control(precise, on, push)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
static int ref_tensor(float *o, const float *const *src, int n_src, const msx_group_plan *g, int64_t n) {
    int64_t j;
    int i;
    if (g->method == MSX_MERGE_LINEAR) {
        double sw = 0;
        float w[8];
        for (i = 0; i < n_src; i++) sw += g->weights[i];
        if (sw == 0) return 0; /* ZeroDivisionError: the pipeline keeps the base */
        for (i = 0; i < n_src; i++) w[i] = (float)(g->weights[i] / sw);
        for (j = 0; j < n; j++) {
            float acc = w[0] * src[0][j];
            for (i = 1; i < n_src; i++) acc = acc + w[i] * src[i][j];
            o[j] = acc;
        }
    } else if (g->method == MSX_MERGE_TASK_ARITHMETIC) {
        float lam = (float)g->scale;
        if (n_src < 3) return 0; /* IndexError: the pipeline keeps the base */
        for (j = 0; j < n; j++) {
            float sum = (src[1][j] - src[0][j]) + (src[2][j] - src[0][j]);
            for (i = 3; i < n_src; i++) sum = sum + (src[i][j] - src[0][j]);
            o[j] = src[0][j] + lam * sum;
        }
    } else if (g->method == MSX_MERGE_TIES) {
        ref_ties(o, src[0], src + 1, n_src - 1, g->drop_rate, (float)g->scale, n);
    } else { /* SLERP of the two largest t (stable, descending), weight softmax of the second */
        int v0 = -1, v1 = -1;
        double t, a = 0, b = 0, d = 0, c, s0, s1;
        for (i = 0; i < n_src; i++)
            if (v0 < 0 || g->t[i] > g->t[v0]) v0 = i;
        for (i = 0; i < n_src; i++)
            if (i != v0 && (v1 < 0 || g->t[i] > g->t[v1])) v1 = i;
        t = exp(g->t[v1]) / (exp(g->t[v0]) + exp(g->t[v1]));
        for (j = 0; j < n; j++) {
            a += (double)src[v0][j] * src[v0][j];
            b += (double)src[v1][j] * src[v1][j];
            d += (double)src[v0][j] * src[v1][j];
        }
        a = sqrt(a) > 1e-10 ? sqrt(a) : 1.0;
        b = sqrt(b) > 1e-10 ? sqrt(b) : 1.0;
        c = d / (a * b);
        if (fabs(c) > 0.9995) { s0 = 1 - t; s1 = t; }
        else { s0 = sin((1 - t) * acos(c)) / sin(acos(c)); s1 = sin(t * acos(c)) / sin(acos(c)); }
        for (j = 0; j < n; j++) o[j] = (float)s0 * src[v0][j] + (float)s1 * src[v1][j];
    }
    return 1;
}
#if defined(__clang__)
#pragma float_control(pop)
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

static void ref_merge(const msx_checkpoint *base, const msx_checkpoint *const *ft, int n_ft, const msx_plan *p,
                      msx_checkpoint *out, unsigned char *slerp) {
    int i, k;
    for (i = 0; i < base->n; i++) {
        const msx_tensor *bt = &base->tensors[i];
        char id[MSX_GROUP_ID_LEN];
        const float *src[8];
        float *o = (float *)out->tensors[i].data;
        int done = 0;
        msx_merge_key_group(bt->name, p->granularity, id);
        src[0] = (const float *)bt->data;
        for (k = 0; k < n_ft; k++) src[k + 1] = (const float *)msx_ckpt_find(ft[k], bt->name)->data;
        slerp[i] = 0;
        if (id[0]) {
            const msx_group_plan *g = &p->groups[msx_plan_find(p, id)];
            done = ref_tensor(o, src, n_ft + 1, g, bt->numel);
            slerp[i] = g->method == MSX_MERGE_SLERP;
        }
        if (!done) memcpy(o, bt->data, (size_t)bt->numel * 4);
    }
}

/* Byte-equal, except SLERP tensors: |a - b| <= 1e-6 + 1e-6 |b|. */
static int matches_ref(const msx_checkpoint *a, const msx_checkpoint *ref, const unsigned char *slerp) {
    int i;
    for (i = 0; i < a->n; i++) {
        const float *x = (const float *)a->tensors[i].data, *y = (const float *)ref->tensors[i].data;
        int64_t j, n = a->tensors[i].numel;
        if (!slerp[i]) {
            if (memcmp(x, y, (size_t)n * 4)) return 0;
        } else
            for (j = 0; j < n; j++)
                if (!(fabs((double)x[j] - y[j]) <= 1e-6 + 1e-6 * fabs((double)y[j]))) return 0;
    }
    return 1;
}

static msx_checkpoint *perturbed(const msx_checkpoint *base, uint64_t seed, double sigma) {
    msx_checkpoint *c = NULL;
    msx_rng rng;
    int i;
    int64_t j;
    msx_ckpt_clone(base, &c);
    msx_rng_seed(&rng, seed);
    for (i = 0; c && i < c->n; i++) {
        float *d = (float *)c->tensors[i].data;
        if (strstr(c->tensors[i].name, "positional_encoding_gaussian_matrix")) continue; /* a buffer: never trained */
        if (msx_rng_below(&rng, 5) == 0) continue; /* some tensors unchanged, like MedSAM's */
        for (j = 0; j < c->tensors[i].numel; j++) d[j] += (float)(sigma * msx_rng_normal(&rng));
    }
    return c;
}

static int same_ckpt(const msx_checkpoint *a, const msx_checkpoint *b, const char *skip) {
    int i;
    if (a->n != b->n) return 0;
    for (i = 0; i < a->n; i++) {
        const msx_tensor *x = &a->tensors[i], *y = msx_ckpt_find(b, x->name);
        if (skip && strstr(x->name, skip)) continue;
        if (!y || y->numel != x->numel || memcmp(x->data, y->data, (size_t)x->numel * 4)) return 0;
    }
    return 1;
}

static void test_merger(const char *label, const msx_checkpoint *base, const msx_checkpoint *f1,
                        const msx_checkpoint *f2, int check_export) {
    const msx_checkpoint *fts[2] = {f1, f2};
    msx_checkpoint *out = NULL, *ref = NULL;
    unsigned char *slerp = (unsigned char *)calloc((size_t)base->n, 1);
    msx_rng rng;
    int n_ft, g, trial, k;
    msx_rng_seed(&rng, 99);
    MSX_CHECK_OK(msx_ckpt_clone(base, &out));
    MSX_CHECK_OK(msx_ckpt_clone(base, &ref));
    for (n_ft = 1; n_ft <= 2; n_ft++)
        for (g = 1; g <= 4; g++) {
            msx_merger *m = NULL;
            msx_plan *p = NULL;
            msx_merge_report rep;
            MSX_CHECK_OK(msx_merger_create(base, fts, n_ft, g, &m));
            if (!m) continue;
            MSX_CHECK_OK(msx_merger_plan_create(m, &p));
            /* every tensor in exactly one group (or the never-merged buffer) */
            {
                int i, nm = 0, total = 0;
                for (i = 0; i < base->n; i++) {
                    int gi = msx_merger_tensor_group(m, i);
                    char id[MSX_GROUP_ID_LEN];
                    msx_merge_key_group(base->tensors[i].name, g, id);
                    if (gi < 0) nm++;
                    else MSX_CHECK(!strcmp(p->ids[gi], id), "%s: tensor %s in %s, expected %s", label, base->tensors[i].name, p->ids[gi], id);
                    total++;
                }
                MSX_CHECK(nm == 1 && total == base->n, "%s: %d never-merged tensors", label, nm);
            }
            /* one-hot linear reproduces each input bit-exactly */
            for (k = 0; k <= n_ft; k++) {
                char nm[16];
                snprintf(nm, sizeof nm, "model%d", k);
                MSX_CHECK_OK(msx_plan_set_preset(p, nm));
                MSX_CHECK_OK(msx_merger_run(m, p, out, &rep));
                MSX_CHECK(same_ckpt(out, k ? fts[k - 1] : base, "positional_encoding_gaussian_matrix"),
                          "%s: one-hot on model %d is not bit-exact", label, k);
                MSX_CHECK(rep.n_warnings == 0, "%s: unexpected warning %s", label, rep.warnings[0]);
            }
            /* random plans equal the per-tensor reference */
            for (trial = 0; trial < 3; trial++) {
                random_plan(p, &rng, 1);
                MSX_CHECK_OK(msx_merger_run(m, p, out, &rep));
                ref_merge(base, fts, n_ft, p, ref, slerp);
                MSX_CHECK(matches_ref(out, ref, slerp), "%s: n_ft %d g %d trial %d differs from the reference merge",
                          label, n_ft, g, trial);
            }
            /* reference keep-the-base cases: reported, or refused in strict mode */
            {
                msx_group_plan gp;
                msx_merge_options opt;
                memset(&gp, 0, sizeof gp);
                gp.method = MSX_MERGE_TASK_ARITHMETIC;
                gp.scale = 0.5;
                MSX_CHECK_OK(msx_plan_set_uniform(p, &gp));
                MSX_CHECK_OK(msx_merger_run(m, p, out, &rep));
                if (n_ft == 1) {
                    MSX_CHECK(rep.n_warnings == p->n_groups && strstr(rep.warnings[0], "task_arithmetic"),
                              "%s: TA with one model must warn per group (%d warnings)", label, rep.n_warnings);
                    MSX_CHECK(same_ckpt(out, base, NULL), "%s: TA with one model keeps the base", label);
                    MSX_CHECK(rep.n_tensors_kept_base == base->n - 1, "%s: kept %d", label, rep.n_tensors_kept_base);
                    memset(&opt, 0, sizeof opt);
                    opt.strict = 1;
                    msx_merger_set_options(m, &opt);
                    MSX_CHECK(msx_merger_run(m, p, out, &rep) == MSX_E_ARG, "%s: strict TA n=1", label);
                    msx_merger_set_options(m, NULL);
                } else MSX_CHECK(rep.n_warnings == 0, "%s: TA n=2 warns", label);
                gp.method = MSX_MERGE_LINEAR;
                MSX_CHECK_OK(msx_plan_set_uniform(p, &gp)); /* all weights 0 */
                p->groups[0].weights[1] = 1;               /* except layer_0 */
                MSX_CHECK_OK(msx_merger_run(m, p, out, &rep));
                MSX_CHECK(rep.n_warnings == p->n_groups - 1 && strstr(rep.warnings[0], "sum to 0"), "%s: zero weights warn (%d)", label, rep.n_warnings);
            }
            /* plan shape mismatches */
            {
                msx_plan *bad = NULL;
                MSX_CHECK_OK(msx_plan_create(msx_merger_depth(m), n_ft + 2, g, &bad));
                MSX_CHECK(msx_merger_run(m, bad, out, NULL) == MSX_E_ARG, "model count mismatch");
                msx_plan_free(bad);
                MSX_CHECK_OK(msx_plan_create(msx_merger_depth(m) + g, n_ft + 1, g, &bad));
                MSX_CHECK(msx_merger_run(m, bad, out, NULL) == MSX_E_ARG, "layer group mismatch");
                msx_plan_free(bad);
            }
            if (check_export && n_ft == 2 && g == 2) {
                const char *path = "build/tests/test_merge_export.safetensors";
                msx_checkpoint *back = NULL;
                msx_plan *pb = NULL;
                random_plan(p, &rng, 1);
                MSX_CHECK_OK(msx_merger_run(m, p, out, NULL));
                MSX_CHECK_OK(msx_merge_export(path, out, p));
                MSX_CHECK_OK(msx_safetensors_load(path, &back));
                MSX_CHECK(back && same_ckpt(out, back, NULL) && same_ckpt(back, out, NULL), "%s: export/re-load differs", label);
                if (back) {
                    int i, order = 1;
                    for (i = 0; i < back->n; i++) order &= !strcmp(back->tensors[i].name, out->tensors[i].name);
                    MSX_CHECK(order, "export keeps the key order");
                }
                MSX_CHECK_OK(msx_plan_load_json("build/tests/test_merge_export.plan.json", &pb));
                MSX_CHECK(pb && same_plan(p, pb), "plan beside the export");
                {
                    /* the checkpoint loader accepts it as a SAM (strict key set and shapes) */
                    msx_checkpoint *sam = NULL;
                    MSX_CHECK_OK(msx_sam_load(path, NULL, &sam, NULL));
                    MSX_CHECK(sam && same_ckpt(out, sam, NULL) && same_ckpt(sam, out, NULL), "%s: msx_sam_load of the export differs", label);
                    msx_ckpt_free(sam);
                }
                msx_ckpt_free(back);
                msx_plan_free(pb);
                remove(path);
                remove("build/tests/test_merge_export.plan.json");
            }
            /* two mergers run concurrently (one thread each, as the search does) equal sequential runs */
            if (g == 2) {
                msx_merger *m2 = NULL;
                msx_plan *p2 = NULL;
                msx_checkpoint *o1 = NULL, *o2 = NULL;
                msx_merge_options one;
                int rc1 = -1, rc2 = -1;
                memset(&one, 0, sizeof one);
                one.n_threads = 1;
                MSX_CHECK_OK(msx_merger_create(base, fts, n_ft, g, &m2));
                MSX_CHECK_OK(msx_plan_clone(p, &p2));
                random_plan(p, &rng, 1);
                random_plan(p2, &rng, 1);
                msx_ckpt_clone(base, &o1);
                msx_ckpt_clone(base, &o2);
                if (m2 && p2 && o1 && o2) {
                    msx_merger_set_options(m, &one);
                    msx_merger_set_options(m2, &one);
#pragma omp parallel sections num_threads(2)
                    {
#pragma omp section
                        rc1 = (int)msx_merger_run(m, p, o1, NULL);
#pragma omp section
                        rc2 = (int)msx_merger_run(m2, p2, o2, NULL);
                    }
                    MSX_CHECK(rc1 == 0 && rc2 == 0, "%s: concurrent runs failed", label);
                    msx_merger_set_options(m, NULL);
                    MSX_CHECK_OK(msx_merger_run(m, p, out, NULL));
                    MSX_CHECK(same_ckpt(out, o1, NULL), "%s: concurrent run 1 differs", label);
                    MSX_CHECK_OK(msx_merger_run(m, p2, out, NULL));
                    MSX_CHECK(same_ckpt(out, o2, NULL), "%s: concurrent run 2 differs", label);
                }
                msx_ckpt_free(o1);
                msx_ckpt_free(o2);
                msx_plan_free(p2);
                msx_merger_free(m2);
            }
            msx_plan_free(p);
            msx_merger_free(m);
        }
    msx_ckpt_free(out);
    msx_ckpt_free(ref);
    free(slerp);
}

static void test_merger_bad(const msx_checkpoint *base) {
    msx_checkpoint *f = NULL, *g = NULL;
    const msx_checkpoint *fts[1];
    msx_merger *m = NULL;
    int64_t shp[2] = {3, 3};
    msx_ckpt_clone(base, &f);
    fts[0] = f;
    MSX_CHECK_OK(msx_ckpt_add(f, "extra.weight", MSX_F32, 2, shp, NULL, NULL));
    MSX_CHECK(msx_merger_create(base, fts, 1, 2, &m) == MSX_E_KEY_MISMATCH && !m, "extra key");
    MSX_CHECK(strstr(msx_last_error(), "extra.weight") != NULL, "message names the key: %s", msx_last_error());
    msx_ckpt_free(f);
    msx_ckpt_clone(base, &f);
    fts[0] = f;
    MSX_CHECK_OK(msx_ckpt_rename(f, 3, "image_encoder.blocks.0.norm1.weightX"));
    MSX_CHECK(msx_merger_create(base, fts, 1, 2, &m) == MSX_E_KEY_MISMATCH, "renamed key");
    msx_ckpt_free(f);
    msx_ckpt_clone(base, &f);
    fts[0] = f;
    f->tensors[5].shape[0] += 1;
    MSX_CHECK(msx_merger_create(base, fts, 1, 2, &m) == MSX_E_SHAPE, "shape mismatch");
    MSX_CHECK(strstr(msx_last_error(), f->tensors[5].name) != NULL, "message names the tensor: %s", msx_last_error());
    f->tensors[5].shape[0] -= 1;
    MSX_CHECK(msx_merger_create(base, fts, 0, 2, &m) == MSX_E_ARG, "no fine-tuned model");
    MSX_CHECK(msx_merger_create(base, fts, 1, 0, &m) == MSX_E_ARG, "granularity 0");
    msx_ckpt_clone(base, &g);
    MSX_CHECK_OK(msx_ckpt_add(g, "unknown.tensor", MSX_F32, 2, shp, NULL, NULL));
    fts[0] = g;
    MSX_CHECK(msx_merger_create(g, fts, 1, 2, &m) == MSX_E_KEY_MISMATCH, "non-SAM key in the base");
    msx_ckpt_free(f);
    msx_ckpt_free(g);
}

int main(void) {
    msx_checkpoint *tiny = NULL;
    test_golden();
    test_slerp_selection();
    test_ties_bruteforce();
    test_groups();
    test_plan_json();
    /* tiny_a (depth 4) from its safetensors copy */
    MSX_CHECK_OK(msx_safetensors_load(msx_test_path("checkpoints/tiny_a_weights.safetensors"), &tiny));
    if (tiny) {
        msx_checkpoint *f1 = perturbed(tiny, 1, 0.01), *f2 = perturbed(tiny, 2, 0.02);
        test_merger("tiny_a", tiny, f1, f2, 1);
        test_merger_bad(tiny);
        msx_ckpt_free(f1);
        msx_ckpt_free(f2);
        msx_ckpt_free(tiny);
    }
    /* the demo world: base + two specialists (depth 6) */
    {
        msx_checkpoint *b = NULL, *s1 = NULL, *s2 = NULL;
        MSX_CHECK_OK(msx_sam_load("examples/demo/models/base.pth", NULL, &b, NULL));
        MSX_CHECK_OK(msx_sam_load("examples/demo/models/spec_ct.pth", NULL, &s1, NULL));
        MSX_CHECK_OK(msx_sam_load("examples/demo/models/spec_mri.pth", NULL, &s2, NULL));
        if (b && s1 && s2) test_merger("demo", b, s1, s2, 1);
        msx_ckpt_free(b);
        msx_ckpt_free(s1);
        msx_ckpt_free(s2);
    }
    return msx_test_summary("test_merge");
}
