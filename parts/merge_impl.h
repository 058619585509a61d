/* ======================================================================== */
/* IMPLEMENTATION: merge. Owns the four merge methods (bit-compatible with   */
/* the official MedSAMix code, ref §1), the key -> group mapping (ref §2.2),  */
/* merge plans and their JSON, the per-trial merger and the export.          */
/* ======================================================================== */

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#define MSX__MOMP(x) _Pragma(x)
#else
#define MSX__MOMP(x)
#endif

/* Bit-exactness with the reference needs w*x + y rounded twice: no FMA
   contraction in this section (gcc's GNU modes and clang would contract). */
#if defined(__clang__)
#pragma float_control(push)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off", "tree-vectorize", "vect-cost-model=dynamic")
#endif

#define MSX__MERGE_BLOCK 1024         /* elements per block of the streaming kernels */
#define MSX__MERGE_PAR_MIN 32768      /* smaller tensors run on one thread */
#define MSX__TIES_DIRECT 65536        /* up to this size TIES selects on a full copy */
#define MSX__TIES_SAMPLE 32768        /* largest sample for the bracketed selection */
#define MSX__TIES_SAMPLE_CHUNK 64     /* ... drawn in contiguous chunks of this size */
#define MSX__MERGE_MAX_THREADS 64

static int msx__merge_nthreads(int n) {
#ifdef _OPENMP
    if (n <= 0) n = omp_get_max_threads();
#else
    n = 1;
#endif
    if (n < 1) n = 1;
    if (n > MSX__MERGE_MAX_THREADS) n = MSX__MERGE_MAX_THREADS;
    return n;
}

/* ---- method names -------------------------------------------------------- */

static const char *const msx__merge_method_names[MSX_MERGE_METHOD_COUNT] = {"linear", "task_arithmetic", "ties",
                                                                          "slerp"};

MSXDEF const char *msx_merge_method_name(msx_merge_method m) {
    return (unsigned)m < MSX_MERGE_METHOD_COUNT ? msx__merge_method_names[m] : "?";
}

MSXDEF msx_result msx_merge_method_parse(const char *name, msx_merge_method *out) {
    int i;
    for (i = 0; i < MSX_MERGE_METHOD_COUNT; i++)
        if (name && !strcmp(name, msx__merge_method_names[i])) { *out = (msx_merge_method)i; return MSX_OK; }
    return msx__err(MSX_E_ARG, "unknown merge method '%s' (expected linear, task_arithmetic, ties or slerp)",
                    name ? name : "(null)");
}

/* ---- key -> group (ref §2.2) -------------------------------------------- */

/* The 13 groups after the layer groups, in canonical order. */
static const char *const msx__merge_fixed_ids[13] = {
    "special_pos_embed",      "special_patch_embed",    "special_neck",           "prompt_encoder_group_0",
    "prompt_encoder_group_1", "prompt_encoder_group_2", "prompt_encoder_group_3", "mask_decoder_group_0",
    "mask_decoder_group_1",   "mask_decoder_group_2",   "mask_decoder_group_3",   "mask_decoder_group_4",
    "mask_decoder_group_5"};

static int msx__merge_prefix(const char *s, const char *p) { return !strncmp(s, p, strlen(p)); }

/* Class of a key: 0 encoder block (*block set), 1..13 the fixed groups,
   -1 never merged, -2 unknown. The reference classifies block tensors by
   the substrings attn / mlp / norm; a block key with none is not SAM. */
static int msx__merge_key_class(const char *key, int *block) {
    static const struct { const char *prefix; int cls; } rules[] = {
        {"image_encoder.patch_embed.", 2},
        {"image_encoder.neck.", 3},
        {"prompt_encoder.point_embeddings.", 4},
        {"prompt_encoder.not_a_point_embed.", 5},
        {"prompt_encoder.mask_downscaling.", 6},
        {"prompt_encoder.no_mask_embed.", 7},
        {"mask_decoder.transformer.layers.", 8},
        {"mask_decoder.transformer.final_attn_token_to_image.", 9},
        {"mask_decoder.transformer.norm_final_attn.", 9},
        {"mask_decoder.iou_token.", 10},
        {"mask_decoder.mask_tokens.", 10},
        {"mask_decoder.output_upscaling.", 11},
        {"mask_decoder.output_hypernetworks_mlps.", 12},
        {"mask_decoder.iou_prediction_head.", 13},
    };
    size_t i;
    if (!strcmp(key, "image_encoder.pos_embed")) return 1;
    if (!strcmp(key, "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix")) return -1;
    if (msx__merge_prefix(key, "image_encoder.blocks.")) {
        const char *p = key + strlen("image_encoder.blocks.");
        long b = 0;
        if (*p < '0' || *p > '9') return -2;
        while (*p >= '0' && *p <= '9') {
            b = b * 10 + (*p - '0');
            if (b > 100000) return -2;
            p++;
        }
        if (*p != '.' || !p[1]) return -2;
        if (!strstr(p, "attn") && !strstr(p, "mlp") && !strstr(p, "norm")) return -2;
        *block = (int)b;
        return 0;
    }
    for (i = 0; i < sizeof rules / sizeof rules[0]; i++)
        if (msx__merge_prefix(key, rules[i].prefix) && key[strlen(rules[i].prefix)]) return rules[i].cls;
    return -2;
}

MSXDEF msx_result msx_merge_key_group(const char *key, int granularity, char id[MSX_GROUP_ID_LEN]) {
    int block = 0, cls;
    id[0] = 0;
    if (granularity < 1) return msx__err(MSX_E_ARG, "granularity %d: must be >= 1 encoder blocks per group", granularity);
    cls = msx__merge_key_class(key, &block);
    if (cls == -2)
        return msx__err(MSX_E_KEY_MISMATCH, "tensor '%s' is not a SAM state-dict key (no merge group; expected the "
                        "segment_anything names, e.g. image_encoder.blocks.<i>.attn.qkv.weight)", key);
    if (cls == 0) snprintf(id, MSX_GROUP_ID_LEN, "layer_%d", block / granularity);
    else if (cls > 0) snprintf(id, MSX_GROUP_ID_LEN, "%s", msx__merge_fixed_ids[cls - 1]);
    return MSX_OK;
}

MSXDEF int msx_merge_n_groups(int depth, int granularity) {
    if (depth < 1 || granularity < 1) return 0;
    return (depth + granularity - 1) / granularity + 13;
}

/* ---- plans ------------------------------------------------------------------ */

static msx_result msx__plan_alloc(int n_layer_groups, int n_models, int granularity, msx_plan **out) {
    msx_plan *p;
    int g;
    *out = NULL;
    if (granularity < 1) return msx__err(MSX_E_ARG, "plan: granularity %d must be >= 1", granularity);
    if (n_layer_groups < 1 || n_layer_groups > 100000)
        return msx__err(MSX_E_ARG, "plan: %d layer groups (encoder depth < 1?)", n_layer_groups);
    if (n_models != 0 && (n_models < 2 || n_models > MSX_MAX_MODELS))
        return msx__err(MSX_E_ARG, "plan: %d models (base + fine-tuned must be 2..%d, MSX_MAX_MODELS)", n_models,
                        MSX_MAX_MODELS);
    p = (msx_plan *)msx__calloc(1, sizeof *p);
    if (!p) return msx__err(MSX_E_NOMEM, "out of memory");
    p->granularity = granularity;
    p->n_models = n_models;
    p->n_layer_groups = n_layer_groups;
    p->n_groups = n_layer_groups + 13;
    p->ids = (char(*)[MSX_GROUP_ID_LEN])msx__calloc((size_t)p->n_groups, MSX_GROUP_ID_LEN);
    p->groups = (msx_group_plan *)msx__calloc((size_t)p->n_groups, sizeof *p->groups);
    if (!p->ids || !p->groups) { msx_plan_free(p); return msx__err(MSX_E_NOMEM, "out of memory"); }
    for (g = 0; g < p->n_groups; g++) {
        if (g < n_layer_groups) snprintf(p->ids[g], MSX_GROUP_ID_LEN, "layer_%d", g);
        else snprintf(p->ids[g], MSX_GROUP_ID_LEN, "%s", msx__merge_fixed_ids[g - n_layer_groups]);
        p->groups[g].method = MSX_MERGE_LINEAR;
        p->groups[g].weights[0] = 1.0; /* one-hot on the base: the merge reproduces it */
    }
    *out = p;
    return MSX_OK;
}

MSXDEF msx_result msx_plan_create(int depth, int n_models, int granularity, msx_plan **out) {
    *out = NULL;
    if (depth < 1) return msx__err(MSX_E_ARG, "plan: encoder depth %d must be >= 1", depth);
    if (granularity < 1) return msx__err(MSX_E_ARG, "plan: granularity %d must be >= 1", granularity);
    if (n_models < 2 || n_models > MSX_MAX_MODELS)
        return msx__err(MSX_E_ARG, "plan: %d models (base + fine-tuned must be 2..%d)", n_models, MSX_MAX_MODELS);
    return msx__plan_alloc((depth + granularity - 1) / granularity, n_models, granularity, out);
}

MSXDEF void msx_plan_free(msx_plan *p) {
    if (!p) return;
    MSX_FREE(p->ids);
    MSX_FREE(p->groups);
    MSX_FREE(p);
}

MSXDEF msx_result msx_plan_clone(const msx_plan *p, msx_plan **out) {
    msx_result r = msx__plan_alloc(p->n_layer_groups, p->n_models, p->granularity, out);
    if (r != MSX_OK) return r;
    memcpy((*out)->groups, p->groups, (size_t)p->n_groups * sizeof *p->groups);
    return MSX_OK;
}

MSXDEF int msx_plan_find(const msx_plan *p, const char *id) {
    int g;
    if (!p || !id) return -1;
    if (!strncmp(id, "layer_", 6)) {
        /* O(1) for the common case; canonical spelling only */
        char *e;
        long k = strtol(id + 6, &e, 10);
        if (id[6] >= '0' && id[6] <= '9' && !*e && k >= 0 && k < p->n_layer_groups && !strcmp(p->ids[k], id))
            return (int)k;
        return -1;
    }
    for (g = p->n_layer_groups; g < p->n_groups; g++)
        if (!strcmp(p->ids[g], id)) return g;
    return -1;
}

