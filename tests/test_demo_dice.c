/* test_demo_dice: the whole segmentation path (image file -> preprocessing ->
   SAM encoder/decoder -> postprocessing -> Dice) against the reference.
   1. Golden tiny_a / tiny_b box cases: msx_segment_box from the original
      image and box gives the binary mask of the official predictor
      (masks_single > 0) except where |ref| < 1e-4.
   2. Demo world: base / spec_ct / spec_mri on the test split of all six
      tasks, prompted with the tight GT box; mean Dice x100 per model x task
      must equal examples/demo/baseline_dice.json within +-0.2 points.
   Needs the SAM network and the checkpoint loader. */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "test.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define DEMO "examples/demo"
#define N_TASKS 6
#define N_MODELS 3
static const char *const tasks[N_TASKS] = {"natural_shapes", "ct_organ", "mri_ring", "us_cyst", "fundus_disc",
                                           "mri_abdomen"};
static const char *const models[N_MODELS] = {"base", "spec_ct", "spec_mri"};

static void test_golden_segment(const char *cfgname) {
    char path[1200], cfg[1200], rel[64], key[64];
    msx_checkpoint *cases = NULL, *ck = NULL;
    msx_sam_arch arch;
    msx_sam_options so;
    msx_sam *m = NULL;
    msx_sam_ws *ws = NULL;
    msx_seg_ctx *ctx = NULL;
    int k;
    memset(&so, 0, sizeof so);
    snprintf(rel, sizeof rel, "golden/sam/%s/config.json", cfgname);
    snprintf(cfg, sizeof cfg, "%s", msx_test_path(rel));
    snprintf(rel, sizeof rel, "golden/sam/%s/model.pth", cfgname);
    snprintf(path, sizeof path, "%s", msx_test_path(rel));
    MSX_CHECK_OK(msx_sam_load(path, cfg, &ck, &arch));
    if (ck) MSX_CHECK_OK(msx_sam_create(ck, &arch, &so, &m));
    if (m) MSX_CHECK_OK(msx_sam_ws_create(m, &ws));
    MSX_CHECK_OK(msx_seg_ctx_create(&ctx));
    snprintf(rel, sizeof rel, "golden/sam/%s/cases.safetensors", cfgname);
    MSX_CHECK_OK(msx_safetensors_load(msx_test_path(rel), &cases));
    for (k = 0; ws && cases && ctx && k < 3; k++) { /* case0..2: box-only prompts */
        const msx_tensor *ti, *tb, *tm;
        msx_image img;
        msx_mask mask;
        int H, W, i, flips = 0;
        memset(&img, 0, sizeof img);
        memset(&mask, 0, sizeof mask);
        snprintf(key, sizeof key, "case%d.image", k);
        ti = msx_ckpt_find(cases, key);
        snprintf(key, sizeof key, "case%d.box", k);
        tb = msx_ckpt_find(cases, key);
        snprintf(key, sizeof key, "case%d.masks_single", k);
        tm = msx_ckpt_find(cases, key);
        MSX_CHECK(ti && tb && tm, "%s case%d keys", cfgname, k);
        if (!ti || !tb || !tm) continue;
        H = (int)ti->shape[0];
        W = (int)ti->shape[1];
        MSX_CHECK_OK(msx_image_init(&img, W, H, (const unsigned char *)ti->data));
        MSX_CHECK_OK(msx_segment_box_ctx(ctx, m, ws, &img, (const float *)tb->data, NULL, &mask));
        if (mask.data && mask.w == W && mask.h == H) {
            for (i = 0; i < H * W; i++) {
                float ref = ((const float *)tm->data)[i];
                if (mask.data[i] != (ref > 0) && fabsf(ref) >= 1e-4f) flips++;
            }
            MSX_CHECK(flips == 0, "%s case%d: %d mask pixels differ from the official predictor", cfgname, k, flips);
            printf("%s case%d: segment %dx%d, %d differing pixels\n", cfgname, k, W, H, flips);
        }
        msx_image_free(&img);
        msx_mask_free(&mask);
    }
    msx_seg_ctx_free(ctx);
    msx_sam_ws_free(ws);
    msx_sam_free(m);
    msx_ckpt_free(ck);
    msx_ckpt_free(cases);
}

