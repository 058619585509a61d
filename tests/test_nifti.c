/* tests/test_nifti.c - the volumes section: NIfTI-1/2 I/O, the reference's
   slice pipeline on nnU-Net datasets, prepare / search / eval / segment on
   volumes.
   Golden data: tests/data/nifti (two synthetic nnU-Net datasets and what the
   MedSAMix reference's 3-D pipeline makes of them, computed with numpy and
   nibabel: expected.json + expected.safetensors, see tests/data/nifti/README.md).
   Other expected values are numpy's (quoted where used). */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "test.h"
#include "fuzz/fuzz_nifti.h"
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#define GOLD "tests/data/nifti"
#define ROOT GOLD "/datasets"
#define TABLE GOLD "/tasks.json"

static char tmp_root[512];
static char bin_path[1024]; /* build/medsamix next to build/tests/ */

static const char *tmp_path(const char *rel) {
    static char buf[8][1024];
    static int k;
    char *b = buf[k++ & 7];
    snprintf(b, sizeof buf[0], "%s/%s", tmp_root, rel);
    return b;
}

static void write_text(const char *path, const char *text) {
    MSX_CHECK_OK(msx_write_file_atomic(path, text, strlen(text)));
}

static msx__json *read_json(const char *path) {
    void *buf;
    size_t len;
    msx__json *j;
    if (msx_read_file(path, 0, &buf, &len) != MSX_OK) return NULL;
    j = msx__json_parse((const char *)buf, len, path);
    msx_free(buf);
    return j;
}

/* ---- numpy-exact pieces ---------------------------------------------------- */

static void test_numpy_pieces(void) {
    /* np.sum / np.mean of a = ((j*7919) % 1000)*0.001 + 1e-7*j, j < 100003:
       numpy 1.24 gives 50451.78200030001 (pairwise within 8192-element
       buffers); one pairwise sum over all gives 50451.7820003, a plain loop
       50451.782000300016 */
    size_t n = 100003, j;
    double *a = (double *)malloc(n * sizeof(double)), s;
    for (j = 0; j < n; j++) a[j] = (double)((j * 7919) % 1000) * 0.001 + 1e-7 * (double)j;
    s = msx__vol_sum(a, n);
    MSX_CHECK(s == 50451.78200030001, "pairwise sum %.17g", s);
    MSX_CHECK(s / (double)n == 0.5045026849224524, "mean %.17g", s / (double)n);
    free(a);
}

static void test_normalise_numpy(void) {
    /* x[i] = ((i*37) % 61)*0.5 + i*0.01 as a 5x6x10 F-order array; numpy:
       P0.5 = 0.7189000000000001, P99.5 = 32.0011, then the reference's
       z-score + min-max + uint8 (values below, F order) */
    static const unsigned char want[300] = {
        0, 145, 47, 198, 100, 2, 153, 55, 206, 108, 11, 162, 64, 215, 117, 19, 170, 72, 223, 126, 28, 179, 81, 232, 134,
        36, 187, 90, 240, 143, 45, 196, 98, 0, 151, 54, 204, 107, 9, 160, 62, 213, 115, 18, 168, 71, 222, 124, 26, 177,
        79, 230, 132, 35, 186, 88, 239, 141, 43, 194, 96, 0, 149, 52, 203, 105, 7, 158, 60, 211, 113, 16, 167, 69, 220,
        122, 24, 175, 77, 228, 131, 33, 184, 86, 237, 139, 41, 192, 95, 245, 148, 50, 201, 103, 5, 156, 59, 209, 112, 14,
        165, 67, 218, 120, 22, 173, 76, 227, 129, 31, 182, 84, 235, 137, 40, 191, 93, 244, 146, 48, 199, 101, 4, 154, 57,
        208, 110, 12, 163, 65, 216, 118, 21, 172, 74, 225, 127, 29, 180, 82, 233, 136, 38, 189, 91, 242, 144, 46, 197, 100,
        250, 153, 55, 206, 108, 10, 161, 63, 214, 117, 19, 170, 72, 223, 125, 27, 178, 81, 232, 134, 36, 187, 89, 240, 142,
        45, 195, 98, 249, 151, 53, 204, 106, 9, 159, 62, 213, 115, 17, 168, 70, 221, 123, 26, 177, 79, 230, 132, 34, 185,
        87, 238, 141, 43, 194, 96, 247, 149, 51, 202, 105, 254, 158, 60, 211, 113, 15, 166, 68, 219, 122, 24, 175, 77, 228,
        130, 32, 183, 86, 236, 139, 41, 192, 94, 245, 147, 50, 200, 103, 254, 156, 58, 209, 111, 14, 164, 67, 218, 120, 22,
        173, 75, 226, 128, 31, 182, 84, 235, 137, 39, 190, 92, 243, 146, 48, 199, 101, 252, 154, 56, 207, 109, 254, 163, 65,
        216, 118, 20, 171, 73, 224, 127, 29, 180, 82, 233, 135, 37, 188, 91, 241, 144, 46, 197, 99, 250, 152, 55, 205, 108,
    };
    msx_volume v;
    unsigned char got[300];
    double w[300];
    int i, bad = 0;
    memset(&v, 0, sizeof v);
    MSX_CHECK_OK(msx_volume_create(5, 6, 10, NULL, 1, &v));
    for (i = 0; i < 300; i++) v.data[i] = w[i] = (double)((i * 37) % 61) * 0.5 + i * 0.01;
    MSX_CHECK(msx__vol_percentile(w, 300, 0.5) == 0.7189000000000001, "P0.5 %.17g", msx__vol_percentile(w, 300, 0.5));
    MSX_CHECK(msx__vol_percentile(w, 300, 99.5) == 32.0011, "P99.5 %.17g", msx__vol_percentile(w, 300, 99.5));
    MSX_CHECK_OK(msx_volume_to_u8(&v, got));
    for (i = 0; i < 300; i++) bad += got[i] != want[i];
    MSX_CHECK(bad == 0, "%d of 300 uint8 values differ from numpy", bad);
    msx_volume_free(&v);
}

/* ---- golden: the reference's pipeline on two nnU-Net datasets ---------------- */

static const msx_tensor *gold_tensor(const msx_checkpoint *g, const char *task, const char *split, int i, const char *what) {
    char name[256];
    snprintf(name, sizeof name, "%s.%s.%d.%s", task, split, i, what);
    return msx_ckpt_find(g, name);
}

/* Compares a loaded task with expected.json's task object; dataset_rename
   maps the golden dataset name to the one loaded (NULL: same). */
