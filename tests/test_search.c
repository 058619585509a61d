/* tests/test_search.c - MedSAMix end to end on the demo world (examples/demo):
   task validation and bad inputs, Dice of the input models against the
   demo's reference table (baseline_dice.json, computed by PyTorch), a short
   multi-task search with all outputs checked, and SIGKILL + --resume
   reproducing an uninterrupted run exactly. */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "test.h"

#include <signal.h>
#include <stb/stb_image.h>
#include <stb/stb_image_write.h>
#include <sys/wait.h>

#define DEMO "examples/demo"
static const char *const models2[2] = {DEMO "/models/spec_ct.pth", DEMO "/models/spec_mri.pth"};

static char tmp_root[200];

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (f) { fwrite(p, 1, n, f); fclose(f); }
}
static void copy_file(const char *from, const char *to) {
    void *d;
    size_t n;
    if (msx_read_file(from, 0, &d, &n) == MSX_OK) { write_bytes(to, d, n); msx_free(d); }
}
static void mk(const char *fmt, const char *a) {
    char p[512];
    snprintf(p, sizeof p, fmt, tmp_root, a);
    mkdir(p, 0755);
}
/* A flat task folder with images/ and masks/ holding copies of demo images. */
static void make_flat_task(const char *name, int n) {
    char p[512], q[512];
    int i;
    mk("%s/%s", name);
    snprintf(p, sizeof p, "%s/images", name); mk("%s/%s", p);
    snprintf(p, sizeof p, "%s/masks", name); mk("%s/%s", p);
    for (i = 0; i < n; i++) {
        snprintf(p, sizeof p, DEMO "/tasks/ct_organ/calib/images/%03d.png", i);
        snprintf(q, sizeof q, "%s/%s/images/%03d.png", tmp_root, name, i);
        copy_file(p, q);
        snprintf(p, sizeof p, DEMO "/tasks/ct_organ/calib/masks/%03d.png", i);
        snprintf(q, sizeof q, "%s/%s/masks/%03d.png", tmp_root, name, i);
        copy_file(p, q);
    }
}

static int expect_error(msx_result r, const char *needle) {
    return r != MSX_OK && strstr(msx_last_error(), needle) != NULL;
}

static void test_tasks(void) {
    msx_task *t = NULL;
    char p[512], q[512];
    int w, h, c, x, y, b[4] = {1 << 30, 1 << 30, -1, -1};
    unsigned char *m;
    float box[4];
    msx_task_options to;
    MSX_CHECK_OK(msx_task_open(DEMO "/tasks/ct_organ", NULL, &t));
    if (!t) return;
    MSX_CHECK(!strcmp(msx_task_name(t), "ct_organ"), "name %s", msx_task_name(t));
    MSX_CHECK(msx_task_count(t, 0) == 16 && msx_task_count(t, 1) == 48, "%d %d", msx_task_count(t, 0), msx_task_count(t, 1));
    /* the prompt box is the tight box of mask > 0, checked by brute force */
    m = stbi_load(DEMO "/tasks/ct_organ/test/masks/005.png", &w, &h, &c, 1);
    MSX_CHECK(m != NULL, "stb");
    for (y = 0; m && y < h; y++)
        for (x = 0; x < w; x++)
            if (m[y * w + x]) {
                if (x < b[0]) b[0] = x;
                if (y < b[1]) b[1] = y;
                if (x > b[2]) b[2] = x;
                if (y > b[3]) b[3] = y;
            }
    stbi_image_free(m);
    msx_task_box(t, 1, 5, box);
    MSX_CHECK(box[0] == b[0] && box[1] == b[1] && box[2] == b[2] && box[3] == b[3], "box %g %g %g %g vs %d %d %d %d",
              box[0], box[1], box[2], box[3], b[0], b[1], b[2], b[3]);
    msx_task_free(t);

    /* flat folder: reference split = first int(0.2 N) sorted names */
    make_flat_task("flat", 10);
    snprintf(p, sizeof p, "%s/flat", tmp_root);
    MSX_CHECK_OK(msx_task_open(p, NULL, &t));
    if (t) {
        MSX_CHECK(msx_task_count(t, 0) == 2 && msx_task_count(t, 1) == 8, "split %d/%d", msx_task_count(t, 0), msx_task_count(t, 1));
        MSX_CHECK(strstr(msx_task_image(t, 0, 1), "001.png") && strstr(msx_task_image(t, 1, 0), "002.png"), "order");
        msx_task_free(t);
    }
    memset(&to, 0, sizeof to);
    to.split = MSX_SPLIT_RANDOM;
    to.calib_fraction = 0.5;
    to.split_seed = 7;
    MSX_CHECK_OK(msx_task_open(p, &to, &t));
    if (t) { MSX_CHECK(msx_task_count(t, 0) == 5, "random split %d", msx_task_count(t, 0)); msx_task_free(t); }

    /* unmatched names: both strays are listed */
    make_flat_task("unmatched", 4);
    snprintf(p, sizeof p, "%s/unmatched/masks/001.png", tmp_root);
    snprintf(q, sizeof q, "%s/unmatched/masks/009.png", tmp_root);
    rename(p, q);
    snprintf(p, sizeof p, "%s/unmatched", tmp_root);
    MSX_CHECK(expect_error(msx_task_open(p, NULL, &t), "images/001.png (no mask)") && strstr(msx_last_error(), "masks/009.png (no image)"),
              "unmatched: %s", msx_last_error());
    /* empty mask */
    make_flat_task("empty", 6);
    {
        unsigned char zero[16 * 16];
        memset(zero, 0, sizeof zero);
        snprintf(q, sizeof q, "%s/empty/masks/002.png", tmp_root);
        stbi_write_png(q, 16, 16, 1, zero, 16);
        snprintf(q, sizeof q, "%s/empty/images/002.png", tmp_root);
        stbi_write_png(q, 16, 16, 1, zero, 16);
    }
    snprintf(p, sizeof p, "%s/empty", tmp_root);
    MSX_CHECK(expect_error(msx_task_open(p, NULL, &t), "empty/masks/002.png: empty mask"), "empty: %s", msx_last_error());
    /* unreadable image */
    make_flat_task("broken", 6);
    snprintf(q, sizeof q, "%s/broken/images/003.png", tmp_root);
    write_bytes(q, "this is not a png", 17);
    snprintf(p, sizeof p, "%s/broken", tmp_root);
    MSX_CHECK(expect_error(msx_task_open(p, NULL, &t), "broken/images/003.png"), "broken: %s", msx_last_error());
}

