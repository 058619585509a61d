/* medsamix segment: one image, one box prompt -> binary mask PNG (0/255). */
#include "../medsamix.h"
#include "cli.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void segment_usage(FILE *f) {
    fprintf(f,
            "usage: medsamix segment --model M.pth --image IMG.png --box x0,y0,x1,y1 --out MASK.png\n"
            "                        [--config C.json] [--overlay OV.png] [--preprocess sam|medsam]\n"
            "                        [--precision fp32|bf16] [--threads N] [--intensity RULE]\n"
            "  --model M         SAM/MedSAM checkpoint (.pth zip or .safetensors)\n"
            "  --config C.json   hyperparameters the shapes cannot tell (decoder heads, pixel mean/std)\n"
            "  --image IMG       PNG/JPEG/BMP/...; grayscale is copied into R, G and B\n"
            "  --intensity RULE  how a 16-bit image becomes 8-bit: minmax (default: its own range onto\n"
            "                    0..255), percentile (0.5..99.5 %%), window:C,W (centre, width), high-byte\n"
            "                    (v >> 8); 8-bit images are used as they are\n"
            "  --box x0,y0,x1,y1 box in original pixels (x_min, y_min, x_max, y_max; max inclusive)\n"
            "  --out MASK.png    8-bit mask, 0 = background, 255 = object (PNG only; never an input)\n"
            "  --overlay OV.png  the image with the mask tinted and the box drawn (PNG only)\n"
            "  --preprocess M    sam (default: ResizeLongestSide + mean/std) or medsam\n"
            "                    (bicubic resize to S x S, min-max to [0,1]); never guessed\n"
            "  --precision P     fp32 (default) or bf16\n"
            "  --threads N       threads for the forward pass (default: all)\n"
            "       medsamix segment --model M --volume IMG.nii.gz ... : NIfTI volumes (segment --volume --help)\n");
}

static int parse_box(const char *s, float box[4]) {
    int k;
    const char *p = s;
    for (k = 0; k < 4; k++) {
        char *end;
        double v = strtod(p, &end);
        if (end == p || !isfinite(v)) return 0;
        box[k] = (float)v;
        p = end;
        if (k < 3) {
            if (*p != ',') return 0;
            p++;
        }
    }
    return *p == 0;
}