static void check_task(const msx_nnunet_task *t, const msx__json *exp_task, const msx_checkpoint *g, const char *gold_task,
                       const char *renamed) {
    static const char *const sn[2] = {"calib", "test"};
    int s, i, e, bad_px = 0, bad_meta = 0;
    for (s = 0; s < 2; s++) {
        const msx__json *sp = msx__json_get(exp_task, sn[s]);
        const msx__json *cases = msx__json_get(sp, "cases"), *sl = msx__json_get(sp, "slices");
        MSX_CHECK(cases && sl && cases->n == t->n_entries, "%s %s: entries", gold_task, sn[s]);
        if (!cases || !sl || cases->n != t->n_entries) continue;
        for (e = 0; e < t->n_entries; e++) {
            const msx__json *cl = msx__json_get(&cases->kids[e], "cases");
            int ok = cl && cl->n == t->entries[e].n_cases[s];
            for (i = 0; ok && i < cl->n; i++) ok = !strcmp(cl->kids[i].str, t->entries[e].cases[s][i]);
            MSX_CHECK(ok, "%s %s entry %d: case list differs", gold_task, sn[s], e);
        }
        MSX_CHECK(sl->n == t->n[s], "%s %s: %d slices, expected %d", gold_task, sn[s], t->n[s], sl->n);
        if (sl->n != t->n[s]) continue;
        for (i = 0; i < sl->n; i++) {
            const msx__json *x = &sl->kids[i], *box = msx__json_get(x, "box");
            const msx_nnunet_slice *y = &t->slices[s][i];
            const msx_tensor *gi = gold_tensor(g, gold_task, sn[s], i, "image"), *gm = gold_tensor(g, gold_task, sn[s], i, "mask");
            double ch = -1, z = -1, rows = -1, cols = -1;
            int k, okm = 1;
            msx__json_num(x, "channel", &ch, -1);
            msx__json_num(x, "z", &z, -1);
            msx__json_num(x, "rows", &rows, -1);
            msx__json_num(x, "cols", &cols, -1);
            okm = strcmp(msx__json_str(x, "case"), y->case_id) == 0 && (int)ch == y->channel && (int)z == y->z &&
                  (int)rows == y->rows && (int)cols == y->cols &&
                  !strcmp(renamed ? renamed : msx__json_str(x, "dataset"), y->dataset);
            for (k = 0; k < 4; k++) okm = okm && (int)box->kids[k].num == y->box[k];
            if (!okm) {
                if (bad_meta++ < 3) fprintf(stderr, "  %s %s slice %d: %s z%d box %d %d %d %d differs from expected.json\n", gold_task, sn[s], i, y->case_id, y->z, y->box[0], y->box[1], y->box[2], y->box[3]);
                continue;
            }
            if (!gi || !gm || gi->numel != (int64_t)y->rows * y->cols || gm->numel != gi->numel) { bad_px++; continue; }
            for (k = 0; k < (int)gi->numel; k++) {
                if (((const unsigned char *)gi->data)[k] != y->image[k] || ((const unsigned char *)gm->data)[k] != y->mask[k]) {
                    if (bad_px++ < 3) fprintf(stderr, "  %s %s slice %d pixel %d: image %d vs %d, mask %d vs %d\n", gold_task, sn[s], i, k,
                                              y->image[k], ((const unsigned char *)gi->data)[k], y->mask[k], ((const unsigned char *)gm->data)[k]);
                    break;
                }
            }
        }
    }
    MSX_CHECK(bad_meta == 0, "%s: %d slices with a different case/channel/z/size/box", gold_task, bad_meta);
    MSX_CHECK(bad_px == 0, "%s: %d slices with a pixel different from expected.safetensors", gold_task, bad_px);
}

static void test_golden(const msx_checkpoint *g, const msx__json *exp) {
    const msx__json *tasks = msx__json_get(exp, "tasks");
    int k;
    MSX_CHECK(tasks && tasks->n == 2, "expected.json tasks");
    for (k = 0; tasks && k < tasks->n; k++) {
        msx_nnunet_task *t = NULL;
        MSX_CHECK_OK(msx_nnunet_task_load(ROOT, TABLE, tasks->keys[k], NULL, NULL, NULL, &t));
        if (t) check_task(t, &tasks->kids[k], g, tasks->keys[k], NULL);
        msx_nnunet_task_free(t);
    }
}

/* --max-slices: a seeded subset, every case represented, reference order. */
static void test_max_slices(void) {
    msx_nnunet_task *all = NULL, *a = NULL, *b = NULL, *c = NULL, *big = NULL;
    msx_nnunet_options o;
    int s, i, j, bad = 0, same = 1;
    memset(&o, 0, sizeof o);
    MSX_CHECK_OK(msx_nnunet_task_load(ROOT, TABLE, "tumor_mr", NULL, NULL, NULL, &all));
    o.max_slices = 5;
    o.seed = 7;
    MSX_CHECK_OK(msx_nnunet_task_load(ROOT, TABLE, "tumor_mr", &o, NULL, NULL, &a));
    MSX_CHECK_OK(msx_nnunet_task_load(ROOT, TABLE, "tumor_mr", &o, NULL, NULL, &b));
    o.seed = 8;
    MSX_CHECK_OK(msx_nnunet_task_load(ROOT, TABLE, "tumor_mr", &o, NULL, NULL, &c));
    o.max_slices = 1000;
    MSX_CHECK_OK(msx_nnunet_task_load(ROOT, TABLE, "tumor_mr", &o, NULL, NULL, &big));
    if (!all || !a || !b || !c || !big) goto done;
    for (s = 0; s < 2; s++) {
        int last = -1, units[16] = {0}, nu = 0;
        MSX_CHECK(a->n[s] == 5 && b->n[s] == 5, "split %d: %d slices, want 5", s, a->n[s]);
        MSX_CHECK(big->n[s] == all->n[s], "split %d: max-slices above the total keeps all (%d of %d)", s, big->n[s], all->n[s]);
        for (i = 0; i < a->n[s]; i++) {
            int pos = -1;
            for (j = 0; j < all->n[s]; j++)
                if (!strcmp(all->slices[s][j].name, a->slices[s][i].name)) pos = j;
            bad += pos <= last; /* a subset, in the reference's order */
            last = pos;
            same &= !strcmp(a->slices[s][i].name, c->slices[s][i].name);
            MSX_CHECK(!strcmp(a->slices[s][i].name, b->slices[s][i].name), "same seed, same subset");
            for (j = 0; j < nu; j++) /* distinct (entry, case) pairs */
                if (a->slices[s][units[j]].entry == a->slices[s][i].entry && !strcmp(a->slices[s][units[j]].case_id, a->slices[s][i].case_id)) break;
            if (j == nu && nu < 16) units[nu++] = i;
        }
        /* calib: 2 (entry, case) units, test: 12; 5 slices reach min(5, units) of them */
        MSX_CHECK(nu == (s ? 5 : 2), "split %d: %d cases represented", s, nu);
    }
    MSX_CHECK(bad == 0, "subset out of the reference's order");
    MSX_CHECK(!same, "another seed, another subset");
done:
    msx_nnunet_task_free(all);
    msx_nnunet_task_free(a);
    msx_nnunet_task_free(b);
    msx_nnunet_task_free(c);
    msx_nnunet_task_free(big);
}

/* Two pooled datasets with the same case names: their file names carry the
   dataset; a third dataset's do not. */