/* Input models' Dice = the demo's PyTorch reference (per-task calib means). */
static void test_baseline(void) {
    static const char *const stems[3] = {"base", "spec_ct", "spec_mri"};
    static const char *const tnames[2] = {"mri_ring", "us_cyst"};
    msx_task *tasks[2] = {NULL, NULL};
    void *txt;
    size_t len;
    msx__json *ref = NULL;
    int i, k;
    MSX_CHECK_OK(msx_read_file(DEMO "/baseline_dice.json", 0, &txt, &len));
    ref = msx__json_parse((const char *)txt, len, "baseline_dice.json");
    msx_free(txt);
    MSX_CHECK(ref != NULL, "baseline json");
    for (k = 0; k < 2; k++) {
        char p[256];
        snprintf(p, sizeof p, DEMO "/tasks/%s", tnames[k]);
        MSX_CHECK_OK(msx_task_open(p, NULL, &tasks[k]));
    }
    for (i = 0; ref && tasks[0] && tasks[1] && i < 3; i++) {
        char p[256];
        msx_checkpoint *ck = NULL;
        msx_sam_arch a;
        double d[2];
        snprintf(p, sizeof p, DEMO "/models/%s.pth", stems[i]);
        MSX_CHECK_OK(msx_sam_load(p, NULL, &ck, &a));
        if (!ck) continue;
        MSX_CHECK_OK(msx_eval_checkpoint(ck, &a, tasks, 2, MSX_SPLIT_CALIB, MSX_PREPROCESS_SAM, 0, d));
        for (k = 0; k < 2; k++) {
            const msx__json *e = msx__json_get(msx__json_get(msx__json_get(msx__json_get(ref, stems[i]), tnames[k]), "calib"), "mean");
            MSX_CHECK(e && fabs(d[k] - e->num) <= 0.002, "%s on %s: %.4f vs reference %.4f", stems[i], tnames[k], d[k], e ? e->num : -1);
        }
        msx_ckpt_free(ck);
    }
    msx_task_free(tasks[0]);
    msx_task_free(tasks[1]);
    msx__json_free(ref);
}

static void base_options(msx_search_options *o, const char **tasks, int n_tasks, const char *out, int trials) {
    memset(o, 0, sizeof *o);
    o->base = DEMO "/models/base.pth";
    o->models = models2;
    o->n_models = 2;
    o->tasks = tasks;
    o->n_tasks = n_tasks;
    o->out_dir = out;
    o->n_trials = trials;
    o->jobs = 2;
    o->threads = 2;
    o->seed = 3;
    o->progress = -1;
    o->task.max_images = 6; /* keep CI short */
}

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

