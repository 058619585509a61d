/* tests/test_cli.c - careless and hostile use of the medsamix tool (issue 14:
   never lose a user's data, never call a broken model a success). Drives the
   built tool (build/medsamix, found next to this program; MSX_TOOL
   overrides) with fork/exec on copies of the demo world in a temporary
   folder. Every case asserts the exit code, that no input file changed
   (content hash and mode before/after) and the key words of the message.
   One group per class of the issue: outputs vs inputs, permissions and
   links, the format follows the name, 16-bit images, the run-folder lock,
   lists append, an empty trial log, non-finite weights, logs and plans
   checked, benchmark options, messages. The optional torch check runs when
   `python3 -c 'import torch'` works and prints a skip line otherwise. */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "test.h"
#include "png16.h"

#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stb/stb_image.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define DEMO "examples/demo"
#define BASE DEMO "/models/base.pth"
#define CT DEMO "/models/spec_ct.pth"
#define MRI DEMO "/models/spec_mri.pth"

static char tool[1024], tmp[256];
static char *out_buf; /* stdout + stderr of the last run */
static size_t out_len;

/* ---- running the tool ---------------------------------------------------------- */

/* Runs the tool with the NULL-terminated arguments; returns its exit code
   (128 + signal when killed). Output collected in out_buf. */
