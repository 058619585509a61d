/* examples/search_executor.c - the search's units of work run by an
   executor: here a toy one that evaluates them on an msx_search_worker in
   the same process, to show the hook tools/medsamix-mpi.c uses to spread
   them over MPI ranks (any transport works the same way: ship the
   configuration and the image ids, bring back the Dice).

     make && build/examples/search_executor [TASK_DIR] [TRIALS]

   Output in runs/example-executor/ (trials.jsonl, best_plan.json, ...). */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SLOTS 2

/* The "remote" side: a worker built from the same options, and the units
   it finished, in order. */
typedef struct toy {
    msx_search_worker *w;
    int done[SLOTS], failed[SLOTS], n_done;
} toy;

/* A real executor sends the unit and returns at once; the toy evaluates it
   here and queues the answer for wait_any. */
static msx_result toy_submit(void *user, int tag, const double *cfg, int dim, const int *ids, int n, double *dice) {
    toy *t = (toy *)user;
    (void)dim;
    t->failed[t->n_done] = msx_search_worker_eval(t->w, tag % msx_search_worker_slots(t->w), cfg, ids, n, dice) != MSX_OK;
    t->done[t->n_done++] = tag;
    return MSX_OK;
}

static msx_result toy_wait_any(void *user, int *tag, int *failed) {
    toy *t = (toy *)user;
    if (!t->n_done) return MSX_E_STATE; /* never happens: the search waits only for units in flight */
    *tag = t->done[0];
    *failed = t->failed[0];
    memmove(t->done, t->done + 1, sizeof(int) * (size_t)--t->n_done);
    memmove(t->failed, t->failed + 1, sizeof(int) * (size_t)t->n_done);
    return MSX_OK;
}

int main(int argc, char **argv) {
    const char *task = argc > 1 ? argv[1] : "examples/demo/tasks/mri_ring";
    const char *models[2] = {"examples/demo/models/spec_ct.pth", "examples/demo/models/spec_mri.pth"};
    msx_search_options o;
    msx_search_summary s;
    msx_search_executor x;
    toy t;
    msx_result r;

    memset(&o, 0, sizeof o);
    o.base = "examples/demo/models/base.pth";
    o.models = models;
    o.n_models = 2;
    o.tasks = &task;
    o.n_tasks = 1;
    o.n_trials = argc > 2 ? atoi(argv[2]) : 30;
    o.seed = 1;
    o.out_dir = "runs/example-executor";
    o.resume = 1;
    o.jobs = 1; /* the worker's slots (and the report's workers) */

    memset(&t, 0, sizeof t);
    if (msx_search_worker_create(&o, &t.w) != MSX_OK) { fprintf(stderr, "worker: %s\n", msx_last_error()); return 1; }
    printf("worker: %s\n", msx_search_worker_describe(t.w));
    memset(&x, 0, sizeof x);
    x.n_slots = SLOTS;       /* units in flight at once */
    x.submit = toy_submit;
    x.wait_any = toy_wait_any;
    x.user = &t;
    o.executor = &x;
    o.async = 1;             /* a new trial whenever a slot frees (o.async = 0: batches) */

    r = msx_search_run(&o, &s);
    msx_search_worker_free(t.w);
    if (r != MSX_OK) { fprintf(stderr, "search failed: %s\n", msx_last_error()); return 1; }
    printf("best trial %d: calib Dice %.4f, test Dice %.4f\n", s.best_trial, s.best_calib[0], s.best_test[0]);
    return 0;
}