typedef struct demo_item {
    msx_image img;
    msx_mask gt;
    float box[4];
    int task, index; /* task, image number within the task's test split */
} demo_item;

/* Under ASan (MSX_ASAN set) only the first few images of each task and the
   base model run; the means are then compared on that subset. */
static int per_task = 48, n_models = N_MODELS;

static int load_items(demo_item **out) {
    int t, i, n = 0, cap = N_TASKS * 48;
    demo_item *it = (demo_item *)calloc((size_t)cap, sizeof *it);
    msx_mask_load_options mo;
    memset(&mo, 0, sizeof mo);
    mo.threshold = 127; /* demo README: ground truth = mask value > 127 */
    for (t = 0; t < N_TASKS; t++)
        for (i = 0; i < per_task; i++) {
            char p[512];
            int b[4];
            demo_item *d = &it[n];
            snprintf(p, sizeof p, DEMO "/tasks/%s/test/images/%03d.png", tasks[t], i);
            if (msx_image_load(p, &d->img) != MSX_OK) {
                MSX_CHECK(0, "%s", msx_last_error());
                continue;
            }
            snprintf(p, sizeof p, DEMO "/tasks/%s/test/masks/%03d.png", tasks[t], i);
            if (msx_mask_load(p, &mo, &d->gt) != MSX_OK || msx_mask_bbox(&d->gt, b) != MSX_OK) {
                MSX_CHECK(0, "%s", msx_last_error());
                msx_image_free(&d->img);
                continue;
            }
            d->box[0] = (float)b[0];
            d->box[1] = (float)b[1];
            d->box[2] = (float)b[2];
            d->box[3] = (float)b[3];
            d->task = t;
            d->index = i;
            n++;
        }
    *out = it;
    return n;
}

/* baseline_dice.json: {model: {task: {split: {"mean": x, "per_image": [...]}}}} */
static const msx__json *baseline_entry(const msx__json *j, const char *model, const char *task) {
    return msx__json_get(msx__json_get(msx__json_get(j, model), task), "test");
}

