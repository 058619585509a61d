/* tests/test_executor.c - the executor hook without MPI (so it also runs
   under ASan): an in-process executor evaluating units on an
   msx_search_worker, out of order, gives the same trial records as the
   local workers in synchronous batches; the async schedule completes and
   resumes; the worker API rejects bad slots, image ids and configurations. */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "test.h"

#define DEMO "examples/demo"
static const char *const models2[2] = {DEMO "/models/spec_ct.pth", DEMO "/models/spec_mri.pth"};
static const char *task1[1] = {DEMO "/tasks/mri_ring"};
static char tmp_root[200];

/* Units are evaluated when submitted and returned last-in first-out, so
   the search sees them finish out of order. */
typedef struct toy {
    msx_search_worker *w;
    int done[64], failed[64], n;
    int max_in_flight, submitted;
} toy;

static msx_result toy_submit(void *user, int tag, const double *cfg, int dim, const int *ids, int n, double *dice) {
    toy *t = (toy *)user;
    (void)dim;
    t->failed[t->n] = msx_search_worker_eval(t->w, 0, cfg, ids, n, dice) != MSX_OK;
    t->done[t->n++] = tag;
    if (t->n > t->max_in_flight) t->max_in_flight = t->n;
    t->submitted++;
    return MSX_OK;
}
static msx_result toy_wait(void *user, int *tag, int *failed) {
    toy *t = (toy *)user;
    if (!t->n) return msx__err(MSX_E_STATE, "nothing in flight");
    t->n--;
    *tag = t->done[t->n];
    *failed = t->failed[t->n];
    return MSX_OK;
}

static void options(msx_search_options *o, const char *out, int trials) {
    memset(o, 0, sizeof *o);
    o->base = DEMO "/models/base.pth";
    o->models = models2;
    o->n_models = 2;
    o->tasks = task1;
    o->n_tasks = 1;
    o->n_trials = trials;
    o->seed = 7;
    o->jobs = 1;
    o->threads = 1;
    o->task.max_images = 4;
    o->no_report = 1;
    o->progress = -1;
    o->out_dir = out;
}