static void test_search_outputs(void) {
    const char *tasks[2] = {DEMO "/tasks/mri_ring", DEMO "/tasks/us_cyst"};
    char out[300], p[512];
    msx_search_options o;
    msx_search_summary s;
    msx__json *rep, *bp, *pf;
    msx_plan *plan = NULL;
    msx_checkpoint *best = NULL, *base = NULL, *ft[2] = {NULL, NULL}, *merged = NULL;
    msx_merger *mg = NULL;
    int i, k, l;
    snprintf(out, sizeof out, "%s/multi", tmp_root);
    base_options(&o, tasks, 2, out, msx_search_n_initial(2) + 4);
    o.multi = 1;
    o.n_overlays = 1;
    o.fidelity = MSX_FIDELITY_FULL; /* every trial on every image: the guarantees below */
    MSX_CHECK_OK(msx_search_run(&o, &s));
    MSX_CHECK(s.n_trials_done == msx_search_n_initial(2) + 4 && s.best_trial >= 0, "trials %d best %d", s.n_trials_done, s.best_trial);
    /* full evaluation: 12 calib images per trial; the report costs only the
       test split (8 models x 2 tasks x 6 images) and the 2 overlays (one per
       task), each drawn for the result and the best input model, no calib pass */
    MSX_CHECK(s.passes_search == (long long)s.n_trials_done * 12 && s.passes_full == s.passes_search && s.n_full == s.n_trials_done,
              "search passes %lld full %lld n_full %d", s.passes_search, s.passes_full, s.n_full);
    MSX_CHECK(s.passes_report == 8 * 2 * 6 + 2 * 2, "report passes %lld, expected %d", s.passes_report, 8 * 2 * 6 + 2 * 2);
    /* report.json: exact format, labels and Dice fractions */
    rep = load_json(out, "report.json");
    MSX_CHECK(rep && msx__json_str(rep, "format") && !strcmp(msx__json_str(rep, "format"), "medsamix-report-v1"), "report format");
    if (rep) {
        static const char *const labels[8] = {"base", "spec_ct", "spec_mri", "linear", "task_arithmetic", "ties", "slerp", "medsamix"};
        const msx__json *in = msx__json_get(rep, "inputs"), *un = msx__json_get(rep, "uniform"), *tk = msx__json_get(rep, "tasks");
        double best_input = 0, mine = 0;
        MSX_CHECK(in && in->n == 3 && !strcmp(in->kids[1].str, "spec_ct"), "inputs");
        MSX_CHECK(un && un->n == 4 && !strcmp(un->kids[1].str, "task_arithmetic"), "uniform");
        MSX_CHECK(msx__json_str(rep, "result") && !strcmp(msx__json_str(rep, "result"), "medsamix"), "result");
        MSX_CHECK(tk && tk->n == 2, "tasks");
        for (l = 0; tk && l < 8; l++) {
            double sums[2] = {0, 0};
            for (k = 0; k < 2; k++)
                for (i = 0; i < 2; i++) {
                    const msx__json *v = msx__json_get(msx__json_get(msx__json_get(tk, k ? "us_cyst" : "mri_ring"), i ? "test" : "calib"), labels[l]);
                    MSX_CHECK(v && v->type == MSX__JNUM && v->num >= 0 && v->num <= 1, "%s %d %d", labels[l], k, i);
                    if (v) sums[i] += v->num / 2;
                }
            if (l < 3 && sums[0] > best_input) best_input = sums[0];
            if (l == 7) mine = sums[0];
        }
        /* The deployment rule (msx__srun_choose): the logged, not failed trial
           with the highest mean calib Dice, earliest on ties. Checked against
           trials.jsonl; nothing is claimed about the report's input rows. */
        (void)best_input;
        {
            FILE *f;
            char line[65536];
            int t = 0, arg = -1;
            double top = -1;
            snprintf(p, sizeof p, "%s/trials.jsonl", out);
            f = fopen(p, "r");
            MSX_CHECK(f != NULL, "cannot open %s", p);
            while (f && fgets(line, sizeof line, f)) {
                msx__json *j = msx__json_parse(line, strlen(line), "trials.jsonl");
                const msx__json *d = j ? msx__json_get(j, "dice") : NULL;
                const char *st = j ? msx__json_str(j, "status") : NULL;
                const msx__json *id = j ? msx__json_get(j, "trial") : NULL;
                if (id && id->type == MSX__JNUM) t++; /* the first line is the run's header */
                if (id && d && st && !strcmp(st, "ok")) { /* lines come in completion order: ties go to the lower id */
                    const msx__json *a = msx__json_get(d, "mri_ring"), *b = msx__json_get(d, "us_cyst");
                    double m = a && b ? (a->num + b->num) / 2 : -1;
                    if (m > top || (m == top && (int)id->num < arg)) { top = m; arg = (int)id->num; }
                }
                msx__json_free(j);
            }
            if (f) fclose(f);
            MSX_CHECK(t == s.n_trials_done && arg >= 0, "trials.jsonl: %d trial lines", t);
            MSX_CHECK(s.best_trial == arg, "chosen trial %d, the rule picks %d", s.best_trial, arg);
            MSX_CHECK(fabs(mine - top) <= 1e-9, "report's medsamix calib mean %.6f, best trial's %.6f", mine, top);
        }
        {
            const msx__json *ep = msx__json_get(rep, "encoder_passes");
            double se = -1, re = -1, fe = -1;
            MSX_CHECK(ep && msx__json_num(ep, "search", &se, -1) && msx__json_num(ep, "report", &re, -1) &&
                      msx__json_num(ep, "full_equivalent", &fe, -1) && se == s.passes_search && re == s.passes_report && fe == s.passes_full,
                      "report.json encoder_passes %g %g %g", se, re, fe);
        }
        msx__json_free(rep);
    }
    /* best_plan.json loads with the merge API; its Pareto front has per-task Dice */
    snprintf(p, sizeof p, "%s/best_plan.json", out);
    MSX_CHECK_OK(msx_plan_load_json(p, &plan));
    bp = load_json(out, "best_plan.json");
    MSX_CHECK(bp && msx__json_get(bp, "pareto") && msx__json_get(bp, "pareto")->n >= 1, "pareto in best_plan.json");
    if (bp && msx__json_get(bp, "pareto"))
        MSX_CHECK(msx__json_get(msx__json_get(&msx__json_get(bp, "pareto")->kids[0], "dice"), "us_cyst") != NULL, "pareto dice");
    msx__json_free(bp);
    pf = load_json(out, "pareto.json");
    MSX_CHECK(pf && msx__json_get(pf, "front"), "pareto.json");
    msx__json_free(pf);
    /* best.safetensors = that plan merged by the merge API, bit for bit */
    snprintf(p, sizeof p, "%s/best.safetensors", out);
    MSX_CHECK_OK(msx_sam_load(p, NULL, &best, NULL));
    MSX_CHECK_OK(msx_sam_load(o.base, NULL, &base, NULL));
    MSX_CHECK_OK(msx_sam_load(models2[0], NULL, &ft[0], NULL));
    MSX_CHECK_OK(msx_sam_load(models2[1], NULL, &ft[1], NULL));
    if (plan && best && base && ft[0] && ft[1]) {
        int same = 1;
        MSX_CHECK_OK(msx_merger_create(base, (const msx_checkpoint *const *)ft, 2, plan->granularity, &mg));
        MSX_CHECK_OK(msx_ckpt_clone(base, &merged));
        if (mg && merged) {
            MSX_CHECK_OK(msx_merger_run(mg, plan, merged, NULL));
            for (i = 0; i < merged->n; i++) {
                msx_tensor *a = &merged->tensors[i], *b = msx_ckpt_find(best, a->name);
                if (!b || b->numel != a->numel || memcmp(a->data, b->data, (size_t)a->numel * 4)) { same = 0; break; }
            }
            MSX_CHECK(same, "best.safetensors differs from merging best_plan.json (tensor %d)", i);
        }
    }
    snprintf(p, sizeof p, "%s/overlays/us_cyst_000.png", out);
    MSX_CHECK(access(p, R_OK) == 0, "overlay %s", p);
    snprintf(p, sizeof p, "%s/report.md", out);
    MSX_CHECK(access(p, R_OK) == 0, "report.md");
    msx_merger_free(mg);
    msx_ckpt_free(merged);
    msx_ckpt_free(best);
    msx_ckpt_free(base);
    msx_ckpt_free(ft[0]);
    msx_ckpt_free(ft[1]);
    msx_plan_free(plan);

    /* a log from a different search space is refused on --resume, naming the cause */
    o.granularity = 3;
    o.resume = 1;
    MSX_CHECK(expect_error(msx_search_run(&o, &s), "different search space"), "resume other space: %s", msx_last_error());
    /* an existing log without --resume is refused (never overwritten) */
    o.granularity = 0;
    o.resume = 0;
    MSX_CHECK(expect_error(msx_search_run(&o, &s), "--resume"), "existing log: %s", msx_last_error());
}

