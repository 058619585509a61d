/* tests/test_safety.c - the library side of issue 14 with hand-computed
   expectations: error messages that quote the previous one, file identity
   (msx_same_file / msx_check_outputs), the atomic writer's modes, read-only
   refusal and links, 16-bit images under every intensity rule, the .pth
   writer (bytes of the pickle checked by hand, read back by our loader),
   non-finite counts, missing keys named, merges that overflow. */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "test.h"
#include "png16.h"

#include <sys/stat.h>
#include <unistd.h>

static char tmp[256];
static const char *P(const char *name) {
    static char b[8][512];
    static int k;
    char *s = b[k++ & 7];
    snprintf(s, sizeof b[0], "%s/%s", tmp, name);
    return s;
}

static void test_messages(void) {
    char want[200];
    /* wrapping the last message in a new one keeps it whole */
    msx__err(MSX_E_FORMAT, "%s: cannot decode image (%s)", "a/b.png", "bad magic");
    msx__err(MSX_E_ARG, "%s: %s", "task", msx_last_error());
    MSX_CHECK(!strcmp(msx_last_error(), "task: a/b.png: cannot decode image (bad magic)"), "got '%s'", msx_last_error());
    /* a plan with a negative t: the path once, the value and the reason */
    {
        msx_plan *p = NULL, *q = NULL;
        msx_group_plan g;
        char *js = NULL, *at;
        memset(&g, 0, sizeof g);
        g.method = MSX_MERGE_SLERP;
        g.t[1] = 0.5;
        g.t[2] = 0.2;
        MSX_CHECK_OK(msx_plan_create(12, 3, 12, &p));
        MSX_CHECK_OK(msx_plan_set_uniform(p, &g));
        MSX_CHECK_OK(msx_plan_to_json(p, &js));
        at = js ? strstr(js, "[0, 0.5, 0.2]") : NULL;
        MSX_CHECK(at != NULL, "plan JSON spelling: %s", js ? js : "");
        if (at) {
            char *bad = (char *)malloc(strlen(js) + 2);
            memcpy(bad, js, (size_t)(at - js));
            strcpy(bad + (at - js), "[0, -0.5, 0.2]");
            strcat(bad, at + strlen("[0, 0.5, 0.2]"));
            MSX_CHECK(msx_plan_parse_json(bad, strlen(bad), "plans/x.json", &q) == MSX_E_ARG, "refused");
            snprintf(want, sizeof want, "plans/x.json: group layer_0: t[1] = -0.5 is out of range (t must lie in [0, 1])");
            MSX_CHECK(!strcmp(msx_last_error(), want), "got '%s'", msx_last_error());
            free(bad);
        }
        msx_free(js);
        msx_plan_free(p);
        msx_plan_free(q);
    }
}

static void write_text(const char *path, const char *s) {
    FILE *f = fopen(path, "wb");
    if (f) { fputs(s, f); fclose(f); }
}
static char *read_text(const char *path) {
    void *d = NULL;
    size_t n;
    if (msx_read_file(path, 0, &d, &n) != MSX_OK) return NULL;
    return (char *)d;
}