/* Checks one group; `id` names it in messages. */
static msx_result msx__group_validate(const msx_group_plan *g, int n_models, const char *id) {
    int i;
    switch (g->method) {
    case MSX_MERGE_LINEAR:
    case MSX_MERGE_SLERP: {
        const double *v = g->method == MSX_MERGE_LINEAR ? g->weights : g->t;
        const char *nm = g->method == MSX_MERGE_LINEAR ? "weights" : "t";
        if (n_models < 2)
            return msx__err(MSX_E_ARG, "group %s: %s needs the number of models (plan n_models is %d)", id,
                            msx__merge_method_names[g->method], n_models);
        for (i = 0; i < n_models; i++) {
            if (!isfinite(v[i])) return msx__err(MSX_E_ARG, "group %s: %s[%d] is not a finite number", id, nm, i);
            if (v[i] < 0 || (g->method == MSX_MERGE_SLERP && v[i] > 1))
                return msx__err(MSX_E_ARG, "group %s: %s[%d] = %g is out of range (%s)", id, nm, i, v[i],
                                g->method == MSX_MERGE_LINEAR ? "weights must be >= 0" : "t must lie in [0, 1]");
        }
        return MSX_OK;
    }
    case MSX_MERGE_TIES:
        if (!isfinite(g->drop_rate) || g->drop_rate < 0 || g->drop_rate > 1)
            return msx__err(MSX_E_ARG, "group %s: drop_rate %g must lie in [0, 1]", id, g->drop_rate);
        /* fall through */
    case MSX_MERGE_TASK_ARITHMETIC:
        if (!isfinite(g->scale)) return msx__err(MSX_E_ARG, "group %s: scale is not a finite number", id);
        return MSX_OK;
    default: return msx__err(MSX_E_ARG, "group %s: invalid method %d", id, (int)g->method);
    }
}

MSXDEF msx_result msx_plan_validate(const msx_plan *p) {
    int g;
    msx_result r;
    if (!p) return msx__err(MSX_E_ARG, "plan is NULL");
    if (p->granularity < 1) return msx__err(MSX_E_ARG, "plan: granularity %d must be >= 1", p->granularity);
    if (p->n_models != 0 && (p->n_models < 2 || p->n_models > MSX_MAX_MODELS))
        return msx__err(MSX_E_ARG, "plan: n_models %d must be 2..%d", p->n_models, MSX_MAX_MODELS);
    if (p->n_groups != p->n_layer_groups + 13) return msx__err(MSX_E_STATE, "plan: inconsistent group count");
    for (g = 0; g < p->n_groups; g++)
        if ((r = msx__group_validate(&p->groups[g], p->n_models, p->ids[g])) != MSX_OK) return r;
    return MSX_OK;
}

MSXDEF msx_result msx_plan_set_uniform(msx_plan *p, const msx_group_plan *g) {
    int i;
    msx_result r = msx__group_validate(g, p->n_models, "(uniform)");
    if (r != MSX_OK) return r;
    for (i = 0; i < p->n_groups; i++) p->groups[i] = *g;
    return MSX_OK;
}

/* Parses a whole decimal number (strtod) into *v; 0 if trailing junk. */
static int msx__merge_num(const char *s, double *v) {
    char *e;
    if (!*s) return 0;
    *v = strtod(s, &e);
    return *e == 0 && isfinite(*v);
}

MSXDEF msx_result msx_plan_set_preset(msx_plan *p, const char *name) {
    msx_group_plan g;
    int i;
    double a, b;
    memset(&g, 0, sizeof g);
    if (!strcmp(name, "base")) { g.method = MSX_MERGE_LINEAR; g.weights[0] = 1; }
    else if (!strncmp(name, "model", 5) && msx__merge_num(name + 5, &a) && a == floor(a) && a >= 0 &&
             a < (p->n_models ? p->n_models : 1)) {
        g.method = MSX_MERGE_LINEAR;
        g.weights[(int)a] = 1;
    } else if (!strcmp(name, "linear_avg")) {
        g.method = MSX_MERGE_LINEAR;
        for (i = 0; i < p->n_models; i++) g.weights[i] = 1;
    } else if (!strncmp(name, "ta_", 3) && msx__merge_num(name + 3, &a)) {
        g.method = MSX_MERGE_TASK_ARITHMETIC;
        g.scale = a;
    } else if (!strncmp(name, "slerp_", 6) && msx__merge_num(name + 6, &a)) {
        g.method = MSX_MERGE_SLERP;
        for (i = 0; i < p->n_models; i++) g.t[i] = a;
    } else if (!strncmp(name, "ties_d", 6)) {
        char buf[64];
        const char *us = strstr(name, "_s");
        size_t l = us ? (size_t)(us - (name + 6)) : 0;
        if (!us || l == 0 || l >= sizeof buf) goto bad;
        memcpy(buf, name + 6, l);
        buf[l] = 0;
        if (!msx__merge_num(buf, &a) || !msx__merge_num(us + 2, &b)) goto bad;
        g.method = MSX_MERGE_TIES;
        g.drop_rate = a;
        g.scale = b;
    } else goto bad;
    return msx_plan_set_uniform(p, &g);
bad:
    return msx__err(MSX_E_ARG, "unknown plan preset '%s' (expected base, model<k>, linear_avg, ta_<s>, "
                    "ties_d<r>_s<s> or slerp_<t>, e.g. ta_0.5 or ties_d0.5_s1.0)", name);
}

static const double msx__merge_init_lambdas[6] = {0.3, 0.5, 0.6, 0.7, 0.8, 1.0};

MSXDEF int msx_plan_n_initial(int n_models) { return n_models + 3 + 6 + 6; }

MSXDEF msx_result msx_plan_set_initial(msx_plan *p, int i) {
    msx_group_plan g;
    int k, n = p->n_models;
    memset(&g, 0, sizeof g);
    if (n < 2) return msx__err(MSX_E_ARG, "initial configuration: the plan has no model count (n_models %d)", n);
    if (i < 0 || i >= msx_plan_n_initial(n))
        return msx__err(MSX_E_ARG, "initial configuration %d out of range [0, %d)", i, msx_plan_n_initial(n));
    if (i < n) { g.method = MSX_MERGE_LINEAR; g.weights[i] = 1; }
    else if ((i -= n) < 3) {
        g.method = MSX_MERGE_SLERP;
        for (k = 0; k < n; k++) g.t[k] = 0.3 + 0.2 * i;
    } else if ((i -= 3) < 6) {
        g.method = MSX_MERGE_TASK_ARITHMETIC;
        g.scale = msx__merge_init_lambdas[i];
    } else {
        g.method = MSX_MERGE_TIES;
        g.scale = msx__merge_init_lambdas[i - 6];
        g.drop_rate = 0.2;
    }
    return msx_plan_set_uniform(p, &g);
}

/* ---- plan JSON ---------------------------------------------------------------- */

#define MSX__PLAN_FORMAT "medsamix-plan-v1"

/* 1 when v is an integral number in [lo, hi]. */
static int msx__merge_json_int(const msx__json *v, double lo, double hi, int *out) {
    if (!v || v->type != MSX__JNUM || v->num != floor(v->num) || v->num < lo || v->num > hi) return 0;
    *out = (int)v->num;
    return 1;
}

/* Layer-group index of a canonical "layer_<k>" key, else -1. */
static int msx__merge_layer_key(const char *key) {
    const char *p = key + 6;
    long k = 0;
    if (strncmp(key, "layer_", 6) || !*p || (*p == '0' && p[1])) return -1;
    for (; *p; p++) {
        if (*p < '0' || *p > '9') return -1;
        k = k * 10 + (*p - '0');
        if (k > 100000) return -1;
    }
    return (int)k;
}

static msx_result msx__plan_json_array(const msx__json *a, int n_models, double *dst, const char *what,
                                       const char *id, const char *nm) {
    int i;
    if (!a || a->type != MSX__JARR)
        return msx__err(MSX_E_FORMAT, "%s: group %s: \"%s\" must be an array with one number per model (base first)",
                        what, id, nm);
    if (a->n != n_models)
        return msx__err(MSX_E_FORMAT, "%s: group %s: \"%s\" has %d entries, expected %d (one per model, base first)",
                        what, id, nm, a->n, n_models);
    for (i = 0; i < a->n; i++) {
        if (a->kids[i].type != MSX__JNUM)
            return msx__err(MSX_E_FORMAT, "%s: group %s: \"%s\"[%d] is not a number", what, id, nm, i);
        dst[i] = a->kids[i].num;
    }
    return MSX_OK;
}

static msx_result msx__plan_json_scalar(const msx__json *o, const char *key, double *dst, const char *what,
                                        const char *id) {
    const msx__json *v = msx__json_get(o, key);
    if (!v) return msx__err(MSX_E_FORMAT, "%s: group %s: missing \"%s\"", what, id, key);
    if (v->type != MSX__JNUM) return msx__err(MSX_E_FORMAT, "%s: group %s: \"%s\" is not a number", what, id, key);
    *dst = v->num;
    return MSX_OK;
}

