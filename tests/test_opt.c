/* Optimiser: random forest on known data, EI / log-EI against numerical
   integration, Pareto front and hypervolume against brute force, ParEGO
   weights, conditional sampling, reproducibility, save/restore and replay
   equivalence, bad input, and a short Branin run against random search. */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "test.h"
#include <time.h>

static const double PI_ = 3.14159265358979323846;

static double branin(const double *x) {
    double b = 5.1 / (4 * PI_ * PI_), c = 5 / PI_, t = 1 / (8 * PI_), u = x[1] - b * x[0] * x[0] + c * x[0] - 6;
    return u * u + 10 * (1 - t) * cos(x[0]) + 10;
}
static msx_space *branin_space(void) {
    msx_space *s = msx_space_new();
    msx_space_add_float(s, "x1", -5, 10, 0);
    msx_space_add_float(s, "x2", 0, 15, 0);
    return s;
}
/* MedSAMix-shaped: groups x {method cat(4) + 3 linear w + TA scale + 2 TIES + 3 SLERP t}
   plus, in group 0, a grandchild chain (TIES variant -> its own float). */
static msx_space *msx_like_space(int groups, int chain) {
    static const char *meth[4] = {"linear", "task_arithmetic", "ties", "slerp"};
    static const char *var[2] = {"magnitude", "random"};
    msx_space *s = msx_space_new();
    char nm[64];
    int g, k, m, c;
    for (g = 0; g < groups; g++) {
        snprintf(nm, sizeof nm, "g%d.method", g);
        m = msx_space_add_cat(s, nm, 4, meth);
        for (k = 0; k < 3; k++) {
            snprintf(nm, sizeof nm, "g%d.linear.w%d", g, k);
            c = msx_space_add_float(s, nm, 0, 1, 0);
            msx_space_add_condition(s, c, m, 0);
        }
        snprintf(nm, sizeof nm, "g%d.ta.scale", g);
        c = msx_space_add_float(s, nm, 0, 1, 0);
        msx_space_add_condition(s, c, m, 1);
        snprintf(nm, sizeof nm, "g%d.ties.drop", g);
        c = msx_space_add_float(s, nm, 0, 0.99, 0);
        msx_space_add_condition(s, c, m, 2);
        snprintf(nm, sizeof nm, "g%d.ties.scale", g);
        c = msx_space_add_float(s, nm, 0, 1, 0);
        msx_space_add_condition(s, c, m, 2);
        for (k = 0; k < 3; k++) {
            snprintf(nm, sizeof nm, "g%d.slerp.t%d", g, k);
            c = msx_space_add_float(s, nm, 0, 1, 0);
            msx_space_add_condition(s, c, m, 3);
        }
        if (chain && g == 0) {
            int v = msx_space_add_cat(s, "g0.ties.variant", 2, var), q = msx_space_add_float(s, "g0.ties.random.p", 0.01, 1, 1);
            int n = msx_space_add_int(s, "g0.ties.topk", 1, 64, 1);
            msx_space_add_condition(s, v, m, 2);
            msx_space_add_condition(s, q, v, 1);
            msx_space_add_condition(s, n, v, 0);
        }
    }
    return s;
}
static double msx_like_cost(const msx_space *s, const double *x) {
    int i, d = msx_space_dim(s);
    double f = 0;
    for (i = 0; i < d; i++) {
        if (x[i] != x[i]) continue;
        if (msx_space_type(s, i) == MSX_PARAM_CAT) f += 0.1 * x[i];
        else if (msx_space_type(s, i) == MSX_PARAM_INT) f += 0.001 * x[i];
        else f += (x[i] - 0.3) * (x[i] - 0.3);
    }
    return f;
}

/* Checks every conditional rule directly against the space definition. */
static int conditions_ok(const msx_space *s, const double *x, const int *parent, const int *pval) {
    int i, d = msx_space_dim(s);
    for (i = 0; i < d; i++) {
        int active = 1, j = i;
        while (parent[j] >= 0) {
            if (!(x[parent[j]] == pval[j])) { active = 0; break; }
            j = parent[j];
        }
        if (active != (x[i] == x[i])) return 0;
    }
    return 1;
}

static void test_rf(void) {
    enum { N = 40 };
    double X[N], y[N], m, v, Xc[N], yc[N];
    int i, tc = 4;
    msx_rf *rf = NULL;
    msx_rf_options ro;
    memset(&ro, 0, sizeof ro);
    ro.n_trees = 50;
    ro.seed = 3;
    for (i = 0; i < N; i++) { X[i] = i / (N - 1.0); y[i] = X[i] > 0.5 ? 1.0 : 0.0; }
    MSX_CHECK_OK(msx_rf_fit(&rf, X, y, N, 1, NULL, &ro));
    {
        const double q[6] = {0.0, 0.1, 0.3, 0.7, 0.9, 1.0};
        for (i = 0; i < 6; i++) {
            msx_rf_predict(rf, &q[i], &m, &v);
            MSX_CHECK(m == (q[i] > 0.5 ? 1.0 : 0.0) && v == 0.0, "step at %g: mean %g var %g", q[i], m, v);
        }
        for (i = 0; i < N; i++) /* far from the step: a tree would have to miss 12 neighbours */
            if (fabs(X[i] - 0.5) > 0.3) {
                msx_rf_predict(rf, &X[i], &m, &v);
                MSX_CHECK(m == y[i] && v == 0, "training point %d: %g vs %g (var %g)", i, m, y[i], v);
            }
    }
    { /* without bootstrap every tree sees every point: all training points exact */
        msx_rf *rf1 = NULL;
        msx_rf_options r1 = ro;
        r1.no_bootstrap = 1;
        MSX_CHECK_OK(msx_rf_fit(&rf1, X, y, N, 1, NULL, &r1));
        for (i = 0; i < N; i++) {
            msx_rf_predict(rf1, &X[i], &m, &v);
            MSX_CHECK(m == y[i] && v == 0, "no-bootstrap training point %d: %g vs %g (var %g)", i, m, y[i], v);
        }
        msx_rf_free(rf1);
    }
    { /* inside the gap between 18/39 and 20/39 the trees' thresholds differ */
        double q = 0.495;
        msx_rf_predict(rf, &q, &m, &v);
        MSX_CHECK(m > 0 && m < 1 && v > 0 && fabs(v - m * (1 - m)) < 1e-12, "gap: mean %g var %g (Bernoulli mix)", m, v);
    }
    /* categorical feature: y depends on the category set {1, 3} */
    for (i = 0; i < N; i++) { Xc[i] = i % tc; yc[i] = (i % tc == 1 || i % tc == 3) ? 5.0 : -2.0; }
    MSX_CHECK_OK(msx_rf_fit(&rf, Xc, yc, N, 1, &tc, &ro));
    for (i = 0; i < tc; i++) {
        double q = i;
        msx_rf_predict(rf, &q, &m, &v);
        MSX_CHECK(m == ((i == 1 || i == 3) ? 5.0 : -2.0) && v == 0, "category %d: mean %g var %g", i, m, v);
    }
    /* deterministic given a seed */
    {
        double m2, v2, q = 0.495;
        msx_rf *rf2 = NULL;
        MSX_CHECK_OK(msx_rf_fit(&rf, X, y, N, 1, NULL, &ro));
        MSX_CHECK_OK(msx_rf_fit(&rf2, X, y, N, 1, NULL, &ro));
        msx_rf_predict(rf, &q, &m, &v);
        msx_rf_predict(rf2, &q, &m2, &v2);
        MSX_CHECK(m == m2 && v == v2, "same seed, different forest");
        msx_rf_free(rf2);
    }
    /* bad input */
    X[3] = NAN;
    MSX_CHECK(msx_rf_fit(&rf, X, y, N, 1, NULL, &ro) == MSX_E_ARG, "NaN feature accepted");
    msx_rf_free(rf);
}

