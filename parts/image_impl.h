/* ======================================================================== */
/* IMPLEMENTATION: images, masks, SAM pre/post-processing, Dice, segment.   */
/* Owns the pixel side of the pipeline: stb_image decoding, PIL-exact       */
/* ResizeLongestSide, the MedSAM resize, torch-exact mask upsampling, Dice, */
/* boxes, overlays and msx_segment_box on top of the SAM section.           */
/* ======================================================================== */

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifndef MSX_NO_STB_IMAGE
/* Debian's libstb.so already holds the implementations: declarations only. */
#include <stb/stb_image.h>
#include <stb/stb_image_write.h>
#endif

/* ---- small private helpers -------------------------------------------------- */

/* Grows a 64-byte aligned buffer to at least `bytes` (contents not kept). */
static int msx__img_reserve(void **p, size_t *cap, size_t bytes) {
    void *n;
    if (*p && *cap >= bytes) return 1;
    n = msx__aligned_alloc(bytes ? bytes : 1);
    if (!n) return 0;
    msx__aligned_free(*p);
    *p = n;
    *cap = bytes;
    return 1;
}

static msx_result msx__img_check_dims(const char *what, int w, int h) {
    if (w <= 0 || h <= 0)
        return msx__err(MSX_E_FORMAT, "%s: image has zero area (%d x %d)", what, w, h);
    if (w > MSX_MAX_IMAGE_SIDE || h > MSX_MAX_IMAGE_SIDE || (int64_t)w * h > MSX_MAX_IMAGE_PIXELS)
        return msx__err(MSX_E_LIMIT,
                        "%s: %d x %d image exceeds the limits (side %d, %lld pixels; raise "
                        "MSX_MAX_IMAGE_SIDE / MSX_MAX_IMAGE_PIXELS)",
                        what, w, h, (int)MSX_MAX_IMAGE_SIDE, (long long)MSX_MAX_IMAGE_PIXELS);
    return MSX_OK;
}

/* ---- images and masks --------------------------------------------------------- */

MSXDEF void msx_image_free(msx_image *img) {
    if (!img) return;
    MSX_FREE(img->data);
    img->data = NULL;
    img->w = img->h = 0;
}

MSXDEF msx_result msx_image_init(msx_image *out, int w, int h, const unsigned char *rgb) {
    msx_result r;
    size_t n;
    if (!out) return msx__err(MSX_E_ARG, "msx_image_init: out is NULL");
    msx_image_free(out);
    if ((r = msx__img_check_dims("msx_image_init", w, h)) != MSX_OK) return r;
    n = (size_t)w * (size_t)h * 3;
    out->data = (unsigned char *)MSX_MALLOC(n);
    if (!out->data) return msx__err(MSX_E_NOMEM, "msx_image_init: cannot allocate %d x %d RGB", w, h);
    if (rgb) memcpy(out->data, rgb, n);
    else memset(out->data, 0, n);
    out->w = w;
    out->h = h;
    return MSX_OK;
}

MSXDEF void msx_mask_free(msx_mask *m) {
    if (!m) return;
    MSX_FREE(m->data);
    m->data = NULL;
    m->w = m->h = 0;
}

MSXDEF msx_result msx_mask_init(msx_mask *out, int w, int h) {
    msx_result r;
    if (!out) return msx__err(MSX_E_ARG, "msx_mask_init: out is NULL");
    if ((r = msx__img_check_dims("msx_mask_init", w, h)) != MSX_OK) return r;
    if (!out->data || out->w != w || out->h != h) {
        MSX_FREE(out->data);
        out->w = out->h = 0;
        out->data = (unsigned char *)MSX_MALLOC((size_t)w * (size_t)h);
        if (!out->data) return msx__err(MSX_E_NOMEM, "msx_mask_init: cannot allocate %d x %d", w, h);
        out->w = w;
        out->h = h;
    }
    memset(out->data, 0, (size_t)w * (size_t)h);
    return MSX_OK;
}

#ifndef MSX_NO_STB_IMAGE
static msx_result msx__img_probe(const void *buf, size_t len, const char *what, int *w, int *h, int *n) {
    if (!buf || len == 0) return msx__err(MSX_E_FORMAT, "%s: empty image file", what);
    if (len > MSX_MAX_IMAGE_FILE_BYTES || len > (size_t)INT_MAX)
        return msx__err(MSX_E_LIMIT, "%s: %lu bytes is larger than MSX_MAX_IMAGE_FILE_BYTES", what,
                        (unsigned long)len);
    /* Read the header first so absurd dimensions are refused before stb allocates. */
    if (!stbi_info_from_memory((const stbi_uc *)buf, (int)len, w, h, n)) {
        const char *why = stbi_failure_reason();
        return msx__err(MSX_E_FORMAT, "%s: cannot decode image (%s); PNG, JPEG, BMP, TGA, PNM, GIF are supported",
                        what, why ? why : "unknown format");
    }
    return msx__img_check_dims(what, *w, *h);
}
#endif

MSXDEF msx_result msx_image_load_mem(const void *buf, size_t len, const char *what, msx_image *out) {
#ifdef MSX_NO_STB_IMAGE
    (void)buf; (void)len;
    msx_image_free(out);
    return msx__err(MSX_E_UNSUPPORTED, "%s: built with MSX_NO_STB_IMAGE, cannot decode images", what ? what : "image");
#else
    int w, h, n;
    stbi_uc *px;
    msx_result r;
    if (!what) what = "image";
    if (!out) return msx__err(MSX_E_ARG, "%s: out is NULL", what);
    msx_image_free(out);
    if ((r = msx__img_probe(buf, len, what, &w, &h, &n)) != MSX_OK) return r;
    /* stb converts to 3 channels: grey replicated, alpha dropped, 16 bit -> top 8 bits. */
    px = stbi_load_from_memory((const stbi_uc *)buf, (int)len, &w, &h, &n, 3);
    if (!px) {
        const char *why = stbi_failure_reason();
        return msx__err(MSX_E_FORMAT, "%s: cannot decode image (%s)", what, why ? why : "unknown error");
    }
    r = msx_image_init(out, w, h, px);
    stbi_image_free(px);
    return r;
#endif
}