MSXDEF msx_result msx_plan_parse_json(const char *text, size_t len, const char *what, msx_plan **out) {
    msx__json *root;
    const msx__json *groups, *v;
    const char *fmt;
    int gran = 0, n_models = -1, n_layers = 0, i, g;
    msx_plan *p = NULL;
    msx_result r = MSX_OK;
    *out = NULL;
    if (!what) what = "plan";
    root = msx__json_parse(text, len, what);
    if (!root) return msx__errcode;
    if (root->type != MSX__JOBJ) { r = msx__err(MSX_E_FORMAT, "%s: a plan must be a JSON object", what); goto done; }
    fmt = msx__json_str(root, "format");
    if (!fmt || strcmp(fmt, MSX__PLAN_FORMAT)) {
        r = msx__err(MSX_E_FORMAT, "%s: \"format\" is %s%s%s, expected \"" MSX__PLAN_FORMAT "\"", what,
                     fmt ? "\"" : "", fmt ? fmt : "missing or not a string", fmt ? "\"" : "");
        goto done;
    }
    if (!msx__merge_json_int(msx__json_get(root, "granularity"), 1, 100000, &gran)) {
        r = msx__err(MSX_E_FORMAT, "%s: \"granularity\" must be an integer >= 1 (encoder blocks per layer group)", what);
        goto done;
    }
    if ((v = msx__json_get(root, "n_models")) != NULL && !msx__merge_json_int(v, 2, MSX_MAX_MODELS, &n_models)) {
        r = msx__err(MSX_E_FORMAT, "%s: \"n_models\" must be an integer in [2, %d]", what, MSX_MAX_MODELS);
        goto done;
    }
    groups = msx__json_get(root, "groups");
    if (!groups || groups->type != MSX__JOBJ) {
        r = msx__err(MSX_E_FORMAT, "%s: \"groups\" is missing or not an object", what);
        goto done;
    }
    for (i = 0; i < groups->n; i++) {
        int k = msx__merge_layer_key(groups->keys[i]);
        const msx__json *gv = &groups->kids[i], *a;
        if (k >= n_layers) n_layers = k + 1;
        /* the model count, when not given, comes from the first array */
        if (gv->type != MSX__JOBJ) continue;
        a = msx__json_get(gv, "weights");
        if (!a || a->type != MSX__JARR) a = msx__json_get(gv, "t");
        if (n_models < 0 && a && a->type == MSX__JARR) n_models = a->n;
    }
    if (n_layers == 0) {
        r = msx__err(MSX_E_FORMAT, "%s: no layer groups (\"layer_0\", \"layer_1\", ...) in \"groups\"", what);
        goto done;
    }
    if (n_models < 0) n_models = 0;
    if (n_models != 0 && (n_models < 2 || n_models > MSX_MAX_MODELS)) {
        r = msx__err(MSX_E_FORMAT, "%s: weights/t arrays have %d entries; base + fine-tuned models must be 2..%d", what,
                     n_models, MSX_MAX_MODELS);
        goto done;
    }
    if ((r = msx__plan_alloc(n_layers, n_models, gran, &p)) != MSX_OK) goto done;
    for (g = 0; g < p->n_groups && r == MSX_OK; g++) {
        const char *id = p->ids[g];
        const msx__json *o = msx__json_get(groups, id);
        const char *m;
        msx_group_plan *gp = &p->groups[g];
        memset(gp, 0, sizeof *gp);
        if (!o) {
            r = msx__err(MSX_E_FORMAT, "%s: group \"%s\" is missing (every group must be present; %d layer groups "
                         "were inferred from the largest layer_<k>)", what, id, n_layers);
            break;
        }
        if (o->type != MSX__JOBJ) { r = msx__err(MSX_E_FORMAT, "%s: group %s is not an object", what, id); break; }
        m = msx__json_str(o, "method");
        if (!m) { r = msx__err(MSX_E_FORMAT, "%s: group %s: missing \"method\" string", what, id); break; }
        if (msx_merge_method_parse(m, &gp->method) != MSX_OK) {
            r = msx__err(MSX_E_FORMAT, "%s: group %s: unknown method \"%s\" (expected linear, task_arithmetic, ties "
                         "or slerp)", what, id, m);
            break;
        }
        switch (gp->method) {
        case MSX_MERGE_LINEAR:
            r = msx__plan_json_array(msx__json_get(o, "weights"), n_models, gp->weights, what, id, "weights");
            break;
        case MSX_MERGE_SLERP: r = msx__plan_json_array(msx__json_get(o, "t"), n_models, gp->t, what, id, "t"); break;
        case MSX_MERGE_TIES:
            r = msx__plan_json_scalar(o, "drop_rate", &gp->drop_rate, what, id);
            if (r == MSX_OK) r = msx__plan_json_scalar(o, "scale", &gp->scale, what, id);
            break;
        default: r = msx__plan_json_scalar(o, "scale", &gp->scale, what, id); break;
        }
        if (r == MSX_OK && msx__group_validate(gp, n_models, id) != MSX_OK)
            r = msx__err(MSX_E_ARG, "%s: %s", what, msx_last_error());
    }
done:
    msx__json_free(root);
    if (r != MSX_OK) { msx_plan_free(p); return r; }
    *out = p;
    return MSX_OK;
}

MSXDEF msx_result msx_plan_load_json(const char *path, msx_plan **out) {
    void *buf;
    size_t len;
    msx_result r;
    *out = NULL;
    if ((r = msx_read_file(path, MSX_MAX_JSON_BYTES, &buf, &len)) != MSX_OK) return r;
    r = msx_plan_parse_json((const char *)buf, len, path, out);
    msx_free(buf);
    return r;
}

static void msx__plan_json_arr(msx__sb *b, const double *v, int n) {
    int i;
    msx__sb_puts(b, "[");
    for (i = 0; i < n; i++) {
        if (i) msx__sb_puts(b, ", ");
        msx__sb_json_num(b, v[i]);
    }
    msx__sb_puts(b, "]");
}

MSXDEF msx_result msx_plan_to_json(const msx_plan *p, char **json) {
    msx__sb b = {0, 0, 0, 0};
    int g;
    msx_result r;
    *json = NULL;
    if ((r = msx_plan_validate(p)) != MSX_OK) return r;
    msx__sb_printf(&b, "{\"format\": \"" MSX__PLAN_FORMAT "\", \"granularity\": %d", p->granularity);
    if (p->n_models) msx__sb_printf(&b, ", \"n_models\": %d", p->n_models);
    msx__sb_puts(&b, ",\n \"groups\": {\n");
    for (g = 0; g < p->n_groups; g++) {
        const msx_group_plan *gp = &p->groups[g];
        msx__sb_puts(&b, "  ");
        msx__sb_json_str(&b, p->ids[g]);
        msx__sb_printf(&b, ": {\"method\": \"%s\"", msx__merge_method_names[gp->method]);
        switch (gp->method) {
        case MSX_MERGE_LINEAR: msx__sb_puts(&b, ", \"weights\": "); msx__plan_json_arr(&b, gp->weights, p->n_models); break;
        case MSX_MERGE_SLERP: msx__sb_puts(&b, ", \"t\": "); msx__plan_json_arr(&b, gp->t, p->n_models); break;
        case MSX_MERGE_TIES:
            msx__sb_puts(&b, ", \"drop_rate\": ");
            msx__sb_json_num(&b, gp->drop_rate);
            /* fall through */
        default: msx__sb_puts(&b, ", \"scale\": "); msx__sb_json_num(&b, gp->scale); break;
        }
        msx__sb_puts(&b, g + 1 < p->n_groups ? "},\n" : "}\n");
    }
    msx__sb_puts(&b, " }}\n");
    if (b.oom) { msx__sb_free(&b); return msx__err(MSX_E_NOMEM, "out of memory writing a plan"); }
    *json = b.s;
    return MSX_OK;
}

MSXDEF msx_result msx_plan_save_json(const char *path, const msx_plan *p) {
    char *js;
    msx_result r = msx_plan_to_json(p, &js);
    if (r != MSX_OK) return r;
    r = msx_write_file_atomic(path, js, strlen(js));
    MSX_FREE(js);
    return r;
}

/* ---- SLERP pair selection (ref §1.4) --------------------------------------- */

MSXDEF void msx_merge_slerp_pair(const double *t, int n_models, int *v0, int *v1, double *t_out) {
    int i, a = 0, b = -1;
    double e0, e1;
    /* stable descending sort, first two: the first maximum, then the first
       maximum of the rest (equal values keep list order) */
    for (i = 1; i < n_models; i++)
        if (t[i] > t[a]) a = i;
    for (i = 0; i < n_models; i++)
        if (i != a && (b < 0 || t[i] > t[b])) b = i;
    if (b < 0) b = a; /* a single model: degenerate, callers never pass it */
    e0 = exp(t[a]);
    e1 = exp(t[b]);
    *v0 = a;
    *v1 = b;
    *t_out = e1 / (e0 + e1);
}

/* ---- per-tensor kernels ----------------------------------------------------------- */
/* Each kernel works on an element range [j0, j1) on the calling thread; the
   merger spreads ranges and tensors over threads, the public per-tensor
   functions spread blocks of large tensors. */

static void msx__linear_range(float *out, const float *const *src, const float *wf, int n_src, int64_t j0,
                              int64_t j1) {
    int64_t b0, j;
    for (b0 = j0; b0 < j1; b0 += MSX__MERGE_BLOCK) {
        int64_t e = b0 + MSX__MERGE_BLOCK < j1 ? b0 + MSX__MERGE_BLOCK : j1;
        int i;
        /* ref §1.1: w_0 x_0, then + w_i x_i in source order, float32 */
        {
            const float *x = src[0];
            float w = wf[0];
            for (j = b0; j < e; j++) out[j] = w * x[j];
        }
        for (i = 1; i < n_src; i++) {
            const float *x = src[i];
            float w = wf[i];
            for (j = b0; j < e; j++) {
                float p = w * x[j];
                out[j] = out[j] + p;
            }
        }
    }
}

/* Normalised float32 weights; 0 when Σw == 0 (the reference raises). */
static int msx__merge_linear_weights(const double *w, int n, float *wf) {
    double s = 0;
    int i;
    for (i = 0; i < n; i++) s += w[i];
    if (s == 0 || !isfinite(s)) return 0;
    for (i = 0; i < n; i++) wf[i] = (float)(w[i] / s);
    return 1;
}

static void msx__ta_range(float *out, const float *base, const float *const *ft, int n_ft, float lam, int64_t j0,
                          int64_t j1) {
    int64_t b0, j;
    float s[MSX__MERGE_BLOCK];
    for (b0 = j0; b0 < j1; b0 += MSX__MERGE_BLOCK) {
        int64_t e = b0 + MSX__MERGE_BLOCK < j1 ? b0 + MSX__MERGE_BLOCK : j1, len = e - b0;
        const float *b = base + b0, *x0 = ft[0] + b0, *x1 = ft[1] + b0;
        int i;
        /* ref §1.2: s = τ_1 + τ_2, s += τ_3 ...; out = base + fl32(λ) s */
        for (j = 0; j < len; j++) {
            float d0 = x0[j] - b[j], d1 = x1[j] - b[j];
            s[j] = d0 + d1;
        }
        for (i = 2; i < n_ft; i++) {
            const float *x = ft[i] + b0;
            for (j = 0; j < len; j++) {
                float d = x[j] - b[j];
                s[j] = s[j] + d;
            }
        }
        for (j = 0; j < len; j++) {
            float p = lam * s[j];
            out[b0 + j] = b[j] + p;
        }
    }
}

/* Σa², Σb², Σab in double over [j0, j1), 4 lanes to shorten the chains. */
static void msx__slerp_reduce(const float *v0, const float *v1, int64_t j0, int64_t j1, double acc[3]) {
    double a0[4] = {0, 0, 0, 0}, a1[4] = {0, 0, 0, 0}, d[4] = {0, 0, 0, 0};
    int64_t j = j0;
    int l;
    for (; j + 4 <= j1; j += 4)
        for (l = 0; l < 4; l++) {
            double a = v0[j + l], b = v1[j + l];
            a0[l] += a * a;
            a1[l] += b * b;
            d[l] += a * b;
        }
    for (; j < j1; j++) {
        double a = v0[j], b = v1[j];
        a0[0] += a * a;
        a1[0] += b * b;
        d[0] += a * b;
    }
    acc[0] += (a0[0] + a0[1]) + (a0[2] + a0[3]);
    acc[1] += (a1[0] + a1[1]) + (a1[2] + a1[3]);
    acc[2] += (d[0] + d[1]) + (d[2] + d[3]);
}