static void test_files(void) {
    struct stat st;
    char *s;
    const char *in[2], *out[2];
    write_text(P("a"), "a");
    MSX_CHECK(symlink("a", P("l")) == 0, "symlink");
    MSX_CHECK(link(P("a"), P("h")) == 0, "hard link");
    MSX_CHECK(msx_same_file(P("a"), P("l")) && msx_same_file(P("a"), P("h")), "links are the same file");
    {
        char dotted[600];
        snprintf(dotted, sizeof dotted, "%s/./a", tmp);
        MSX_CHECK(msx_same_file(P("a"), dotted), "another spelling");
        snprintf(dotted, sizeof dotted, "%s/./new", tmp);
        MSX_CHECK(msx_same_file(P("new"), dotted) && !msx_same_file(P("new"), P("new2")), "not-yet-existing outputs");
    }
    MSX_CHECK(!msx_same_file(P("a"), P("new")), "an existing and a new file differ");
    in[0] = P("l");
    in[1] = NULL;
    out[0] = P("b");
    out[1] = P("h");
    MSX_CHECK(msx_check_outputs(in, 2, out, 2) == MSX_E_ARG && strstr(msx_last_error(), "same file"), "%s", msx_last_error());
    out[1] = P("b");
    MSX_CHECK(msx_check_outputs(in, 1, out, 2) == MSX_E_ARG && strstr(msx_last_error(), "outputs"), "%s", msx_last_error());
    /* the writer: new files follow the umask, existing ones keep their mode */
    write_text(P("m"), "old");
    chmod(P("m"), 0600);
    MSX_CHECK_OK(msx_write_file_atomic(P("m"), "new", 3));
    MSX_CHECK(stat(P("m"), &st) == 0 && (st.st_mode & 07777) == 0600, "mode %o kept", (unsigned)(st.st_mode & 07777));
    s = read_text(P("m"));
    MSX_CHECK(s && !strcmp(s, "new"), "content replaced");
    msx_free(s);
    /* read-only: refused even for root (no write bit at all) */
    write_text(P("ro"), "keep");
    chmod(P("ro"), 0444);
    MSX_CHECK(msx_write_file_atomic(P("ro"), "x", 1) == MSX_E_IO && strstr(msx_last_error(), "read-only"), "%s", msx_last_error());
    s = read_text(P("ro"));
    MSX_CHECK(s && !strcmp(s, "keep") && stat(P("ro"), &st) == 0 && (st.st_mode & 07777) == 0444, "untouched");
    msx_free(s);
    out[0] = P("ro");
    MSX_CHECK(msx_check_outputs(NULL, 0, out, 1) == MSX_E_IO, "checked up front too");
    /* a link is written through and kept */
    MSX_CHECK_OK(msx_write_file_atomic(P("l"), "via link", 8));
    s = read_text(P("a"));
    MSX_CHECK(s && !strcmp(s, "via link") && lstat(P("l"), &st) == 0 && S_ISLNK(st.st_mode), "through the link");
    msx_free(s);
    /* directories */
    mkdir(P("d"), 0755);
    MSX_CHECK(msx_write_file_atomic(P("d"), "x", 1) == MSX_E_IO && strstr(msx_last_error(), "is a directory"), "%s", msx_last_error());
    {
        void *d;
        size_t n;
        MSX_CHECK(msx_read_file(P("d"), 0, &d, &n) == MSX_E_IO && strstr(msx_last_error(), "is a directory"), "%s", msx_last_error());
    }
}

/* 2x2 grey 16-bit: 1000 2000 / 3000 5000. */
static void test_intensity(void) {
    static const unsigned short px[4] = {1000, 2000, 3000, 5000};
    static const unsigned char mm[4] = {0, 64, 128, 255}, win[4] = {0, 0, 128, 255}, hb[4] = {3, 7, 11, 19};
    unsigned short *big;
    msx_image img;
    msx_image_info info;
    msx_intensity it;
    char s[64];
    int i, ok;
    memset(&img, 0, sizeof img);
    write_png16(P("g16.png"), 2, 2, px);
    MSX_CHECK_OK(msx_image_load_ex(P("g16.png"), NULL, &img, &info));
    for (ok = 1, i = 0; i < 4; i++) ok &= img.data[3 * i] == mm[i] && img.data[3 * i + 1] == mm[i] && img.data[3 * i + 2] == mm[i];
    MSX_CHECK(ok && info.bits == 16 && info.lo == 1000 && info.hi == 5000, "minmax (default)");
    MSX_CHECK_OK(msx_intensity_parse("window:3000,2000", &it));
    MSX_CHECK_OK(msx_image_load_ex(P("g16.png"), &it, &img, &info));
    for (ok = 1, i = 0; i < 4; i++) ok &= img.data[3 * i] == win[i];
    MSX_CHECK(ok && info.lo == 2000 && info.hi == 4000, "window");
    msx_intensity_str(&it, s, sizeof s);
    MSX_CHECK(!strcmp(s, "window:3000,2000"), "%s", s);
    MSX_CHECK_OK(msx_intensity_parse("high-byte", &it));
    MSX_CHECK_OK(msx_image_load_ex(P("g16.png"), &it, &img, &info));
    for (ok = 1, i = 0; i < 4; i++) ok &= img.data[3 * i] == hb[i];
    MSX_CHECK(ok, "high byte");
    /* percentile over 1000 pixels (3000 samples): 4 zeros and 4 x 65535 are clipped:
       0.5 % -> the 15th sample = 1000, 99.5 % -> the 2985th = 2000 */
    big = (unsigned short *)malloc(sizeof *big * 1000);
    for (i = 0; i < 1000; i++) big[i] = (unsigned short)(i < 4 ? 0 : i >= 996 ? 65535 : 1000 + 1000 * (i % 2));
    write_png16(P("p16.png"), 1000, 1, big);
    MSX_CHECK_OK(msx_intensity_parse("percentile", &it));
    MSX_CHECK_OK(msx_image_load_ex(P("p16.png"), &it, &img, &info));
    MSX_CHECK(info.lo == 1000 && info.hi == 2000 && img.data[0] == 0 && img.data[3 * 4] == 0 && img.data[3 * 5] == 255 &&
                  img.data[3 * 999] == 255, "percentile %g..%g", info.lo, info.hi);
    MSX_CHECK_OK(msx_image_load_ex(P("p16.png"), NULL, &img, &info));
    MSX_CHECK(img.data[3 * 4] == 4 && img.data[3 * 5] == 8 && img.data[3 * 999] == 255, "minmax on the same: %d %d",
              img.data[12], img.data[15]);
    free(big);
    MSX_CHECK(msx_intensity_parse("window:40", &it) == MSX_E_ARG && strstr(msx_last_error(), "window:40"), "%s", msx_last_error());
    MSX_CHECK(msx_intensity_parse("window:40,0", &it) == MSX_E_ARG, "zero width");
    MSX_CHECK(msx_intensity_parse("gamma", &it) == MSX_E_ARG && strstr(msx_last_error(), "gamma"), "%s", msx_last_error());
    msx_image_free(&img);
}