static void test_bad_models(void) {
    const char *tasks[1] = {DEMO "/tasks/mri_ring"};
    char out[300], p[512];
    const char *mods[1];
    msx_checkpoint *ck = NULL, *cut;
    msx_search_options o;
    msx_search_summary s;
    unsigned char *keep;
    int i;
    /* a valid SAM with one encoder block fewer */
    MSX_CHECK_OK(msx_sam_load(DEMO "/models/spec_ct.pth", NULL, &ck, NULL));
    if (!ck) return;
    MSX_CHECK_OK(msx_ckpt_clone(ck, &cut));
    keep = (unsigned char *)malloc((size_t)cut->n);
    for (i = 0; i < cut->n; i++) keep[i] = strncmp(cut->tensors[i].name, "image_encoder.blocks.5.", 23) != 0;
    msx_ckpt_filter(cut, keep);
    free(keep);
    snprintf(p, sizeof p, "%s/depth5.safetensors", tmp_root);
    MSX_CHECK_OK(msx_safetensors_save(p, cut, NULL, 0));
    mods[0] = p;
    snprintf(out, sizeof out, "%s/badarch", tmp_root);
    base_options(&o, tasks, 1, out, 4);
    o.models = mods;
    o.n_models = 1;
    MSX_CHECK(expect_error(msx_search_run(&o, &s), "different architecture"), "arch: %s", msx_last_error());
    msx_ckpt_free(cut);
    msx_ckpt_free(ck);
}

/* Per trial: a hash of its log line without the (timing) "seconds" field. */
static int log_hashes(const char *path, uint64_t *h, int max) {
    FILE *f = fopen(path, "r");
    static char buf[1 << 20];
    int n = 0, t;
    if (!f) return -1;
    for (t = 0; t < max; t++) h[t] = 0;
    while (fgets(buf, sizeof buf, f)) {
        char *s = strstr(buf, "\"seconds\""), *e = strstr(buf, "\"status\"");
        if (strncmp(buf, "{\"trial\": ", 10)) continue;
        t = atoi(buf + 10);
        if (t < 0 || t >= max) continue;
        if (s && e && e > s) memmove(s, e, strlen(e) + 1);
        h[t] = msx__search_hash_str(1469598103934665603ULL, buf);
        n++;
    }
    fclose(f);
    return n;
}

static int count_lines(const char *path) {
    FILE *f = fopen(path, "r");
    int n = 0, c;
    if (!f) return 0;
    while ((c = fgetc(f)) != EOF) n += c == '\n';
    fclose(f);
    return n;
}