int msx_cmd_segment(int argc, char **argv) {
    const char *model = NULL, *config = NULL, *image = NULL, *box_s = NULL, *out = NULL, *overlay = NULL;
    msx_seg_options so;
    msx_sam_options mo;
    msx_intensity it;
    msx_image_info info;
    msx_checkpoint *ck = NULL;
    msx_sam_arch arch;
    msx_sam *m = NULL;
    msx_sam_ws *ws = NULL;
    msx_image img;
    msx_mask mask;
    float box[4];
    double t0, t1;
    size_t i, fg = 0;
    int a, rc = 1;
    msx_result r;
    memset(&so, 0, sizeof so);
    memset(&mo, 0, sizeof mo);
    memset(&it, 0, sizeof it);
    memset(&img, 0, sizeof img);
    memset(&mask, 0, sizeof mask);
    for (a = 1; a < argc; a++) /* NIfTI volumes: tools/cmd_volume.c */
        if (!strcmp(argv[a], "--volume")) return msx_cmd_segment_volume(argc, argv);
    for (a = 1; a < argc; a++) {
        const char *o = argv[a];
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) { segment_usage(stdout); return 0; }
        if (o[0] != '-' || a + 1 >= argc) {
            fprintf(stderr, "segment: %s '%s'\n", o[0] == '-' ? "missing value after" : "unexpected argument", o);
            segment_usage(stderr);
            return 2;
        }
        if (!strcmp(o, "--model")) model = argv[++a];
        else if (!strcmp(o, "--config")) config = argv[++a];
        else if (!strcmp(o, "--image")) image = argv[++a];
        else if (!strcmp(o, "--box")) box_s = argv[++a];
        else if (!strcmp(o, "--out")) out = argv[++a];
        else if (!strcmp(o, "--overlay")) overlay = argv[++a];
        else if (!strcmp(o, "--intensity")) {
            if (msx_intensity_parse(argv[++a], &it) != MSX_OK) { fprintf(stderr, "segment: --intensity: %s\n", msx_last_error()); return 2; }
        }
        else if (!strcmp(o, "--preprocess")) {
            const char *v = argv[++a];
            if (!strcmp(v, "sam")) so.preprocess = MSX_PREPROCESS_SAM;
            else if (!strcmp(v, "medsam")) so.preprocess = MSX_PREPROCESS_MEDSAM;
            else { fprintf(stderr, "segment: --preprocess must be sam or medsam, not '%s'\n", v); return 2; }
        } else if (!strcmp(o, "--precision")) {
            const char *v = argv[++a];
            if (!strcmp(v, "fp32")) mo.precision = MSX_PREC_FP32;
            else if (!strcmp(v, "bf16")) mo.precision = MSX_PREC_BF16;
            else { fprintf(stderr, "segment: --precision must be fp32 or bf16, not '%s'\n", v); return 2; }
        } else if (!strcmp(o, "--threads")) {
            if (!msx_cli_int("segment", o, argv[++a], 1, 1024, &mo.n_threads)) return 2;
        } else {
            fprintf(stderr, "segment: unknown option '%s'\n", o);
            segment_usage(stderr);
            return 2;
        }
    }
    if (!model || !image || !box_s || !out) {
        fprintf(stderr, "segment: --model, --image, --box and --out are required\n");
        segment_usage(stderr);
        return 2;
    }
    if (!parse_box(box_s, box)) {
        fprintf(stderr, "segment: --box wants four finite numbers x0,y0,x1,y1, got '%s'\n", box_s);
        return 2;
    }
    if (!msx_cli_has_ext(out, ".png") || (overlay && !msx_cli_has_ext(overlay, ".png"))) {
        fprintf(stderr, "segment: %s %s: masks and overlays are written as PNG; name the file .png\n",
                !msx_cli_has_ext(out, ".png") ? "--out" : "--overlay", !msx_cli_has_ext(out, ".png") ? out : overlay);
        return 2;
    }
    {
        const char *in[3], *outs[2];
        in[0] = model;
        in[1] = image;
        in[2] = config;
        outs[0] = out;
        outs[1] = overlay;
        if (!msx_cli_check_outputs("segment", in, 3, outs, 2)) return 2;
    }
    t0 = msx_time_now();
    if ((r = msx_image_load_ex(image, &it, &img, &info)) != MSX_OK) goto fail;
    if (info.bits == 16) {
        char rule[64];
        msx_intensity_str(&it, rule, sizeof rule);
        printf("segment: %s is 16-bit; mapped to 8 bits by --intensity %s (values %g..%g -> 0..255)\n", image, rule, info.lo, info.hi);
    }
    if ((r = msx_sam_load(model, config, &ck, &arch)) != MSX_OK) goto fail;
    if ((r = msx_sam_create(ck, &arch, &mo, &m)) != MSX_OK) goto fail;
    if ((r = msx_sam_ws_create(m, &ws)) != MSX_OK) goto fail;
    t1 = msx_time_now();
    if ((r = msx_segment_box(m, ws, &img, box, &so, &mask)) != MSX_OK) goto fail;
    t1 = msx_time_now() - t1;
    if ((r = msx_mask_save_png(out, &mask)) != MSX_OK) goto fail;
    if (overlay && (r = msx_overlay_png(overlay, &img, &mask, box)) != MSX_OK) goto fail;
    for (i = 0; i < (size_t)mask.w * mask.h; i++) fg += mask.data[i];
    printf("segment: %s %dx%d box %g,%g,%g,%g -> %s: %lu foreground pixels (%.1f%%), segmentation %.3f s, "
           "total %.3f s\n",
           image, img.w, img.h, (double)box[0], (double)box[1], (double)box[2], (double)box[3], out,
           (unsigned long)fg, 100.0 * (double)fg / ((double)mask.w * mask.h), t1, msx_time_now() - t0);
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "segment: %s\n", msx_last_error());
done:
    msx_sam_ws_free(ws);
    msx_sam_free(m);
    msx_ckpt_free(ck);
    msx_image_free(&img);
    msx_mask_free(&mask);
    return rc;
}