int main(void) {
    msx_search_options o;
    msx_search_summary s1, s2, s3;
    msx_search_executor x;
    toy t;
    char a[300], b[300], c[300], p[400];
    char *ra[64], *rb[64];
    double cfg[256], dice[4];
    int ids[2] = {0, 99}, i, same = 1, na, nb;
    snprintf(tmp_root, sizeof tmp_root, "/tmp/msx_test_executor_XXXXXX");
    if (!mkdtemp(tmp_root)) return 1;
    snprintf(a, sizeof a, "%s/local", tmp_root);
    snprintf(b, sizeof b, "%s/exec", tmp_root);
    snprintf(c, sizeof c, "%s/async", tmp_root);

    /* local workers, batches of 3 */
    options(&o, a, 24);
    o.batch = 3;
    MSX_CHECK_OK(msx_search_run(&o, &s1));
    /* the same through an executor with 3 slots, answers out of order */
    memset(&t, 0, sizeof t);
    MSX_CHECK_OK(msx_search_worker_create(&o, &t.w));
    if (!t.w) return msx_test_summary("test_executor");
    MSX_CHECK(msx_search_worker_n_images(t.w) == 4 && msx_search_worker_slots(t.w) == 1, "worker: %d images %d slots",
              msx_search_worker_n_images(t.w), msx_search_worker_slots(t.w));
    MSX_CHECK(strstr(msx_search_worker_describe(t.w), "mri_ring") != NULL, "describe: %s", msx_search_worker_describe(t.w));
    memset(&x, 0, sizeof x);
    x.n_slots = 3;
    x.submit = toy_submit;
    x.wait_any = toy_wait;
    x.user = &t;
    o.executor = &x;
    o.out_dir = b;
    MSX_CHECK_OK(msx_search_run(&o, &s2));
    MSX_CHECK(t.max_in_flight == 3, "units in flight at most %d (3 slots)", t.max_in_flight);
    snprintf(p, sizeof p, "%s/trials.jsonl", a);
    na = msx_test_log_records(p, ra, 64);
    snprintf(p, sizeof p, "%s/trials.jsonl", b);
    nb = msx_test_log_records(p, rb, 64);
    MSX_CHECK(na == 24 && nb == 24, "records %d %d", na, nb);
    for (i = 0; i < 24; i++)
        if (!ra[i] || !rb[i] || strcmp(ra[i], rb[i])) { same = 0; break; }
    MSX_CHECK(same, "trial %d differs between local workers and the executor:\n%s\n%s", i, i < 64 && ra[i] ? ra[i] : "-",
              i < 64 && rb[i] ? rb[i] : "-");
    MSX_CHECK(s1.best_trial == s2.best_trial && s1.best_calib[0] == s2.best_calib[0], "best %d %g vs %d %g", s1.best_trial,
              s1.best_calib[0], s2.best_trial, s2.best_calib[0]);
    {
        int stopped = 0;
        for (i = 0; i < 24; i++) stopped += rb[i] && (strstr(rb[i], "\"stopped\": \"race\"") || strstr(rb[i], "\"stopped\": \"safe\""));
        MSX_CHECK(stopped > 0 && t.submitted >= 24, "raced through the executor: %d stopped, %d units", stopped, t.submitted);
    }
    msx_test_free_records(ra, 64);
    msx_test_free_records(rb, 64);

    /* async: completes, logs finishing order as batches of one, resumes further */
    o.out_dir = c;
    o.async = 1;
    o.n_trials = 22;
    MSX_CHECK_OK(msx_search_run(&o, &s3));
    MSX_CHECK(s3.n_trials_done == 22, "async trials %d", s3.n_trials_done);
    o.n_trials = 26;
    o.resume = 1;
    MSX_CHECK_OK(msx_search_run(&o, &s3));
    MSX_CHECK(s3.n_trials_done == 26, "async resumed to %d", s3.n_trials_done);
    snprintf(p, sizeof p, "%s/trials.jsonl", c);
    na = msx_test_log_records(p, ra, 64);
    MSX_CHECK(na == 26 && ra[25] && strstr(ra[25], "\"batch\": 25, \"batch_size\": 1, \"slot\": 0"), "async log %d", na);
    msx_test_free_records(ra, 64);
    o.async = 0; /* the other mode is refused on resume */
    MSX_CHECK(msx_search_run(&o, &s3) == MSX_E_STATE && strstr(msx_last_error(), "asynchronous"), "mode: %s", msx_last_error());
    o.executor = NULL;
    o.async = 1;
    MSX_CHECK(msx_search_run(&o, &s3) == MSX_E_ARG && strstr(msx_last_error(), "executor"), "async without executor: %s", msx_last_error());

    /* the worker API refuses bad input */
    for (i = 0; i < msx_search_worker_dim(t.w); i++) cfg[i] = NAN;
    MSX_CHECK(msx_search_worker_eval(t.w, 1, cfg, ids, 1, dice) == MSX_E_ARG, "slot 1 of 1 accepted");
    MSX_CHECK(msx_search_worker_eval(t.w, 0, cfg, ids, 2, dice) == MSX_E_ARG && strstr(msx_last_error(), "image index 99"),
              "image 99: %s", msx_last_error());
    cfg[0] = 7; /* a method selector out of range */
    MSX_CHECK(msx_search_worker_eval(t.w, 0, cfg, ids, 1, dice) != MSX_OK && strstr(msx_last_error(), "configuration rejected"),
              "bad configuration: %s", msx_last_error());
    msx_search_worker_free(t.w);
    {
        char cmd[300];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_root);
        if (msx_test_fail == 0 && system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmp_root);
    }
    return msx_test_summary("test_executor");
}