MSXDEF msx_result msx_image_load(const char *path, msx_image *out) {
    void *buf;
    size_t len;
    msx_result r;
    if (!path) return msx__err(MSX_E_ARG, "msx_image_load: path is NULL");
    msx_image_free(out);
    if ((r = msx_read_file(path, MSX_MAX_IMAGE_FILE_BYTES, &buf, &len)) != MSX_OK) return r;
    r = msx_image_load_mem(buf, len, path, out);
    msx_free(buf);
    return r;
}

MSXDEF msx_result msx_mask_load_mem(const void *buf, size_t len, const char *what,
                                    const msx_mask_load_options *opt, msx_mask *out) {
#ifdef MSX_NO_STB_IMAGE
    (void)buf; (void)len; (void)opt; (void)out;
    return msx__err(MSX_E_UNSUPPORTED, "%s: built with MSX_NO_STB_IMAGE, cannot decode masks", what ? what : "mask");
#else
    int w, h, n, is16, c;
    size_t i, npx;
    void *px;
    msx_result r;
    msx_mask_load_options o;
    if (!what) what = "mask";
    if (!out) return msx__err(MSX_E_ARG, "%s: out is NULL", what);
    memset(&o, 0, sizeof o);
    if (opt) o = *opt;
    if ((r = msx__img_probe(buf, len, what, &w, &h, &n)) != MSX_OK) return r;
    is16 = stbi_is_16_bit_from_memory((const stbi_uc *)buf, (int)len);
    if (is16) px = stbi_load_16_from_memory((const stbi_uc *)buf, (int)len, &w, &h, &n, 0);
    else px = stbi_load_from_memory((const stbi_uc *)buf, (int)len, &w, &h, &n, 0);
    if (!px) {
        const char *why = stbi_failure_reason();
        return msx__err(MSX_E_FORMAT, "%s: cannot decode mask (%s)", what, why ? why : "unknown error");
    }
    if ((r = msx_mask_init(out, w, h)) != MSX_OK) { stbi_image_free(px); return r; }
    npx = (size_t)w * (size_t)h;
    for (i = 0; i < npx; i++) {
        int v;
        if (is16) {
            const unsigned short *p = (const unsigned short *)px + i * (size_t)n;
            v = p[0];
            if (n >= 3) for (c = 1; c < 3; c++) v = p[c] > v ? p[c] : v;
        } else {
            const unsigned char *p = (const unsigned char *)px + i * (size_t)n;
            v = p[0];
            if (n >= 3) for (c = 1; c < 3; c++) v = p[c] > v ? p[c] : v;
        }
        out->data[i] = (unsigned char)(o.use_label ? v == o.label : v > o.threshold);
    }
    stbi_image_free(px);
    return MSX_OK;
#endif
}

MSXDEF msx_result msx_mask_load(const char *path, const msx_mask_load_options *opt, msx_mask *out) {
    void *buf;
    size_t len;
    msx_result r;
    if (!path) return msx__err(MSX_E_ARG, "msx_mask_load: path is NULL");
    if ((r = msx_read_file(path, MSX_MAX_IMAGE_FILE_BYTES, &buf, &len)) != MSX_OK) return r;
    r = msx_mask_load_mem(buf, len, path, opt, out);
    msx_free(buf);
    return r;
}

#ifndef MSX_NO_STB_IMAGE
static void msx__img_png_sink(void *ctx, void *data, int size) {
    msx__sb_putn((msx__sb *)ctx, (const char *)data, (size_t)size);
}

/* Encodes w×h×comp bytes as PNG in memory and writes it atomically. */
static msx_result msx__img_write_png(const char *path, int w, int h, int comp, const unsigned char *px) {
    msx__sb sb;
    msx_result r;
    memset(&sb, 0, sizeof sb);
    if (!stbi_write_png_to_func(msx__img_png_sink, &sb, w, h, comp, px, w * comp) || sb.oom) {
        msx__sb_free(&sb);
        return msx__err(MSX_E_NOMEM, "%s: PNG encoding failed (out of memory?)", path);
    }
    r = msx_write_file_atomic(path, sb.s, sb.n);
    msx__sb_free(&sb);
    return r;
}
#endif

MSXDEF msx_result msx_mask_save_png(const char *path, const msx_mask *m) {
#ifdef MSX_NO_STB_IMAGE
    (void)m;
    return msx__err(MSX_E_UNSUPPORTED, "%s: built with MSX_NO_STB_IMAGE, cannot write PNG", path ? path : "");
#else
    unsigned char *px;
    size_t i, n;
    msx_result r;
    if (!path || !m || !m->data || m->w <= 0 || m->h <= 0)
        return msx__err(MSX_E_ARG, "msx_mask_save_png: NULL path or empty mask");
    n = (size_t)m->w * (size_t)m->h;
    px = (unsigned char *)MSX_MALLOC(n);
    if (!px) return msx__err(MSX_E_NOMEM, "%s: out of memory", path);
    for (i = 0; i < n; i++) px[i] = m->data[i] ? 255 : 0;
    r = msx__img_write_png(path, m->w, m->h, 1, px);
    MSX_FREE(px);
    return r;
#endif
}

