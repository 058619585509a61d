/* tools/cmd_search.c - `medsamix search` (MedSAMix-S / MedSAMix-M) and
   `medsamix eval` (Dice of one model on task folders). */
#include "../medsamix.h"
#include "cli.h"

#include <math.h>
#include <signal.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t cmd_search_stop = 0;

/* First Ctrl-C: finish cleanly (finished trials are already in the log).
   Second: default action. */
static void cmd_search_on_signal(int sig) {
    cmd_search_stop = 1;
    signal(sig, SIG_DFL);
}

/* The library prints nothing; this callback shows its messages: progress as
   one live line on a terminal (plain lines otherwise or with --plain),
   warnings on stderr. */
typedef struct cmd_log_state {
    int live;      /* progress as a live line */
    int line_open; /* a live line is on screen */
    int quiet;     /* --quiet: warnings only */
} cmd_log_state;
static cmd_log_state cmd_ls; /* set by msx_cli_search_parse (--plain, --quiet) */

static void cmd_log(int level, const char *msg, void *user) {
    cmd_log_state *st = (cmd_log_state *)user;
    if (st->quiet && level != MSX_LOG_WARN) return;
    if (level == MSX_LOG_PROGRESS && st->live) {
        printf("\r\033[K%s", msg);
        st->line_open = 1;
        fflush(stdout);
        return;
    }
    if (st->line_open) { printf("\n"); st->line_open = 0; }
    fflush(stdout);
    if (level == MSX_LOG_WARN) fprintf(stderr, "%s\n", msg);
    else printf("%s\n", msg);
    fflush(level == MSX_LOG_WARN ? stderr : stdout);
}

static const char *const search_usage =
    "usage: medsamix search --base B.pth --models A.pth [A2.pth ..] --tasks DIR [DIR ..] [options]\n"
    "\n"
    "Searches a layer-wise merge of the fine-tuned models with the base (MedSAMix) on the\n"
    "calib split of the tasks; writes RUN/trials.jsonl, best_plan.json, best.safetensors,\n"
    "report.md, report.json and overlays/.\n"
    "\n"
    "  --multi              MedSAMix-M: one objective per task (ParEGO); without it MedSAMix-S on one\n"
    "                       task (several --tasks are refused: add --multi or run one search per task)\n"
    "  --mo parego|mean     multi-task scalarisation (default parego; mean = what the reference code ran)\n"
    "  --optimizer default|smac|random   proposal scheme: default (forest + log-EI + local GP refinement),\n"
    "                       smac (the paper's SMAC 2.2 settings and initial design), random (the same\n"
    "                       starting points as default, then uniform random plans)\n"
    "  --trials N           total trials, the reference's starting points included (default 100)\n"
    "  --fidelity race|full race: score candidates on growing prefixes of a seeded calib image order and\n"
    "                       stop those that cannot beat the incumbent (default); full: every trial on\n"
    "                       every calib image\n"
    "  --race-kappa K       racing knob: stop when mean + K standard errors of the paired per-image\n"
    "                       differences with the incumbent still loses (default 0.1; 0 = SMAC's mean rule)\n"
    "  --race-first N       calib images per task in the first racing stage (default 2; then 3, 4, 6, 9, .., all)\n"
    "  --max-passes N       stop once the search spent N encoder passes (one per image evaluation)\n"
    "  --time-limit MIN     stop starting new trials after MIN minutes\n"
    "  --jobs J             trials evaluated at once (default: one per thread)\n"
    "  --batch B            trials per synchronous batch: ask B, evaluate, tell B (default: J)\n"
    "  --threads T          total threads (default: all)\n"
    "  --precision P        encoder precision: fp32 (default), bf16, bf16-emu, auto (bf16 where native);\n"
    "                       recorded in the trial log (--resume refuses another) and the report\n"
    "  --seed S             optimiser seed (default 0)\n"
    "  --out RUN            run folder (default runs/search)\n"
    "  --resume             continue RUN/trials.jsonl (refused if the setup differs; every logged\n"
    "                       value is checked). One search per run folder at a time (RUN/.lock)\n"
    "  --granularity G      encoder blocks per layer group, 1..4 (default 2)\n"
    "  --no-prune           also search the groups that cannot change a box-only Dice\n"
    "  --config FILE        architecture JSON (default: inferred from the shapes)\n"
    "  --preprocess sam|medsam   input preprocessing for every model (default sam)\n"
    "  --mask-threshold T   mask foreground = value > T (default: value != 0)\n"
    "  --mask-label L       mask foreground = value == L\n"
    "  --split first|random --calib-fraction F --split-seed S   flat images/+masks/ folders\n"
    "  --box-margin PX --box-jitter F --box-seed S   prompt boxes (default: tight GT box)\n"
    "  --max-images N       at most N images per split\n"
    "  --intensity RULE     16-bit images -> 8 bits: minmax (default), percentile, window:C,W, high-byte\n"
    "  --nnunet ROOT --task-table T.json   tasks from nnU-Net NIfTI datasets (--tasks = task names, default all);\n"
    "                       the slices `medsamix prepare` writes; --calib-fraction F, --max-slices N (seed: --split-seed)\n"
    "  --overlays N         overlay PNGs per task (default 3, 0 = none)\n"
    "  --no-report          skip the final calib/test report\n"
    "  --plain / --quiet    progress as plain lines / only warnings (failed trials)\n";

