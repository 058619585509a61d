/* ======================================================================== */
/* API: configuration, results, tensors and checkpoints                     */
/* ======================================================================== */

/* The implementation uses POSIX (mmap, fsync, clock_gettime); under a strict
   -std=c99 those need the feature macro before the first system header. */
#if defined(MEDSAMIX_IMPLEMENTATION) && !defined(_POSIX_C_SOURCE) && !defined(_GNU_SOURCE) && !defined(_DEFAULT_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif
#include <stddef.h>
#include <stdint.h>

#define MSX_VERSION_MAJOR 0
#define MSX_VERSION_MINOR 1
#define MSX_VERSION_PATCH 0
#define MSX_VERSION_STRING "0.1.0"

#ifndef MSXDEF
#ifdef MEDSAMIX_STATIC
#define MSXDEF static
#else
#define MSXDEF extern
#endif
#endif

#ifndef MSX_MAX_DIMS
#define MSX_MAX_DIMS 4 /* tensors have at most this many dimensions */
#endif
#ifndef MSX_MAX_MODELS
#define MSX_MAX_MODELS 8 /* base + fine-tuned models in one merge */
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Every fallible call returns one of these; msx_last_error() then holds a
   sentence naming the file, key or offset and a hint. */
typedef enum msx_result {
    MSX_OK = 0,
    MSX_E_IO,           /* open/read/write/rename failed */
    MSX_E_FORMAT,       /* malformed file (bad magic, truncated, corrupt) */
    MSX_E_UNSUPPORTED,  /* valid but not supported (legacy torch, dtype) */
    MSX_E_UNSAFE,       /* pickle asks for code we refuse to interpret */
    MSX_E_KEY_MISMATCH, /* missing / unexpected / duplicate tensor names */
    MSX_E_SHAPE,        /* shapes disagree with each other or the arch */
    MSX_E_NOMEM,        /* allocation failed */
    MSX_E_DNNL,         /* a oneDNN call failed */
    MSX_E_ARG,          /* invalid argument (NaN, out of range, NULL) */
    MSX_E_LIMIT,        /* a size limit was exceeded (MSX_MAX_FILE_BYTES, ...) */
    MSX_E_CANCELLED,    /* stopped on request (Ctrl-C) */
    MSX_E_STATE,        /* wrong call order or inconsistent saved state */
    MSX_RESULT_COUNT
} msx_result;

MSXDEF const char *msx_result_str(msx_result r);
/* Detail of the last failure on this thread ("" if none). */
MSXDEF const char *msx_last_error(void);
MSXDEF void msx_clear_error(void);

typedef enum msx_dtype {
    MSX_F32 = 0,
    MSX_F16,
    MSX_BF16,
    MSX_F64,
    MSX_I64,
    MSX_I32,
    MSX_I16,
    MSX_I8,
    MSX_U8,
    MSX_BOOL,
    MSX_DTYPE_COUNT
} msx_dtype;

MSXDEF const char *msx_dtype_name(msx_dtype t); /* safetensors spelling: "F32" */
MSXDEF size_t msx_dtype_size(msx_dtype t);

/* A named, contiguous, row-major tensor. `data` is 64-byte aligned and owned
   by the checkpoint that holds the tensor. */
typedef struct msx_tensor {
    char *name;
    msx_dtype dtype;     /* dtype of `data` (F32 for everything loaded as weights) */
    msx_dtype src_dtype; /* dtype as stored in the file it came from */
    int ndim;
    int64_t shape[MSX_MAX_DIMS];
    int64_t numel;
    void *data;
} msx_tensor;

/* An ordered table of tensors with O(1) lookup by name. */
typedef struct msx_checkpoint {
    msx_tensor *tensors;
    int n, cap;
    int *index;          /* open-addressing hash: slot -> tensor index or -1 */
    int index_cap;
    char *path;          /* file it was loaded from (may be NULL) */
    char *metadata_json; /* safetensors __metadata__ as JSON text, or NULL */
} msx_checkpoint;

MSXDEF msx_checkpoint *msx_ckpt_new(void);
MSXDEF void msx_ckpt_free(msx_checkpoint *c); /* accepts NULL */
/* Adds a tensor (data copied when `data` != NULL, zero-filled otherwise).
   Fails with MSX_E_KEY_MISMATCH on a duplicate name. */