MSXDEF msx_result msx_overlay_png(const char *path, const msx_image *img, const msx_mask *mask, const float *box) {
#ifdef MSX_NO_STB_IMAGE
    (void)img; (void)mask; (void)box;
    return msx__err(MSX_E_UNSUPPORTED, "%s: built with MSX_NO_STB_IMAGE, cannot write PNG", path ? path : "");
#else
    static const unsigned char tint[3] = {30, 144, 255}; /* segment-anything's demo blue */
    static const unsigned char edge[3] = {0, 255, 0};
    unsigned char *px;
    size_t i, n;
    int c, t, x, y;
    msx_result r;
    if (!path || !img || !img->data || img->w <= 0 || img->h <= 0)
        return msx__err(MSX_E_ARG, "msx_overlay_png: NULL path or empty image");
    if (mask && (mask->w != img->w || mask->h != img->h || !mask->data))
        return msx__err(MSX_E_SHAPE, "%s: mask is %d x %d but the image is %d x %d", path, mask->w, mask->h,
                        img->w, img->h);
    n = (size_t)img->w * (size_t)img->h;
    px = (unsigned char *)MSX_MALLOC(n * 3);
    if (!px) return msx__err(MSX_E_NOMEM, "%s: out of memory", path);
    memcpy(px, img->data, n * 3);
    if (mask)
        for (i = 0; i < n; i++)
            if (mask->data[i])
                for (c = 0; c < 3; c++) px[i * 3 + c] = (unsigned char)((px[i * 3 + c] + tint[c] + 1) / 2);
    if (box) {
        int bx[4];
        for (c = 0; c < 4; c++) {
            float v = box[c];
            float lim = (float)((c & 1) ? img->h - 1 : img->w - 1);
            if (!(v == v)) v = 0; /* NaN: draw at the border rather than fail */
            v = v < 0 ? 0 : v > lim ? lim : v;
            bx[c] = (int)floorf(v + 0.5f);
        }
        t = (img->w < img->h ? img->w : img->h) / 256 + 1; /* outline thickness grows with size */
        for (y = bx[1]; y <= bx[3]; y++)
            for (x = bx[0]; x <= bx[2]; x++)
                if (x - bx[0] < t || bx[2] - x < t || y - bx[1] < t || bx[3] - y < t)
                    for (c = 0; c < 3; c++) px[((size_t)y * img->w + x) * 3 + c] = edge[c];
    }
    r = msx__img_write_png(path, img->w, img->h, 3, px);
    MSX_FREE(px);
    return r;
#endif
}

/* ---- Dice and boxes ---------------------------------------------------------- */

MSXDEF double msx_dice_u8(const unsigned char *pred, const unsigned char *gt, size_t n) {
    size_t i, sp = 0, sg = 0, inter = 0;
    for (i = 0; i < n; i++) {
        int p = pred[i] != 0, g = gt[i] != 0;
        sp += (size_t)p;
        sg += (size_t)g;
        inter += (size_t)(p & g);
    }
    /* the reference's formula; an empty prediction gives exactly 0 */
    return 2.0 * (double)inter / ((double)sp + (double)sg + 1e-8);
}

MSXDEF msx_result msx_dice(const msx_mask *pred, const msx_mask *gt, double *dice) {
    if (!pred || !gt || !dice || !pred->data || !gt->data) return msx__err(MSX_E_ARG, "msx_dice: NULL mask");
    if (pred->w != gt->w || pred->h != gt->h)
        return msx__err(MSX_E_SHAPE, "msx_dice: prediction is %d x %d but the ground truth is %d x %d", pred->w,
                        pred->h, gt->w, gt->h);
    *dice = msx_dice_u8(pred->data, gt->data, (size_t)pred->w * (size_t)pred->h);
    return MSX_OK;
}

MSXDEF msx_result msx_mask_bbox(const msx_mask *m, int box[4]) {
    int x, y, x0, y0, x1, y1;
    if (!m || !m->data || !box) return msx__err(MSX_E_ARG, "msx_mask_bbox: NULL mask");
    x0 = m->w;
    y0 = m->h;
    x1 = y1 = -1;
    for (y = 0; y < m->h; y++) {
        const unsigned char *row = m->data + (size_t)y * m->w;
        for (x = 0; x < m->w; x++)
            if (row[x]) {
                if (x < x0) x0 = x;
                if (x > x1) x1 = x;
                if (y < y0) y0 = y;
                y1 = y;
            }
    }
    if (x1 < 0) return msx__err(MSX_E_ARG, "msx_mask_bbox: the %d x %d mask is empty, there is no box", m->w, m->h);
    box[0] = x0;
    box[1] = y0;
    box[2] = x1;
    box[3] = y1;
    return MSX_OK;
}

/* ---- PIL 9.4 bilinear resize (ResizeLongestSide) -------------------------------- */
/* Mirrors Pillow's src/libImaging/Resample.c for mode RGB, BILINEAR: per
   output sample a triangle filter of support max(1, in/out) centred at
   (i + 0.5)·in/out, weights normalised in double, then converted to 22-bit
   fixed point (round half away from zero); horizontal pass over the rows the
   vertical pass needs, rounded and clipped to uint8, then the vertical pass.
   A pass whose size is unchanged is skipped, as in ImagingResampleInner. */

#define MSX__PIL_PREC 22 /* Pillow's PRECISION_BITS = 32 - 8 - 2 */

static int msx__pil_ksize(int in, int out) {
    double scale = (double)in / out;
    if (scale < 1.0) scale = 1.0;
    return (int)ceil(scale) * 2 + 1;
}

static double msx__pil_tri(double x) {
    if (x < 0.0) x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}