static const char *const eval_usage =
    "usage: medsamix eval --model M --tasks DIR [DIR ..] [--split calib|test] [options]\n"
    "\n"
    "Prints the mean Dice (box prompt = tight GT box, mask token 0) per task.\n"
    "  --split calib|test   (default test)\n"
    "  --threads T          --config FILE   --preprocess sam|medsam\n"
    "  --precision fp32|bf16|bf16-emu|auto   encoder precision (default fp32)\n"
    "  --mask-threshold T   --mask-label L  --max-images N\n"
    "  --intensity RULE     16-bit images -> 8 bits: minmax (default), percentile, window:C,W, high-byte\n"
    "  --nnunet ROOT --task-table T.json   tasks from nnU-Net NIfTI datasets (--tasks = task names, default all)\n"
    "  --calib-fraction F --max-slices N --split-seed S   nnU-Net split and seeded slice subset\n"
    "  --split-mode first|random --calib-fraction F --split-seed S   flat task folders\n"
    "  --json               one JSON object instead of a table\n";

static int cmd_num(const char *opt, const char *s, double lo, double hi, double *out) {
    char *end;
    double v;
    if (!s) { fprintf(stderr, "%s needs a value\n", opt); return 0; }
    v = strtod(s, &end);
    if (end == s || *end || !isfinite(v)) {
        fprintf(stderr, "%s: '%s' is not a number\n", opt, s);
        return 0;
    }
    if (!(v >= lo && v <= hi)) {
        fprintf(stderr, "%s: %s is out of range [%g, %g]\n", opt, s, lo, hi);
        return 0;
    }
    *out = v;
    return 1;
}

/* Seeds are exact 64-bit integers (a double would round those above 2^53). */
static int cmd_seed(const char *opt, const char *s, uint64_t *out) {
    char *end;
    unsigned long long v;
    if (!s) { fprintf(stderr, "%s needs a value\n", opt); return 0; }
    errno = 0;
    v = strtoull(s, &end, 10);
    if (end == s || *end || *s == '-' || errno == ERANGE) {
        fprintf(stderr, "%s: '%s' is not a whole number in [0, 2^64)\n", opt, s);
        return 0;
    }
    *out = (uint64_t)v;
    return 1;
}

/* --nnunet ROOT --task-table T.json: --tasks then names tasks of the table
   (default: all of them), read from the NIfTI volumes (no PNG files). */
static const char *cmd_nnunet_root, *cmd_nnunet_table;

/* The tasks of the table when --tasks was not given; names are kept for the
   process's life. */
static int cmd_nnunet_all(const char **tasks, int *n) {
#ifdef MSX_NO_NIFTI
    (void)tasks; (void)n;
    fprintf(stderr, "built with MSX_NO_NIFTI: no nnU-Net datasets\n");
    return 0;
#else
    char **names;
    int k;
    if (msx_nnunet_task_names(cmd_nnunet_table, &names, &k) != MSX_OK) { fprintf(stderr, "%s\n", msx_last_error()); return 0; }
    if (k > MSX_SEARCH_MAX_TASKS) k = MSX_SEARCH_MAX_TASKS;
    for (*n = 0; *n < k; ++*n) tasks[*n] = names[*n];
    return 1;
#endif
}