/* Drops the last line of a file (simulates a trial that was in flight). */
static void drop_last_line(const char *path) {
    void *d;
    size_t n;
    if (msx_read_file(path, 0, &d, &n) != MSX_OK) return;
    if (n > 1) {
        char *s = (char *)d;
        size_t k = n - 1;
        while (k > 0 && s[k - 1] != '\n') k--;
        write_bytes(path, s, k);
    }
    msx_free(d);
}


/* ---- racing: every decision of a logged race, re-derived independently ---- */

/* The documented stage schedule: race_first images per task, then m + m/2
   (at least one more; capped at all images). */
static int race_next_stage(int m) { return m + (m / 2 > 1 ? m / 2 : 1); }

#define RACE_MAX_TRIALS 64
#define RACE_MAX_IMG 32
typedef struct race_trial {
    int batch_start, passes, n_img, stopped, ok; /* stopped: 0, 1 safe, 2 race */
    char stem[RACE_MAX_IMG][32];
    double d[RACE_MAX_IMG], dice, cost;
} race_trial;

static double race_inc_dice(const race_trial *I, const char *stem) {
    int i;
    for (i = 0; i < I->n_img; i++)
        if (!strcmp(I->stem[i], stem)) return I->d[i];
    return NAN;
}

/* Single-task log: for every trial, the incumbent at its batch's start (best
   full trial before it, earliest on ties), the stage where the safe bound
   or the rule mean + kappa*sd/sqrt(m) < 0 of the paired differences first
   holds, and what the optimiser was told. Returns the number of stopped
   trials. */
static int check_race_log(const char *dir, int n_calib, int *n_trials_out) {
    msx__json *h = NULL;
    static race_trial tr[RACE_MAX_TRIALS];
    char p[600], line[1 << 16];
    FILE *f;
    double kappa = -1, first = -1;
    int n = 0, t, i, stopped = 0, n_starts = 0;
    unsigned starts = 0;
    snprintf(p, sizeof p, "%s/trials.jsonl", dir);
    f = fopen(p, "r");
    MSX_CHECK(f != NULL, "%s", p);
    if (!f) return 0;
    memset(tr, 0, sizeof tr);
    while (fgets(line, sizeof line, f)) {
        msx__json *j = msx__json_parse(line, strlen(line), "log line");
        double v = -1, sl = 0;
        const msx__json *im, *ti;
        race_trial *T;
        if (!j) continue;
        if (!h) { h = j; continue; }
        msx__json_num(j, "trial", &v, -1);
        t = (int)v;
        if (t < 0 || t >= RACE_MAX_TRIALS) { msx__json_free(j); continue; }
        T = &tr[t];
        T->ok = 1;
        msx__json_num(j, "slot", &sl, 0);
        T->batch_start = t - (int)sl;
        msx__json_num(j, "passes", &v, -1);
        T->passes = (int)v;
        T->stopped = msx__json_str(j, "stopped") ? (strcmp(msx__json_str(j, "stopped"), "safe") ? 2 : 1) : 0;
        T->cost = msx__json_get(j, "cost")->kids[0].num;
        T->dice = msx__json_get(j, "dice")->kids[0].num;
        im = msx__json_get(j, "images");
        ti = im && im->n == 1 ? &im->kids[0] : NULL;
        MSX_CHECK(ti && ti->n == T->passes && ti->n <= RACE_MAX_IMG, "trial %d: %d per-image values for %d passes", t, ti ? ti->n : -1, T->passes);
        for (i = 0; ti && i < ti->n && i < RACE_MAX_IMG; i++) {
            snprintf(T->stem[i], sizeof T->stem[i], "%s", ti->keys[i]);
            T->d[i] = ti->kids[i].num;
        }
        T->n_img = ti ? ti->n : 0;
        if (t + 1 > n) n = t + 1;
        msx__json_free(j);
    }
    fclose(f);
    MSX_CHECK(h && msx__json_num(h, "race_kappa", &kappa, -1) && msx__json_num(h, "race_first", &first, -1) && kappa >= 0 && first >= 1,
              "race header kappa %g first %g", kappa, first);
    for (t = 0; t < n; t++) {
        race_trial *T = &tr[t];
        const race_trial *I = NULL;
        double sum = 0, inc_cost = 0;
        int q, m, expect_stop = 0, expect_passes = n_calib;
        MSX_CHECK(T->ok, "trial %d missing", t);
        /* one cyclic race order (trial 0 is evaluated in full): every trial reads
           it from its own start, so its images are a window of trial 0's, cyclically */
        MSX_CHECK(tr[0].n_img == n_calib, "trial 0 has %d images, expected all %d", tr[0].n_img, n_calib);
        for (q = 0; q < n_calib && strcmp(tr[0].stem[q], T->stem[0]); q++) {}
        MSX_CHECK(q < n_calib, "trial %d: first image %s is not a calib image of trial 0", t, T->stem[0]);
        for (i = 0; q < n_calib && i < T->n_img; i++)
            if (strcmp(T->stem[i], tr[0].stem[(q + i) % n_calib])) break;
        MSX_CHECK(i == T->n_img, "trial %d: image %d (%s) breaks the cyclic race order", t, i, T->stem[i]);
        starts |= 1u << (q < n_calib ? q : 0);
        for (i = 0; i < T->n_img; i++) sum += T->d[i];
        /* the logged dice is the mean over the images it saw (any order: sum in the log order, 1e-12) */
        MSX_CHECK(T->n_img > 0 && fabs(T->dice - sum / T->n_img) < 1e-12, "trial %d: dice %.17g vs mean of its images %.17g", t, T->dice,
                  T->n_img ? sum / T->n_img : -1);
        for (q = 0; q < T->batch_start; q++)
            if (tr[q].ok && !tr[q].stopped && tr[q].n_img == n_calib && (!I || tr[q].dice > I->dice)) I = &tr[q];
        if (I) {
            inc_cost = 1 - I->dice;
            for (m = (int)first; m < n_calib; m = race_next_stage(m)) {
                double mean = 0, sd = 0, seen = 0;
                if (m > T->n_img) break;
                for (i = 0; i < m; i++) { mean += (T->d[i] - race_inc_dice(I, T->stem[i])) / m; seen += T->d[i]; }
                for (i = 0; i < m; i++) { double e = T->d[i] - race_inc_dice(I, T->stem[i]) - mean; sd += e * e; }
                sd = m > 1 ? sqrt(sd / (m - 1)) : 0;
                if (1.0 - (seen + (n_calib - m)) / n_calib > inc_cost) expect_stop = 1;
                else if (mean + kappa * sd / sqrt((double)m) < 0) expect_stop = 2;
                if (expect_stop) {
                    double est = inc_cost - mean;
                    expect_passes = m;
                    est = est < 0 ? 0 : est > 1 ? 1 : est;
                    MSX_CHECK(fabs(T->cost - est) < 1e-12, "trial %d: told cost %.17g, expected incumbent %.17g - mean difference = %.17g", t,
                              T->cost, inc_cost, est);
                    break;
                }
            }
        }
        MSX_CHECK(T->stopped == expect_stop && T->passes == expect_passes, "trial %d: stopped %d after %d images, expected %d after %d",
                  t, T->stopped, T->passes, expect_stop, expect_passes);
        if (!expect_stop) MSX_CHECK(fabs(T->cost - (1 - T->dice)) < 1e-15, "trial %d: full trial cost %.17g dice %.17g", t, T->cost, T->dice);
        stopped += T->stopped != 0;
    }
    /* the starts differ between trials (a shared prefix would stop every
       candidate on the same unrepresentative images) */
    for (i = 0; i < 32; i++) n_starts += (starts >> i) & 1u;
    MSX_CHECK(n < 4 || n_starts >= 2, "%d trial(s), all read the race order from the same start", n);
    msx__json_free(h);
    *n_trials_out = n;
    return stopped;
}

