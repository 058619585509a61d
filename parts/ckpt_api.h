/* ======================================================================== */
/* API: checkpoint loading (.pth zip + safe pickle subset, safetensors) and  */
/* the SAM architecture read off a checkpoint's shapes                       */
/* ======================================================================== */

#ifdef __cplusplus
extern "C" {
#endif

/* Loads any supported checkpoint, detected by content (not by extension):
   - the torch.save zip format (PK\x03\x04): data.pkl is read by a pickle
     interpreter that executes nothing; only tensor/storage/OrderedDict
     globals are interpreted, dangerous modules (os, sys, subprocess, ...)
     are refused with MSX_E_UNSAFE;
   - .safetensors (8-byte header length + JSON);
   - the legacy pre-1.6 torch format is detected and refused
     (MSX_E_UNSUPPORTED) with a hint how to re-save it.
   Wrappers {"model": ..}, {"model_state": ..}, {"state_dict": ..} are
   unwrapped, key prefixes "module.", "sam.", "_orig_mod." stripped, and
   F16/BF16/F64 tensors converted to F32 (src_dtype keeps the stored type).
   Tensors keep the file's order. */
MSXDEF msx_result msx_ckpt_load(const char *path, msx_checkpoint **out);
/* Same from memory; `what` names the source in messages. */
MSXDEF msx_result msx_ckpt_load_mem(const void *buf, size_t len, const char *what,
                                    msx_checkpoint **out);

/* torch spelling of a dtype: "float32", "bfloat16", ... */
MSXDEF const char *msx_dtype_torch_name(msx_dtype t);

/* SAM ViT-B hyperparameters (the defaults every field falls back to). */
MSXDEF void msx_sam_arch_default(msx_sam_arch *arch);
/* Every hyperparameter the shapes determine (image size, patch, embed dim,
   depth, heads from the rel-pos tables, window size, global blocks, MLP
   dims, prompt/decoder dims, mask tokens, IoU head); decoder heads default
   to 8, pixel mean/std to SAM's. MSX_E_KEY_MISMATCH if it is not SAM. */
MSXDEF msx_result msx_sam_arch_infer(const msx_checkpoint *ck, msx_sam_arch *arch);
/* Overrides the fields present in a JSON config. Accepts the official
   constructor layout ({"image_encoder": {...}, "prompt_encoder": {...},
   "mask_decoder": {"transformer": {...}}}), build_sam-style flat names
   ("encoder_embed_dim", "transformer_num_heads", ...) and the field names of
   msx_sam_arch (as written by msx_sam_arch_to_json). */
MSXDEF msx_result msx_sam_arch_load_json(const char *path, msx_sam_arch *arch);
MSXDEF msx_result msx_sam_arch_parse_json(const char *text, size_t len, const char *what,
                                          msx_sam_arch *arch);
/* JSON object with the msx_sam_arch field names; free with msx_free(). */
MSXDEF msx_result msx_sam_arch_to_json(const msx_sam_arch *arch, char **json);
/* Checks the full key set and every shape against `arch`:
   MSX_E_KEY_MISMATCH lists the first missing / unexpected names,
   MSX_E_SHAPE names the key, the shape found and the shape expected. */
MSXDEF msx_result msx_sam_validate(const msx_checkpoint *ck, const msx_sam_arch *arch);
/* Reorders the tensors into the official state_dict order for `arch`
   (validate first). Exports are then stable whatever the source order. */
MSXDEF msx_result msx_sam_canonical_order(msx_checkpoint *ck, const msx_sam_arch *arch);
/* Number of state-dict tensors of a SAM with this architecture, and the
   name/shape of the i-th in official order (0 <= i < count). */
MSXDEF int msx_sam_key_count(const msx_sam_arch *arch);
MSXDEF msx_result msx_sam_key_at(const msx_sam_arch *arch, int i, char *name, size_t name_cap,
                                 int *ndim, int64_t shape[MSX_MAX_DIMS]);
/* load + infer + JSON override (config may be NULL) + validate + canonical
   order. On failure *ck is NULL. `arch` may be NULL. */
MSXDEF msx_result msx_sam_load(const char *path, const char *config_json, msx_checkpoint **ck,
                               msx_sam_arch *arch);

#ifdef __cplusplus
}
#endif