/* Task/mask options shared by search and eval; returns 1 if argv[*i] was one, -1 on error. */
static int cmd_task_opt(int argc, char **argv, int *i, msx_task_options *t, msx_preprocess_mode *pre, const char *split_name) {
    const char *a = argv[*i], *v = *i + 1 < argc ? argv[*i + 1] : NULL;
    double x;
    if (!strcmp(a, "--mask-threshold")) {
        if (!cmd_num(a, v, 0, 65535, &x)) return -1;
        t->mask_rule = MSX_MASK_THRESHOLD; t->mask_value = (int)x;
    } else if (!strcmp(a, "--mask-label")) {
        if (!cmd_num(a, v, 0, 65535, &x)) return -1;
        t->mask_rule = MSX_MASK_LABEL; t->mask_value = (int)x;
    } else if (!strcmp(a, split_name)) {
        if (v && !strcmp(v, "first")) t->split = MSX_SPLIT_FIRST;
        else if (v && !strcmp(v, "random")) t->split = MSX_SPLIT_RANDOM;
        else { fprintf(stderr, "%s: use first or random, not '%s'\n", a, v ? v : ""); return -1; }
    } else if (!strcmp(a, "--calib-fraction")) {
        if (!cmd_num(a, v, 1e-6, 1 - 1e-6, &t->calib_fraction)) return -1;
    } else if (!strcmp(a, "--split-seed")) {
        if (!cmd_seed(a, v, &t->split_seed)) return -1;
    } else if (!strcmp(a, "--box-margin")) {
        if (!cmd_num(a, v, 0, 1e6, &x)) return -1;
        t->box_margin = (int)x;
    } else if (!strcmp(a, "--box-jitter")) {
        if (!cmd_num(a, v, 0, 1, &t->box_jitter)) return -1;
    } else if (!strcmp(a, "--box-seed")) {
        if (!cmd_seed(a, v, &t->box_seed)) return -1;
    } else if (!strcmp(a, "--max-images")) {
        if (!cmd_num(a, v, 1, 1e9, &x)) return -1;
        t->max_images = (int)x;
    } else if (!strcmp(a, "--max-slices")) {
        if (!cmd_num(a, v, 1, 1e9, &x)) return -1;
        t->max_slices = (int)x;
    } else if (!strcmp(a, "--nnunet") && v) {
        cmd_nnunet_root = v;
    } else if (!strcmp(a, "--task-table") && v) {
        cmd_nnunet_table = v;
    } else if (!strcmp(a, "--preprocess")) {
        if (v && !strcmp(v, "sam")) *pre = MSX_PREPROCESS_SAM;
        else if (v && !strcmp(v, "medsam")) *pre = MSX_PREPROCESS_MEDSAM;
        else { fprintf(stderr, "--preprocess: use sam or medsam, not '%s'\n", v ? v : ""); return -1; }
    } else if (!strcmp(a, "--intensity")) {
        if (!v) { fprintf(stderr, "--intensity needs a value\n"); return -1; }
        if (msx_intensity_parse(v, &t->intensity) != MSX_OK) { fprintf(stderr, "--intensity: %s\n", msx_last_error()); return -1; }
    } else return 0;
    ++*i;
    return 1;
}

static void cmd_print_file(const char *dir, const char *name) {
    char path[4096];
    void *data;
    size_t len;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (msx_read_file(path, 0, &data, &len) == MSX_OK) {
        fwrite(data, 1, len, stdout);
        msx_free(data);
    }
}

/* Parses `search` options (shared with tools/medsamix-mpi.c). models and
   tasks hold MSX_MAX_MODELS and MSX_SEARCH_MAX_TASKS entries. Returns 0 to
   go on (*help = 1: usage printed, stop), else the exit status of a usage
   error (printed on stderr). */