static void test_prefix(void) {
    char src[1200], cwd[1024];
    msx_nnunet_task *t = NULL;
    int i, ok = 1, n_pre = 0, n_plain = 0;
    if (!getcwd(cwd, sizeof cwd)) { MSX_CHECK(0, "getcwd"); return; }
    mkdir(tmp_path("pool"), 0755);
    snprintf(src, sizeof src, "%s/" ROOT "/Dataset990_ToyMR", cwd);
    MSX_CHECK(symlink(src, tmp_path("pool/Dataset990_ToyMR")) == 0, "symlink");
    MSX_CHECK(symlink(src, tmp_path("pool/Dataset993_Copy")) == 0, "symlink");
    snprintf(src, sizeof src, "%s/" ROOT "/Dataset991_ToyCT", cwd);
    MSX_CHECK(symlink(src, tmp_path("pool/Dataset991_ToyCT")) == 0, "symlink");
    write_text(tmp_path("pool/t.json"), "{\"format\": \"medsamix-nnunet-tasks-v1\", \"tasks\": {\"pooled\": ["
               "{\"dataset\": \"Dataset990_ToyMR\", \"channel\": 0, \"foreground\": [1, 2, 3]},"
               "{\"dataset\": \"Dataset993_Copy\", \"channel\": 0, \"foreground\": [1, 2, 3]},"
               "{\"dataset\": \"Dataset991_ToyCT\", \"channel\": 0, \"foreground\": [2]}]}}");
    MSX_CHECK_OK(msx_nnunet_task_load(tmp_path("pool"), tmp_path("pool/t.json"), "pooled", NULL, NULL, NULL, &t));
    for (i = 0; t && i < t->n[1]; i++) {
        const msx_nnunet_slice *sl = &t->slices[1][i];
        char want[256];
        int pre = strcmp(sl->dataset, "Dataset991_ToyCT") != 0;
        snprintf(want, sizeof want, "%s%s%s_c%d_z%d", pre ? sl->dataset : "", pre ? "_" : "", sl->case_id, sl->channel, sl->z);
        ok &= !strcmp(sl->name, want);
        n_pre += pre;
        n_plain += !pre;
    }
    MSX_CHECK(t && ok && n_pre == 2 * 29 && n_plain == 6, "pooled names: ok %d, %d prefixed, %d plain", ok, n_pre, n_plain);
    if (t) MSX_CHECK_OK(msx_nnunet_task_write(t, tmp_path("pool_out")));
    msx_nnunet_task_free(t);
}

/* prepare's folders: PNG pixels = the golden slices, slices.json boxes =
   expected.json boxes = the boxes the ordinary task loader computes. */
static void test_prepare_folder(const msx_checkpoint *g, const msx__json *exp) {
    static const char *const sn[2] = {"calib", "test"};
    const msx__json *tasks = msx__json_get(exp, "tasks");
    int k, s, i, bad = 0, bad_box = 0, bad_json = 0;
    MSX_CHECK_OK(mkdir(tmp_path("prep"), 0755) == 0 ? MSX_OK : MSX_E_IO);
    for (k = 0; tasks && k < tasks->n; k++) {
        msx_nnunet_task *t = NULL;
        msx_task *ft = NULL;
        msx__json *sj;
        char dir[1024], p[1200];
        snprintf(dir, sizeof dir, "%s/prep/%s", tmp_root, tasks->keys[k]);
        MSX_CHECK_OK(msx_nnunet_task_load(ROOT, TABLE, tasks->keys[k], NULL, NULL, NULL, &t));
        if (!t) continue;
        MSX_CHECK_OK(msx_nnunet_task_write(t, dir));
        /* written twice: the second run finds its own files */
        MSX_CHECK_OK(msx_nnunet_task_write(t, dir));
        snprintf(p, sizeof p, "%s/slices.json", dir);
        sj = read_json(p);
        MSX_CHECK(sj && !strcmp(msx__json_str(sj, "format"), "medsamix-slices-v1"), "slices.json format");
        for (s = 0; sj && s < 2; s++) {
            const msx__json *arr = msx__json_get(sj, sn[s]);
            const msx__json *ex = msx__json_get(msx__json_get(&tasks->kids[k], sn[s]), "slices");
            MSX_CHECK(arr && ex && arr->n == ex->n, "slices.json %s count", sn[s]);
            for (i = 0; arr && ex && i < arr->n && i < ex->n; i++) {
                const msx__json *a = &arr->kids[i], *e = &ex->kids[i];
                const msx__json *ab = msx__json_get(a, "box"), *eb = msx__json_get(e, "box");
                msx_image img;
                msx_mask m;
                const msx_tensor *gi = gold_tensor(g, tasks->keys[k], sn[s], i, "image"), *gm = gold_tensor(g, tasks->keys[k], sn[s], i, "mask");
                int q, ok = 1;
                double z0 = -1, z1 = -2;
                memset(&img, 0, sizeof img);
                memset(&m, 0, sizeof m);
                msx__json_num(a, "z", &z0, -1);
                msx__json_num(e, "z", &z1, -1);
                ok = z0 == z1 && !strcmp(msx__json_str(a, "case"), msx__json_str(e, "case")) && !strcmp(msx__json_str(a, "dataset"), msx__json_str(e, "dataset"));
                for (q = 0; q < 4; q++) ok = ok && ab->kids[q].num == eb->kids[q].num;
                bad_json += !ok;
                snprintf(p, sizeof p, "%s/%s", dir, msx__json_str(a, "image"));
                if (msx_image_load(p, &img) != MSX_OK) { bad++; continue; }
                snprintf(p, sizeof p, "%s/%s", dir, msx__json_str(a, "mask"));
                if (msx_mask_load(p, NULL, &m) != MSX_OK || !gi || !gm || gi->numel != (int64_t)img.w * img.h) { bad++; msx_image_free(&img); continue; }
                for (q = 0; q < (int)gi->numel; q++)
                    if (img.data[3 * q] != ((const unsigned char *)gi->data)[q] || m.data[q] != ((const unsigned char *)gm->data)[q]) { bad++; break; }
                msx_image_free(&img);
                msx_mask_free(&m);
            }
        }
        /* the ordinary task loader on the folder: same boxes as slices.json */
        MSX_CHECK_OK(msx_task_open(dir, NULL, &ft));
        for (s = 0; ft && sj && s < 2; s++) {
            const msx__json *arr = msx__json_get(sj, sn[s]);
            MSX_CHECK(msx_task_count(ft, s) == arr->n, "task folder %s count", sn[s]);
            for (i = 0; i < msx_task_count(ft, s); i++) {
                const char *ip = msx_task_image(ft, s, i);
                float b[4];
                int q, found = 0;
                msx_task_box(ft, s, i, b);
                for (q = 0; q < arr->n && !found; q++) {
                    const char *rel = msx__json_str(&arr->kids[q], "image");
                    size_t lr = strlen(rel), li = strlen(ip);
                    if (li >= lr && !strcmp(ip + li - lr, rel)) {
                        const msx__json *bx = msx__json_get(&arr->kids[q], "box");
                        int c;
                        found = 1;
                        for (c = 0; c < 4; c++) bad_box += (double)b[c] != bx->kids[c].num;
                    }
                }
                bad_box += !found;
            }
        }
        msx_task_free(ft);
        msx__json_free(sj);
        msx_nnunet_task_free(t);
    }
    MSX_CHECK(bad == 0, "%d prepared PNG pairs differ from expected.safetensors", bad);
    MSX_CHECK(bad_json == 0, "%d slices.json entries differ from expected.json", bad_json);
    MSX_CHECK(bad_box == 0, "%d task-loader boxes differ from slices.json", bad_box);
}

