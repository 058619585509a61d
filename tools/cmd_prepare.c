/* medsamix prepare: nnU-Net raw datasets + a task table -> ordinary task
   folders (calib/ and test/ with images/ and masks/ PNGs) and slices.json,
   with the MedSAMix reference's slice pipeline. */
#include "../medsamix.h"
#include "cli.h"
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#ifndef MSX_NO_NIFTI

static const char *prepare_usage =
    "usage: medsamix prepare --nnunet ROOT --task-table TASKS.json --out DIR [options]\n"
    "\n"
    "Writes, per task of the table, DIR/<task>/{calib,test}/{images,masks}/<case>_c<channel>_z<z>.png\n"
    "(8-bit grey slice exactly as the reference makes it, mask 0/255) and DIR/<task>/slices.json.\n"
    "The folders are ordinary task folders for `search --tasks` and `eval --tasks`.\n"
    "  --nnunet ROOT        nnU-Net raw root holding DatasetXXX_Name/ folders\n"
    "  --task-table T.json  {\"format\": \"medsamix-nnunet-tasks-v1\", \"tasks\": {\"<task>\": [{\"dataset\", \"channel\", \"foreground\"}, ..]}}\n"
    "  --tasks NAME ..      only these tasks of the table (default: all)\n"
    "  --calib-fraction F   calib = the first int(N - N*(1-F)) sorted cases (default 0.2, the reference)\n"
    "  --max-slices N       at most N slices per task and split: a seeded subset spread over the cases (default: all)\n"
    "  --seed S             seed of the --max-slices subset (default 0)\n";

static void prepare_progress(int done, int total, void *user) {
    const char *task = (const char *)user;
    if (done == total || done % 20 == 0) fprintf(stderr, "prepare: %s: %d/%d volumes read\n", task, done, total);
}

static int prepare_mkdir(const char *p) {
    struct stat st;
    if (mkdir(p, 0755) == 0) return 1;
    return errno == EEXIST && stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

int msx_cmd_prepare(int argc, char **argv) {
    const char *root = NULL, *table = NULL, *out = NULL;
    const char *only[MSX_SEARCH_MAX_TASKS];
    int n_only = 0, i, k, n_names = 0, rc = 0;
    char **names = NULL;
    msx_nnunet_options no;
    memset(&no, 0, sizeof no);
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { fputs(prepare_usage, stdout); return 0; }
        if (!strcmp(a, "--nnunet") && v) { root = v; i++; }
        else if (!strcmp(a, "--task-table") && v) { table = v; i++; }
        else if (!strcmp(a, "--out") && v) { out = v; i++; }
        else if (!strcmp(a, "--tasks")) {
            while (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0) {
                if (n_only == MSX_SEARCH_MAX_TASKS) { fprintf(stderr, "prepare: --tasks: at most %d\n", MSX_SEARCH_MAX_TASKS); return 2; }
                only[n_only++] = argv[++i];
            }
        } else if (!strcmp(a, "--calib-fraction") && v) {
            no.calib_fraction = strtod(v, &end);
            if (*end || !(no.calib_fraction > 0 && no.calib_fraction < 1)) { fprintf(stderr, "prepare: --calib-fraction needs a number in (0, 1)\n"); return 2; }
            i++;
        } else if (!strcmp(a, "--max-slices") && v) {
            long n = strtol(v, &end, 10);
            if (*end || n < 1 || n > 100000000L) { fprintf(stderr, "prepare: --max-slices needs a positive number\n"); return 2; }
            no.max_slices = (int)n;
            i++;
        } else if (!strcmp(a, "--seed") && v) {
            no.seed = strtoull(v, &end, 10);
            if (*end) { fprintf(stderr, "prepare: --seed needs a non-negative integer\n"); return 2; }
            i++;
        } else {
            fprintf(stderr, "prepare: unknown option or missing value: %s\n\n%s", a, prepare_usage);
            return 2;
        }
    }
    if (!root || !table || !out) { fprintf(stderr, "prepare: --nnunet, --task-table and --out are required\n\n%s", prepare_usage); return 2; }
    if (msx_nnunet_task_names(table, &names, &n_names) != MSX_OK) { fprintf(stderr, "prepare: %s\n", msx_last_error()); return 1; }
    for (k = 0; k < n_only; k++) {
        int found = 0;
        for (i = 0; i < n_names; i++) found |= !strcmp(names[i], only[k]);
        if (!found) { fprintf(stderr, "prepare: %s has no task '%s'\n", table, only[k]); msx_nnunet_names_free(names, n_names); return 1; }
    }
    if (!prepare_mkdir(out)) { fprintf(stderr, "prepare: cannot create folder %s\n", out); msx_nnunet_names_free(names, n_names); return 1; }
    for (i = 0; i < n_names && rc == 0; i++) {
        msx_nnunet_task *t = NULL;
        char *dir;
        size_t n;
        int want = !n_only;
        for (k = 0; k < n_only; k++) want |= !strcmp(names[i], only[k]);
        if (!want) continue;
        if (msx_nnunet_task_load(root, table, names[i], &no, prepare_progress, names[i], &t) != MSX_OK) {
            fprintf(stderr, "prepare: task %s: %s\n", names[i], msx_last_error());
            rc = 1;
            break;
        }
        n = strlen(out) + strlen(names[i]) + 2;
        dir = (char *)malloc(n);
        if (!dir) { msx_nnunet_task_free(t); rc = 1; break; }
        snprintf(dir, n, "%s/%s", out, names[i]);
        if (msx_nnunet_task_write(t, dir) != MSX_OK) {
            fprintf(stderr, "prepare: task %s: %s\n", names[i], msx_last_error());
            rc = 1;
        } else {
            int nc[2] = {0, 0}, e;
            for (e = 0; e < t->n_entries; e++) { nc[0] += t->entries[e].n_cases[0]; nc[1] += t->entries[e].n_cases[1]; }
            printf("prepare: %-20s calib %d slices (%d cases), test %d slices (%d cases) -> %s\n", names[i], t->n[0], nc[0],
                   t->n[1], nc[1], dir);
            if (!t->n[0] || !t->n[1])
                fprintf(stderr, "prepare: warning: task %s has an empty %s split (%d cases); search/eval need slices in both, "
                                "change --calib-fraction\n", names[i], t->n[0] ? "test" : "calib", t->n[0] ? nc[1] : nc[0]);
        }
        free(dir);
        msx_nnunet_task_free(t);
    }
    msx_nnunet_names_free(names, n_names);
    return rc;
}
#else
int msx_cmd_prepare(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "medsamix was built with MSX_NO_NIFTI: no NIfTI volumes\n");
    return 1;
}
#endif