int msx_cli_search_parse(int argc, char **argv, msx_search_options *op, const char **models, const char **tasks, int *help) {
    msx_search_options o;
    int i, plain = 0;
    double x;
    memset(&o, 0, sizeof o);
    o.models = models;
    o.tasks = tasks;
    *help = 0;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int k;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { fputs(search_usage, stdout); *help = 1; return 0; }
        if ((k = cmd_task_opt(argc, argv, &i, &o.task, &o.preprocess, "--split")) < 0) return 2;
        if (k) continue;
        if (!strcmp(a, "--base") && v) { o.base = v; i++; }
        else if (!strcmp(a, "--models")) {
            if (!msx_cli_list("search", argc, argv, &i, models, &o.n_models, MSX_MAX_MODELS - 1)) return 2;
        } else if (!strcmp(a, "--tasks")) {
            if (!msx_cli_list("search", argc, argv, &i, tasks, &o.n_tasks, MSX_SEARCH_MAX_TASKS)) return 2;
        } else if (!strcmp(a, "--multi")) o.multi = 1;
        else if (!strcmp(a, "--mo") && v && (!strcmp(v, "parego") || !strcmp(v, "mean"))) { o.mo_mean = !strcmp(v, "mean"); i++; }
        else if (!strcmp(a, "--mo")) { fprintf(stderr, "search: --mo: use parego or mean, not '%s'\n", v ? v : ""); return 2; }
        else if (!strcmp(a, "--resume")) o.resume = 1;
        else if (!strcmp(a, "--no-prune")) o.no_prune = 1;
        else if (!strcmp(a, "--no-report")) o.no_report = 1;
        else if (!strcmp(a, "--optimizer") && v && (!strcmp(v, "default") || !strcmp(v, "smac") || !strcmp(v, "random"))) {
            o.optimizer = !strcmp(v, "smac") ? MSX_OPTIMIZER_SMAC : !strcmp(v, "random") ? MSX_OPTIMIZER_RANDOM : MSX_OPTIMIZER_DEFAULT;
            i++;
        }
        else if (!strcmp(a, "--plain")) plain = 1;
        else if (!strcmp(a, "--quiet")) { o.progress = -1; cmd_ls.quiet = 1; }
        else if (!strcmp(a, "--out") && v) { o.out_dir = v; i++; }
        else if (!strcmp(a, "--config") && v) { o.arch_config = v; i++; }
        else if (!strcmp(a, "--fidelity") && v && (!strcmp(v, "race") || !strcmp(v, "full"))) { o.fidelity = !strcmp(v, "full") ? MSX_FIDELITY_FULL : MSX_FIDELITY_RACE; i++; }
        else if (!strcmp(a, "--race-kappa")) { if (!cmd_num(a, v, 0, 100, &x)) return 2; o.race_kappa = x == 0 ? -1 : x; i++; }
        else if (!strcmp(a, "--race-first")) { if (!cmd_num(a, v, 1, 1e6, &x)) return 2; o.race_first = (int)x; i++; }
        else if (!strcmp(a, "--max-passes")) {
            if (!cmd_num(a, v, 1, 1e15, &x)) { fprintf(stderr, "--max-passes: give a number of encoder passes >= 1 (omit the option for no limit)\n"); return 2; }
            o.max_passes = (long long)x; i++;
        } else if (!strcmp(a, "--time-limit")) {
            if (!cmd_num(a, v, 1e-9, 1e9, &x)) { fprintf(stderr, "--time-limit: give a positive number of minutes (omit the option for no limit)\n"); return 2; }
            o.time_limit = x; i++;
        }
        else if (!strcmp(a, "--trials")) { if (!cmd_num(a, v, 1, 1e7, &x)) return 2; o.n_trials = (int)x; i++; }
        else if (!strcmp(a, "--jobs")) { if (!cmd_num(a, v, 1, 256, &x)) return 2; o.jobs = (int)x; i++; }
        else if (!strcmp(a, "--batch")) { if (!cmd_num(a, v, 1, 256, &x)) return 2; o.batch = (int)x; i++; }
        else if (!strcmp(a, "--threads")) { if (!cmd_num(a, v, 1, 1024, &x)) return 2; o.threads = (int)x; i++; }
        else if (!strcmp(a, "--precision") && v) {
            if (msx_precision_parse(v, &o.precision) != MSX_OK) { fprintf(stderr, "search: --precision: %s\n", msx_last_error()); return 2; }
            i++;
        }
        else if (!strcmp(a, "--seed")) { if (!cmd_seed(a, v, &o.seed)) return 2; i++; }
        else if (!strcmp(a, "--granularity")) { if (!cmd_num(a, v, 1, 4, &x)) return 2; o.granularity = (int)x; i++; }
        else if (!strcmp(a, "--overlays")) { if (!cmd_num(a, v, 0, 1000, &x)) return 2; o.n_overlays = x == 0 ? -1 : (int)x; i++; }
        else if (!v && (!strcmp(a, "--base") || !strcmp(a, "--out") || !strcmp(a, "--config"))) {
            fprintf(stderr, "search: %s needs a value\n", a);
            return 2;
        } else { fprintf(stderr, "search: unknown option '%s'\n\n%s", a, search_usage); return 2; }
    }
    if (cmd_nnunet_root || cmd_nnunet_table) {
        if (!cmd_nnunet_root || !cmd_nnunet_table) { fprintf(stderr, "search: --nnunet and --task-table go together\n"); return 2; }
        o.nnunet_root = cmd_nnunet_root;
        o.nnunet_table = cmd_nnunet_table;
        if (o.n_tasks < 1 && !cmd_nnunet_all(tasks, &o.n_tasks)) return 1;
    }
    if (!o.base || o.n_models < 1 || o.n_tasks < 1) {
        fprintf(stderr, "search: --base, --models and --tasks are required\n\n%s", search_usage);
        return 2;
    }
    if (o.n_tasks > 1 && !o.multi) {
        fprintf(stderr, "search: %d tasks given without --multi: a single-task search optimises one task only. Add --multi "
                        "(one objective per task), or run one search per task\n", o.n_tasks);
        return 2;
    }
    if (!o.out_dir) o.out_dir = "runs/search";
    /* the library prints nothing: this callback shows its messages */
    cmd_ls.live = !plain && isatty(STDOUT_FILENO);
    o.log = cmd_log;
    o.user = &cmd_ls;
    *op = o;
    return 0;
}

