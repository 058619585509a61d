/* tools/cmd_bench_search.c - `medsamix bench-search`: MedSAMix-S and -M on the
   demo world with full evaluation and with racing, several seeds; one
   RESULT line per setting (a benchmark, not a test: nothing is asserted). */
#include "../medsamix.h"
#include "cli.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const bench_search_usage =
    "usage: medsamix bench-search [options]\n"
    "\n"
    "Runs MedSAMix-S (one task) and MedSAMix-M (all tasks) searches on the demo world with\n"
    "--fidelity full and with racing for several seeds, and prints per run and per setting:\n"
    "  RESULT search mode=<S|M> fidelity=<full|race> seeds=K trials=N passes_median=P test_mean_dice_median=D ...\n"
    "(Dice in percent points; passes = encoder passes of the search).\n"
    "\n"
    "  --demo DIR           demo world (default examples/demo)\n"
    "  --seeds K            seeds 0..K-1 (default 5)\n"
    "  --modes S,M          which searches (default S,M)\n"
    "  --fidelity full,race which fidelities (default full,race)\n"
    "  --task NAME          MedSAMix-S task (default mri_abdomen); --task all = one S setting per task\n"
    "  --s-trials N         MedSAMix-S trials (default 60)\n"
    "  --m-trials N         MedSAMix-M trials (default 150)\n"
    "  --max-passes N       equal budget of encoder passes for every run (trials then only cap it)\n"
    "  --race-kappa K       racing knob (default: the library's)\n"
    "  --optimizer NAME     default|smac|random (as for search; runs of the others go to *-smac-s*, *-random-s*)\n"
    "  --jobs J --threads T as for search\n"
    "  --out DIR            run folders (default runs/bench-search); finished runs are resumed, not redone\n";