/* A small checkpoint through the .pth writer: the pickle's bytes by hand,
   read back by the loader. */
static void test_pth(void) {
    msx_checkpoint *c = msx_ckpt_new(), *back = NULL;
    int64_t s2[2] = {2, 3}, s1[1] = {2};
    float a[6] = {1, -2, 3.5f, 0, 1e-3f, 7};
    int64_t b[2] = {5, -6};
    void *d;
    size_t n;
    msx_tensor *t;
    MSX_CHECK_OK(msx_ckpt_add(c, "w", MSX_F32, 2, s2, a, NULL));
    MSX_CHECK_OK(msx_ckpt_add(c, "n.b", MSX_I64, 1, s1, b, NULL));
    MSX_CHECK_OK(msx_pth_save(P("c.pth"), c));
    MSX_CHECK_OK(msx_ckpt_load(P("c.pth"), &back));
    if (back) {
        MSX_CHECK(back->n == 2 && !strcmp(back->tensors[0].name, "w") && !strcmp(back->tensors[1].name, "n.b"), "keys, order");
        t = msx_ckpt_find(back, "w");
        MSX_CHECK(t && t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 3 && !memcmp(t->data, a, sizeof a), "float tensor");
        t = msx_ckpt_find(back, "n.b");
        MSX_CHECK(t && t->src_dtype == MSX_I64 && t->numel == 2, "int64 tensor");
    }
    msx_ckpt_free(back);
    /* the start of archive/data.pkl: PROTO 2, GLOBAL collections OrderedDict, ) R ( , "w", the rebuild global */
    if (msx_read_file(P("c.pth"), 0, &d, &n) == MSX_OK) {
        static const char want[] = "\x80\x02" "ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00w" "ctorch._utils\n_rebuild_tensor_v2\n"
                                   "((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x00" "0X\x03\x00\x00\x00" "cpuJ\x06\x00\x00\x00tQ"
                                   "J\x00\x00\x00\x00(J\x02\x00\x00\x00J\x03\x00\x00\x00t(J\x03\x00\x00\x00J\x01\x00\x00\x00t\x89";
        size_t wl = sizeof want - 1;
        const unsigned char *p = (const unsigned char *)d;
        size_t i, at = 0;
        int found = 0;
        for (i = 0; i + 4 < n && !found; i++)
            if (!memcmp(p + i, "\x80\x02", 2) && i + wl <= n && !memcmp(p + i, want, wl)) { found = 1; at = i; }
        MSX_CHECK(found && at % 64 == 0, "pickle bytes (at %lu)", (unsigned long)at);
        MSX_CHECK(n > 4 && !memcmp(p, "PK\x03\x04", 4), "zip");
        msx_free(d);
    }
    msx_ckpt_free(c);
}

static void test_nonfinite(void) {
    msx_checkpoint *c = msx_ckpt_new();
    int64_t s[1] = {4};
    float v[4] = {1, 0, 0, 2};
    msx_tensor *t;
    v[1] = NAN;
    v[2] = -INFINITY;
    MSX_CHECK_OK(msx_ckpt_add(c, "ok", MSX_F32, 1, s, NULL, NULL));
    MSX_CHECK_OK(msx_ckpt_add(c, "bad", MSX_F32, 1, s, v, &t));
    MSX_CHECK(msx_tensor_count_nonfinite(t) == 2, "two");
    MSX_CHECK(msx_ckpt_check_finite(c, "m") == MSX_E_FORMAT && strstr(msx_last_error(), "'bad' (2 of 4)"), "%s", msx_last_error());
    msx_ckpt_free(c);
}