static void msx__pil_coeffs(int in_size, int out_size, int ksize, int32_t *kk, int *bounds) {
    double scale = (double)(float)in_size / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 1.0 * filterscale, ss = 1.0 / filterscale;
    int xx, x;
    for (xx = 0; xx < out_size; xx++) {
        double center = (xx + 0.5) * scale, ww = 0.0;
        int xmin = (int)(center - support + 0.5), xmax;
        int32_t *k = kk + (size_t)xx * ksize;
        if (xmin < 0) xmin = 0;
        xmax = (int)(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        for (x = 0; x < xmax; x++) ww += msx__pil_tri((x + xmin - center + 0.5) * ss);
        for (x = 0; x < xmax; x++) {
            double w = msx__pil_tri((x + xmin - center + 0.5) * ss);
            if (ww != 0.0) w /= ww;
            k[x] = w < 0 ? (int32_t)(-0.5 + w * (1 << MSX__PIL_PREC)) : (int32_t)(0.5 + w * (1 << MSX__PIL_PREC));
        }
        for (; x < ksize; x++) k[x] = 0;
        bounds[2 * xx] = xmin;
        bounds[2 * xx + 1] = xmax;
    }
}

static unsigned char msx__pil_clip8(int32_t v) {
    if (v < 0) return 0;
    v >>= MSX__PIL_PREC;
    return (unsigned char)(v > 255 ? 255 : v);
}

static size_t msx__align64(size_t n) { return (n + 63) & ~(size_t)63; }

MSXDEF size_t msx_resize_pil_work_size(int sw, int sh, int dw, int dh) {
    size_t kh = (size_t)msx__pil_ksize(sw, dw), kv = (size_t)msx__pil_ksize(sh, dh);
    return msx__align64(kh * dw * 4) + msx__align64((size_t)dw * 2 * sizeof(int)) + msx__align64(kv * dh * 4) +
           msx__align64((size_t)dh * 2 * sizeof(int)) + msx__align64((size_t)dw * sh * 3) +
           msx__align64((size_t)dw * 3 * sizeof(int32_t)) + 64;
}

MSXDEF void msx_resize_pil_bilinear(const unsigned char *src, int sw, int sh, unsigned char *dst, int dw, int dh,
                                    void *work) {
    int need_h = dw != sw, need_v = dh != sh;
    int kh = msx__pil_ksize(sw, dw), kv = msx__pil_ksize(sh, dh);
    unsigned char *wp = (unsigned char *)(((uintptr_t)work + 63) & ~(uintptr_t)63);
    int32_t *kk_h = (int32_t *)wp;
    int *b_h = (int *)(wp += msx__align64((size_t)kh * dw * 4));
    int32_t *kk_v = (int32_t *)(wp += msx__align64((size_t)dw * 2 * sizeof(int)));
    int *b_v = (int *)(wp += msx__align64((size_t)kv * dh * 4));
    unsigned char *tmp = (wp += msx__align64((size_t)dh * 2 * sizeof(int)));
    int32_t *acc = (int32_t *)(wp += msx__align64((size_t)dw * sh * 3)); /* one output row */
    const unsigned char *vin = src; /* input of the vertical pass */
    int vin_w = sw, xx, yy, i;
    if (!need_h && !need_v) {
        memcpy(dst, src, (size_t)sw * sh * 3);
        return;
    }
    msx__pil_coeffs(sh, dh, kv, kk_v, b_v);
    if (need_h) {
        int y_first = b_v[0], y_last = b_v[2 * (dh - 1)] + b_v[2 * (dh - 1) + 1];
        unsigned char *hout = need_v ? tmp : dst;
        msx__pil_coeffs(sw, dw, kh, kk_h, b_h);
        for (i = 0; i < dh; i++) b_v[2 * i] -= y_first;
        for (yy = 0; yy < y_last - y_first; yy++) {
            const unsigned char *row = src + (size_t)(yy + y_first) * sw * 3;
            unsigned char *o = hout + (size_t)yy * dw * 3;
            for (xx = 0; xx < dw; xx++) {
                int xmin = b_h[2 * xx], xmax = b_h[2 * xx + 1], x;
                const int32_t *k = kk_h + (size_t)xx * kh;
                int32_t s0 = 1 << (MSX__PIL_PREC - 1), s1 = s0, s2 = s0;
                for (x = 0; x < xmax; x++) {
                    const unsigned char *p = row + (size_t)(x + xmin) * 3;
                    s0 += p[0] * k[x];
                    s1 += p[1] * k[x];
                    s2 += p[2] * k[x];
                }
                o[3 * xx] = msx__pil_clip8(s0);
                o[3 * xx + 1] = msx__pil_clip8(s1);
                o[3 * xx + 2] = msx__pil_clip8(s2);
            }
        }
        vin = tmp;
        vin_w = dw;
    }
    if (need_v) {
        for (yy = 0; yy < dh; yy++) {
            int ymin = b_v[2 * yy], ymax = b_v[2 * yy + 1], y;
            const int32_t *k = kk_v + (size_t)yy * kv;
            unsigned char *o = dst + (size_t)yy * dw * 3;
            /* row-wise accumulation: same integer sums as Pillow's per-pixel loop */
            for (xx = 0; xx < vin_w * 3; xx++) acc[xx] = 1 << (MSX__PIL_PREC - 1);
            for (y = 0; y < ymax; y++) {
                const unsigned char *row = vin + (size_t)(y + ymin) * vin_w * 3;
                int32_t ky = k[y];
                for (xx = 0; xx < vin_w * 3; xx++) acc[xx] += row[xx] * ky;
            }
            for (xx = 0; xx < vin_w * 3; xx++) o[xx] = msx__pil_clip8(acc[xx]);
        }
    }
}

MSXDEF void msx_sam_resize_shape(int h, int w, int S, int *newh, int *neww) {
    double scale = (double)S / (double)(h > w ? h : w);
    *newh = (int)((double)h * scale + 0.5);
    *neww = (int)((double)w * scale + 0.5);
}

/* ---- MedSAM resize (skimage.transform.resize, order 3, anti_aliasing) ----------- */
/* skimage >= 0.19 with preserve_range=True: float64 image; when shrinking an
   axis, ndi.gaussian_filter with sigma = (in/out - 1)/2, mode 'mirror',
   truncate 4; then ndi.zoom(order=3, mode='mirror', grid_mode=True): cubic
   B-spline prefilter (pole sqrt(3) - 2, mirror boundary) and evaluation at
   in = (out + 0.5)·in/out - 0.5; clip to the input's [min, max]; MedSAM then
   truncates to uint8. Separable, so done axis by axis per channel. */

static int msx__mirror(int i, int n) {
    int period;
    if (n == 1) return 0;
    period = 2 * n - 2;
    if (i < 0) i = -i;
    i %= period;
    return i >= n ? period - i : i;
}

/* Gaussian blur of a strided line (n samples) via `line` scratch (n doubles)
   and kernel `kw` (2r+1 doubles). */
static void msx__gauss_line(double *p, ptrdiff_t stride, int n, const double *kw, int r, double *line) {
    int i, j;
    for (i = 0; i < n; i++) line[i] = p[i * stride];
    for (i = 0; i < n; i++) {
        double s = 0;
        for (j = -r; j <= r; j++) s += kw[j + r] * line[msx__mirror(i + j, n)];
        p[i * stride] = s;
    }
}

static void msx__spline_prefilter_line(double *p, ptrdiff_t stride, int n) {
    const double z = sqrt(3.0) - 2.0;
    double zn, z2n, iz, sum;
    int i;
    if (n < 2) return;
    for (i = 0; i < n; i++) p[i * stride] *= 6.0; /* gain (1 - z)(1 - 1/z) */
    /* causal init, mirror boundary (as scipy's _init_causal_mirror) */
    zn = z;
    iz = 1.0 / z;
    z2n = pow(z, (double)(n - 1));
    sum = p[0] + z2n * p[(n - 1) * stride];
    z2n *= z2n * iz;
    for (i = 1; i <= n - 2; i++) {
        sum += (zn + z2n) * p[i * stride];
        zn *= z;
        z2n *= iz;
    }
    p[0] = sum / (1.0 - zn * zn);
    for (i = 1; i < n; i++) p[i * stride] += z * p[(i - 1) * stride];
    p[(n - 1) * stride] = (z / (z * z - 1.0)) * (z * p[(n - 2) * stride] + p[(n - 1) * stride]);
    for (i = n - 2; i >= 0; i--) p[i * stride] = z * (p[(i + 1) * stride] - p[i * stride]);
}

/* Cubic B-spline evaluation of coefficient line c (n, stride cs) at m output
   positions of a grid_mode zoom, into o (stride os). */
static void msx__spline_zoom_line(const double *c, ptrdiff_t cs, int n, double *o, ptrdiff_t os, int m) {
    double zoom = (double)n / m;
    int k, j;
    for (k = 0; k < m; k++) {
        double x = (k + 0.5) * zoom - 0.5, fl = floor(x), t = x - fl, w[4], s = 0;
        int start = (int)fl - 1;
        w[0] = (1 - t) * (1 - t) * (1 - t) / 6.0;
        w[1] = (4.0 - 6.0 * t * t + 3.0 * t * t * t) / 6.0;
        w[2] = (1.0 + 3.0 * t + 3.0 * t * t - 3.0 * t * t * t) / 6.0;
        w[3] = t * t * t / 6.0;
        for (j = 0; j < 4; j++) s += w[j] * c[msx__mirror(start + j, n) * cs];
        o[k * os] = s;
    }
}

static size_t msx__medsam_work_size(int w, int h, int S) {
    int mx = w > h ? w : h;
    size_t kr = 0;
    double f;
    if (S > mx) mx = S;
    f = (double)(w > h ? w : h) / S;
    if (f > 1.0) kr = (size_t)(4.0 * (f - 1.0) / 2.0 + 0.5) * 2 + 1;
    return ((size_t)w * h + (size_t)h * S + (size_t)mx + kr + 8) * sizeof(double) + msx__align64((size_t)S * S * 3) +
           128;
}

/* The resize alone: S×S×3 uint8 into u8 (HWC). `work` as msx__medsam_work_size. */
static void msx__medsam_resize_u8(const msx_image *img, int S, unsigned char *u8, void *work) {
    int W = img->w, H = img->h, c, x, y, j;
    size_t i, npx = (size_t)W * H;
    double *a = (double *)(((uintptr_t)work + 63) & ~(uintptr_t)63); /* H×W, one channel */
    double *b = a + npx;                                               /* H×S after the x zoom */
    double *line = b + (size_t)H * S;
    int mx = W > H ? W : H;
    double *kw = line + (mx > S ? mx : S);
    double vmin = 255, vmax = 0;
    double axis_f[2], sig;
    int r[2];
    axis_f[0] = (double)H / S;
    axis_f[1] = (double)W / S;
    for (j = 0; j < 2; j++) {
        sig = axis_f[j] > 1.0 ? (axis_f[j] - 1.0) / 2.0 : 0.0;
        r[j] = sig > 0 ? (int)(4.0 * sig + 0.5) : 0; /* scipy: radius = int(truncate·sigma + 0.5) */
    }
    for (i = 0; i < npx * 3; i++) {
        double v = img->data[i];
        vmin = v < vmin ? v : vmin;
        vmax = v > vmax ? v : vmax;
    }
    for (c = 0; c < 3; c++) {
        for (i = 0; i < npx; i++) a[i] = img->data[i * 3 + c];
        for (j = 0; j < 2; j++) { /* j = 0: along y (columns), j = 1: along x (rows) */
            int n = j ? W : H, lines = j ? H : W, l;
            double ksum = 0;
            if (r[j] == 0) continue;
            sig = (axis_f[j] - 1.0) / 2.0;
            for (x = -r[j]; x <= r[j]; x++) ksum += (kw[x + r[j]] = exp(-0.5 * x * x / (sig * sig)));
            for (x = 0; x <= 2 * r[j]; x++) kw[x] /= ksum;
            for (l = 0; l < lines; l++)
                msx__gauss_line(j ? a + (size_t)l * W : a + l, j ? 1 : W, n, kw, r[j], line);
        }
        /* spline prefilter on axes that are resampled (identity axes are exact) */
        if (H != S)
            for (x = 0; x < W; x++) msx__spline_prefilter_line(a + x, W, H);
        if (W != S)
            for (y = 0; y < H; y++) msx__spline_prefilter_line(a + (size_t)y * W, 1, W);
        for (y = 0; y < H; y++) {
            if (W != S) msx__spline_zoom_line(a + (size_t)y * W, 1, W, b + (size_t)y * S, 1, S);
            else memcpy(b + (size_t)y * S, a + (size_t)y * W, (size_t)S * sizeof(double));
        }
        for (x = 0; x < S; x++) {
            if (H != S) msx__spline_zoom_line(b + x, S, H, line, 1, S);
            else
                for (y = 0; y < S; y++) line[y] = b[(size_t)y * S + x];
            for (y = 0; y < S; y++) {
                double v = line[y];
                int u;
                v = v < vmin ? vmin : v > vmax ? vmax : v; /* clip=True */
                u = (int)v;                                 /* .astype(np.uint8) truncates */
                u8[((size_t)y * S + x) * 3 + c] = (unsigned char)u;
            }
        }
    }
}

/* Resize, then MedSAM's min-max over the whole image to [0, 1], CHW float. */
static void msx__medsam_resize(const msx_image *img, int S, float *dst, void *work) {
    size_t i, hw = (size_t)S * S;
    unsigned char *u8 = (unsigned char *)work;
    int c, umin = 255, umax = 0;
    double rng;
    msx__medsam_resize_u8(img, S, u8, (unsigned char *)work + msx__align64(hw * 3));
    for (i = 0; i < hw * 3; i++) {
        umin = u8[i] < umin ? u8[i] : umin;
        umax = u8[i] > umax ? u8[i] : umax;
    }
    rng = (double)(umax - umin);
    if (rng < 1e-8) rng = 1e-8; /* np.clip(max - min, 1e-8, None) */
    for (c = 0; c < 3; c++)
        for (i = 0; i < hw; i++) dst[(size_t)c * hw + i] = (float)(((double)u8[i * 3 + c] - umin) / rng);
}

/* ---- preprocessing ------------------------------------------------------------ */

static const float msx__sam_mean[3] = {123.675f, 116.28f, 103.53f};
static const float msx__sam_std[3] = {58.395f, 57.12f, 57.375f};

MSXDEF void msx_sam_input_free(msx_sam_input *in) {
    if (!in) return;
    msx__aligned_free(in->data);
    msx__aligned_free(in->work);
    memset(in, 0, sizeof *in);
}

MSXDEF void msx_sam_input_trim(msx_sam_input *in) {
    if (!in) return;
    msx__aligned_free(in->work);
    in->work = NULL;
    in->work_cap = 0;
}

MSXDEF msx_result msx_sam_preprocess(const msx_image *img, int S, const float *mean, const float *std,
                                     msx_preprocess_mode mode, msx_sam_input *io) {
    msx_result r;
    size_t plane, wbytes;
    int c;
    if (!img || !io || !img->data) return msx__err(MSX_E_ARG, "msx_sam_preprocess: NULL image or output");
    if ((r = msx__img_check_dims("msx_sam_preprocess", img->w, img->h)) != MSX_OK) return r;
    if (S <= 0 || S > MSX_MAX_IMAGE_SIDE)
        return msx__err(MSX_E_ARG, "msx_sam_preprocess: input size S = %d is out of range", S);
    if (mode != MSX_PREPROCESS_SAM && mode != MSX_PREPROCESS_MEDSAM)
        return msx__err(MSX_E_ARG, "msx_sam_preprocess: unknown preprocessing mode %d", (int)mode);
    if (!mean) mean = msx__sam_mean;
    if (!std) std = msx__sam_std;
    for (c = 0; c < 3; c++)
        if (!(std[c] > 0) || !isfinite(std[c]) || !isfinite(mean[c]))
            return msx__err(MSX_E_ARG, "msx_sam_preprocess: pixel_std[%d] = %g / pixel_mean = %g is not usable", c,
                            (double)std[c], (double)mean[c]);
    plane = (size_t)S * S;
    if (!msx__img_reserve((void **)&io->data, &io->data_cap, plane * 3 * sizeof(float)))
        return msx__err(MSX_E_NOMEM, "msx_sam_preprocess: cannot allocate the 3 x %d x %d input", S, S);
    io->S = S;
    io->mode = mode;
    io->orig_h = img->h;
    io->orig_w = img->w;
    if (mode == MSX_PREPROCESS_MEDSAM) {
        io->in_h = io->in_w = S;
        wbytes = msx__medsam_work_size(img->w, img->h, S);
        if (!msx__img_reserve(&io->work, &io->work_cap, wbytes))
            return msx__err(MSX_E_NOMEM, "msx_sam_preprocess: cannot allocate %lu bytes of MedSAM resize scratch",
                            (unsigned long)wbytes);
        msx__medsam_resize(img, S, io->data, io->work);
        return MSX_OK;
    }
    msx_sam_resize_shape(img->h, img->w, S, &io->in_h, &io->in_w);
    if (io->in_h < 1 || io->in_w < 1) /* PIL refuses a zero-sized resize too */
        return msx__err(MSX_E_ARG, "msx_sam_preprocess: a %d x %d image resized to longest side %d has zero %s",
                        img->w, img->h, S, io->in_h < 1 ? "height" : "width");
    {
        int nh = io->in_h, nw = io->in_w, x, y;
        const unsigned char *rs;
        if (nw == img->w && nh == img->h) rs = img->data; /* PIL returns a copy: identity */
        else {
            unsigned char *out;
            wbytes = msx_resize_pil_work_size(img->w, img->h, nw, nh) + msx__align64((size_t)nw * nh * 3) + 64;
            if (!msx__img_reserve(&io->work, &io->work_cap, wbytes))
                return msx__err(MSX_E_NOMEM, "msx_sam_preprocess: cannot allocate %lu bytes of resize scratch",
                                (unsigned long)wbytes);
            out = (unsigned char *)io->work;
            msx_resize_pil_bilinear(img->data, img->w, img->h, out, nw, nh, out + msx__align64((size_t)nw * nh * 3));
            rs = out;
        }
        /* Sam.preprocess: (x - mean) / std in float32, then zero padding */
        memset(io->data, 0, plane * 3 * sizeof(float));
        for (c = 0; c < 3; c++) {
            float *o = io->data + (size_t)c * plane, lut[256];
            for (x = 0; x < 256; x++) lut[x] = ((float)x - mean[c]) / std[c]; /* same float ops, once per level */
            for (y = 0; y < nh; y++)
                for (x = 0; x < nw; x++) o[(size_t)y * S + x] = lut[rs[((size_t)y * nw + x) * 3 + c]];
        }
    }
    return MSX_OK;
}

/* ---- prompt transforms --------------------------------------------------------- */

static msx_result msx__img_check_xy(const msx_sam_input *in, double x, double y, const char *what, int i) {
    if (!isfinite(x) || !isfinite(y))
        return msx__err(MSX_E_ARG, "%s %d: coordinate is NaN or infinite", what, i);
    if (x < 0 || y < 0 || x > in->orig_w || y > in->orig_h)
        return msx__err(MSX_E_ARG, "%s %d: (%g, %g) lies outside the %d x %d image", what, i, x, y, in->orig_w,
                        in->orig_h);
    return MSX_OK;
}

static void msx__img_xy(const msx_sam_input *in, const float *p, float *o) {
    if (in->mode == MSX_PREPROCESS_MEDSAM) {
        /* MedSAM_Inference.py: box / [W, H, W, H] * S in float64 */
        o[0] = (float)((double)p[0] / in->orig_w * in->S);
        o[1] = (float)((double)p[1] / in->orig_h * in->S);
    } else {
        /* ResizeLongestSide.apply_coords: x * (neww / W) in float64 */
        o[0] = (float)((double)p[0] * ((double)in->in_w / in->orig_w));
        o[1] = (float)((double)p[1] * ((double)in->in_h / in->orig_h));
    }
}

MSXDEF msx_result msx_sam_transform_box(const msx_sam_input *in, const float box[4], float out[4]) {
    msx_result r;
    if (!in || !box || !out || in->orig_w <= 0) return msx__err(MSX_E_ARG, "msx_sam_transform_box: NULL argument");
    if ((r = msx__img_check_xy(in, box[0], box[1], "box corner", 0)) != MSX_OK) return r;
    if ((r = msx__img_check_xy(in, box[2], box[3], "box corner", 1)) != MSX_OK) return r;
    if (box[2] < box[0] || box[3] < box[1])
        return msx__err(MSX_E_ARG, "box (%g, %g, %g, %g) is empty: need x0 <= x1 and y0 <= y1 (x_min, y_min, x_max, y_max)",
                        (double)box[0], (double)box[1], (double)box[2], (double)box[3]);
    msx__img_xy(in, box, out);
    msx__img_xy(in, box + 2, out + 2);
    return MSX_OK;
}

MSXDEF msx_result msx_sam_transform_points(const msx_sam_input *in, int n, const float *xy, float *out) {
    int i;
    msx_result r;
    if (!in || (n > 0 && (!xy || !out)) || n < 0) return msx__err(MSX_E_ARG, "msx_sam_transform_points: bad arguments");
    for (i = 0; i < n; i++) {
        if ((r = msx__img_check_xy(in, xy[2 * i], xy[2 * i + 1], "point", i)) != MSX_OK) return r;
        msx__img_xy(in, xy + 2 * i, out + 2 * i);
    }
    return MSX_OK;
}

/* ---- postprocessing (torch bilinear, align_corners=False) ---------------------- */
/* As ATen's upsample_bilinear2d on CPU: scale = (float)in / out; source index
   = scale·(i + 0.5) - 0.5 clamped at 0, index0 = trunc, index1 = index0 + 1
   unless at the last row; lambda in float; out = (a·wx0 + b·wx1)·wy0 +
   (c·wx0 + d·wx1)·wy1. Equal sizes copy. Only the top-left oh×ow block of the
   dh×dw result is computed (postprocess_masks crops it right away). */

static void msx__torch_lin(int in, int out, int i, int *i0, int *i1, float *l0, float *l1) {
    float scale, real, lam;
    if (in == out) {
        *i0 = *i1 = i;
        *l0 = 1.0f;
        *l1 = 0.0f;
        return;
    }
    scale = (float)in / (float)out;
    real = (float)((double)scale * (i + 0.5) - 0.5);
    if (real < 0) real = 0;
    *i0 = (int)real;
    *i1 = *i0 + (*i0 < in - 1 ? 1 : 0);
    lam = real - (float)*i0;
    lam = lam < 0 ? 0 : lam > 1 ? 1 : lam;
    *l1 = lam;
    *l0 = 1.0f - lam;
}

#define MSX__BLK_COLS 256 /* column weights are computed per block on the stack */

static void msx__bilinear_block(const float *src, int sh, int sw, int sstride, float *dst, int dstride, int dh,
                                int dw, int oh, int ow) {
    int xi0[MSX__BLK_COLS], xi1[MSX__BLK_COLS], i, j, jb, nb;
    float xw0[MSX__BLK_COLS], xw1[MSX__BLK_COLS];
    for (jb = 0; jb < ow; jb += MSX__BLK_COLS) {
        nb = ow - jb < MSX__BLK_COLS ? ow - jb : MSX__BLK_COLS;
        for (j = 0; j < nb; j++) msx__torch_lin(sw, dw, jb + j, &xi0[j], &xi1[j], &xw0[j], &xw1[j]);
        for (i = 0; i < oh; i++) {
            int y0, y1;
            float wy0, wy1;
            const float *r0, *r1;
            float *o = dst + (size_t)i * dstride + jb;
            msx__torch_lin(sh, dh, i, &y0, &y1, &wy0, &wy1);
            r0 = src + (size_t)y0 * sstride;
            r1 = src + (size_t)y1 * sstride;
            for (j = 0; j < nb; j++) {
                float t0 = r0[xi0[j]] * xw0[j], t1 = r1[xi0[j]] * xw0[j];
                t0 += r0[xi1[j]] * xw1[j];
                t1 += r1[xi1[j]] * xw1[j];
                o[j] = t0 * wy0 + t1 * wy1;
            }
        }
    }
}

MSXDEF void msx_resize_bilinear_f32(const float *src, int sh, int sw, int src_stride, float *dst, int dh, int dw) {
    msx__bilinear_block(src, sh, sw, src_stride, dst, dw, dh, dw, dh, dw);
}

MSXDEF size_t msx_sam_postprocess_scratch(const msx_sam_input *in) {
    if (!in || in->mode == MSX_PREPROCESS_MEDSAM) return 0;
    if (in->in_h == in->orig_h && in->in_w == in->orig_w) return 0;
    return (size_t)in->in_h * (size_t)in->in_w;
}

MSXDEF msx_result msx_sam_postprocess(const msx_sam_input *in, const float *low_res, int lh, int lw, float *out,
                                      float *scratch) {
    if (!in || !low_res || !out || in->S <= 0) return msx__err(MSX_E_ARG, "msx_sam_postprocess: NULL argument");
    if (lh <= 0 || lw <= 0) return msx__err(MSX_E_ARG, "msx_sam_postprocess: low-res size %d x %d", lh, lw);
    if (in->mode == MSX_PREPROCESS_MEDSAM) {
        /* MedSAM_Inference.py interpolates the low-res logits straight to (H, W) */
        msx_resize_bilinear_f32(low_res, lh, lw, lw, out, in->orig_h, in->orig_w);
        return MSX_OK;
    }
    if (in->in_h == in->orig_h && in->in_w == in->orig_w) {
        /* the second interpolation is the identity: write the crop directly */
        msx__bilinear_block(low_res, lh, lw, lw, out, in->orig_w, in->S, in->S, in->in_h, in->in_w);
        return MSX_OK;
    }
    if (!scratch) return msx__err(MSX_E_ARG, "msx_sam_postprocess: scratch of %lu floats required",
                                  (unsigned long)msx_sam_postprocess_scratch(in));
    msx__bilinear_block(low_res, lh, lw, lw, scratch, in->in_w, in->S, in->S, in->in_h, in->in_w);
    msx__bilinear_block(scratch, in->in_h, in->in_w, in->in_w, out, in->orig_w, in->orig_h, in->orig_w, in->orig_h,
                        in->orig_w);
    return MSX_OK;
}

MSXDEF msx_result msx_mask_from_logits(const float *logits, int w, int h, float threshold, msx_mask *out) {
    size_t i, n;
    msx_result r;
    if (!logits || !out) return msx__err(MSX_E_ARG, "msx_mask_from_logits: NULL argument");
    if (!out->data || out->w != w || out->h != h)
        if ((r = msx_mask_init(out, w, h)) != MSX_OK) return r;
    n = (size_t)w * (size_t)h;
    for (i = 0; i < n; i++) out->data[i] = (unsigned char)(logits[i] > threshold);
    return MSX_OK;
}

/* ---- one-call segmentation ------------------------------------------------------ */
#ifndef MSX_SKIP_SAM

struct msx_seg_ctx {
    msx_sam_input in;
    float *low_res, *logits, *scratch;
    size_t low_res_cap, logits_cap, scratch_cap; /* bytes */
};

MSXDEF msx_result msx_seg_ctx_create(msx_seg_ctx **out) {
    if (!out) return msx__err(MSX_E_ARG, "msx_seg_ctx_create: out is NULL");
    *out = (msx_seg_ctx *)msx__calloc(1, sizeof **out);
    return *out ? MSX_OK : msx__err(MSX_E_NOMEM, "msx_seg_ctx_create: out of memory");
}

MSXDEF void msx_seg_ctx_free(msx_seg_ctx *ctx) {
    if (!ctx) return;
    msx_sam_input_free(&ctx->in);
    msx__aligned_free(ctx->low_res);
    msx__aligned_free(ctx->logits);
    msx__aligned_free(ctx->scratch);
    MSX_FREE(ctx);
}

MSXDEF const msx_sam_input *msx_seg_ctx_input(const msx_seg_ctx *ctx) { return ctx ? &ctx->in : NULL; }

MSXDEF msx_result msx_segment_input(msx_seg_ctx *ctx, const msx_sam *m, msx_sam_ws *ws, const msx_sam_input *in,
                                    const float box[4], const msx_seg_options *opt, msx_mask *out) {
    const msx_sam_arch *a;
    msx_seg_options o;
    msx_prompt p;
    float bin[4];
    int side;
    size_t nlow, nout, nscr;
    msx_result r;
    if (!ctx || !m || !ws || !in || !box || !out || !in->data)
        return msx__err(MSX_E_ARG, "msx_segment_input: NULL argument");
    memset(&o, 0, sizeof o);
    if (opt) o = *opt;
    if (!isfinite(o.mask_threshold)) return msx__err(MSX_E_ARG, "msx_segment: mask_threshold is not finite");
    a = msx_sam_get_arch(m);
    if (!a || a->patch_size <= 0) return msx__err(MSX_E_STATE, "msx_segment: model has no architecture");
    if (in->S != a->img_size || in->mode != o.preprocess)
        return msx__err(MSX_E_ARG,
                        "msx_segment: input was preprocessed for size %d mode %d but the model takes %d and the options "
                        "ask for mode %d",
                        in->S, (int)in->mode, a->img_size, (int)o.preprocess);
    if ((r = msx_sam_transform_box(in, box, bin)) != MSX_OK) return r;
    side = 4 * (a->img_size / a->patch_size);
    nlow = (size_t)side * side * sizeof(float);
    nout = (size_t)in->orig_w * in->orig_h * sizeof(float);
    nscr = msx_sam_postprocess_scratch(in) * sizeof(float);
    if (!msx__img_reserve((void **)&ctx->low_res, &ctx->low_res_cap, nlow) ||
        !msx__img_reserve((void **)&ctx->logits, &ctx->logits_cap, nout) ||
        !msx__img_reserve((void **)&ctx->scratch, &ctx->scratch_cap, nscr))
        return msx__err(MSX_E_NOMEM, "msx_segment: cannot allocate the %d x %d mask buffers", in->orig_w, in->orig_h);
    if ((r = msx_sam_encode(m, ws, in->data, NULL)) != MSX_OK) return r;
    memset(&p, 0, sizeof p);
    p.box = bin;
    if ((r = msx_sam_decode(m, ws, NULL, &p, 0, ctx->low_res, NULL)) != MSX_OK) return r;
    if ((r = msx_sam_postprocess(in, ctx->low_res, side, side, ctx->logits, ctx->scratch)) != MSX_OK) return r;
    return msx_mask_from_logits(ctx->logits, in->orig_w, in->orig_h, o.mask_threshold, out);
}

MSXDEF msx_result msx_segment_box_ctx(msx_seg_ctx *ctx, const msx_sam *m, msx_sam_ws *ws, const msx_image *img,
                                      const float box[4], const msx_seg_options *opt, msx_mask *out) {
    const msx_sam_arch *a;
    const float *mean = NULL, *std = NULL;
    msx_result r;
    if (!ctx || !m || !img) return msx__err(MSX_E_ARG, "msx_segment_box: NULL argument");
    a = msx_sam_get_arch(m);
    if (!a) return msx__err(MSX_E_STATE, "msx_segment_box: model has no architecture");
    /* a zero-initialised arch (std 0) means SAM's constants */
    if (a->pixel_std[0] > 0 && a->pixel_std[1] > 0 && a->pixel_std[2] > 0) {
        mean = a->pixel_mean;
        std = a->pixel_std;
    }
    if ((r = msx_sam_preprocess(img, a->img_size, mean, std, opt ? opt->preprocess : MSX_PREPROCESS_SAM, &ctx->in)) !=
        MSX_OK)
        return r;
    return msx_segment_input(ctx, m, ws, &ctx->in, box, opt, out);
}

MSXDEF msx_result msx_segment_box(const msx_sam *m, msx_sam_ws *ws, const msx_image *img, const float box[4],
                                  const msx_seg_options *opt, msx_mask *out) {
    msx_seg_ctx *ctx;
    msx_result r = msx_seg_ctx_create(&ctx);
    if (r != MSX_OK) return r;
    r = msx_segment_box_ctx(ctx, m, ws, img, box, opt, out);
    msx_seg_ctx_free(ctx);
    return r;
}

#endif /* MSX_SKIP_SAM */
