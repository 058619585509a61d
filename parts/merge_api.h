/* ======================================================================== */
/* API: layer-wise merging. Owns the four merge methods of the official     */
/* MedSAMix code (Linear, Task Arithmetic, TIES, SLERP; ref §1), the mapping */
/* of SAM state-dict keys to merge groups (ref §2.2), merge plans (JSON     */
/* "medsamix-plan-v1"), the merger that runs a plan into a preallocated     */
/* model every trial, and the export of a merged model.                     */
/* ======================================================================== */

#ifndef MSX_MERGE_MAX_WARNINGS
#define MSX_MERGE_MAX_WARNINGS 32 /* warnings kept in a report (all are counted) */
#endif
#define MSX_GROUP_ID_LEN 48       /* bytes of a group id, NUL included */

#ifdef __cplusplus
extern "C" {
#endif

/* --- methods ----------------------------------------------------------------
   Model index 0 is always the base, 1..N the fine-tuned models in order. */
typedef enum msx_merge_method {
    MSX_MERGE_LINEAR = 0,         /* out = Σ_i (w_i/Σw) x_i over base + fine-tuned (ref §1.1) */
    MSX_MERGE_TASK_ARITHMETIC,    /* out = base + λ Σ_i (x_i - base), fine-tuned only (ref §1.2) */
    MSX_MERGE_TIES,               /* trim (drop rate r), elect sign, disjoint mean, base + λτ (ref §1.3) */
    MSX_MERGE_SLERP,              /* pairwise SLERP of the two models with the largest t (ref §1.4) */
    MSX_MERGE_METHOD_COUNT
} msx_merge_method;

/* Exact plan spelling: "linear", "task_arithmetic", "ties", "slerp". */
MSXDEF const char *msx_merge_method_name(msx_merge_method m);
/* Parses the exact plan spelling; MSX_E_ARG (message lists the valid
   names) otherwise. */
MSXDEF msx_result msx_merge_method_parse(const char *name, msx_merge_method *out);

/* One group's method and hyperparameters (the reference's names in brackets).
   Only the fields of `method` are read:
     linear:           weights[0..n_models-1] >= 0 (base first) [model_<M>_..._weights]
     task_arithmetic:  scale (finite)                           [scaling_coefficient]
     ties:             drop_rate in [0,1], scale                 [param_value_mask_rate, scaling_coefficient]
     slerp:            t[0..n_models-1] in [0,1] (base first)    [model_<M>_..._slerp_t] */
typedef struct msx_group_plan {
    msx_merge_method method;
    double weights[MSX_MAX_MODELS];
    double t[MSX_MAX_MODELS];
    double drop_rate;
    double scale;
} msx_group_plan;

/* A merge plan: one msx_group_plan per group, in the canonical group order
     layer_0 .. layer_<L-1>, special_pos_embed, special_patch_embed,
     special_neck, prompt_encoder_group_0..3, mask_decoder_group_0..5
   (L = ceil(depth / granularity); n_groups = L + 13). */
typedef struct msx_plan {
    int granularity;             /* encoder blocks per layer group (>= 1; the paper uses 1..4) */
    int n_models;                /* base + fine-tuned, 2..MSX_MAX_MODELS */
    int n_layer_groups;          /* L */
    int n_groups;                /* L + 13 */
    char (*ids)[MSX_GROUP_ID_LEN]; /* group ids, n_groups entries */
    msx_group_plan *groups;        /* n_groups entries, same order as ids */
} msx_plan;

/* --- layer groups (ref §2.2) --------------------------------------------- */
/* Group id of a SAM state-dict key for this granularity: encoder block b ->
   "layer_<b / granularity>" (the last, shorter chunk gets its own id; the
   reference's remainder bug is not reproduced), "special_pos_embed",
   "special_patch_embed", "special_neck", "prompt_encoder_group_0..3",
   "mask_decoder_group_0..5". The positional-encoding buffer
   prompt_encoder.pe_layer.positional_encoding_gaussian_matrix is never
   merged: id "" and MSX_OK. Unknown keys: MSX_E_KEY_MISMATCH. */
MSXDEF msx_result msx_merge_key_group(const char *key, int granularity, char id[MSX_GROUP_ID_LEN]);
/* Number of groups for an encoder depth: ceil(depth/granularity) + 13. */
MSXDEF int msx_merge_n_groups(int depth, int granularity);

/* --- plans ----------------------------------------------------------------- */
/* All groups of a model with `depth` encoder blocks, each set to linear
   one-hot on the base (the merge reproduces the base). */
MSXDEF msx_result msx_plan_create(int depth, int n_models, int granularity, msx_plan **out);
MSXDEF void msx_plan_free(msx_plan *p); /* accepts NULL */
MSXDEF msx_result msx_plan_clone(const msx_plan *p, msx_plan **out);
/* Index of a group id, or -1. */
MSXDEF int msx_plan_find(const msx_plan *p, const char *id);
/* Checks every group's hyperparameters (NaN, ranges, method); the message
   names the group. */
MSXDEF msx_result msx_plan_validate(const msx_plan *p);
/* Every group := *g (validated first). */
MSXDEF msx_result msx_plan_set_uniform(msx_plan *p, const msx_group_plan *g);
/* Uniform baselines by name (one method and setting for all groups):
     "base" / "model<k>"   linear one-hot on model k (0 = base)
     "linear_avg"          linear, equal weights over base + fine-tuned
     "ta_<s>"              task_arithmetic with scale s          (e.g. "ta_0.5")
     "ties_d<r>_s<s>"      ties with drop rate r and scale s     (e.g. "ties_d0.5_s1.0")
     "slerp_<t>"           slerp with every per-model t = t (picks base vs model 1, t = 0.5) */
MSXDEF msx_result msx_plan_set_preset(msx_plan *p, const char *name);
/* The reference's hand-made initial configurations (ref §2.5), all uniform,
   in its order: linear one-hot on each model (n_models), slerp all-t
   0.3/0.5/0.7, task_arithmetic λ ∈ {0.3,0.5,0.6,0.7,0.8,1.0}, ties with the
   same λ and drop rate 0.2. Count = n_models + 15; i in [0, count). */
MSXDEF int msx_plan_n_initial(int n_models);
MSXDEF msx_result msx_plan_set_initial(msx_plan *p, int i);

/* JSON ("medsamix-plan-v1"):
     {"format": "medsamix-plan-v1", "granularity": 2, "n_models": 3,
      "groups": {"layer_0": {"method": "ties", "drop_rate": 0.3, "scale": 0.5},
                 "layer_1": {"method": "linear", "weights": [0.6, 0.59, 0.12]},
                 "special_pos_embed": {"method": "slerp", "t": [0.93, 0.0, 0.90]},
                 "mask_decoder_group_3": {"method": "task_arithmetic", "scale": 0.3}, ...}}
   Every group must be present (the number of layer groups is read off the
   layer_<k> ids, which must be contiguous from 0); extra keys are ignored.
   "n_models" is optional; it is otherwise taken from the weights / t arrays,
   whose lengths must all agree (one entry per model, base first). A plan
   with neither (only task_arithmetic / ties groups) gets n_models = 0 and
   fits any merger. Parse errors name the file and group. */
MSXDEF msx_result msx_plan_parse_json(const char *text, size_t len, const char *what, msx_plan **out);
MSXDEF msx_result msx_plan_load_json(const char *path, msx_plan **out);
/* Serialises the plan (one group per line); free *json with msx_free(). */
MSXDEF msx_result msx_plan_to_json(const msx_plan *p, char **json);
/* Writes the JSON atomically (temp file + rename). */
MSXDEF msx_result msx_plan_save_json(const char *path, const msx_plan *p);

/* Pair selection of SLERP (ref §1.4): stable sort of the models by t,
   descending; v0 = first, v1 = second, t = e^{t_v1} / (e^{t_v0} + e^{t_v1})
   in double. */
MSXDEF void msx_merge_slerp_pair(const double *t, int n_models, int *v0, int *v1, double *t_out);

/* --- per-tensor methods on float arrays (ref §1.1-1.4) --------------------
   float32 arithmetic in the reference's order (scalars rounded to float32
   first, sources accumulated sequentially), so Linear/TA/TIES are bit-exact
   with the official code. `out` must not alias the inputs. Linear and TA
   spread blocks of large tensors over OpenMP threads; TIES and SLERP run on
   the calling thread (the merger runs many tensors in parallel). */
/* src[0..n_src-1] with weights (normalised by their double sum). Σw == 0:
   MSX_E_ARG (the reference raises; its pipeline then keeps the base). */
MSXDEF msx_result msx_merge_tensor_linear(float *out, const float *const *src, const double *weights,
                                          int n_src, int64_t n);
/* base + fl32(scale) * (Σ_i (ft_i - base)); n_ft < 2: MSX_E_ARG (the
   reference indexes task vector [1] and raises; its pipeline keeps the base). */
MSXDEF msx_result msx_merge_tensor_ta(float *out, const float *base, const float *const *ft, int n_ft,
                                      double scale, int64_t n);
/* TIES on one tensor. k = (int64)(n * drop_rate); k == 0: no trim; else the
   k-th smallest |ft_i - base| (1-based, found by selection, never a sort)
   is row i's threshold and |d| >= thr is kept; sign election by summed
   mass, zero sums take the tensor-wide majority sign; disjoint mean;
   base + fl32(scale) τ. Selection: a sample brackets the k-th value, one
   streaming pass counts below the bracket and gathers the ~1.5% inside,
   and a histogram + quickselect picks the exact value among those (exact
   fallback on a full copy if the bracket missed). `scratch` is NULL
   (allocated per call when trimming) or holds
   msx_merge_ties_scratch_floats(n, n_ft) floats. */
MSXDEF msx_result msx_merge_tensor_ties(float *out, const float *base, const float *const *ft, int n_ft,
                                        double drop_rate, double scale, int64_t n, float *scratch);
MSXDEF size_t msx_merge_ties_scratch_floats(int64_t n, int n_ft);
/* SLERP of v0 -> v1 by t in [0,1] (norms, dot, acos, sin in double; lerp
   when |cos| > 0.9995; a tensor with norm <= 1e-10 is not normalised). */
MSXDEF msx_result msx_merge_tensor_slerp(float *out, const float *v0, const float *v1, double t, int64_t n);

/* --- the merger ------------------------------------------------------------- */
/* Warnings of one run: each reference "keep-the-base" case (TA with one
   fine-tuned model, all-zero linear weights) is reported once per group. */
typedef struct msx_merge_report {
    int n_warnings;                  /* all warnings (may exceed the kept ones) */
    int n_tensors_kept_base;         /* tensors left at the base by such a case */
    int n_tensors_merged;            /* tensors written by a method */
    int64_t n_elements;              /* elements written (all tensors) */
    double seconds;
    char warnings[MSX_MERGE_MAX_WARNINGS][192];
} msx_merge_report;

/* Zero-initialise, then set what you need. */
typedef struct msx_merge_options {
    int strict;    /* 1: keep-the-base cases are MSX_E_ARG errors instead of warnings */
    int n_threads; /* OpenMP threads of one run; 0 = omp_get_max_threads() */
} msx_merge_options;

typedef struct msx_merger msx_merger;

/* Checks that every fine-tuned model has exactly the base's keys, shapes
   and F32 dtype (errors name the model and the key), maps every key to its
   group for `granularity` (unknown keys are refused), reads the encoder
   depth off the keys, and allocates all scratch. Borrows base and ft: they
   must outlive the merger and not change. 1 <= n_ft < MSX_MAX_MODELS. */
MSXDEF msx_result msx_merger_create(const msx_checkpoint *base, const msx_checkpoint *const *ft, int n_ft,
                                    int granularity, msx_merger **out);
MSXDEF void msx_merger_free(msx_merger *m); /* accepts NULL */
MSXDEF void msx_merger_set_options(msx_merger *m, const msx_merge_options *opt);
MSXDEF int msx_merger_depth(const msx_merger *m);
MSXDEF int msx_merger_n_models(const msx_merger *m); /* base + fine-tuned */
/* Group index (into a plan of this merger's shape) of tensor i of the base,
   -1 for the never-merged buffer. */
MSXDEF int msx_merger_tensor_group(const msx_merger *m, int i);
/* A plan of the right shape (linear one-hot on the base). */
MSXDEF msx_result msx_merger_plan_create(const msx_merger *m, msx_plan **out);
/* Runs `plan` into `out`, a model with the base's keys and shapes (make it
   once with msx_ckpt_clone(base)); every tensor is overwritten. One OpenMP
   region: threads take work items dynamically (whole tensors for TIES and
   SLERP, largest first, then 256K-element chunks of linear / TA / copied
   tensors). Nothing is allocated except, on the first run with a TIES
   group, per-thread TIES scratch (about n_ft x the largest tensor) that is
   kept for later runs. Different mergers may run concurrently on different
   outputs (e.g. 2 search threads with n_threads = 1 each); one merger is
   not re-entrant. `report` may be NULL. Errors (plan of another shape,
   strict-mode keep-the-base case) leave `out` untouched. */
MSXDEF msx_result msx_merger_run(msx_merger *m, const msx_plan *plan, msx_checkpoint *out,
                                 msx_merge_report *report);

/* Writes `merged` as .safetensors (the exact SAM key names, F32, the plan
   JSON also in __metadata__["medsamix_plan"]) and the plan JSON beside it:
   `path` with a trailing ".safetensors" replaced by ".plan.json" (otherwise
   ".plan.json" is appended). plan may be NULL (no plan file). Atomic. */
MSXDEF msx_result msx_merge_export(const char *path, const msx_checkpoint *merged, const msx_plan *plan);

#ifdef __cplusplus
}
#endif
