/* medsamix bench-opt - the optimiser against uniform random search at equal
   budget on functions with known optima (Branin, Hartmann-6, ... as tabulated by
   Surjanovic & Bingham's Virtual Library of Simulation Experiments), plus
   the per-iteration overhead in a MedSAMix-shaped conditional space. */
#include "../medsamix.h"
#include "cli.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct bench_fn {
    const char *name;
    int n_obj, evals;
    double fstar;      /* single objective optimum */
    double ref[3];     /* hypervolume reference point */
    double hvstar;     /* hypervolume of the true front at ref */
    msx_space *(*space)(void);
    void (*eval)(const double *x, double *f);
} bench_fn;

static const double PI_ = 3.14159265358979323846;

static msx_space *sp_box(int d, double lo, double hi) {
    msx_space *s = msx_space_new();
    char nm[16];
    int i;
    for (i = 0; i < d; i++) { snprintf(nm, sizeof nm, "x%d", i + 1); msx_space_add_float(s, nm, lo, hi, 0); }
    return s;
}
static msx_space *sp_branin(void) {
    msx_space *s = msx_space_new();
    msx_space_add_float(s, "x1", -5, 10, 0);
    msx_space_add_float(s, "x2", 0, 15, 0);
    return s;
}
static void f_branin(const double *x, double *f) {
    double b = 5.1 / (4 * PI_ * PI_), c = 5 / PI_, t = 1 / (8 * PI_), u = x[1] - b * x[0] * x[0] + c * x[0] - 6;
    f[0] = u * u + 10 * (1 - t) * cos(x[0]) + 10;
}
static msx_space *sp_unit6(void) { return sp_box(6, 0, 1); }
static void f_hartmann6(const double *x, double *f) {
    static const double al[4] = {1.0, 1.2, 3.0, 3.2};
    static const double A[4][6] = {{10, 3, 17, 3.5, 1.7, 8}, {0.05, 10, 17, 0.1, 8, 14}, {3, 3.5, 1.7, 10, 17, 8}, {17, 8, 0.05, 10, 0.1, 14}};
    static const double P[4][6] = {{1312, 1696, 5569, 124, 8283, 5886}, {2329, 4135, 8307, 3736, 1004, 9991},
                                   {2348, 1451, 3522, 2883, 3047, 6650}, {4047, 8828, 8732, 5743, 1091, 381}};
    double s = 0;
    int i, j;
    for (i = 0; i < 4; i++) {
        double e = 0;
        for (j = 0; j < 6; j++) { double q = x[j] - 1e-4 * P[i][j]; e += A[i][j] * q * q; }
        s += al[i] * exp(-e);
    }
    f[0] = -s;
}
/* Jenatton et al. 2017 (Ax hierarchical version). */
static msx_space *sp_jenatton(void) {
    msx_space *s = msx_space_new();
    int x1 = msx_space_add_cat(s, "x1", 2, NULL), x2 = msx_space_add_cat(s, "x2", 2, NULL), x3 = msx_space_add_cat(s, "x3", 2, NULL);
    int x4 = msx_space_add_float(s, "x4", 0, 1, 0), x5 = msx_space_add_float(s, "x5", 0, 1, 0);
    int x6 = msx_space_add_float(s, "x6", 0, 1, 0), x7 = msx_space_add_float(s, "x7", 0, 1, 0);
    int r8 = msx_space_add_float(s, "r8", 0, 1, 0), r9 = msx_space_add_float(s, "r9", 0, 1, 0);
    msx_space_add_condition(s, x2, x1, 0);
    msx_space_add_condition(s, x3, x1, 1);
    msx_space_add_condition(s, x4, x2, 0);
    msx_space_add_condition(s, x5, x2, 1);
    msx_space_add_condition(s, x6, x3, 0);
    msx_space_add_condition(s, x7, x3, 1);
    msx_space_add_condition(s, r8, x1, 0);
    msx_space_add_condition(s, r9, x1, 1);
    return s;
}
static void f_jenatton(const double *x, double *f) {
    if (x[0] == 0) f[0] = x[1] == 0 ? x[3] * x[3] + 0.1 + x[7] : x[4] * x[4] + 0.2 + x[7];
    else f[0] = x[2] == 0 ? x[5] * x[5] + 0.3 + x[8] : x[6] * x[6] + 0.4 + x[8];
}
static void f_zdt1(const double *x, double *f) {
    double g = 0;
    int i;
    for (i = 1; i < 6; i++) g += x[i];
    g = 1 + 9 * g / 5;
    f[0] = x[0];
    f[1] = g * (1 - sqrt(x[0] / g));
}
static void f_dtlz2(const double *x, double *f) {
    double g = 0;
    int i;
    for (i = 2; i < 6; i++) g += (x[i] - 0.5) * (x[i] - 0.5);
    f[0] = (1 + g) * cos(x[0] * PI_ / 2) * cos(x[1] * PI_ / 2);
    f[1] = (1 + g) * cos(x[0] * PI_ / 2) * sin(x[1] * PI_ / 2);
    f[2] = (1 + g) * sin(x[0] * PI_ / 2);
}

