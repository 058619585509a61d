/* tests/test_opt_modes.c - msx_opt_options.optimizer: unknown values are
   refused; the choice survives msx_opt_save/msx_opt_load (the resumed run
   proposes what the uninterrupted one does); after the same history the
   three schemes propose differently, and only the model-based ones
   concentrate near the optimum of a simple bowl. */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "test.h"

#include <unistd.h>

static double bowl(const double *x) { return (x[0] - 0.3) * (x[0] - 0.3) + (x[1] - 0.7) * (x[1] - 0.7); }

static msx_space *space2(void) {
    msx_space *s = msx_space_new();
    msx_space_add_float(s, "a", 0, 1, 0);
    msx_space_add_float(s, "b", 0, 1, 0);
    return s;
}

/* Runs n asks/tells of one at a time; returns the mean distance to the
   optimum of the last `tail` proposals. */
static double run(msx_optimizer kind, int n, int tail, uint64_t seed) {
    msx_space *s = space2();
    msx_opt_options o;
    msx_opt *opt = NULL;
    double x[2], c, dist = 0;
    int i, id;
    memset(&o, 0, sizeof o);
    o.seed = seed;
    o.n_trials = n;
    o.n_init = 8;
    o.optimizer = kind;
    o.n_random_samples = 500;
    MSX_CHECK_OK(msx_opt_create(s, &o, &opt));
    for (i = 0; opt && i < n; i++) {
        if (msx_opt_ask(opt, 1, x, &id) != MSX_OK) break;
        c = bowl(x);
        if (i >= n - tail) dist += sqrt(c);
        msx_opt_tell(opt, id, &c, 0);
    }
    msx_opt_free(opt);
    msx_space_free(s);
    return dist / tail;
}

int main(void) {
    msx_space *s = space2();
    msx_opt_options o;
    msx_opt *a = NULL, *b = NULL;
    double x[2], y[2], c, d[3];
    char path[] = "/tmp/msx_optmodes_XXXXXX";
    int i, k, id, fd;
    memset(&o, 0, sizeof o);
    o.optimizer = (msx_optimizer)3;
    MSX_CHECK(msx_opt_create(s, &o, &a) == MSX_E_ARG && !a, "optimizer 3 accepted");
    /* save after 15 results of a SMAC run, load, continue: same proposals */
    o.optimizer = MSX_OPTIMIZER_SMAC;
    o.seed = 11;
    o.n_trials = 30;
    o.n_random_samples = 500;
    MSX_CHECK_OK(msx_opt_create(s, &o, &a));
    for (i = 0; a && i < 15; i++) {
        msx_opt_ask(a, 1, x, &id);
        c = bowl(x);
        msx_opt_tell(a, id, &c, 0);
    }
    fd = mkstemp(path);
    if (fd >= 0) close(fd);
    MSX_CHECK_OK(msx_opt_save(a, path));
    MSX_CHECK_OK(msx_opt_load(s, path, &b));
    remove(path);
    for (i = 0; a && b && i < 5; i++) {
        msx_opt_ask(a, 1, x, &id);
        msx_opt_ask(b, 1, y, &k);
        MSX_CHECK(x[0] == y[0] && x[1] == y[1], "resumed SMAC run differs at ask %d", i);
        c = bowl(x);
        msx_opt_tell(a, id, &c, 0);
        msx_opt_tell(b, k, &c, 0);
    }
    msx_opt_free(a);
    msx_opt_free(b);
    msx_space_free(s);
    /* the last 10 of 40 proposals: model-based ones sit near the optimum,
       random ones do not (their expected distance on the unit square is ~0.4) */
    for (k = 0; k < 3; k++) d[k] = run((msx_optimizer)k, 40, 10, 5);
    MSX_CHECK(d[0] < 0.1 && d[1] < 0.15 && d[2] > 0.2, "mean distance to the optimum: default %.3f, smac %.3f, random %.3f",
              d[0], d[1], d[2]);
    MSX_CHECK(d[0] != d[1], "default and smac proposed the same points");
    return msx_test_summary("test_opt_modes");
}