/* Runs first (before this process starts OpenMP threads, so fork is safe). */
static void test_kill_resume(void) {
    const char *tasks[1] = {DEMO "/tasks/mri_ring"};
    char out_a[300], out_b[300], logp[600];
    msx_search_options o;
    msx_search_summary sa, sb;
    int trials = msx_search_n_initial(2) + 6, i, na, nb, status, killed_at;
    pid_t pid;
    double t0;
    uint64_t ha[64], hb[64];
    struct timespec nap = {0, 20000000};
    snprintf(out_a, sizeof out_a, "%s/killed", tmp_root);
    snprintf(out_b, sizeof out_b, "%s/straight", tmp_root);
    snprintf(logp, sizeof logp, "%s/trials.jsonl", out_a);
    base_options(&o, tasks, 1, out_a, trials);
    o.no_report = 1;
    fflush(NULL);
    pid = fork();
    if (pid == 0) {
        msx_search_run(&o, NULL);
        _exit(0);
    }
    MSX_CHECK(pid > 0, "fork");
    if (pid <= 0) return;
    t0 = msx_time_now();
    while (count_lines(logp) < 1 + 9 && msx_time_now() - t0 < 120) nanosleep(&nap, NULL);
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    killed_at = count_lines(logp) - 1;
    MSX_CHECK(WIFSIGNALED(status) && killed_at >= 9 && killed_at < trials, "killed after %d trials", killed_at);
    { /* the kill landed during a race: trials were already being stopped early */
        void *txt;
        size_t len;
        if (msx_read_file(logp, 0, &txt, &len) == MSX_OK) {
            MSX_CHECK(strstr((const char *)txt, "\"stopped\": \"race\"") || strstr((const char *)txt, "\"stopped\": \"safe\""),
                      "no raced trial before the kill");
            msx_free(txt);
        }
    }
    /* make the cut land inside a batch of 2 at least once */
    if (killed_at % 2 == 0) drop_last_line(logp);
    o.resume = 1;
    MSX_CHECK_OK(msx_search_run(&o, &sa));
    o.resume = 0;
    o.out_dir = out_b;
    MSX_CHECK_OK(msx_search_run(&o, &sb));
    MSX_CHECK(sa.n_trials_done == trials && sb.n_trials_done == trials, "%d %d", sa.n_trials_done, sb.n_trials_done);
    MSX_CHECK(sa.best_trial == sb.best_trial && sa.best_calib[0] == sb.best_calib[0], "resumed best %d %.6f vs straight %d %.6f",
              sa.best_trial, sa.best_calib[0], sb.best_trial, sb.best_calib[0]);
    /* every trial (configuration, Dice, cost) is identical */
    snprintf(logp, sizeof logp, "%s/trials.jsonl", out_a);
    na = log_hashes(logp, ha, 64);
    snprintf(logp, sizeof logp, "%s/trials.jsonl", out_b);
    nb = log_hashes(logp, hb, 64);
    MSX_CHECK(na == trials && nb == trials, "log lines %d %d", na, nb);
    for (i = 0; i < trials && i < 64; i++)
        if (ha[i] != hb[i]) break;
    MSX_CHECK(i == trials, "trial %d differs between the resumed and the uninterrupted run", i);
    /* every racing decision of both runs, re-derived from their logs */
    {
        int n_a = 0, n_b = 0, st_a = check_race_log(out_a, 6, &n_a), st_b = check_race_log(out_b, 6, &n_b);
        MSX_CHECK(n_a == trials && n_b == trials && st_a == st_b && st_b > 0, "raced logs: %d/%d trials, %d/%d stopped", n_a, n_b, st_a, st_b);
        MSX_CHECK(sb.passes_search < (long long)trials * 6 && sa.passes_search == sb.passes_search && sb.passes_full == (long long)trials * 6,
                  "passes %lld/%lld of %lld", sa.passes_search, sb.passes_search, sb.passes_full);
    }
    { /* a race log of 0.1.x (no race_rule: one shared image order) is refused, not mixed */
        void *txt;
        size_t len;
        char *k;
        snprintf(logp, sizeof logp, "%s/trials.jsonl", out_b);
        if (msx_read_file(logp, 0, &txt, &len) == MSX_OK) {
            k = strstr((char *)txt, "\"race_rule\": 2, ");
            MSX_CHECK(k != NULL, "race_rule missing from the header");
            if (k) {
                FILE *f = fopen(logp, "wb");
                size_t at = (size_t)(k - (char *)txt), cut = strlen("\"race_rule\": 2, ");
                if (f) {
                    fwrite(txt, 1, at, f);
                    fwrite(k + cut, 1, len - at - cut, f);
                    fclose(f);
                }
                o.resume = 1;
                o.n_trials = trials + 2;
                MSX_CHECK(expect_error(msx_search_run(&o, &sb), "rule 1 of an earlier version"), "0.1.x race log: %s", msx_last_error());
            }
            msx_free(txt);
        }
    }
}

