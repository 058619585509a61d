/* tests/test_search_loop.c - examples/search_loop.c, written with the public
   API only, gives the same trials as msx_search_run with the same seed and
   batch (jobs 2): every trial's calib Dice per task to the last bit, the best
   trial, and (multi-task) the Pareto front. The example's main runs in this
   process with its stdout captured into a file. */
#define main search_loop_main
#include "../examples/search_loop.c"
#undef main
#include "test.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#define DEMO "examples/demo"

static char tmp_root[] = "/tmp/msx_loop_XXXXXX";

static msx__json *load_json(const char *dir, const char *name) {
    char p[512];
    void *txt;
    size_t len;
    msx__json *j;
    snprintf(p, sizeof p, "%s/%s", dir, name);
    if (msx_read_file(p, 0, &txt, &len) != MSX_OK) return NULL;
    j = msx__json_parse((const char *)txt, len, p);
    msx_free(txt);
    return j;
}

/* A small copy of a demo task (its first n calib images and first test
   image), to keep the test short. */
static const char *small_task(const char *name, int n) {
    static char dirs[4][300];
    static int k;
    char *dir = dirs[k++ & 3], src[400], dst[400];
    const char *sub[4] = {"calib/images", "calib/masks", "test/images", "test/masks"};
    int s, i;
    snprintf(dir, 300, "%s/%s", tmp_root, name);
    mkdir(dir, 0755);
    snprintf(dst, sizeof dst, "%s/calib", dir); mkdir(dst, 0755);
    snprintf(dst, sizeof dst, "%s/test", dir); mkdir(dst, 0755);
    for (s = 0; s < 4; s++) {
        snprintf(dst, sizeof dst, "%s/%s", dir, sub[s]);
        mkdir(dst, 0755);
        for (i = 0; i < (s < 2 ? n : 1); i++) {
            void *data = NULL;
            size_t len = 0;
            snprintf(src, sizeof src, DEMO "/tasks/%s/%s/%03d.png", name, sub[s], s < 2 ? i : 0);
            snprintf(dst, sizeof dst, "%s/%s/%03d.png", dir, sub[s], s < 2 ? i : 0);
            if (msx_read_file(src, 0, &data, &len) != MSX_OK || msx_write_file_atomic(dst, data, len) != MSX_OK)
                MSX_CHECK(0, "cannot copy %s: %s", src, msx_last_error());
            msx_free(data);
        }
    }
    return dir;
}

/* Runs the example with argv, stdout into `cap`; returns its exit status. */
static int run_example(int argc, char **argv, const char *cap) {
    int fd, save, rc;
    fflush(stdout);
    fd = open(cap, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    save = dup(1);
    if (fd < 0 || save < 0) return -1;
    dup2(fd, 1);
    rc = search_loop_main(argc, argv);
    fflush(stdout);
    dup2(save, 1);
    close(save);
    close(fd);
    return rc;
}

static void compare(const char *name, const char **task_dirs, int n_tasks, int trials, int seed) {
    static const char *const models[2] = {DEMO "/models/spec_ct.pth", DEMO "/models/spec_mri.pth"};
    char out[300], cap[320], line[4096], a_trials[16], a_seed[16];
    char *argv[3 + 8];
    msx_search_options o;
    msx_search_summary s;
    msx__search_loglines L;
    FILE *f;
    int i, k, n_lines = 0, same = 0, best = -2, front_ok = 1;
    snprintf(out, sizeof out, "%s/%s", tmp_root, name);
    snprintf(cap, sizeof cap, "%s/%s.out", tmp_root, name);
    memset(&o, 0, sizeof o);
    o.base = DEMO "/models/base.pth";
    o.models = models;
    o.n_models = 2;
    o.tasks = task_dirs;
    o.n_tasks = n_tasks;
    o.multi = n_tasks > 1;
    o.out_dir = out;
    o.n_trials = trials;
    o.jobs = 2;
    o.threads = 2;
    o.seed = (uint64_t)seed;
    o.no_report = 1;
    o.fidelity = MSX_FIDELITY_FULL; /* the example evaluates every trial in full */
    MSX_CHECK_OK(msx_search_run(&o, &s));
    snprintf(a_trials, sizeof a_trials, "%d", trials);
    snprintf(a_seed, sizeof a_seed, "%d", seed);
    argv[0] = (char *)"search_loop";
    argv[1] = a_trials;
    argv[2] = a_seed;
    for (k = 0; k < n_tasks; k++) argv[3 + k] = (char *)task_dirs[k];
    MSX_CHECK(run_example(3 + n_tasks, argv, cap) == 0, "%s: the example failed", name);
    snprintf(line, sizeof line, "%s/trials.jsonl", out);
    memset(&L, 0, sizeof L);
    MSX_CHECK_OK(msx__search_log_read(line, &L));
    f = fopen(cap, "r");
    MSX_CHECK(f != NULL, "%s: no example output", name);
    if (!f) { msx__search_loglines_free(&L); return; }
    while (fgets(line, sizeof line, f)) {
        int t;
        char *p = line;
        if (sscanf(line, "best trial %d", &best) == 1) {
            const char *c = strchr(line, ':');
            if (o.multi) { /* the example's front = pareto.json's trials, in order */
                msx__json *pj = load_json(out, "pareto.json");
                const msx__json *fr = pj ? msx__json_get(pj, "front") : NULL;
                int n = 0, v, used;
                front_ok = fr && c;
                for (c = c ? c + 1 : NULL; front_ok && c && sscanf(c, "%d%n", &v, &used) == 1; c += used, n++) {
                    double tv = -1;
                    front_ok = n < fr->n && msx__json_num(&fr->kids[n], "trial", &tv, -1) && (int)tv == v;
                }
                front_ok = front_ok && fr && n == fr->n;
                MSX_CHECK(front_ok, "%s: the example's Pareto front differs from pareto.json", name);
                msx__json_free(pj);
            }
            continue;
        }
        if (sscanf(p, "trial %d%n", &t, &k) != 1) continue;
        n_lines++;
        p += k;
        {
            const msx__json *line_t = NULL, *dv;
            int ok, j;
            for (j = 1; j < L.n && !line_t; j++) { /* the log is in finishing order */
                double tv = -1;
                if (msx__json_num(L.v[j], "trial", &tv, -1) && (int)tv == t) line_t = L.v[j];
            }
            dv = line_t ? msx__json_get(line_t, "dice") : NULL;
            ok = dv && dv->n == n_tasks;
            for (i = 0; ok && i < n_tasks; i++) {
                char *end;
                double d = strtod(p, &end);
                ok = end != p && dv->kids[i].type == MSX__JNUM && dv->kids[i].num == d;
                p = end;
            }
            same += ok;
            MSX_CHECK(ok, "%s: trial %d: the example's Dice differs from msx_search_run's log", name, t);
        }
    }
    fclose(f);
    MSX_CHECK(n_lines == trials && same == trials && L.n == trials + 1, "%s: %d lines, %d identical, %d logged", name, n_lines,
              same, L.n - 1);
    MSX_CHECK(best == s.best_trial, "%s: the example's best trial %d, msx_search_run's %d", name, best, s.best_trial);
    msx__search_loglines_free(&L);
}

int main(void) {
    const char *single[1], *multi[2];
    if (!mkdtemp(tmp_root)) { fprintf(stderr, "mkdtemp failed\n"); return 1; }
    single[0] = small_task("mri_abdomen", 6);
    multi[0] = small_task("mri_ring", 4);
    multi[1] = small_task("us_cyst", 4);
    /* past the starting points and the design into model-based proposals */
    compare("single", single, 1, msx_search_n_initial(2) + 12, 3);
    compare("multi", multi, 2, msx_search_n_initial(2) + 6, 4);
    {
        char cmd[300];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_root);
        if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmp_root);
    }
    return msx_test_summary("test_search_loop");
}