static const bench_fn FUNCS[] = {
    {"branin", 1, 100, 0.397887357729739, {0, 0, 0}, 0, sp_branin, f_branin},
    {"hartmann6", 1, 100, -3.32236801141551, {0, 0, 0}, 0, sp_unit6, f_hartmann6},
    {"jenatton", 1, 100, 0.1, {0, 0, 0}, 0, sp_jenatton, f_jenatton},
    {"zdt1", 2, 100, 0, {11, 11, 0}, 120.0 + 2.0 / 3.0, sp_unit6, f_zdt1},
    {"dtlz2", 3, 150, 0, {1.1, 1.1, 1.1}, 0.807401, sp_unit6, f_dtlz2},
};

/* Metric of an evaluated set: regret (single objective) or hypervolume. */
static double metric(const bench_fn *fn, const double *costs, int n) {
    if (fn->n_obj == 1) {
        double b = costs[0];
        int i;
        for (i = 1; i < n; i++) if (costs[i] < b) b = costs[i];
        return b - fn->fstar;
    }
    return msx_hypervolume(costs, n, fn->n_obj, fn->ref);
}

static msx_opt_options g_opts; /* overrides from the command line (zero = defaults) */

static int run_bo(const bench_fn *fn, uint64_t seed, int evals, double *out, double *secs) {
    msx_space *s = fn->space();
    msx_opt_options o;
    msx_opt *opt = NULL;
    double *x = (double *)malloc(sizeof(double) * 16), *costs = (double *)malloc(sizeof(double) * 3 * (size_t)evals), t0 = msx_time_now();
    int i, id, ok = 1;
    o = g_opts;
    o.seed = seed;
    o.n_objectives = fn->n_obj;
    o.n_trials = evals;
    if (msx_opt_create(s, &o, &opt) != MSX_OK) ok = 0;
    for (i = 0; ok && i < evals; i++) {
        if (msx_opt_ask(opt, 1, x, &id) != MSX_OK) { ok = 0; break; }
        fn->eval(x, costs + (size_t)i * fn->n_obj);
        if (msx_opt_tell(opt, id, costs + (size_t)i * fn->n_obj, 0) != MSX_OK) ok = 0;
    }
    if (!ok) fprintf(stderr, "bench-opt: %s: %s\n", fn->name, msx_last_error());
    *out = metric(fn, costs, evals);
    *secs = msx_time_now() - t0;
    msx_opt_free(opt);
    msx_space_free(s);
    free(x);
    free(costs);
    return ok;
}
static void run_random(const bench_fn *fn, uint64_t seed, int evals, double *out) {
    msx_space *s = fn->space();
    msx_rng r;
    double x[16], *costs = (double *)malloc(sizeof(double) * 3 * (size_t)evals);
    int i;
    msx_rng_seed(&r, seed * 7919u + 17u);
    for (i = 0; i < evals; i++) {
        msx_space_sample(s, &r, x);
        fn->eval(x, costs + (size_t)i * fn->n_obj);
    }
    *out = metric(fn, costs, evals);
    msx_space_free(s);
    free(costs);
}
static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static double quant(double *v, int n, double q) {
    double pos = q * (n - 1);
    int lo = (int)floor(pos);
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    return lo + 1 < n ? v[lo] + (pos - lo) * (v[lo + 1] - v[lo]) : v[lo];
}

/* MedSAMix-shaped space: per group a method {linear, task_arithmetic, ties,
   slerp} with linear weights per model, the TA scale, TIES drop rate and
   scale, SLERP t per model (models = base + 2 fine-tuned). */
/* The real MedSAMix space of the search driver: ViT-B depth 12,
   granularity 2, base + 2 models, no pruning = 19 groups x 10 dims. */
static msx_space *medsamix_space(void) {
    static const char *const stems[3] = {"sam", "medsam", "medicosam"};
    msx_space *s = NULL;
    if (msx_search_space_create(12, 2, stems, 3, 0, &s) != MSX_OK) fprintf(stderr, "bench-opt: %s\n", msx_last_error());
    return s;
}
/* synthetic cost with a known structure: method offset + quadratic in the active children */
static double medsamix_cost(const msx_space *s, const double *x) {
    int i, d = msx_space_dim(s);
    double f = 0;
    for (i = 0; i < d; i++) {
        if (x[i] != x[i]) continue;
        if (msx_space_type(s, i) == MSX_PARAM_CAT) f += 0.1 * x[i];
        else f += (x[i] - 0.3) * (x[i] - 0.3);
    }
    return f;
}

