/* ======================================================================== */
/* IMPLEMENTATION: opt. Owns search spaces, the random-forest surrogate,     */
/* EI / log-EI, ParEGO, the Pareto archive, hypervolume and the ask/tell     */
/* optimiser with its JSON state. Section numbers (§) refer to              */
/* /work/shared/docs/optimizer-reference.md.                                 */
/* ======================================================================== */

/* ---- small helpers ----------------------------------------------------------- */

static uint64_t msx__opt_mix(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
/* Independent stream per (seed, a, b): every random decision of an ask is
   derived from (seed, number of told results, slot), which is what makes
   replay and resume exact. */
static uint64_t msx__opt_seed3(uint64_t seed, uint64_t a, uint64_t b) {
    return msx__opt_mix(msx__opt_mix(msx__opt_mix(seed) ^ a) ^ (b * 0xD1B54A32D192ED03ull));
}

/* Copies the current error message (to wrap it in a new one). */
static void msx__opt_copy_err(char *dst, size_t n) {
    const char *e = msx_last_error();
    size_t l = strlen(e);
    if (l >= n) l = n - 1;
    memcpy(dst, e, l);
    dst[l] = 0;
}

typedef struct msx__opt_pair { double v; int i; } msx__opt_pair;
static int msx__opt_cmp_asc(const void *a, const void *b) {
    const msx__opt_pair *x = (const msx__opt_pair *)a, *y = (const msx__opt_pair *)b;
    if (x->v < y->v) return -1;
    if (x->v > y->v) return 1;
    return (x->i > y->i) - (x->i < y->i);
}
static int msx__opt_cmp_desc(const void *a, const void *b) {
    const msx__opt_pair *x = (const msx__opt_pair *)a, *y = (const msx__opt_pair *)b;
    if (x->v > y->v) return -1;
    if (x->v < y->v) return 1;
    return (x->i > y->i) - (x->i < y->i);
}

/* ---- search spaces (§2) ------------------------------------------------------ */

typedef struct msx__oparam {
    char *name;
    msx_param_type type;
    double lo, hi;
    int log;
    int k;          /* categorical: number of choices */
    char **choices; /* k names (entries may be NULL) or NULL */
    int parent;     /* -1: unconditional */
    int pval;       /* active iff config[parent] == pval */
} msx__oparam;

struct msx_space {
    msx__oparam *p;
    int n, cap;
};

MSXDEF msx_space *msx_space_new(void) {
    msx_space *s = (msx_space *)msx__calloc(1, sizeof *s);
    if (!s) msx__err(MSX_E_NOMEM, "msx_space_new: out of memory");
    return s;
}
static void msx__sp_free_param(msx__oparam *p) {
    int c;
    MSX_FREE(p->name);
    if (p->choices) {
        for (c = 0; c < p->k; c++) MSX_FREE(p->choices[c]);
        MSX_FREE(p->choices);
    }
}
MSXDEF void msx_space_free(msx_space *s) {
    int i;
    if (!s) return;
    for (i = 0; i < s->n; i++) msx__sp_free_param(&s->p[i]);
    MSX_FREE(s->p);
    MSX_FREE(s);
}
MSXDEF int msx_space_dim(const msx_space *s) { return s ? s->n : 0; }
MSXDEF int msx_space_find(const msx_space *s, const char *name) {
    int i;
    if (!s || !name) return -1;
    for (i = 0; i < s->n; i++)
        if (!strcmp(s->p[i].name, name)) return i;
    return -1;
}
MSXDEF const char *msx_space_name(const msx_space *s, int i) {
    return s && i >= 0 && i < s->n ? s->p[i].name : NULL;
}
MSXDEF msx_param_type msx_space_type(const msx_space *s, int i) {
    return s && i >= 0 && i < s->n ? s->p[i].type : MSX_PARAM_FLOAT;
}
MSXDEF const char *msx_space_choice(const msx_space *s, int i, int c) {
    if (!s || i < 0 || i >= s->n || s->p[i].type != MSX_PARAM_CAT || !s->p[i].choices || c < 0 || c >= s->p[i].k) return NULL;
    return s->p[i].choices[c];
}

/* Validates the name and appends a zeroed parameter; returns its index or -1. */
static int msx__sp_push(msx_space *s, const char *name, const char *what) {
    msx__oparam *p;
    if (!s) { msx__err(MSX_E_ARG, "msx_space_add_%s: space is NULL", what); return -1; }
    if (!name || !*name) { msx__err(MSX_E_ARG, "msx_space_add_%s: parameter name is empty", what); return -1; }
    if (msx_space_find(s, name) >= 0) {
        msx__err(MSX_E_ARG, "msx_space_add_%s: duplicate parameter name '%s'", what, name);
        return -1;
    }
    if (s->n == s->cap) {
        int nc = s->cap ? 2 * s->cap : 16;
        msx__oparam *q = (msx__oparam *)MSX_REALLOC(s->p, (size_t)nc * sizeof *q);
        if (!q) { msx__err(MSX_E_NOMEM, "msx_space_add_%s: out of memory", what); return -1; }
        s->p = q;
        s->cap = nc;
    }
    p = &s->p[s->n];
    memset(p, 0, sizeof *p);
    p->name = msx__strdup(name);
    if (!p->name) { msx__err(MSX_E_NOMEM, "msx_space_add_%s: out of memory", what); return -1; }
    p->parent = -1;
    p->pval = -1;
    return s->n++;
}
MSXDEF int msx_space_add_float(msx_space *s, const char *name, double lo, double hi, int log) {
    int i;
    if (!isfinite(lo) || !isfinite(hi) || !(lo < hi)) {
        msx__err(MSX_E_ARG, "float '%s': bounds [%g, %g] are inverted, empty or not finite (need lo < hi)", name ? name : "?", lo, hi);
        return -1;
    }
    if (log && lo <= 0) {
        msx__err(MSX_E_ARG, "float '%s': log scale needs lo > 0 (got %g)", name ? name : "?", lo);
        return -1;
    }
    i = msx__sp_push(s, name, "float");
    if (i < 0) return -1;
    s->p[i].type = MSX_PARAM_FLOAT;
    s->p[i].lo = lo;
    s->p[i].hi = hi;
    s->p[i].log = log ? 1 : 0;
    return i;
}
MSXDEF int msx_space_add_int(msx_space *s, const char *name, int lo, int hi, int log) {
    int i;
    if (lo > hi) {
        msx__err(MSX_E_ARG, "int '%s': bounds [%d, %d] are inverted (need lo <= hi)", name ? name : "?", lo, hi);
        return -1;
    }
    if (log && lo < 1) {
        msx__err(MSX_E_ARG, "int '%s': log scale needs lo >= 1 (got %d)", name ? name : "?", lo);
        return -1;
    }
    i = msx__sp_push(s, name, "int");
    if (i < 0) return -1;
    s->p[i].type = MSX_PARAM_INT;
    s->p[i].lo = lo;
    s->p[i].hi = hi;
    s->p[i].log = log ? 1 : 0;
    return i;
}
MSXDEF int msx_space_add_cat(msx_space *s, const char *name, int n, const char *const *choices) {
    int i, c;
    if (n < 1 || n > MSX_SPACE_MAX_CHOICES) {
        msx__err(MSX_E_ARG, "categorical '%s': %d choices (need 1..%d)", name ? name : "?", n, MSX_SPACE_MAX_CHOICES);
        return -1;
    }
    i = msx__sp_push(s, name, "cat");
    if (i < 0) return -1;
    s->p[i].type = MSX_PARAM_CAT;
    s->p[i].k = n;
    s->p[i].lo = 0;
    s->p[i].hi = n - 1;
    if (choices) {
        s->p[i].choices = (char **)msx__calloc((size_t)n, sizeof(char *));
        if (!s->p[i].choices) goto oom;
        for (c = 0; c < n; c++)
            if (choices[c] && !(s->p[i].choices[c] = msx__strdup(choices[c]))) goto oom;
    }
    return i;
oom:
    msx__sp_free_param(&s->p[i]);
    s->n--;
    msx__err(MSX_E_NOMEM, "categorical '%s': out of memory", name);
    return -1;
}
MSXDEF msx_result msx_space_add_condition(msx_space *s, int child, int parent, int value) {
    int j;
    if (!s) return msx__err(MSX_E_ARG, "msx_space_add_condition: space is NULL");
    if (child < 0 || child >= s->n)
        return msx__err(MSX_E_ARG, "condition: child index %d is not a parameter (the space has %d)", child, s->n);
    if (parent < 0 || parent >= s->n)
        return msx__err(MSX_E_ARG, "condition on '%s': unknown parent index %d (the space has %d parameters; add the parent first)",
                        s->p[child].name, parent, s->n);
    if (s->p[parent].type != MSX_PARAM_CAT)
        return msx__err(MSX_E_ARG, "condition on '%s': parent '%s' is not categorical", s->p[child].name, s->p[parent].name);
    if (value < 0 || value >= s->p[parent].k)
        return msx__err(MSX_E_ARG, "condition on '%s': value %d is not a choice of '%s' (0..%d)", s->p[child].name, value,
                        s->p[parent].name, s->p[parent].k - 1);
    if (s->p[child].parent >= 0)
        return msx__err(MSX_E_ARG, "condition on '%s': it already depends on '%s' (one condition per parameter)",
                        s->p[child].name, s->p[s->p[child].parent].name);
    for (j = parent; j >= 0; j = s->p[j].parent)
        if (j == child)
            return msx__err(MSX_E_ARG, "condition '%s' -> '%s' would create a cycle", s->p[parent].name, s->p[child].name);
    s->p[child].parent = parent;
    s->p[child].pval = value;
    return MSX_OK;
}

/* Active iff every condition up the chain holds (a NaN parent fails). */
static int msx__sp_active(const msx_space *s, const double *c, int i) {
    int guard = 0;
    while (s->p[i].parent >= 0 && guard++ <= s->n) {
        int q = s->p[i].parent;
        if (!(c[q] == (double)s->p[i].pval)) return 0;
        i = q;
    }
    return 1;
}
MSXDEF int msx_space_is_active(const msx_space *s, const double *config, int i) {
    if (!s || !config || i < 0 || i >= s->n) return 0;
    return msx__sp_active(s, config, i) && !(config[i] != config[i]);
}

static double msx__sp_to_unit1(const msx__oparam *p, double v) {
    switch (p->type) {
    case MSX_PARAM_FLOAT:
        if (p->log) return (log(v) - log(p->lo)) / (log(p->hi) - log(p->lo));
        return (v - p->lo) / (p->hi - p->lo);
    case MSX_PARAM_INT:
        if (p->hi == p->lo) return 0.5;
        if (p->log) return (log(v + 0.5) - log(p->lo)) / (log(p->hi + 1) - log(p->lo));
        return (v - p->lo + 0.5) / (p->hi - p->lo + 1);
    default:
        return (v + 0.5) / p->k;
    }
}
static double msx__sp_from_unit1(const msx__oparam *p, double u) {
    double v;
    if (!(u >= 0)) u = 0;
    if (u > 1) u = 1;
    switch (p->type) {
    case MSX_PARAM_FLOAT:
        v = p->log ? exp(log(p->lo) + u * (log(p->hi) - log(p->lo))) : p->lo + u * (p->hi - p->lo);
        break;
    case MSX_PARAM_INT:
        v = p->log ? floor(exp(log(p->lo) + u * (log(p->hi + 1) - log(p->lo)))) : p->lo + floor(u * (p->hi - p->lo + 1));
        break;
    default:
        v = floor(u * p->k);
        break;
    }
    if (v < p->lo) v = p->lo;
    if (v > p->hi) v = p->hi;
    return v;
}
static double msx__sp_default1(const msx__oparam *p) {
    return p->type == MSX_PARAM_CAT ? 0.0 : msx__sp_from_unit1(p, 0.5);
}
MSXDEF void msx_space_to_unit(const msx_space *s, const double *c, double *u) {
    int i;
    for (i = 0; i < s->n; i++) u[i] = c[i] != c[i] ? NAN : msx__sp_to_unit1(&s->p[i], c[i]);
}
MSXDEF void msx_space_from_unit(const msx_space *s, const double *u, double *c) {
    int i;
    for (i = 0; i < s->n; i++) c[i] = u[i] != u[i] ? NAN : msx__sp_from_unit1(&s->p[i], u[i]);
    for (i = 0; i < s->n; i++)
        if (!msx__sp_active(s, c, i)) c[i] = NAN;
}
/* In-place masking is safe in any order: a parent masked to NaN makes every
   descendant fail its chain check too. */
static void msx__sp_mask(const msx_space *s, double *c) {
    int i;
    for (i = 0; i < s->n; i++)
        if (!msx__sp_active(s, c, i)) c[i] = NAN;
}
MSXDEF void msx_space_sample(const msx_space *s, msx_rng *rng, double *c) {
    int i;
    for (i = 0; i < s->n; i++) c[i] = msx__sp_from_unit1(&s->p[i], msx_rng_uniform(rng));
    msx__sp_mask(s, c);
}
MSXDEF msx_result msx_space_canonicalize(const msx_space *s, const double *in, double *out) {
    int i;
    if (!s || !in || !out) return msx__err(MSX_E_ARG, "msx_space_canonicalize: NULL argument");
    if (s->n == 0) return msx__err(MSX_E_ARG, "the search space is empty: add parameters first");
    if (out != in) memcpy(out, in, (size_t)s->n * sizeof *out);
    for (i = 0; i < s->n; i++) {
        const msx__oparam *p = &s->p[i];
        double v;
        if (!msx__sp_active(s, out, i)) { out[i] = NAN; continue; }
        v = out[i];
        if (!isfinite(v))
            return msx__err(MSX_E_ARG, "parameter '%s' is active but its value is %s (inactive values must be NAN, active ones finite)",
                            p->name, v != v ? "NaN" : "infinite");
        if (p->type == MSX_PARAM_FLOAT) {
            double slack = 1e-9 * (p->hi - p->lo);
            if (v < p->lo - slack || v > p->hi + slack)
                return msx__err(MSX_E_ARG, "parameter '%s' = %.17g is outside [%g, %g]", p->name, v, p->lo, p->hi);
            if (v < p->lo) v = p->lo;
            if (v > p->hi) v = p->hi;
        } else {
            if (v != floor(v) || v < p->lo || v > p->hi)
                return msx__err(MSX_E_ARG, "parameter '%s' = %.17g is not an integer in [%g, %g]", p->name, v, p->lo, p->hi);
        }
        out[i] = v == 0 ? 0.0 : v; /* no -0: configs are compared bitwise via hashes */
    }
    return MSX_OK;
}
/* Random-forest input (§2.2): unit value, inactive floats/ints -1, inactive
   categoricals k (an extra category). */
static double msx__sp_enc1(const msx__oparam *p, double v) {
    if (v != v) return p->type == MSX_PARAM_CAT ? (double)p->k : -1.0;
    return p->type == MSX_PARAM_CAT ? v : msx__sp_to_unit1(p, v);
}
static void msx__sp_encode(const msx_space *s, const double *c, double *e) {
    int i;
    for (i = 0; i < s->n; i++) {
        const msx__oparam *p = &s->p[i];
        if (c[i] != c[i]) e[i] = p->type == MSX_PARAM_CAT ? (double)p->k : -1.0;
        else e[i] = p->type == MSX_PARAM_CAT ? c[i] : msx__sp_to_unit1(p, c[i]);
    }
}
static msx_space *msx__sp_clone(const msx_space *s) {
    msx_space *t = msx_space_new();
    int i, c;
    if (!t) return NULL;
    for (i = 0; i < s->n; i++) {
        const msx__oparam *p = &s->p[i];
        int j = p->type == MSX_PARAM_FLOAT ? msx_space_add_float(t, p->name, p->lo, p->hi, p->log)
              : p->type == MSX_PARAM_INT   ? msx_space_add_int(t, p->name, (int)p->lo, (int)p->hi, p->log)
                                           : msx_space_add_cat(t, p->name, p->k, NULL);
        if (j < 0) { msx_space_free(t); return NULL; }
        if (p->choices) {
            t->p[j].choices = (char **)msx__calloc((size_t)p->k, sizeof(char *));
            if (!t->p[j].choices) { msx_space_free(t); msx__err(MSX_E_NOMEM, "out of memory"); return NULL; }
            for (c = 0; c < p->k; c++)
                if (p->choices[c] && !(t->p[j].choices[c] = msx__strdup(p->choices[c]))) {
                    msx_space_free(t);
                    msx__err(MSX_E_NOMEM, "out of memory");
                    return NULL;
                }
        }
        t->p[j].parent = p->parent;
        t->p[j].pval = p->pval;
    }
    return t;
}
/* Same structure? Returns 0 and names the first difference in msg. */
static int msx__sp_equal(const msx_space *a, const msx_space *b, char *msg, size_t len) {
    int i, c;
    if (a->n != b->n) { snprintf(msg, len, "%d parameters vs %d", a->n, b->n); return 0; }
    for (i = 0; i < a->n; i++) {
        const msx__oparam *p = &a->p[i], *q = &b->p[i];
        if (strcmp(p->name, q->name)) { snprintf(msg, len, "parameter %d is '%s' vs '%s'", i, p->name, q->name); return 0; }
        if (p->type != q->type || p->lo != q->lo || p->hi != q->hi || p->log != q->log || p->k != q->k) {
            snprintf(msg, len, "parameter '%s' differs in type, bounds, log scale or number of choices", p->name);
            return 0;
        }
        if (p->parent != q->parent || p->pval != q->pval) { snprintf(msg, len, "parameter '%s' has a different condition", p->name); return 0; }
        for (c = 0; c < p->k; c++) {
            const char *x = p->choices ? p->choices[c] : NULL, *y = q->choices ? q->choices[c] : NULL;
            if ((x == NULL) != (y == NULL) || (x && strcmp(x, y))) {
                snprintf(msg, len, "parameter '%s' choice %d differs", p->name, c);
                return 0;
            }
        }
    }
    return 1;
}

/* ---- random forest (§4) ------------------------------------------------------ */

typedef struct msx__rfnode {
    int feat, left, right; /* feat < 0: leaf */
    double thr;            /* continuous: go left iff x <= thr */
    uint64_t mask;         /* categorical: go left iff bit x is set (non-zero marks a categorical split) */
    double val;            /* leaf value */
} msx__rfnode;

struct msx_rf {
    msx_rf_options o;
    int n, d, maxf;
    int cap_n, cap_d, cap_nodes;
    int *types;
    msx__rfnode *nodes;
    int n_nodes;
    int *roots;
    int cap_roots;
    /* fit workspaces, reused across refits */
    int *gord, *ord, *tmp, *feats, *qn, *qa, *qb, *qdepth;
    double *w, *xt;
    unsigned char *goleft;
    msx__opt_pair *pairs;
};

MSXDEF void msx_rf_free(msx_rf *rf) {
    if (!rf) return;
    MSX_FREE(rf->types); MSX_FREE(rf->nodes); MSX_FREE(rf->roots);
    MSX_FREE(rf->gord); MSX_FREE(rf->ord); MSX_FREE(rf->tmp); MSX_FREE(rf->feats);
    MSX_FREE(rf->qn); MSX_FREE(rf->qa); MSX_FREE(rf->qb); MSX_FREE(rf->qdepth);
    MSX_FREE(rf->w); MSX_FREE(rf->goleft); MSX_FREE(rf->pairs); MSX_FREE(rf->xt);
    MSX_FREE(rf);
}

static msx_result msx__rf_reserve(msx_rf *rf, int n, int d, int trees) {
    int i;
    if (n > rf->cap_n || d > rf->cap_d) {
        int cn = n > rf->cap_n ? n + n / 2 + 8 : rf->cap_n, cd = d > rf->cap_d ? d : rf->cap_d;
        void *pp[13];
        MSX_FREE(rf->types); MSX_FREE(rf->gord); MSX_FREE(rf->ord); MSX_FREE(rf->tmp); MSX_FREE(rf->feats);
        MSX_FREE(rf->qn); MSX_FREE(rf->qa); MSX_FREE(rf->qb); MSX_FREE(rf->qdepth);
        MSX_FREE(rf->w); MSX_FREE(rf->goleft); MSX_FREE(rf->pairs); MSX_FREE(rf->xt);
        pp[0] = rf->types = (int *)MSX_MALLOC((size_t)cd * sizeof(int));
        pp[1] = rf->gord = (int *)MSX_MALLOC((size_t)cd * cn * sizeof(int));
        pp[2] = rf->ord = (int *)MSX_MALLOC((size_t)cd * cn * sizeof(int));
        pp[3] = rf->tmp = (int *)MSX_MALLOC((size_t)cn * sizeof(int));
        pp[4] = rf->feats = (int *)MSX_MALLOC((size_t)cd * sizeof(int));
        pp[5] = rf->qn = (int *)MSX_MALLOC((size_t)2 * cn * sizeof(int));
        pp[6] = rf->qa = (int *)MSX_MALLOC((size_t)2 * cn * sizeof(int));
        pp[7] = rf->qb = (int *)MSX_MALLOC((size_t)2 * cn * sizeof(int));
        pp[8] = rf->qdepth = (int *)MSX_MALLOC((size_t)2 * cn * sizeof(int));
        pp[9] = rf->w = (double *)MSX_MALLOC((size_t)cn * sizeof(double));
        pp[10] = rf->goleft = (unsigned char *)MSX_MALLOC((size_t)cn);
        pp[11] = rf->pairs = (msx__opt_pair *)MSX_MALLOC((size_t)cn * sizeof(msx__opt_pair));
        pp[12] = rf->xt = (double *)MSX_MALLOC((size_t)cd * cn * sizeof(double));
        rf->cap_n = cn;
        rf->cap_d = cd;
        for (i = 0; i < 13; i++)
            if (!pp[i]) { rf->cap_n = rf->cap_d = 0; return msx__err(MSX_E_NOMEM, "random forest: out of memory (%d rows x %d features)", n, d); }
    }
    if (trees * 2 * n > rf->cap_nodes) {
        int cap = trees * 2 * n;
        msx__rfnode *nd = (msx__rfnode *)MSX_REALLOC(rf->nodes, (size_t)cap * sizeof *nd);
        if (!nd) return msx__err(MSX_E_NOMEM, "random forest: out of memory for %d nodes", cap);
        rf->nodes = nd;
        rf->cap_nodes = cap;
    }
    if (trees > rf->cap_roots) {
        int *r = (int *)MSX_REALLOC(rf->roots, (size_t)trees * sizeof(int));
        if (!r) return msx__err(MSX_E_NOMEM, "random forest: out of memory");
        rf->roots = r;
        rf->cap_roots = trees;
    }
    return MSX_OK;
}

/* Grows tree t breadth-first (§4.2). Each node owns the range [a,b) of the
   per-feature sorted index lists, which are stably partitioned on a split,
   so a split search costs O(points in node) per feature. */
static void msx__rf_tree(msx_rf *rf, const double *y, int t) {
    const int n = rf->n, d = rf->d, cn = rf->cap_n;
    const int min_split = rf->o.min_samples_split, min_leaf = rf->o.min_samples_leaf;
    msx_rng rng;
    int i, f, m = 0, qh = 0, qt = 0, root;
    msx_rng_seed(&rng, msx__opt_seed3(rf->o.seed, 0x7265u, (uint64_t)t));
    for (i = 0; i < n; i++) rf->w[i] = rf->o.no_bootstrap ? 1.0 : 0.0;
    if (!rf->o.no_bootstrap)
        for (i = 0; i < n; i++) rf->w[msx_rng_below(&rng, (uint64_t)n)] += 1.0;
    for (f = 0; f < d; f++) {
        const int *g = rf->gord + (size_t)f * cn;
        int *o = rf->ord + (size_t)f * cn, k = 0;
        for (i = 0; i < n; i++)
            if (rf->w[g[i]] > 0) o[k++] = g[i];
        m = k;
    }
    root = rf->n_nodes++;
    rf->roots[t] = root;
    rf->qn[qt] = root; rf->qa[qt] = 0; rf->qb[qt] = m; rf->qdepth[qt] = 0; qt++;
    while (qh < qt) {
        const int nd = rf->qn[qh], a = rf->qa[qh], b = rf->qb[qh], depth = rf->qdepth[qh];
        const int cnt = b - a;
        const int *o0 = rf->ord + a;
        double W = 0, S = 0, mean, y0 = y[o0[0]], best_gain = -1, best_thr = 0;
        uint64_t best_mask = 0;
        int pure = 1, alleq = 1, best_f = -1, j;
        qh++;
        for (j = 0; j < cnt; j++) {
            double yy = y[o0[j]], ww = rf->w[o0[j]];
            W += ww;
            S += ww * yy;
            if (fabs(yy - y0) > rf->o.eps_purity) pure = 0;
            if (yy != y0) alleq = 0;
        }
        mean = S / W;
        if (depth < rf->o.max_depth && cnt >= min_split && W >= 2 && !pure) {
            int nf = rf->maxf, fi;
            for (f = 0; f < d; f++) rf->feats[f] = f;
            for (f = d - 1; f > 0; f--) { /* random feature order: ties keep the first (§4.2) */
                int r = (int)msx_rng_below(&rng, (uint64_t)(f + 1)), tt = rf->feats[f];
                rf->feats[f] = rf->feats[r];
                rf->feats[r] = tt;
            }
            for (fi = 0; fi < nf; fi++) {
                const int ff = rf->feats[fi], K = rf->types[ff];
                const int *o = rf->ord + (size_t)ff * cn + a;
                const double *xf = rf->xt + (size_t)ff * cn; /* feature-major copy: contiguous */
                if (K > 0 && K <= 64) {
                    /* Breiman: sort observed categories by mean, try prefixes (§4.3). */
                    double cw[64], cs[64];
                    int cc[64], obs[64], nobs = 0, c, p;
                    for (c = 0; c < K; c++) { cw[c] = cs[c] = 0; cc[c] = 0; }
                    for (j = 0; j < cnt; j++) {
                        int cat = (int)xf[o[j]];
                        if (cat < 0) cat = 0;
                        if (cat >= K) cat = K - 1;
                        cw[cat] += rf->w[o[j]];
                        cs[cat] += rf->w[o[j]] * (y[o[j]] - mean);
                        cc[cat]++;
                    }
                    for (c = 0; c < K; c++)
                        if (cc[c]) {
                            int q = nobs++;
                            while (q > 0 && cs[obs[q - 1]] / cw[obs[q - 1]] > cs[c] / cw[c]) { obs[q] = obs[q - 1]; q--; }
                            obs[q] = c;
                        }
                    if (nobs < 2) continue;
                    {
                        double WL = 0, SL = 0;
                        int nL = 0;
                        uint64_t mask = 0;
                        for (p = 0; p < nobs - 1; p++) {
                            double WR, SR, gain;
                            WL += cw[obs[p]]; SL += cs[obs[p]]; nL += cc[obs[p]];
                            mask |= (uint64_t)1 << obs[p];
                            if (nL < min_leaf || cnt - nL < min_leaf) continue;
                            WR = W - WL; SR = -SL; /* centred sums add to zero */
                            gain = SL * SL / WL + SR * SR / WR;
                            if (gain > best_gain) { best_gain = gain; best_f = ff; best_mask = mask; }
                        }
                    }
                } else {
                    double WL = 0, SL = 0;
                    int nL = 0;
                    for (j = 0; j < cnt - 1; j++) {
                        double x = xf[o[j]], xn = xf[o[j + 1]], WR, SR, gain;
                        WL += rf->w[o[j]];
                        SL += rf->w[o[j]] * (y[o[j]] - mean);
                        nL++;
                        if (!(xn > x)) continue;
                        if (nL < min_leaf) continue;
                        if (cnt - nL < min_leaf) break;
                        WR = W - WL; SR = -SL;
                        gain = SL * SL / WL + SR * SR / WR;
                        if (gain > best_gain) {
                            best_gain = gain;
                            best_f = ff;
                            best_mask = 0;
                            /* midpoint, or pyrfr's uniform draw in the gap (smoother ensemble) */
                            best_thr = x + (rf->o.random_thresholds ? msx_rng_uniform(&rng) : 0.5) * (xn - x);
                            if (!(best_thr < xn)) best_thr = x;
                        }
                    }
                }
            }
        }
        if (best_f < 0) {
            msx__rfnode *L = &rf->nodes[nd];
            L->feat = -1; L->left = L->right = -1; L->thr = 0; L->mask = 0;
            if (rf->o.log_y) { /* SMAC log_y: ln(mean over distinct leaf points of exp(y)) (§4.4) */
                double se = 0;
                for (j = 0; j < cnt; j++) se += exp(y[o0[j]]);
                L->val = log(se / cnt + 1e-10);
            } else
                L->val = alleq ? y0 : mean;
            continue;
        }
        {
            const int K = rf->types[best_f];
            int nL = 0, l, r, g, left_id, right_id;
            if (best_mask) { /* unobserved categories join the left set with probability 1/2 */
                int c;
                {
                    uint64_t obsmask = 0;
                    const int *o = rf->ord + (size_t)best_f * cn + a;
                    for (j = 0; j < cnt; j++) {
                        int cat = (int)rf->xt[(size_t)best_f * cn + o[j]];
                        if (cat >= 0 && cat < 64) obsmask |= (uint64_t)1 << cat;
                    }
                    for (c = 0; c < K; c++)
                        if (!((obsmask >> c) & 1) && (msx_rng_u64(&rng) >> 63)) best_mask |= (uint64_t)1 << c;
                }
            }
            for (j = 0; j < cnt; j++) {
                int id = o0[j];
                double x = rf->xt[(size_t)best_f * cn + id];
                int gl;
                if (best_mask) { int cat = (int)x; gl = cat >= 0 && cat < 64 && ((best_mask >> cat) & 1); }
                else gl = x <= best_thr;
                rf->goleft[id] = (unsigned char)gl;
                nL += gl;
            }
            for (g = 0; g < d; g++) { /* stable partition of every feature's list */
                int *o = rf->ord + (size_t)g * cn + a;
                l = r = 0;
                for (j = 0; j < cnt; j++) {
                    if (rf->goleft[o[j]]) o[l++] = o[j];
                    else rf->tmp[r++] = o[j];
                }
                memcpy(o + l, rf->tmp, (size_t)r * sizeof(int));
            }
            left_id = rf->n_nodes++;
            right_id = rf->n_nodes++;
            rf->nodes[nd].feat = best_f;
            rf->nodes[nd].thr = best_thr;
            rf->nodes[nd].mask = best_mask;
            rf->nodes[nd].left = left_id;
            rf->nodes[nd].right = right_id;
            rf->nodes[nd].val = mean;
            rf->qn[qt] = left_id; rf->qa[qt] = a; rf->qb[qt] = a + nL; rf->qdepth[qt] = depth + 1; qt++;
            rf->qn[qt] = right_id; rf->qa[qt] = a + nL; rf->qb[qt] = b; rf->qdepth[qt] = depth + 1; qt++;
        }
    }
}

MSXDEF msx_result msx_rf_fit(msx_rf **prf, const double *X, const double *y, int n, int d, const int *types,
                             const msx_rf_options *opts) {
    msx_rf *rf;
    msx_rf_options o;
    msx_result r;
    int i, f, t;
    if (!prf || !X || !y) return msx__err(MSX_E_ARG, "msx_rf_fit: NULL argument");
    if (n < 1 || d < 1) return msx__err(MSX_E_ARG, "msx_rf_fit: need at least one row and one feature (got %d x %d)", n, d);
    for (i = 0; i < n; i++) {
        if (!isfinite(y[i])) return msx__err(MSX_E_ARG, "msx_rf_fit: response %d is not finite", i);
        for (f = 0; f < d; f++)
            if (!isfinite(X[(size_t)i * d + f])) return msx__err(MSX_E_ARG, "msx_rf_fit: X[%d][%d] is not finite", i, f);
    }
    if (opts) o = *opts;
    else memset(&o, 0, sizeof o);
    if (o.n_trees <= 0) o.n_trees = 10;
    if (o.min_samples_split <= 0) o.min_samples_split = 2;
    if (o.min_samples_leaf <= 0) o.min_samples_leaf = 1;
    if (o.max_depth <= 0) o.max_depth = 1 << 20;
    if (o.ratio_features <= 0) o.ratio_features = 1.0;
    if (o.eps_purity <= 0) o.eps_purity = 1e-8;
    rf = *prf;
    if (!rf) {
        rf = (msx_rf *)msx__calloc(1, sizeof *rf);
        if (!rf) return msx__err(MSX_E_NOMEM, "msx_rf_fit: out of memory");
    }
    r = msx__rf_reserve(rf, n, d, o.n_trees);
    if (r != MSX_OK) {
        if (!*prf) msx_rf_free(rf);
        return r;
    }
    *prf = rf;
    rf->o = o;
    rf->n = n;
    rf->d = d;
    rf->maxf = o.ratio_features >= 1 ? d : (int)(d * o.ratio_features);
    if (rf->maxf < 1) rf->maxf = 1;
    for (f = 0; f < d; f++) rf->types[f] = types ? types[f] : 0;
    for (f = 0; f < d; f++) { /* one global sort per feature, filtered per tree */
        for (i = 0; i < n; i++) { rf->pairs[i].v = X[(size_t)i * d + f]; rf->pairs[i].i = i; }
        qsort(rf->pairs, (size_t)n, sizeof *rf->pairs, msx__opt_cmp_asc);
        for (i = 0; i < n; i++) rf->gord[(size_t)f * rf->cap_n + i] = rf->pairs[i].i;
    }
    rf->n_nodes = 0;
    for (f = 0; f < d; f++)
        for (i = 0; i < n; i++) rf->xt[(size_t)f * rf->cap_n + i] = X[(size_t)i * d + f];
    for (t = 0; t < o.n_trees; t++) msx__rf_tree(rf, y, t);
    return MSX_OK;
}

static double msx__rf_tree_val(const msx_rf *rf, int t, const double *x) {
    const msx__rfnode *nd = rf->nodes;
    int k = rf->roots[t];
    while (nd[k].feat >= 0) {
        double v = x[nd[k].feat];
        int gl;
        if (nd[k].mask) { int c = (int)v; gl = c >= 0 && c < 64 && ((nd[k].mask >> c) & 1); }
        else gl = v <= nd[k].thr;
        k = gl ? nd[k].left : nd[k].right;
    }
    return nd[k].val;
}
MSXDEF void msx_rf_predict(const msx_rf *rf, const double *x, double *mean, double *var) {
    double p[64], s = 0, v = 0, mu;
    int t, T = rf->o.n_trees;
    if (T <= 64) {
        for (t = 0; t < T; t++) { p[t] = msx__rf_tree_val(rf, t, x); s += p[t]; }
        mu = s / T;
        for (t = 0; t < T; t++) v += (p[t] - mu) * (p[t] - mu);
    } else { /* two passes without a buffer */
        for (t = 0; t < T; t++) s += msx__rf_tree_val(rf, t, x);
        mu = s / T;
        for (t = 0; t < T; t++) { double q = msx__rf_tree_val(rf, t, x) - mu; v += q * q; }
    }
    if (mean) *mean = mu;
    if (var) *var = v / T; /* across trees, ddof 0 (§4.4, §4.5) */
}

/* ---- expected improvement (§5) ----------------------------------------------- */

#define MSX__SQRT1_2 0.70710678118654752440
#define MSX__LOG_SQRT_2PI 0.91893853320467274178
static double msx__phi(double x) { return exp(-0.5 * x * x - MSX__LOG_SQRT_2PI); }
static double msx__Phi(double x) { return 0.5 * erfc(-x * MSX__SQRT1_2); }
/* Continued fraction of the Mills ratio for x >= 5: t1 = x + 1/(x + 2/(x + ...)),
   R = 1/t1; also t2 (the tail after the first term) for 1 - xR = 1/(t1 t2). */
static void msx__mills_cf(double x, double *t1, double *t2) {
    double t = x;
    int k;
    for (k = 60; k >= 2; k--) t = x + k / t;
    *t2 = t;
    *t1 = x + 1 / t;
}
/* Mills ratio R(x) = Phi(-x)/phi(x) (finite for x > -37). */
static double msx__mills(double x) {
    if (x >= 5) { double t1, t2; msx__mills_cf(x, &t1, &t2); return 1 / t1; }
    return msx__Phi(-x) / msx__phi(x);
}
/* q(x) = 1 - x R(x) without cancellation. */
static double msx__mills_q(double x) {
    if (x >= 5) { double t1, t2; msx__mills_cf(x, &t1, &t2); return 1 / (t1 * t2); }
    return 1 - x * msx__mills(x);
}
/* g = R(a) - R(a + s) for s > 0, accurate also when s is tiny. */
static double msx__mills_diff(double a, double s) {
    double b = a + s;
    if (a >= 5) {
        /* Difference of the two continued fractions term by term:
           D_k = t_k(b) - t_k(a) = s - k D_{k+1} / (t_{k+1}(a) t_{k+1}(b)). */
        double ta[62], tb[62], D;
        int k;
        ta[61] = a; tb[61] = b;
        for (k = 60; k >= 1; k--) { ta[k] = a + k / ta[k + 1]; tb[k] = b + k / tb[k + 1]; }
        D = s;
        for (k = 60; k >= 1; k--) D = s - k * D / (ta[k + 1] * tb[k + 1]);
        return D / (ta[1] * tb[1]);
    }
    if (s * (fabs(a) > 1 ? fabs(a) : 1) < 1e-2) {
        /* Taylor: R' = -q, R'' = R - a q, R''' = a R'' - 2 q */
        double R = msx__mills(a), q = msx__mills_q(a), R2 = R - a * q, R3 = a * R2 - 2 * q;
        return s * q - s * s / 2 * R2 - s * s * s / 6 * R3;
    }
    return msx__mills(a) - msx__mills(b);
}
MSXDEF double msx_acq_ei(double eta, double mu, double sigma, int log_model, double *log_ei) {
    double le, ei;
    if (!(sigma > 0) || !isfinite(mu) || !isfinite(eta)) {
        if (log_ei) *log_ei = -DBL_MAX;
        return 0;
    }
    if (!log_model) {
        /* EI = sigma phi(z) q(-z), z = (eta - mu)/sigma */
        double z = (eta - mu) / sigma;
        if (z > 30) { ei = (eta - mu) * msx__Phi(z) + sigma * msx__phi(z); le = log(ei); }
        else { le = log(sigma) - 0.5 * z * z - MSX__LOG_SQRT_2PI + log(msx__mills_q(-z)); ei = exp(le); }
    } else {
        /* EI = e^eta [Phi(v) - e^{s^2/2 - v s} Phi(v - s)] = e^eta phi(v) [R(-v) - R(s - v)] */
        double v = (eta - mu) / sigma;
        if (v > 30) {
            double t = msx__Phi(v) - exp(0.5 * sigma * sigma - v * sigma + log(msx__Phi(v - sigma)));
            le = eta + log(t > 0 ? t : DBL_MIN);
        } else {
            double g = msx__mills_diff(-v, sigma);
            le = eta - 0.5 * v * v - MSX__LOG_SQRT_2PI + log(g > 0 ? g : DBL_MIN);
        }
        ei = exp(le);
    }
    if (!(le == le)) le = -DBL_MAX;
    if (log_ei) *log_ei = le;
    return ei;
}

MSXDEF void msx_simplex_weights(msx_rng *rng, int k, double *w) {
    double s = 0;
    int j;
    for (j = 0; j < k; j++) { /* normalised Exp(1) = Dirichlet(1): uniform on the simplex (§10, §14 #1235) */
        double u = msx_rng_uniform(rng);
        w[j] = -log(1.0 - u);
        s += w[j];
    }
    for (j = 0; j < k; j++) w[j] = s > 0 ? w[j] / s : 1.0 / k;
}

/* ---- hypervolume ------------------------------------------------------------- */

/* Slicing along the last objective; p is n rows of m values, all < ref. */
static double msx__hv_rec(const double *p, int n, int m, const double *ref, int *fail) {
    msx__opt_pair *pr;
    double *sub, hv = 0;
    int i, j;
    if (n == 0 || *fail) return 0;
    if (m == 1) {
        double mn = p[0];
        for (i = 1; i < n; i++) if (p[i] < mn) mn = p[i];
        return ref[0] - mn;
    }
    pr = (msx__opt_pair *)MSX_MALLOC((size_t)n * sizeof *pr);
    sub = (double *)MSX_MALLOC((size_t)n * (m - 1) * sizeof *sub);
    if (!pr || !sub) { MSX_FREE(pr); MSX_FREE(sub); *fail = 1; return 0; }
    for (i = 0; i < n; i++) { pr[i].v = p[(size_t)i * m + m - 1]; pr[i].i = i; }
    qsort(pr, (size_t)n, sizeof *pr, msx__opt_cmp_asc);
    if (m == 2) { /* sweep */
        double best = ref[0];
        for (i = 0; i < n; i++) {
            double x = p[(size_t)pr[i].i * 2], znext = i + 1 < n ? pr[i + 1].v : ref[1];
            if (x < best) best = x;
            hv += (ref[0] - best) * (znext - pr[i].v);
        }
    } else {
        for (i = 0; i < n; i++) {
            double znext = i + 1 < n ? pr[i + 1].v : ref[m - 1];
            for (j = 0; j < m - 1; j++) sub[(size_t)i * (m - 1) + j] = p[(size_t)pr[i].i * m + j];
            if (znext > pr[i].v) hv += msx__hv_rec(sub, i + 1, m - 1, ref, fail) * (znext - pr[i].v);
        }
    }
    MSX_FREE(pr);
    MSX_FREE(sub);
    return hv;
}
static int msx__dominates(const double *a, const double *b, int m) {
    int j, strict = 0;
    for (j = 0; j < m; j++) {
        if (a[j] > b[j]) return 0;
        if (a[j] < b[j]) strict = 1;
    }
    return strict;
}
MSXDEF double msx_hypervolume(const double *pts, int n, int m, const double *ref) {
    double *q, hv;
    int i, j, k = 0, fail = 0;
    if (n <= 0 || m <= 0 || !pts || !ref) return 0;
    q = (double *)MSX_MALLOC((size_t)n * m * sizeof *q);
    if (!q) return -1;
    for (i = 0; i < n; i++) { /* keep points inside the box and not dominated */
        const double *a = pts + (size_t)i * m;
        int ok = 1;
        for (j = 0; j < m && ok; j++) ok = a[j] < ref[j];
        for (j = 0; j < n && ok; j++)
            if (j != i && (msx__dominates(pts + (size_t)j * m, a, m) ||
                           (j < i && !memcmp(pts + (size_t)j * m, a, (size_t)m * sizeof *a))))
                ok = 0;
        if (ok) memcpy(q + (size_t)k++ * m, a, (size_t)m * sizeof *a);
    }
    hv = msx__hv_rec(q, k, m, ref, &fail);
    MSX_FREE(q);
    return fail ? -1 : hv;
}

/* ---- the optimiser ----------------------------------------------------------- */

#define MSX__OPT_FORMAT "medsamix-opt-state-v1"
#define MSX__GP_MAXM 64 /* points in the local GP (see msx__opt_gp_propose) */

struct msx_opt {
    msx_space *sp;
    int d, n_obj;
    msx_opt_options o; /* as given (saved with the state) */
    /* resolved settings */
    int n_trees, n_rs, n_pert, n_starts, ls_max, mem_on, log_scale;
    double rprob, rho, vfloor;
    int *types, *topo;
    int *desc, *desc_off; /* descendants of each parameter, parents first */
    /* design: user configurations and the Latin hypercube, in proposal order */
    double *design, *user;
    int n_design, n_user;
    /* history (tell order) */
    int n_hist, cap_hist;
    double *hcfg, *henc, *hcost;
    unsigned char *hfail;
    int *hid;
    uint64_t *hhash;
    int *front, n_front;
    /* pending trials */
    int n_pend, cap_pend;
    double *pcfg;
    int *pid;
    uint64_t *phash;
    int next_id;
    /* model and workspaces */
    msx_rf *rf;
    double *y, *mu, *ysort, *mem, *theta;
    msx__opt_pair *rank;
    double *cand, *cand_acq;
    int n_cand, cap_cand;
    double *top, *top_acq;
    int n_top, cap_top;
    double *cur, *curenc, *tmpc, *tmpe;
    int *nb_par;
    double *nb_val;
    int cap_nb;
    double t_fit, t_acq;
    /* local GP stage (msx__opt_gp_propose) */
    double lprob;
    double *yraw; /* training targets before the log scaling */
    int *gp_dims;
    double *gp_X, *gp_y, *gp_L, *gp_alpha, *gp_ks, *gp_ls, *gp_w, *gp_u, *gp_c, *gp_best;
};

static uint64_t msx__opt_hash(const double *c, int d) {
    uint64_t h = 0x243F6A8885A308D3ull, b;
    int i;
    for (i = 0; i < d; i++) {
        double v = c[i];
        if (v != v) b = 0x7FF8000000000000ull;
        else memcpy(&b, &v, sizeof b);
        h = msx__opt_mix(h ^ b);
    }
    return h;
}
static int msx__opt_same(const double *a, const double *b, int d) {
    int i;
    for (i = 0; i < d; i++) {
        if (a[i] != a[i]) { if (b[i] == b[i]) return 0; }
        else if (a[i] != b[i]) return 0;
    }
    return 1;
}
/* Told, pending, or among the first nb configs of the current batch? */
static int msx__opt_seen(const msx_opt *o, const double *c, const double *batch, int nb) {
    uint64_t h = msx__opt_hash(c, o->d);
    int i;
    for (i = 0; i < o->n_hist; i++)
        if (o->hhash[i] == h && msx__opt_same(o->hcfg + (size_t)i * o->d, c, o->d)) return 1;
    for (i = 0; i < o->n_pend; i++)
        if (o->phash[i] == h && msx__opt_same(o->pcfg + (size_t)i * o->d, c, o->d)) return 1;
    for (i = 0; i < nb; i++)
        if (msx__opt_same(batch + (size_t)i * o->d, c, o->d)) return 1;
    return 0;
}

MSXDEF void msx_opt_free(msx_opt *o) {
    if (!o) return;
    msx_space_free(o->sp);
    msx_rf_free(o->rf);
    MSX_FREE(o->types); MSX_FREE(o->topo); MSX_FREE(o->desc); MSX_FREE(o->desc_off); MSX_FREE(o->design); MSX_FREE(o->user);
    MSX_FREE(o->hcfg); MSX_FREE(o->henc); MSX_FREE(o->hcost); MSX_FREE(o->hfail); MSX_FREE(o->hid);
    MSX_FREE(o->hhash); MSX_FREE(o->front);
    MSX_FREE(o->pcfg); MSX_FREE(o->pid); MSX_FREE(o->phash);
    MSX_FREE(o->y); MSX_FREE(o->mu); MSX_FREE(o->ysort); MSX_FREE(o->mem); MSX_FREE(o->theta); MSX_FREE(o->rank);
    MSX_FREE(o->cand); MSX_FREE(o->cand_acq); MSX_FREE(o->top); MSX_FREE(o->top_acq);
    MSX_FREE(o->cur); MSX_FREE(o->curenc); MSX_FREE(o->tmpc); MSX_FREE(o->tmpe);
    MSX_FREE(o->nb_par); MSX_FREE(o->nb_val);
    MSX_FREE(o->yraw); MSX_FREE(o->gp_dims); MSX_FREE(o->gp_X); MSX_FREE(o->gp_y); MSX_FREE(o->gp_L); MSX_FREE(o->gp_alpha); MSX_FREE(o->gp_ks);
    MSX_FREE(o->gp_ls); MSX_FREE(o->gp_w); MSX_FREE(o->gp_u); MSX_FREE(o->gp_c); MSX_FREE(o->gp_best);
    MSX_FREE(o);
}
MSXDEF const msx_space *msx_opt_space(const msx_opt *o) { return o ? o->sp : NULL; }
MSXDEF int msx_opt_n_told(const msx_opt *o) { return o ? o->n_hist : 0; }
MSXDEF int msx_opt_n_pending(const msx_opt *o) { return o ? o->n_pend : 0; }
MSXDEF void msx_opt_last_timing(const msx_opt *o, double *fit_s, double *acq_s) {
    if (fit_s) *fit_s = o ? o->t_fit : 0;
    if (acq_s) *acq_s = o ? o->t_acq : 0;
}

static msx_result msx__opt_grow_hist(msx_opt *o, int need) {
    int nc, d = o->d, m = o->n_obj;
    if (need <= o->cap_hist) return MSX_OK;
    nc = o->cap_hist ? 2 * o->cap_hist : 64;
    while (nc < need) nc *= 2;
#define MSX__OPT_GROW(ptr, type, count)                                               \
    do {                                                                            \
        type *q_ = (type *)MSX_REALLOC(ptr, (size_t)(count) * sizeof(type));        \
        if (!q_) return msx__err(MSX_E_NOMEM, "optimiser: out of memory (%d trials)", nc); \
        ptr = q_;                                                                   \
    } while (0)
    MSX__OPT_GROW(o->hcfg, double, (size_t)nc * d);
    MSX__OPT_GROW(o->henc, double, (size_t)nc * d);
    MSX__OPT_GROW(o->hcost, double, (size_t)nc * m);
    MSX__OPT_GROW(o->hfail, unsigned char, nc);
    MSX__OPT_GROW(o->hid, int, nc);
    MSX__OPT_GROW(o->hhash, uint64_t, nc);
    MSX__OPT_GROW(o->front, int, nc);
    MSX__OPT_GROW(o->y, double, nc);
    MSX__OPT_GROW(o->yraw, double, nc);
    MSX__OPT_GROW(o->mu, double, nc);
    MSX__OPT_GROW(o->ysort, double, nc);
    MSX__OPT_GROW(o->rank, msx__opt_pair, nc);
    o->cap_hist = nc;
    return MSX_OK;
}
static msx_result msx__opt_grow_pend(msx_opt *o, int need) {
    int nc;
    if (need <= o->cap_pend) return MSX_OK;
    nc = o->cap_pend ? 2 * o->cap_pend : 16;
    while (nc < need) nc *= 2;
    MSX__OPT_GROW(o->pcfg, double, (size_t)nc * o->d);
    MSX__OPT_GROW(o->pid, int, nc);
    MSX__OPT_GROW(o->phash, uint64_t, nc);
    o->cap_pend = nc;
    return MSX_OK;
}
static msx_result msx__opt_grow_cand(msx_opt *o, int need) {
    int nc;
    if (need <= o->cap_cand) return MSX_OK;
    nc = need + 16;
    MSX__OPT_GROW(o->cand, double, (size_t)nc * o->d);
    MSX__OPT_GROW(o->cand_acq, double, nc);
    o->cap_cand = nc;
    return MSX_OK;
}
static msx_result msx__opt_grow_top(msx_opt *o, int need) {
    int nc;
    if (need <= o->cap_top) return MSX_OK;
    nc = need + 8;
    MSX__OPT_GROW(o->top, double, (size_t)nc * o->d);
    MSX__OPT_GROW(o->top_acq, double, nc);
    o->cap_top = nc;
    return MSX_OK;
}

/* Keeps the Pareto front of successful trials as ascending history indices. */
static void msx__opt_front_add(msx_opt *o, int i) {
    const double *c = o->hcost + (size_t)i * o->n_obj;
    int j, k = 0;
    for (j = 0; j < o->n_front; j++)
        if (msx__dominates(o->hcost + (size_t)o->front[j] * o->n_obj, c, o->n_obj)) return;
    for (j = 0; j < o->n_front; j++)
        if (!msx__dominates(c, o->hcost + (size_t)o->front[j] * o->n_obj, o->n_obj)) o->front[k++] = o->front[j];
    o->front[k++] = i;
    o->n_front = k;
}

/* Appends a canonical config to the history (costs already validated). */
static msx_result msx__opt_push_hist(msx_opt *o, const double *cfg, const double *costs, int failed, int id) {
    msx_result r = msx__opt_grow_hist(o, o->n_hist + 1);
    int i = o->n_hist, j;
    if (r != MSX_OK) return r;
    memcpy(o->hcfg + (size_t)i * o->d, cfg, (size_t)o->d * sizeof *cfg);
    msx__sp_encode(o->sp, cfg, o->henc + (size_t)i * o->d);
    for (j = 0; j < o->n_obj; j++) o->hcost[(size_t)i * o->n_obj + j] = failed ? NAN : costs[j];
    o->hfail[i] = (unsigned char)(failed ? 1 : 0);
    o->hid[i] = id;
    o->hhash[i] = msx__opt_hash(cfg, o->d);
    o->n_hist++;
    if (!failed) msx__opt_front_add(o, i);
    return MSX_OK;
}
static msx_result msx__opt_check_costs(const msx_opt *o, const double *costs, int failed, const char *what) {
    int j;
    if (failed) return MSX_OK;
    if (!costs) return msx__err(MSX_E_ARG, "%s: costs is NULL (pass failed=1 for a crashed trial)", what);
    for (j = 0; j < o->n_obj; j++)
        if (!isfinite(costs[j]))
            return msx__err(MSX_E_ARG, "%s: cost %d is %s; pass failed=1 for a crashed trial instead", what, j,
                            costs[j] != costs[j] ? "NaN" : "infinite");
    return MSX_OK;
}

/* Parents before children, so filling activated children sees final parent values. */
static int msx__opt_depth(const msx_space *s, int i) {
    int k = 0;
    while (s->p[i].parent >= 0 && k <= s->n) { i = s->p[i].parent; k++; }
    return k;
}

/* Latin hypercube over the active structure: each parameter is stratified
   over the design rows in which it is active (parents are assigned first). */
static msx_result msx__opt_make_design(msx_opt *o, int n_lhs) {
    const int d = o->d;
    int total = n_lhs + o->n_user, i, q, r, k = 0, *rows = NULL, *perm = NULL;
    double *lhs = NULL;
    msx_rng rng;
    msx_rng_seed(&rng, msx__opt_seed3(o->o.seed, 0xDE5u, 0));
    o->design = (double *)MSX_MALLOC((size_t)(total > 0 ? total : 1) * d * sizeof(double));
    lhs = (double *)MSX_MALLOC((size_t)(n_lhs > 0 ? n_lhs : 1) * d * sizeof(double));
    rows = (int *)MSX_MALLOC((size_t)(n_lhs > 0 ? n_lhs : 1) * sizeof(int));
    perm = (int *)MSX_MALLOC((size_t)(n_lhs > 0 ? n_lhs : 1) * sizeof(int));
    if (!o->design || !lhs || !rows || !perm) {
        MSX_FREE(lhs); MSX_FREE(rows); MSX_FREE(perm);
        return msx__err(MSX_E_NOMEM, "optimiser: out of memory for the initial design");
    }
    for (i = 0; i < n_lhs * d; i++) lhs[i] = NAN;
    for (q = 0; q < d; q++) {
        int p = o->topo[q], m = 0;
        for (r = 0; r < n_lhs; r++)
            if (msx__sp_active(o->sp, lhs + (size_t)r * d, p)) rows[m++] = r;
        for (i = 0; i < m; i++) perm[i] = i;
        for (i = m - 1; i > 0; i--) {
            int j = (int)msx_rng_below(&rng, (uint64_t)(i + 1)), t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
        }
        for (i = 0; i < m; i++) {
            double u = o->o.init_mode == MSX_INIT_RANDOM ? msx_rng_uniform(&rng) : (perm[i] + msx_rng_uniform(&rng)) / m;
            lhs[(size_t)rows[i] * d + p] = msx__sp_from_unit1(&o->sp->p[p], u);
        }
    }
    for (r = 0; r < n_lhs; r++) msx__sp_mask(o->sp, lhs + (size_t)r * d);
    for (i = 0; i < total; i++) {
        const double *src;
        int dup = 0, j;
        if (o->o.init_configs_last) src = i < n_lhs ? lhs + (size_t)i * d : o->user + (size_t)(i - n_lhs) * d;
        else src = i < o->n_user ? o->user + (size_t)i * d : lhs + (size_t)(i - o->n_user) * d;
        for (j = 0; j < k && !dup; j++) dup = msx__opt_same(o->design + (size_t)j * d, src, d);
        if (!dup) memcpy(o->design + (size_t)k++ * d, src, (size_t)d * sizeof(double));
    }
    o->n_design = k;
    MSX_FREE(lhs); MSX_FREE(rows); MSX_FREE(perm);
    return MSX_OK;
}

MSXDEF msx_result msx_opt_create(const msx_space *space, const msx_opt_options *opts, msx_opt **out) {
    msx_opt *o;
    msx_opt_options def;
    msx_result r;
    int i, d, n_lhs;
    if (!out) return msx__err(MSX_E_ARG, "msx_opt_create: out is NULL");
    *out = NULL;
    if (!space) return msx__err(MSX_E_ARG, "msx_opt_create: space is NULL");
    if (space->n == 0) return msx__err(MSX_E_ARG, "msx_opt_create: the search space is empty (add parameters first)");
    if (!opts) { memset(&def, 0, sizeof def); opts = &def; }
    if (opts->n_objectives < 0 || opts->n_objectives > 64)
        return msx__err(MSX_E_ARG, "msx_opt_create: n_objectives = %d (need 1..64)", opts->n_objectives);
    if (opts->n_init_configs < 0 || (opts->n_init_configs > 0 && !opts->init_configs))
        return msx__err(MSX_E_ARG, "msx_opt_create: n_init_configs = %d but init_configs is NULL", opts->n_init_configs);
    if (opts->mo_mode != MSX_MO_PAREGO && opts->mo_mode != MSX_MO_MEAN)
        return msx__err(MSX_E_ARG, "msx_opt_create: unknown mo_mode %d", (int)opts->mo_mode);
    if (opts->init_mode != MSX_INIT_LHS && opts->init_mode != MSX_INIT_RANDOM)
        return msx__err(MSX_E_ARG, "msx_opt_create: unknown init_mode %d", (int)opts->init_mode);
    if (!(opts->local_prob <= 1))
        return msx__err(MSX_E_ARG, "msx_opt_create: local_prob = %g (need <= 1; 0 = default, < 0 = off)", opts->local_prob);
    if (!(opts->random_prob <= 1) || !(opts->parego_rho >= 0) || !(opts->var_floor >= 0) || !(opts->ratio_features >= 0))
        return msx__err(MSX_E_ARG, "msx_opt_create: random_prob must be <= 1 and parego_rho, var_floor, ratio_features >= 0");
    o = (msx_opt *)msx__calloc(1, sizeof *o);
    if (!o) return msx__err(MSX_E_NOMEM, "msx_opt_create: out of memory");
    o->sp = msx__sp_clone(space);
    if (!o->sp) { msx_opt_free(o); return MSX_E_NOMEM; }
    d = o->d = space->n;
    o->o = *opts;
    o->o.init_configs = NULL;
    o->n_obj = opts->n_objectives > 0 ? opts->n_objectives : 1;
    o->n_trees = opts->n_trees > 0 ? opts->n_trees : 10;
    o->n_rs = opts->n_random_samples > 0 ? opts->n_random_samples : 10000;
    o->n_pert = opts->n_perturb_samples > 0 ? opts->n_perturb_samples : opts->n_perturb_samples < 0 ? 0 : o->n_rs / 2;
    o->n_starts = opts->n_local_starts > 0 ? opts->n_local_starts : 10;
    o->ls_max = opts->ls_max_evals > 0 ? opts->ls_max_evals : 5000;
    o->mem_on = !opts->no_child_memory;
    o->log_scale = !opts->no_log_scale;
    o->rprob = opts->random_prob > 0 ? opts->random_prob : opts->random_prob < 0 ? 0 : 0.2;
    o->rho = opts->parego_rho > 0 ? opts->parego_rho : 0.05;
    o->lprob = opts->local_prob > 0 ? opts->local_prob : opts->local_prob < 0 ? 0 : 0.5;
    o->vfloor = opts->var_floor > 0 ? opts->var_floor : 1e-10;
    o->next_id = 1;
    o->types = (int *)MSX_MALLOC((size_t)d * sizeof(int));
    o->topo = (int *)MSX_MALLOC((size_t)d * sizeof(int));
    o->mem = (double *)MSX_MALLOC((size_t)d * sizeof(double));
    o->theta = (double *)MSX_MALLOC((size_t)o->n_obj * sizeof(double));
    o->cur = (double *)MSX_MALLOC((size_t)d * sizeof(double));
    o->curenc = (double *)MSX_MALLOC((size_t)d * sizeof(double));
    o->tmpc = (double *)MSX_MALLOC((size_t)d * sizeof(double));
    o->tmpe = (double *)MSX_MALLOC((size_t)d * sizeof(double));
    o->cap_nb = 8 * d;
    for (i = 0; i < d; i++)
        if (o->sp->p[i].type != MSX_PARAM_FLOAT) o->cap_nb += o->sp->p[i].type == MSX_PARAM_CAT ? o->sp->p[i].k : 8;
    o->nb_par = (int *)MSX_MALLOC((size_t)o->cap_nb * sizeof(int));
    o->nb_val = (double *)MSX_MALLOC((size_t)o->cap_nb * sizeof(double));
    o->gp_dims = (int *)MSX_MALLOC((size_t)d * sizeof(int));
    o->gp_X = (double *)MSX_MALLOC((size_t)MSX__GP_MAXM * d * sizeof(double));
    o->gp_y = (double *)MSX_MALLOC(MSX__GP_MAXM * sizeof(double));
    o->gp_L = (double *)MSX_MALLOC(MSX__GP_MAXM * MSX__GP_MAXM * sizeof(double));
    o->gp_alpha = (double *)MSX_MALLOC(MSX__GP_MAXM * sizeof(double));
    o->gp_ks = (double *)MSX_MALLOC(MSX__GP_MAXM * sizeof(double));
    o->gp_ls = (double *)MSX_MALLOC((size_t)d * sizeof(double));
    o->gp_w = (double *)MSX_MALLOC((size_t)d * sizeof(double));
    o->gp_u = (double *)MSX_MALLOC((size_t)d * sizeof(double));
    o->gp_c = (double *)MSX_MALLOC((size_t)d * sizeof(double));
    o->gp_best = (double *)MSX_MALLOC((size_t)d * sizeof(double));
    if (!o->types || !o->topo || !o->mem || !o->theta || !o->cur || !o->curenc || !o->tmpc || !o->tmpe || !o->nb_par || !o->nb_val ||
        !o->gp_dims || !o->gp_X || !o->gp_y || !o->gp_L || !o->gp_alpha || !o->gp_ks || !o->gp_ls || !o->gp_w || !o->gp_u ||
        !o->gp_c || !o->gp_best) {
        msx_opt_free(o);
        return msx__err(MSX_E_NOMEM, "msx_opt_create: out of memory");
    }
    for (i = 0; i < d; i++) {
        const msx__oparam *p = &o->sp->p[i];
        o->types[i] = p->type == MSX_PARAM_CAT ? p->k + (p->parent >= 0 ? 1 : 0) : 0;
    }
    {
        msx__opt_pair *pr = (msx__opt_pair *)MSX_MALLOC((size_t)d * sizeof *pr);
        if (!pr) { msx_opt_free(o); return msx__err(MSX_E_NOMEM, "msx_opt_create: out of memory"); }
        for (i = 0; i < d; i++) { pr[i].v = msx__opt_depth(o->sp, i); pr[i].i = i; }
        qsort(pr, (size_t)d, sizeof *pr, msx__opt_cmp_asc);
        for (i = 0; i < d; i++) o->topo[i] = pr[i].i;
        MSX_FREE(pr);
    }
    { /* descendant lists (in topological order) for local-search switches */
        int pass, q, tot = 0;
        o->desc_off = (int *)MSX_MALLOC((size_t)(d + 1) * sizeof(int));
        if (!o->desc_off) { msx_opt_free(o); return msx__err(MSX_E_NOMEM, "msx_opt_create: out of memory"); }
        for (pass = 0; pass < 2; pass++) {
            tot = 0;
            for (i = 0; i < d; i++) {
                o->desc_off[i] = tot;
                for (q = 0; q < d; q++) {
                    int p = o->topo[q], a = o->sp->p[p].parent, anc = 0;
                    while (a >= 0 && !anc) { anc = a == i; a = o->sp->p[a].parent; }
                    if (anc) { if (pass) o->desc[tot] = p; tot++; }
                }
            }
            o->desc_off[d] = tot;
            if (!pass) {
                o->desc = (int *)MSX_MALLOC((size_t)(tot + 1) * sizeof(int));
                if (!o->desc) { msx_opt_free(o); return msx__err(MSX_E_NOMEM, "msx_opt_create: out of memory"); }
            }
        }
    }
    if (opts->n_init_configs > 0) {
        o->user = (double *)MSX_MALLOC((size_t)opts->n_init_configs * d * sizeof(double));
        if (!o->user) { msx_opt_free(o); return msx__err(MSX_E_NOMEM, "msx_opt_create: out of memory"); }
        for (i = 0; i < opts->n_init_configs; i++) {
            r = msx_space_canonicalize(o->sp, opts->init_configs + (size_t)i * d, o->user + (size_t)i * d);
            if (r != MSX_OK) {
                char msg[700];
                msx__opt_copy_err(msg, sizeof msg);
                msx_opt_free(o);
                return msx__err(r, "msx_opt_create: init_configs[%d]: %s", i, msg);
            }
        }
        o->n_user = opts->n_init_configs;
    }
    if (opts->n_init > 0) n_lhs = opts->n_init;
    else if (opts->n_init < 0) n_lhs = 0;
    else { /* §7 sized by the always-active dimensions (§15), capped at 10 % of
              the budget (SMAC: 25 %; 10 % was better on Hartmann-6 and Branin) */
        int top = 0, cap = opts->n_trials > 0 ? opts->n_trials / 10 : 10;
        for (i = 0; i < d; i++) top += o->sp->p[i].parent < 0;
        if (cap < 1) cap = 1;
        n_lhs = 10 * (top > 0 ? top : 1);
        if (n_lhs > cap) n_lhs = cap;
    }
    r = msx__opt_make_design(o, n_lhs);
    if (r == MSX_OK) r = msx__opt_grow_hist(o, 64);
    if (r == MSX_OK) r = msx__opt_grow_pend(o, 16);
    if (r != MSX_OK) { msx_opt_free(o); return r; }
    *out = o;
    return MSX_OK;
}

/* Scalar training targets for every history row (§3, §10). theta: ParEGO
   weights, or NULL for the mean (multi-objective) / the cost (single).
   Failed trials count as the worst successful cost, never +inf. Returns the
   number of successful rows. */
static int msx__opt_targets(msx_opt *o, const double *theta) {
    const int n = o->n_hist, m = o->n_obj;
    double lo[64], hi[64];
    int i, j, n_ok = 0;
    for (j = 0; j < m; j++) { lo[j] = DBL_MAX; hi[j] = -DBL_MAX; }
    for (i = 0; i < n; i++) {
        if (o->hfail[i]) continue;
        n_ok++;
        for (j = 0; j < m; j++) {
            double c = o->hcost[(size_t)i * m + j];
            if (c < lo[j]) lo[j] = c;
            if (c > hi[j]) hi[j] = c;
        }
    }
    if (!n_ok) return 0;
    for (i = 0; i < n; i++) {
        if (m == 1) {
            o->y[i] = o->hfail[i] ? hi[0] : o->hcost[i];
            continue;
        }
        {
            double mx = -DBL_MAX, sum = 0;
            for (j = 0; j < m; j++) {
                double f = 1.0; /* failed: worst on every objective */
                if (!o->hfail[i]) f = hi[j] - lo[j] < 1e-10 ? 0.0 : (o->hcost[(size_t)i * m + j] - lo[j]) / (hi[j] - lo[j]);
                if (theta) {
                    if (theta[j] * f > mx) mx = theta[j] * f;
                    sum += theta[j] * f;
                } else
                    sum += f / m;
            }
            o->y[i] = theta ? mx + o->rho * sum : sum; /* augmented Tchebycheff or mean */
        }
    }
    memcpy(o->yraw, o->y, (size_t)n * sizeof(double));
    if (o->log_scale) { /* RunHistoryLogScaledEncoder (§3) */
        double mn, mx, p5, mp, pos, span;
        int lo_i;
        for (i = 0; i < n; i++) o->ysort[i] = o->y[i];
        for (i = 1; i < n; i++) { /* insertion sort: n is small and mostly sorted work is cheap */
            double v = o->ysort[i];
            j = i;
            while (j > 0 && o->ysort[j - 1] > v) { o->ysort[j] = o->ysort[j - 1]; j--; }
            o->ysort[j] = v;
        }
        mn = o->ysort[0];
        mx = o->ysort[n - 1];
        pos = 0.05 * (n - 1);
        lo_i = (int)floor(pos);
        p5 = lo_i + 1 < n ? o->ysort[lo_i] + (pos - lo_i) * (o->ysort[lo_i + 1] - o->ysort[lo_i]) : o->ysort[lo_i];
        /* SMAC's 1e-10 plus a scale-aware term, so huge costs cannot make y - m' = 0 */
        mp = mn - (p5 - mn) - (1e-10 + 1e-12 * (fabs(mn) + fabs(mx)));
        if (mp == mx) mp *= 1 - 1e-10;
        span = mx - mp;
        for (i = 0; i < n; i++) {
            double v = span > 0 ? log((o->y[i] - mp) / span) : 0.0;
            o->y[i] = isfinite(v) ? v : -50.0;
        }
    }
    return n_ok;
}

static double msx__opt_acq(const msx_opt *o, const double *enc, double eta) {
    double m, v, le;
    msx_rf_predict(o->rf, enc, &m, &v);
    if (!(v >= o->vfloor)) v = o->vfloor; /* §4.6 */
    msx_acq_ei(eta, m, sqrt(v), o->log_scale, &le);
    return le;
}

/* Fits the forest on the history and computes eta and the child memory.
   Returns the eta (lowest predicted mean over evaluated configs, §5). */
static msx_result msx__opt_fit(msx_opt *o, uint64_t seed, double *eta) {
    msx_rf_options ro;
    msx_result r;
    double t0 = msx_time_now(), best;
    int i, q;
    memset(&ro, 0, sizeof ro);
    ro.n_trees = o->n_trees;
    ro.min_samples_split = o->o.min_samples_split;
    ro.min_samples_leaf = o->o.min_samples_leaf;
    ro.ratio_features = o->o.ratio_features;
    ro.log_y = o->log_scale;
    ro.random_thresholds = o->o.rf_random_thresholds;
    ro.seed = seed;
    r = msx_rf_fit(&o->rf, o->henc, o->y, o->n_hist, o->d, o->types, &ro);
    if (r != MSX_OK) return r;
    best = DBL_MAX;
    for (i = 0; i < o->n_hist; i++) {
        msx_rf_predict(o->rf, o->henc + (size_t)i * o->d, &o->mu[i], NULL);
        if (o->mu[i] < best) best = o->mu[i];
    }
    *eta = best;
    /* Child memory (§15): a child that becomes active during local search
       starts from its value in the best evaluated config that used it. */
    for (q = 0; q < o->d; q++) {
        double by = DBL_MAX, v = msx__sp_default1(&o->sp->p[q]);
        if (o->mem_on)
            for (i = 0; i < o->n_hist; i++) {
                double c = o->hcfg[(size_t)i * o->d + q];
                if (!o->hfail[i] && c == c && o->y[i] < by) { by = o->y[i]; v = c; }
            }
        o->mem[q] = v;
    }
    o->t_fit += msx_time_now() - t0;
    return MSX_OK;
}

/* cur with parameter i set to a new categorical value; activated
   descendants are filled from memory, deactivated ones become NaN; the
   encoding is updated for i and its descendants only. */
static void msx__opt_switch(const msx_opt *o, const double *cur, const double *curenc, int i, double v, double *out,
                            double *outenc) {
    int q;
    memcpy(out, cur, (size_t)o->d * sizeof *out);
    memcpy(outenc, curenc, (size_t)o->d * sizeof *outenc);
    out[i] = v;
    outenc[i] = msx__sp_enc1(&o->sp->p[i], v);
    for (q = o->desc_off[i]; q < o->desc_off[i + 1]; q++) {
        int p = o->desc[q];
        if (!msx__sp_active(o->sp, out, p)) out[p] = NAN;
        else if (out[p] != out[p]) out[p] = o->mem[p];
        outenc[p] = msx__sp_enc1(&o->sp->p[p], out[p]);
    }
}

/* Randomised one-exchange neighbourhood of o->cur (§6.4): 8 Gaussian
   (sd 0.05 in the unit cube, truncated) values per active float, up to 8
   other values per active integer, every other choice per categorical. */
static int msx__opt_neighbours(msx_opt *o, msx_rng *rng) {
    int i, nn = 0, j;
    for (i = 0; i < o->d; i++) {
        const msx__oparam *p = &o->sp->p[i];
        double c = o->cur[i];
        if (c != c) continue;
        if (p->type == MSX_PARAM_CAT) {
            int v;
            for (v = 0; v < p->k; v++)
                if (v != (int)c) { o->nb_par[nn] = i; o->nb_val[nn++] = v; }
        } else if (p->type == MSX_PARAM_FLOAT) {
            double u = msx__sp_to_unit1(p, c);
            int got = 0, tries;
            for (tries = 0; tries < 32 && got < 8; tries++) {
                double un = u + 0.05 * msx_rng_normal(rng);
                if (un < 0 || un > 1 || un == u) continue;
                o->nb_par[nn] = i;
                o->nb_val[nn++] = msx__sp_from_unit1(p, un);
                got++;
            }
        } else if (p->hi > p->lo) {
            int range = (int)(p->hi - p->lo), start = nn, tries;
            if (range <= 8) {
                int v;
                for (v = (int)p->lo; v <= (int)p->hi; v++)
                    if (v != (int)c) { o->nb_par[nn] = i; o->nb_val[nn++] = v; }
            } else {
                double u = msx__sp_to_unit1(p, c);
                for (tries = 0; tries < 32 && nn - start < 8; tries++) {
                    double v = msx__sp_from_unit1(p, u + 0.05 * msx_rng_normal(rng)), dup = v == c;
                    for (j = start; j < nn && !dup; j++) dup = o->nb_val[j] == v;
                    if (!dup) { o->nb_par[nn] = i; o->nb_val[nn++] = v; }
                }
            }
        }
    }
    for (j = nn - 1; j > 0; j--) {
        int r = (int)msx_rng_below(rng, (uint64_t)(j + 1)), tp = o->nb_par[j];
        double tv = o->nb_val[j];
        o->nb_par[j] = o->nb_par[r]; o->nb_val[j] = o->nb_val[r];
        o->nb_par[r] = tp; o->nb_val[r] = tv;
    }
    return nn;
}
static double msx__opt_nb_eval(msx_opt *o, int j, double eta) {
    int i = o->nb_par[j];
    const msx__oparam *p = &o->sp->p[i];
    if (p->type != MSX_PARAM_CAT) { /* one encoded entry changes */
        double old = o->curenc[i], a;
        o->curenc[i] = msx__sp_to_unit1(p, o->nb_val[j]);
        a = msx__opt_acq(o, o->curenc, eta);
        o->curenc[i] = old;
        return a;
    }
    msx__opt_switch(o, o->cur, o->curenc, i, o->nb_val[j], o->tmpc, o->tmpe);
    return msx__opt_acq(o, o->tmpe, eta);
}
static void msx__opt_nb_apply(msx_opt *o, int j) {
    int i = o->nb_par[j];
    if (o->sp->p[i].type != MSX_PARAM_CAT) {
        o->cur[i] = o->nb_val[j];
        o->curenc[i] = msx__sp_to_unit1(&o->sp->p[i], o->nb_val[j]);
        return;
    }
    msx__opt_switch(o, o->cur, o->curenc, i, o->nb_val[j], o->tmpc, o->tmpe);
    memcpy(o->cur, o->tmpc, (size_t)o->d * sizeof(double));
    memcpy(o->curenc, o->tmpe, (size_t)o->d * sizeof(double));
}
/* First-improvement hill climb with plateau walks (§6.3) from o->cur; the
   plateau counter is cumulative, 10 rounds without improvement stop it. */
static double msx__opt_local_search(msx_opt *o, msx_rng *rng, double eta) {
    double acq;
    int evals = 0, walks = 0;
    msx__sp_encode(o->sp, o->cur, o->curenc);
    acq = msx__opt_acq(o, o->curenc, eta);
    while (evals < o->ls_max) {
        int nn = msx__opt_neighbours(o, rng), j, plateau = -1, moved = 0;
        if (nn == 0) break;
        for (j = 0; j < nn && evals < o->ls_max; j++) {
            double a = msx__opt_nb_eval(o, j, eta);
            evals++;
            if (a > acq) { msx__opt_nb_apply(o, j); acq = a; moved = 1; break; }
            if (a == acq && plateau < 0) plateau = j;
        }
        if (moved) continue;
        if (plateau >= 0) msx__opt_nb_apply(o, plateau);
        if (++walks >= 10) break;
    }
    return acq;
}

/* A random perturbation of a good evaluated config (beyond SMAC): each
   active numeric parameter moves with probability min(1, 20/active) by a
   Gaussian step in the unit cube whose scale grows log-linearly from 0.002
   to 0.3 with frac (fine refinement and larger jumps compete);
   categoricals switch with half that probability. */
static void msx__opt_perturb(msx_opt *o, msx_rng *rng, const double *base, double frac, double *out) {
    int i, q, n_act = 0, changed = 0, rounds = 0;
    double pp, sig = exp(log(0.002) + frac * (log(0.3) - log(0.002)));
    memcpy(out, base, (size_t)o->d * sizeof *out);
    for (i = 0; i < o->d; i++) n_act += out[i] == out[i];
    pp = n_act > 20 ? 20.0 / n_act : 1.0;
    while (!changed && rounds++ < 8) { /* a space of constants cannot change */
        for (q = 0; q < o->d; q++) {
            int p = o->topo[q];
            const msx__oparam *pa = &o->sp->p[p];
            if (!msx__sp_active(o->sp, out, p)) { out[p] = NAN; continue; }
            if (out[p] != out[p]) out[p] = o->mem[p]; /* newly active child */
            if (pa->type == MSX_PARAM_CAT) {
                if (pa->k > 1 && msx_rng_uniform(rng) < 0.5 * pp) {
                    int v = (int)msx_rng_below(rng, (uint64_t)(pa->k - 1));
                    out[p] = v >= (int)out[p] ? v + 1 : v;
                    changed = 1;
                }
            } else if (msx_rng_uniform(rng) < pp) {
                double v = msx__sp_from_unit1(pa, msx__sp_to_unit1(pa, out[p]) + sig * msx_rng_normal(rng));
                changed |= v != out[p];
                out[p] = v;
            }
        }
    }
}

/* LocalAndSortedRandomSearch (§6.2), returning as candidates the local-search
   optima and the best random samples (§15), sorted by acquisition. */
static msx_result msx__opt_maximize(msx_opt *o, msx_rng *rng, double eta, int want) {
    const int d = o->d;
    int T = o->n_starts + want, s, i, j, n_start = 0, nh, best[5], nb = 0, np;
    double t0 = msx_time_now();
    msx_result r = msx__opt_grow_top(o, T);
    if (r == MSX_OK) r = msx__opt_grow_cand(o, 2 * o->n_starts + T + 1);
    if (r != MSX_OK) return r;
    o->n_top = 0;
    { /* the best evaluated configs (by training target) seed the perturbation samples */
        for (i = 0; i < o->n_hist; i++) {
            if (o->hfail[i]) continue;
            if (nb == 5) {
                if (o->y[i] >= o->y[best[4]]) continue;
                j = 4;
            } else
                j = nb++;
            while (j > 0 && o->y[best[j - 1]] > o->y[i]) { best[j] = best[j - 1]; j--; }
            best[j] = i;
        }
    }
    np = nb ? o->n_pert : 0;
    /* Perturbations come first with growing step size, then uniform samples:
       on the forest's plateaus of equal acquisition the earliest sample is
       kept, i.e. the one closest to a good evaluated config. */
    for (s = 0; s < o->n_rs + np; s++) { /* sorted random search, keeping the best T */
        double a;
        if (s >= np) msx_space_sample(o->sp, rng, o->tmpc);
        else msx__opt_perturb(o, rng, o->hcfg + (size_t)best[msx_rng_below(rng, (uint64_t)nb)] * d, (double)s / np, o->tmpc);
        msx__sp_encode(o->sp, o->tmpc, o->tmpe);
        a = msx__opt_acq(o, o->tmpe, eta);
        if (o->n_top < T || a > o->top_acq[o->n_top - 1]) {
            int k = o->n_top < T ? o->n_top++ : o->n_top - 1;
            while (k > 0 && o->top_acq[k - 1] < a) {
                o->top_acq[k] = o->top_acq[k - 1];
                memcpy(o->top + (size_t)k * d, o->top + (size_t)(k - 1) * d, (size_t)d * sizeof(double));
                k--;
            }
            o->top_acq[k] = a;
            memcpy(o->top + (size_t)k * d, o->tmpc, (size_t)d * sizeof(double));
        }
    }
    /* starts: the evaluated configs with the lowest predicted mean, then the best random samples */
    nh = o->n_hist;
    for (i = 0; i < nh; i++) { o->rank[i].v = o->mu[i]; o->rank[i].i = i; }
    qsort(o->rank, (size_t)nh, sizeof *o->rank, msx__opt_cmp_asc);
    o->n_cand = 0;
    for (i = 0; i < o->n_starts + (o->n_top < o->n_starts ? o->n_top : o->n_starts); i++) {
        const double *src;
        int dup = 0;
        if (i < o->n_starts) { if (i >= nh) continue; src = o->hcfg + (size_t)o->rank[i].i * d; }
        else src = o->top + (size_t)(i - o->n_starts) * d;
        for (j = 0; j < n_start && !dup; j++) dup = msx__opt_same(o->cand + (size_t)j * d, src, d);
        if (dup) continue;
        memcpy(o->cand + (size_t)n_start * d, src, (size_t)d * sizeof(double));
        n_start++;
    }
    for (i = 0; i < n_start; i++) { /* each start is replaced by its local optimum */
        memcpy(o->cur, o->cand + (size_t)i * d, (size_t)d * sizeof(double));
        o->cand_acq[i] = msx__opt_local_search(o, rng, eta);
        memcpy(o->cand + (size_t)i * d, o->cur, (size_t)d * sizeof(double));
    }
    o->n_cand = n_start;
    for (i = 0; i < o->n_top; i++) {
        memcpy(o->cand + (size_t)o->n_cand * d, o->top + (size_t)i * d, (size_t)d * sizeof(double));
        o->cand_acq[o->n_cand++] = o->top_acq[i];
    }
    /* order by acquisition (stable) via the rank buffer's first slots */
    {
        msx__opt_pair *pr = (msx__opt_pair *)MSX_MALLOC((size_t)o->n_cand * sizeof *pr);
        double *tmp = (double *)MSX_MALLOC((size_t)o->n_cand * d * sizeof(double) + 1);
        if (!pr || !tmp) { MSX_FREE(pr); MSX_FREE(tmp); return msx__err(MSX_E_NOMEM, "optimiser: out of memory"); }
        for (i = 0; i < o->n_cand; i++) { pr[i].v = o->cand_acq[i]; pr[i].i = i; }
        qsort(pr, (size_t)o->n_cand, sizeof *pr, msx__opt_cmp_desc);
        memcpy(tmp, o->cand, (size_t)o->n_cand * d * sizeof(double));
        for (i = 0; i < o->n_cand; i++) {
            memcpy(o->cand + (size_t)i * d, tmp + (size_t)pr[i].i * d, (size_t)d * sizeof(double));
            o->cand_acq[i] = pr[i].v;
        }
        MSX_FREE(pr);
        MSX_FREE(tmp);
    }
    o->t_acq += msx_time_now() - t0;
    return MSX_OK;
}

static void msx__opt_random_unseen(msx_opt *o, msx_rng *rng, double *out, const double *batch, int nb) {
    int t;
    for (t = 0; t < 1000; t++) { /* a finite space may be exhausted: then repeat */
        msx_space_sample(o->sp, rng, out);
        if (!msx__opt_seen(o, out, batch, nb)) return;
    }
}

/* ---- local Gaussian-process refinement (beyond SMAC) ------------------------- */
/* Why: the forest is piecewise constant, so once a basin is found its EI is
   flat there and the optimum is refined only by luck (Hartmann-6 stalled at
   ~6.6x better than random). With probability local_prob a model-based slot
   instead fits a small GP (Matern-5/2, ARD lengthscales chosen by maximising
   the concentrated marginal likelihood over a grid + coordinate passes) on
   the <= MSX__GP_MAXM evaluated configs nearest to the incumbent that share
   its structure (same categorical/integer values and active set), over the
   incumbent's active float dims only, and proposes the maximiser of the GP's
   EI among Gaussian perturbations of the incumbent (TuRBO-like local trust
   region, steps scaled by the relative lengthscales). Everything else of the
   incumbent is kept, so conditional/mixed spaces stay valid. The GP sees the
   raw (standardised) scalar targets, not the log-scaled ones: the log's
   sharp dip at the best point fits a stationary GP badly (Branin median
   regret 4e-5 with log targets vs 6e-6 raw). ParEGO uses it too, on the
   slot's scalarised targets, so each weight vector refines its own part of
   the front. Deterministic: all draws come from the slot's stream; with
   local_prob < 0 no draw is made and proposals equal the forest-only ones. */

/* Matern-5/2 correlation with ARD lengthscales ls. */
static double msx__gp_kern(const double *a, const double *b, const double *ls, int D) {
    double r2 = 0, r;
    int i;
    for (i = 0; i < D; i++) {
        double t = (a[i] - b[i]) / ls[i];
        r2 += t * t;
    }
    r = sqrt(5.0 * r2);
    return (1.0 + r + r * r / 3.0) * exp(-r);
}
/* Fits a zero-mean GP with covariance sf2 * (R + nug I), R the correlation
   of the m rows of X (m x D): Cholesky R + nug I = L L^T (L row-major, lower),
   alpha = (R + nug I)^-1 y, and the maximum-likelihood signal variance
   sf2 = y^T alpha / m. Returns the concentrated negative log marginal
   likelihood m/2 ln sf2 + sum ln L_ii (constants dropped), HUGE_VAL if the
   matrix is not positive definite. */
static double msx__gp_fit(const double *X, const double *y, int m, int D, const double *ls, double nug, double *L,
                          double *alpha, double *sf2) {
    int i, j, k;
    double ld = 0, q = 0;
    for (i = 0; i < m; i++) {
        for (j = 0; j < i; j++) L[(size_t)i * m + j] = msx__gp_kern(X + (size_t)i * D, X + (size_t)j * D, ls, D);
        L[(size_t)i * m + i] = 1.0 + nug;
    }
    for (j = 0; j < m; j++) { /* in-place Cholesky (lower triangle) */
        double s = L[(size_t)j * m + j];
        for (k = 0; k < j; k++) s -= L[(size_t)j * m + k] * L[(size_t)j * m + k];
        if (!(s > 0)) return HUGE_VAL;
        s = sqrt(s);
        L[(size_t)j * m + j] = s;
        ld += log(s);
        for (i = j + 1; i < m; i++) {
            double t = L[(size_t)i * m + j];
            for (k = 0; k < j; k++) t -= L[(size_t)i * m + k] * L[(size_t)j * m + k];
            L[(size_t)i * m + j] = t / s;
        }
    }
    for (i = 0; i < m; i++) { /* L z = y */
        double t = y[i];
        for (k = 0; k < i; k++) t -= L[(size_t)i * m + k] * alpha[k];
        alpha[i] = t / L[(size_t)i * m + i];
    }
    for (i = 0; i < m; i++) q += alpha[i] * alpha[i];
    for (i = m - 1; i >= 0; i--) { /* L^T alpha = z */
        double t = alpha[i];
        for (k = i + 1; k < m; k++) t -= L[(size_t)k * m + i] * alpha[k];
        alpha[i] = t / L[(size_t)i * m + i];
    }
    *sf2 = q / m;
    if (!(*sf2 > 1e-300)) *sf2 = 1e-300;
    return 0.5 * m * log(*sf2) + ld;
}
/* Posterior of the latent function at x (centred mean, variance); ks is
   m doubles of scratch. */
static void msx__gp_predict(const double *X, int m, int D, const double *ls, const double *L, const double *alpha,
                            double sf2, const double *x, double *ks, double *mu, double *var) {
    int i, k;
    double mm = 0, vv = 0;
    for (i = 0; i < m; i++) {
        ks[i] = msx__gp_kern(x, X + (size_t)i * D, ls, D);
        mm += ks[i] * alpha[i];
    }
    for (i = 0; i < m; i++) { /* L v = k* */
        double t = ks[i];
        for (k = 0; k < i; k++) t -= L[(size_t)i * m + k] * ks[k];
        ks[i] = t / L[(size_t)i * m + i];
        vv += ks[i] * ks[i];
    }
    *mu = mm;
    *var = sf2 * (vv < 1 ? 1 - vv : 0);
}
/* Hyperparameters by maximum concentrated likelihood: an isotropic grid of
   lengthscales x nuggets, then coordinate passes scaling each lengthscale by
   1/2 or 2. Leaves the chosen fit in L/alpha/sf2/ls/nug. Returns 0 if no
   setting gave a positive-definite matrix. lsb: D doubles of scratch. */
static int msx__gp_train(const double *X, const double *y, int m, int D, double *ls, double *nug, double *L,
                         double *alpha, double *sf2, double *lsb) {
    static const double nugs[3] = {1e-6, 1e-3, 1e-1};
    double best = HUGE_VAL, bnug = 1e-6, s2, v;
    int g, ni, i, pass, passes = D <= 20 ? 3 : 1;
    for (g = 0; g < 10; g++)
        for (ni = 0; ni < 3; ni++) {
            double l0 = 0.02 * pow(2.0, g);
            for (i = 0; i < D; i++) ls[i] = l0;
            v = msx__gp_fit(X, y, m, D, ls, nugs[ni], L, alpha, &s2);
            if (v < best) { best = v; bnug = nugs[ni]; for (i = 0; i < D; i++) lsb[i] = l0; }
        }
    if (best == HUGE_VAL) return 0;
    memcpy(ls, lsb, (size_t)D * sizeof *ls);
    for (pass = 0; pass < passes && D > 1; pass++)
        for (i = 0; i < D; i++) {
            int f;
            for (f = 0; f < 2; f++) {
                double old = ls[i], t = f ? old * 2 : old * 0.5;
                if (t < 0.01 || t > 100) continue;
                ls[i] = t;
                v = msx__gp_fit(X, y, m, D, ls, bnug, L, alpha, &s2);
                if (v < best) best = v;
                else ls[i] = old;
            }
        }
    *nug = bnug;
    return msx__gp_fit(X, y, m, D, ls, bnug, L, alpha, sf2) < HUGE_VAL;
}

/* The local GP proposal (see above). Needs o->y (training targets) set.
   Writes out and returns 1, or returns 0 (too few compatible points, no
   active float dims, or the winner was already seen): the caller then falls
   back to the forest. */
static int msx__opt_gp_propose(msx_opt *o, msx_rng *rng, double *out, const double *batch, int nb) {
    const int d = o->d, n = o->n_hist, nc = 1500;
    int i, q, D = 0, m = 0, b = -1, c, stage;
    double ymean = 0, ysd = 0, eta, nug, sf2, gm = 0, bestacq = -HUGE_VAL, t0 = msx_time_now();
    const double *bc, *be;
    for (i = 0; i < n; i++)
        if (!o->hfail[i] && (b < 0 || o->y[i] < o->y[b])) b = i;
    if (b < 0) return 0;
    bc = o->hcfg + (size_t)b * d;
    be = o->henc + (size_t)b * d;
    for (q = 0; q < d; q++)
        if (o->sp->p[q].type == MSX_PARAM_FLOAT && bc[q] == bc[q]) o->gp_dims[D++] = q;
    if (D == 0) return 0;
    for (i = 0; i < n; i++) { /* compatible successful configs, by distance to the incumbent */
        const double *ci = o->hcfg + (size_t)i * d, *ei = o->henc + (size_t)i * d;
        double dist = 0;
        int ok = !o->hfail[i];
        for (q = 0; q < d && ok; q++) {
            if ((ci[q] != ci[q]) != (bc[q] != bc[q])) ok = 0;
            else if (o->sp->p[q].type != MSX_PARAM_FLOAT && ci[q] == ci[q] && ci[q] != bc[q]) ok = 0;
        }
        if (!ok) continue;
        for (q = 0; q < D; q++) { double t = ei[o->gp_dims[q]] - be[o->gp_dims[q]]; dist += t * t; }
        o->rank[m].v = dist;
        o->rank[m++].i = i;
    }
    if (m < 5) return 0;
    qsort(o->rank, (size_t)m, sizeof *o->rank, msx__opt_cmp_asc);
    if (m > MSX__GP_MAXM) m = MSX__GP_MAXM;
    for (i = 0; i < m; i++) {
        int h = o->rank[i].i;
        for (q = 0; q < D; q++) o->gp_X[(size_t)i * D + q] = o->henc[(size_t)h * d + o->gp_dims[q]];
        o->gp_y[i] = o->yraw[h];
        ymean += o->yraw[h];
    }
    ymean /= m;
    for (i = 0; i < m; i++) ysd += (o->gp_y[i] - ymean) * (o->gp_y[i] - ymean);
    ysd = sqrt(ysd / m);
    if (!(ysd > 1e-12)) return 0;
    for (i = 0; i < m; i++) o->gp_y[i] = (o->gp_y[i] - ymean) / ysd;
    eta = (o->yraw[b] - ymean) / ysd;
    if (!msx__gp_train(o->gp_X, o->gp_y, m, D, o->gp_ls, &nug, o->gp_L, o->gp_alpha, &sf2, o->gp_u)) return 0;
    for (q = 0; q < D; q++) gm += log(o->gp_ls[q]);
    gm = exp(gm / D);
    for (q = 0; q < D; q++) { /* relative step widths, as TuRBO shapes its trust region */
        double w = o->gp_ls[q] / gm;
        o->gp_w[q] = w < 0.1 ? 0.1 : w > 10 ? 10 : w;
        o->gp_best[q] = be[o->gp_dims[q]];
    }
    /* two rounds: around the incumbent (steps 0.002..0.4), then finer around
       the first round's winner */
    for (stage = 0; stage < 2; stage++) {
        double lo = stage ? log(0.0005) : log(0.002), hi = stage ? log(0.05) : log(0.4);
        double pp = D > 20 ? 20.0 / D : 1.0;
        memcpy(o->gp_c, o->gp_best, (size_t)D * sizeof(double));
        for (c = 0; c < (stage ? nc / 3 : nc); c++) {
            double s = exp(lo + (hi - lo) * msx_rng_uniform(rng)), mu, var, le;
            int forced = (int)msx_rng_below(rng, (uint64_t)D);
            for (q = 0; q < D; q++) {
                double u = o->gp_c[q];
                if (q == forced || msx_rng_uniform(rng) < pp) u += s * o->gp_w[q] * msx_rng_normal(rng);
                o->gp_u[q] = u < 0 ? 0 : u > 1 ? 1 : u;
            }
            msx__gp_predict(o->gp_X, m, D, o->gp_ls, o->gp_L, o->gp_alpha, sf2, o->gp_u, o->gp_ks, &mu, &var);
            if (!(var > 1e-12 * sf2)) var = 1e-12 * sf2;
            msx_acq_ei(eta, mu, sqrt(var), 0, &le);
            if (le > bestacq) { bestacq = le; memcpy(o->gp_best, o->gp_u, (size_t)D * sizeof(double)); }
        }
    }
    o->t_acq += msx_time_now() - t0;
    if (bestacq == -HUGE_VAL) return 0;
    memcpy(out, bc, (size_t)d * sizeof *out);
    for (q = 0; q < D; q++) out[o->gp_dims[q]] = msx__sp_from_unit1(&o->sp->p[o->gp_dims[q]], o->gp_best[q]);
    for (q = 0; q < D; q++) if (out[o->gp_dims[q]] == 0) out[o->gp_dims[q]] = 0.0; /* no -0 */
    return !msx__opt_seen(o, out, batch, nb);
}

MSXDEF msx_result msx_opt_ask(msx_opt *o, int k, double *configs, int *ids) {
    const int d = o ? o->d : 0;
    int j, n_ok = 0, have_list = 0, list_pos = 0, i;
    double eta = 0;
    msx_result r;
    if (!o || !configs || !ids) return msx__err(MSX_E_ARG, "msx_opt_ask: NULL argument");
    if (k < 1) return msx__err(MSX_E_ARG, "msx_opt_ask: k = %d (need >= 1)", k);
    r = msx__opt_grow_pend(o, o->n_pend + k);
    if (r != MSX_OK) return r;
    o->t_fit = o->t_acq = 0;
    for (i = 0; i < o->n_hist; i++) n_ok += !o->hfail[i];
    for (j = 0; j < k; j++) {
        double *out = configs + (size_t)j * d;
        const int slot = o->n_pend;
        msx_rng rng;
        int got = 0, q;
        msx_rng_seed(&rng, msx__opt_seed3(o->o.seed, (uint64_t)o->n_hist, 0x100000u + (uint64_t)slot));
        for (q = 0; q < o->n_design && !got; q++) /* initial design first */
            if (!msx__opt_seen(o, o->design + (size_t)q * d, configs, j)) {
                memcpy(out, o->design + (size_t)q * d, (size_t)d * sizeof(double));
                got = 1;
            }
        if (!got && n_ok >= 1 && o->n_hist >= 2 && !(msx_rng_uniform(&rng) < o->rprob)) {
            if (o->n_obj > 1 && o->o.mo_mode == MSX_MO_PAREGO) {
                /* ParEGO: a fresh weight vector, model and maximisation per proposal */
                msx_simplex_weights(&rng, o->n_obj, o->theta);
                msx__opt_targets(o, o->theta);
                if (o->lprob > 0 && msx_rng_uniform(&rng) < o->lprob && msx__opt_gp_propose(o, &rng, out, configs, j)) {
                    got = 1; /* local GP refinement of this weight vector's incumbent */
                } else {
                    r = msx__opt_fit(o, msx_rng_u64(&rng), &eta);
                    if (r == MSX_OK) r = msx__opt_maximize(o, &rng, eta, 1);
                    if (r != MSX_OK) return r;
                }
                for (q = 0; q < o->n_cand && !got; q++)
                    if (!msx__opt_seen(o, o->cand + (size_t)q * d, configs, j)) {
                        memcpy(out, o->cand + (size_t)q * d, (size_t)d * sizeof(double));
                        got = 1;
                    }
            } else if (o->lprob > 0 && msx_rng_uniform(&rng) < o->lprob &&
                       (msx__opt_targets(o, NULL), msx__opt_gp_propose(o, &rng, out, configs, j))) {
                got = 1; /* local GP refinement of the incumbent */
            } else {
                if (!have_list) { /* one model for the whole batch: k distinct maxima */
                    msx_rng mr;
                    msx_rng_seed(&mr, msx__opt_seed3(o->o.seed, (uint64_t)o->n_hist, 0xF17u));
                    msx__opt_targets(o, NULL);
                    r = msx__opt_fit(o, msx_rng_u64(&mr), &eta);
                    if (r == MSX_OK) r = msx__opt_maximize(o, &mr, eta, k + o->n_pend);
                    if (r != MSX_OK) return r;
                    have_list = 1;
                }
                for (; list_pos < o->n_cand && !got; list_pos++)
                    if (!msx__opt_seen(o, o->cand + (size_t)list_pos * d, configs, j)) {
                        memcpy(out, o->cand + (size_t)list_pos * d, (size_t)d * sizeof(double));
                        got = 1;
                    }
                list_pos = 0; /* later slots rescan: earlier picks are excluded as batch members */
            }
        }
        if (!got) msx__opt_random_unseen(o, &rng, out, configs, j);
        memcpy(o->pcfg + (size_t)o->n_pend * d, out, (size_t)d * sizeof(double));
        o->phash[o->n_pend] = msx__opt_hash(out, d);
        o->pid[o->n_pend] = o->next_id++;
        ids[j] = o->pid[o->n_pend];
        o->n_pend++;
    }
    return MSX_OK;
}

static void msx__opt_drop_pending(msx_opt *o, int p) {
    int rest = o->n_pend - p - 1;
    memmove(o->pcfg + (size_t)p * o->d, o->pcfg + (size_t)(p + 1) * o->d, (size_t)rest * o->d * sizeof(double));
    memmove(o->pid + p, o->pid + p + 1, (size_t)rest * sizeof(int));
    memmove(o->phash + p, o->phash + p + 1, (size_t)rest * sizeof(uint64_t));
    o->n_pend--;
}
MSXDEF msx_result msx_opt_tell(msx_opt *o, int id, const double *costs, int failed) {
    int p;
    msx_result r;
    if (!o) return msx__err(MSX_E_ARG, "msx_opt_tell: optimiser is NULL");
    for (p = 0; p < o->n_pend; p++)
        if (o->pid[p] == id) break;
    if (p == o->n_pend)
        return msx__err(MSX_E_ARG, "msx_opt_tell: trial id %d is not pending (never asked, already told or cancelled)", id);
    r = msx__opt_check_costs(o, costs, failed, "msx_opt_tell");
    if (r != MSX_OK) return r;
    r = msx__opt_push_hist(o, o->pcfg + (size_t)p * o->d, costs, failed, id);
    if (r != MSX_OK) return r;
    msx__opt_drop_pending(o, p);
    return MSX_OK;
}
MSXDEF msx_result msx_opt_tell_config(msx_opt *o, const double *config, const double *costs, int failed) {
    int p, id;
    msx_result r;
    uint64_t h;
    if (!o || !config) return msx__err(MSX_E_ARG, "msx_opt_tell_config: NULL argument");
    r = msx_space_canonicalize(o->sp, config, o->tmpc);
    if (r != MSX_OK) return r;
    r = msx__opt_check_costs(o, costs, failed, "msx_opt_tell_config");
    if (r != MSX_OK) return r;
    h = msx__opt_hash(o->tmpc, o->d);
    for (p = 0; p < o->n_pend; p++)
        if (o->phash[p] == h && msx__opt_same(o->pcfg + (size_t)p * o->d, o->tmpc, o->d)) break;
    id = p < o->n_pend ? o->pid[p] : o->next_id++;
    r = msx__opt_push_hist(o, o->tmpc, costs, failed, id);
    if (r != MSX_OK) return r;
    if (p < o->n_pend) msx__opt_drop_pending(o, p);
    return MSX_OK;
}
MSXDEF msx_result msx_opt_cancel(msx_opt *o, int id) {
    int p;
    if (!o) return msx__err(MSX_E_ARG, "msx_opt_cancel: optimiser is NULL");
    for (p = 0; p < o->n_pend; p++)
        if (o->pid[p] == id) { msx__opt_drop_pending(o, p); return MSX_OK; }
    return msx__err(MSX_E_ARG, "msx_opt_cancel: trial id %d is not pending", id);
}

MSXDEF int msx_opt_best(const msx_opt *o, double *config, double *costs) {
    int i, j, best = -1;
    const int m = o ? o->n_obj : 1;
    if (!o) return -1;
    if (m == 1) {
        for (i = 0; i < o->n_hist; i++)
            if (!o->hfail[i] && (best < 0 || o->hcost[i] < o->hcost[best])) best = i;
    } else {
        double lo[64], hi[64], bs = DBL_MAX, bm = DBL_MAX;
        int f;
        for (j = 0; j < m; j++) { lo[j] = DBL_MAX; hi[j] = -DBL_MAX; }
        for (i = 0; i < o->n_hist; i++)
            if (!o->hfail[i])
                for (j = 0; j < m; j++) {
                    double c = o->hcost[(size_t)i * m + j];
                    if (c < lo[j]) lo[j] = c;
                    if (c > hi[j]) hi[j] = c;
                }
        for (f = 0; f < o->n_front; f++) {
            double s = 0, mx = -DBL_MAX;
            i = o->front[f];
            for (j = 0; j < m; j++) {
                double v = hi[j] > lo[j] ? (o->hcost[(size_t)i * m + j] - lo[j]) / (hi[j] - lo[j]) : 0.0;
                s += v / m;
                if (v > mx) mx = v;
            }
            if (best < 0 || s < bs || (s == bs && mx < bm)) { best = i; bs = s; bm = mx; }
        }
    }
    if (best >= 0) {
        if (config) memcpy(config, o->hcfg + (size_t)best * o->d, (size_t)o->d * sizeof(double));
        if (costs) memcpy(costs, o->hcost + (size_t)best * m, (size_t)m * sizeof(double));
    }
    return best;
}
MSXDEF int msx_opt_pareto(const msx_opt *o, int *idx, int max) {
    int i;
    if (!o) return 0;
    for (i = 0; idx && i < o->n_front && i < max; i++) idx[i] = o->front[i];
    return o->n_front;
}
MSXDEF msx_result msx_opt_history(const msx_opt *o, int i, double *config, double *costs) {
    if (!o || i < 0 || i >= o->n_hist)
        return msx__err(MSX_E_ARG, "msx_opt_history: index %d out of range (%d told)", i, o ? o->n_hist : 0);
    if (config) memcpy(config, o->hcfg + (size_t)i * o->d, (size_t)o->d * sizeof(double));
    if (costs) memcpy(costs, o->hcost + (size_t)i * o->n_obj, (size_t)o->n_obj * sizeof(double));
    return MSX_OK;
}
MSXDEF int msx_opt_history_failed(const msx_opt *o, int i) {
    return o && i >= 0 && i < o->n_hist ? o->hfail[i] : 0;
}
MSXDEF int msx_opt_history_id(const msx_opt *o, int i) {
    return o && i >= 0 && i < o->n_hist ? o->hid[i] : -1;
}

/* ---- state file ---------------------------------------------------------------- */

static void msx__opt_json_vec(msx__sb *b, const double *v, int n) {
    int i;
    msx__sb_puts(b, "[");
    for (i = 0; i < n; i++) {
        if (i) msx__sb_puts(b, ",");
        msx__sb_json_num(b, v[i]); /* NaN (inactive) -> null */
    }
    msx__sb_puts(b, "]");
}
MSXDEF msx_result msx_opt_save(const msx_opt *o, const char *path) {
    msx__sb b = {0, 0, 0, 0};
    const msx_opt_options *op;
    msx_result r;
    int i, c;
    if (!o || !path) return msx__err(MSX_E_ARG, "msx_opt_save: NULL argument");
    op = &o->o;
    msx__sb_puts(&b, "{\"format\":\"" MSX__OPT_FORMAT "\",\n\"space\":[");
    for (i = 0; i < o->d; i++) {
        const msx__oparam *p = &o->sp->p[i];
        msx__sb_puts(&b, i ? ",\n {\"name\":" : "\n {\"name\":");
        msx__sb_json_str(&b, p->name);
        msx__sb_printf(&b, ",\"type\":\"%s\",\"lo\":", p->type == MSX_PARAM_FLOAT ? "float" : p->type == MSX_PARAM_INT ? "int" : "cat");
        msx__sb_json_num(&b, p->lo);
        msx__sb_puts(&b, ",\"hi\":");
        msx__sb_json_num(&b, p->hi);
        msx__sb_printf(&b, ",\"log\":%d,\"parent\":%d,\"value\":%d", p->log, p->parent, p->pval);
        if (p->type == MSX_PARAM_CAT) {
            msx__sb_puts(&b, ",\"choices\":[");
            for (c = 0; c < p->k; c++) {
                if (c) msx__sb_puts(&b, ",");
                if (p->choices && p->choices[c]) msx__sb_json_str(&b, p->choices[c]);
                else msx__sb_puts(&b, "null");
            }
            msx__sb_puts(&b, "]");
        }
        msx__sb_puts(&b, "}");
    }
    msx__sb_printf(&b, "],\n\"options\":{\"seed\":\"%llu\",\"n_objectives\":%d,\"n_trials\":%d,\"n_init\":%d,\"init_mode\":%d,"
                       "\"init_configs_last\":%d,\"mo_mode\":%d,\"no_log_scale\":%d,\"n_trees\":%d,\"min_samples_split\":%d,"
                       "\"min_samples_leaf\":%d,\"n_random_samples\":%d,\"n_local_starts\":%d,\"ls_max_evals\":%d,"
                       "\"no_child_memory\":%d,\"n_perturb_samples\":%d,\"rf_random_thresholds\":%d,\"random_prob\":",
                   (unsigned long long)op->seed, op->n_objectives, op->n_trials, op->n_init, (int)op->init_mode,
                   op->init_configs_last, (int)op->mo_mode, op->no_log_scale, op->n_trees, op->min_samples_split,
                   op->min_samples_leaf, op->n_random_samples, op->n_local_starts, op->ls_max_evals, op->no_child_memory, op->n_perturb_samples, op->rf_random_thresholds);
    msx__sb_json_num(&b, op->random_prob);
    msx__sb_puts(&b, ",\"parego_rho\":");
    msx__sb_json_num(&b, op->parego_rho);
    msx__sb_puts(&b, ",\"ratio_features\":");
    msx__sb_json_num(&b, op->ratio_features);
    msx__sb_puts(&b, ",\"var_floor\":");
    msx__sb_json_num(&b, op->var_floor);
    msx__sb_puts(&b, ",\"local_prob\":");
    msx__sb_json_num(&b, op->local_prob);
    msx__sb_puts(&b, "},\n\"init_configs\":[");
    for (i = 0; i < o->n_user; i++) {
        msx__sb_puts(&b, i ? ",\n " : "\n ");
        msx__opt_json_vec(&b, o->user + (size_t)i * o->d, o->d);
    }
    msx__sb_printf(&b, "],\n\"next_id\":%d,\n\"trials\":[", o->next_id);
    for (i = 0; i < o->n_hist; i++) {
        msx__sb_printf(&b, "%s{\"id\":%d,\"failed\":%d,\"costs\":", i ? ",\n " : "\n ", o->hid[i], o->hfail[i]);
        msx__opt_json_vec(&b, o->hcost + (size_t)i * o->n_obj, o->n_obj);
        msx__sb_puts(&b, ",\"config\":");
        msx__opt_json_vec(&b, o->hcfg + (size_t)i * o->d, o->d);
        msx__sb_puts(&b, "}");
    }
    msx__sb_puts(&b, "],\n\"pending\":[");
    for (i = 0; i < o->n_pend; i++) {
        msx__sb_printf(&b, "%s{\"id\":%d,\"config\":", i ? ",\n " : "\n ", o->pid[i]);
        msx__opt_json_vec(&b, o->pcfg + (size_t)i * o->d, o->d);
        msx__sb_puts(&b, "}");
    }
    msx__sb_puts(&b, "]}\n");
    if (b.oom) { msx__sb_free(&b); return msx__err(MSX_E_NOMEM, "%s: out of memory writing the optimiser state", path); }
    r = msx_write_file_atomic(path, b.s, b.n);
    msx__sb_free(&b);
    return r;
}

/* Array of n numbers (null = NaN). */
static int msx__opt_jvec(const msx__json *a, int n, double *out) {
    int i;
    if (!a || a->type != MSX__JARR || a->n != n) return 0;
    for (i = 0; i < n; i++) {
        if (a->kids[i].type == MSX__JNUM) out[i] = a->kids[i].num;
        else if (a->kids[i].type == MSX__JNULL) out[i] = NAN;
        else return 0;
    }
    return 1;
}
static int msx__opt_jint(const msx__json *j, const char *key, int *out) {
    double v;
    if (!msx__json_num(j, key, &v, 0) || v != floor(v) || fabs(v) > 2e9) return 0;
    *out = (int)v;
    return 1;
}

MSXDEF msx_result msx_opt_load(const msx_space *space, const char *path, msx_opt **out) {
    void *buf = NULL;
    size_t len = 0;
    msx__json *j = NULL;
    const msx__json *js, *jo, *jt, *jp, *ju;
    msx_space *fs = NULL;
    msx_opt_options op;
    msx_opt *o = NULL;
    msx_result r;
    double *tmp = NULL, *cost = NULL;
    char msg[600];
    const char *fmt, *seed_s;
    int i, iv, m;
    if (!out) return msx__err(MSX_E_ARG, "msx_opt_load: out is NULL");
    *out = NULL;
    if (!space || !path) return msx__err(MSX_E_ARG, "msx_opt_load: NULL argument");
    r = msx_read_file(path, 0, &buf, &len);
    if (r != MSX_OK) return r;
    j = msx__json_parse((const char *)buf, len, path);
    msx_free(buf);
    if (!j) {
        msx__opt_copy_err(msg, sizeof msg);
        return msx__err(MSX_E_FORMAT, "optimiser state is truncated or corrupt: %s", msg);
    }
#define MSX__OPT_BAD(...) do { r = msx__err(MSX_E_FORMAT, __VA_ARGS__); goto done; } while (0)
    fmt = msx__json_str(j, "format");
    if (!fmt || strcmp(fmt, MSX__OPT_FORMAT))
        MSX__OPT_BAD("%s: not an optimiser state (format tag '%s', expected '" MSX__OPT_FORMAT "')", path, fmt ? fmt : "(none)");
    js = msx__json_get(j, "space");
    jo = msx__json_get(j, "options");
    jt = msx__json_get(j, "trials");
    jp = msx__json_get(j, "pending");
    ju = msx__json_get(j, "init_configs");
    if (!js || js->type != MSX__JARR || !jo || jo->type != MSX__JOBJ || !jt || jt->type != MSX__JARR || !jp ||
        jp->type != MSX__JARR || !ju || ju->type != MSX__JARR)
        MSX__OPT_BAD("%s: optimiser state lacks one of space/options/trials/pending/init_configs", path);
    fs = msx_space_new();
    if (!fs) { r = MSX_E_NOMEM; goto done; }
    for (i = 0; i < js->n; i++) { /* rebuild the saved space to compare it */
        const msx__json *e = &js->kids[i];
        const char *nm = msx__json_str(e, "name"), *ty = msx__json_str(e, "type");
        double lo, hi;
        int lg, par, val, idx = -1;
        if (!nm || !ty || !msx__json_num(e, "lo", &lo, NAN) || !msx__json_num(e, "hi", &hi, NAN) ||
            !msx__opt_jint(e, "log", &lg) || !msx__opt_jint(e, "parent", &par) || !msx__opt_jint(e, "value", &val))
            MSX__OPT_BAD("%s: space entry %d is malformed", path, i);
        if (!strcmp(ty, "float")) idx = msx_space_add_float(fs, nm, lo, hi, lg);
        else if (!strcmp(ty, "int")) idx = msx_space_add_int(fs, nm, (int)lo, (int)hi, lg);
        else if (!strcmp(ty, "cat")) {
            const msx__json *ch = msx__json_get(e, "choices");
            const char *names[MSX_SPACE_MAX_CHOICES];
            int c;
            if (!ch || ch->type != MSX__JARR || ch->n < 1 || ch->n > MSX_SPACE_MAX_CHOICES)
                MSX__OPT_BAD("%s: space entry %d ('%s') has bad choices", path, i, nm);
            for (c = 0; c < ch->n; c++) names[c] = ch->kids[c].type == MSX__JSTR ? ch->kids[c].str : NULL;
            idx = msx_space_add_cat(fs, nm, ch->n, names); /* unnamed choices compare equal to NULL names */
        }
        if (idx < 0) {
            msx__opt_copy_err(msg, sizeof msg);
            MSX__OPT_BAD("%s: space entry %d: %s", path, i, msg);
        }
        fs->p[idx].parent = par;
        fs->p[idx].pval = val;
    }
    if (!msx__sp_equal(space, fs, msg, sizeof msg)) {
        r = msx__err(MSX_E_STATE, "%s: the saved search space differs from the given one (%s); resume with the same space", path, msg);
        goto done;
    }
    memset(&op, 0, sizeof op);
    seed_s = msx__json_str(jo, "seed");
    if (!seed_s) MSX__OPT_BAD("%s: options.seed missing", path);
    op.seed = (uint64_t)strtoull(seed_s, NULL, 10);
    if (!msx__opt_jint(jo, "n_objectives", &op.n_objectives) || !msx__opt_jint(jo, "n_trials", &op.n_trials) ||
        !msx__opt_jint(jo, "n_init", &op.n_init) || !msx__opt_jint(jo, "init_configs_last", &op.init_configs_last) ||
        !msx__opt_jint(jo, "no_log_scale", &op.no_log_scale) || !msx__opt_jint(jo, "n_trees", &op.n_trees) ||
        !msx__opt_jint(jo, "min_samples_split", &op.min_samples_split) ||
        !msx__opt_jint(jo, "min_samples_leaf", &op.min_samples_leaf) ||
        !msx__opt_jint(jo, "n_random_samples", &op.n_random_samples) ||
        !msx__opt_jint(jo, "n_local_starts", &op.n_local_starts) || !msx__opt_jint(jo, "ls_max_evals", &op.ls_max_evals) ||
        !msx__opt_jint(jo, "no_child_memory", &op.no_child_memory) ||
        !msx__opt_jint(jo, "n_perturb_samples", &op.n_perturb_samples) ||
        !msx__opt_jint(jo, "rf_random_thresholds", &op.rf_random_thresholds) ||
        !msx__json_num(jo, "random_prob", &op.random_prob, 0) || !msx__json_num(jo, "parego_rho", &op.parego_rho, 0) ||
        !msx__json_num(jo, "ratio_features", &op.ratio_features, 0) || !msx__json_num(jo, "var_floor", &op.var_floor, 0) ||
        !msx__json_num(jo, "local_prob", &op.local_prob, 0))
        MSX__OPT_BAD("%s: malformed options", path);
    if (!msx__opt_jint(jo, "init_mode", &iv)) MSX__OPT_BAD("%s: malformed options.init_mode", path);
    op.init_mode = (msx_init_mode)iv;
    if (!msx__opt_jint(jo, "mo_mode", &iv)) MSX__OPT_BAD("%s: malformed options.mo_mode", path);
    op.mo_mode = (msx_mo_mode)iv;
    m = op.n_objectives > 0 ? op.n_objectives : 1;
    tmp = (double *)MSX_MALLOC((size_t)(ju->n + 1) * space->n * sizeof(double));
    cost = (double *)MSX_MALLOC((size_t)(m > 0 && m <= 64 ? m : 1) * sizeof(double));
    if (!tmp || !cost) { r = msx__err(MSX_E_NOMEM, "msx_opt_load: out of memory"); goto done; }
    for (i = 0; i < ju->n; i++)
        if (!msx__opt_jvec(&ju->kids[i], space->n, tmp + (size_t)i * space->n))
            MSX__OPT_BAD("%s: init_configs[%d] is not an array of %d numbers", path, i, space->n);
    op.init_configs = tmp;
    op.n_init_configs = ju->n;
    r = msx_opt_create(space, &op, &o);
    if (r != MSX_OK) goto done;
    for (i = 0; i < jt->n; i++) {
        const msx__json *e = &jt->kids[i];
        int id, failed;
        if (!msx__opt_jint(e, "id", &id) || !msx__opt_jint(e, "failed", &failed) ||
            !msx__opt_jvec(msx__json_get(e, "config"), o->d, o->tmpc) || !msx__opt_jvec(msx__json_get(e, "costs"), o->n_obj, cost))
            MSX__OPT_BAD("%s: trial %d is malformed", path, i);
        r = msx_space_canonicalize(o->sp, o->tmpc, o->tmpc);
        if (r == MSX_OK) r = msx__opt_check_costs(o, cost, failed, "trial");
        if (r != MSX_OK) {
            msx__opt_copy_err(msg, sizeof msg);
            MSX__OPT_BAD("%s: trial %d: %s", path, i, msg);
        }
        r = msx__opt_push_hist(o, o->tmpc, cost, failed, id);
        if (r != MSX_OK) goto done;
    }
    for (i = 0; i < jp->n; i++) {
        const msx__json *e = &jp->kids[i];
        int id;
        if (!msx__opt_jint(e, "id", &id) || !msx__opt_jvec(msx__json_get(e, "config"), o->d, o->tmpc) ||
            msx_space_canonicalize(o->sp, o->tmpc, o->tmpc) != MSX_OK)
            MSX__OPT_BAD("%s: pending trial %d is malformed", path, i);
        r = msx__opt_grow_pend(o, o->n_pend + 1);
        if (r != MSX_OK) goto done;
        memcpy(o->pcfg + (size_t)o->n_pend * o->d, o->tmpc, (size_t)o->d * sizeof(double));
        o->phash[o->n_pend] = msx__opt_hash(o->tmpc, o->d);
        o->pid[o->n_pend++] = id;
    }
    if (!msx__opt_jint(j, "next_id", &o->next_id)) MSX__OPT_BAD("%s: next_id missing", path);
    r = MSX_OK;
done:
#undef MSX__OPT_BAD
    msx__json_free(j);
    msx_space_free(fs);
    MSX_FREE(tmp);
    MSX_FREE(cost);
    if (r != MSX_OK) { msx_opt_free(o); return r; }
    *out = o;
    return MSX_OK;
}
#undef MSX__OPT_GROW