/* The two float32 coefficients of SLERP from the norms and the dot product. */
static void msx__slerp_coef(const double acc[3], double t, float *f0, float *f1) {
    double n0 = sqrt(acc[0]), n1 = sqrt(acc[1]), c, s0, s1;
    /* ref §1.4: a tensor with norm <= 1e-10 is left unnormalised (a zero
       tensor gives c = 0, theta = pi/2) */
    c = acc[2] / ((n0 > 1e-10 ? n0 : 1.0) * (n1 > 1e-10 ? n1 : 1.0));
    if (fabs(c) > 0.9995) { /* lerp on the un-normalised tensors */
        s0 = 1.0 - t;
        s1 = t;
    } else {
        double th = acos(c), st = sin(th);
        s0 = sin((1.0 - t) * th) / st;
        s1 = sin(t * th) / st;
    }
    *f0 = (float)s0;
    *f1 = (float)s1;
}

static void msx__slerp_combine(float *out, const float *v0, const float *v1, float f0, float f1, int64_t j0,
                               int64_t j1) {
    int64_t j;
    for (j = j0; j < j1; j++) {
        float a = f0 * v0[j], b = f1 * v1[j];
        out[j] = a + b;
    }
}

MSXDEF msx_result msx_merge_tensor_linear(float *out, const float *const *src, const double *weights, int n_src,
                                          int64_t n) {
    float wf[MSX_MAX_MODELS];
    int i, nth = msx__merge_nthreads(0), big = n >= MSX__MERGE_PAR_MIN;
    int64_t nb = (n + MSX__MERGE_PAR_MIN - 1) / MSX__MERGE_PAR_MIN, q;
    if (n_src < 1 || n_src > MSX_MAX_MODELS) return msx__err(MSX_E_ARG, "linear: %d sources (1..%d)", n_src, MSX_MAX_MODELS);
    for (i = 0; i < n_src; i++)
        if (!isfinite(weights[i]) || weights[i] < 0)
            return msx__err(MSX_E_ARG, "linear: weight %d (%g) must be a finite number >= 0", i, weights[i]);
    if (!msx__merge_linear_weights(weights, n_src, wf))
        return msx__err(MSX_E_ARG, "linear: the weights sum to 0 (the reference raises ZeroDivisionError and its "
                        "pipeline keeps the base tensor)");
    (void)nth;
    (void)big;
    MSX__MOMP("omp parallel for schedule(static) num_threads(nth) if(big)")
    for (q = 0; q < nb; q++) {
        int64_t e = (q + 1) * MSX__MERGE_PAR_MIN;
        msx__linear_range(out, src, wf, n_src, q * MSX__MERGE_PAR_MIN, e < n ? e : n);
    }
    return MSX_OK;
}

MSXDEF msx_result msx_merge_tensor_ta(float *out, const float *base, const float *const *ft, int n_ft, double scale,
                                      int64_t n) {
    int nth = msx__merge_nthreads(0), big = n >= MSX__MERGE_PAR_MIN;
    int64_t nb = (n + MSX__MERGE_PAR_MIN - 1) / MSX__MERGE_PAR_MIN, q;
    float lam = (float)scale;
    if (!isfinite(scale)) return msx__err(MSX_E_ARG, "task_arithmetic: scale is not a finite number");
    if (n_ft > MSX_MAX_MODELS - 1) return msx__err(MSX_E_ARG, "task_arithmetic: %d models (at most %d)", n_ft, MSX_MAX_MODELS - 1);
    if (n_ft < 2)
        return msx__err(MSX_E_ARG, "task_arithmetic with %d fine-tuned model(s): the reference indexes task vector [1], "
                        "raises IndexError and its pipeline keeps the base tensor", n_ft);
    (void)nth;
    (void)big;
    MSX__MOMP("omp parallel for schedule(static) num_threads(nth) if(big)")
    for (q = 0; q < nb; q++) {
        int64_t e = (q + 1) * MSX__MERGE_PAR_MIN;
        msx__ta_range(out, base, ft, n_ft, lam, q * MSX__MERGE_PAR_MIN, e < n ? e : n);
    }
    return MSX_OK;
}

MSXDEF msx_result msx_merge_tensor_slerp(float *out, const float *v0, const float *v1, double t, int64_t n) {
    double acc[3] = {0, 0, 0};
    float f0, f1;
    if (!isfinite(t) || t < 0 || t > 1) return msx__err(MSX_E_ARG, "slerp: t = %g must lie in [0, 1]", t);
    msx__slerp_reduce(v0, v1, 0, n, acc);
    msx__slerp_coef(acc, t, &f0, &f1);
    msx__slerp_combine(out, v0, v1, f0, f1, 0, n);
    return MSX_OK;
}

/* -- TIES ------------------------------------------------------------------------ */

static uint32_t msx__abs_bits(float d) {
    uint32_t u;
    memcpy(&u, &d, 4);
    return u & 0x7FFFFFFFu; /* |d| as an unsigned key: same order as the float */
}

/* Element of 0-based rank r of a[0..len) (reorders a): quickselect with a
   pseudo-random median-of-3 pivot and a three-way partition (many equal
   magnitudes, e.g. zeros, stay linear). */
static uint32_t msx__qselect_u32(uint32_t *a, int64_t len, int64_t r) {
    uint64_t rng = 0x9E3779B97F4A7C15ull ^ (uint64_t)len;
    int64_t lo = 0, hi = len - 1;
    while (hi - lo > 16) {
        int64_t span = hi - lo + 1, i, lt, gt;
        uint32_t x, y, z, piv;
        rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
        x = a[lo + (int64_t)(rng % (uint64_t)span)];
        y = a[lo + (int64_t)((rng >> 21) % (uint64_t)span)];
        z = a[lo + (int64_t)((rng >> 42) % (uint64_t)span)];
        piv = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        lt = lo;
        gt = hi;
        i = lo;
        while (i <= gt) {
            uint32_t v = a[i];
            if (v < piv) { a[i] = a[lt]; a[lt] = v; lt++; i++; }
            else if (v > piv) { a[i] = a[gt]; a[gt] = v; gt--; }
            else i++;
        }
        if (r < lt) hi = lt - 1;
        else if (r > gt) lo = gt + 1;
        else return piv;
    }
    {
        int64_t i, j;
        for (i = lo + 1; i <= hi; i++) {
            uint32_t v = a[i];
            for (j = i; j > lo && a[j - 1] > v; j--) a[j] = a[j - 1];
            a[j] = v;
        }
    }
    return a[r];
}

MSXDEF size_t msx_merge_ties_scratch_floats(int64_t n, int n_ft) {
    return (size_t)n_ft * (size_t)n + 2 * MSX__TIES_SAMPLE;
}

/* Over [j0, j1) of |x - b| (as bit keys u <= 0x7FFFFFFF), with
   l <= h <= 0x7FFFFFFF: counts u < l into *lt; if l == h counts u == l
   into *eq, else appends every l <= u <= h to c[*nc..] (*nc never passes
   j, so c of n entries suffices). The AVX2 path compares in vectors and
   packs only the rare vectors holding a candidate. */
static void msx__ties_count_gather(const float *x, const float *b, int64_t j0, int64_t j1, uint32_t l, uint32_t h,
                                   int64_t *lt, int64_t *eq, uint32_t *c, int64_t *nc) {
    int64_t j = j0, L = 0, E = 0, C = *nc;
#if defined(__AVX2__)
    {
        const __m256i absm = _mm256_set1_epi32(0x7FFFFFFF), lv = _mm256_set1_epi32((int)l), hv = _mm256_set1_epi32((int)h);
        __m256i aL = _mm256_setzero_si256(), aE = aL;
        int32_t tmp[8];
        int q;
        if (l == h) {
            for (; j + 8 <= j1; j += 8) {
                __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(b + j));
                __m256i u = _mm256_and_si256(_mm256_castps_si256(d), absm);
                aL = _mm256_sub_epi32(aL, _mm256_cmpgt_epi32(lv, u)); /* masks are -1 */
                aE = _mm256_sub_epi32(aE, _mm256_cmpeq_epi32(u, lv));
            }
        } else {
            for (; j + 8 <= j1; j += 8) {
                __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(b + j));
                __m256i u = _mm256_and_si256(_mm256_castps_si256(d), absm), mlt = _mm256_cmpgt_epi32(lv, u);
                int mk = ~_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(mlt, _mm256_cmpgt_epi32(u, hv)))) & 0xFF;
                aL = _mm256_sub_epi32(aL, mlt);
                if (mk) { /* rare with a narrow bracket: a well-predicted branch */
#if defined(__BMI2__) && defined(__POPCNT__)
                    /* left-pack: pdep spreads the mask to bytes, pext picks
                       the lane numbers of the set ones; the 8-lane store
                       stays below c + j + 8 <= c + j1 */
                    uint64_t sel = _pext_u64(0x0706050403020100ull, _pdep_u64((unsigned)mk, 0x0101010101010101ull) * 0xFF);
                    __m256i perm = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)sel));
                    _mm256_storeu_si256((__m256i *)(void *)(c + C), _mm256_permutevar8x32_epi32(u, perm));
                    C += _mm_popcnt_u32((unsigned)mk);
#else
                    _mm256_storeu_si256((__m256i *)(void *)tmp, u);
                    for (q = 0; q < 8; q++) {
                        c[C] = (uint32_t)tmp[q];
                        C += (mk >> q) & 1;
                    }
#endif
                }
            }
        }
        _mm256_storeu_si256((__m256i *)(void *)tmp, aL);
        for (q = 0; q < 8; q++) L += (uint32_t)tmp[q];
        _mm256_storeu_si256((__m256i *)(void *)tmp, aE);
        for (q = 0; q < 8; q++) E += (uint32_t)tmp[q];
    }
#endif
    for (; j < j1; j++) {
        uint32_t u = msx__abs_bits(x[j] - b[j]);
        L += u < l;
        E += u == l;
        c[C] = u; /* branch-free gather */
        C += l != h && u >= l && u <= h;
    }
    *lt += L;
    if (l == h) *eq += E;
    *nc = C;
}

#if defined(__AVX2__) && defined(__BMI2__) && defined(__POPCNT__)
#define MSX__TIES_COUNT2 1
/* msx__ties_count_gather for two models at once (base loaded once), both
   with lo < hi: the common case of the paper's setting. */