static int run(const char *a0, ...) {
    const char *argv[64];
    int n = 0, fd[2], st;
    pid_t pid;
    va_list ap;
    argv[n++] = tool;
    argv[n++] = a0;
    va_start(ap, a0);
    while (n < 63 && (argv[n] = va_arg(ap, const char *)) != NULL) n++;
    va_end(ap);
    argv[n] = NULL;
    out_len = 0;
    if (pipe(fd) != 0) return -1;
    fflush(stdout);
    fflush(stderr);
    pid = fork();
    if (pid == 0) {
        dup2(fd[1], 1);
        dup2(fd[1], 2);
        close(fd[0]);
        close(fd[1]);
        execv(tool, (char *const *)(uintptr_t)argv);
        _exit(127);
    }
    close(fd[1]);
    for (;;) {
        char b[4096];
        ssize_t k = read(fd[0], b, sizeof b);
        if (k <= 0) break;
        out_buf = (char *)realloc(out_buf, out_len + (size_t)k + 1);
        memcpy(out_buf + out_len, b, (size_t)k);
        out_len += (size_t)k;
        out_buf[out_len] = 0;
    }
    close(fd[0]);
    if (!out_buf) { out_buf = (char *)malloc(1); out_buf[0] = 0; }
    if (waitpid(pid, &st, 0) < 0) return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* The output holds every NULL-terminated word (case-sensitive). */
static int says(const char *w0, ...) {
    va_list ap;
    const char *w = w0;
    int ok = 1;
    va_start(ap, w0);
    for (; w; w = va_arg(ap, const char *)) ok &= out_buf && strstr(out_buf, w) != NULL;
    va_end(ap);
    return ok;
}
static int count_of(const char *w) {
    int n = 0;
    const char *p = out_buf;
    while (p && (p = strstr(p, w)) != NULL) { n++; p += strlen(w); }
    return n;
}

#define EXPECT(rc_expr, want, ...)                                                                          \
    do {                                                                                                   \
        int rc_ = (rc_expr);                                                                               \
        MSX_CHECK(rc_ == (want) && says(__VA_ARGS__, (const char *)NULL), "exit %d (want %d), output:\n%s", \
                  rc_, want, out_buf ? out_buf : "");                                                      \
    } while (0)

/* ---- files ---------------------------------------------------------------------- */

static const char *P(const char *name) {
    static char b[16][512];
    static int k;
    char *s = b[k++ & 15];
    snprintf(s, sizeof b[0], "%s/%s", tmp, name);
    return s;
}

static int copy_file(const char *from, const char *to) {
    void *d;
    size_t n;
    FILE *f;
    if (msx_read_file(from, 0, &d, &n) != MSX_OK) return 0;
    f = fopen(to, "wb");
    if (f) { fwrite(d, 1, n, f); fclose(f); }
    msx_free(d);
    return f != NULL;
}

/* Content hash + mode of a file (0 when missing). */
typedef struct snap { uint64_t h; unsigned mode; int exists; } snap;
static snap snap_of(const char *path) {
    snap s;
    void *d;
    size_t n, i;
    struct stat st;
    memset(&s, 0, sizeof s);
    if (stat(path, &st) != 0 || msx_read_file(path, 0, &d, &n) != MSX_OK) return s;
    s.exists = 1;
    s.mode = (unsigned)(st.st_mode & 07777);
    s.h = 1469598103934665603ULL;
    for (i = 0; i < n; i++) s.h = (s.h ^ ((unsigned char *)d)[i]) * 1099511628211ULL;
    msx_free(d);
    return s;
}
static int same_snap(snap a, snap b) { return a.exists == b.exists && a.h == b.h && a.mode == b.mode; }

/* Snapshots of the inputs a case must leave alone. */
static const char *watched[32];
static snap before[32];
static int n_watched;
static void watch(const char *p0, ...) {
    va_list ap;
    const char *p = p0;
    n_watched = 0;
    va_start(ap, p0);
    for (; p && n_watched < 32; p = va_arg(ap, const char *)) {
        watched[n_watched] = p;
        before[n_watched] = snap_of(p);
        n_watched++;
    }
    va_end(ap);
}
#define UNCHANGED()                                                                     \
    do {                                                                                \
        int i_;                                                                         \
        for (i_ = 0; i_ < n_watched; i_++)                                              \
            MSX_CHECK(same_snap(before[i_], snap_of(watched[i_])), "input %s changed", watched[i_]); \
    } while (0)

/* A 12-bit-range copy of an 8-bit grey image: v16 = 16 * v8. */
static int to_png16(const char *from, const char *to) {
    int w, h, n, i;
    unsigned char *p = stbi_load(from, &w, &h, &n, 1);
    unsigned short *q;
    if (!p) return 0;
    q = (unsigned short *)malloc(sizeof *q * (size_t)w * h);
    for (i = 0; i < w * h; i++) q[i] = (unsigned short)(16 * p[i]);
    write_png16(to, w, h, q);
    free(q);
    stbi_image_free(p);
    return 1;
}

/* Dice between two mask PNGs written by the tool. */
static double dice_files(const char *a, const char *b) {
    msx_mask x, y;
    double d = -1;
    memset(&x, 0, sizeof x);
    memset(&y, 0, sizeof y);
    if (msx_mask_load(a, NULL, &x) == MSX_OK && msx_mask_load(b, NULL, &y) == MSX_OK) msx_dice(&x, &y, &d);
    msx_mask_free(&x);
    msx_mask_free(&y);
    return d;
}

/* A task folder of the first n calib + n test pairs of a demo task, the
   images converted to 16 bits (or copied as they are). */
static void make_task(const char *dst, const char *task, int n, int sixteen) {
    static const char *const sp[2] = {"calib", "test"};
    char a[600], b[600];
    int s, i;
    mkdir(dst, 0755);
    for (s = 0; s < 2; s++) {
        snprintf(a, sizeof a, "%s/%s", dst, sp[s]); mkdir(a, 0755);
        snprintf(a, sizeof a, "%s/%s/images", dst, sp[s]); mkdir(a, 0755);
        snprintf(a, sizeof a, "%s/%s/masks", dst, sp[s]); mkdir(a, 0755);
        for (i = 0; i < n; i++) {
            snprintf(a, sizeof a, DEMO "/tasks/%s/%s/images/%03d.png", task, sp[s], i);
            snprintf(b, sizeof b, "%s/%s/images/%03d.png", dst, sp[s], i);
            if (sixteen) to_png16(a, b);
            else copy_file(a, b);
            snprintf(a, sizeof a, DEMO "/tasks/%s/%s/masks/%03d.png", task, sp[s], i);
            snprintf(b, sizeof b, "%s/%s/masks/%03d.png", dst, sp[s], i);
            copy_file(a, b);
        }
    }
}

/* A copy of base.pth as safetensors with one change. */
static void make_broken(const char *dst, int nan, const char *drop) {
    msx_checkpoint *c = NULL;
    int i;
    if (msx_ckpt_load(BASE, &c) != MSX_OK) return;
    if (nan) ((float *)c->tensors[3].data)[5] = NAN;
    if (drop) {
        unsigned char *keep = (unsigned char *)malloc((size_t)c->n);
        for (i = 0; i < c->n; i++) keep[i] = strcmp(c->tensors[i].name, drop) != 0;
        msx_ckpt_filter(c, keep);
        free(keep);
    }
    msx_safetensors_save(dst, c, NULL, 0);
    msx_ckpt_free(c);
}

static void write_text(const char *path, const char *s) {
    FILE *f = fopen(path, "wb");
    if (f) { fputs(s, f); fclose(f); }
}

/* ---- the cases ------------------------------------------------------------------- */

static void case_overwrite(void) {
    const char *img = P("a.png"), *s = P("s.pth"), *lnk = P("link.pth"), *hard = P("hard.pth");
    copy_file(DEMO "/tasks/ct_organ/test/images/000.png", img);
    copy_file(CT, s);
    symlink("s.pth", lnk);
    if (link(s, hard) != 0) printf("test_cli: no hard link (%s)\n", hard);
    watch(img, s, BASE, MRI, (const char *)NULL);
    EXPECT(run("segment", "--model", BASE, "--image", img, "--box", "60,60,160,160", "--out", img, NULL), 2, "same file", img);
    EXPECT(run("segment", "--model", BASE, "--image", img, "--box", "60,60,160,160", "--out", P("x.png"), "--overlay",
               P("x.png"), NULL), 2, "same file");
    EXPECT(run("merge", "--base", BASE, "--models", s, MRI, "--method", "ta", "--scale", "0.5", "--out", s, NULL), 2,
           "same file", "input");
    EXPECT(run("merge", "--base", BASE, "--models", lnk, MRI, "--method", "ta", "--scale", "0.5", "--out", s, NULL), 2,
           "same file");
    EXPECT(run("merge", "--base", BASE, "--models", hard, MRI, "--method", "ta", "--scale", "0.5", "--out", s, NULL), 2,
           "same file");
    /* the plan beside the output is an output too */
    EXPECT(run("merge", "--base", BASE, "--models", CT, MRI, "--plan", P("m.plan.json"), "--out", P("m.safetensors"), NULL), 2,
           "same file");
    /* a model named like a run output, in the run folder */
    copy_file(CT, P("best.safetensors"));
    watch(img, s, BASE, MRI, P("best.safetensors"), (const char *)NULL);
    EXPECT(run("search", "--base", BASE, "--models", P("best.safetensors"), "--tasks", DEMO "/tasks/ct_organ", "--out", tmp,
               "--trials", "1", NULL), 1, "same file", "best.safetensors");
    MSX_CHECK(!snap_of(P("trials.jsonl")).exists, "the search did no work");
    UNCHANGED();
    MSX_CHECK(!snap_of(P("x.png")).exists, "nothing written on a refusal");
}

static void case_permissions(void) {
    const char *ro = P("ro.safetensors"), *keep = P("keep.safetensors"), *tgt = P("target.safetensors"), *ln = P("ln.safetensors");
    struct stat st;
    write_text(ro, "do not touch");
    chmod(ro, 0444);
    write_text(keep, "old");
    chmod(keep, 0640);
    write_text(tgt, "old");
    symlink("target.safetensors", ln);
    watch(ro, BASE, CT, MRI, (const char *)NULL);
    EXPECT(run("merge", "--base", BASE, "--models", CT, MRI, "--method", "ta", "--scale", "0.5", "--out", ro, NULL), 2,
           "read-only", "0444");
    UNCHANGED();
    EXPECT(run("merge", "--base", BASE, "--models", CT, MRI, "--method", "ta", "--scale", "0.5", "--out", keep, NULL), 0, "wrote");
    MSX_CHECK(stat(keep, &st) == 0 && (st.st_mode & 07777) == 0640, "mode kept: %o", (unsigned)(st.st_mode & 07777));
    EXPECT(run("merge", "--base", BASE, "--models", CT, MRI, "--method", "ta", "--scale", "0.5", "--out", ln, NULL), 0, "wrote");
    MSX_CHECK(lstat(ln, &st) == 0 && S_ISLNK(st.st_mode), "the link is kept");
    MSX_CHECK(snap_of(tgt).exists && snap_of(tgt).h == snap_of(keep).h, "written through the link");
    mkdir(P("adir.pth"), 0755);
    EXPECT(run("merge", "--base", BASE, "--models", CT, MRI, "--method", "ta", "--scale", "0.5", "--out", P("adir.pth"), NULL), 2,
           "is a directory");
}

static void case_format(void) {
    const char *pth = P("m.pth"), *st = P("m.safetensors");
    snap s;
    char *j1, *j2;
    watch(BASE, CT, MRI, (const char *)NULL);
    EXPECT(run("merge", "--base", BASE, "--models", CT, MRI, "--method", "ties", "--drop-rate", "0.3", "--scale", "0.8",
               "--out", pth, NULL), 0, "wrote");
    EXPECT(run("merge", "--base", BASE, "--models", CT, MRI, "--method", "ties", "--drop-rate", "0.3", "--scale", "0.8",
               "--out", st, NULL), 0, "wrote");
    {
        void *d;
        size_t n;
        MSX_CHECK(msx_read_file(pth, 0, &d, &n) == MSX_OK && n > 4 && !memcmp(d, "PK\x03\x04", 4), ".pth is a zip");
        if (d) msx_free(d);
    }
    /* our reader sees the same tensors in both files */
    EXPECT(run("inspect", pth, "--json", NULL), 0, "\"tensors\"");
    j1 = strdup(out_buf);
    EXPECT(run("inspect", st, "--json", NULL), 0, "\"tensors\"");
    j2 = out_buf;
    MSX_CHECK(!strcmp(j1, j2), ".pth and .safetensors hold the same tensors");
    free(j1);
    /* torch itself, when installed */
    {
        const char *py = "import sys, json, struct, torch\n"
                         "sd = torch.load(sys.argv[1], weights_only=True)\n"
                         "ref = torch.load(sys.argv[3], weights_only=True)\n"
                         "f = open(sys.argv[2], 'rb'); n = struct.unpack('<Q', f.read(8))[0]\n"
                         "h = json.loads(f.read(n)); data = f.read()\n"
                         "keys = [k for k in h if k != '__metadata__']\n"
                         "assert list(sd.keys()) == keys == list(ref.keys())\n"
                         "for k in keys:\n"
                         "    b, e = h[k]['data_offsets']\n"
                         "    t = torch.frombuffer(bytearray(data[b:e]), dtype=torch.float32).reshape(h[k]['shape'])\n"
                         "    assert torch.equal(sd[k], t) and sd[k].shape == ref[k].shape, k\n"
                         "print('torch-ok', len(keys))\n";
        char cmd[2048];
        int rc = -1;
        const char *const pys[2] = {"python3", "/usr/bin/python3"};
        int k;
        write_text(P("check.py"), py);
        for (k = 0; k < 2 && rc != 0; k++) {
            snprintf(cmd, sizeof cmd, "%s -c 'import torch' >/dev/null 2>&1", pys[k]);
            if (system(cmd) != 0) continue;
            snprintf(cmd, sizeof cmd, "%s %s %s %s %s > %s 2>&1", pys[k], P("check.py"), pth, st, BASE, P("check.out"));
            rc = system(cmd);
            MSX_CHECK(rc == 0, "torch.load(weights_only=True) of the merged .pth (see %s)", P("check.out"));
        }
        if (rc == -1) printf("test_cli: skip: torch not installed (python3 -c 'import torch' failed); .pth checked by our reader only\n");
        else if (rc == 0) printf("test_cli: torch.load(weights_only=True) reads the merged .pth: same keys and tensors as the .safetensors\n");
    }
    s = snap_of(P("m.bin"));
    EXPECT(run("merge", "--base", BASE, "--models", CT, MRI, "--method", "ta", "--scale", "0.5", "--out", P("m.bin"), NULL), 2,
           "m.bin", ".safetensors or .pth");
    MSX_CHECK(!s.exists && !snap_of(P("m.bin")).exists, "nothing written");
    EXPECT(run("segment", "--model", BASE, "--image", DEMO "/tasks/ct_organ/test/images/000.png", "--box", "60,60,160,160",
               "--out", P("m.jpg"), NULL), 2, "m.jpg", "PNG");
    MSX_CHECK(!snap_of(P("m.jpg")).exists, "no jpg written");
    UNCHANGED();
}

static void case_16bit(void) {
    const char *img8 = DEMO "/tasks/ct_organ/test/images/000.png", *img16 = P("ct16.png");
    double d_mm, d_hb;
    char box[64];
    float b[4];
    msx_task *t = NULL;
    msx_task_options to;
    memset(&to, 0, sizeof to);
    /* the demo's tight box of test image 0 */
    if (msx_task_open(DEMO "/tasks/ct_organ", &to, &t) == MSX_OK) {
        msx_task_box(t, 1, 0, b);
        msx_task_free(t);
    } else b[0] = b[1] = 60, b[2] = b[3] = 160;
    snprintf(box, sizeof box, "%g,%g,%g,%g", (double)b[0], (double)b[1], (double)b[2], (double)b[3]);
    MSX_CHECK(to_png16(img8, img16), "16-bit copy");
    watch(img16, CT, (const char *)NULL);
    EXPECT(run("segment", "--model", CT, "--image", img8, "--box", box, "--out", P("m8.png"), NULL), 0, "foreground");
    EXPECT(run("segment", "--model", CT, "--image", img16, "--box", box, "--out", P("m16.png"), NULL), 0, "16-bit",
           "--intensity minmax");
    EXPECT(run("segment", "--model", CT, "--image", img16, "--box", box, "--out", P("mhb.png"), "--intensity", "high-byte", NULL),
           0, "high-byte");
    d_mm = dice_files(P("m8.png"), P("m16.png"));
    d_hb = dice_files(P("m8.png"), P("mhb.png"));
    printf("test_cli: 16-bit slice vs its 8-bit original: mask Dice %.4f (minmax), %.4f (high-byte)\n", d_mm, d_hb);
    MSX_CHECK(d_mm > 0.97, "minmax keeps the information: Dice %.4f against the 8-bit mask", d_mm);
    MSX_CHECK(d_mm > d_hb, "high byte loses detail: %.4f vs %.4f", d_hb, d_mm);
    EXPECT(run("segment", "--model", CT, "--image", img16, "--box", box, "--out", P("mx.png"), "--intensity", "window:40", NULL),
           2, "window:40");
    /* a task of 16-bit images evaluates like its 8-bit original */
    make_task(P("t8"), "ct_organ", 3, 0);
    make_task(P("t16"), "ct_organ", 3, 1);
    {
        double d8 = -1, d16 = -1, dhb = -1;
        char *p;
        EXPECT(run("eval", "--model", CT, "--tasks", P("t8"), "--json", NULL), 0, "\"mean\"");
        if ((p = strstr(out_buf, "\"mean\": "))) d8 = atof(p + 8);
        EXPECT(run("eval", "--model", CT, "--tasks", P("t16"), NULL), 0, "16-bit", "--intensity minmax");
        EXPECT(run("eval", "--model", CT, "--tasks", P("t16"), "--json", NULL), 0, "\"mean\"");
        if ((p = strstr(out_buf, "\"mean\": "))) d16 = atof(p + 8);
        EXPECT(run("eval", "--model", CT, "--tasks", P("t16"), "--json", "--intensity", "high-byte", NULL), 0, "\"mean\"");
        if ((p = strstr(out_buf, "\"mean\": "))) dhb = atof(p + 8);
        printf("test_cli: 3 ct_organ test images, Dice 8-bit %.4f, 16-bit minmax %.4f, 16-bit high-byte %.4f\n", d8, d16, dhb);
        MSX_CHECK(fabs(d8 - d16) < 0.01 && d16 > dhb, "16-bit task: %.4f vs 8-bit %.4f (high-byte %.4f)", d16, d8, dhb);
    }
    UNCHANGED();
}

static void case_lock(void) {
    const char *run_dir = P("run_lock");
    char lock[600], pidtxt[32];
    pid_t holder;
    int fd, st, ready[2];
    mkdir(run_dir, 0755);
    snprintf(lock, sizeof lock, "%s/.lock", run_dir);
    if (pipe(ready) != 0) ready[0] = ready[1] = -1;
    holder = fork();
    if (holder == 0) { /* a search that holds the folder */
        struct flock fl;
        char b[32];
        fd = open(lock, O_RDWR | O_CREAT, 0644);
        memset(&fl, 0, sizeof fl);
        fl.l_type = F_WRLCK;
        if (fd < 0 || fcntl(fd, F_SETLK, &fl) != 0) _exit(1);
        snprintf(b, sizeof b, "%ld\n", (long)getpid());
        if (write(fd, b, strlen(b)) < 0 || write(ready[1], "x", 1) != 1) _exit(1);
        pause();
        _exit(0);
    }
    { /* wait until it holds the lock */
        char c;
        close(ready[1]);
        MSX_CHECK(read(ready[0], &c, 1) == 1, "the lock holder started");
        close(ready[0]);
    }
    snprintf(pidtxt, sizeof pidtxt, "pid %ld", (long)holder);
    watch(BASE, CT, (const char *)NULL);
    EXPECT(run("search", "--base", BASE, "--models", CT, "--tasks", DEMO "/tasks/ct_organ", "--trials", "2", "--max-images", "2",
               "--out", run_dir, "--no-report", "--plain", "--threads", "1", NULL),
           1, "in use by another search", pidtxt);
    MSX_CHECK(!snap_of(P("run_lock/trials.jsonl")).exists, "the second search wrote nothing");
    kill(holder, SIGKILL);
    waitpid(holder, &st, 0);
    /* the killed holder left its PID: a stale lock, taken over */
    EXPECT(run("search", "--base", BASE, "--models", CT, "--tasks", DEMO "/tasks/ct_organ", "--trials", "2", "--max-images", "2",
               "--out", run_dir, "--no-report", "--plain", "--threads", "1", NULL),
           0, "stale lock", "best: trial");
    UNCHANGED();
}

static void case_lists(void) {
    const char *r = P("run_lists");
    watch(BASE, CT, MRI, (const char *)NULL);
    EXPECT(run("search", "--base", BASE, "--models", CT, "--models", MRI, "--tasks", DEMO "/tasks/ct_organ", "--tasks",
               DEMO "/tasks/mri_ring", "--multi", "--trials", "2", "--max-images", "2", "--out", r, "--no-report", "--plain",
               "--threads", "1", NULL),
           0, "multi-task");
    {
        void *d = NULL;
        size_t n;
        msx_read_file(P("run_lists/trials.jsonl"), 0, &d, &n);
        MSX_CHECK(d && strstr((char *)d, "\"spec_ct\"") && strstr((char *)d, "\"spec_mri\"") && strstr((char *)d, "\"ct_organ\"") &&
                      strstr((char *)d, "\"mri_ring\""),
                  "both --models and both --tasks reached the search");
        msx_free(d);
    }
    EXPECT(run("search", "--base", BASE, "--models", CT, "--tasks", DEMO "/tasks/ct_organ", DEMO "/tasks/mri_ring", "--out",
               P("run_nomulti"), NULL), 2, "--multi");
    EXPECT(run("eval", "--model", CT, "--tasks", DEMO "/tasks/ct_organ", "--tasks", DEMO "/tasks/mri_ring", "--max-images", "1",
               NULL), 0, "ct_organ", "mri_ring");
    UNCHANGED();
}

static void case_empty_log(void) {
    const char *r = P("run_empty");
    mkdir(r, 0755);
    write_text(P("run_empty/trials.jsonl"), "");
    EXPECT(run("search", "--base", BASE, "--models", CT, "--tasks", DEMO "/tasks/ct_organ", "--trials", "1", "--max-images", "1",
               "--fidelity", "full", "--out", r, "--no-report", "--plain", "--threads", "1", NULL), 0, "no complete header", "afresh");
    mkdir(P("run_empty2"), 0755);
    write_text(P("run_empty2/trials.jsonl"), "{\"format\": \"medsamix-tri");
    EXPECT(run("search", "--base", BASE, "--models", CT, "--tasks", DEMO "/tasks/ct_organ", "--trials", "1", "--max-images", "1",
               "--fidelity", "full", "--out", P("run_empty2"), "--resume", "--no-report", "--plain", "--threads", "1", NULL), 0, "afresh");
}

static void case_nonfinite(void) {
    const char *nan = P("nan.safetensors"), *task = DEMO "/tasks/ct_organ";
    make_broken(nan, 1, NULL);
    watch(nan, BASE, CT, MRI, (const char *)NULL);
    EXPECT(run("inspect", nan, NULL), 0, "NON-FINITE", "non-finite: 1 NaN");
    EXPECT(run("segment", "--model", nan, "--image", DEMO "/tasks/ct_organ/test/images/000.png", "--box", "60,60,160,160", "--out",
               P("n.png"), NULL), 1, "NaN", "refused");
    EXPECT(run("merge", "--base", nan, "--models", CT, MRI, "--method", "ta", "--scale", "0.5", "--out", P("n.safetensors"), NULL),
           1, "NaN");
    EXPECT(run("merge", "--base", BASE, "--models", nan, MRI, "--method", "ta", "--scale", "0.5", "--out", P("n.safetensors"), NULL),
           1, "NaN");
    EXPECT(run("eval", "--model", nan, "--tasks", task, "--max-images", "1", NULL), 1, "NaN");
    EXPECT(run("search", "--base", BASE, "--models", nan, "--tasks", task, "--trials", "1", "--out", P("run_nan"), NULL), 1, "NaN");
    /* a merge that produces them: the group and the hyperparameters named, nothing written */
    EXPECT(run("merge", "--base", BASE, "--models", CT, MRI, "--method", "ta", "--scale", "1e39", "--out", P("inf.safetensors"), NULL),
           1, "NaN/infinite", "group", "task_arithmetic", "scale 1e+39");
    MSX_CHECK(!snap_of(P("n.png")).exists && !snap_of(P("n.safetensors")).exists && !snap_of(P("inf.safetensors")).exists,
              "no output written");
    UNCHANGED();
}

/* Replaces the first occurrence of `from` in a file by `to`. */
static int edit_file(const char *path, const char *from, const char *to) {
    void *d;
    size_t n;
    char *p, *q;
    FILE *f;
    if (msx_read_file(path, 0, &d, &n) != MSX_OK) return 0;
    p = strstr((char *)d, from);
    if (!p) { msx_free(d); return 0; }
    f = fopen(path, "wb");
    fwrite(d, 1, (size_t)(p - (char *)d), f);
    fputs(to, f);
    q = p + strlen(from);
    fwrite(q, 1, n - (size_t)(q - (char *)d), f);
    fclose(f);
    msx_free(d);
    return 1;
}

static void case_logs_plans(void) {
    const char *r = P("run_log"), *log = P("run_log/trials.jsonl"), *plan = P("run_log/best_plan.json");
    char saved[4096];
    snap s;
    EXPECT(run("search", "--base", BASE, "--models", CT, MRI, "--tasks", DEMO "/tasks/ct_organ", "--trials", "2", "--max-images",
               "2", "--out", r, "--no-report", "--plain", "--threads", "1", NULL), 0, "trial 2/2", "best: trial");
    MSX_CHECK(count_of("#0 ") + count_of("#1 ") >= 2, "progress lines");
    /* one numbering: "best: trial N of 2" with N as in "trial N/2" */
    MSX_CHECK(says("best: trial 1 of 2", NULL) || says("best: trial 2 of 2", NULL), "1-based best trial:\n%s", out_buf);
    copy_file(log, P("log.bak"));
    snprintf(saved, sizeof saved, "%s", P("log.bak"));
    /* a logged Dice of 7.5 */
    MSX_CHECK(edit_file(log, "\"dice\": {\"ct_organ\": 0.", "\"dice\": {\"ct_organ\": 7."), "edit the log");
    s = snap_of(log);
    watch(log, (const char *)NULL);
    EXPECT(run("search", "--base", BASE, "--models", CT, MRI, "--tasks", DEMO "/tasks/ct_organ", "--trials", "3", "--max-images",
               "2", "--out", r, "--resume", "--no-report", "--plain", "--threads", "1", NULL), 1, "line 2", "outside [0, 1]");
    UNCHANGED();
    (void)s;
    /* a configuration outside the space */
    copy_file(saved, log);
    MSX_CHECK(edit_file(log, "\"model_base_layer_0_method_linear_param_weights\": 1",
                        "\"model_base_layer_0_method_linear_param_weights\": 7"), "edit a weight");
    EXPECT(run("search", "--base", BASE, "--models", CT, MRI, "--tasks", DEMO "/tasks/ct_organ", "--trials", "3", "--max-images",
               "2", "--out", r, "--resume", "--no-report", "--plain", "--threads", "1", NULL), 1, "outside the search space", "line");
    /* a changed option is named */
    copy_file(saved, log);
    EXPECT(run("search", "--base", BASE, "--models", CT, MRI, "--tasks", DEMO "/tasks/ct_organ", "--trials", "3", "--max-images",
               "2", "--out", r, "--resume", "--box-margin", "4", "--no-report", "--plain", "--threads", "1", NULL), 1,
           "--box-margin");
    /* the plan knows its models */
    watch(plan, BASE, CT, MRI, (const char *)NULL);
    EXPECT(run("merge", "--base", BASE, "--models", MRI, CT, "--plan", plan, "--out", P("swapped.safetensors"), NULL), 1,
           "fingerprint", "--force");
    MSX_CHECK(!snap_of(P("swapped.safetensors")).exists, "nothing written");
    EXPECT(run("merge", "--base", BASE, "--models", MRI, CT, "--plan", plan, "--out", P("swapped.safetensors"), "--force", NULL), 0,
           "wrote");
    EXPECT(run("merge", "--base", BASE, "--models", CT, MRI, "--plan", plan, "--out", P("right.pth"), NULL), 0, "wrote");
    UNCHANGED();
}

static void case_bench(void) {
    EXPECT(run("bench", "--threads", "abc", NULL), 2, "'abc'");
    EXPECT(run("bench", "--runs", "0", NULL), 2, "--runs");
    EXPECT(run("bench-merge", "--reps", "x", NULL), 2, "'x'");
    EXPECT(run("bench-opt", "--only", "rosenbrock", NULL), 2, "rosenbrock", "branin");
    EXPECT(run("bench-opt", "--seeds", "many", NULL), 2, "'many'");
}

static void case_messages(void) {
    const char *plan = P("plan_bad.json"), *miss = P("missing.safetensors");
    char *p;
    /* a plan with "t": [0, -0.5, 0.2]: the path once, the value, the reason whole */
    EXPECT(run("merge", "--base", BASE, "--models", CT, MRI, "--method", "slerp", "--t", "0,0.5,0.2", "--out", P("pl.safetensors"),
               NULL), 0, "wrote");
    copy_file(P("pl.plan.json"), plan);
    MSX_CHECK(edit_file(plan, "\"t\": [0, 0.5, 0.2]", "\"t\": [0, -0.5, 0.2]"), "edit the plan");
    EXPECT(run("merge", "--base", BASE, "--models", CT, MRI, "--plan", plan, "--out", P("pl2.safetensors"), NULL), 1, "-0.5",
           "out of range");
    MSX_CHECK(count_of(plan) == 1, "the plan's path once:\n%s", out_buf);
    /* a directory given as a file */
    EXPECT(run("merge", "--base", DEMO "/models", "--models", CT, "--method", "ta", "--scale", "0.5", "--out", P("d.safetensors"),
               NULL), 1, "is a directory");
    EXPECT(run("inspect", DEMO "/models", NULL), 1, "is a directory");
    /* an output folder that is not there is found before the work, not after it */
    EXPECT(run("merge", "--base", BASE, "--models", CT, MRI, "--method", "ta", "--scale", "0.5", "--out", P("nodir/m.pth"), NULL),
           2, "nodir", "does not exist");
    /* a checkpoint missing one tensor names it */
    make_broken(miss, 0, "image_encoder.blocks.1.norm1.weight");
    EXPECT(run("segment", "--model", miss, "--image", DEMO "/tasks/ct_organ/test/images/000.png", "--box", "60,60,160,160", "--out",
               P("mm.png"), NULL), 1, "1 missing", "image_encoder.blocks.1.norm1.weight", "0 unexpected");
    /* bad values are named */
    EXPECT(run("merge", "--base", BASE, "--models", CT, MRI, "--method", "ta", "--scale", "nan", "--out", P("x.safetensors"), NULL),
           2, "'nan'", "not a number");
    EXPECT(run("search", "--base", BASE, "--models", CT, "--tasks", DEMO "/tasks/ct_organ", "--trials", "abc", NULL), 2, "'abc'");
    EXPECT(run("search", "--base", BASE, "--models", CT, "--tasks", DEMO "/tasks/ct_organ", "--mo", "best", NULL), 2, "'best'");
    EXPECT(run("eval", "--model", CT, "--tasks", DEMO "/tasks/ct_organ", "--split", "train", NULL), 2, "'train'");
    /* weights summing to infinity */
    EXPECT(run("merge", "--base", BASE, "--models", CT, MRI, "--method", "linear", "--weights", "1e308,1e308,1", "--out",
               P("w.safetensors"), NULL), 1, "infinity");
    /* an unreadable image: its path once, the reason whole */
    make_task(P("tbad"), "ct_organ", 2, 0);
    write_text(P("tbad/calib/images/001.png"), "not a png");
    EXPECT(run("eval", "--model", CT, "--tasks", P("tbad"), NULL), 1, "001.png", "cannot decode");
    p = strstr(out_buf, "001.png");
    MSX_CHECK(p && !strstr(p + 1, "001.png"), "the image's path once:\n%s", out_buf);
}

int main(int argc, char **argv) {
    const char *env = getenv("MSX_TOOL");
    char *slash;
    struct stat st;
    (void)argc;
    if (env) snprintf(tool, sizeof tool, "%s", env);
    else {
        snprintf(tool, sizeof tool, "%s", argv[0]);
        slash = strrchr(tool, '/');
        if (slash) snprintf(slash, sizeof tool - (size_t)(slash - tool), "/../medsamix");
        else snprintf(tool, sizeof tool, "../medsamix");
    }
    if (stat(tool, &st) != 0) {
        printf("test_cli: %s not found (build it first)\ntest_cli: 0 passed, 1 failed\n", tool);
        return 1;
    }
    snprintf(tmp, sizeof tmp, "/tmp/msx_test_cli_XXXXXX");
    if (!mkdtemp(tmp)) { printf("test_cli: cannot create a temporary folder\ntest_cli: 0 passed, 1 failed\n"); return 1; }
    case_overwrite();
    case_permissions();
    case_format();
    case_16bit();
    case_lock();
    case_lists();
    case_empty_log();
    case_nonfinite();
    case_logs_plans();
    case_bench();
    case_messages();
    if (!msx_test_fail) {
        char cmd[700];
        snprintf(cmd, sizeof cmd, "chmod -R u+w %s && rm -rf %s", tmp, tmp);
        if (system(cmd) != 0) printf("test_cli: could not remove %s\n", tmp);
    } else
        printf("test_cli: files kept in %s\n", tmp);
    free(out_buf);
    return msx_test_summary("test_cli");
}