/* Simpson's rule for EI: integrand (plain) eta - y, (log) e^eta - e^y, times N(y; mu, s). */
static double simpson_ei(double eta, double mu, double s, int logm) {
    const int n = 200000;
    double lo = eta - 25 * s, h, sum = 0; /* mu >= eta - 5 s in every case below */
    int i;
    h = (eta - lo) / n;
    for (i = 0; i <= n; i++) {
        double y = lo + i * h, z = (y - mu) / s, g = (logm ? exp(eta) - exp(y) : eta - y) * exp(-0.5 * z * z) / (s * sqrt(2 * PI_));
        sum += g * (i == 0 || i == n ? 1 : (i & 1) ? 4 : 2);
    }
    return sum * h / 3;
}
static void test_ei(void) {
    double le, ei;
    const double vs[7] = {-12, -6, -2, -0.3, 0, 1.5, 5}, ss[4] = {1e-5, 1e-2, 0.7, 2.5};
    int a, b, logm;
    /* log-EI = E[max(e^eta - e^Y, 0)], Y ~ N(mu, sigma^2) (docs/semantics.md §7.4): 0.02644199 by a
       Simpson integral over [mu - 12 sigma, eta] in Python, independent of the library */
    ei = msx_acq_ei(-1, -0.5, 0.7, 1, &le);
    MSX_CHECK(fabs(ei - 0.0264420) < 5e-8 && fabs(le - log(ei)) < 1e-12, "log-EI(-1,-0.5,0.7) = %.9g", ei);
    for (logm = 0; logm < 2; logm++)
        for (a = 0; a < 7; a++)
            for (b = 0; b < 4; b++) {
                double s = ss[b], eta = -0.7, mu = eta - vs[a] * s, ref = simpson_ei(eta, mu, s, logm);
                ei = msx_acq_ei(eta, mu, s, logm, &le);
                if (ref > 1e-250) {
                    MSX_CHECK(fabs(le - log(ref)) < 2e-6, "%s EI v=%g s=%g: log %.12g vs Simpson %.12g", logm ? "log" : "plain",
                              vs[a], s, le, log(ref));
                    MSX_CHECK(fabs(ei - ref) <= 2e-6 * ref + 1e-300, "EI %g vs %g", ei, ref);
                }
            }
    /* far tail: ln EI stays finite and decreasing although EI underflows */
    {
        double l1, l2;
        msx_acq_ei(0, 50, 1e-5, 1, &l1);
        msx_acq_ei(0, 60, 1e-5, 1, &l2);
        MSX_CHECK(isfinite(l1) && isfinite(l2) && l2 < l1, "tail log-EI %g %g", l1, l2);
    }
}

static void test_weights(void) {
    msx_rng r;
    enum { K = 3, N = 40000 };
    double w[K], mean[K] = {0, 0, 0}, var = 0;
    int i, j, ok = 1;
    msx_rng_seed(&r, 11);
    for (i = 0; i < N; i++) {
        double s = 0;
        msx_simplex_weights(&r, K, w);
        for (j = 0; j < K; j++) { s += w[j]; ok &= w[j] >= 0; mean[j] += w[j] / N; }
        ok &= fabs(s - 1) < 1e-12;
        var += (w[0] - 1.0 / K) * (w[0] - 1.0 / K) / N;
    }
    MSX_CHECK(ok, "weights off the simplex");
    for (j = 0; j < K; j++) MSX_CHECK(fabs(mean[j] - 1.0 / K) < 0.006, "mean weight %d = %g", j, mean[j]);
    /* Dirichlet(1) marginal is Beta(1, K-1): variance (K-1)/(K^2 (K+1)) = 0.0556; normalised uniforms give ~0.04 */
    MSX_CHECK(fabs(var - (K - 1.0) / (K * K * (K + 1.0))) < 0.003, "weight variance %g (uniform on simplex: %g)", var,
              (K - 1.0) / (K * K * (K + 1.0)));
}