static void msx__ties_count_gather2(const float *x0, const float *x1, const float *b, int64_t j0, int64_t j1,
                                    const uint32_t *lo, const uint32_t *hi, int64_t *lt, uint32_t *c0, uint32_t *c1,
                                    int64_t *nc) {
    const __m256i absm = _mm256_set1_epi32(0x7FFFFFFF);
    const __m256i l0 = _mm256_set1_epi32((int)lo[0]), h0 = _mm256_set1_epi32((int)hi[0]);
    const __m256i l1 = _mm256_set1_epi32((int)lo[1]), h1 = _mm256_set1_epi32((int)hi[1]);
    __m256i aL0 = _mm256_setzero_si256(), aL1 = aL0;
    int64_t j = j0, C0 = nc[0], C1 = nc[1], L0 = 0, L1 = 0;
    int32_t tmp[8];
    int q;
    for (; j + 8 <= j1; j += 8) {
        __m256 bv = _mm256_loadu_ps(b + j);
        __m256i u0 = _mm256_and_si256(_mm256_castps_si256(_mm256_sub_ps(_mm256_loadu_ps(x0 + j), bv)), absm);
        __m256i u1 = _mm256_and_si256(_mm256_castps_si256(_mm256_sub_ps(_mm256_loadu_ps(x1 + j), bv)), absm);
        __m256i lt0 = _mm256_cmpgt_epi32(l0, u0), lt1 = _mm256_cmpgt_epi32(l1, u1);
        int m0 = ~_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(lt0, _mm256_cmpgt_epi32(u0, h0)))) & 0xFF;
        int m1 = ~_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(lt1, _mm256_cmpgt_epi32(u1, h1)))) & 0xFF;
        aL0 = _mm256_sub_epi32(aL0, lt0);
        aL1 = _mm256_sub_epi32(aL1, lt1);
        if (m0 | m1) { /* rare with a narrow bracket */
            uint64_t s0 = _pext_u64(0x0706050403020100ull, _pdep_u64((unsigned)m0, 0x0101010101010101ull) * 0xFF);
            uint64_t s1 = _pext_u64(0x0706050403020100ull, _pdep_u64((unsigned)m1, 0x0101010101010101ull) * 0xFF);
            _mm256_storeu_si256((__m256i *)(void *)(c0 + C0),
                                _mm256_permutevar8x32_epi32(u0, _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)s0))));
            _mm256_storeu_si256((__m256i *)(void *)(c1 + C1),
                                _mm256_permutevar8x32_epi32(u1, _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)s1))));
            C0 += _mm_popcnt_u32((unsigned)m0);
            C1 += _mm_popcnt_u32((unsigned)m1);
        }
    }
    _mm256_storeu_si256((__m256i *)(void *)tmp, aL0);
    for (q = 0; q < 8; q++) L0 += tmp[q];
    _mm256_storeu_si256((__m256i *)(void *)tmp, aL1);
    for (q = 0; q < 8; q++) L1 += tmp[q];
    for (; j < j1; j++) {
        uint32_t u0 = msx__abs_bits(x0[j] - b[j]), u1 = msx__abs_bits(x1[j] - b[j]);
        L0 += u0 < lo[0];
        L1 += u1 < lo[1];
        c0[C0] = u0;
        C0 += u0 >= lo[0] && u0 <= hi[0];
        c1[C1] = u1;
        C1 += u1 >= lo[1] && u1 <= hi[1];
    }
    lt[0] += L0;
    lt[1] += L1;
    nc[0] = C0;
    nc[1] = C1;
}
#endif

/* Element of 0-based rank r among c[0..m), all in [lo, hi): a 4096-bin
   histogram over the key range finds the bin, quickselect finishes within
   it (two light passes instead of a quickselect over all m). */
static uint32_t msx__select_in_range(uint32_t *c, int64_t m, int64_t r, uint32_t lo, uint32_t hi) {
    uint32_t hist[4096], span = hi - lo;
    int shift = 0, bin;
    int64_t j, w = 0, before = 0;
    if (m < 4096) return msx__qselect_u32(c, m, r);
    while ((span >> shift) >= 4096) shift++;
    memset(hist, 0, sizeof hist);
    for (j = 0; j < m; j++) hist[(c[j] - lo) >> shift]++;
    for (bin = 0; bin < 4096 && before + hist[bin] <= r; bin++) before += hist[bin];
    for (j = 0; j < m; j++) {
        uint32_t u = c[j];
        c[w] = u;
        w += (int64_t)(((u - lo) >> shift) == (uint32_t)bin);
    }
    return msx__qselect_u32(c, w, r - before);
}

/* k-th smallest (1-based) |x - b| key over a full copy in c[0..n). */
static uint32_t msx__select_full(const float *x, const float *b, int64_t n, int64_t k, uint32_t *c) {
    uint32_t mn = 0xFFFFFFFFu, mx = 0;
    int64_t j;
    for (j = 0; j < n; j++) {
        uint32_t u = msx__abs_bits(x[j] - b[j]);
        c[j] = u;
        mn = u < mn ? u : mn;
        mx = u > mx ? u : mx;
    }
    if (mn == mx) return mn;
    return msx__select_in_range(c, n, k - 1, mn, mx + 1);
}

/* Bracket [*lo, *hi] (bit keys, hi <= 0x7FFFFFFF) that holds the k-th
   smallest |x - b| with high probability, from a sample of n/64
   (4096..MSX__TIES_SAMPLE) values drawn in contiguous chunks: ±2.6 standard
   errors of the sample quantile, so ~1.5% of the elements fall inside and a
   miss (handled exactly by the callers) is rare. sbuf: 2 * MSX__TIES_SAMPLE. */
static void msx__ties_bracket(const float *base, const float *x, int64_t n, int64_t k, uint32_t *sbuf, uint32_t *lo,
                              uint32_t *hi) {
    const int CH = MSX__TIES_SAMPLE_CHUNK;
    int64_t S64 = n / 64 < 4096 ? 4096 : (n / 64 > MSX__TIES_SAMPLE ? MSX__TIES_SAMPLE : n / 64);
    const int NCH = (int)(S64 / CH), S = NCH * CH;
    double p = ((double)k - 0.5) / (double)n, delta = 1.3 / sqrt((double)S) + 2.0 / S;
    uint32_t *s = sbuf, *s2 = sbuf + MSX__TIES_SAMPLE, mn = 0xFFFFFFFFu, mx = 0;
    int c, q;
    int64_t rl = (int64_t)floor((p - delta) * S), rh = (int64_t)ceil((p + delta) * S);
    for (c = 0; c < NCH; c++) {
        int64_t pos = (int64_t)((double)c * (double)(n - CH) / (double)(NCH - 1));
        for (q = 0; q < CH; q++) {
            uint32_t u = msx__abs_bits(x[pos + q] - base[pos + q]);
            s[c * CH + q] = u;
            mn = u < mn ? u : mn;
            mx = u > mx ? u : mx;
        }
    }
    memcpy(s2, s, (size_t)S * sizeof *s); /* selection reorders: one copy per bound */
    *lo = rl <= 0 ? 0u : (mn == mx ? mn : msx__select_in_range(s, S, rl, mn, mx + 1));
    *hi = rh >= S - 1 ? 0x7FFFFFFFu : (mn == mx ? mn : msx__select_in_range(s2, S, rh, mn, mx + 1));
}

/* Row thresholds thr[i] = k-th smallest |ft_i - base| (1-based k >= 1) as
   |float| bit keys, on the calling thread. Small tensors: quickselect on a
   full copy. Large: a sample brackets the k-th value in [lo, hi]; one pass
   counts the elements below lo, equal to lo and equal to hi and gathers
   those strictly between; quickselect then runs on the few gathered. If the
   bracket missed, a full copy is selected on (exact either way).
   scratch: msx_merge_ties_scratch_floats(n, n_ft). */
static void msx__ties_thresholds(const float *base, const float *const *ft, int n_ft, int64_t n, int64_t k,
                                 uint32_t *scratch, uint32_t *thr) {
    int i;
    if (n <= MSX__TIES_DIRECT) {
        for (i = 0; i < n_ft; i++) thr[i] = msx__select_full(ft[i], base, n, k, scratch + (size_t)i * (size_t)n);
        return;
    }
    {
        uint32_t lo[MSX_MAX_MODELS], hi[MSX_MAX_MODELS];
        int64_t lt[MSX_MAX_MODELS], eql[MSX_MAX_MODELS], nc[MSX_MAX_MODELS], b0;
        for (i = 0; i < n_ft; i++) {
            msx__ties_bracket(base, ft[i], n, k, scratch + (size_t)n_ft * (size_t)n, &lo[i], &hi[i]);
            lt[i] = eql[i] = nc[i] = 0;
        }
#ifdef MSX__TIES_COUNT2
        if (n_ft == 2 && lo[0] != hi[0] && lo[1] != hi[1])
            msx__ties_count_gather2(ft[0], ft[1], base, 0, n, lo, hi, lt, scratch, scratch + n, nc);
        else
#endif
        for (b0 = 0; b0 < n; b0 += MSX__MERGE_BLOCK) {
            int64_t e = b0 + MSX__MERGE_BLOCK < n ? b0 + MSX__MERGE_BLOCK : n;
            for (i = 0; i < n_ft; i++)
                msx__ties_count_gather(ft[i], base, b0, e, lo[i], hi[i], &lt[i], &eql[i],
                                       scratch + (size_t)i * (size_t)n, &nc[i]);
        }
        for (i = 0; i < n_ft; i++) {
            uint32_t *c = scratch + (size_t)i * (size_t)n;
            int64_t r = k - lt[i]; /* 1-based rank within the bracket */
            if (lo[i] == hi[i] && r >= 1 && r <= eql[i]) thr[i] = lo[i];
            else if (lo[i] != hi[i] && r >= 1 && r <= nc[i])
                thr[i] = msx__select_in_range(c, nc[i], r - 1, lo[i], hi[i] == 0x7FFFFFFFu ? 0x80000000u : hi[i] + 1);
            else thr[i] = msx__select_full(ft[i], base, n, k, c);
        }
    }
}

#define MSX__TIES_BLOCK 512

/* The TIES combination (ref §1.3 steps 2-4) on [0, n) given the row
   thresholds, in blocks written branch-free so they vectorise. Elements
   whose trimmed sum is 0 get τ = 0 here; the tensor-wide sign sum is
   returned, and the positions of zero-sum elements that hold a non-zero
   trimmed value go to amb[] (capacity >= n, or NULL: count only), for
   msx__ties_fix to apply the majority sign. */
/* msx__ties_combine for two fine-tuned models (the paper's setting) in one
   pass: the same float operations in the same order (AVX2 when available). */