/* Multi-task racing: a trial is stopped only when, besides losing the
   batch's scalarised race, it also cannot become the result (the best mean
   calib Dice of the full trials before its batch) - re-derived from the log
   with that incumbent's per-image Dice, the stopped trial's images and kappa. */
static void test_race_multi_guard(void) {
    const char *tasks[2] = {DEMO "/tasks/mri_abdomen", DEMO "/tasks/us_cyst"};
    enum { NT = 40 };
    static double img[NT][2][RACE_MAX_IMG];
    static char stem[NT][2][RACE_MAX_IMG][32];
    static int nimg[NT][2], slot[NT], stop[NT], ok[NT];
    static double dice[NT][2];
    char out[300], p[600], line[1 << 16];
    msx_search_options o;
    msx_search_summary s;
    double kappa = -1;
    int t, k, i, n_stopped = 0;
    FILE *f;
    snprintf(out, sizeof out, "%s/race_multi", tmp_root);
    base_options(&o, tasks, 2, out, NT);
    o.multi = 1;
    o.no_report = 1;
    MSX_CHECK_OK(msx_search_run(&o, &s));
    snprintf(p, sizeof p, "%s/trials.jsonl", out);
    f = fopen(p, "r");
    MSX_CHECK(f != NULL, "%s", p);
    if (!f) return;
    memset(ok, 0, sizeof ok);
    while (fgets(line, sizeof line, f)) {
        msx__json *j = msx__json_parse(line, strlen(line), "log line");
        const msx__json *im, *dv;
        double v = -1;
        if (!j) continue;
        if (!msx__json_get(j, "trial")) { msx__json_num(j, "race_kappa", &kappa, -1); msx__json_free(j); continue; }
        msx__json_num(j, "trial", &v, -1);
        t = (int)v;
        im = msx__json_get(j, "images");
        dv = msx__json_get(j, "dice");
        if (t >= 0 && t < NT && im && im->n == 2 && dv && dv->n == 2) {
            ok[t] = 1;
            msx__json_num(j, "slot", &v, 0);
            slot[t] = (int)v;
            stop[t] = msx__json_str(j, "stopped") != NULL;
            for (k = 0; k < 2; k++) {
                dice[t][k] = dv->kids[k].num;
                nimg[t][k] = im->kids[k].n < RACE_MAX_IMG ? im->kids[k].n : RACE_MAX_IMG;
                for (i = 0; i < nimg[t][k]; i++) {
                    snprintf(stem[t][k][i], 32, "%s", im->kids[k].keys[i]);
                    img[t][k][i] = im->kids[k].kids[i].num;
                }
            }
        }
        msx__json_free(j);
    }
    fclose(f);
    MSX_CHECK(kappa > 0, "race_kappa %g in the header", kappa);
    for (t = 0; t < NT; t++) {
        int J = -1, q;
        double jc = 0, ro = 0, rs = 0;
        MSX_CHECK(ok[t], "trial %d missing", t);
        if (!ok[t] || !stop[t]) continue;
        n_stopped++;
        for (q = 0; q < t - slot[t]; q++)
            if (ok[q] && !stop[q] && (J < 0 || dice[q][0] + dice[q][1] > dice[J][0] + dice[J][1])) J = q;
        MSX_CHECK(J >= 0, "trial %d stopped with no full trial before its batch", t);
        if (J < 0) continue;
        for (k = 0; k < 2; k++) {
            double mean = 0, sd = 0, seen = 0, d[RACE_MAX_IMG];
            int m = nimg[t][k], n = nimg[J][k], a, b;
            for (a = 0; a < m; a++) {
                for (b = 0; b < n && strcmp(stem[J][k][b], stem[t][k][a]); b++) {}
                MSX_CHECK(b < n, "trial %d: image %s not in the result's", t, stem[t][k][a]);
                d[a] = b < n ? img[t][k][a] - img[J][k][b] : 0;
                mean += d[a] / m;
                seen += img[t][k][a];
            }
            for (a = 0; a < m; a++) sd += (d[a] - mean) * (d[a] - mean);
            sd = m > 1 ? sqrt(sd / (m - 1)) : 0;
            jc += (1 - dice[J][k]) / 2;
            ro += (1 - dice[J][k] - mean - kappa * sd / sqrt((double)m)) / 2;
            rs += (1 - (seen + (n - m)) / n) / 2;
        }
        MSX_CHECK(rs > jc - 1e-12 || ro > jc - 1e-12, "trial %d was stopped but could still become the result (trial %d): "
                  "optimistic mean cost %.6f, safe %.6f vs %.6f", t, J, ro, rs, jc);
    }
    MSX_CHECK(n_stopped >= 5, "only %d of %d multi-task trials were stopped", n_stopped, NT);
}