static void test_pareto_hv(void) {
    msx_space *s = msx_space_new();
    msx_opt_options o;
    msx_opt *opt = NULL;
    msx_rng r;
    enum { N = 300, M = 3 };
    static double c[N][M];
    static unsigned char fail[N];
    int i, j, m, front[N], nf, nb, bf[N];
    msx_space_add_float(s, "x", 0, 1, 0);
    memset(&o, 0, sizeof o);
    o.n_objectives = M;
    MSX_CHECK_OK(msx_opt_create(s, &o, &opt));
    msx_rng_seed(&r, 5);
    for (i = 0; i < N; i++) {
        double x = (i + 0.5) / N;
        for (m = 0; m < M; m++) c[i][m] = floor(msx_rng_uniform(&r) * 8) / 8; /* ties and duplicates */
        fail[i] = msx_rng_uniform(&r) < 0.05;
        MSX_CHECK_OK(msx_opt_tell_config(opt, &x, c[i], fail[i]));
    }
    nf = msx_opt_pareto(opt, front, N);
    nb = 0;
    for (i = 0; i < N; i++) { /* brute force */
        int dom = fail[i];
        for (j = 0; j < N && !dom; j++) {
            int le = 1, lt = 0;
            if (fail[j]) continue;
            for (m = 0; m < M; m++) { le &= c[j][m] <= c[i][m]; lt |= c[j][m] < c[i][m]; }
            dom = le && lt;
        }
        if (!dom) bf[nb++] = i;
    }
    MSX_CHECK(nf == nb, "front size %d vs brute force %d", nf, nb);
    for (i = 0; i < nf && i < nb; i++) MSX_CHECK(front[i] == bf[i], "front[%d] = %d vs %d", i, front[i], bf[i]);
    { /* deploy rule by brute force: min mean normalised cost, then min max */
        double lo[M], hi[M], bs = 1e300, bm = 1e300, cost[M], cfg[1];
        int best = -1, got;
        for (m = 0; m < M; m++) { lo[m] = 1e300; hi[m] = -1e300; }
        for (i = 0; i < N; i++)
            if (!fail[i])
                for (m = 0; m < M; m++) { if (c[i][m] < lo[m]) lo[m] = c[i][m]; if (c[i][m] > hi[m]) hi[m] = c[i][m]; }
        for (j = 0; j < nb; j++) {
            double sm = 0, mx = -1;
            i = bf[j];
            for (m = 0; m < M; m++) { double v = (c[i][m] - lo[m]) / (hi[m] - lo[m]); sm += v / M; if (v > mx) mx = v; }
            if (sm < bs - 1e-12 || (fabs(sm - bs) <= 1e-12 && mx < bm)) { bs = sm; bm = mx; best = i; }
        }
        got = msx_opt_best(opt, cfg, cost);
        MSX_CHECK(got == best, "deploy rule picked %d, brute force %d", got, best);
        MSX_CHECK(got >= 0 && cost[0] == c[got][0] && fabs(cfg[0] - (got + 0.5) / N) < 1e-15, "best config/costs");
    }
    { /* hypervolume vs counting unit cells on an integer grid */
        double p[40][3], ref[3] = {10, 10, 10}, hv;
        long cells = 0;
        int a, b, cc;
        for (i = 0; i < 40; i++)
            for (m = 0; m < 3; m++) p[i][m] = (double)msx_rng_below(&r, 11);
        for (a = 0; a < 10; a++)
            for (b = 0; b < 10; b++)
                for (cc = 0; cc < 10; cc++)
                    for (i = 0; i < 40; i++)
                        if (p[i][0] <= a && p[i][1] <= b && p[i][2] <= cc) { cells++; break; }
        hv = msx_hypervolume(&p[0][0], 40, 3, ref);
        MSX_CHECK(hv == (double)cells, "3-D hypervolume %g vs %ld cells", hv, cells);
        cells = 0;
        for (a = 0; a < 10; a++)
            for (b = 0; b < 10; b++)
                for (i = 0; i < 40; i++)
                    if (p[i][0] <= a && p[i][1] <= b) { cells++; break; }
        {
            double q[40][2];
            for (i = 0; i < 40; i++) { q[i][0] = p[i][0]; q[i][1] = p[i][1]; }
            hv = msx_hypervolume(&q[0][0], 40, 2, ref);
        }
        MSX_CHECK(hv == (double)cells, "2-D hypervolume %g vs %ld cells", hv, cells);
    }
    msx_opt_free(opt);
    msx_space_free(s);
}

static void test_space(void) {
    msx_space *s = msx_like_space(3, 1);
    int d = msx_space_dim(s), i, j, parent[64], pval[64], ids[40], ok = 1, active_seen[64];
    double x[64], u[64], y[64];
    msx_rng r;
    msx_opt *opt = NULL;
    msx_opt_options o;
    MSX_CHECK(d == 33, "dim %d", d);
    MSX_CHECK(msx_space_find(s, "g1.ties.scale") == 19 && msx_space_find(s, "nope") < 0, "find");
    MSX_CHECK(!strcmp(msx_space_choice(s, 0, 3), "slerp"), "choice name");
    /* the rules, written out independently of the library: */
    for (i = 0; i < d; i++) { parent[i] = -1; pval[i] = -1; }
    for (i = 0; i < 3; i++) {
        int base = i == 0 ? 0 : 13 + (i - 1) * 10, k;
        for (k = 1; k <= 9; k++) {
            parent[base + k] = base;
            pval[base + k] = k <= 3 ? 0 : k == 4 ? 1 : k <= 6 ? 2 : 3;
        }
    }
    parent[10] = 0; pval[10] = 2;   /* g0.ties.variant */
    parent[11] = 10; pval[11] = 1;  /* g0.ties.random.p */
    parent[12] = 10; pval[12] = 0;  /* g0.ties.topk */
    msx_rng_seed(&r, 2);
    memset(active_seen, 0, sizeof active_seen);
    for (i = 0; i < 5000; i++) {
        msx_space_sample(s, &r, x);
        ok &= conditions_ok(s, x, parent, pval);
        for (j = 0; j < d; j++) active_seen[j] += x[j] == x[j];
        msx_space_to_unit(s, x, u);
        msx_space_from_unit(s, u, y);
        for (j = 0; j < d; j++)
            if (x[j] == x[j]) ok &= fabs(y[j] - x[j]) <= 1e-12 * (1 + fabs(x[j]));
            else ok &= y[j] != y[j];
    }
    MSX_CHECK(ok, "sampled config violates a condition or unit round trip");
    MSX_CHECK(active_seen[11] > 200 && active_seen[12] > 200 && active_seen[1] > 1000, "chain children rarely active %d %d",
              active_seen[11], active_seen[12]);
    /* design, model-based and random proposals obey the conditions too */
    memset(&o, 0, sizeof o);
    o.seed = 4;
    o.n_init = 12;
    o.n_random_samples = 300;
    MSX_CHECK_OK(msx_opt_create(s, &o, &opt));
    for (i = 0; i < 4 && opt; i++) {
        double cfg[10 * 64];
        MSX_CHECK_OK(msx_opt_ask(opt, 10, cfg, ids));
        for (j = 0; j < 10; j++) {
            double c = msx_like_cost(s, cfg + j * d);
            ok &= conditions_ok(s, cfg + j * d, parent, pval);
            MSX_CHECK_OK(msx_opt_tell(opt, ids[j], &c, 0));
        }
    }
    MSX_CHECK(ok, "a proposal violates a condition");
    msx_opt_free(opt);
    msx_space_free(s);
}