static void msx__ties_combine2(float *out, const float *base, const float *x0, const float *x1, float th0, float th1,
                               float lam, int64_t n, int64_t *sign_sum, uint32_t *amb, int64_t *n_amb) {
    int64_t b0, j, ss = 0, na = 0;
#if defined(__AVX2__)
    int nt = ((uintptr_t)out & 31) == 0 && n >= MSX__MERGE_PAR_MIN;
#endif
    for (b0 = 0; b0 < n; b0 += MSX__TIES_BLOCK) {
        int64_t e = n - b0 < MSX__TIES_BLOCK ? n : b0 + MSX__TIES_BLOCK;
        int z = 0;
        j = b0;
#if defined(__AVX2__)
        {
            const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), lv = _mm256_set1_ps(lam);
            const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
            const __m256 h0 = _mm256_set1_ps(th0), h1 = _mm256_set1_ps(th1);
            __m256i bs = _mm256_setzero_si256();
            int32_t tmp[8];
            int q;
            for (; j + 8 <= e; j += 8) {
                __m256 b = _mm256_loadu_ps(base + j);
                __m256 v0 = _mm256_sub_ps(_mm256_loadu_ps(x0 + j), b), v1 = _mm256_sub_ps(_mm256_loadu_ps(x1 + j), b);
                __m256 t0 = _mm256_and_ps(v0, _mm256_cmp_ps(_mm256_and_ps(v0, absm), h0, _CMP_GE_OQ));
                __m256 t1 = _mm256_and_ps(v1, _mm256_cmp_ps(_mm256_and_ps(v1, absm), h1, _CMP_GE_OQ));
                __m256 sm = _mm256_add_ps(t0, t1);
                __m256 sp = _mm256_cmp_ps(sm, zero, _CMP_GT_OQ), sn = _mm256_cmp_ps(sm, zero, _CMP_LT_OQ);
                __m256 k0 = _mm256_or_ps(_mm256_and_ps(sp, _mm256_cmp_ps(t0, zero, _CMP_GT_OQ)),
                                         _mm256_and_ps(sn, _mm256_cmp_ps(t0, zero, _CMP_LT_OQ)));
                __m256 k1 = _mm256_or_ps(_mm256_and_ps(sp, _mm256_cmp_ps(t1, zero, _CMP_GT_OQ)),
                                         _mm256_and_ps(sn, _mm256_cmp_ps(t1, zero, _CMP_LT_OQ)));
                __m256 acc = _mm256_add_ps(_mm256_add_ps(zero, _mm256_and_ps(t0, k0)), _mm256_and_ps(t1, k1));
                __m256 cnt = _mm256_add_ps(_mm256_and_ps(k0, one), _mm256_and_ps(k1, one));
                __m256 tau = _mm256_div_ps(acc, _mm256_max_ps(cnt, one));
                __m256 res = _mm256_add_ps(b, _mm256_mul_ps(lv, tau));
                /* aligned output (64-byte tensors, blocks of 512): stream it
                   past the caches, saving the read-for-ownership traffic */
                if (nt) _mm256_stream_ps(out + j, res);
                else _mm256_storeu_ps(out + j, res);
                bs = _mm256_add_epi32(_mm256_sub_epi32(bs, _mm256_castps_si256(sp)), _mm256_castps_si256(sn));
                z |= _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(sm, zero, _CMP_EQ_OQ),
                                                      _mm256_cmp_ps(t0, zero, _CMP_NEQ_UQ)));
            }
            _mm256_storeu_si256((__m256i *)(void *)tmp, bs);
            for (q = 0; q < 8; q++) ss += tmp[q];
        }
#endif
        for (; j < e; j++) {
            float b = base[j], v0 = x0[j] - b, v1 = x1[j] - b;
            float t0 = fabsf(v0) >= th0 ? v0 : 0.0f, t1 = fabsf(v1) >= th1 ? v1 : 0.0f;
            float sm = t0 + t1, acc = 0.0f, cnt = 0.0f, tau, p;
            int sg = (sm > 0) - (sm < 0);
            ss += sg;
            z |= sm == 0 && t0 != 0;
            if ((sg > 0 && t0 > 0) || (sg < 0 && t0 < 0)) { acc = acc + t0; cnt = cnt + 1.0f; }
            if ((sg > 0 && t1 > 0) || (sg < 0 && t1 < 0)) { acc = acc + t1; cnt = cnt + 1.0f; }
            tau = acc / (cnt > 1.0f ? cnt : 1.0f);
            p = lam * tau;
            out[j] = b + p;
        }
        if (z) /* rare: exact cancellation t0 = -t1 != 0 */
            for (j = b0; j < e; j++) {
                float b = base[j], v0 = x0[j] - b, v1 = x1[j] - b;
                float t0 = fabsf(v0) >= th0 ? v0 : 0.0f, t1 = fabsf(v1) >= th1 ? v1 : 0.0f;
                if (t0 + t1 == 0 && t0 != 0) {
                    if (amb) amb[na] = (uint32_t)j;
                    na++;
                }
            }
    }
#if defined(__AVX2__)
    if (nt) _mm_sfence(); /* the streamed stores are visible before the fix-up reads */
#endif
    *sign_sum = ss;
    *n_amb = na;
}

static void msx__ties_combine(float *out, const float *base, const float *const *ft, int n_ft, const float *thr,
                              int trim, float lam, int64_t n, int64_t *sign_sum, uint32_t *amb, int64_t *n_amb) {
    float tv[MSX_MAX_MODELS][MSX__TIES_BLOCK], sum[MSX__TIES_BLOCK], acc[MSX__TIES_BLOCK], cnt[MSX__TIES_BLOCK];
    int nz[MSX__TIES_BLOCK];
    int64_t b0, j, ss = 0, na = 0;
    for (b0 = 0; b0 < n; b0 += MSX__TIES_BLOCK) {
        int64_t len = n - b0 < MSX__TIES_BLOCK ? n - b0 : MSX__TIES_BLOCK;
        const float *b = base + b0;
        int i;
        for (i = 0; i < n_ft; i++) {
            const float *x = ft[i] + b0;
            float th = trim ? thr[i] : 0.0f, *d = tv[i];
            for (j = 0; j < len; j++) {
                float v = x[j] - b[j];
                d[j] = fabsf(v) >= th ? v : 0.0f; /* th = 0 keeps everything (NaN aside) */
            }
        }
        for (j = 0; j < len; j++) {
            sum[j] = tv[0][j];
            nz[j] = tv[0][j] != 0;
            acc[j] = 0.0f;
            cnt[j] = 0.0f;
        }
        for (i = 1; i < n_ft; i++)
            for (j = 0; j < len; j++) {
                sum[j] = sum[j] + tv[i][j];
                nz[j] |= tv[i][j] != 0;
            }
        for (j = 0; j < len; j++) ss += (sum[j] > 0) - (sum[j] < 0);
        {
            int64_t a = 0;
            for (j = 0; j < len; j++) a += (sum[j] == 0) & nz[j];
            if (a) /* rare: exact cancellation */
                for (j = 0; j < len; j++)
                    if (sum[j] == 0 && nz[j]) {
                        if (amb) amb[na] = (uint32_t)(b0 + j);
                        na++;
                    }
        }
        for (i = 0; i < n_ft; i++)
            for (j = 0; j < len; j++) {
                float v = tv[i][j], s = sum[j];
                /* the reference's (τ * mask).sum: a dropped entry adds ±0 */
                float kf = (float)(((s > 0) & (v > 0)) | ((s < 0) & (v < 0))), kv = v * kf;
                acc[j] = acc[j] + kv;
                cnt[j] = cnt[j] + kf;
            }
        for (j = 0; j < len; j++) {
            float c = cnt[j] > 1.0f ? cnt[j] : 1.0f, tau = acc[j] / c, p = lam * tau;
            out[b0 + j] = b[j] + p;
        }
    }
    *sign_sum = ss;
    *n_amb = na;
}

/* Zero-sum elections with a non-zero trimmed value take the tensor-wide
   majority sign `sg` (ref §1.3 step 2): recomputes the listed elements
   (amb != NULL) or scans for them. */
static void msx__ties_fix(float *out, const float *base, const float *const *ft, int n_ft, const float *thr, int trim,
                          float lam, int64_t n, int sg, const uint32_t *amb, int64_t n_amb) {
    int64_t q, total = amb ? n_amb : n;
    int i;
    for (q = 0; q < total; q++) {
        int64_t j = amb ? (int64_t)amb[q] : q;
        float tv[MSX_MAX_MODELS], s, acc = 0.0f, tau, p;
        int any = 0, cnt = 0;
        for (i = 0; i < n_ft; i++) {
            float v = ft[i][j] - base[j];
            tv[i] = (!trim || fabsf(v) >= thr[i]) ? v : 0.0f;
            any |= tv[i] != 0;
        }
        s = tv[0];
        for (i = 1; i < n_ft; i++) s = s + tv[i];
        if (s != 0 || !any) continue;
        for (i = 0; i < n_ft; i++)
            if ((sg > 0 && tv[i] > 0) || (sg < 0 && tv[i] < 0)) { acc = acc + tv[i]; cnt++; }
        tau = acc / (float)(cnt > 1 ? cnt : 1);
        p = lam * tau;
        out[j] = base[j] + p;
    }
}

/* TIES of one tensor on the calling thread; scratch as for
   msx__ties_thresholds, or NULL when nothing is trimmed. */
static void msx__ties_tensor(float *out, const float *base, const float *const *ft, int n_ft, double drop_rate,
                             float lam, int64_t n, uint32_t *scratch) {
    int64_t k = (int64_t)((double)n * drop_rate), ss = 0, amb = 0;
    float thr[MSX_MAX_MODELS];
    uint32_t *idx = scratch && n <= (int64_t)UINT32_MAX ? scratch : NULL;
    int i, trim = k > 0 && n > 0;
    if (k > n) k = n;
    if (trim) {
        uint32_t tb[MSX_MAX_MODELS];
        msx__ties_thresholds(base, ft, n_ft, n, k, scratch, tb);
        for (i = 0; i < n_ft; i++) memcpy(&thr[i], &tb[i], 4);
    } else
        for (i = 0; i < n_ft; i++) thr[i] = 0;
    if (n_ft == 2)
        msx__ties_combine2(out, base, ft[0], ft[1], trim ? thr[0] : 0.0f, trim ? thr[1] : 0.0f, lam, n, &ss, idx, &amb);
    else msx__ties_combine(out, base, ft, n_ft, thr, trim, lam, n, &ss, idx, &amb);
    if (amb > 0 && ss != 0) msx__ties_fix(out, base, ft, n_ft, thr, trim, lam, n, ss > 0 ? 1 : -1, idx, amb);
}

