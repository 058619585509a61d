/* tests/test_quiet.c - the library does not print: msx_search_run without a
   log callback writes nothing to stdout or stderr (both captured through
   dup2 into files), through a fresh run, a resumed run and the report; with a
   callback the same runs do produce messages (so the capture could see
   them); and the process-wide OpenMP settings are the same afterwards. */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "test.h"

#include <fcntl.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define DEMO "examples/demo"
static const char *const models2[2] = {DEMO "/models/spec_ct.pth", DEMO "/models/spec_mri.pth"};

typedef struct counts { int n[4]; } counts;
static void count_log(int level, const char *msg, void *user) {
    counts *c = (counts *)user;
    if (level >= 0 && level < 4 && msg && *msg) c->n[level]++;
}

static void options(msx_search_options *o, const char **tasks, const char *out, int trials) {
    memset(o, 0, sizeof *o);
    o->base = DEMO "/models/base.pth";
    o->models = models2;
    o->n_models = 2;
    o->tasks = tasks;
    o->n_tasks = 1;
    o->out_dir = out;
    o->n_trials = trials;
    o->jobs = 2;
    o->threads = 2;
    o->seed = 5;
    o->progress = 0; /* progress messages on: they must still go nowhere without a callback */
    o->n_overlays = 1;
    o->task.max_images = 4;
}

/* Runs a fresh search of n0 trials, then resumes it to n1, with stdout and
   stderr redirected into files; returns the bytes captured. */
static long run_captured(const char *out, int with_log, counts *c) {
    const char *tasks[1] = {DEMO "/tasks/mri_abdomen"};
    char cap_path[300];
    int fd, save_out, save_err;
    long n;
    msx_search_options o;
    msx_search_summary s;
    msx_result r1, r2;
    snprintf(cap_path, sizeof cap_path, "%s.capture", out);
    fflush(stdout);
    fflush(stderr);
    fd = open(cap_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    save_out = dup(1);
    save_err = dup(2);
    if (fd < 0 || save_out < 0 || save_err < 0) { MSX_CHECK(0, "cannot set up the capture"); return -1; }
    dup2(fd, 1);
    dup2(fd, 2);
    options(&o, tasks, out, msx_search_n_initial(2) + 2);
    if (with_log) { o.log = count_log; o.user = c; }
    o.no_report = 1;
    r1 = msx_search_run(&o, &s);
    o.n_trials += 2;
    o.resume = 1;
    o.no_report = 0;
    r2 = msx_search_run(&o, &s);
    fflush(stdout);
    fflush(stderr);
    dup2(save_out, 1);
    dup2(save_err, 2);
    close(save_out);
    close(save_err);
    n = (long)lseek(fd, 0, SEEK_END);
    close(fd);
    MSX_CHECK(r1 == MSX_OK && r2 == MSX_OK, "searches: %s / %s: %s", msx_result_str(r1), msx_result_str(r2), msx_last_error());
    MSX_CHECK(s.n_trials_done == msx_search_n_initial(2) + 4, "trials done %d", s.n_trials_done);
    remove(cap_path);
    return n;
}

int main(void) {
    char root[] = "/tmp/msx_quiet_XXXXXX", out[300];
    counts c;
    long n;
    int levels0 = 0, threads0 = 0;
    if (!mkdtemp(root)) { fprintf(stderr, "mkdtemp failed\n"); return 1; }
#ifdef _OPENMP
    omp_set_max_active_levels(3);
    levels0 = omp_get_max_active_levels();
    threads0 = omp_get_max_threads();
#endif
    /* no callback: nothing on stdout or stderr */
    snprintf(out, sizeof out, "%s/silent", root);
    n = run_captured(out, 0, NULL);
    MSX_CHECK(n == 0, "msx_search_run without a log callback wrote %ld byte(s) to stdout/stderr", n);
    /* with a callback: the same runs have things to say (setup note, one
       progress line per trial, resuming, report), and still print nothing */
    memset(&c, 0, sizeof c);
    snprintf(out, sizeof out, "%s/logged", root);
    n = run_captured(out, 1, &c);
    MSX_CHECK(n == 0, "with a log callback the library itself wrote %ld byte(s)", n);
    MSX_CHECK(c.n[MSX_LOG_PROGRESS] == msx_search_n_initial(2) + 4, "progress messages %d (one per trial expected)",
              c.n[MSX_LOG_PROGRESS]);
    MSX_CHECK(c.n[MSX_LOG_INFO] >= 3, "info messages %d (setup x2, resuming, report)", c.n[MSX_LOG_INFO]);
#ifdef _OPENMP
    MSX_CHECK(omp_get_max_active_levels() == levels0, "max active levels %d, was %d", omp_get_max_active_levels(), levels0);
    MSX_CHECK(omp_get_max_threads() == threads0, "max threads %d, was %d", omp_get_max_threads(), threads0);
#else
    (void)levels0; (void)threads0;
#endif
    {
        char cmd[400];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
        if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", root);
    }
    return msx_test_summary("test_quiet");
}
