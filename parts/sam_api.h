/* ======================================================================== */
/* API: SAM forward pass (image encoder, prompt encoder, mask decoder)      */
/* ======================================================================== */
/* Thread safety: an msx_sam is read-only after msx_sam_create/msx_sam_refresh
   and may be shared by any number of threads; an msx_sam_ws (activations,
   oneDNN scratchpad) belongs to one thread at a time. */

#ifdef __cplusplus
extern "C" {
#endif

typedef enum msx_precision { MSX_PREC_FP32 = 0, MSX_PREC_BF16 = 1 } msx_precision;

/* Zero-initialise, then set what you need. */
typedef struct msx_sam_options {
    msx_precision precision; /* MSX_PREC_FP32 (default, the reference path) or BF16
                                (MSX_E_UNSUPPORTED where oneDNN has no bf16 matmul,
                                e.g. AVX2-only CPUs) */
    int n_threads;           /* OpenMP/oneDNN threads per evaluation; 0 = omp_get_max_threads().
                                Also the most a workspace may use (msx_sam_ws_set_threads).
                                Models under MSX_SAM_SMALL_FLOPS (2e10) FLOP per encode
                                (e.g. 256-px demo models) always run on 1 thread: there
                                threading costs more than it gains; run evaluations
                                concurrently instead. */
} msx_sam_options;

typedef struct msx_sam msx_sam;       /* model: arch + weights (borrowed) + packed copies */
typedef struct msx_sam_ws msx_sam_ws; /* per-thread workspace */

/* Builds a model over the tensors of `ck` (borrowed: ck must outlive the
   model; all F32). arch == NULL: inferred from the shapes (msx_sam_arch_infer).
   opt may be NULL (fp32, all threads). Creates every oneDNN primitive. */
MSXDEF msx_result msx_sam_create(const msx_checkpoint *ck, const msx_sam_arch *arch,
                                 const msx_sam_options *opt, msx_sam **out);
/* Call after the weights in the borrowed checkpoint changed (e.g. a merge
   into it): re-reads the tensor pointers, re-packs derived weights (neck 3×3
   weights, resized rel-pos tables, transposed-conv biases, dense PE) and
   allocates nothing. MSX_E_SHAPE if a shape changed since msx_sam_create. */
MSXDEF msx_result msx_sam_refresh(msx_sam *m);
MSXDEF void msx_sam_free(msx_sam *m);
MSXDEF const msx_sam_arch *msx_sam_get_arch(const msx_sam *m);

MSXDEF msx_result msx_sam_ws_create(const msx_sam *m, msx_sam_ws **out);
MSXDEF void msx_sam_ws_free(msx_sam_ws *ws);

/* Image encoder: `input` is the preprocessed 3×S×S image (CHW, normalised,
   padded). The D×h×w embedding stays in ws and is copied to `emb` if non-NULL. */
MSXDEF msx_result msx_sam_encode(const msx_sam *m, msx_sam_ws *ws, const float *input, float *emb);

/* Prompts, in the resized-input frame (SAM's apply_coords already applied). */
typedef struct msx_prompt {
    const float *box;        /* x0 y0 x1 y1, or NULL */
    int n_points;            /* 0..64 */
    const float *points;     /* n_points × (x, y) */
    const int *labels;       /* n_points: 1 foreground, 0 background, -1 padding */
    const float *mask_input; /* 1×4h×4w low-res logits, or NULL */
} msx_prompt;

/* Prompt encoder + mask decoder over the embedding of the last encode (or
   `emb` if non-NULL). multimask = 0: 1 mask (token 0); 1: 3 masks (tokens
   1..3). low_res: n×4h×4w logits; iou: n scores (either may be NULL). */
MSXDEF msx_result msx_sam_decode(const msx_sam *m, msx_sam_ws *ws, const float *emb,
                                 const msx_prompt *p, int multimask, float *low_res, float *iou);

/* Intermediate activations of the last encode/decode, for tests and
   debugging: "patch_embed" (h×w×C), "block<i>" (h×w×C), "neck" (D×h×w),
   "sparse" (N×D), "dense" (D×h×w), "dense_pe" (D×h×w). NULL if unknown;
   *n receives the element count. */
MSXDEF const float *msx_sam_ws_tap(const msx_sam_ws *ws, const char *name, int *n);

/* --- additions by the SAM section ---------------------------------------- */
/* Keeps "patch_embed" and every "block<i>" of later encodes (depth·h·w·C
   floats, ~150 MB at ViT-B; off by default). Allocates, so call it once
   before the runs you want to inspect. */
MSXDEF msx_result msx_sam_ws_enable_taps(msx_sam_ws *ws);
/* Threads used by evaluations on this workspace (1..the model's n_threads;
   default: the model's n_threads). Two workspaces with 1 thread each can run
   concurrently on one model. */
MSXDEF msx_result msx_sam_ws_set_threads(msx_sam_ws *ws, int n_threads);
/* Floating-point operations of one encode / one decode with n_sparse sparse
   tokens, as implemented (multiply-add = 2), for GFLOP/s reports. */
MSXDEF double msx_sam_encode_flops(const msx_sam *m);
MSXDEF double msx_sam_decode_flops(const msx_sam *m, int n_sparse, int with_mask_input);
#define MSX_SAM_MAX_POINTS 64 /* msx_prompt.n_points limit */

#ifdef __cplusplus
}
#endif