MSXDEF msx_result msx_merge_tensor_ties(float *out, const float *base, const float *const *ft, int n_ft,
                                        double drop_rate, double scale, int64_t n, float *scratch) {
    float *own = NULL;
    if (n_ft < 1 || n_ft > MSX_MAX_MODELS - 1) return msx__err(MSX_E_ARG, "ties: %d fine-tuned models (1..%d)", n_ft, MSX_MAX_MODELS - 1);
    if (!isfinite(drop_rate) || drop_rate < 0 || drop_rate > 1)
        return msx__err(MSX_E_ARG, "ties: drop_rate %g must lie in [0, 1]", drop_rate);
    if (!isfinite(scale)) return msx__err(MSX_E_ARG, "ties: scale is not a finite number");
    if (!scratch && (int64_t)((double)n * drop_rate) > 0) {
        own = (float *)msx__aligned_alloc(msx_merge_ties_scratch_floats(n, n_ft) * sizeof(float));
        if (!own) return msx__err(MSX_E_NOMEM, "ties: cannot allocate scratch for %lld elements", (long long)n);
        scratch = own;
    }
    msx__ties_tensor(out, base, ft, n_ft, drop_rate, (float)scale, n, (uint32_t *)(void *)scratch);
    msx__aligned_free(own);
    return MSX_OK;
}

/* ---- the merger ----------------------------------------------------------------- */

#define MSX__MERGE_CHUNK 262144 /* elements per work item of linear / TA / copy */

typedef struct msx__merge_item { int tensor; int64_t j0, j1; } msx__merge_item;

/* What a run does with each group, decided once per run. */
typedef struct msx__merge_gstate {
    int action; /* 0 copy the base, 1 + msx_merge_method */
    float wf[MSX_MAX_MODELS];
    int v0, v1;
    double t;
} msx__merge_gstate;

struct msx_merger {
    const msx_checkpoint *base;
    const msx_checkpoint *ft[MSX_MAX_MODELS];
    int n_ft, granularity, depth, n_layer_groups, n_groups;
    int *tgroup;            /* per base tensor: group index or -1 */
    int *group_tensors;     /* tensors per group */
    int *order;             /* tensor indices, largest first */
    const float **srcp;     /* per tensor: base, ft_1..ft_N data */
    msx__merge_item *items; /* work list of a run */
    int n_items_cap;
    msx__merge_gstate *gs;  /* per group */
    int64_t max_numel;
    uint32_t *scratch;      /* TIES, per thread */
    size_t scratch_per_thread;
    int scratch_threads;
    msx_merge_options opt;
};

/* Orders tensor indices by size, largest first (ties by index): a shell
   sort, so no global comparator context is needed. */
static void msx__merge_sort_order(int *ord, int n, const msx_checkpoint *c) {
    static const int gaps[] = {1750, 701, 301, 132, 57, 23, 10, 4, 1};
    size_t gi;
    for (gi = 0; gi < sizeof gaps / sizeof gaps[0]; gi++) {
        int gap = gaps[gi], i, j;
        for (i = gap; i < n; i++) {
            int v = ord[i];
            int64_t sv = c->tensors[v].numel;
            for (j = i; j >= gap; j -= gap) {
                int u = ord[j - gap];
                int64_t su = c->tensors[u].numel;
                if (su > sv || (su == sv && u < v)) break;
                ord[j] = u;
            }
            ord[j] = v;
        }
    }
}

MSXDEF msx_result msx_merger_create(const msx_checkpoint *base, const msx_checkpoint *const *ft, int n_ft,
                                    int granularity, msx_merger **out) {
    msx_merger *m;
    int i, k, max_block = -1;
    int64_t n_items = 0;
    msx_result r = MSX_OK;
    *out = NULL;
    if (!base || !ft) return msx__err(MSX_E_ARG, "merger: base or fine-tuned list is NULL");
    if (n_ft < 1 || n_ft > MSX_MAX_MODELS - 1)
        return msx__err(MSX_E_ARG, "merger: %d fine-tuned models (1..%d; raise MSX_MAX_MODELS for more)", n_ft,
                        MSX_MAX_MODELS - 1);
    if (granularity < 1) return msx__err(MSX_E_ARG, "merger: granularity %d must be >= 1", granularity);
    if (base->n == 0) return msx__err(MSX_E_ARG, "merger: the base model has no tensors");
    m = (msx_merger *)msx__calloc(1, sizeof *m);
    if (!m) return msx__err(MSX_E_NOMEM, "out of memory");
    m->base = base;
    m->n_ft = n_ft;
    m->granularity = granularity;
    m->tgroup = (int *)msx__calloc((size_t)base->n, sizeof(int));
    m->order = (int *)msx__calloc((size_t)base->n, sizeof(int));
    m->srcp = (const float **)msx__calloc((size_t)base->n * (size_t)(n_ft + 1), sizeof(float *));
    if (!m->tgroup || !m->order || !m->srcp) { msx_merger_free(m); return msx__err(MSX_E_NOMEM, "out of memory"); }
    /* classes first, the depth comes from the largest block index */
    for (i = 0; i < base->n && r == MSX_OK; i++) {
        const msx_tensor *t = &base->tensors[i];
        int block = 0, cls = msx__merge_key_class(t->name, &block);
        if (cls == -2)
            r = msx__err(MSX_E_KEY_MISMATCH, "%s: tensor '%s' is not a SAM state-dict key (no merge group); "
                         "merging needs the segment_anything key names", base->path ? base->path : "base", t->name);
        else if (t->dtype != MSX_F32)
            r = msx__err(MSX_E_UNSUPPORTED, "%s: tensor '%s' is %s; merging needs float32 (load with the checkpoint "
                         "loader, which converts)", base->path ? base->path : "base", t->name, msx_dtype_name(t->dtype));
        if (cls == 0 && block > max_block) max_block = block;
        m->tgroup[i] = cls == 0 ? -100 - block : cls; /* blocks resolved below */
        if (t->numel > m->max_numel) m->max_numel = t->numel;
        m->srcp[(size_t)i * (size_t)(n_ft + 1)] = (const float *)t->data;
        m->order[i] = i;
        n_items += (t->numel + MSX__MERGE_CHUNK - 1) / MSX__MERGE_CHUNK + 1;
    }
    if (r == MSX_OK && max_block < 0)
        r = msx__err(MSX_E_KEY_MISMATCH, "%s: no image_encoder.blocks.* tensors: not a SAM checkpoint",
                     base->path ? base->path : "base");
    for (k = 0; k < n_ft && r == MSX_OK; k++) {
        const msx_checkpoint *f = ft[k];
        const char *fn = f && f->path ? f->path : "fine-tuned model";
        m->ft[k] = f;
        if (!f) { r = msx__err(MSX_E_ARG, "merger: fine-tuned model %d is NULL", k + 1); break; }
        for (i = 0; i < base->n; i++) {
            const msx_tensor *bt = &base->tensors[i], *t = msx_ckpt_find(f, bt->name);
            int d;
            if (!t) {
                r = msx__err(MSX_E_KEY_MISMATCH, "%s (model %d) has no tensor '%s' that the base has: models to merge "
                             "need identical key sets", fn, k + 1, bt->name);
                break;
            }
            if (t->dtype != MSX_F32) {
                r = msx__err(MSX_E_UNSUPPORTED, "%s (model %d): tensor '%s' is %s; merging needs float32", fn, k + 1,
                             t->name, msx_dtype_name(t->dtype));
                break;
            }
            d = 0;
            if (t->ndim == bt->ndim)
                while (d < t->ndim && t->shape[d] == bt->shape[d]) d++;
            if (t->ndim != bt->ndim || d < t->ndim || t->numel != bt->numel) {
                char a[96], b[96];
                int q, la = 0, lb = 0;
                a[0] = b[0] = 0;
                for (q = 0; q < t->ndim && la < 80; q++) la += snprintf(a + la, sizeof a - (size_t)la, q ? ",%lld" : "%lld", (long long)t->shape[q]);
                for (q = 0; q < bt->ndim && lb < 80; q++) lb += snprintf(b + lb, sizeof b - (size_t)lb, q ? ",%lld" : "%lld", (long long)bt->shape[q]);
                r = msx__err(MSX_E_SHAPE, "%s (model %d): tensor '%s' has shape [%s] but the base has [%s]: models to "
                             "merge need identical shapes (same architecture)", fn, k + 1, t->name, a, b);
                break;
            }
            m->srcp[(size_t)i * (size_t)(n_ft + 1) + (size_t)k + 1] = (const float *)t->data;
        }
        if (r == MSX_OK && f->n != base->n) {
            for (i = 0; i < f->n; i++)
                if (!msx_ckpt_find(base, f->tensors[i].name)) break;
            r = msx__err(MSX_E_KEY_MISMATCH, "%s (model %d) has %d tensors, the base %d%s%s%s: models to merge need "
                         "identical key sets", fn, k + 1, f->n, base->n, i < f->n ? " (e.g. '" : "",
                         i < f->n ? f->tensors[i].name : "", i < f->n ? "' is not in the base)" : "");
        }
    }
    if (r == MSX_OK && n_items > INT32_MAX) r = msx__err(MSX_E_LIMIT, "merger: model too large");
    if (r != MSX_OK) { msx_merger_free(m); return r; }
    m->depth = max_block + 1;
    m->n_layer_groups = (m->depth + granularity - 1) / granularity;
    m->n_groups = m->n_layer_groups + 13;
    m->n_items_cap = (int)n_items;
    m->group_tensors = (int *)msx__calloc((size_t)m->n_groups, sizeof(int));
    m->gs = (msx__merge_gstate *)msx__calloc((size_t)m->n_groups, sizeof *m->gs);
    m->items = (msx__merge_item *)msx__calloc((size_t)n_items, sizeof *m->items);
    if (!m->group_tensors || !m->gs || !m->items) { msx_merger_free(m); return msx__err(MSX_E_NOMEM, "merger: out of memory"); }
    for (i = 0; i < base->n; i++) {
        int c = m->tgroup[i];
        if (c <= -100) c = (-100 - c) / granularity;
        else if (c > 0) c = m->n_layer_groups + c - 1;
        m->tgroup[i] = c;
        if (c >= 0) m->group_tensors[c]++;
    }
    msx__merge_sort_order(m->order, base->n, base);
    /* TIES scratch, one region per thread (64-byte multiples) */
    m->scratch_per_thread = (msx_merge_ties_scratch_floats(m->max_numel, n_ft) + 15) & ~(size_t)15;
    *out = m;
    return MSX_OK;
}

MSXDEF void msx_merger_free(msx_merger *m) {
    if (!m) return;
    MSX_FREE(m->tgroup);
    MSX_FREE(m->group_tensors);
    MSX_FREE(m->order);
    MSX_FREE((void *)m->srcp);
    MSX_FREE(m->items);
    MSX_FREE(m->gs);
    msx__aligned_free(m->scratch);
    MSX_FREE(m);
}

