/* ======================================================================== */
/* API: MedSAMix search — tasks (labelled images), Dice evaluation of a     */
/* checkpoint, single-/multi-task merge search with a crash-safe JSONL log,  */
/* reports. Ties together ckpt, sam, image, merge and opt.                   */
/* ======================================================================== */
#include <signal.h>

#ifndef MSX_SEARCH_MAX_TASKS
#define MSX_SEARCH_MAX_TASKS 64
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* --- tasks ---------------------------------------------------------------- */
/* A task is a folder with calib/ and test/, each holding images/ and masks/
   (matched by file stem; PNG/JPEG/BMP via stb_image), or a flat folder with
   images/ and masks/ that is split by `split` below. */
typedef enum msx_mask_rule {
    MSX_MASK_NONZERO = 0,  /* foreground = value != 0 (default) */
    MSX_MASK_THRESHOLD,    /* foreground = value > mask_value */
    MSX_MASK_LABEL         /* foreground = value == mask_value */
} msx_mask_rule;

typedef enum msx_split_mode {
    MSX_SPLIT_AUTO = 0, /* calib/ + test/ folders; a flat folder -> MSX_SPLIT_FIRST */
    MSX_SPLIT_FIRST,    /* flat: calib = first int(fraction*N) sorted names (the reference) */
    MSX_SPLIT_RANDOM    /* flat: seeded shuffle, calib = first round(fraction*N) */
} msx_split_mode;

enum { MSX_SPLIT_CALIB = 0, MSX_SPLIT_TEST = 1 };

/* Zero-initialise, then set what you need. */
typedef struct msx_task_options {
    msx_mask_rule mask_rule;
    int mask_value;          /* threshold or label for the two rules above */
    msx_split_mode split;
    double calib_fraction;   /* flat folders; 0 = 0.2 */
    uint64_t split_seed;     /* MSX_SPLIT_RANDOM */
    int box_margin;          /* pixels added on each side of the tight box */
    double box_jitter;       /* each coordinate moved by U(-j, j) * box side; 0 = none */
    uint64_t box_seed;       /* jitter seed (always seeded: same boxes every run) */
    int max_images;          /* per split, 0 = all */
} msx_task_options;

typedef struct msx_task msx_task;

/* Lists and validates a task folder: every image has a mask with the same
   stem and vice versa, every file decodes, every mask has foreground, sizes
   agree. The error names the offending file. Pixels are not kept. */
MSXDEF msx_result msx_task_open(const char *dir, const msx_task_options *opt, msx_task **out);
MSXDEF void msx_task_free(msx_task *t);
MSXDEF const char *msx_task_name(const msx_task *t); /* folder base name */
MSXDEF int msx_task_count(const msx_task *t, int split);
MSXDEF const char *msx_task_image(const msx_task *t, int split, int i); /* path */
/* The prompt box (x0 y0 x1 y1, pixel indices, max inclusive) of image i. */
MSXDEF void msx_task_box(const msx_task *t, int split, int i, float box[4]);

/* --- evaluation ------------------------------------------------------------ */
/* Mean Dice (image-pooled, 2ΣPG/(ΣP+ΣG+1e-8), box prompt, mask token 0) of the
   model `ck` on one split of each task. dice[i] for task i. n_threads 0 = all. */
MSXDEF msx_result msx_eval_checkpoint(const msx_checkpoint *ck, const msx_sam_arch *arch,
                                      msx_task *const *tasks, int n_tasks, int split,
                                      msx_preprocess_mode preprocess, int n_threads, double *dice);

/* --- search ----------------------------------------------------------------- */
typedef struct msx_trial_info {
    int trial, n_trials;        /* 0-based index of the finished trial, total */
    int failed;
    double seconds;
    int n_tasks;
    const double *dice;         /* calib Dice per task */
    double best_score;          /* best objective so far (mean calib Dice of the best) */
    const char *origin;         /* "base", "linear", ..., "optimizer" */
} msx_trial_info;

/* Zero-initialise, then set what you need. */
typedef struct msx_search_options {
    const char *base;                 /* base checkpoint (.pth / .safetensors) */
    const char *const *models;        /* fine-tuned checkpoints */
    int n_models;
    const char *const *tasks;         /* task folders */
    int n_tasks;
    const char *arch_config;          /* optional architecture JSON (NULL: infer) */
    const char *out_dir;              /* run folder (created); NULL = "runs/search" */
    int multi;                        /* 0: MedSAMix-S on tasks[0]; 1: MedSAMix-M, one objective per task */
    int mo_mean;                      /* multi-task scalarisation: 0 ParEGO (paper), 1 mean of normalised costs (what the reference code ran) */
    int n_trials;                     /* total, initial configurations included; 0 = 100 */
    int jobs;                         /* trials evaluated at once; 0 = one per thread (J x 1 thread: on 2 cores
                                         far faster than 1 x 2, whose per-primitive barriers stall under load) */
    int threads;                      /* total threads; 0 = omp_get_max_threads() */
    uint64_t seed;
    int granularity;                  /* blocks per layer group, 1..4; 0 = 2 */
    int no_prune;                     /* 1: also search the groups that cannot change box-only Dice */
    int resume;                       /* continue from out_dir/trials.jsonl */
    int progress;                     /* 0 auto (live line on a TTY), 1 plain lines, -1 quiet */
    int n_overlays;                   /* overlay PNGs per task; 0 = 3, -1 = none */
    int no_report;                    /* 1: skip the final test evaluation and report */
    msx_task_options task;
    msx_preprocess_mode preprocess;   /* MSX_PREPROCESS_SAM (default) or _MEDSAM, the same for every model */
    const volatile sig_atomic_t *cancel; /* set non-zero (e.g. from SIGINT) to stop */
    void (*on_trial)(const msx_trial_info *info, void *user);
    void *user;
} msx_search_options;

typedef struct msx_search_summary {
    int n_trials_done;                /* in the log, resumed ones included */
    int cancelled;                    /* stopped by *cancel */
    int best_trial;
    int n_tasks;
    double best_calib[MSX_SEARCH_MAX_TASKS]; /* chosen result, per task */
    double best_test[MSX_SEARCH_MAX_TASKS];  /* NaN when no report was made */
    double seconds;
} msx_search_summary;

/* Runs a whole search and writes, in out_dir: trials.jsonl, best_plan.json,
   best.safetensors, report.md, report.json, overlays/ (and pareto front in
   best_plan.json for multi-task). */
MSXDEF msx_result msx_search_run(const msx_search_options *opt, msx_search_summary *summary);

/* Starting points evaluated first for n fine-tuned models: the reference's
   (each model alone, uniform SLERP t = 0.5, TA and TIES r = 0.2 with
   λ in {0.3, 0.5, 0.6, 0.7, 0.8, 1.0}; ref §2.5) plus linear equal weights
   and TIES r = 0.5 λ = 1 (the report's uniform merges): n + 16. */
MSXDEF int msx_search_n_initial(int n_models);

#ifdef __cplusplus
}
#endif