/* ---- search/eval on --nnunet = on the prepared folders; segment --volume ------ */

static void test_eval_same(void) {
    msx_checkpoint *ck = NULL;
    msx_sam_arch arch;
    msx_task *tf[2] = {NULL, NULL}, *tn[2] = {NULL, NULL};
    static const char *const names[2] = {"tumor_mr", "ct_kidney"};
    double df[2], dn[2];
    int k, s;
    char dir[1024];
    if (msx_sam_load("examples/demo/models/base.pth", "examples/demo/models/config.json", &ck, &arch) != MSX_OK) {
        MSX_CHECK(0, "demo model: %s", msx_last_error());
        return;
    }
    for (k = 0; k < 2; k++) {
        snprintf(dir, sizeof dir, "%s/prep/%s", tmp_root, names[k]);
        MSX_CHECK_OK(msx_task_open(dir, NULL, &tf[k]));
        MSX_CHECK_OK(msx_task_open_nnunet(ROOT, TABLE, names[k], NULL, &tn[k]));
    }
    for (s = 0; tf[0] && tf[1] && tn[0] && tn[1] && s < 2; s++) {
        MSX_CHECK_OK(msx_eval_checkpoint(ck, &arch, tf, 2, s, MSX_PREPROCESS_SAM, 1, df));
        MSX_CHECK_OK(msx_eval_checkpoint(ck, &arch, tn, 2, s, MSX_PREPROCESS_SAM, 1, dn));
        for (k = 0; k < 2; k++)
            MSX_CHECK(df[k] == dn[k] && df[k] > 0.3, "%s split %d: folder Dice %.17g, --nnunet Dice %.17g", names[k], s, df[k], dn[k]);
    }
    for (k = 0; k < 2; k++) { msx_task_free(tf[k]); msx_task_free(tn[k]); }
    msx_ckpt_free(ck);
}

/* A short search on --nnunet tasks: the same calib Dice per trial as on the
   prepared folders. */
static void test_search_same(void) {
    const char *models[1] = {"examples/demo/models/spec_ct.pth"};
    const char *tn[1] = {"ct_kidney"}, *tf[1];
    msx_search_options o;
    msx_search_summary sf, sn;
    char dir[1024];
    msx_result r1, r2;
    snprintf(dir, sizeof dir, "%s/prep/ct_kidney", tmp_root);
    tf[0] = dir;
    memset(&o, 0, sizeof o);
    o.base = "examples/demo/models/base.pth";
    o.models = models;
    o.n_models = 1;
    o.arch_config = "examples/demo/models/config.json";
    o.n_trials = 4;
    o.jobs = 1;
    o.threads = 1;
    o.progress = -1;
    o.no_report = 1;
    o.n_overlays = -1;
    o.tasks = tf;
    o.n_tasks = 1;
    o.out_dir = tmp_path("run_folder");
    r1 = msx_search_run(&o, &sf);
    MSX_CHECK(r1 == MSX_OK, "search on the folder: %s", msx_last_error());
    o.tasks = tn;
    o.nnunet_root = ROOT;
    o.nnunet_table = TABLE;
    o.out_dir = tmp_path("run_nnunet");
    r2 = msx_search_run(&o, &sn);
    MSX_CHECK(r2 == MSX_OK, "search --nnunet: %s", msx_last_error());
    if (r1 == MSX_OK && r2 == MSX_OK) { /* every logged trial: the same Dice */
        void *b1, *b2;
        size_t l1, l2;
        int same = 0, n = 0;
        if (msx_read_file(tmp_path("run_folder/trials.jsonl"), 0, &b1, &l1) == MSX_OK) {
            if (msx_read_file(tmp_path("run_nnunet/trials.jsonl"), 0, &b2, &l2) == MSX_OK) {
                const char *p1 = (const char *)b1, *p2 = (const char *)b2;
                const char *e1 = strchr(p1, '\n'), *e2 = strchr(p2, '\n'); /* skip the headers */
                while (e1 && e2) {
                    msx__json *j1, *j2;
                    p1 = e1 + 1;
                    p2 = e2 + 1;
                    if (!(e1 = strchr(p1, '\n')) || !(e2 = strchr(p2, '\n'))) break;
                    j1 = msx__json_parse(p1, (size_t)(e1 - p1), "trials");
                    j2 = msx__json_parse(p2, (size_t)(e2 - p2), "trials");
                    if (j1 && j2) {
                        double d1 = -1, d2 = -2;
                        msx__json_num(msx__json_get(j1, "dice"), "ct_kidney", &d1, -1);
                        msx__json_num(msx__json_get(j2, "dice"), "ct_kidney", &d2, -2);
                        same += d1 == d2 && d1 > 0;
                        n++;
                    }
                    msx__json_free(j1);
                    msx__json_free(j2);
                }
                msx_free(b2);
            }
            msx_free(b1);
        }
        MSX_CHECK(n == 4 && same == 4, "search trials: %d of %d with the same calib Dice", same, n);
    }
    if (r1 == MSX_OK && r2 == MSX_OK)
        MSX_CHECK(sf.n_trials_done == 4 && sn.n_trials_done == 4 && sf.best_trial == sn.best_trial && sf.best_calib[0] == sn.best_calib[0],
                  "search: folder best trial %d Dice %.17g, --nnunet best trial %d Dice %.17g", sf.best_trial, sf.best_calib[0],
                  sn.best_trial, sn.best_calib[0]);
}

