/* examples/search_loop.c - the MedSAMix search loop written out with the
   public API (what msx_search_run does, minus the log, resume, parallel
   workers and report): build the space, ask a batch, turn each configuration
   into a plan, merge into a preallocated checkpoint, refresh the model, score
   the calibration images, tell, read the Pareto front.

     make && build/examples/search_loop [TRIALS [SEED [TASK_DIR ...]]]

   Default: 40 trials, seed 0, the demo world's mri_abdomen task; several
   tasks = MedSAMix-M (one objective per task). It gives the same trials as
   `medsamix search --jobs 2` (--multi for several tasks) with the same seed
   (checked by tests/test_search_loop.c). */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"

#include <stdio.h>
#include <stdlib.h>

#define BATCH 2 /* trials per ask: msx_search_run asks `jobs` at a time */

typedef struct item { msx_image img; msx_mask gt; float box[4]; } item;

int main(int argc, char **argv) {
    const char *paths[3] = {"examples/demo/models/base.pth", "examples/demo/models/spec_ct.pth",
                            "examples/demo/models/spec_mri.pth"};
    const char *stems[3] = {"base", "spec_ct", "spec_mri"}; /* file names without extension */
    const char *default_task = "examples/demo/tasks/mri_abdomen";
    const char *const *task_dirs = argc > 3 ? (const char *const *)argv + 3 : &default_task;
    int n_tasks = argc > 3 ? argc - 3 : 1, n_trials = argc > 1 ? atoi(argv[1]) : 40;
    msx_checkpoint *ck[3] = {NULL, NULL, NULL}, *merged = NULL;
    msx_sam_arch arch;
    msx_merger *mg = NULL;
    msx_plan *plan = NULL;
    msx_sam *sam = NULL;
    msx_sam_ws *ws = NULL;
    msx_space *space = NULL;
    msx_opt *opt = NULL;
    msx_task *tasks[8] = {NULL};
    item *items[8] = {NULL};
    msx_mask pred = {0};
    msx_search_options so = {0};
    msx_opt_options oo;
    double *init = NULL, *cfg = NULL, cost[8], dice[8];
    int i, s, t, n_init, dim, done = 0, ids[BATCH], front[512], n_front;
    msx_result r = MSX_OK;

    if (n_tasks > 8 || n_trials < 1) { fprintf(stderr, "usage: search_loop [TRIALS [SEED [TASK_DIR ...(<= 8)]]]\n"); return 2; }
    /* tasks and their calibration images (decoded once) */
    for (t = 0; t < n_tasks && r == MSX_OK; t++) {
        if ((r = msx_task_open(task_dirs[t], NULL, &tasks[t])) != MSX_OK) break;
        items[t] = (item *)calloc((size_t)msx_task_count(tasks[t], MSX_SPLIT_CALIB), sizeof(item));
        for (i = 0; i < msx_task_count(tasks[t], MSX_SPLIT_CALIB) && r == MSX_OK; i++) {
            r = msx_image_load(msx_task_image(tasks[t], MSX_SPLIT_CALIB, i), &items[t][i].img);
            if (r == MSX_OK) r = msx_task_mask(tasks[t], MSX_SPLIT_CALIB, i, &items[t][i].gt);
            msx_task_box(tasks[t], MSX_SPLIT_CALIB, i, items[t][i].box);
        }
    }
    /* models: the base and two fine-tuned; one merged copy that every trial overwrites */
    for (i = 0; i < 3 && r == MSX_OK; i++) r = msx_sam_load(paths[i], NULL, &ck[i], i ? NULL : &arch);
    if (r == MSX_OK) r = msx_merger_create(ck[0], (const msx_checkpoint *const *)ck + 1, 2, 2, &mg);
    if (r == MSX_OK) r = msx_merger_plan_create(mg, &plan);
    if (r == MSX_OK) r = msx_ckpt_clone(ck[0], &merged);
    if (r == MSX_OK) r = msx_sam_create(merged, &arch, NULL, &sam);
    if (r == MSX_OK) r = msx_sam_ws_create(sam, &ws);
    /* the space (dead groups pruned), the starting points, the optimiser */
    if (r == MSX_OK) r = msx_search_space_create(arch.depth, 2, stems, 3, 1, &space);
    if (r != MSX_OK) goto done;
    dim = msx_space_dim(space);
    n_init = msx_search_n_initial(2);
    init = (double *)malloc(sizeof(double) * (size_t)(n_init * dim));
    cfg = (double *)malloc(sizeof(double) * (size_t)(BATCH * dim));
    for (i = 0; i < n_init && r == MSX_OK; i++) r = msx_search_initial(space, plan, i, init + (size_t)i * dim);
    so.n_trials = n_trials;
    so.seed = argc > 2 ? strtoull(argv[2], NULL, 10) : 0;
    so.multi = n_tasks > 1;
    so.n_tasks = n_tasks;
    msx_search_opt_options(&so, init, n_init, &oo);
    if (r == MSX_OK) r = msx_opt_create(space, &oo, &opt);

    while (r == MSX_OK && done < n_trials) {
        int n = n_trials - done < BATCH ? n_trials - done : BATCH;
        if ((r = msx_opt_ask(opt, n, cfg, ids)) != MSX_OK) break;
        for (s = 0; s < n && r == MSX_OK; s++, done++) {
            int failed = 0;
            /* configuration -> plan -> merged weights -> model */
            if ((r = msx_search_config_to_plan(space, cfg + (size_t)s * dim, plan)) != MSX_OK) break;
            if (msx_merger_run(mg, plan, merged, NULL) != MSX_OK || msx_sam_refresh(sam) != MSX_OK) failed = 1;
            /* objective: 1 - mean calib Dice per task (box prompt) */
            for (t = 0; t < n_tasks && !failed; t++) {
                int n_img = msx_task_count(tasks[t], MSX_SPLIT_CALIB);
                double sum = 0, d = 0;
                for (i = 0; i < n_img && !failed; i++) {
                    failed = msx_segment_box(sam, ws, &items[t][i].img, items[t][i].box, NULL, &pred) != MSX_OK ||
                             msx_dice(&pred, &items[t][i].gt, &d) != MSX_OK;
                    sum += d;
                }
                dice[t] = sum / n_img;
                cost[t] = 1.0 - dice[t];
            }
            printf("trial %d", done);
            for (t = 0; t < n_tasks; t++) printf(" %.17g", failed ? -1.0 : dice[t]);
            printf("\n");
            r = msx_opt_tell(opt, ids[s], failed ? NULL : cost, failed);
        }
    }
    if (r == MSX_OK) { /* the result: the best trial, and the whole Pareto front */
        n_front = msx_opt_pareto(opt, front, 512);
        printf("best trial %d; Pareto front (%d):", msx_opt_best(opt, NULL, NULL), n_front);
        for (i = 0; i < n_front && i < 512; i++) printf(" %d", front[i]);
        printf("\n");
    }
done:
    if (r != MSX_OK) fprintf(stderr, "search_loop: %s\n", msx_last_error());
    for (t = 0; t < n_tasks && tasks[t]; t++) {
        for (i = 0; i < msx_task_count(tasks[t], MSX_SPLIT_CALIB); i++) { msx_image_free(&items[t][i].img); msx_mask_free(&items[t][i].gt); }
        free(items[t]);
        msx_task_free(tasks[t]);
    }
    msx_mask_free(&pred);
    msx_opt_free(opt); msx_space_free(space); msx_sam_ws_free(ws); msx_sam_free(sam);
    msx_plan_free(plan); msx_merger_free(mg); msx_ckpt_free(merged);
    for (i = 0; i < 3; i++) msx_ckpt_free(ck[i]);
    free(init); free(cfg);
    return r == MSX_OK ? 0 : 1;
}
