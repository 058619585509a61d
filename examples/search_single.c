/* examples/search_single.c - MedSAMix-S: search a layer-wise merge of two
   fine-tuned SAMs with their base that segments ONE task best.

     make && build/examples/search_single [TASK_DIR] [TRIALS]

   Default: the demo world's mri_ring task, 40 trials, output in
   runs/example-single/ (trials.jsonl, best_plan.json, best.safetensors,
   report.md, report.json, overlays/). Run it again to resume. */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Called after every finished trial (already safely in trials.jsonl). */
static void on_trial(const msx_trial_info *t, void *user) {
    (void)user;
    /* a raced trial that could not beat the best one was stopped early: its
       Dice is the mean on the images it was scored on */
    printf("trial %3d/%d  %-22s calib Dice %.4f%s  best %.4f  passes %lld of %lld  (%.2f s)\n", t->trial + 1, t->n_trials,
           t->origin, t->failed ? 0.0 : t->dice[0], t->stopped ? " (stopped)" : "", t->best_score, t->passes, t->passes_full,
           t->seconds);
}

int main(int argc, char **argv) {
    const char *task = argc > 1 ? argv[1] : "examples/demo/tasks/mri_ring";
    const char *models[2] = {"examples/demo/models/spec_ct.pth", "examples/demo/models/spec_mri.pth"};
    msx_search_options o;
    msx_search_summary s;
    msx_result r;

    memset(&o, 0, sizeof o);                 /* zero = defaults everywhere */
    o.base = "examples/demo/models/base.pth";
    o.models = models;                        /* the fine-tuned specialists */
    o.n_models = 2;
    o.tasks = &task;                          /* calib/ + test/, images/ + masks/ */
    o.n_tasks = 1;
    o.n_trials = argc > 2 ? atoi(argv[2]) : 40; /* the 18 starting points included */
    o.seed = 1;
    o.out_dir = "runs/example-single";
    o.resume = 1;                             /* continue the log if there is one */
    o.progress = -1;                          /* we print our own lines */
    o.on_trial = on_trial;

    r = msx_search_run(&o, &s);
    if (r != MSX_OK) {
        fprintf(stderr, "search failed: %s\n", msx_last_error());
        return 1;
    }
    printf("\nbest trial %d: calib Dice %.4f, test Dice %.4f\n", s.best_trial, s.best_calib[0], s.best_test[0]);
    printf("merged model: %s/best.safetensors, plan: %s/best_plan.json, tables: %s/report.md\n", o.out_dir, o.out_dir,
           o.out_dir);
    return 0;
}