/* The CLI: segment --volume's slices = segment on the prepared PNGs. */
static void test_segment_volume_cli(void) {
    char cmd[4096];
    const char *img = ROOT "/Dataset990_ToyMR/imagesTr/toy_000_0001.nii.gz", *lbl = ROOT "/Dataset990_ToyMR/labelsTr/toy_000.nii.gz";
    const char *model = "--model examples/demo/models/base.pth --config examples/demo/models/config.json --threads 1";
    msx__json *sj;
    msx_volume pred;
    int i, bad = 0, n = 0;
    if (access(bin_path, X_OK) != 0) {
        printf("test_nifti: skipping the CLI checks: %s not built\n", bin_path);
        return;
    }
    memset(&pred, 0, sizeof pred);
    snprintf(cmd, sizeof cmd, "%s segment %s --volume %s --label %s --foreground 1,2,3 --out %s > %s 2>&1", bin_path, model, img, lbl,
             tmp_path("pred.nii.gz"), tmp_path("seg.log"));
    MSX_CHECK(system(cmd) == 0, "%s", cmd);
    MSX_CHECK_OK(msx_volume_load(tmp_path("pred.nii.gz"), &pred));
    MSX_CHECK(pred.datatype == 2 && pred.nx == 48 && pred.ny == 40 && pred.nz == 10, "prediction header: dt %d %dx%dx%d", pred.datatype, pred.nx, pred.ny, pred.nz);
    sj = read_json(tmp_path("prep/tumor_mr/slices.json"));
    for (i = 0; sj && pred.data && i < msx__json_get(sj, "calib")->n; i++) {
        const msx__json *x = &msx__json_get(sj, "calib")->kids[i], *b = msx__json_get(x, "box");
        double ch = -1, z = -1;
        msx_mask m;
        int r, c;
        memset(&m, 0, sizeof m);
        msx__json_num(x, "channel", &ch, -1);
        msx__json_num(x, "z", &z, -1);
        if (ch != 1) continue;
        snprintf(cmd, sizeof cmd, "%s segment %s --image %s/prep/tumor_mr/%s --box %g,%g,%g,%g --out %s >> %s 2>&1", bin_path, model, tmp_root,
                 msx__json_str(x, "image"), b->kids[0].num, b->kids[1].num, b->kids[2].num, b->kids[3].num, tmp_path("m.png"), tmp_path("seg.log"));
        if (system(cmd) != 0 || msx_mask_load(tmp_path("m.png"), NULL, &m) != MSX_OK) { bad++; continue; }
        for (r = 0; r < m.h; r++)
            for (c = 0; c < m.w; c++)
                bad += (pred.data[(size_t)r + (size_t)48 * ((size_t)c + 40 * (size_t)z)] != 0) != (m.data[r * m.w + c] != 0);
        n++;
        msx_mask_free(&m);
    }
    MSX_CHECK(n == 8 && bad == 0, "segment --volume vs segment on %d slice PNGs: %d pixels differ", n, bad);
    {   /* --boxes with the same boxes gives the same volume */
        msx__sb bj = {NULL, 0, 0, 0};
        msx_volume p2;
        size_t q;
        int first = 1;
        memset(&p2, 0, sizeof p2);
        msx__sb_puts(&bj, "{\"format\": \"medsamix-boxes-v1\", \"boxes\": [");
        for (i = 0; sj && i < msx__json_get(sj, "calib")->n; i++) {
            const msx__json *x = &msx__json_get(sj, "calib")->kids[i], *b = msx__json_get(x, "box");
            double ch = -1, z = -1;
            msx__json_num(x, "channel", &ch, -1);
            msx__json_num(x, "z", &z, -1);
            if (ch != 1) continue;
            msx__sb_printf(&bj, "%s{\"z\": %d, \"box\": [%g, %g, %g, %g]}", first ? "" : ", ", (int)z, b->kids[0].num, b->kids[1].num,
                           b->kids[2].num, b->kids[3].num);
            first = 0;
        }
        msx__sb_puts(&bj, "]}");
        write_text(tmp_path("boxes.json"), bj.s);
        msx__sb_free(&bj);
        snprintf(cmd, sizeof cmd, "%s segment %s --volume %s --boxes %s --out %s >> %s 2>&1", bin_path, model, img, tmp_path("boxes.json"),
                 tmp_path("pred_boxes.nii"), tmp_path("seg.log"));
        MSX_CHECK(system(cmd) == 0, "%s", cmd);
        MSX_CHECK_OK(msx_volume_load(tmp_path("pred_boxes.nii"), &p2));
        for (q = 0, bad = 0; p2.data && pred.data && q < (size_t)48 * 40 * 10; q++) bad += p2.data[q] != pred.data[q];
        MSX_CHECK(p2.data && pred.data && bad == 0, "segment --volume --boxes differs from --label in %d voxels", bad);
        msx_volume_free(&p2);
    }
    msx__json_free(sj);
    msx_volume_free(&pred);
    /* errors before long work */
    snprintf(cmd, sizeof cmd, "%s segment %s --volume %s --label %s --out %s > %s 2>&1", bin_path, model, img, lbl, tmp_path("x.nii.gz"), tmp_path("e.log"));
    MSX_CHECK(system(cmd) != 0, "segment --volume --label without --foreground must fail");
}

/* ---- NIfTI-2, oblique affine, other label values, .nii ending --------------- */

static void test_nifti2_oblique(const msx_checkpoint *g, const msx__json *exp) {
    /* Dataset990 re-written as NIfTI-2 float64 .nii with an oblique affine
       and labels 1,2,3 -> 11,12,13: the pipeline must give the same slices */
    static const double aff[4][4] = {{0.9, -0.3, 0.1, -20}, {0.3, 0.95, 0.05, 7.5}, {-0.1, 0.0, 2.5, 3}, {0, 0, 0, 1}};
    const char *cases[] = {"toy_000", "toy_001", "toy_002", "toy_003", "toy_004", "toy_005", "toy_006"};
    const msx__json *tasks = msx__json_get(exp, "tasks");
    msx_nnunet_task *t = NULL;
    char p[1024];
    int c, ch, i, k;
    mkdir(tmp_path("nn2"), 0755);
    mkdir(tmp_path("nn2/Dataset992_Oblique"), 0755);
    mkdir(tmp_path("nn2/Dataset992_Oblique/imagesTr"), 0755);
    mkdir(tmp_path("nn2/Dataset992_Oblique/labelsTr"), 0755);
    write_text(tmp_path("nn2/Dataset992_Oblique/dataset.json"), "{\"file_ending\": \".nii\", \"channel_names\": {\"0\": \"T1\", \"1\": \"T2\"}}");
    write_text(tmp_path("nn2/tasks.json"), "{\"format\": \"medsamix-nnunet-tasks-v1\", \"tasks\": {\"tumor_mr\": ["
               "{\"dataset\": \"Dataset992_Oblique\", \"channel\": 0, \"foreground\": [13, 11, 12]},"
               "{\"dataset\": \"Dataset992_Oblique\", \"channel\": 1, \"foreground\": [11, 12, 13]}]}}");
    for (c = 0; c < 7; c++) {
        for (ch = 0; ch < 3; ch++) {
            msx_volume v, o;
            int lab = ch == 2;
            memset(&v, 0, sizeof v);
            memset(&o, 0, sizeof o);
            if (lab) snprintf(p, sizeof p, ROOT "/Dataset990_ToyMR/labelsTr/%s.nii.gz", cases[c]);
            else snprintf(p, sizeof p, ROOT "/Dataset990_ToyMR/imagesTr/%s_%04d.nii.gz", cases[c], ch);
            if (msx_volume_load(p, &v) != MSX_OK) { MSX_CHECK(0, "%s", msx_last_error()); continue; }
            MSX_CHECK_OK(msx_volume_create(v.nx, v.ny, v.nz, aff, 2, &o));
            for (i = 0; i < v.nx * v.ny * v.nz; i++) {
                double x = v.data[i];
                if (lab) { x = nearbyint(x); x = x > 0 ? x + 10 : 0; }
                o.data[i] = x;
            }
            if (lab) snprintf(p, sizeof p, "%s/nn2/Dataset992_Oblique/labelsTr/%s.nii", tmp_root, cases[c]);
            else snprintf(p, sizeof p, "%s/nn2/Dataset992_Oblique/imagesTr/%s_%04d.nii", tmp_root, cases[c], ch);
            MSX_CHECK_OK(msx_volume_save(p, &o, lab ? MSX_I16 : MSX_F64));
            msx_volume_free(&v);
            msx_volume_free(&o);
        }
    }
    {   /* what was written reads back as NIfTI-2 with the oblique sform */
        msx_volume v;
        double err = 0;
        int a, b;
        memset(&v, 0, sizeof v);
        snprintf(p, sizeof p, "%s/nn2/Dataset992_Oblique/imagesTr/toy_002_0001.nii", tmp_root);
        MSX_CHECK_OK(msx_volume_load(p, &v));
        for (a = 0; a < 4; a++)
            for (b = 0; b < 4; b++) err = fmax(err, fabs(v.affine[a][b] - aff[a][b]));
        MSX_CHECK(v.nifti_version == 2 && v.datatype == 64 && err < 1e-6, "NIfTI-2 read back: version %d dt %d affine error %g", v.nifti_version, v.datatype, err);
        msx_volume_free(&v);
    }
    snprintf(p, sizeof p, "%s/nn2", tmp_root);
    MSX_CHECK_OK(msx_nnunet_task_load(p, tmp_path("nn2/tasks.json"), "tumor_mr", NULL, NULL, NULL, &t));
    for (k = 0; t && tasks && k < tasks->n; k++)
        if (!strcmp(tasks->keys[k], "tumor_mr")) check_task(t, &tasks->kids[k], g, "tumor_mr", "Dataset992_Oblique");
    msx_nnunet_task_free(t);
}