/* local = 1: every observation uses method linear in every group and every
   model-based slot takes the local GP stage (its worst case: 57 active float
   dims, 64 GP points). */
static void overhead(int reps, int local) {
    msx_space *s = medsamix_space();
    msx_opt_options o;
    msx_opt *opt = NULL;
    msx_rng r;
    int d, i, id;
    double *x, t[32], tc[32], tf[32], ta[32], c;
    if (!s) return;
    d = msx_space_dim(s);
    x = (double *)malloc(sizeof(double) * (size_t)d);
    memset(&o, 0, sizeof o);
    o.seed = 1;
    o.n_init = -1;
    if (local) { o.local_prob = 1; o.random_prob = -1; }
    if (msx_opt_create(s, &o, &opt) != MSX_OK) { fprintf(stderr, "bench-opt: %s\n", msx_last_error()); return; }
    msx_rng_seed(&r, 99);
    for (i = 0; i < 200; i++) {
        msx_space_sample(s, &r, x);
        if (local) {
            int q;
            for (q = 0; q < d; q++) x[q] = msx_space_type(s, q) == MSX_PARAM_CAT ? 0 : msx_rng_uniform(&r);
            msx_space_canonicalize(s, x, x);
        }
        c = medsamix_cost(s, x);
        msx_opt_tell_config(opt, x, &c, 0);
    }
    if (reps > 32) reps = 32;
    for (i = 0; i < reps; i++) {
        double t0 = msx_time_now();
        clock_t c0 = clock();
        if (msx_opt_ask(opt, 1, x, &id) != MSX_OK) { fprintf(stderr, "bench-opt: %s\n", msx_last_error()); break; }
        t[i] = msx_time_now() - t0;
        tc[i] = (double)(clock() - c0) / CLOCKS_PER_SEC; /* CPU time: robust to other processes on the machine */
        msx_opt_last_timing(opt, &tf[i], &ta[i]);
        msx_opt_cancel(opt, id); /* keep 200 observations */
    }
    printf("\nper-iteration overhead, MedSAMix-shaped space (19 groups x 10 = %d dims, 200 observations, %d asks)%s:\n", d, reps,
           local ? ", local GP stage (all linear, local_prob 1)" : "");
    printf("  ask wall median %.3f s (fit %.3f s + acquisition %.3f s), min %.3f s, max %.3f s; CPU median %.3f s\n",
           quant(t, reps, 0.5), quant(tf, reps, 0.5), quant(ta, reps, 0.5), quant(t, reps, 0), quant(t, reps, 1),
           quant(tc, reps, 0.5));
    printf("RESULT overhead%s dims=%d observations=200 ask_wall_median_s=%.4f ask_cpu_median_s=%.4f fit_wall_median_s=%.4f "
           "acq_wall_median_s=%.4f\n", local ? "_local" : "", d, quant(t, reps, 0.5), quant(tc, reps, 0.5), quant(tf, reps, 0.5), quant(ta, reps, 0.5));
    msx_opt_free(opt);
    msx_space_free(s);
    free(x);
}

static void usage(FILE *f) {
    fprintf(f, "usage: medsamix bench-opt [--seeds N] [--evals N] [--only NAME|--function NAME] [--no-overhead]\n"
               "         [--n-init N] [--random-prob P] [--trees N] [--samples N] [--leaf N] [--perturb N] [--mean-mo] [--random-thresholds]\n"
               "         [--ratio-features R] [--no-log] [--local-prob P]\n"
               "  Runs the optimiser and uniform random search for N seeds (default 20) at equal budget\n"
               "  (default 100 evaluations, DTLZ2 150) on branin, hartmann6, jenatton, zdt1, dtlz2 and\n"
               "  prints medians/IQR plus one RESULT line per function. Regret = best - f*; hypervolume\n"
               "  reference points: ZDT1 (d=6) r=(11,11) (HV*=120.667), DTLZ2 (M=3, d=6) r=(1.1,1.1,1.1)\n"
               "  (HV*=0.807401). Also times one ask at 200 observations in a 190-dim MedSAMix-shaped space.\n");
}