int msx_cmd_search(int argc, char **argv) {
    msx_search_options o;
    msx_search_summary s;
    const char *models[MSX_MAX_MODELS], *tasks[MSX_SEARCH_MAX_TASKS];
    int rc, help;
    msx_result r;
    if ((rc = msx_cli_search_parse(argc, argv, &o, models, tasks, &help)) != 0 || help) return rc;
    if (o.progress >= 0) {
        char rule[64];
        msx_intensity_str(&o.task.intensity, rule, sizeof rule);
        printf("16-bit images, if any, are mapped to 8 bits by --intensity %s\n", rule);
        fflush(stdout);
    }
    o.cancel = &cmd_search_stop;
    signal(SIGINT, cmd_search_on_signal);
    signal(SIGTERM, cmd_search_on_signal);
    r = msx_search_run(&o, &s);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    return msx_cli_search_finish(&o, &s, r);
}

/* Prints the outcome of a search; returns the exit status. */
int msx_cli_search_finish(const msx_search_options *op, const msx_search_summary *sp, msx_result r) {
    const msx_search_options o = *op;
    const msx_search_summary s = *sp;
    int i;
    if (cmd_ls.line_open) { printf("\n"); cmd_ls.line_open = 0; }
    if (r == MSX_E_CANCELLED || s.cancelled) {
        fprintf(stderr, "search: interrupted after %d trial(s) (%s); the log is %s/trials.jsonl - rerun with --resume to continue\n",
                s.n_trials_done, msx_last_error(), o.out_dir);
        return 130;
    }
    if (r != MSX_OK) {
        fprintf(stderr, "search: %s\n", msx_last_error());
        return 1;
    }
    if (s.budget_stop) printf("\nstopped by the %s after %d trial(s)\n", s.budget_stop == 1 ? "--max-passes budget" : "--time-limit", s.n_trials_done);
    /* 1-based, as the progress lines count trials */
    printf("\nbest: trial %d of %d (#%d in trials.jsonl), calib Dice", s.best_trial + 1, s.n_trials_done, s.best_trial);
    for (i = 0; i < (o.multi ? o.n_tasks : 1); i++) printf(" %.4f", s.best_calib[i]);
    printf(" (%.0f s)\nencoder passes: search %lld (the same trials in full: %lld), report %lld; %d trial(s) evaluated in full\n",
           s.seconds, s.passes_search, s.passes_full, s.passes_report, s.n_full);
    printf("outputs in %s/: trials.jsonl best_plan.json best.safetensors%s\n", o.out_dir,
           o.no_report ? "" : " report.md report.json overlays/");
    if (!o.no_report) { printf("\n"); cmd_print_file(o.out_dir, "report.md"); }
    return 0;
}