static int bs_cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double bs_median(double *v, int n) {
    if (n < 1) return NAN;
    qsort(v, (size_t)n, sizeof *v, bs_cmp);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static int bs_has(const char *list, const char *item) {
    size_t n = strlen(item);
    const char *p = list;
    while ((p = strstr(p, item)) != NULL) {
        if ((p == list || p[-1] == ',') && (p[n] == 0 || p[n] == ',')) return 1;
        p += n;
    }
    return 0;
}

int msx_cmd_bench_search(int argc, char **argv) {
    const char *demo = "examples/demo", *modes = "S,M", *fids = "full,race", *task = "mri_abdomen", *out = "runs/bench-search";
    int seeds = 5, s_trials = 60, m_trials = 150, jobs = 0, threads = 0, i, m, f, s, k;
    long long max_passes = 0;
    double kappa = 0, x;
    msx_optimizer optimizer = MSX_OPTIMIZER_DEFAULT;
    const char *opt_name = "default";
    char models[2][512], base[512], tdirs[MSX_SEARCH_MAX_TASKS][1024], run[2048], tdir[512];
    const char *mp[2] = {models[0], models[1]}, *tp[MSX_SEARCH_MAX_TASKS];
    int n_tasks = 0;
    DIR *d;
    struct dirent *e;
    for (i = 1; i < argc; i += 2) { /* every option takes one value */
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { fputs(bench_search_usage, stdout); return 0; }
        if (!v) { fprintf(stderr, "bench-search: %s needs a value\n", a); return 2; }
        if (!strcmp(a, "--demo")) demo = v;
        else if (!strcmp(a, "--modes")) modes = v;
        else if (!strcmp(a, "--fidelity")) fids = v;
        else if (!strcmp(a, "--task")) task = v;
        else if (!strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--seeds") && (seeds = atoi(v)) >= 1) {}
        else if (!strcmp(a, "--s-trials") && (s_trials = atoi(v)) >= 1) {}
        else if (!strcmp(a, "--m-trials") && (m_trials = atoi(v)) >= 1) {}
        else if (!strcmp(a, "--jobs") && (jobs = atoi(v)) >= 1) {}
        else if (!strcmp(a, "--threads") && (threads = atoi(v)) >= 1) {}
        else if (!strcmp(a, "--max-passes") && (x = atof(v)) >= 1) max_passes = (long long)x;
        else if (!strcmp(a, "--race-kappa") && (x = atof(v)) >= 0) kappa = x == 0 ? -1 : x;
        else if (!strcmp(a, "--optimizer") && (!strcmp(v, "default") || !strcmp(v, "smac") || !strcmp(v, "random")))
            opt_name = v, optimizer = !strcmp(v, "smac") ? MSX_OPTIMIZER_SMAC : !strcmp(v, "random") ? MSX_OPTIMIZER_RANDOM : MSX_OPTIMIZER_DEFAULT;
        else { fprintf(stderr, "bench-search: bad option or value '%s %s'\n\n%s", a, v, bench_search_usage); return 2; }
    }
    snprintf(base, sizeof base, "%s/models/base.pth", demo);
    snprintf(models[0], sizeof models[0], "%s/models/spec_ct.pth", demo);
    snprintf(models[1], sizeof models[1], "%s/models/spec_mri.pth", demo);
    snprintf(tdir, sizeof tdir, "%s/tasks", demo);
    if (!(d = opendir(tdir))) { fprintf(stderr, "bench-search: %s: no tasks folder (--demo?)\n", tdir); return 1; }
    while ((e = readdir(d)) != NULL && n_tasks < MSX_SEARCH_MAX_TASKS)
        if (e->d_name[0] != '.') snprintf(tdirs[n_tasks++], sizeof tdirs[0], "%s/%s", tdir, e->d_name);
    closedir(d);
    qsort(tdirs, (size_t)n_tasks, sizeof tdirs[0], (int (*)(const void *, const void *))strcmp);
    for (i = 0; i < n_tasks; i++) tp[i] = tdirs[i];
    for (m = 0; m < 2; m++) {
        const char *mode = m ? "M" : "S";
        int n_settings = m ? 1 : (!strcmp(task, "all") ? n_tasks : 1);
        if (!bs_has(modes, mode)) continue;
        for (k = 0; k < n_settings; k++) {
            const char *stask = NULL;
            int ti = -1;
            if (!m) {
                for (i = 0; i < n_tasks; i++) {
                    const char *nm = strrchr(tdirs[i], '/') + 1;
                    if (!strcmp(task, "all") ? i == k : !strcmp(nm, task)) { ti = i; stask = nm; break; }
                }
                if (ti < 0) { fprintf(stderr, "bench-search: no task '%s' in %s/tasks\n", task, demo); return 2; }
            }
            for (f = 0; f < 2; f++) {
                const char *fid = f ? "race" : "full";
                double passes[256], test[256], calib[256];
                int n = 0;
                if (!bs_has(fids, fid)) continue;
                for (s = 0; s < seeds && s < 256; s++) {
                    msx_search_options o;
                    msx_search_summary sum;
                    msx_result r;
                    double tm = 0, cm = 0;
                    int nt;
                    memset(&o, 0, sizeof o);
                    o.base = base;
                    o.models = mp;
                    o.n_models = 2;
                    o.tasks = m ? tp : tp + ti;
                    o.n_tasks = m ? n_tasks : 1;
                    o.multi = m;
                    o.n_trials = m ? m_trials : s_trials;
                    o.seed = (uint64_t)s;
                    o.jobs = jobs;
                    o.threads = threads;
                    o.fidelity = f ? MSX_FIDELITY_RACE : MSX_FIDELITY_FULL;
                    o.race_kappa = kappa;
                    o.optimizer = optimizer;
                    o.max_passes = max_passes;
                    o.progress = -1;
                    o.n_overlays = -1;
                    o.resume = 1;
                    snprintf(run, sizeof run, "%s/%s%s%s-%s%s%s%s-s%d", out, mode, m ? "" : "-", m ? "" : stask, fid,
                             max_passes ? "-budget" : "", optimizer ? "-" : "", optimizer ? opt_name : "", s);
                    o.out_dir = run;
                    r = msx_search_run(&o, &sum);
                    if (r != MSX_OK) { fprintf(stderr, "bench-search: %s: %s\n", run, msx_last_error()); return 1; }
                    nt = o.n_tasks;
                    for (i = 0; i < nt; i++) { tm += 100 * sum.best_test[i] / nt; cm += 100 * sum.best_calib[i] / nt; }
                    passes[n] = (double)sum.passes_search;
                    test[n] = tm;
                    calib[n] = cm;
                    n++;
                    printf("run mode=%s%s%s fidelity=%s seed=%d trials=%d passes=%lld full_equivalent=%lld calib_mean_dice=%.2f "
                           "test_mean_dice=%.2f seconds=%.0f\n",
                           mode, m ? "" : " task=", m ? "" : stask, fid, s, sum.n_trials_done, sum.passes_search, sum.passes_full,
                           cm, tm, sum.seconds);
                    fflush(stdout);
                }
                printf("RESULT search mode=%s fidelity=%s seeds=%d trials=%d passes_median=%.0f test_mean_dice_median=%.2f "
                       "calib_mean_dice_median=%.2f%s%s",
                       mode, fid, n, m ? m_trials : s_trials, bs_median(passes, n), bs_median(test, n), bs_median(calib, n),
                       m ? "" : " task=", m ? "" : stask);
                if (max_passes) printf(" max_passes=%lld", max_passes);
                if (optimizer) printf(" optimizer=%s", opt_name);
                printf("\n");
                fflush(stdout);
            }
        }
    }
    return 0;
}