int msx_cmd_bench_opt(int argc, char **argv) {
    int seeds = 20, evals = 0, i, f, s, do_overhead = 1;
    const char *only = NULL;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        double x;
        /* every value is checked: a typo must not run (or skip) the whole benchmark */
#define NUM(lo, hi) (msx_cli_num("bench-opt", a, v, lo, hi, &x) ? (i++, 1) : 0)
#define INT(lo, hi, dst) (msx_cli_int("bench-opt", a, v, lo, hi, dst) ? (i++, 1) : 0)
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { usage(stdout); return 0; }
        else if (!strcmp(a, "--seeds")) { if (!INT(1, 1000, &seeds)) return 2; }
        else if (!strcmp(a, "--evals")) { if (!INT(0, 100000, &evals)) return 2; }
        else if (!strcmp(a, "--only") || !strcmp(a, "--function")) {
            int k, ok = 0;
            for (k = 0; v && k < (int)(sizeof FUNCS / sizeof FUNCS[0]); k++) ok |= !strcmp(v, FUNCS[k].name);
            if (!ok) {
                fprintf(stderr, "bench-opt: %s: unknown function '%s'; one of:", a, v ? v : "");
                for (k = 0; k < (int)(sizeof FUNCS / sizeof FUNCS[0]); k++) fprintf(stderr, " %s", FUNCS[k].name);
                fprintf(stderr, "\n");
                return 2;
            }
            only = argv[++i];
        } else if (!strcmp(a, "--no-overhead")) do_overhead = 0;
        else if (!strcmp(a, "--n-init")) { if (!INT(-1, 100000, &g_opts.n_init)) return 2; }
        else if (!strcmp(a, "--random-prob")) { if (!NUM(-1, 1)) return 2; g_opts.random_prob = x; }
        else if (!strcmp(a, "--trees")) { if (!INT(0, 10000, &g_opts.n_trees)) return 2; }
        else if (!strcmp(a, "--samples")) { if (!INT(0, 10000000, &g_opts.n_random_samples)) return 2; }
        else if (!strcmp(a, "--perturb")) { if (!INT(-1, 10000000, &g_opts.n_perturb_samples)) return 2; }
        else if (!strcmp(a, "--leaf")) { if (!INT(0, 1000000, &g_opts.min_samples_leaf)) return 2; }
        else if (!strcmp(a, "--mean-mo")) g_opts.mo_mode = MSX_MO_MEAN;
        else if (!strcmp(a, "--random-thresholds")) g_opts.rf_random_thresholds = 1;
        else if (!strcmp(a, "--ratio-features")) { if (!NUM(0, 1)) return 2; g_opts.ratio_features = x; }
        else if (!strcmp(a, "--no-log")) g_opts.no_log_scale = 1;
        else if (!strcmp(a, "--local-prob")) { if (!NUM(-1, 1)) return 2; g_opts.local_prob = x; }
        else { fprintf(stderr, "bench-opt: unknown argument '%s'\n", a); usage(stderr); return 2; }
#undef NUM
#undef INT
    }
    printf("%-10s %-11s %5s %5s | %-30s | %-30s | %s\n", "function", "metric", "evals", "seeds", "optimiser median [IQR]",
           "random median [IQR]", "s/run");
    for (f = 0; f < (int)(sizeof FUNCS / sizeof FUNCS[0]); f++) {
        const bench_fn *fn = &FUNCS[f];
        int ne = evals ? evals : fn->evals;
        double *bo = (double *)malloc(sizeof(double) * (size_t)seeds), *rs = (double *)malloc(sizeof(double) * (size_t)seeds);
        double secs = 0, sec, b50, b25, b75, r50, r25, r75;
        const char *met = fn->n_obj == 1 ? "regret" : "hypervolume";
        if (only && strcmp(only, fn->name)) { free(bo); free(rs); continue; }
        for (s = 0; s < seeds; s++) {
            if (!run_bo(fn, (uint64_t)s + 1, ne, &bo[s], &sec)) { free(bo); free(rs); return 1; }
            secs += sec;
            run_random(fn, (uint64_t)s + 1, ne, &rs[s]);
        }
        b25 = quant(bo, seeds, 0.25); b50 = quant(bo, seeds, 0.5); b75 = quant(bo, seeds, 0.75);
        r25 = quant(rs, seeds, 0.25); r50 = quant(rs, seeds, 0.5); r75 = quant(rs, seeds, 0.75);
        printf("%-10s %-11s %5d %5d | %-9.4g [%-9.4g %9.4g] | %-9.4g [%-9.4g %9.4g] | %.2f\n", fn->name, met, ne, seeds,
               b50, b25, b75, r50, r25, r75, secs / seeds);
        printf("RESULT function=%s evals=%d seeds=%d metric=%s bo_median=%.6g random_median=%.6g\n", fn->name, ne, seeds,
               met, b50, r50);
        fflush(stdout);
        free(bo);
        free(rs);
    }
    if (do_overhead) { overhead(7, 0); overhead(7, 1); }
    return 0;
}