/* Runs n ask/tell steps of batch k on the conditional space and records the proposals. */
static void drive(msx_opt *opt, const msx_space *s, int steps, int k, double *rec) {
    int i, j, d = msx_space_dim(s), ids[4];
    for (i = 0; i < steps; i++) {
        double *cfg = rec + (size_t)i * k * d;
        if (msx_opt_ask(opt, k, cfg, ids) != MSX_OK) { MSX_CHECK(0, "ask: %s", msx_last_error()); return; }
        for (j = 0; j < k; j++) {
            double c = msx_like_cost(s, cfg + j * d);
            int failed = (i * k + j) % 11 == 7; /* some crashes */
            MSX_CHECK_OK(msx_opt_tell(opt, ids[j], &c, failed));
        }
    }
}
static int same_bits(const double *a, const double *b, size_t n) {
    size_t i;
    for (i = 0; i < n; i++)
        if (!((a[i] != a[i] && b[i] != b[i]) || a[i] == b[i])) return 0;
    return 1;
}
static void test_resume(void) {
    msx_space *s = msx_like_space(2, 1);
    msx_opt_options o;
    msx_opt *a = NULL, *b = NULL, *c = NULL;
    int d = msx_space_dim(s), T = 24, t = 11, i;
    double *ra = (double *)malloc(sizeof(double) * 2 * T * d), *rb = (double *)malloc(sizeof(double) * 2 * T * d);
    double *x = (double *)malloc(sizeof(double) * d), cost;
    const char *path = "build/test_opt_state.json";
    memset(&o, 0, sizeof o);
    o.seed = 77;
    o.n_init = 6;
    o.n_random_samples = 400;
    o.ls_max_evals = 400;
    /* same seed -> same proposals; another seed -> different */
    MSX_CHECK_OK(msx_opt_create(s, &o, &a));
    MSX_CHECK_OK(msx_opt_create(s, &o, &b));
    drive(a, s, T, 1, ra);
    drive(b, s, T, 1, rb);
    MSX_CHECK(same_bits(ra, rb, (size_t)T * d), "same seed gave different proposals");
    msx_opt_free(b);
    o.seed = 78;
    MSX_CHECK_OK(msx_opt_create(s, &o, &b));
    drive(b, s, T, 1, rb);
    MSX_CHECK(!same_bits(ra + (size_t)(T - 1) * d, rb + (size_t)(T - 1) * d, (size_t)d), "different seeds, same proposal");
    msx_opt_free(b);
    o.seed = 77;
    /* save after t trials, restore, continue */
    MSX_CHECK_OK(msx_opt_create(s, &o, &b));
    drive(b, s, t, 1, rb);
    MSX_CHECK_OK(msx_opt_save(b, path));
    msx_opt_free(b);
    b = NULL;
    MSX_CHECK_OK(msx_opt_load(s, path, &b));
    if (b) {
        drive(b, s, T - t, 1, rb + (size_t)t * d);
        MSX_CHECK(same_bits(ra, rb, (size_t)T * d), "restored run diverged from the uninterrupted one");
        MSX_CHECK(msx_opt_n_told(b) == T && msx_opt_best(b, NULL, NULL) == msx_opt_best(a, NULL, NULL), "told/best after resume");
    }
    msx_opt_free(b);
    /* replay the first t results through tell_config, then continue */
    MSX_CHECK_OK(msx_opt_create(s, &o, &c));
    for (i = 0; i < t; i++) {
        double cc[1];
        MSX_CHECK_OK(msx_opt_history(a, i, x, cc));
        MSX_CHECK_OK(msx_opt_tell_config(c, x, cc, msx_opt_history_failed(a, i)));
    }
    memcpy(rb, ra, sizeof(double) * t * d);
    drive(c, s, T - t, 1, rb + (size_t)t * d);
    MSX_CHECK(same_bits(ra, rb, (size_t)T * d), "replayed run diverged from the uninterrupted one");
    msx_opt_free(c);
    msx_opt_free(a);
    /* batches with a pending trial across save/load */
    {
        int ids[2], ids2[2], j;
        double ca[2 * 64], cb[2 * 64], tail_a[4 * 2 * 64], tail_b[4 * 2 * 64];
        for (j = 0; j < 2; j++) {
            msx_opt *z = NULL;
            double *cfg = j ? cb : ca, *tail = j ? tail_b : tail_a;
            MSX_CHECK_OK(msx_opt_create(s, &o, &z));
            drive(z, s, 5, 2, ra);
            MSX_CHECK_OK(msx_opt_ask(z, 2, cfg, ids));
            cost = msx_like_cost(s, cfg);
            MSX_CHECK_OK(msx_opt_tell(z, ids[0], &cost, 0));
            if (j) { /* interrupt with one trial pending */
                MSX_CHECK_OK(msx_opt_save(z, path));
                msx_opt_free(z);
                z = NULL;
                MSX_CHECK_OK(msx_opt_load(s, path, &z));
                if (!z) break;
                MSX_CHECK(msx_opt_n_pending(z) == 1, "pending lost");
            }
            MSX_CHECK_OK(msx_opt_ask(z, 1, cfg + d, ids2)); /* another proposal while one is pending */
            MSX_CHECK(ids2[0] != ids[1], "fresh id");
            cost = msx_like_cost(s, cfg + d);
            MSX_CHECK_OK(msx_opt_tell(z, ids2[0], &cost, 0));
            cost = 1.0;
            MSX_CHECK_OK(msx_opt_tell(z, ids[1], &cost, 0));
            drive(z, s, 4, 2, tail);
            msx_opt_free(z);
        }
        MSX_CHECK(same_bits(ca, cb, (size_t)2 * d) && same_bits(tail_a, tail_b, (size_t)8 * d), "batch resume diverged");
    }
    free(ra);
    free(rb);
    free(x);
    msx_space_free(s);
}