/* Bad racing/budget inputs fail before any long work; --max-passes stops the search. */
static void test_race_inputs(void) {
    const char *tasks[1] = {DEMO "/tasks/mri_ring"};
    char out[300];
    msx_search_options o;
    msx_search_summary s;
    double t0;
    snprintf(out, sizeof out, "%s/race_inputs", tmp_root);
    base_options(&o, tasks, 1, out, 100);
    o.no_report = 1;
    o.max_passes = -1;
    MSX_CHECK(expect_error(msx_search_run(&o, &s), "max_passes"), "max_passes -1: %s", msx_last_error());
    o.max_passes = 0;
    o.time_limit = -1;
    MSX_CHECK(expect_error(msx_search_run(&o, &s), "time limit"), "time limit -1: %s", msx_last_error());
    o.time_limit = 0;
    /* fewer calib images (6) than the first stage: documented fallback, every trial on all 6 */
    o.race_first = 7;
    o.n_trials = 4;
    t0 = msx_time_now();
    MSX_CHECK_OK(msx_search_run(&o, &s));
    MSX_CHECK(s.n_trials_done == 4 && s.passes_search == 24 && s.n_full == 4, "race_first 7: %d trials, %lld passes, %d full",
              s.n_trials_done, s.passes_search, s.n_full);
    o.n_trials = 100;
    o.resume = 0;
    snprintf(out, sizeof out, "%s/race_inputs2", tmp_root);
    o.out_dir = out;
    o.race_first = 0;
    o.fidelity = (msx_fidelity)7;
    MSX_CHECK(expect_error(msx_search_run(&o, &s), "fidelity"), "fidelity 7: %s", msx_last_error());
    o.fidelity = MSX_FIDELITY_FULL;
    /* a budget of 40 passes: 6 per full trial, checked before each batch of 2 */
    o.max_passes = 40;
    MSX_CHECK_OK(msx_search_run(&o, &s));
    MSX_CHECK(s.budget_stop == 1 && s.passes_search >= 40 && s.passes_search < 40 + 2 * 6 && s.n_trials_done == 8,
              "max_passes 40: stop %d, %lld passes, %d trials", s.budget_stop, s.passes_search, s.n_trials_done);
    (void)t0;
}

int main(void) {
    double t0 = msx_time_now();
    snprintf(tmp_root, sizeof tmp_root, "/tmp/msx_test_search_XXXXXX");
    if (!mkdtemp(tmp_root)) { fprintf(stderr, "mkdtemp failed\n"); return 1; }
    test_kill_resume();
    test_race_inputs();
    test_race_multi_guard();
    test_tasks();
    test_baseline();
    test_bad_models();
    test_search_outputs();
    printf("test_search: %.1f s\n", msx_time_now() - t0);
    if (msx_test_fail == 0) { /* keep the files of a failing run for inspection */
        char cmd[300];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_root);
        if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmp_root);
    } else fprintf(stderr, "temporary files kept in %s\n", tmp_root);
    return msx_test_summary("test_search");
}
