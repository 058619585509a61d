/* examples/search_multi.c - MedSAMix-M: one merged SAM for SEVERAL tasks.
   Every task's calib Dice is an objective of its own (ParEGO); the result
   is the Pareto-optimal merge with the best mean Dice.

     make && build/examples/search_multi [TRIALS] [TASK_DIR ...]

   Default: all six demo tasks, 60 trials, output in runs/example-multi/
   (also pareto.json: every non-dominated merge with its per-task Dice). */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const demo_tasks[6] = {
    "examples/demo/tasks/natural_shapes", "examples/demo/tasks/ct_organ",    "examples/demo/tasks/mri_ring",
    "examples/demo/tasks/us_cyst",        "examples/demo/tasks/fundus_disc", "examples/demo/tasks/mri_abdomen"};

static void on_trial(const msx_trial_info *t, void *user) {
    int k;
    double mean = 0;
    (void)user;
    for (k = 0; k < t->n_tasks; k++) mean += t->failed ? 0 : t->dice[k] / t->n_tasks;
    printf("trial %3d/%d  %-22s mean calib Dice %.4f  best mean %.4f\n", t->trial + 1, t->n_trials, t->origin, mean,
           t->best_score);
}

int main(int argc, char **argv) {
    const char *models[2] = {"examples/demo/models/spec_ct.pth", "examples/demo/models/spec_mri.pth"};
    const char *const *tasks = argc > 2 ? (const char *const *)argv + 2 : demo_tasks;
    int n_tasks = argc > 2 ? argc - 2 : 6, k;
    msx_search_options o;
    msx_search_summary s;

    memset(&o, 0, sizeof o);
    o.base = "examples/demo/models/base.pth";
    o.models = models;
    o.n_models = 2;
    o.tasks = tasks;
    o.n_tasks = n_tasks;
    o.multi = 1;                               /* MedSAMix-M */
    o.n_trials = argc > 1 ? atoi(argv[1]) : 60;
    o.seed = 1;
    o.out_dir = "runs/example-multi";
    o.resume = 1;
    o.progress = -1;
    o.on_trial = on_trial;

    if (msx_search_run(&o, &s) != MSX_OK) {
        fprintf(stderr, "search failed: %s\n", msx_last_error());
        return 1;
    }
    printf("\nresult: trial %d of %d\n%-16s %8s %8s\n", s.best_trial, s.n_trials_done, "task", "calib", "test");
    for (k = 0; k < s.n_tasks; k++) {
        const char *name = strrchr(tasks[k], '/');
        printf("%-16s %8.4f %8.4f\n", name ? name + 1 : tasks[k], s.best_calib[k], s.best_test[k]);
    }
    printf("inputs, uniform merges and the result side by side: %s/report.md\n", o.out_dir);
    return 0;
}