static void test_bad_input(void) {
    msx_space *s = msx_space_new(), *s2;
    msx_opt *opt = NULL;
    msx_opt_options o;
    double x[2], c, nanc = NAN;
    int id, a;
    const char *path = "build/test_opt_bad.json";
    memset(&o, 0, sizeof o);
    MSX_CHECK(msx_opt_create(s, &o, &opt) == MSX_E_ARG && opt == NULL && strstr(msx_last_error(), "empty"), "empty space: %s",
              msx_last_error());
    MSX_CHECK(msx_space_add_float(s, "a", 1, 0, 0) == -1 && strstr(msx_last_error(), "inverted"), "inverted bounds: %s",
              msx_last_error());
    MSX_CHECK(msx_space_add_float(s, "a", 0, 1, 1) == -1, "log with lo = 0 accepted");
    MSX_CHECK(msx_space_add_float(s, "a", NAN, 1, 0) == -1, "NaN bound accepted");
    MSX_CHECK(msx_space_add_int(s, "i", 5, 2, 0) == -1, "inverted int accepted");
    MSX_CHECK(msx_space_add_cat(s, "c", 0, NULL) == -1, "categorical without choices accepted");
    a = msx_space_add_float(s, "a", 0, 1, 0);
    MSX_CHECK(a == 0 && msx_space_add_float(s, "a", 0, 2, 0) == -1 && strstr(msx_last_error(), "duplicate"), "duplicate name");
    MSX_CHECK(msx_space_add_condition(s, a, 5, 0) == MSX_E_ARG && strstr(msx_last_error(), "unknown parent"),
              "condition on unknown parent: %s", msx_last_error());
    MSX_CHECK(msx_space_add_condition(s, a, a, 0) == MSX_E_ARG, "self condition accepted");
    {
        int c1 = msx_space_add_cat(s, "c1", 2, NULL), c2 = msx_space_add_cat(s, "c2", 2, NULL);
        MSX_CHECK_OK(msx_space_add_condition(s, c2, c1, 1));
        MSX_CHECK(msx_space_add_condition(s, c1, c2, 0) == MSX_E_ARG && strstr(msx_last_error(), "cycle"), "cycle accepted");
        MSX_CHECK(msx_space_add_condition(s, a, c1, 2) == MSX_E_ARG, "value out of range accepted");
        MSX_CHECK(msx_space_add_condition(s, c1, a, 0) == MSX_E_ARG, "float parent accepted");
    }
    MSX_CHECK_OK(msx_opt_create(s, &o, &opt));
    if (!opt) { msx_space_free(s); return; }
    {
        double cfg[3];
        MSX_CHECK_OK(msx_opt_ask(opt, 1, cfg, &id));
        MSX_CHECK(msx_opt_tell(opt, id, &nanc, 0) == MSX_E_ARG && strstr(msx_last_error(), "NaN"), "NaN cost: %s", msx_last_error());
        c = INFINITY;
        MSX_CHECK(msx_opt_tell(opt, id, &c, 0) == MSX_E_ARG, "inf cost accepted");
        MSX_CHECK(msx_opt_n_pending(opt) == 1, "bad tell consumed the trial");
        MSX_CHECK_OK(msx_opt_tell(opt, id, NULL, 1)); /* a crash */
        MSX_CHECK(msx_opt_tell(opt, id, &c, 0) == MSX_E_ARG, "double tell accepted");
        MSX_CHECK(msx_opt_best(opt, NULL, NULL) == -1, "failed trial became best");
        cfg[0] = 0.5; cfg[1] = 0; cfg[2] = 7; /* c2 inactive: canonicalised to NaN */
        c = 2.0;
        MSX_CHECK_OK(msx_opt_tell_config(opt, cfg, &c, 0));
        cfg[0] = 1.5;
        MSX_CHECK(msx_opt_tell_config(opt, cfg, &c, 0) == MSX_E_ARG, "out-of-bounds config accepted");
        cfg[0] = 0.5; cfg[1] = 0.5;
        MSX_CHECK(msx_opt_tell_config(opt, cfg, &c, 0) == MSX_E_ARG, "fractional categorical accepted");
        MSX_CHECK(msx_opt_history(opt, 1, cfg, &c) == MSX_OK && cfg[2] != cfg[2] && c == 2.0, "canonical history");
        for (id = 0; id < 5; id++) { /* model proposals stay finite after a crash */
            int tid;
            MSX_CHECK_OK(msx_opt_ask(opt, 1, cfg, &tid));
            c = cfg[0];
            MSX_CHECK(isfinite(cfg[0]), "non-finite proposal");
            MSX_CHECK_OK(msx_opt_tell(opt, tid, &c, id == 2));
        }
    }
    MSX_CHECK_OK(msx_opt_save(opt, path));
    { /* truncated, foreign and mismatched state files */
        void *buf = NULL;
        size_t len = 0;
        msx_opt *z = NULL;
        FILE *f;
        MSX_CHECK_OK(msx_read_file(path, 0, &buf, &len));
        f = fopen(path, "wb");
        if (f) { fwrite(buf, 1, len / 2, f); fclose(f); }
        MSX_CHECK(msx_opt_load(s, path, &z) == MSX_E_FORMAT && !z && strstr(msx_last_error(), "truncated"), "truncated: %s",
                  msx_last_error());
        f = fopen(path, "wb");
        if (f) { fputs("{\"format\": \"medsamix-plan-v1\", \"groups\": []}", f); fclose(f); }
        MSX_CHECK(msx_opt_load(s, path, &z) == MSX_E_FORMAT && strstr(msx_last_error(), "format"), "foreign: %s",
                  msx_last_error());
        f = fopen(path, "wb");
        if (f) { fwrite(buf, 1, len, f); fclose(f); }
        s2 = msx_space_new();
        msx_space_add_float(s2, "a", 0, 2, 0);
        MSX_CHECK(msx_opt_load(s2, path, &z) == MSX_E_STATE && strstr(msx_last_error(), "differs"), "other space: %s",
                  msx_last_error());
        MSX_CHECK(msx_opt_load(s, "build/does-not-exist.json", &z) == MSX_E_IO, "missing file");
        MSX_CHECK_OK(msx_opt_load(s, path, &z));
        MSX_CHECK(z && msx_opt_n_told(z) == msx_opt_n_told(opt), "reloaded told count");
        msx_opt_free(z);
        msx_space_free(s2);
        msx_free(buf);
    }
    MSX_CHECK(msx_opt_ask(opt, 0, x, &id) == MSX_E_ARG, "k = 0 accepted");
    msx_opt_free(opt);
    msx_space_free(s);
}

/* Matern-5/2 written out independently of the library. */
static double matern52(double dist, double ls) {
    double r = sqrt(5.0) * dist / ls;
    return (1 + r + r * r / 3) * exp(-r);
}
/* Local GP stage: posterior and likelihood against a hand-derived closed form
   (3 points, explicit 3x3 inverse by cofactors), ARD relevance, and the local
   proposals in a conditional space (bounds, conditions, only the incumbent's
   active floats move); resume/replay exactness with the stage always on. */