/* ---- bad input: clear errors before long work ------------------------------------ */

static void expect_fail(const char *root, const char *table, const char *task, msx_result code, const char *words) {
    msx_nnunet_task *t = NULL;
    msx_result r = msx_nnunet_task_load(root, table, task, NULL, NULL, NULL, &t);
    MSX_CHECK(r == code && strstr(msx_last_error(), words), "%s: got %s '%s', want %s with '%s'", task, msx_result_str(r), msx_last_error(),
              msx_result_str(code), words);
    msx_nnunet_task_free(t);
}

static void test_bad_input(void) {
    char root[1024];
    msx_volume a, b;
    memset(&a, 0, sizeof a);
    memset(&b, 0, sizeof b);
    snprintf(root, sizeof root, "%s/bad", tmp_root);
    mkdir(root, 0755);
    mkdir(tmp_path("bad/DatasetNoJson"), 0755);
    mkdir(tmp_path("bad/DatasetNoJson/imagesTr"), 0755);
    mkdir(tmp_path("bad/DatasetShape"), 0755);
    mkdir(tmp_path("bad/DatasetShape/imagesTr"), 0755);
    mkdir(tmp_path("bad/DatasetShape/labelsTr"), 0755);
    write_text(tmp_path("bad/DatasetShape/dataset.json"), "{\"file_ending\": \".nii.gz\"}");
    MSX_CHECK_OK(msx_volume_create(8, 8, 4, NULL, 1, &a));
    MSX_CHECK_OK(msx_volume_create(8, 8, 5, NULL, 1, &b));
    a.data[3] = 1;
    MSX_CHECK_OK(msx_volume_save(tmp_path("bad/DatasetShape/imagesTr/c1_0000.nii.gz"), &a, MSX_I16));
    MSX_CHECK_OK(msx_volume_save(tmp_path("bad/DatasetShape/labelsTr/c1.nii.gz"), &b, MSX_U8));
    MSX_CHECK_OK(msx_volume_save(tmp_path("bad/DatasetShape/imagesTr/c2_0000.nii.gz"), &a, MSX_I16));
    MSX_CHECK_OK(msx_volume_save(tmp_path("bad/DatasetShape/labelsTr/c2.nii.gz"), &a, MSX_U8));
    write_text(tmp_path("bad/t.json"),
               "{\"format\": \"medsamix-nnunet-tasks-v1\", \"tasks\": {"
               "\"nojson\": [{\"dataset\": \"DatasetNoJson\", \"channel\": 0, \"foreground\": [1]}],"
               "\"shape\": [{\"dataset\": \"DatasetShape\", \"channel\": 0, \"foreground\": [1]}],"
               "\"unknown\": [{\"dataset\": \"Dataset404_Missing\", \"channel\": 0, \"foreground\": [1]}],"
               "\"nofg\": [{\"dataset\": \"DatasetShape\", \"channel\": 0, \"foreground\": []}],"
               "\"nochannel\": [{\"dataset\": \"DatasetShape\", \"channel\": 1, \"foreground\": [1]}]}}");
    expect_fail(root, tmp_path("bad/t.json"), "nojson", MSX_E_ARG, "without dataset.json");
    expect_fail(root, tmp_path("bad/t.json"), "shape", MSX_E_SHAPE, "must share the grid");
    expect_fail(root, tmp_path("bad/t.json"), "unknown", MSX_E_ARG, "unknown dataset 'Dataset404_Missing'");
    expect_fail(root, tmp_path("bad/t.json"), "nofg", MSX_E_ARG, "empty foreground set");
    expect_fail(root, tmp_path("bad/t.json"), "nochannel", MSX_E_ARG, "channel 1 is missing for case c1");
    expect_fail(root, tmp_path("bad/t.json"), "absent", MSX_E_ARG, "no task 'absent'");
    mkdir(tmp_path("bad/DatasetMha"), 0755);
    mkdir(tmp_path("bad/DatasetMha/imagesTr"), 0755);
    write_text(tmp_path("bad/DatasetMha/dataset.json"), "{\"file_ending\": \".mha\"}");
    write_text(tmp_path("bad/t2.json"), "{\"format\": \"medsamix-nnunet-tasks-v1\", \"tasks\": {\"mha\": [{\"dataset\": \"DatasetMha\", \"channel\": 0, \"foreground\": [1]}]}}");
    expect_fail(root, tmp_path("bad/t2.json"), "mha", MSX_E_UNSUPPORTED, "\".mha\"");
    expect_fail(ROOT, GOLD "/expected.json", "tumor_mr", MSX_E_FORMAT, "medsamix-nnunet-tasks-v1");
    msx_volume_free(&a);
    msx_volume_free(&b);
}

/* ---- bad NIfTI files --------------------------------------------------------------- */

static void write_bytes(const char *path, const void *p, size_t n) { MSX_CHECK_OK(msx_write_file_atomic(path, p, n)); }

