/* medsamix inspect: architecture and per-tensor digest of a checkpoint. */
#include "../medsamix.h"
#include "cli.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void inspect_usage(FILE *f) {
    fprintf(f, "usage: medsamix inspect FILE [--json] [--config C.json]\n"
               "  FILE            .pth (torch.save zip) or .safetensors checkpoint\n"
               "  --json          print one JSON object {\"arch\": {...}|null, \"tensors\": [...]}\n"
               "  --config C.json override hyperparameters the shapes cannot tell (decoder heads, ...)\n"
               "Per tensor: name, dtype as stored, shape, float64 sum and sum of |x|, and the count of\n"
               "NaN/infinite values where there are any (\"nonfinite\" in JSON; merge, segment, eval and\n"
               "search refuse such models).\n");
}

static void print_json_str(const char *s) {
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c < 0x20) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

/* Shortest decimal that reads back as the same double. */
static void print_num(double v) {
    char tmp[40];
    int p;
    if (v != v || v - v != 0) { printf("null"); return; }
    for (p = 15; p <= 17; p++) {
        snprintf(tmp, sizeof tmp, "%.*g", p, v);
        if (strtod(tmp, NULL) == v) break;
    }
    printf("%s", tmp);
}

int msx_cmd_inspect(int argc, char **argv) {
    const char *file = NULL, *config = NULL;
    int json = 0, i, k, have_arch = 0;
    msx_checkpoint *ck = NULL;
    msx_sam_arch arch;
    msx_result r;
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) { inspect_usage(stdout); return 0; }
        else if (!strcmp(argv[i], "--json")) json = 1;
        else if (!strcmp(argv[i], "--config")) {
            if (++i >= argc) { fprintf(stderr, "inspect: --config needs a file\n"); inspect_usage(stderr); return 2; }
            config = argv[i];
        } else if (argv[i][0] == '-' && argv[i][1]) { fprintf(stderr, "inspect: unknown option '%s'\n", argv[i]); inspect_usage(stderr); return 2; }
        else if (!file) file = argv[i];
        else { fprintf(stderr, "inspect: more than one FILE given\n"); inspect_usage(stderr); return 2; }
    }
    if (!file) { inspect_usage(stderr); return 2; }
    r = msx_ckpt_load(file, &ck);
    if (r != MSX_OK) { fprintf(stderr, "inspect: %s\n", msx_last_error()); return 1; }
    /* Not every checkpoint is a SAM: then the architecture is null. */
    r = msx_sam_arch_infer(ck, &arch);
    if (r == MSX_OK && config) r = msx_sam_arch_load_json(config, &arch);
    if (r == MSX_OK) r = msx_sam_validate(ck, &arch);
    if (r == MSX_OK) have_arch = 1;
    else fprintf(stderr, "inspect: no SAM architecture: %s\n", msx_last_error());
    if (config && !have_arch && r != MSX_E_KEY_MISMATCH && r != MSX_E_SHAPE) { msx_ckpt_free(ck); return 1; }
    if (json) {
        char *aj = NULL;
        printf("{\"arch\": ");
        if (have_arch && msx_sam_arch_to_json(&arch, &aj) == MSX_OK) printf("%s", aj);
        else printf("null");
        msx_free(aj);
        printf(", \"tensors\": [");
        for (i = 0; i < ck->n; i++) {
            const msx_tensor *t = &ck->tensors[i];
            double s, a;
            msx_tensor_sums(t, &s, &a);
            printf(i ? ",\n  {\"name\": " : "\n  {\"name\": ");
            print_json_str(t->name);
            printf(", \"dtype\": \"%s\", \"shape\": [", msx_dtype_torch_name(t->src_dtype));
            for (k = 0; k < t->ndim; k++) printf(k ? ", %lld" : "%lld", (long long)t->shape[k]);
            printf("], \"sum\": ");
            print_num(s);
            printf(", \"abs_sum\": ");
            print_num(a);
            printf(", \"nonfinite\": %lld}", (long long)msx_tensor_count_nonfinite(t));
        }
        printf("\n]}\n");
    } else {
        int64_t total = 0, bad = 0;
        int nbad = 0;
        printf("file: %s\n", file);
        if (have_arch) {
            printf("arch: image %d, patch %d, in_chans %d, embed %d, depth %d, heads %d, mlp %d, window %d, global blocks [",
                   arch.img_size, arch.patch_size, arch.in_chans, arch.embed_dim, arch.depth, arch.num_heads, arch.mlp_dim, arch.window_size);
            for (k = 0; k < arch.n_global; k++) printf(k ? ",%d" : "%d", arch.global_idx[k]);
            printf("]\n      rel_pos %d, abs_pos %d, out_chans %d, prompt dim %d, mask_in_chans %d\n"
                   "      decoder depth %d, dim %d, mlp %d, heads %d, downsample %d, mask tokens %d, IoU head %d x %d\n",
                   arch.use_rel_pos, arch.use_abs_pos, arch.out_chans, arch.prompt_dim, arch.mask_in_chans, arch.dec_depth,
                   arch.dec_dim, arch.dec_mlp_dim, arch.dec_heads, arch.dec_downsample, arch.num_mask_tokens, arch.iou_head_depth,
                   arch.iou_head_hidden);
        } else printf("arch: (not a SAM checkpoint)\n");
        for (i = 0; i < ck->n; i++) total += ck->tensors[i].numel;
        printf("tensors: %d, elements: %lld\n", ck->n, (long long)total);
        for (i = 0; i < ck->n; i++) {
            const msx_tensor *t = &ck->tensors[i];
            double s, a;
            char shape[96];
            size_t n = 0;
            msx_tensor_sums(t, &s, &a);
            n += (size_t)snprintf(shape + n, sizeof shape - n, "[");
            for (k = 0; k < t->ndim && n < sizeof shape; k++) n += (size_t)snprintf(shape + n, sizeof shape - n, k ? ",%lld" : "%lld", (long long)t->shape[k]);
            if (n < sizeof shape) snprintf(shape + n, sizeof shape - n, "]");
            k = (int)(msx_tensor_count_nonfinite(t) > 0);
            printf("%-72s %-8s %-18s %.17g %.17g", t->name, msx_dtype_torch_name(t->src_dtype), shape, s, a);
            if (k) {
                int64_t c = msx_tensor_count_nonfinite(t);
                printf("  NON-FINITE: %lld NaN/inf", (long long)c);
                bad += c;
                nbad++;
            }
            printf("\n");
        }
        if (nbad)
            printf("non-finite: %lld NaN/infinite value(s) in %d tensor(s); merge, segment, eval and search refuse this model\n",
                   (long long)bad, nbad);
    }
    msx_ckpt_free(ck);
    return 0;
}