static void test_local_gp(void) {
    { /* closed form */
        static const double X[6] = {0.1, 0.2, 0.5, 0.9, 0.8, 0.4}, y[3] = {1.0, -0.5, 0.25};
        const double ls[2] = {0.7, 0.4}, nug = 1e-3, xs[2] = {0.3, 0.6};
        double K[3][3], C[3][3], det, alpha[3], L[9], al[3], sf2, nll, mu, var, ks[3], kk[3], sf2_ref = 0, q = 0, mu_ref = 0;
        int i, j;
        for (i = 0; i < 3; i++)
            for (j = 0; j < 3; j++) {
                double d0 = (X[2 * i] - X[2 * j]) / ls[0], d1 = (X[2 * i + 1] - X[2 * j + 1]) / ls[1];
                K[i][j] = matern52(sqrt(d0 * d0 + d1 * d1), 1.0) + (i == j ? nug : 0);
            }
        C[0][0] = K[1][1] * K[2][2] - K[1][2] * K[2][1];
        C[0][1] = -(K[1][0] * K[2][2] - K[1][2] * K[2][0]);
        C[0][2] = K[1][0] * K[2][1] - K[1][1] * K[2][0];
        C[1][1] = K[0][0] * K[2][2] - K[0][2] * K[2][0];
        C[1][2] = -(K[0][0] * K[2][1] - K[0][1] * K[2][0]);
        C[2][2] = K[0][0] * K[1][1] - K[0][1] * K[1][0];
        C[1][0] = C[0][1]; C[2][0] = C[0][2]; C[2][1] = C[1][2]; /* symmetric */
        det = K[0][0] * C[0][0] + K[0][1] * C[0][1] + K[0][2] * C[0][2];
        for (i = 0; i < 3; i++) {
            double d0 = (xs[0] - X[2 * i]) / ls[0], d1 = (xs[1] - X[2 * i + 1]) / ls[1];
            kk[i] = matern52(sqrt(d0 * d0 + d1 * d1), 1.0);
        }
        for (i = 0; i < 3; i++) {
            alpha[i] = 0;
            for (j = 0; j < 3; j++) alpha[i] += C[i][j] / det * y[j];
            sf2_ref += y[i] * alpha[i] / 3;
            mu_ref += kk[i] * alpha[i];
        }
        for (i = 0; i < 3; i++)
            for (j = 0; j < 3; j++) q += kk[i] * C[i][j] / det * kk[j];
        nll = msx__gp_fit(X, y, 3, 2, ls, nug, L, al, &sf2);
        MSX_CHECK(fabs(sf2 - sf2_ref) < 1e-12 * fabs(sf2_ref), "GP sf2 %.17g vs closed form %.17g", sf2, sf2_ref);
        MSX_CHECK(fabs(nll - (1.5 * log(sf2_ref) + 0.5 * log(det))) < 1e-10, "GP nll %.17g vs %.17g", nll,
                  1.5 * log(sf2_ref) + 0.5 * log(det));
        for (i = 0; i < 3; i++) MSX_CHECK(fabs(al[i] - alpha[i]) < 1e-10 * (1 + fabs(alpha[i])), "alpha[%d]", i);
        msx__gp_predict(X, 3, 2, ls, L, al, sf2, xs, ks, &mu, &var);
        MSX_CHECK(fabs(mu - mu_ref) < 1e-10, "GP mean %.17g vs closed form %.17g", mu, mu_ref);
        MSX_CHECK(fabs(var - sf2_ref * (1 - q)) < 1e-10 * sf2_ref, "GP var %.17g vs closed form %.17g", var, sf2_ref * (1 - q));
        msx__gp_predict(X, 3, 2, ls, L, al, sf2, X + 2, ks, &mu, &var); /* at a data point: near-interpolation */
        MSX_CHECK(fabs(mu - y[1]) < 0.01 && var < 0.01 * sf2, "GP at a training point: mu %g var %g", mu, var);
    }
    { /* ARD: y depends on x0 only -> the x1 lengthscale must come out much longer */
        double X[80], y[40], ls[2], lsb[2], L[40 * 40], al[40], nug, sf2;
        msx_rng r;
        int i;
        msx_rng_seed(&r, 5);
        for (i = 0; i < 40; i++) {
            X[2 * i] = msx_rng_uniform(&r);
            X[2 * i + 1] = msx_rng_uniform(&r);
            y[i] = sin(6 * X[2 * i]);
        }
        MSX_CHECK(msx__gp_train(X, y, 40, 2, ls, &nug, L, al, &sf2, lsb), "GP training failed");
        MSX_CHECK(ls[1] >= 4 * ls[0], "ARD lengthscales %g (relevant) %g (irrelevant)", ls[0], ls[1]);
    }
    { /* proposals in a conditional space: 40 configs sharing one structure */
        msx_space *s = msx_like_space(2, 1);
        int d = msx_space_dim(s), i, q, np = 0, *parent = (int *)malloc(sizeof(int) * d), *pval = (int *)malloc(sizeof(int) * d);
        double *x = (double *)malloc(sizeof(double) * d), *inc = (double *)malloc(sizeof(double) * d), c;
        int vi = msx_space_find(s, "g0.ties.variant"), g1 = msx_space_find(s, "g1.method");
        msx_opt_options o;
        msx_opt *opt = NULL;
        msx_rng r;
        memset(&o, 0, sizeof o);
        o.seed = 3;
        o.n_init = -1;
        for (i = 0; i < d; i++) { parent[i] = s->p[i].parent; pval[i] = s->p[i].pval; }
        MSX_CHECK_OK(msx_opt_create(s, &o, &opt));
        msx_rng_seed(&r, 4);
        for (i = 0; opt && i < 40; i++) {
            for (q = 0; q < d; q++) x[q] = msx__sp_from_unit1(&s->p[q], msx_rng_uniform(&r)); /* every entry set */
            x[0] = 2;       /* g0: ties ... */
            x[vi] = 1;      /* ... random variant: log-scaled random.p active, integer topk inactive */
            x[g1] = 0;      /* g1: linear */
            MSX_CHECK_OK(msx_space_canonicalize(s, x, x)); /* inactive entries -> NAN */
            c = msx_like_cost(s, x);
            MSX_CHECK_OK(msx_opt_tell_config(opt, x, &c, i % 13 == 5));
        }
        if (opt) {
            double bcost;
            msx_opt_best(opt, inc, &bcost);
            for (i = 0; i < 20; i++) {
                double y[256];
                msx_rng pr;
                int moved = 0, ok = 1;
                msx_rng_seed(&pr, (uint64_t)i + 1);
                msx__opt_targets(opt, NULL);
                if (!msx__opt_gp_propose(opt, &pr, x, NULL, 0)) continue;
                np++;
                MSX_CHECK(msx_space_canonicalize(s, x, y) == MSX_OK && same_bits(x, y, (size_t)d), "local proposal not canonical: %s",
                          msx_last_error());
                MSX_CHECK(conditions_ok(s, x, parent, pval), "local proposal breaks conditions");
                for (q = 0; q < d; q++) {
                    int fl = msx_space_type(s, q) == MSX_PARAM_FLOAT && inc[q] == inc[q];
                    if (!fl) ok &= same_bits(x + q, inc + q, 1);
                    else moved |= x[q] != inc[q];
                }
                MSX_CHECK(ok && moved, "local proposal changed a non-float/inactive entry (%d) or nothing (%d)", ok, moved);
            }
            MSX_CHECK(np >= 15, "local stage proposed only %d times of 20", np);
        }
        msx_opt_free(opt);
        free(x); free(inc); free(parent); free(pval);
        msx_space_free(s);
    }
    { /* exact resume and replay with the local stage on every model-based slot
         (single objective, then ParEGO on (branin, distance to a corner)) */
        msx_space *s = branin_space();
        msx_opt_options o;
        msx_opt *a = NULL;
        double ra[2 * 30], rb[2 * 30], rc[2 * 30], c[2];
        const char *path = "build/test_opt_state_gp.json";
        int i, id, run, mo;
        for (mo = 0; mo < 2; mo++) {
            memset(&o, 0, sizeof o);
            o.seed = 11;
            o.n_trials = 30;
            o.n_objectives = mo + 1;
            o.n_random_samples = 300;
            o.local_prob = 1;
            o.random_prob = -1;
            for (run = 0; run < 4; run++) {
                double *rec = run == 0 ? ra : run == 1 ? rb : rc;
                if (run == 3) o.local_prob = -1; /* the stage really changes proposals */
                MSX_CHECK_OK(msx_opt_create(s, &o, &a));
                for (i = 0; a && i < 30; i++) {
                    if (run == 1 && i == 17) { /* save / restore mid-run */
                        MSX_CHECK_OK(msx_opt_save(a, path));
                        msx_opt_free(a);
                        a = NULL;
                        MSX_CHECK_OK(msx_opt_load(s, path, &a));
                        if (!a) break;
                    }
                    if (run == 2 && i < 17) { /* replay of the first 17 results */
                        memcpy(rec + 2 * i, ra + 2 * i, sizeof(double) * 2);
                        c[0] = branin(rec + 2 * i);
                        c[1] = (rec[2 * i] + 5) * (rec[2 * i] + 5) + rec[2 * i + 1] * rec[2 * i + 1];
                        MSX_CHECK_OK(msx_opt_tell_config(a, rec + 2 * i, c, 0));
                        continue;
                    }
                    MSX_CHECK_OK(msx_opt_ask(a, 1, rec + 2 * i, &id));
                    c[0] = branin(rec + 2 * i);
                    c[1] = (rec[2 * i] + 5) * (rec[2 * i] + 5) + rec[2 * i + 1] * rec[2 * i + 1];
                    MSX_CHECK_OK(msx_opt_tell(a, id, c, 0));
                }
                msx_opt_free(a);
                a = NULL;
                if (run == 1) MSX_CHECK(same_bits(ra, rb, 60), "save/load with the local stage diverged (objectives %d)", mo + 1);
                if (run == 2) MSX_CHECK(same_bits(ra, rc, 60), "replay with the local stage diverged (objectives %d)", mo + 1);
                if (run == 3) MSX_CHECK(!same_bits(ra, rc, 60), "local_prob had no effect (objectives %d)", mo + 1);
            }
        }
        msx_space_free(s);
    }
}