static void expect_bad_file(const char *path, msx_result code, const char *words) {
    msx_volume v;
    msx_result r;
    memset(&v, 0, sizeof v);
    r = msx_volume_load(path, &v);
    MSX_CHECK(r == code && strstr(msx_last_error(), words), "%s: got %s '%s', want %s with '%s'", path, msx_result_str(r), msx_last_error(),
              msx_result_str(code), words);
    MSX_CHECK(v.data == NULL, "failed load leaves an empty volume");
    msx_volume_free(&v);
}

static void test_bad_files(void) {
    void *buf;
    size_t len;
    unsigned char *b;
    int16_t d;
    msx_volume v, big;
    memset(&v, 0, sizeof v);
    memset(&big, 0, sizeof big);
    if (msx_read_file(ROOT "/Dataset991_ToyCT/imagesTr/ct_a_0000.nii", 0, &buf, &len) != MSX_OK) { MSX_CHECK(0, "fixture"); return; }
    b = (unsigned char *)buf;
    write_bytes(tmp_path("trunc_hdr.nii"), b, 200);
    expect_bad_file(tmp_path("trunc_hdr.nii"), MSX_E_FORMAT, "not a NIfTI-1/2 file");
    write_bytes(tmp_path("trunc_data.nii"), b, len - 100);
    expect_bad_file(tmp_path("trunc_data.nii"), MSX_E_FORMAT, "truncated");
    write_bytes(tmp_path("empty.nii"), b, 0);
    expect_bad_file(tmp_path("empty.nii"), MSX_E_FORMAT, "not a NIfTI-1/2 file");
    memcpy(b + 344, "xyz\0", 4); /* magic */
    write_bytes(tmp_path("magic.nii"), b, len);
    expect_bad_file(tmp_path("magic.nii"), MSX_E_FORMAT, "magic");
    memcpy(b + 344, "n+1\0", 4);
    d = 32767; /* 32767^3 x 2 bytes: far beyond MSX_MAX_VOLUME_BYTES, refused from the header */
    memcpy(b + 42, &d, 2);
    memcpy(b + 44, &d, 2);
    memcpy(b + 46, &d, 2);
    write_bytes(tmp_path("huge.nii"), b, len);
    expect_bad_file(tmp_path("huge.nii"), MSX_E_LIMIT, "MSX_MAX_VOLUME_BYTES");
    d = -5;
    memcpy(b + 42, &d, 2);
    write_bytes(tmp_path("negdim.nii"), b, len);
    expect_bad_file(tmp_path("negdim.nii"), MSX_E_FORMAT, "dim[1]");
    msx_free(buf);
    expect_bad_file(tmp_path("absent.nii.gz"), MSX_E_IO, "cannot open");
    expect_bad_file(GOLD "/tasks.json", MSX_E_UNSUPPORTED, "only .nii and .nii.gz");
    /* a gzip bomb: 1 GiB of zeros behind a 2 GiB+ header, a few MB on disk;
       refused before decompressing a byte of voxel data */
    MSX_CHECK_OK(msx_volume_create(4, 4, 4, NULL, 2, &big));
    if (big.hdr) {
        nifti_image *nim = (nifti_image *)big.hdr;
        unsigned char *hdr = (unsigned char *)calloc(1, 544), *gz = NULL;
        size_t gn = 0;
        nifti_2_header h2;
        nim->nx = nim->ny = nim->dim[1] = nim->dim[2] = 2048;
        nim->nz = nim->dim[3] = 513;
        nim->datatype = DT_UINT8;
        nim->nbyper = 1;
        nim->nvox = (int64_t)2048 * 2048 * 513;
        nim->iname_offset = 544;
        nim->nifti_type = NIFTI_FTYPE_NIFTI2_1;
        MSX_CHECK(nifti_convert_nim2n2hdr(nim, &h2) == 0, "n2 header");
        memcpy(hdr, &h2, sizeof h2);
        MSX_CHECK_OK(msx__vol_gzip("bomb", hdr, 544, &gz, &gn));
        write_bytes(tmp_path("bomb.nii.gz"), gz, gn);
        free(hdr);
        MSX_FREE(gz);
        expect_bad_file(tmp_path("bomb.nii.gz"), MSX_E_LIMIT, "MSX_MAX_VOLUME_BYTES");
    }
    msx_volume_free(&big);
}

/* ---- write / read round trips ------------------------------------------------------ */

static void test_roundtrip(void) {
    static const msx_dtype dts[5] = {MSX_U8, MSX_I16, MSX_I32, MSX_F32, MSX_F64};
    static const int codes[5] = {2, 4, 8, 16, 64};
    int k, ver, gz, i, bad;
    char name[256];
    for (k = 0; k < 5; k++)
        for (ver = 1; ver <= 2; ver++)
            for (gz = 0; gz < 2; gz++) {
                msx_volume v, w;
                memset(&v, 0, sizeof v);
                memset(&w, 0, sizeof w);
                MSX_CHECK_OK(msx_volume_create(5, 3, 2, NULL, ver, &v));
                for (i = 0; i < 30; i++) v.data[i] = k < 3 ? (double)((i * 7) % 31) : (double)(float)(i * 0.37 - 4);
                snprintf(name, sizeof name, "rt_%d_%d.nii%s", k, ver, gz ? ".gz" : "");
                MSX_CHECK_OK(msx_volume_save(tmp_path(name), &v, dts[k]));
                MSX_CHECK_OK(msx_volume_load(tmp_path(name), &w));
                for (i = bad = 0; w.data && i < 30; i++) bad += w.data[i] != v.data[i];
                MSX_CHECK(w.data && bad == 0 && w.datatype == codes[k] && w.nifti_version == ver && w.nx == 5 && w.ny == 3 && w.nz == 2,
                          "%s: %d values differ, datatype %d, version %d", name, bad, w.datatype, w.nifti_version);
                msx_volume_free(&v);
                msx_volume_free(&w);
            }
    {   /* out-of-range values are refused, not wrapped */
        msx_volume v;
        memset(&v, 0, sizeof v);
        MSX_CHECK_OK(msx_volume_create(2, 2, 2, NULL, 1, &v));
        v.data[5] = 256;
        MSX_CHECK(msx_volume_save(tmp_path("x.nii"), &v, MSX_U8) == MSX_E_ARG, "256 as uint8 must fail");
        MSX_CHECK(msx_volume_save(tmp_path("x.nrrd"), &v, MSX_F32) == MSX_E_ARG, ".nrrd must fail");
        msx_volume_free(&v);
    }
}

/* ---- files nibabel wrote (the fuzz seeds) and fuzz regressions ------------------------ */