static void test_demo(void) {
    demo_item *items = NULL;
    int n, mi, t, i, nthreads = 1;
    void *jbuf = NULL;
    size_t jlen;
    msx__json *base = NULL;
    double t_start = msx_time_now(), table[N_MODELS][N_TASKS], ref[N_MODELS][N_TASKS];
    double *dice;
    MSX_CHECK_OK(msx_read_file(DEMO "/baseline_dice.json", 0, &jbuf, &jlen));
    if (jbuf) base = msx__json_parse((const char *)jbuf, jlen, DEMO "/baseline_dice.json");
    MSX_CHECK(base != NULL, "baseline_dice.json: %s", msx_last_error());
    n = load_items(&items);
    MSX_CHECK(n == N_TASKS * per_task, "loaded %d of %d demo test images", n, N_TASKS * per_task);
    dice = (double *)calloc((size_t)n + 1, sizeof *dice);
#ifdef _OPENMP
    nthreads = omp_get_max_threads();
#endif
    printf("demo: %d test images, %d threads\n", n, nthreads);
    for (mi = 0; mi < n_models && base; mi++) {
        char p[256];
        msx_checkpoint *ck = NULL;
        msx_sam_arch arch;
        msx_sam_options so;
        msx_sam *m = NULL;
        msx_sam_ws **ws = (msx_sam_ws **)calloc((size_t)nthreads, sizeof *ws);
        msx_seg_ctx **ctx = (msx_seg_ctx **)calloc((size_t)nthreads, sizeof *ctx);
        msx_mask *pred = (msx_mask *)calloc((size_t)nthreads, sizeof *pred);
        int ok = 1, worst_i = -1, n_far = 0;
        double tm = msx_time_now(), worst = 0;
        memset(&so, 0, sizeof so);
        so.n_threads = 1; /* parallelism over images, one workspace per thread */
        snprintf(p, sizeof p, DEMO "/models/%s.pth", models[mi]);
        MSX_CHECK_OK(msx_sam_load(p, DEMO "/models/config.json", &ck, &arch));
        if (ck) MSX_CHECK_OK(msx_sam_create(ck, &arch, &so, &m));
        for (i = 0; m && i < nthreads; i++) {
            MSX_CHECK_OK(msx_sam_ws_create(m, &ws[i]));
            MSX_CHECK_OK(msx_seg_ctx_create(&ctx[i]));
            if (!ws[i] || !ctx[i]) ok = 0;
        }
        if (!m) ok = 0;
        if (ok) {
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1)
#endif
            for (i = 0; i < n; i++) {
                int tid = 0;
                msx_result r;
#ifdef _OPENMP
                tid = omp_get_thread_num();
#endif
                r = msx_segment_box_ctx(ctx[tid], m, ws[tid], &items[i].img, items[i].box, NULL, &pred[tid]);
                if (r != MSX_OK) {
#ifdef _OPENMP
#pragma omp critical
#endif
                    MSX_CHECK(r == MSX_OK, "%s image %d: %s", models[mi], i, msx_last_error());
                    dice[i] = -1;
                } else {
                    msx_result rd = msx_dice(&pred[tid], &items[i].gt, &dice[i]);
                    if (rd != MSX_OK) dice[i] = -1;
                }
            }
            for (t = 0; t < N_TASKS; t++) {
                const msx__json *e = baseline_entry(base, models[mi], tasks[t]);
                const msx__json *pi = msx__json_get(e, "per_image");
                double s = 0, rs = 0, rm = -1;
                int c = 0;
                MSX_CHECK(e && msx__json_num(e, "mean", &rm, -1) && rm >= 0 && pi && pi->type == MSX__JARR &&
                              pi->n == 48,
                          "baseline %s/%s missing", models[mi], tasks[t]);
                if (!pi || pi->type != MSX__JARR || pi->n != 48) continue;
                for (i = 0; i < n; i++)
                    if (items[i].task == t) {
                        double r = pi->kids[items[i].index].num, d = fabs(dice[i] - r);
                        s += dice[i];
                        rs += r;
                        if (d > worst) { worst = d; worst_i = i; }
                        if (d > 1e-3) n_far++;
                        c++;
                    }
                table[mi][t] = c ? 100.0 * s / c : -1;
                /* the full split is compared with the published mean, a subset with its per-image mean */
                ref[mi][t] = c == 48 ? 100.0 * rm : c ? 100.0 * rs / c : -1;
                MSX_CHECK(fabs(table[mi][t] - ref[mi][t]) <= 0.2, "%s / %s: mean Dice %.2f vs baseline %.2f",
                          models[mi], tasks[t], table[mi][t], ref[mi][t]);
            }
            printf("demo %-8s %.2f s; per-image: max |dDice| %.4f (image %d), %d images off by > 1e-3\n", models[mi],
                   msx_time_now() - tm, worst, worst_i, n_far);
        } else {
            for (t = 0; t < N_TASKS; t++) table[mi][t] = ref[mi][t] = -1;
        }
        for (i = 0; i < nthreads; i++) {
            msx_sam_ws_free(ws[i]);
            msx_seg_ctx_free(ctx[i]);
            msx_mask_free(&pred[i]);
        }
        free(ws);
        free(ctx);
        free(pred);
        msx_sam_free(m);
        msx_ckpt_free(ck);
    }
    printf("\nmean Dice x100 on the test split (ours / baseline)\n%-9s", "model");
    for (t = 0; t < N_TASKS; t++) printf(" %15s", tasks[t]);
    printf("\n");
    for (mi = 0; mi < n_models && base; mi++) {
        printf("%-9s", models[mi]);
        for (t = 0; t < N_TASKS; t++) printf("   %5.2f / %5.2f", table[mi][t], ref[mi][t]);
        printf("\n");
    }
    printf("demo total %.2f s\n", msx_time_now() - t_start);
    for (i = 0; i < n; i++) {
        msx_image_free(&items[i].img);
        msx_mask_free(&items[i].gt);
    }
    free(items);
    free(dice);
    msx__json_free(base);
    msx_free(jbuf);
}

int main(void) {
    if (getenv("MSX_ASAN")) {
        per_task = 4;
        n_models = 1;
    }
    test_golden_segment("tiny_a");
    test_golden_segment("tiny_b");
    test_demo();
    return msx_test_summary("test_demo_dice");
}