MSXDEF void msx_merger_set_options(msx_merger *m, const msx_merge_options *opt) {
    if (opt) m->opt = *opt;
    else memset(&m->opt, 0, sizeof m->opt);
}
MSXDEF int msx_merger_depth(const msx_merger *m) { return m->depth; }
MSXDEF int msx_merger_n_models(const msx_merger *m) { return m->n_ft + 1; }
MSXDEF int msx_merger_tensor_group(const msx_merger *m, int i) {
    return i >= 0 && i < m->base->n ? m->tgroup[i] : -1;
}
MSXDEF msx_result msx_merger_plan_create(const msx_merger *m, msx_plan **out) {
    return msx_plan_create(m->depth, m->n_ft + 1, m->granularity, out);
}

static MSX__PRINTF(2, 3) void msx__merge_warn(msx_merge_report *rep, const char *fmt, ...) {
    va_list ap;
    if (!rep) return;
    if (rep->n_warnings < MSX_MERGE_MAX_WARNINGS) {
        va_start(ap, fmt);
        vsnprintf(rep->warnings[rep->n_warnings], sizeof rep->warnings[0], fmt, ap);
        va_end(ap);
    }
    rep->n_warnings++;
}

/* One work item on the calling thread. */
static void msx__merge_item_run(const msx_merger *m, const msx_plan *plan, msx_checkpoint *out,
                                const msx__merge_item *it, uint32_t *scratch) {
    int i = it->tensor, g = m->tgroup[i];
    const float *const *src = m->srcp + (size_t)i * (size_t)(m->n_ft + 1);
    float *o = (float *)out->tensors[i].data;
    int64_t n = m->base->tensors[i].numel;
    const msx__merge_gstate *s = g >= 0 ? &m->gs[g] : NULL;
    const msx_group_plan *gp = g >= 0 ? &plan->groups[g] : NULL;
    switch (s ? s->action : 0) {
    case 1 + MSX_MERGE_LINEAR: msx__linear_range(o, src, s->wf, m->n_ft + 1, it->j0, it->j1); break;
    case 1 + MSX_MERGE_TASK_ARITHMETIC: msx__ta_range(o, src[0], src + 1, m->n_ft, (float)gp->scale, it->j0, it->j1); break;
    case 1 + MSX_MERGE_TIES: msx__ties_tensor(o, src[0], src + 1, m->n_ft, gp->drop_rate, (float)gp->scale, n, scratch); break;
    case 1 + MSX_MERGE_SLERP: {
        double acc[3] = {0, 0, 0};
        float f0, f1;
        msx__slerp_reduce(src[s->v0], src[s->v1], 0, n, acc);
        msx__slerp_coef(acc, s->t, &f0, &f1);
        msx__slerp_combine(o, src[s->v0], src[s->v1], f0, f1, 0, n);
        break;
    }
    default: memcpy(o + it->j0, src[0] + it->j0, (size_t)(it->j1 - it->j0) * sizeof(float)); break;
    }
}

MSXDEF msx_result msx_merger_run(msx_merger *m, const msx_plan *plan, msx_checkpoint *out, msx_merge_report *report) {
    const msx_checkpoint *base = m->base;
    double t0 = msx_time_now();
    int i, g, q, nth = msx__merge_nthreads(m->opt.n_threads), n_models = m->n_ft + 1, n_items = 0, pass;
    int need_scratch = 0;
    msx_result r;
    if (report) memset(report, 0, sizeof *report);
    if (!plan || !out) return msx__err(MSX_E_ARG, "merge: plan or output is NULL");
    if ((r = msx_plan_validate(plan)) != MSX_OK) return r;
    if (plan->granularity != m->granularity || plan->n_layer_groups != m->n_layer_groups)
        return msx__err(MSX_E_ARG, "merge: the plan has granularity %d and %d layer groups, the models need "
                        "granularity %d -> %d layer groups (encoder depth %d)", plan->granularity,
                        plan->n_layer_groups, m->granularity, m->n_layer_groups, m->depth);
    if (plan->n_models != 0 && plan->n_models != n_models)
        return msx__err(MSX_E_ARG, "merge: the plan is for %d models (base + fine-tuned), the merger has %d",
                        plan->n_models, n_models);
    if (out->n != base->n) return msx__err(MSX_E_SHAPE, "merge: the output has %d tensors, the base %d (make it with msx_ckpt_clone(base))", out->n, base->n);
    for (i = 0; i < base->n; i++) {
        const msx_tensor *o = &out->tensors[i], *b = &base->tensors[i];
        if (o->numel != b->numel || o->dtype != MSX_F32 || strcmp(o->name, b->name))
            return msx__err(MSX_E_SHAPE, "merge: output tensor %d ('%s') does not match the base's '%s' (make the "
                            "output with msx_ckpt_clone(base))", i, o->name, b->name);
        if (o->data == b->data) return msx__err(MSX_E_ARG, "merge: the output shares its data with the base");
    }
    /* per group, up front: the reference's keep-the-base cases (strict
       mode fails before anything is written), weights, the SLERP pair */
    for (g = 0; g < m->n_groups; g++) {
        const msx_group_plan *gp = &plan->groups[g];
        msx__merge_gstate *s = &m->gs[g];
        const char *why = NULL;
        s->action = 1 + (int)gp->method;
        if (gp->method == MSX_MERGE_LINEAR && !msx__merge_linear_weights(gp->weights, n_models, s->wf))
            why = "linear weights sum to 0 (the reference raises ZeroDivisionError and keeps the base)";
        else if (gp->method == MSX_MERGE_TASK_ARITHMETIC && m->n_ft < 2)
            why = "task_arithmetic with one fine-tuned model (the reference raises IndexError and keeps the base)";
        else if (gp->method == MSX_MERGE_SLERP) msx_merge_slerp_pair(gp->t, n_models, &s->v0, &s->v1, &s->t);
        if (!why) continue;
        if (m->opt.strict) return msx__err(MSX_E_ARG, "merge: group %s: %s; strict mode refuses it", plan->ids[g], why);
        s->action = 0;
        msx__merge_warn(report, "group %s: %s: %d tensors kept the base", plan->ids[g], why, m->group_tensors[g]);
    }
    /* work list: whole tensors for TIES / SLERP (largest first), then
       chunks of the streaming ones; threads take items dynamically */
    for (pass = 0; pass < 2; pass++)
        for (q = 0; q < base->n; q++) {
            int ti = m->order[q], a = m->tgroup[ti] >= 0 ? m->gs[m->tgroup[ti]].action : 0;
            int whole = a == 1 + MSX_MERGE_TIES || a == 1 + MSX_MERGE_SLERP;
            int64_t n = base->tensors[ti].numel, j0;
            if (whole != (pass == 0)) continue;
            if (whole || n == 0) {
                m->items[n_items].tensor = ti;
                m->items[n_items].j0 = 0;
                m->items[n_items++].j1 = n;
                continue;
            }
            for (j0 = 0; j0 < n; j0 += MSX__MERGE_CHUNK) {
                m->items[n_items].tensor = ti;
                m->items[n_items].j0 = j0;
                m->items[n_items++].j1 = j0 + MSX__MERGE_CHUNK < n ? j0 + MSX__MERGE_CHUNK : n;
            }
        }
    for (g = 0; g < m->n_groups && !need_scratch; g++) need_scratch = m->gs[g].action == 1 + MSX_MERGE_TIES;
    if (need_scratch && nth > m->scratch_threads) {
        /* first run (or more threads than before): the only allocation */
        uint32_t *s = (uint32_t *)msx__aligned_alloc(m->scratch_per_thread * (size_t)nth * 4);
        if (!s) return msx__err(MSX_E_NOMEM, "merge: cannot allocate %lu bytes of TIES scratch",
                                (unsigned long)(m->scratch_per_thread * (size_t)nth * 4));
        msx__aligned_free(m->scratch);
        m->scratch = s;
        m->scratch_threads = nth;
    }
    {
        const msx_merger *cm = m;
        uint32_t *scr = m->scratch;
        size_t per = m->scratch_per_thread;
        msx__merge_item *items = m->items;
        (void)per;
        MSX__MOMP("omp parallel num_threads(nth) if(n_items > 1)")
        {
            int tid = 0, it;
#ifdef _OPENMP
            tid = omp_get_thread_num();
#endif
            MSX__MOMP("omp for schedule(dynamic, 1)")
            for (it = 0; it < n_items; it++) msx__merge_item_run(cm, plan, out, &items[it], scr ? scr + per * (size_t)tid : NULL);
        }
    }
    if (report) {
        for (i = 0; i < base->n; i++) {
            g = m->tgroup[i];
            report->n_elements += base->tensors[i].numel;
            if (g >= 0 && m->gs[g].action) report->n_tensors_merged++;
            else if (g >= 0) report->n_tensors_kept_base++;
        }
        report->seconds = msx_time_now() - t0;
    }
    return MSX_OK;
}

/* ---- export ------------------------------------------------------------------------ */

MSXDEF msx_result msx_merge_export(const char *path, const msx_checkpoint *merged, const msx_plan *plan) {
    char *js = NULL, *pp;
    const char *meta[4];
    size_t n = strlen(path), suf = strlen(".safetensors");
    int n_meta = 1, i;
    msx_result r;
    if (!merged) return msx__err(MSX_E_ARG, "export: no model");
    for (i = 0; i < merged->n; i++)
        if (merged->tensors[i].dtype != MSX_F32)
            return msx__err(MSX_E_UNSUPPORTED, "export %s: tensor '%s' is %s, expected float32", path,
                            merged->tensors[i].name, msx_dtype_name(merged->tensors[i].dtype));
    if (plan && (r = msx_plan_to_json(plan, &js)) != MSX_OK) return r;
    meta[0] = "format";
    meta[1] = "pt"; /* what torch's safetensors writer records */
    if (js) { meta[2] = "medsamix_plan"; meta[3] = js; n_meta = 2; }
    r = msx_safetensors_save(path, merged, meta, n_meta);
    if (r == MSX_OK && js) {
        pp = (char *)MSX_MALLOC(n + 16);
        if (!pp) r = msx__err(MSX_E_NOMEM, "out of memory");
        else {
            size_t base = (n >= suf && !strcmp(path + n - suf, ".safetensors")) ? n - suf : n;
            memcpy(pp, path, base);
            strcpy(pp + base, ".plan.json");
            r = msx_write_file_atomic(pp, js, strlen(js));
            MSX_FREE(pp);
        }
    }
    MSX_FREE(js);
    return r;
}

#if defined(__clang__)
#pragma float_control(pop)
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif
