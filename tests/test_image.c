/* test_image: images, masks, SAM preprocessing (PIL-exact resize), prompt
   transforms, mask postprocessing, Dice and boxes, refusal of bad inputs.
   Reference values: the golden SAM cases (official PyTorch + PIL 9.4). The
   network is not needed here (postprocessing starts from the golden low-res
   logits). */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "test.h"

#include <stb/stb_image_write.h>
#include <unistd.h>

static const msx_tensor *need(const msx_checkpoint *c, const char *name) {
    const msx_tensor *t = msx_ckpt_find(c, name);
    MSX_CHECK(t != NULL, "tensor %s missing from the golden file", name);
    return t;
}

/* pixel_mean / pixel_std from the golden config.json (not hard-coded). */
static int read_mean_std(const char *cfg, float mean[3], float std[3]) {
    void *buf;
    size_t len;
    msx__json *j;
    const msx__json *m, *s;
    int k, ok = 0;
    if (msx_read_file(cfg, 0, &buf, &len) != MSX_OK) return 0;
    j = msx__json_parse((const char *)buf, len, cfg);
    m = msx__json_get(j, "pixel_mean");
    s = msx__json_get(j, "pixel_std");
    if (m && s && m->type == MSX__JARR && s->type == MSX__JARR && m->n == 3 && s->n == 3) {
        for (k = 0; k < 3; k++) {
            mean[k] = (float)m->kids[k].num;
            std[k] = (float)s->kids[k].num;
        }
        ok = 1;
    }
    msx__json_free(j);
    msx_free(buf);
    return ok;
}

static void test_golden(const char *cfgname) {
    char path[256], key[64];
    msx_checkpoint *c = NULL;
    msx_sam_input in;
    float mean[3], std[3];
    int k;
    memset(&in, 0, sizeof in);
    snprintf(path, sizeof path, "golden/sam/%s/config.json", cfgname);
    MSX_CHECK(read_mean_std(msx_test_path(path), mean, std), "%s: pixel_mean/std", path);
    snprintf(path, sizeof path, "golden/sam/%s/cases.safetensors", cfgname);
    MSX_CHECK_OK(msx_safetensors_load(msx_test_path(path), &c));
    if (!c) return;
    for (k = 0; k < 6; k++) {
        const msx_tensor *ti, *tos, *tis, *tin, *t;
        msx_image img;
        int H, W, S, i, n;
        double maxd;
        memset(&img, 0, sizeof img);
#define KEY(s) (snprintf(key, sizeof key, "case%d.%s", k, s), key)
        ti = need(c, KEY("image"));
        tos = need(c, KEY("original_size"));
        tis = need(c, KEY("input_size"));
        tin = need(c, KEY("input"));
        if (!ti || !tos || !tis || !tin) continue;
        H = ((const int32_t *)tos->data)[0];
        W = ((const int32_t *)tos->data)[1];
        S = (int)tin->shape[3];
        MSX_CHECK(ti->shape[0] == H && ti->shape[1] == W && ti->shape[2] == 3, "%s case%d image shape", cfgname, k);
        MSX_CHECK_OK(msx_image_init(&img, W, H, (const unsigned char *)ti->data));
        /* input: exact PIL resize + normalisation + padding */
        MSX_CHECK_OK(msx_sam_preprocess(&img, S, mean, std, MSX_PREPROCESS_SAM, &in));
        MSX_CHECK(in.in_h == ((const int32_t *)tis->data)[0] && in.in_w == ((const int32_t *)tis->data)[1],
                  "%s case%d input_size %dx%d vs golden %dx%d", cfgname, k, in.in_h, in.in_w,
                  ((const int32_t *)tis->data)[0], ((const int32_t *)tis->data)[1]);
        maxd = 0;
        for (i = 0; i < 3 * S * S; i++) {
            double d = fabs((double)in.data[i] - ((const float *)tin->data)[i]);
            maxd = d > maxd ? d : maxd;
        }
        MSX_CHECK(maxd <= 1e-6, "%s case%d input max |diff| = %g", cfgname, k, maxd);
        printf("%s case%d %dx%d -> %dx%d: input max|diff| %.3g\n", cfgname, k, H, W, in.in_h, in.in_w, maxd);
        /* box_input */
        if ((t = msx_ckpt_find(c, KEY("box"))) != NULL) {
            const msx_tensor *tb = need(c, KEY("box_input"));
            float b[4];
            MSX_CHECK_OK(msx_sam_transform_box(&in, (const float *)t->data, b));
            for (i = 0; tb && i < 4; i++)
                MSX_CHECK(fabs(b[i] - ((const float *)tb->data)[i]) <= 1e-5, "%s case%d box_input[%d] %.8g vs %.8g",
                          cfgname, k, i, (double)b[i], (double)((const float *)tb->data)[i]);
        }
        /* point_coords_input */
        if ((t = msx_ckpt_find(c, KEY("point_coords"))) != NULL) {
            const msx_tensor *tp = need(c, KEY("point_coords_input"));
            float p[16];
            n = (int)t->shape[0];
            MSX_CHECK(n <= 8, "too many points");
            if (n <= 8 && tp) {
                MSX_CHECK_OK(msx_sam_transform_points(&in, n, (const float *)t->data, p));
                for (i = 0; i < 2 * n; i++)
                    MSX_CHECK(fabs(p[i] - ((const float *)tp->data)[i]) <= 1e-5, "%s case%d point coord %d", cfgname,
                              k, i);
            }
        }
        /* postprocess golden low-res logits -> masks_single */
        {
            const msx_tensor *tl = need(c, KEY("low_res_masks_single"));
            const msx_tensor *tm = need(c, KEY("masks_single"));
            float *out, *scr;
            msx_mask bin;
            int bad = 0, flips = 0;
            double worst = 0;
            memset(&bin, 0, sizeof bin);
            if (!tl || !tm) goto next;
            out = (float *)malloc(sizeof(float) * (size_t)H * W);
            scr = (float *)malloc(sizeof(float) * (msx_sam_postprocess_scratch(&in) + 1));
            MSX_CHECK_OK(msx_sam_postprocess(&in, (const float *)tl->data, (int)tl->shape[2], (int)tl->shape[3], out,
                                             scr));
            MSX_CHECK_OK(msx_mask_from_logits(out, W, H, 0.0f, &bin));
            for (i = 0; i < H * W; i++) {
                double ref = ((const float *)tm->data)[i], d = fabs(out[i] - ref);
                if (d > 1e-4 + 1e-4 * fabs(ref)) bad++;
                if (d > worst) worst = d;
                if (bin.data[i] != (ref > 0) && fabs(ref) >= 1e-4) flips++;
            }
            MSX_CHECK(bad == 0, "%s case%d masks_single: %d values out of tolerance (max |diff| %g)", cfgname, k, bad,
                      worst);
            MSX_CHECK(flips == 0, "%s case%d binary mask differs at %d pixels", cfgname, k, flips);
            printf("%s case%d masks_single max|diff| %.3g, binary flips %d\n", cfgname, k, worst, flips);
            free(out);
            free(scr);
            msx_mask_free(&bin);
        }
    next:
        msx_image_free(&img);
#undef KEY
    }
    msx_sam_input_free(&in);
    msx_ckpt_free(c);
}

/* Dice and boxes against the formula evaluated here on hand-made cases. */
static double ref_dice(const unsigned char *p, const unsigned char *g, int n) {
    double sp = 0, sg = 0, pg = 0;
    int i;
    for (i = 0; i < n; i++) {
        sp += p[i] ? 1 : 0;
        sg += g[i] ? 1 : 0;
        pg += (p[i] && g[i]) ? 1 : 0;
    }
    return 2.0 * pg / (sp + sg + 1e-8);
}

static void test_dice_bbox(void) {
    static const unsigned char p1[12] = {1, 1, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0};
    static const unsigned char g1[12] = {1, 0, 1, 0, 1, 1, 0, 0, 0, 1, 1, 1};
    static const unsigned char z[12] = {0};
    msx_mask a, b;
    double d;
    int box[4], i;
    memset(&a, 0, sizeof a);
    memset(&b, 0, sizeof b);
    /* 2·4/(6+7): intersection {0,4,9,10} */
    MSX_CHECK(fabs(msx_dice_u8(p1, g1, 12) - ref_dice(p1, g1, 12)) < 1e-15, "dice hand case");
    MSX_CHECK(fabs(msx_dice_u8(p1, g1, 12) - 8.0 / 13.0) < 1e-8, "dice = 8/13");
    MSX_CHECK(msx_dice_u8(z, g1, 12) == 0.0, "empty prediction scores 0");
    MSX_CHECK(msx_dice_u8(z, z, 12) == 0.0, "both empty score 0 (reference formula)");
    MSX_CHECK(fabs(msx_dice_u8(g1, g1, 12) - 1.0) < 1e-8, "identical masks");
    MSX_CHECK_OK(msx_mask_init(&a, 4, 3));
    MSX_CHECK_OK(msx_mask_init(&b, 4, 3));
    memcpy(a.data, p1, 12);
    memcpy(b.data, g1, 12);
    MSX_CHECK_OK(msx_dice(&a, &b, &d));
    MSX_CHECK(fabs(d - ref_dice(p1, g1, 12)) < 1e-15, "msx_dice");
    /* bbox: p1 on a 4x3 grid: pixels (x,y) = (0,0) (1,0) (0,1) (0,2) (1,2) (2,2) */
    MSX_CHECK_OK(msx_mask_bbox(&a, box));
    MSX_CHECK(box[0] == 0 && box[1] == 0 && box[2] == 2 && box[3] == 2, "bbox %d %d %d %d", box[0], box[1], box[2],
              box[3]);
    memset(b.data, 0, 12);
    b.data[1 * 4 + 3] = 1; /* single pixel at x=3, y=1 */
    MSX_CHECK_OK(msx_mask_bbox(&b, box));
    MSX_CHECK(box[0] == 3 && box[1] == 1 && box[2] == 3 && box[3] == 1, "single-pixel bbox");
    memset(b.data, 0, 12);
    MSX_CHECK(msx_mask_bbox(&b, box) == MSX_E_ARG, "empty mask has no box");
    msx_mask_free(&b);
    MSX_CHECK_OK(msx_mask_init(&b, 5, 3));
    MSX_CHECK(msx_dice(&a, &b, &d) == MSX_E_SHAPE, "dice size mismatch refused");
    /* larger random masks vs the independent formula */
    {
        msx_rng r;
        unsigned char *pp = (unsigned char *)malloc(10000), *gg = (unsigned char *)malloc(10000);
        msx_rng_seed(&r, 7);
        for (i = 0; i < 10000; i++) {
            pp[i] = (unsigned char)(msx_rng_uniform(&r) < 0.3);
            gg[i] = (unsigned char)(msx_rng_uniform(&r) < 0.4 ? 255 : 0);
        }
        MSX_CHECK(fabs(msx_dice_u8(pp, gg, 10000) - ref_dice(pp, gg, 10000)) < 1e-14, "random dice");
        free(pp);
        free(gg);
    }
    msx_mask_free(&a);
    msx_mask_free(&b);
}

/* Image/mask files: formats, conversions, refusal of bad files. */
static void test_files(void) {
    const char *dir = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    char p1[512], p2[512], p3[512];
    unsigned char rgba[2 * 3 * 4], ga[2 * 3 * 2], g[6];
    msx_image img;
    msx_mask m;
    msx_mask_load_options mo;
    void *buf;
    size_t len;
    int i;
    memset(&img, 0, sizeof img);
    memset(&m, 0, sizeof m);
    for (i = 0; i < 6; i++) {
        rgba[4 * i] = (unsigned char)(10 * i);
        rgba[4 * i + 1] = (unsigned char)(100 + i);
        rgba[4 * i + 2] = (unsigned char)(200 - i);
        rgba[4 * i + 3] = (unsigned char)(i * 40);
        ga[2 * i] = (unsigned char)(i * 50);
        ga[2 * i + 1] = 7;
        g[i] = (unsigned char)(i * 51);
    }
    snprintf(p1, sizeof p1, "%s/test_image_rgba_%ld.png", dir, (long)getpid());
    snprintf(p2, sizeof p2, "%s/test_image_ga_%ld.png", dir, (long)getpid());
    snprintf(p3, sizeof p3, "%s/test_image_g_%ld.png", dir, (long)getpid());
    MSX_CHECK(stbi_write_png(p1, 2, 3, 4, rgba, 8) != 0, "write %s", p1);
    MSX_CHECK(stbi_write_png(p2, 2, 3, 2, ga, 4) != 0, "write %s", p2);
    MSX_CHECK(stbi_write_png(p3, 2, 3, 1, g, 2) != 0, "write %s", p3);
    /* RGBA: alpha dropped */
    MSX_CHECK_OK(msx_image_load(p1, &img));
    MSX_CHECK(img.w == 2 && img.h == 3, "rgba size");
    for (i = 0; img.data && i < 6; i++)
        MSX_CHECK(img.data[3 * i] == rgba[4 * i] && img.data[3 * i + 1] == rgba[4 * i + 1] &&
                      img.data[3 * i + 2] == rgba[4 * i + 2],
                  "rgba pixel %d", i);
    msx_image_free(&img);
    /* grey + alpha: replicated, alpha dropped */
    MSX_CHECK_OK(msx_image_load(p2, &img));
    for (i = 0; img.data && i < 6; i++)
        MSX_CHECK(img.data[3 * i] == ga[2 * i] && img.data[3 * i + 1] == ga[2 * i] && img.data[3 * i + 2] == ga[2 * i],
                  "grey+alpha pixel %d", i);
    msx_image_free(&img);
    MSX_CHECK_OK(msx_image_load(p3, &img));
    for (i = 0; img.data && i < 6; i++)
        MSX_CHECK(img.data[3 * i] == g[i] && img.data[3 * i + 2] == g[i], "grey pixel %d", i);
    /* masks: default > 0, threshold, label */
    MSX_CHECK_OK(msx_mask_load(p3, NULL, &m));
    for (i = 0; m.data && i < 6; i++) MSX_CHECK(m.data[i] == (g[i] > 0), "mask default %d", i);
    memset(&mo, 0, sizeof mo);
    mo.threshold = 127;
    MSX_CHECK_OK(msx_mask_load(p3, &mo, &m));
    for (i = 0; m.data && i < 6; i++) MSX_CHECK(m.data[i] == (g[i] > 127), "mask >127 %d", i);
    mo.use_label = 1;
    mo.label = 153;
    MSX_CHECK_OK(msx_mask_load(p3, &mo, &m));
    for (i = 0; m.data && i < 6; i++) MSX_CHECK(m.data[i] == (g[i] == 153), "mask label %d", i);
    /* colour mask: max(R,G,B) */
    memset(&mo, 0, sizeof mo);
    mo.threshold = 150;
    MSX_CHECK_OK(msx_mask_load(p1, &mo, &m));
    for (i = 0; m.data && i < 6; i++) MSX_CHECK(m.data[i] == 1, "colour mask %d", i); /* B = 200-i > 150 */
    /* mask round trip and overlay */
    snprintf(p2, sizeof p2, "%s/test_image_mask_out_%ld.png", dir, (long)getpid());
    mo.threshold = 127;
    mo.use_label = 0;
    MSX_CHECK_OK(msx_mask_load(p3, &mo, &m));
    MSX_CHECK_OK(msx_mask_save_png(p2, &m));
    {
        msx_mask m2;
        memset(&m2, 0, sizeof m2);
        MSX_CHECK_OK(msx_mask_load(p2, &mo, &m2));
        MSX_CHECK(m2.data && !memcmp(m2.data, m.data, 6), "mask PNG round trip");
        msx_mask_free(&m2);
    }
    {
        float box[4] = {0, 0, 1, 2};
        msx_image ov;
        memset(&ov, 0, sizeof ov);
        snprintf(p2, sizeof p2, "%s/test_image_overlay_%ld.png", dir, (long)getpid());
        MSX_CHECK_OK(msx_overlay_png(p2, &img, &m, box));
        MSX_CHECK_OK(msx_image_load(p2, &ov));
        MSX_CHECK(ov.w == 2 && ov.h == 3, "overlay size");
        msx_image_free(&ov);
    }
    /* bad files: garbage, empty, truncated, missing, absurd dimensions */
    {
        static const char junk[] = "this is not an image at all";
        msx_result r = msx_image_load_mem(junk, sizeof junk, "junk.png", &img);
        MSX_CHECK(r == MSX_E_FORMAT && strstr(msx_last_error(), "junk.png"), "garbage refused: %s", msx_last_error());
        MSX_CHECK(msx_image_load_mem(junk, 0, "empty.png", &img) == MSX_E_FORMAT, "empty refused");
        MSX_CHECK(msx_image_load("tests/data/does/not/exist.png", &img) == MSX_E_IO, "missing file");
        MSX_CHECK(msx_mask_load_mem(junk, sizeof junk, "junk_mask.png", NULL, &m) == MSX_E_FORMAT, "bad mask refused");
    }
    if (msx_read_file(p1, 0, &buf, &len) == MSX_OK) {
        msx_result r = msx_image_load_mem(buf, len / 2, "truncated.png", &img);
        MSX_CHECK(r == MSX_E_FORMAT, "truncated PNG refused (%s)", msx_result_str(r));
        /* IHDR says 100000 x 4: more than MSX_MAX_IMAGE_SIDE (stb's CRC is not checked) */
        {
            unsigned char *b = (unsigned char *)buf;
            b[16] = 0; b[17] = 1; b[18] = 0x86; b[19] = 0xA0; /* width = 100000 */
            r = msx_image_load_mem(buf, len, "huge.png", &img);
            MSX_CHECK(r == MSX_E_LIMIT, "absurd dimensions refused (%s: %s)",
                      msx_result_str(r), msx_last_error());
        }
        msx_free(buf);
    }
    MSX_CHECK(img.data == NULL && img.w == 0, "failed load leaves an empty image");
    remove(p1);
    remove(p3);
    snprintf(p2, sizeof p2, "%s/test_image_ga_%ld.png", dir, (long)getpid());
    remove(p2);
    snprintf(p2, sizeof p2, "%s/test_image_mask_out_%ld.png", dir, (long)getpid());
    remove(p2);
    snprintf(p2, sizeof p2, "%s/test_image_overlay_%ld.png", dir, (long)getpid());
    remove(p2);
    msx_image_free(&img);
    msx_mask_free(&m);
}

/* A 2x2 16-bit grayscale PNG built by hand (stored deflate block, real CRCs
   and Adler-32): values 0, 300, 40000, 65535. */
static uint32_t crc32_png(const unsigned char *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    size_t i;
    int k;
    for (i = 0; i < n; i++) {
        c ^= p[i];
        for (k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
    return c ^ 0xFFFFFFFFu;
}
static void put32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16); p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
}
static size_t png16(unsigned char *out) {
    static const unsigned short px[4] = {0, 300, 40000, 65535};
    unsigned char raw[10], *o = out;
    uint32_t a = 1, b = 0;
    size_t i;
    int y, x;
    for (y = 0; y < 2; y++) {
        raw[y * 5] = 0; /* filter: none */
        for (x = 0; x < 2; x++) {
            raw[y * 5 + 1 + 2 * x] = (unsigned char)(px[y * 2 + x] >> 8);
            raw[y * 5 + 2 + 2 * x] = (unsigned char)(px[y * 2 + x] & 255);
        }
    }
    memcpy(o, "\x89PNG\r\n\x1a\n", 8); o += 8;
    put32(o, 13); memcpy(o + 4, "IHDR", 4); put32(o + 8, 2); put32(o + 12, 2);
    o[16] = 16; o[17] = 0; o[18] = o[19] = o[20] = 0; /* 16-bit grey */
    put32(o + 21, crc32_png(o + 4, 17)); o += 25;
    put32(o, 2 + 5 + 10 + 4); memcpy(o + 4, "IDAT", 4);
    o[8] = 0x78; o[9] = 0x01;                       /* zlib header */
    o[10] = 1; o[11] = 10; o[12] = 0; o[13] = 0xF5; o[14] = 0xFF; /* final stored block, LEN 10 */
    memcpy(o + 15, raw, 10);
    for (i = 0; i < 10; i++) { a = (a + raw[i]) % 65521u; b = (b + a) % 65521u; }
    put32(o + 25, (b << 16) | a);
    put32(o + 29, crc32_png(o + 4, 4 + 21)); o += 33;
    put32(o, 0); memcpy(o + 4, "IEND", 4); put32(o + 8, crc32_png(o + 4, 4)); o += 12;
    return (size_t)(o - out);
}

static void test_png16(void) {
    unsigned char buf[128];
    size_t n = png16(buf);
    msx_image img;
    msx_mask m;
    msx_mask_load_options mo;
    memset(&img, 0, sizeof img);
    memset(&m, 0, sizeof m);
    memset(&mo, 0, sizeof mo);
    MSX_CHECK_OK(msx_image_load_mem(buf, n, "png16", &img));
    /* 16 -> 8 bit keeps the top byte */
    MSX_CHECK(img.data && img.data[0] == 0 && img.data[3] == 1 && img.data[6] == 156 && img.data[9] == 255 &&
                  img.data[10] == 255,
              "16-bit image values");
    mo.threshold = 299;
    MSX_CHECK_OK(msx_mask_load_mem(buf, n, "png16", &mo, &m));
    MSX_CHECK(m.data && m.data[0] == 0 && m.data[1] == 1 && m.data[2] == 1 && m.data[3] == 1, "16-bit mask > 299");
    mo.use_label = 1;
    mo.label = 300;
    MSX_CHECK_OK(msx_mask_load_mem(buf, n, "png16", &mo, &m));
    MSX_CHECK(m.data && m.data[0] == 0 && m.data[1] == 1 && m.data[2] == 0 && m.data[3] == 0, "16-bit label 300");
    msx_image_free(&img);
    msx_mask_free(&m);
}

/* Bad prompts, bad preprocessing arguments. */
static void test_bad_prompts(void) {
    msx_image img;
    msx_sam_input in;
    float o[4], nanv = (float)NAN, infv = (float)INFINITY;
    float b1[4] = {10, 10, 5, 20}, b2[4] = {0, 0, 0, 0}, b3[4] = {0, 0, 101, 10}, b4[4] = {-1, 0, 5, 5};
    float pts[2];
    memset(&img, 0, sizeof img);
    memset(&in, 0, sizeof in);
    MSX_CHECK_OK(msx_image_init(&img, 100, 50, NULL));
    MSX_CHECK_OK(msx_sam_preprocess(&img, 64, NULL, NULL, MSX_PREPROCESS_SAM, &in));
    MSX_CHECK(in.in_w == 64 && in.in_h == 32, "resize shape %dx%d", in.in_w, in.in_h);
    MSX_CHECK(msx_sam_transform_box(&in, b1, o) == MSX_E_ARG, "inverted box refused");
    MSX_CHECK_OK(msx_sam_transform_box(&in, b2, o)); /* 1-pixel box at the corner: inclusive max */
    MSX_CHECK(msx_sam_transform_box(&in, b3, o) == MSX_E_ARG, "box beyond the image refused");
    MSX_CHECK(msx_sam_transform_box(&in, b4, o) == MSX_E_ARG, "negative box refused");
    b2[2] = nanv;
    MSX_CHECK(msx_sam_transform_box(&in, b2, o) == MSX_E_ARG, "NaN box refused");
    b2[2] = infv;
    MSX_CHECK(msx_sam_transform_box(&in, b2, o) == MSX_E_ARG, "inf box refused");
    pts[0] = 3;
    pts[1] = nanv;
    MSX_CHECK(msx_sam_transform_points(&in, 1, pts, o) == MSX_E_ARG, "NaN point refused");
    MSX_CHECK(msx_sam_preprocess(&img, 0, NULL, NULL, MSX_PREPROCESS_SAM, &in) == MSX_E_ARG, "S = 0 refused");
    {
        float badstd[3] = {1, 0, 1};
        MSX_CHECK(msx_sam_preprocess(&img, 64, NULL, badstd, MSX_PREPROCESS_SAM, &in) == MSX_E_ARG, "std 0 refused");
    }
    {
        msx_image thin;
        memset(&thin, 0, sizeof thin);
        MSX_CHECK_OK(msx_image_init(&thin, 3000, 1, NULL));
        MSX_CHECK(msx_sam_preprocess(&thin, 64, NULL, NULL, MSX_PREPROCESS_SAM, &in) == MSX_E_ARG,
                  "zero-height resize refused");
        msx_image_free(&thin);
    }
    MSX_CHECK(msx_image_init(&img, 0, 5, NULL) != MSX_OK, "zero-area image refused");
    MSX_CHECK(msx_image_init(&img, MSX_MAX_IMAGE_SIDE + 1, 1, NULL) == MSX_E_LIMIT, "absurd image refused");
    msx_image_free(&img);
    msx_sam_input_free(&in);
}

/* PIL resize properties checked by brute force: a constant image stays
   constant; the 2x box downscale of a smooth ramp equals the pair average
   (Pillow's triangle filter of support 2 at centres 2i+1 gives weights
   1/8 3/8 3/8 1/8), computed here in double and rounded. */
static void test_resize_props(void) {
    enum { W = 16, H = 4 };
    unsigned char src[W * H * 3], dst[8 * 2 * 3];
    void *work = malloc(msx_resize_pil_work_size(W, H, 8, 2));
    int x, y, c, ok = 1;
    for (y = 0; y < H; y++)
        for (x = 0; x < W; x++)
            for (c = 0; c < 3; c++) src[(y * W + x) * 3 + c] = (unsigned char)(x * 10 + c);
    msx_resize_pil_bilinear(src, W, H, dst, 8, 2, work);
    for (y = 0; y < 2; y++)
        for (x = 0; x < 8; x++)
            for (c = 0; c < 3; c++) {
                /* taps 2x-1 .. 2x+2 with 1/8 3/8 3/8 1/8, renormalised at the borders */
                double wsum = 0, s = 0, wts[4] = {1, 3, 3, 1};
                int t;
                for (t = 0; t < 4; t++) {
                    int sx = 2 * x - 1 + t;
                    if (sx < 0 || sx >= W) continue;
                    wsum += wts[t];
                    s += wts[t] * (sx * 10 + c);
                }
                if (dst[(y * 8 + x) * 3 + c] != (int)floor(s / wsum + 0.5)) ok = 0;
            }
    MSX_CHECK(ok, "2x downscale of a ramp");
    free(work);
}

/* MedSAM preprocessing: shape and range properties (no reference data). */
static void test_medsam(void) {
    msx_image img;
    msx_sam_input in;
    int x, y, ok = 1;
    memset(&img, 0, sizeof img);
    memset(&in, 0, sizeof in);
    MSX_CHECK_OK(msx_image_init(&img, 40, 30, NULL));
    memset(img.data, 77, 40 * 30 * 3);
    MSX_CHECK_OK(msx_sam_preprocess(&img, 64, NULL, NULL, MSX_PREPROCESS_MEDSAM, &in));
    MSX_CHECK(in.in_h == 64 && in.in_w == 64, "medsam fills S x S");
    for (x = 0; x < 3 * 64 * 64; x++)
        if (in.data[x] != 0.0f) ok = 0;
    MSX_CHECK(ok, "constant image -> 0 after min-max");
    /* horizontal ramp, downscaled 2x: output in [0,1], monotone along x, flat along y */
    msx_image_free(&img);
    MSX_CHECK_OK(msx_image_init(&img, 128, 96, NULL));
    for (y = 0; y < 96; y++)
        for (x = 0; x < 128; x++) memset(img.data + (y * 128 + x) * 3, x * 2, 3);
    MSX_CHECK_OK(msx_sam_preprocess(&img, 64, NULL, NULL, MSX_PREPROCESS_MEDSAM, &in));
    ok = 1;
    for (y = 0; y < 64; y++)
        for (x = 0; x < 64; x++) {
            float v = in.data[y * 64 + x];
            if (v < 0 || v > 1) ok = 0;
            if (x > 0 && v < in.data[y * 64 + x - 1]) ok = 0;
            if (y > 0 && v != in.data[x]) ok = 0;
        }
    MSX_CHECK(ok, "medsam ramp monotone and within [0,1]");
    MSX_CHECK(in.data[0] == 0.0f && in.data[63] == 1.0f, "medsam min-max ends %g %g", in.data[0], in.data[63]);
    /* interior of a linear ramp is reproduced by the cubic spline: pixel x holds
       2x, output i samples 2·(2i + 0.5) = 4i + 1, truncated to uint8, so each
       interior step is 4 grey levels ± 1 (in min-max units: level = step/4). */
    {
        double level = (in.data[47] - in.data[16]) / (4.0 * 31), i;
        for (i = 16; i < 47; i++) {
            double st = (in.data[(int)i + 1] - in.data[(int)i]) / level;
            MSX_CHECK(st >= 3 - 1e-6 && st <= 5 + 1e-6, "medsam ramp step at %g: %g levels", i, st);
        }
    }
    msx_image_free(&img);
    msx_sam_input_free(&in);
}

/* MedSAM resize against values computed here independently: downscaling by
   exactly 3 samples the (Gaussian-filtered) image at the knots 3k + 1, where
   the cubic spline interpolates exactly, so each output equals the Gaussian
   (sigma 1 = (3 - 1)/2, radius int(4·1 + 0.5) = 4, mirror boundary) of the
   input at (3y + 1, 3x + 1), truncated; upscaling by 3 puts output 3k + 1 on
   input sample k. Truncation of values within rounding of an integer can
   differ by one level. */
static int mir(int i, int n) {
    int p = 2 * n - 2;
    if (i < 0) i = -i;
    i %= p;
    return i >= n ? p - i : i;
}
static void test_medsam_knots(void) {
    enum { N = 30, S = 10 };
    msx_image img;
    msx_rng rng;
    unsigned char *u8;
    void *work;
    double g[9], gs = 0;
    int x, y, i, j, c, bad = 0;
    memset(&img, 0, sizeof img);
    MSX_CHECK_OK(msx_image_init(&img, N, N, NULL));
    msx_rng_seed(&rng, 11);
    for (i = 0; i < N * N * 3; i++) img.data[i] = (unsigned char)msx_rng_below(&rng, 256);
    for (i = -4; i <= 4; i++) gs += (g[i + 4] = exp(-0.5 * i * i));
    for (i = 0; i < 9; i++) g[i] /= gs;
    work = malloc(msx__medsam_work_size(N, N, S) + S * S * 3);
    u8 = (unsigned char *)malloc(N * N * 3);
    msx__medsam_resize_u8(&img, S, u8, work);
    for (y = 0; y < S; y++)
        for (x = 0; x < S; x++)
            for (c = 0; c < 3; c++) {
                double v = 0;
                for (i = -4; i <= 4; i++)
                    for (j = -4; j <= 4; j++)
                        v += g[i + 4] * g[j + 4] * img.data[(mir(3 * y + 1 + i, N) * N + mir(3 * x + 1 + j, N)) * 3 + c];
                if (abs((int)u8[(y * S + x) * 3 + c] - (int)floor(v)) > 1) bad++;
            }
    MSX_CHECK(bad == 0, "medsam 3x downscale: %d samples differ from the Gaussian at the knots", bad);
    /* upscale 10 -> 30 */
    msx_image_free(&img);
    MSX_CHECK_OK(msx_image_init(&img, S, S, NULL));
    for (i = 0; i < S * S * 3; i++) img.data[i] = (unsigned char)msx_rng_below(&rng, 256);
    free(work);
    work = malloc(msx__medsam_work_size(S, S, N) + N * N * 3);
    msx__medsam_resize_u8(&img, N, u8, work);
    bad = 0;
    for (y = 0; y < S; y++)
        for (x = 0; x < S; x++)
            for (c = 0; c < 3; c++)
                if (abs((int)u8[((3 * y + 1) * N + 3 * x + 1) * 3 + c] - (int)img.data[(y * S + x) * 3 + c]) > 1) bad++;
    MSX_CHECK(bad == 0, "medsam 3x upscale: %d knots differ from the input", bad);
    free(work);
    free(u8);
    msx_image_free(&img);
}

/* MedSAM preprocessing against skimage's own output (tests/data/medsam:
   MedSAM_Inference.py's resize, order 3 with anti-aliasing, then .astype
   uint8, computed with skimage 0.19.3): every channel of every pixel must
   equal (u8 - min) / (max - min) of the expected image, and the float sum
   must match the one recorded by numpy. */
static void test_medsam_golden(void) {
    void *buf;
    size_t len;
    msx__json *root;
    const msx__json *cases;
    int c, n_cases = 0;
    MSX_CHECK_OK(msx_read_file(msx_test_path("medsam/cases.json"), 0, &buf, &len));
    root = msx__json_parse((const char *)buf, len, "medsam/cases.json");
    cases = root ? msx__json_get(root, "cases") : NULL;
    MSX_CHECK(cases && cases->n == 5, "medsam/cases.json: 5 cases");
    for (c = 0; cases && c < cases->n; c++) {
        const msx__json *cs = &cases->kids[c];
        char p1[256], p2[256];
        msx_image img, want;
        msx_sam_input in;
        int S = (int)msx__json_get(cs, "S")->num, x, y, ch, bad = 0, mn = 255, mx = 0;
        double sum = 0, worst = 0;
        memset(&img, 0, sizeof img);
        memset(&want, 0, sizeof want);
        memset(&in, 0, sizeof in);
        snprintf(p1, sizeof p1, "medsam/%s", msx__json_str(cs, "image"));
        snprintf(p2, sizeof p2, "medsam/%s", msx__json_str(cs, "expected_u8"));
        MSX_CHECK_OK(msx_image_load(msx_test_path(p1), &img));
        MSX_CHECK_OK(msx_image_load(msx_test_path(p2), &want));
        MSX_CHECK_OK(msx_sam_preprocess(&img, S, NULL, NULL, MSX_PREPROCESS_MEDSAM, &in));
        if (!in.data || want.w != S || want.h != S) {
            MSX_CHECK(0, "%s: no output or expected image not %dx%d", p1, S, S);
            continue;
        }
        for (x = 0; x < S * S * 3; x++) {
            mn = want.data[x] < mn ? want.data[x] : mn;
            mx = want.data[x] > mx ? want.data[x] : mx;
        }
        MSX_CHECK(mn == (int)msx__json_get(cs, "u8_min")->num && mx == (int)msx__json_get(cs, "u8_max")->num,
                  "%s: expected image range %d..%d", p1, mn, mx);
        for (y = 0; y < S; y++)
            for (x = 0; x < S; x++)
                for (ch = 0; ch < 3; ch++) {
                    double e = (double)(want.data[((size_t)y * S + x) * 3 + ch] - mn) / (double)(mx - mn);
                    double g = in.data[((size_t)ch * S + y) * S + x], d = fabs(g - e);
                    sum += g;
                    if (d > worst) worst = d;
                    if (d > 1e-6) bad++;
                }
        MSX_CHECK(bad == 0, "%s: %d of %d values differ from skimage (worst %.3g)", p1, bad, S * S * 3, worst);
        MSX_CHECK(fabs(sum - msx__json_get(cs, "float_sum")->num) <= 1e-6 * S * S * 3, "%s: sum %.6f vs %.6f", p1, sum,
                  msx__json_get(cs, "float_sum")->num);
        n_cases++;
        msx_image_free(&img);
        msx_image_free(&want);
        msx_sam_input_free(&in);
    }
    MSX_CHECK(n_cases == 5, "medsam golden: %d cases ran", n_cases);
    msx__json_free(root);
    msx_free(buf);
}

int main(void) {
    double t0 = msx_time_now();
    test_golden("tiny_a");
    test_golden("tiny_b");
    test_dice_bbox();
    test_files();
    test_png16();
    test_bad_prompts();
    test_resize_props();
    test_medsam();
    test_medsam_golden();
    test_medsam_knots();
    printf("test_image: %.2f s\n", msx_time_now() - t0);
    return msx_test_summary("test_image");
}
