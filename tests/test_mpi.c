/* tests/test_mpi.c - the MPI driver (build/medsamix-mpi, `make mpi`) on the
   demo world, against the single-process tool as the reference:
   - `mpirun -np 3 medsamix-mpi search ... --sync --batch 2` writes the same
     trial records (configurations, per-image Dice, costs; not the timings)
     and the same best_plan.json as `medsamix search ... --batch 2`;
   - a rank killed with SIGKILL mid-search ends the job; rerunning with
     --resume keeps every finished trial and completes, and the result
     equals the uninterrupted run;
   - the async schedule completes its trials and says so in the log;
   - start-up errors: a rank that cannot read its task folder, a rank whose
     task folder differs; each a clear message from rank 0, no hang; -np 1
     runs as a single process.
   Skipped (one line) when mpirun or build/medsamix-mpi is missing or under
   ASan (Open MPI's own allocations). MSX_BUILD names the build folder. */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "test.h"

#include <dirent.h>
#include <signal.h>
#include <sys/wait.h>

#define DEMO "examples/demo"
#define MODELS "--base " DEMO "/models/base.pth --models " DEMO "/models/spec_ct.pth " DEMO "/models/spec_mri.pth"
#define MPIRUN "mpirun --allow-run-as-root --oversubscribe"

static char tmp_root[200], build[200];

/* Runs a shell command line in its own process group with a deadline;
   returns its exit status (-1: timed out and killed). Output -> log. */
static int run(const char *cmd, const char *log, double timeout_s) {
    pid_t pid;
    int status;
    double t0 = msx_time_now();
    struct timespec nap = {0, 20000000};
    fflush(NULL);
    pid = fork();
    if (pid == 0) {
        setpgid(0, 0);
        if (log && !freopen(log, "w", stdout)) _exit(127);
        if (log) dup2(1, 2);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    if (pid < 0) return -2;
    for (;;) {
        pid_t w = waitpid(pid, &status, WNOHANG);
        if (w == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        if (msx_time_now() - t0 > timeout_s) {
            kill(-pid, SIGKILL);
            waitpid(pid, &status, 0);
            return -1;
        }
        nanosleep(&nap, NULL);
    }
}

/* Whole file (also /proc files, whose size reads as 0), NUL-terminated;
   *len (if non-NULL) = bytes read. */
static char *slurp_n(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    size_t n = 0, cap = 4096, k;
    char *s = (char *)malloc(cap + 1);
    if (!f || !s) { if (f) fclose(f); free(s); return NULL; }
    while ((k = fread(s + n, 1, cap - n, f)) > 0) {
        n += k;
        if (n == cap) {
            char *t = (char *)realloc(s, cap * 2 + 1);
            if (!t) break;
            s = t;
            cap *= 2;
        }
    }
    fclose(f);
    s[n] = 0;
    if (len) *len = n;
    return s;
}
static char *slurp(const char *path) { return slurp_n(path, NULL); }

static int count_lines(const char *path) {
    FILE *f = fopen(path, "r");
    int n = 0, c;
    if (!f) return 0;
    while ((c = fgetc(f)) != EOF) n += c == '\n';
    fclose(f);
    return n;
}

static int file_has(const char *path, const char *needle) {
    char *s = slurp(path);
    int ok = s && strstr(s, needle) != NULL;
    free(s);
    return ok;
}

static int same_file(const char *a, const char *b) {
    char *x = slurp(a), *y = slurp(b);
    int ok = x && y && !strcmp(x, y);
    free(x);
    free(y);
    return ok;
}

/* Runs the plain tool and the MPI driver with the same search options. */
static void search_cmd(char *cmd, size_t cap, const char *tool_prefix, const char *tool, const char *tasks, const char *out, int trials,
                       const char *extra) {
    snprintf(cmd, cap, "%s %s/%s search " MODELS " --tasks %s --trials %d --max-images 4 --seed 5 --jobs 1 --threads 1 "
                       "--no-report --plain --out %s %s",
             tool_prefix, build, tool, tasks, trials, out, extra);
}

#define TRIALS_A 25 /* 19 starting points + a 1-config design + model-based trials */

static void test_sync_equals_single(void) {
    char cmd[2048], a[400], b[400], la[500], lb[500], log[500];
    char *ra[64], *rb[64];
    int rc, na, nb, t, diff = -1;
    snprintf(a, sizeof a, "%s/single", tmp_root);
    snprintf(b, sizeof b, "%s/mpi_sync", tmp_root);
    search_cmd(cmd, sizeof cmd, "", "medsamix", DEMO "/tasks/mri_ring", a, TRIALS_A, "--batch 2");
    snprintf(log, sizeof log, "%s/single.log", tmp_root);
    rc = run(cmd, log, 300);
    MSX_CHECK(rc == 0, "single-process search exit %d (see %s)", rc, log);
    search_cmd(cmd, sizeof cmd, MPIRUN " -np 3", "medsamix-mpi", DEMO "/tasks/mri_ring", b, TRIALS_A, "--batch 2 --sync");
    snprintf(log, sizeof log, "%s/mpi_sync.log", tmp_root);
    rc = run(cmd, log, 300);
    MSX_CHECK(rc == 0, "mpirun -np 3 --sync exit %d (see %s)", rc, log);
    MSX_CHECK(file_has(log, "3 ranks, 3 worker slot(s)"), "the driver ran on 3 ranks (see %s)", log);
    snprintf(la, sizeof la, "%s/trials.jsonl", a);
    snprintf(lb, sizeof lb, "%s/trials.jsonl", b);
    na = msx_test_log_records(la, ra, 64);
    nb = msx_test_log_records(lb, rb, 64);
    MSX_CHECK(na == TRIALS_A && nb == TRIALS_A, "records %d / %d, expected %d", na, nb, TRIALS_A);
    for (t = 0; t < TRIALS_A && t < 64; t++)
        if (!ra[t] || !rb[t] || strcmp(ra[t], rb[t])) { diff = t; break; }
    MSX_CHECK(diff < 0, "trial %d differs:\n  single: %s\n  mpi:    %s", diff, diff >= 0 && ra[diff] ? ra[diff] : "-",
              diff >= 0 && rb[diff] ? rb[diff] : "-");
    /* the records carry per-image Dice (racing) and at least one stopped trial */
    MSX_CHECK(ra[0] && strstr(ra[0], "\"images\": {\"mri_ring\": {\"") != NULL, "per-image Dice in the records");
    MSX_CHECK(file_has(la, "\"stopped\": \"race\"") || file_has(la, "\"stopped\": \"safe\""), "a raced trial was stopped");
    MSX_CHECK(file_has(lb, "\"schedule\": \"sync\""), "the log records the schedule");
    snprintf(la, sizeof la, "%s/best_plan.json", a);
    snprintf(lb, sizeof lb, "%s/best_plan.json", b);
    MSX_CHECK(same_file(la, lb), "best_plan.json differs between %s and %s", la, lb);
    msx_test_free_records(ra, 64);
    msx_test_free_records(rb, 64);
}

/* The pid of rank `rank` among the children of mpirun `parent`. */
static pid_t find_rank(pid_t parent, int rank) {
    DIR *d = opendir("/proc");
    struct dirent *e;
    pid_t found = -1;
    char want[64];
    snprintf(want, sizeof want, "OMPI_COMM_WORLD_RANK=%d", rank);
    while (d && (e = readdir(d)) != NULL && found < 0) {
        char p[300], *s;
        pid_t pid = (pid_t)atoi(e->d_name), pp = -1;
        size_t k, n;
        char *env;
        if (pid <= 0) continue;
        snprintf(p, sizeof p, "/proc/%d/stat", (int)pid);
        if (!(s = slurp(p))) continue;
        {
            char *rp = strrchr(s, ')');
            if (rp) sscanf(rp + 2, "%*c %d", &pp);
        }
        free(s);
        if (pp != parent) continue;
        snprintf(p, sizeof p, "/proc/%d/environ", (int)pid);
        if (!(env = slurp_n(p, &n))) continue;
        for (k = 0; k < n; k += strlen(env + k) + 1)
            if (!strcmp(env + k, want)) found = pid;
        free(env);
    }
    if (d) closedir(d);
    return found;
}

#define TRIALS_K 40

static void test_kill_resume(void) {
    char cmd[2048], out[400], straight[400], logp[500], lsp[500], log[500];
    char *before[64], *after[64], *ref[64];
    int t, nb, na, nr, rc, status, kept = 1, same = 1, rank_killed = 0;
    pid_t pid, victim = -1;
    double t0;
    struct timespec nap = {0, 10000000};
    snprintf(out, sizeof out, "%s/mpi_killed", tmp_root);
    snprintf(logp, sizeof logp, "%s/trials.jsonl", out);
    search_cmd(cmd, sizeof cmd, "exec " MPIRUN " -np 3", "medsamix-mpi", DEMO "/tasks/mri_ring", out, TRIALS_K, "--batch 2 --sync");
    snprintf(log, sizeof log, "%s/mpi_killed.log", tmp_root);
    fflush(NULL);
    pid = fork();
    if (pid == 0) {
        if (!freopen(log, "w", stdout)) _exit(127);
        dup2(1, 2);
        /* exec so that the ranks are children of this pid */
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    MSX_CHECK(pid > 0, "fork");
    if (pid <= 0) return;
    /* `exec mpirun`: mpirun has this pid, the ranks are its children */
    t0 = msx_time_now();
    while (count_lines(logp) < 1 + 12 && msx_time_now() - t0 < 240 && waitpid(pid, &status, WNOHANG) == 0) nanosleep(&nap, NULL);
    victim = find_rank(pid, 2);
    if (victim > 0) { kill(victim, SIGKILL); rank_killed = 1; }
    t0 = msx_time_now();
    while (waitpid(pid, &status, WNOHANG) == 0) {
        if (msx_time_now() - t0 > 120) { kill(pid, SIGKILL); waitpid(pid, &status, 0); break; }
        nanosleep(&nap, NULL);
    }
    MSX_CHECK(rank_killed, "rank 2 of mpirun %d not found", (int)pid);
    MSX_CHECK(!(WIFEXITED(status) && WEXITSTATUS(status) == 0), "the job went on after a rank died");
    nb = msx_test_log_records(logp, before, 64);
    MSX_CHECK(nb >= 12 && nb < TRIALS_K, "trials logged before the kill: %d (of %d)", nb, TRIALS_K);
    printf("test_mpi: rank 2 killed with %d of %d trials logged\n", nb, TRIALS_K);
    /* the same command with --resume */
    strcat(cmd, " --resume");
    snprintf(log, sizeof log, "%s/mpi_resumed.log", tmp_root);
    rc = run(cmd, log, 300);
    MSX_CHECK(rc == 0, "resumed run exit %d (see %s)", rc, log);
    na = msx_test_log_records(logp, after, 64);
    MSX_CHECK(na == TRIALS_K, "resumed log holds %d trials, expected %d", na, TRIALS_K);
    for (t = 0; t < 64; t++)
        if (before[t] && (!after[t] || strcmp(before[t], after[t]))) kept = 0;
    MSX_CHECK(kept, "a trial finished before the kill changed or vanished on --resume");
    /* and the result is that of the uninterrupted single-process run */
    snprintf(straight, sizeof straight, "%s/single_k", tmp_root);
    search_cmd(cmd, sizeof cmd, "", "medsamix", DEMO "/tasks/mri_ring", straight, TRIALS_K, "--batch 2");
    rc = run(cmd, NULL, 300);
    MSX_CHECK(rc == 0, "straight run exit %d", rc);
    snprintf(lsp, sizeof lsp, "%s/trials.jsonl", straight);
    nr = msx_test_log_records(lsp, ref, 64);
    for (t = 0; t < TRIALS_K; t++)
        if (!ref[t] || !after[t] || strcmp(ref[t], after[t])) { same = 0; break; }
    MSX_CHECK(nr == TRIALS_K && same, "resumed MPI run differs from the uninterrupted run at trial %d", t);
    snprintf(logp, sizeof logp, "%s/best_plan.json", out);
    snprintf(lsp, sizeof lsp, "%s/best_plan.json", straight);
    MSX_CHECK(same_file(logp, lsp), "best_plan.json after kill + resume differs from the uninterrupted run");
    msx_test_free_records(before, 64);
    msx_test_free_records(after, 64);
    msx_test_free_records(ref, 64);
}

static void test_async(void) {
    char cmd[2048], out[400], logp[500], log[500];
    char *rec[64];
    int rc, n;
    snprintf(out, sizeof out, "%s/mpi_async", tmp_root);
    search_cmd(cmd, sizeof cmd, MPIRUN " -np 3", "medsamix-mpi", DEMO "/tasks/mri_ring", out, 24, "");
    snprintf(log, sizeof log, "%s/mpi_async.log", tmp_root);
    rc = run(cmd, log, 300);
    MSX_CHECK(rc == 0, "async run exit %d (see %s)", rc, log);
    snprintf(logp, sizeof logp, "%s/trials.jsonl", out);
    n = msx_test_log_records(logp, rec, 64);
    MSX_CHECK(n == 24 && rec[23] && strstr(rec[23], "\"batch\": 23, \"batch_size\": 1, \"slot\": 0"), "async log: %d trials", n);
    MSX_CHECK(file_has(logp, "\"schedule\": \"async\""), "the log records the async schedule");
    msx_test_free_records(rec, 64);
    /* resuming it in the other mode is refused with the reason */
    strcat(cmd, " --sync --resume");
    rc = run(cmd, log, 300);
    MSX_CHECK(rc == 1 && file_has(log, "asynchronous"), "sync resume of an async log: exit %d (see %s)", rc, log);
    /* a longer async search resumes from it */
    search_cmd(cmd, sizeof cmd, MPIRUN " -np 3", "medsamix-mpi", DEMO "/tasks/mri_ring", out, 30, "--resume");
    rc = run(cmd, log, 300);
    n = msx_test_log_records(logp, rec, 64);
    MSX_CHECK(rc == 0 && n == 30, "async resume to 30 trials: exit %d, %d trials (see %s)", rc, n, log);
    msx_test_free_records(rec, 64);
}

/* A copy of the mri_ring task (calib/test images and masks) under root/tasksN. */
static void copy_task(const char *dst_root) {
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s' && cp -r " DEMO "/tasks/mri_ring '%s/'", dst_root, dst_root);
    if (system(cmd) != 0) fprintf(stderr, "copy failed: %s\n", cmd);
}

/* mpirun -np 3 sh -c '<search>': the rank's shell expands
   $OMPI_COMM_WORLD_RANK in the task path. */
static void per_rank_cmd(char *cmd, size_t cap, const char *tasks, const char *out) {
    char inner[1500];
    search_cmd(inner, sizeof inner, "exec", "medsamix-mpi", tasks, out, 22, "");
    snprintf(cmd, cap, MPIRUN " -np 3 sh -c '%s'", inner);
}

static void test_startup_errors(void) {
    char cmd[4096], dir[300], log[500], p[1200], tasks[500];
    int rc;
    /* rank r reads the task folder tasksR/mri_ring: same contents for ranks 0
       and 1, rank 2's is missing or altered */
    snprintf(dir, sizeof dir, "%s/perrank", tmp_root);
    snprintf(p, sizeof p, "%s/tasks0", dir);
    copy_task(p);
    snprintf(p, sizeof p, "%s/tasks1", dir);
    copy_task(p);
    snprintf(tasks, sizeof tasks, "%s/tasks$OMPI_COMM_WORLD_RANK/mri_ring", dir);
    snprintf(p, sizeof p, "%s/out_missing", dir);
    per_rank_cmd(cmd, sizeof cmd, tasks, p);
    snprintf(log, sizeof log, "%s/missing.log", tmp_root);
    rc = run(cmd, log, 180);
    MSX_CHECK(rc > 0 && file_has(log, "rank 2 (") && file_has(log, "cannot load its data") && file_has(log, "tasks2/mri_ring"),
              "missing task folder on rank 2: exit %d (see %s)", rc, log);
    /* rank 2 sees a different mask */
    snprintf(p, sizeof p, "%s/tasks2", dir);
    copy_task(p);
    snprintf(p, sizeof p, "cp %s/tasks2/mri_ring/calib/masks/001.png %s/tasks2/mri_ring/calib/masks/000.png", dir, dir);
    MSX_CHECK(system(p) == 0, "%s", p);
    snprintf(p, sizeof p, "%s/out_differs", dir);
    per_rank_cmd(cmd, sizeof cmd, tasks, p);
    snprintf(log, sizeof log, "%s/differs.log", tmp_root);
    rc = run(cmd, log, 180);
    MSX_CHECK(rc > 0 && file_has(log, "rank 2 (") && file_has(log, "different model files or task folders"),
              "different task folder on rank 2: exit %d (see %s)", rc, log);
    snprintf(p, sizeof p, "%s/out_differs/trials.jsonl", dir);
    MSX_CHECK(access(p, F_OK) != 0, "no log is started when the ranks disagree");
    /* -np 1: a single process */
    snprintf(p, sizeof p, "%s/out_np1", dir);
    search_cmd(cmd, sizeof cmd, MPIRUN " -np 1", "medsamix-mpi", DEMO "/tasks/mri_ring", p, 21, "");
    snprintf(log, sizeof log, "%s/np1.log", tmp_root);
    rc = run(cmd, log, 180);
    MSX_CHECK(rc == 0 && file_has(log, "running as a single process"), "-np 1: exit %d (see %s)", rc, log);
}

int main(void) {
    double t0 = msx_time_now();
    const char *b = getenv("MSX_BUILD");
    char p[400];
    snprintf(build, sizeof build, "%s", b && *b ? b : "build");
    snprintf(p, sizeof p, "%s/medsamix-mpi", build);
    if (getenv("MSX_ASAN")) {
        printf("test_mpi: skipped under ASan (Open MPI's own allocations are reported as leaks)\n");
        return msx_test_summary("test_mpi");
    }
    if (system("command -v mpirun >/dev/null 2>&1") != 0 || access(p, X_OK) != 0) {
        printf("test_mpi: skipped: %s (install openmpi-bin libopenmpi-dev, then make mpi)\n",
               access(p, X_OK) != 0 ? "no build/medsamix-mpi" : "mpirun not found");
        return msx_test_summary("test_mpi");
    }
    snprintf(tmp_root, sizeof tmp_root, "/tmp/msx_test_mpi_XXXXXX");
    if (!mkdtemp(tmp_root)) { fprintf(stderr, "mkdtemp failed\n"); return 1; }
    test_sync_equals_single();
    test_kill_resume();
    test_async();
    test_startup_errors();
    printf("test_mpi: %.1f s\n", msx_time_now() - t0);
    if (msx_test_fail == 0) {
        char cmd[300];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_root);
        if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmp_root);
    } else fprintf(stderr, "temporary files kept in %s\n", tmp_root);
    return msx_test_summary("test_mpi");
}
