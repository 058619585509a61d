/* ======================================================================== */
/* API: images, masks, SAM pre/post-processing, Dice, one-call segmentation */
/* ======================================================================== */
/* This section owns everything between a PNG on disk and the network's
   input tensor, and between the decoder's low-res logits and a binary mask:
   image/mask loading (stb_image), SAM's ResizeLongestSide (bit-exact PIL 9.4
   bilinear), the MedSAM convention, prompt coordinate transforms, mask
   post-processing (torch bilinear), Dice, tight boxes, overlays and the
   high-level msx_segment_box. */

#ifdef __cplusplus
extern "C" {
#endif

#ifndef MSX_MAX_IMAGE_SIDE
#define MSX_MAX_IMAGE_SIDE 32768 /* width or height above this is refused */
#endif
#ifndef MSX_MAX_IMAGE_PIXELS
#define MSX_MAX_IMAGE_PIXELS ((int64_t)1 << 27) /* 134 Mpx (~400 MB as RGB) */
#endif
#ifndef MSX_MAX_IMAGE_FILE_BYTES
#define MSX_MAX_IMAGE_FILE_BYTES ((size_t)1 << 30) /* stb decodes from an int-sized buffer */
#endif

/* An 8-bit RGB image, HWC, row-major, owned (free with msx_image_free).
   Zero-initialise before the first load. */
typedef struct msx_image {
    int w, h;
    unsigned char *data; /* h*w*3 bytes */
} msx_image;

/* A binary mask, values 0/1, row-major, owned (free with msx_mask_free).
   Zero-initialise before first use; functions that write a mask reuse its
   buffer when the size is unchanged. */
typedef struct msx_mask {
    int w, h;
    unsigned char *data; /* h*w bytes, 0 or 1 */
} msx_mask;

/* Loads PNG/JPEG/BMP/TGA/... with stb_image. Grayscale is replicated to
   R=G=B, alpha is dropped (as PIL's convert("RGB") and cv2.imread do),
   16-bit files keep their top 8 bits (stb_image's conversion, as cv2.imread).
   Images wider/higher than MSX_MAX_IMAGE_SIDE or with more than
   MSX_MAX_IMAGE_PIXELS pixels are refused before decoding. `out` must be
   zero-initialised or hold an image (which is freed first); on failure it is
   left empty. */
MSXDEF msx_result msx_image_load(const char *path, msx_image *out);
/* Same from a memory buffer; `what` names it in error messages. */
MSXDEF msx_result msx_image_load_mem(const void *buf, size_t len, const char *what, msx_image *out);
/* Allocates a w×h image, zero-filled or a copy of `rgb` (HWC) if non-NULL;
   frees what `out` held before (it must be zero-initialised or an image). */
MSXDEF msx_result msx_image_init(msx_image *out, int w, int h, const unsigned char *rgb);
MSXDEF void msx_image_free(msx_image *img); /* accepts NULL; leaves a zeroed struct */

/* How a mask file's pixel values become 0/1. Zero-initialise, then set:
   - default (all zero): foreground = value > 0;
   - threshold = t:      foreground = value > t (the demo uses t = 127);
   - use_label = 1:      foreground = value == label (label maps); threshold ignored.
   A pixel's value is the grey level (1/2-channel files) or max(R, G, B)
   (colour files, palettes expanded); alpha is ignored. 16-bit files are
   compared in their 16-bit range (0..65535). */
typedef struct msx_mask_load_options {
    int threshold;
    int use_label;
    int label;
} msx_mask_load_options;

/* opt may be NULL (defaults). */
MSXDEF msx_result msx_mask_load(const char *path, const msx_mask_load_options *opt, msx_mask *out);
MSXDEF msx_result msx_mask_load_mem(const void *buf, size_t len, const char *what,
                                    const msx_mask_load_options *opt, msx_mask *out);
/* (Re)allocates out to w×h (keeps the buffer when the size is unchanged); zero-filled. */
MSXDEF msx_result msx_mask_init(msx_mask *out, int w, int h);
MSXDEF void msx_mask_free(msx_mask *m); /* accepts NULL; leaves a zeroed struct */
/* Writes an 8-bit grayscale PNG, 0 = background, 255 = foreground (atomic). */
MSXDEF msx_result msx_mask_save_png(const char *path, const msx_mask *m);
/* Writes an RGB PNG of `img` with the mask tinted in colour (50 % blend) and,
   if box != NULL, the box (x0 y0 x1 y1, original pixels) outlined (atomic). */
MSXDEF msx_result msx_overlay_png(const char *path, const msx_image *img, const msx_mask *mask,
                                  const float *box);

/* --- Dice and boxes --------------------------------------------------------- */
/* Dice of two 0/1 (any non-zero = 1) masks of n pixels, exactly as the
   reference: 2·Σ(P·G) / (ΣP + ΣG + 1e-8) in double. An empty prediction
   (or both empty) gives 0. */
MSXDEF double msx_dice_u8(const unsigned char *pred, const unsigned char *gt, size_t n);
/* Same on masks; MSX_E_SHAPE when the sizes differ. */
MSXDEF msx_result msx_dice(const msx_mask *pred, const msx_mask *gt, double *dice);
/* Tight bounding box of the foreground: x_min, y_min, x_max, y_max in pixel
   indices (column, row) with the maxima inclusive, as segment-anything's
   batched_mask_to_box. MSX_E_ARG for an empty mask. */
MSXDEF msx_result msx_mask_bbox(const msx_mask *m, int box[4]);

/* --- SAM / MedSAM preprocessing --------------------------------------------- */
typedef enum msx_preprocess_mode {
    /* SAM (default): ResizeLongestSide(S) = PIL 9.4 bilinear resize on uint8
       (antialiased when downscaling), (x - mean) / std per channel, zero
       padding right/bottom to S×S. Masks: upsample to S×S, crop, resize. */
    MSX_PREPROCESS_SAM = 0,
    /* MedSAM (MedSAM_Inference.py): skimage resize to S×S (bicubic spline,
       order 3, Gaussian anti-aliasing when downscaling, reflect mode, clip,
       truncation to uint8), then min-max to [0,1] over the whole image; no
       mean/std, no padding; box scaled by S/W, S/H; low-res logits resized
       straight to H×W. Must be asked for explicitly. */
    MSX_PREPROCESS_MEDSAM = 1
} msx_preprocess_mode;

/* A preprocessed image plus the geometry needed to map prompts and masks.
   Reusable: zero-initialise once, call msx_sam_preprocess for each image
   (buffers grow only when a larger image/size comes), msx_sam_input_free at
   the end. One per thread. */
typedef struct msx_sam_input {
    int S;                    /* encoder input side (arch img_size) */
    msx_preprocess_mode mode;
    int orig_h, orig_w;       /* original image size H×W */
    int in_h, in_w;           /* size after resizing, before padding */
    float *data;              /* 3×S×S, CHW, 64-byte aligned */
    /* private */
    size_t data_cap;          /* bytes allocated in data */
    void *work;               /* resampling scratch */
    size_t work_cap;          /* bytes allocated in work */
} msx_sam_input;

/* mean/std: per RGB channel (SAM: 123.675 116.28 103.53 / 58.395 57.12
   57.375); NULL = those SAM constants; ignored in MEDSAM mode. */
MSXDEF msx_result msx_sam_preprocess(const msx_image *img, int S, const float *mean, const float *std,
                                     msx_preprocess_mode mode, msx_sam_input *io);
MSXDEF void msx_sam_input_free(msx_sam_input *in);
/* Frees only the resampling scratch (keeps data and geometry): for inputs
   cached for reuse, e.g. one per calibration image. */
MSXDEF void msx_sam_input_trim(msx_sam_input *in);

/* Just the resize of ResizeLongestSide: PIL 9.4 Image.resize((dw, dh),
   BILINEAR) on uint8 RGB, bit-exact. `work` must hold
   msx_resize_pil_work_size(...) bytes. dst is dh×dw×3. */
MSXDEF size_t msx_resize_pil_work_size(int sw, int sh, int dw, int dh);
MSXDEF void msx_resize_pil_bilinear(const unsigned char *src, int sw, int sh, unsigned char *dst, int dw,
                                    int dh, void *work);
/* newh/neww of ResizeLongestSide: scale = S / max(H, W), int(H·scale + 0.5). */
MSXDEF void msx_sam_resize_shape(int h, int w, int S, int *newh, int *neww);

/* Box (x0 y0 x1 y1, original pixels) into the encoder frame. Refuses NaN/inf,
   inverted boxes (x1 < x0 or y1 < y0) and boxes not within [0, W]×[0, H];
   x0 == x1 is allowed (a one-pixel-wide box, max inclusive). SAM: apply_coords
   (x·(neww/W) in double, then float); MedSAM: x/W·S. */
MSXDEF msx_result msx_sam_transform_box(const msx_sam_input *in, const float box[4], float out[4]);
/* n points (x, y) into the encoder frame; refuses NaN/inf and points outside
   [0, W]×[0, H]. */
MSXDEF msx_result msx_sam_transform_points(const msx_sam_input *in, int n, const float *xy, float *out);

/* --- postprocessing ---------------------------------------------------------- */
/* torch F.interpolate(mode="bilinear", align_corners=False, antialias=False)
   of one float plane: src is sh×sw with row stride src_stride (so a crop can
   be read in place), dst is dh×dw contiguous. */
MSXDEF void msx_resize_bilinear_f32(const float *src, int sh, int sw, int src_stride, float *dst, int dh,
                                    int dw);
/* Floats of scratch msx_sam_postprocess needs. */
MSXDEF size_t msx_sam_postprocess_scratch(const msx_sam_input *in);
/* Sam.postprocess_masks for one mask: low-res logits (lh×lw) → S×S → crop to
   in_h×in_w → orig_h×orig_w (MedSAM: straight to orig_h×orig_w). `out`
   receives orig_h×orig_w logits. Allocates nothing. */
MSXDEF msx_result msx_sam_postprocess(const msx_sam_input *in, const float *low_res, int lh, int lw,
                                      float *out, float *scratch);
/* out = logits > threshold, as a w×h mask (reuses out's buffer). */
MSXDEF msx_result msx_mask_from_logits(const float *logits, int w, int h, float threshold, msx_mask *out);

/* --- one-call segmentation --------------------------------------------------- */
#ifndef MSX_SKIP_SAM
typedef struct msx_seg_options {
    msx_preprocess_mode preprocess; /* MSX_PREPROCESS_SAM (default) or _MEDSAM */
    float mask_threshold;           /* foreground = logit > this (default 0) */
} msx_seg_options;

/* Per-thread reusable state of a segmentation: the preprocessed input, the
   low-res logits, full-size logits and scratch. After the first image of a
   given size, segmenting allocates nothing. */
typedef struct msx_seg_ctx msx_seg_ctx;
MSXDEF msx_result msx_seg_ctx_create(msx_seg_ctx **out);
MSXDEF void msx_seg_ctx_free(msx_seg_ctx *ctx);
/* The preprocessed input of the last image given to msx_segment_box_ctx. */
MSXDEF const msx_sam_input *msx_seg_ctx_input(const msx_seg_ctx *ctx);

/* preprocess → encode → box prompt → decode (single mask, token 0) →
   postprocess → threshold. box: x0 y0 x1 y1 in original pixels. opt may be
   NULL. `ws` and `ctx` belong to the calling thread; `m` may be shared. */
MSXDEF msx_result msx_segment_box_ctx(msx_seg_ctx *ctx, const msx_sam *m, msx_sam_ws *ws,
                                      const msx_image *img, const float box[4],
                                      const msx_seg_options *opt, msx_mask *out);
/* Same on an already preprocessed input (e.g. cached per calibration image):
   skips the preprocessing; `in` must come from the arch's img_size and the
   same mode as opt->preprocess. */
MSXDEF msx_result msx_segment_input(msx_seg_ctx *ctx, const msx_sam *m, msx_sam_ws *ws,
                                    const msx_sam_input *in, const float box[4],
                                    const msx_seg_options *opt, msx_mask *out);
/* One-shot convenience: a temporary context per call (allocates). */
MSXDEF msx_result msx_segment_box(const msx_sam *m, msx_sam_ws *ws, const msx_image *img,
                                  const float box[4], const msx_seg_options *opt, msx_mask *out);
#endif

#ifdef __cplusplus
}
#endif