MSXDEF msx_result msx_ckpt_add(msx_checkpoint *c, const char *name, msx_dtype dtype,
                               int ndim, const int64_t *shape, const void *data,
                               msx_tensor **out);
MSXDEF msx_tensor *msx_ckpt_find(const msx_checkpoint *c, const char *name);
/* Deep copy (same order, same names). */
MSXDEF msx_result msx_ckpt_clone(const msx_checkpoint *src, msx_checkpoint **out);
/* Renames tensor i in place (keeps the index consistent). */
MSXDEF msx_result msx_ckpt_rename(msx_checkpoint *c, int i, const char *new_name);
/* Removes the tensors for which keep[i] == 0 (order of the rest kept). */
MSXDEF void msx_ckpt_filter(msx_checkpoint *c, const unsigned char *keep);
/* Converts every floating tensor (F16/BF16/F64) to F32 in place. */
MSXDEF msx_result msx_ckpt_to_f32(msx_checkpoint *c);
/* Float64 sum and sum of |x| of a tensor's elements (any numeric dtype). */
MSXDEF void msx_tensor_sums(const msx_tensor *t, double *sum, double *abs_sum);

/* --- safetensors ------------------------------------------------------- */
/* Reads a .safetensors file. Tensors keep their stored dtype. */
MSXDEF msx_result msx_safetensors_load(const char *path, msx_checkpoint **out);
MSXDEF msx_result msx_safetensors_load_mem(const void *buf, size_t len, const char *what,
                                           msx_checkpoint **out);
/* Writes all tensors of `c` (stored dtype) atomically: temp file + rename.
   `metadata` is NULL or an array of n_meta key/value string pairs. */
MSXDEF msx_result msx_safetensors_save(const char *path, const msx_checkpoint *c,
                                       const char *const *metadata, int n_meta);

/* --- small utilities shared by the sections and the tools ---------------- */
typedef struct msx_rng { uint64_t s[4]; } msx_rng; /* xoshiro256** */
MSXDEF void msx_rng_seed(msx_rng *r, uint64_t seed);
MSXDEF uint64_t msx_rng_u64(msx_rng *r);
MSXDEF double msx_rng_uniform(msx_rng *r);           /* [0, 1) */
MSXDEF double msx_rng_normal(msx_rng *r);            /* N(0, 1) */
MSXDEF uint64_t msx_rng_below(msx_rng *r, uint64_t n); /* [0, n) unbiased */

MSXDEF double msx_time_now(void); /* monotonic seconds */

/* Writes `len` bytes to `path` atomically (temp file in the same folder,
   fsync, rename). */
MSXDEF msx_result msx_write_file_atomic(const char *path, const void *data, size_t len);
/* Reads a whole file (at most max_bytes; 0 = MSX_MAX_FILE_BYTES). Free with
   msx_free(). */
MSXDEF msx_result msx_read_file(const char *path, size_t max_bytes, void **data, size_t *len);
MSXDEF void *msx_malloc(size_t n);
MSXDEF void msx_free(void *p);

#ifdef __cplusplus
}
#endif

/* --- SAM architecture ---------------------------------------------------- */
/* Every hyperparameter of a Segment Anything model. Most are read off the
   checkpoint's shapes (msx_sam_arch_infer); decoder heads cannot be, so they
   default to 8 and may come from a JSON config. */
typedef struct msx_sam_arch {
    /* image encoder (ViT) */
    int img_size, patch_size, in_chans;
    int embed_dim, depth, num_heads, mlp_dim;
    int window_size;                 /* 0 = no windowed blocks */
    int n_global, global_idx[64];    /* blocks with global attention */
    int use_rel_pos, use_abs_pos;
    int rel_pos_len_win, rel_pos_len_glob; /* rows of the rel-pos tables */
    int abs_pos_size;                /* pos_embed grid side (64 for ViT-B) */
    int out_chans;                   /* neck output = prompt embed dim */
    /* prompt encoder */
    int prompt_dim, mask_in_chans;
    /* mask decoder */
    int dec_depth, dec_dim, dec_mlp_dim, dec_heads, dec_downsample;
    int num_mask_tokens;             /* num_multimask_outputs + 1 */
    int iou_head_depth, iou_head_hidden;
    /* preprocessing constants (not in the state dict) */
    float pixel_mean[3], pixel_std[3];
} msx_sam_arch;