static double median5(double *v) {
    int i, j;
    for (i = 1; i < 5; i++)
        for (j = i; j > 0 && v[j - 1] > v[j]; j--) { double t = v[j]; v[j] = v[j - 1]; v[j - 1] = t; }
    return v[2];
}
static void test_branin(void) {
    const double fstar = 0.397887357729739;
    double bo[5], rs[5];
    int seed;
    for (seed = 0; seed < 5; seed++) {
        msx_space *s = branin_space();
        msx_opt_options o;
        msx_opt *opt = NULL;
        msx_rng r;
        double x[2], c, best = 1e300;
        int i, id;
        memset(&o, 0, sizeof o);
        o.seed = (uint64_t)seed + 100;
        o.n_trials = 40;
        o.n_random_samples = 1000;
        MSX_CHECK_OK(msx_opt_create(s, &o, &opt));
        for (i = 0; opt && i < 40; i++) {
            MSX_CHECK_OK(msx_opt_ask(opt, 1, x, &id));
            c = branin(x);
            MSX_CHECK_OK(msx_opt_tell(opt, id, &c, 0));
        }
        if (opt) { msx_opt_best(opt, x, &c); bo[seed] = c - fstar; }
        msx_rng_seed(&r, (uint64_t)seed + 100);
        for (i = 0; i < 40; i++) {
            msx_space_sample(s, &r, x);
            c = branin(x);
            if (c < best) best = c;
        }
        rs[seed] = best - fstar;
        msx_opt_free(opt);
        msx_space_free(s);
    }
    {
        double mb = median5(bo), mr = median5(rs);
        printf("branin, 40 evaluations, 5 seeds: median regret optimiser %.3g, random %.3g\n", mb, mr);
        MSX_CHECK(mb * 5 < mr, "optimiser median regret %g not 5x below random %g", mb, mr);
    }
}

/* Distance of two configurations in the unit cube over all dims: an entry
   active in one and inactive in the other counts 1 (another structure). */
static double unit_dist(const msx_space *s, const double *a, const double *b) {
    double ua[256], ub[256], sum = 0;
    int i, d = msx_space_dim(s);
    msx_space_to_unit(s, a, ua);
    msx_space_to_unit(s, b, ub);
    for (i = 0; i < d; i++) {
        double e = isnan(ua[i]) != isnan(ub[i]) ? 1.0 : isnan(ua[i]) ? 0.0 : ua[i] - ub[i];
        sum += e * e;
    }
    return sqrt(sum);
}

/* Batch diversity: 16 model-based proposals of one ask on the 190-dim
   MedSAMix-shaped space after 60 observations. With the kriging believer
   they are pairwise distinct and spread out; without it (one model's
   distinct maxima) they crowd around the maximum. */