int msx_cmd_eval(int argc, char **argv) {
    const char *model = NULL, *config = NULL, *tdirs[MSX_SEARCH_MAX_TASKS];
    msx_task *tasks[MSX_SEARCH_MAX_TASKS];
    msx_task_options to;
    msx_preprocess_mode pre = MSX_PREPROCESS_SAM;
    msx_precision prec = MSX_PREC_FP32;
    msx_checkpoint *ck = NULL;
    msx_sam_arch arch;
    double dice[MSX_SEARCH_MAX_TASKS], x, mean = 0;
    int i, n = 0, nt = 0, split = 1, threads = 0, json = 0, rc = 0;
    msx_result r;
    memset(&to, 0, sizeof to);
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int k;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { fputs(eval_usage, stdout); return 0; }
        if ((k = cmd_task_opt(argc, argv, &i, &to, &pre, "--split-mode")) < 0) return 2;
        if (k) continue;
        if (!strcmp(a, "--model") && v) { model = v; i++; }
        else if (!strcmp(a, "--config") && v) { config = v; i++; }
        else if (!strcmp(a, "--tasks")) {
            if (!msx_cli_list("eval", argc, argv, &i, tdirs, &n, MSX_SEARCH_MAX_TASKS)) return 2;
        } else if (!strcmp(a, "--split") && v && (!strcmp(v, "test") || !strcmp(v, "calib"))) { split = !strcmp(v, "test"); i++; }
        else if (!strcmp(a, "--split")) { fprintf(stderr, "eval: --split: use calib or test, not '%s'\n", v ? v : ""); return 2; }
        else if (!strcmp(a, "--threads")) { if (!cmd_num(a, v, 1, 1024, &x)) return 2; threads = (int)x; i++; }
        else if (!strcmp(a, "--precision") && v) {
            if (msx_precision_parse(v, &prec) != MSX_OK) { fprintf(stderr, "eval: --precision: %s\n", msx_last_error()); return 2; }
            i++;
        }
        else if (!strcmp(a, "--json")) json = 1;
        else if (!v && (!strcmp(a, "--model") || !strcmp(a, "--config"))) { fprintf(stderr, "eval: %s needs a value\n", a); return 2; }
        else { fprintf(stderr, "eval: unknown option '%s'\n\n%s", a, eval_usage); return 2; }
    }
    if (cmd_nnunet_root || cmd_nnunet_table) {
        if (!cmd_nnunet_root || !cmd_nnunet_table) { fprintf(stderr, "eval: --nnunet and --task-table go together\n"); return 2; }
        if (n < 1 && !cmd_nnunet_all(tdirs, &n)) return 1;
    }
    if (!model || n < 1) { fprintf(stderr, "eval: --model and --tasks are required\n\n%s", eval_usage); return 2; }
    for (nt = 0; nt < n; nt++)
        if ((r = cmd_nnunet_root ? msx_task_open_nnunet(cmd_nnunet_root, cmd_nnunet_table, tdirs[nt], &to, &tasks[nt])
                                 : msx_task_open(tdirs[nt], &to, &tasks[nt])) != MSX_OK) { fprintf(stderr, "eval: %s\n", msx_last_error()); rc = 1; goto done; }
    {
        int n16 = 0;
        char rule[64];
        for (i = 0; i < n; i++) n16 += msx_task_n_16bit(tasks[i]);
        msx_intensity_str(&to.intensity, rule, sizeof rule);
        if (n16) fprintf(json ? stderr : stdout, "note: %d 16-bit image(s) mapped to 8 bits by --intensity %s\n", n16, rule);
    }
    if ((r = msx_sam_load(model, config, &ck, &arch)) != MSX_OK) { fprintf(stderr, "eval: %s\n", msx_last_error()); rc = 1; goto done; }
    if (prec == MSX_PREC_AUTO) prec = msx_sam_bf16_supported(NULL, 0) ? MSX_PREC_BF16 : MSX_PREC_FP32;
    if ((r = msx_eval_checkpoint_prec(ck, &arch, tasks, n, split, pre, threads, prec, dice)) != MSX_OK) {
        fprintf(stderr, "eval: %s\n", msx_last_error());
        rc = 1;
        goto done;
    }
    for (i = 0; i < n; i++) mean += dice[i] / n;
    if (json) {
        printf("{\"model\": \"%s\", \"split\": \"%s\", \"dice\": {", model, split ? "test" : "calib");
        for (i = 0; i < n; i++) printf("%s\"%s\": %.17g", i ? ", " : "", msx_task_name(tasks[i]), dice[i]);
        printf("}, \"mean\": %.17g, \"precision\": \"%s\"}\n", mean, msx_precision_name(prec));
    } else {
        printf("%-24s %8s %7s\n", "task", "images", "Dice");
        for (i = 0; i < n; i++) printf("%-24s %8d %7.4f\n", msx_task_name(tasks[i]), msx_task_count(tasks[i], split), dice[i]);
        if (n > 1) printf("%-24s %8s %7.4f\n", "mean", "", mean);
        printf("(encoder precision %s)\n", msx_precision_name(prec));
    }
done:
    for (i = 0; i < nt; i++) msx_task_free(tasks[i]);
    msx_ckpt_free(ck);
    return rc;
}