/* Missing tensor named; merge that overflows names the group. */
static void test_sam(void) {
    msx_checkpoint *c = NULL, *ft[2] = {NULL, NULL}, *out = NULL;
    msx_sam_arch a;
    msx_merger *m = NULL;
    msx_plan *p = NULL;
    msx_group_plan g;
    unsigned char *keep;
    int i;
    MSX_CHECK_OK(msx_ckpt_load("examples/demo/models/base.pth", &c));
    if (!c) return;
    keep = (unsigned char *)malloc((size_t)c->n);
    for (i = 0; i < c->n; i++) keep[i] = strcmp(c->tensors[i].name, "image_encoder.blocks.1.norm1.weight") != 0;
    msx_ckpt_filter(c, keep);
    free(keep);
    MSX_CHECK_OK(msx_sam_arch_infer(c, &a));
    MSX_CHECK(msx_sam_validate(c, &a) == MSX_E_KEY_MISMATCH && strstr(msx_last_error(), "1 missing (image_encoder.blocks.1.norm1.weight)") &&
                  strstr(msx_last_error(), "0 unexpected"), "%s", msx_last_error());
    msx_ckpt_free(c);
    c = NULL;
    MSX_CHECK_OK(msx_sam_load("examples/demo/models/base.pth", NULL, &c, &a));
    MSX_CHECK_OK(msx_sam_load("examples/demo/models/spec_ct.pth", NULL, &ft[0], NULL));
    MSX_CHECK_OK(msx_sam_load("examples/demo/models/spec_mri.pth", NULL, &ft[1], NULL));
    if (c && ft[0] && ft[1] && msx_merger_create(c, (const msx_checkpoint *const *)ft, 2, 2, &m) == MSX_OK &&
        msx_merger_plan_create(m, &p) == MSX_OK && msx_ckpt_clone(c, &out) == MSX_OK) {
        memset(&g, 0, sizeof g);
        g.method = MSX_MERGE_TASK_ARITHMETIC;
        g.scale = 1e39;
        MSX_CHECK_OK(msx_plan_set_uniform(p, &g));
        MSX_CHECK_OK(msx_merger_run(m, p, out, NULL));
        MSX_CHECK(msx_merger_check_finite(m, p, out) == MSX_E_ARG && strstr(msx_last_error(), "task_arithmetic, scale 1e+39") &&
                      strstr(msx_last_error(), "group "), "%s", msx_last_error());
        MSX_CHECK(msx_merge_export(P("inf.safetensors"), out, p) == MSX_E_FORMAT && access(P("inf.safetensors"), F_OK) != 0,
                  "export refuses it: %s", msx_last_error());
        g.scale = 0.5;
        MSX_CHECK_OK(msx_plan_set_uniform(p, &g));
        MSX_CHECK_OK(msx_merger_run(m, p, out, NULL));
        MSX_CHECK_OK(msx_merger_check_finite(m, p, out));
        MSX_CHECK(msx_merge_export(P("x.bin"), out, p) == MSX_E_ARG && strstr(msx_last_error(), ".pth"), "%s", msx_last_error());
        MSX_CHECK_OK(msx_merge_export(P("x.pth"), out, p));
        MSX_CHECK(access(P("x.plan.json"), F_OK) == 0, "plan beside the .pth");
        {
            const msx_checkpoint *all[3];
            const char *paths[3] = {"b", "ct", "mri"};
            char hex[17];
            char js[600];
            int rec;
            all[0] = c; all[1] = ft[0]; all[2] = ft[1];
            msx_ckpt_fingerprint(ft[0], hex);
            snprintf(js, sizeof js, "{\"medsamix\": {\"models\": [{\"stem\": \"b\", \"digest\": \"0\"}, {\"stem\": \"ct\", \"digest\": \"%s\"}, {}]}}", hex);
            write_text(P("plan.json"), js);
            MSX_CHECK(msx_plan_check_models(P("plan.json"), all, paths, 3, &rec) == MSX_E_STATE && rec &&
                          strstr(msx_last_error(), "model 0"), "%s", msx_last_error());
            write_text(P("plan2.json"), "{\"format\": \"medsamix-plan-v1\"}");
            MSX_CHECK(msx_plan_check_models(P("plan2.json"), all, paths, 3, &rec) == MSX_OK && !rec, "no models recorded");
        }
    }
    msx_plan_free(p);
    msx_merger_free(m);
    msx_ckpt_free(out);
    msx_ckpt_free(c);
    msx_ckpt_free(ft[0]);
    msx_ckpt_free(ft[1]);
}

int main(void) {
    char cmd[600];
    snprintf(tmp, sizeof tmp, "/tmp/msx_test_safety_XXXXXX");
    if (!mkdtemp(tmp)) { printf("test_safety: 0 passed, 1 failed (no temporary folder)\n"); return 1; }
    test_messages();
    test_files();
    test_intensity();
    test_pth();
    test_nonfinite();
    test_sam();
    snprintf(cmd, sizeof cmd, "chmod -R u+w %s && rm -rf %s", tmp, tmp);
    if (system(cmd) != 0) printf("test_safety: could not remove %s\n", tmp);
    return msx_test_summary("test_safety");
}