static void test_batch_diversity(void) {
    msx_space *s = msx_like_space(19, 0);
    double mins[4], means[4];
    int v;
    for (v = 0; v < 4; v++) {
        msx_opt_options o;
        msx_opt *opt = NULL;
        msx_rng r;
        static double cfg[16 * 256];
        double x[256], c, mn = 1e300, nn_sum = 0;
        int i, j, ids[16], d = msx_space_dim(s);
        memset(&o, 0, sizeof o);
        o.seed = 3;
        o.n_init = -1;
        o.random_prob = -1; /* every slot model-based */
        o.local_prob = -1;  /* forest slots only (the GP refinement is another path) */
        o.n_random_samples = 2000;
        o.no_believer = v & 1;
        MSX_CHECK_OK(msx_opt_create(s, &o, &opt));
        msx_rng_seed(&r, 11);
        for (i = 0; opt && i < 60; i++) {
            msx_space_sample(s, &r, x);
            c = msx_like_cost(s, x);
            MSX_CHECK_OK(msx_opt_tell_config(opt, x, &c, 0));
        }
        if (!opt) break;
        if (v < 2) MSX_CHECK_OK(msx_opt_ask(opt, 16, cfg, ids));
        else /* async: one at a time, the earlier ones pending */
            for (i = 0; i < 16; i++) MSX_CHECK_OK(msx_opt_ask(opt, 1, cfg + (size_t)i * d, &ids[i]));
        for (i = 0; i < 16; i++) {
            double nn = 1e300;
            for (j = 0; j < 16; j++) {
                double dd;
                if (j == i) continue;
                dd = unit_dist(s, cfg + (size_t)i * d, cfg + (size_t)j * d);
                if (dd < nn) nn = dd;
                if (dd < mn) mn = dd;
            }
            nn_sum += nn;
        }
        mins[v] = mn;
        means[v] = nn_sum / 16;
        msx_opt_free(opt);
    }
    printf("16 proposals, 190 dims, 60 observations, nearest-neighbour distance in the unit cube (min, mean): one ask of 16: "
           "believer %.3f %.3f, without %.3f %.3f; 16 asks of 1 with the rest pending: believer %.3f %.3f, without %.3f %.3f\n",
           mins[0], means[0], mins[1], means[1], mins[2], means[2], mins[3], means[3]);
    for (v = 0; v < 4; v += 2) {
        MSX_CHECK(mins[v] > 0.5, "kriging-believer proposals include near-duplicates (min pairwise distance %g)", mins[v]);
        MSX_CHECK(mins[v] > mins[v + 1], "kriging believer does not spread the proposals (min pairwise distance %g vs %g)", mins[v], mins[v + 1]);
    }
    msx_space_free(s);
}

/* Prints (does not assert) the per-iteration overhead in a 190-dim space. */
static void report_overhead(void) {
    msx_space *s = msx_like_space(19, 0);
    msx_opt_options o;
    msx_opt *opt = NULL;
    msx_rng r;
    int d = msx_space_dim(s), i, id;
    double x[256], c, t0, tf, ta;
    clock_t c0;
    memset(&o, 0, sizeof o);
    o.seed = 1;
    o.n_init = -1;
    MSX_CHECK(d == 190, "MedSAMix-shaped space has %d dims", d);
    MSX_CHECK_OK(msx_opt_create(s, &o, &opt));
    msx_rng_seed(&r, 9);
    for (i = 0; opt && i < 200; i++) {
        msx_space_sample(s, &r, x);
        c = msx_like_cost(s, x);
        MSX_CHECK_OK(msx_opt_tell_config(opt, x, &c, 0));
    }
    t0 = msx_time_now();
    c0 = clock();
    MSX_CHECK_OK(msx_opt_ask(opt, 1, x, &id));
    msx_opt_last_timing(opt, &tf, &ta);
    printf("overhead at 200 observations, %d dims: ask %.3f s wall, %.3f s CPU (fit %.3f s, acquisition %.3f s wall)\n", d,
           msx_time_now() - t0, (double)(clock() - c0) / CLOCKS_PER_SEC, tf, ta);
    msx_opt_free(opt);
    msx_space_free(s);
}

/* The two multi-task scalarisations of msx__opt_targets against values
   worked out by hand. Costs A (0.2, 0.8), B (0.6, 0.2), C (1.0, 0.0) and a
   failed D normalise over the successful rows (lo 0.2, 0.0; hi 1.0, 0.8) to
   A (0, 1), B (0.5, 0.25), C (1, 0), D (1, 1) (failed: worst everywhere).
   ParEGO, theta (0.25, 0.75), rho 0.05: max_j theta_j f_j + rho sum_j theta_j f_j
   = A 0.75 + 0.0375 = 0.7875, B 0.1875 + 0.015625 = 0.203125,
   C 0.25 + 0.0125 = 0.2625, D 0.75 + 0.05 = 0.8.
   Mean: A 0.5, B 0.375, C 0.5, D 1. */
static void test_scalarisations(void) {
    static const double cost[4][2] = {{0.2, 0.8}, {0.6, 0.2}, {1.0, 0.0}, {0.5, 0.5}};
    static const double parego[4] = {0.7875, 0.203125, 0.2625, 0.8}, mean[4] = {0.5, 0.375, 0.5, 1.0};
    const double theta[2] = {0.25, 0.75};
    msx_space *s = msx_space_new();
    msx_opt_options o;
    msx_opt *opt = NULL;
    int i;
    msx_space_add_float(s, "x", 0, 1, 0);
    memset(&o, 0, sizeof o);
    o.n_objectives = 2;
    o.no_log_scale = 1; /* the raw scalarisation, before SMAC's log scaling */
    MSX_CHECK_OK(msx_opt_create(s, &o, &opt));
    if (!opt) { msx_space_free(s); return; }
    for (i = 0; i < 4; i++) {
        double x = 0.1 + 0.2 * i;
        MSX_CHECK_OK(msx_opt_tell_config(opt, &x, cost[i], i == 3));
    }
    MSX_CHECK(msx__opt_targets(opt, theta) == 3, "three successful rows");
    for (i = 0; i < 4; i++)
        MSX_CHECK(fabs(opt->y[i] - parego[i]) < 1e-12, "ParEGO row %d: %.17g, want %g", i, opt->y[i], parego[i]);
    MSX_CHECK(msx__opt_targets(opt, NULL) == 3, "three successful rows");
    for (i = 0; i < 4; i++)
        MSX_CHECK(fabs(opt->y[i] - mean[i]) < 1e-12, "mean row %d: %.17g, want %g", i, opt->y[i], mean[i]);
    msx_opt_free(opt);
    msx_space_free(s);
}

int main(void) {
    double t0 = msx_time_now();
    test_rf();
    test_ei();
    test_weights();
    test_pareto_hv();
    test_scalarisations();
    test_space();
    test_bad_input();
    test_resume();
    test_local_gp();
    test_branin();
    test_batch_diversity();
    report_overhead();
    printf("test_opt took %.1f s\n", msx_time_now() - t0);
    return msx_test_summary("test_opt");
}