static void test_nibabel_files(void) {
    msx_volume v;
    int i, j, k, bad = 0;
    memset(&v, 0, sizeof v);
    /* nibabel: Nifti1Image(int16 a = arange(24).reshape(4,3,2, order F)*3 - 7), slope 0.25, inter 5 */
    MSX_CHECK_OK(msx_volume_load("tests/fuzz/corpus/nifti/n1_i16_scaled.nii", &v));
    for (i = 0; v.data && i < 24; i++) bad += v.data[i] != (i * 3 - 7) * 0.25 + 5;
    MSX_CHECK(v.data && v.nx == 4 && v.ny == 3 && v.nz == 2 && v.datatype == 4 && v.nifti_version == 1 && bad == 0 &&
              v.affine[0][0] == 0.800000011920929 && v.affine[2][2] == 2, "nibabel NIfTI-1 int16 scaled: %d values differ", bad);
    msx_volume_free(&v);
    /* nibabel: Nifti2Image(linspace(-1, 1, 24).reshape(4,3,2) (C order), oblique affine) */
    MSX_CHECK_OK(msx_volume_load("tests/fuzz/corpus/nifti/n2_f64_oblique.nii", &v));
    for (bad = 0, i = 0; v.data && i < 4; i++)
        for (j = 0; j < 3; j++)
            for (k = 0; k < 2; k++) bad += v.data[i + 4 * (j + 3 * k)] != -1.0 + (i * 6 + j * 2 + k) * (2.0 / 23.0);
    MSX_CHECK(v.data && v.nifti_version == 2 && v.datatype == 64 && v.affine[0][1] == -0.3 && v.affine[1][3] == 7.5, "nibabel NIfTI-2: version %d", v.nifti_version);
    for (bad = 0, i = 0; v.data && i < 24; i++) bad += fabs(v.data[i % 4 + 4 * ((i / 4) % 3 + 3 * (i / 12))] - (-1.0 + ((i % 4) * 6 + ((i / 4) % 3) * 2 + i / 12) * (2.0 / 23.0))) > 1e-15;
    MSX_CHECK(bad == 0, "nibabel NIfTI-2: %d values off", bad);
    msx_volume_free(&v);
    {   /* fuzz regressions: the reader's contract holds on every saved input */
        DIR *d = opendir("tests/fuzz/regressions");
        struct dirent *e;
        int n = 0;
        while (d && (e = readdir(d)) != NULL) {
            char p[1024];
            void *buf;
            size_t len;
            if (strncmp(e->d_name, "nifti-", 6) != 0) continue;
            snprintf(p, sizeof p, "tests/fuzz/regressions/%s", e->d_name);
            if (msx_read_file(p, 0, &buf, &len) != MSX_OK) continue;
            MSX_CHECK(msx_fuzz_nifti((const unsigned char *)buf, len), "%s: reader contract violated (%s)", p, msx_last_error());
            msx_free(buf);
            n++;
        }
        if (d) closedir(d);
        (void)n;
    }
}

/* ---- nibabel reads what we write (optional: needs python3-nibabel) ------------------- */

static void test_nibabel(void) {
    char cmd[4096];
    msx_volume v, o;
    const char *py = access("/usr/bin/python3", X_OK) == 0 ? "/usr/bin/python3" : "python3";
    snprintf(cmd, sizeof cmd, "%s -c 'import nibabel' > /dev/null 2>&1", py);
    if (system(cmd) != 0) {
        printf("test_nifti: skipping the nibabel check: python3 with nibabel not found\n");
        return;
    }
    memset(&v, 0, sizeof v);
    memset(&o, 0, sizeof o);
    /* a NIfTI-1 .nii.gz input and the NIfTI-2 oblique .nii written above */
    {
        const char *ins[2] = {ROOT "/Dataset990_ToyMR/imagesTr/toy_002_0001.nii.gz", NULL};
        char in2[1024];
        int k;
        snprintf(in2, sizeof in2, "%s/nn2/Dataset992_Oblique/imagesTr/toy_001_0000.nii", tmp_root);
        ins[1] = in2;
        for (k = 0; k < 2; k++) {
            const char *out = k ? tmp_path("nib2.nii") : tmp_path("nib1.nii.gz");
            size_t i, n;
            MSX_CHECK_OK(msx_volume_load(ins[k], &v));
            MSX_CHECK_OK(msx_volume_like(&v, &o));
            n = (size_t)v.nx * v.ny * v.nz;
            for (i = 0; o.data && i < n; i++) o.data[i] = (double)(i % 3 == 0);
            MSX_CHECK_OK(msx_volume_save(out, &o, MSX_U8));
            snprintf(cmd, sizeof cmd,
                     "%s -c 'import nibabel as nib, numpy as np, sys\n"
                     "a = nib.load(\"%s\"); b = nib.load(\"%s\"); d = np.asarray(a.dataobj)\n"
                     "ok = a.shape == b.shape and np.array_equal(a.affine, b.affine) and d.dtype == np.uint8 and "
                     "np.array_equal(d.ravel(order=\"F\"), (np.arange(d.size) %% 3 == 0).astype(np.uint8)) and "
                     "all(f(a.header)[1] == f(b.header)[1] and (f(a.header)[1] == 0 or np.array_equal(f(a.header)[0], f(b.header)[0])) "
                     "for f in (lambda h: h.get_sform(coded=True), lambda h: h.get_qform(coded=True)))\n"
                     "sys.exit(0 if ok else 1)'",
                     py, out, ins[k]);
            MSX_CHECK(system(cmd) == 0, "nibabel: %s does not have the shape/affine/qform/sform of %s", out, ins[k]);
            msx_volume_free(&v);
            msx_volume_free(&o);
        }
    }
}

int main(int argc, char **argv) {
    msx_checkpoint *g = NULL;
    msx__json *exp = NULL;
    const char *tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    char cmd[1100];
    (void)argc;
    snprintf(tmp_root, sizeof tmp_root, "%s/msx_nifti_XXXXXX", tmp);
    if (!mkdtemp(tmp_root)) { fprintf(stderr, "mkdtemp failed\n"); return 1; }
    { /* build/tests/test_nifti -> build/medsamix */
        const char *s = strrchr(argv[0], '/');
        size_t n = s ? (size_t)(s - argv[0]) : 0;
        snprintf(bin_path, sizeof bin_path, "%.*s/../medsamix", (int)n, argv[0]);
        if (!s) snprintf(bin_path, sizeof bin_path, "../medsamix");
    }
    test_numpy_pieces();
    test_normalise_numpy();
    MSX_CHECK_OK(msx_safetensors_load(GOLD "/expected.safetensors", &g));
    exp = read_json(GOLD "/expected.json");
    MSX_CHECK(exp != NULL, "expected.json");
    if (g && exp) {
        test_golden(g, exp);
        test_max_slices();
        test_prefix();
        test_prepare_folder(g, exp);
        test_nifti2_oblique(g, exp);
    }
    test_eval_same();
    test_search_same();
    test_segment_volume_cli();
    test_bad_input();
    test_bad_files();
    test_roundtrip();
    test_nibabel_files();
    test_nibabel();
    msx__json_free(exp);
    msx_ckpt_free(g);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_root);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmp_root);
    return msx_test_summary("test_nifti");
}
