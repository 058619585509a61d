/* medsamix segment --volume: a NIfTI volume, one box per slice -> a uint8
   NIfTI segmentation on the input's grid (dims, affine, qform/sform). The
   slices are made exactly as `medsamix prepare` makes them (the MedSAMix
   reference's normalisation), so each slice's prediction equals `medsamix
   segment` on that slice's PNG with the same box. */
#include "../medsamix.h"
#include "cli.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifndef MSX_NO_NIFTI

static void volume_usage(FILE *f) {
    fprintf(f,
            "usage: medsamix segment --model M --volume IMG.nii.gz (--label LBL.nii.gz --foreground 1,2 | --boxes BOXES.json)\n"
            "                        --out PRED.nii.gz [--config C.json] [--preprocess sam|medsam] [--threads N]\n"
            "  --volume IMG      NIfTI-1/2 image (.nii or .nii.gz); slices [:, :, z] along the last axis\n"
            "  --label LBL       its label volume: the box of slice z is the tight box of the foreground,\n"
            "                    slices without foreground are not segmented (as the reference evaluates);\n"
            "                    prints the volume Dice and the mean per-slice Dice\n"
            "  --foreground L,.. label values that make the object (with --label)\n"
            "  --boxes B.json    {\"format\": \"medsamix-boxes-v1\", \"boxes\": [{\"z\": k, \"box\": [x0, y0, x1, y1]}, ..]}\n"
            "  --out PRED        uint8 NIfTI (0/1) with the input's header; .nii or .nii.gz\n");
}

static int volume_parse_fg(const char *s, int *fg, int max) {
    int n = 0;
    const char *p = s;
    while (*p) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || n == max) return -1;
        fg[n++] = (int)v;
        p = end;
        if (*p == ',') p++;
        else if (*p) return -1;
    }
    return n;
}

int msx_cmd_segment_volume(int argc, char **argv) {
    const char *model = NULL, *config = NULL, *vol_p = NULL, *lbl_p = NULL, *fg_s = NULL, *boxes_p = NULL, *out = NULL;
    int fg[256], n_fg = 0, a, z, rc = 1, n_seg = 0;
    msx_seg_options so;
    msx_sam_options mo;
    msx_volume vol, lbl, pred;
    msx_checkpoint *ck = NULL;
    msx_sam_arch arch;
    msx_sam *m = NULL;
    msx_sam_ws *ws = NULL;
    msx_seg_ctx *ctx = NULL;
    msx_image img;
    msx_mask mask;
    unsigned char *u8 = NULL, *gt = NULL, *has = NULL, *pv = NULL;
    float *boxes = NULL;
    double sum_dice = 0, t0 = msx_time_now();
    size_t n = 0, i;
    msx_result r = MSX_OK;
    memset(&so, 0, sizeof so);
    memset(&mo, 0, sizeof mo);
    memset(&vol, 0, sizeof vol);
    memset(&lbl, 0, sizeof lbl);
    memset(&pred, 0, sizeof pred);
    memset(&img, 0, sizeof img);
    memset(&mask, 0, sizeof mask);
    for (a = 1; a < argc; a++)
        if (!strcmp(argv[a], "--help") || !strcmp(argv[a], "-h")) { volume_usage(stdout); return 0; }
    for (a = 1; a < argc; a++) {
        const char *o = argv[a], *v = a + 1 < argc ? argv[a + 1] : NULL;
        if (!v) { fprintf(stderr, "segment: missing value after %s\n", o); return 2; }
        a++;
        if (!strcmp(o, "--model")) model = v;
        else if (!strcmp(o, "--config")) config = v;
        else if (!strcmp(o, "--volume")) vol_p = v;
        else if (!strcmp(o, "--label")) lbl_p = v;
        else if (!strcmp(o, "--foreground")) fg_s = v;
        else if (!strcmp(o, "--boxes")) boxes_p = v;
        else if (!strcmp(o, "--out")) out = v;
        else if (!strcmp(o, "--preprocess") && (!strcmp(v, "sam") || !strcmp(v, "medsam")))
            so.preprocess = !strcmp(v, "sam") ? MSX_PREPROCESS_SAM : MSX_PREPROCESS_MEDSAM;
        else if (!strcmp(o, "--threads")) {
            char *end;
            long t = strtol(v, &end, 10);
            if (*end || t < 1 || t > 1024) { fprintf(stderr, "segment: --threads needs a number 1..1024\n"); return 2; }
            mo.n_threads = (int)t;
        } else {
            fprintf(stderr, "segment: unknown option or bad value '%s %s' (with --volume)\n", o, v);
            volume_usage(stderr);
            return 2;
        }
    }
    if (!model || !vol_p || !out || (!lbl_p == !boxes_p)) {
        fprintf(stderr, "segment: --volume needs --model, --out and either --label with --foreground or --boxes\n");
        volume_usage(stderr);
        return 2;
    }
    if (lbl_p && (!fg_s || (n_fg = volume_parse_fg(fg_s, fg, 256)) < 1)) {
        fprintf(stderr, "segment: --label needs --foreground with label values, e.g. --foreground 1,2\n");
        return 2;
    }
    {   /* no input is overwritten; the output's folder exists; a NIfTI name */
        const char *in[5], *outs[1];
        int n_in = 0;
        in[n_in++] = model;
        in[n_in++] = vol_p;
        if (config) in[n_in++] = config;
        if (lbl_p) in[n_in++] = lbl_p;
        if (boxes_p) in[n_in++] = boxes_p;
        outs[0] = out;
        if (!msx_cli_has_ext(out, ".nii") && !msx_cli_has_ext(out, ".nii.gz")) {
            fprintf(stderr, "segment: --out %s: the prediction is written as NIfTI; name it .nii or .nii.gz\n", out);
            return 2;
        }
        if (!msx_cli_check_outputs("segment", in, n_in, outs, 1)) return 1;
    }
    /* inputs first (cheap, and the errors that matter), then the model */
    if ((r = msx_volume_load(vol_p, &vol)) != MSX_OK) goto fail;
    n = (size_t)vol.nx * vol.ny * vol.nz;
    u8 = (unsigned char *)malloc(n);
    has = (unsigned char *)calloc((size_t)vol.nz, 1);
    boxes = (float *)calloc((size_t)vol.nz * 4, sizeof(float));
    pv = (unsigned char *)calloc(n, 1);
    if (!u8 || !has || !boxes || !pv) { fprintf(stderr, "segment: out of memory\n"); goto done; }
    if (lbl_p) {
        if ((r = msx_volume_load(lbl_p, &lbl)) != MSX_OK) goto fail;
        if (lbl.nx != vol.nx || lbl.ny != vol.ny || lbl.nz != vol.nz) {
            fprintf(stderr, "segment: %s is %dx%dx%d but %s is %dx%dx%d; image and label must share the grid\n", lbl_p, lbl.nx,
                    lbl.ny, lbl.nz, vol_p, vol.nx, vol.ny, vol.nz);
            goto done;
        }
        if (!(gt = (unsigned char *)malloc(n))) { fprintf(stderr, "segment: out of memory\n"); goto done; }
        if ((r = msx_volume_label_mask(&lbl, fg, n_fg, gt)) != MSX_OK) goto fail;
        for (z = 0; z < vol.nz; z++) {
            int b[4];
            if ((r = msx_volume_slice_mask(gt, vol.nx, vol.ny, vol.nz, z, &mask)) != MSX_OK) goto fail;
            if (msx_mask_bbox(&mask, b) != MSX_OK) { msx_clear_error(); continue; }
            has[z] = 1;
            for (a = 0; a < 4; a++) boxes[4 * z + a] = (float)b[a];
        }
    } else if ((r = msx_volume_boxes_load(boxes_p, vol.nz, has, boxes)) != MSX_OK) goto fail;
    if ((r = msx_volume_to_u8(&vol, u8)) != MSX_OK) goto fail;
    if ((r = msx_sam_load(model, config, &ck, &arch)) != MSX_OK) goto fail;
    if ((r = msx_sam_create(ck, &arch, &mo, &m)) != MSX_OK) goto fail;
    if ((r = msx_sam_ws_create(m, &ws)) != MSX_OK) goto fail;
    if ((r = msx_seg_ctx_create(&ctx)) != MSX_OK) goto fail;
    for (z = 0; z < vol.nz; z++) {
        int row, col;
        if (!has[z]) continue;
        if ((r = msx_volume_slice_image(u8, vol.nx, vol.ny, vol.nz, z, &img)) != MSX_OK) goto fail;
        if ((r = msx_segment_box_ctx(ctx, m, ws, &img, boxes + 4 * z, &so, &mask)) != MSX_OK) {
            fprintf(stderr, "segment: slice z = %d: %s\n", z, msx_last_error());
            goto done;
        }
        for (row = 0; row < vol.nx; row++)
            for (col = 0; col < vol.ny; col++)
                pv[(size_t)row + (size_t)vol.nx * ((size_t)col + (size_t)vol.ny * z)] = mask.data[(size_t)row * vol.ny + col];
        if (gt) {
            msx_mask g;
            double d;
            memset(&g, 0, sizeof g);
            if ((r = msx_volume_slice_mask(gt, vol.nx, vol.ny, vol.nz, z, &g)) != MSX_OK) goto fail;
            msx_dice(&mask, &g, &d);
            msx_mask_free(&g);
            sum_dice += d;
        }
        n_seg++;
    }
    if ((r = msx_volume_like(&vol, &pred)) != MSX_OK) goto fail;
    for (i = 0; i < n; i++) pred.data[i] = pv[i];
    if ((r = msx_volume_save(out, &pred, MSX_U8)) != MSX_OK) goto fail;
    printf("segment: %s %dx%dx%d, %d slice(s) segmented -> %s (%.1f s)\n", vol_p, vol.nx, vol.ny, vol.nz, n_seg, out,
           msx_time_now() - t0);
    if (gt)
        printf("segment: volume Dice %.4f, mean per-slice Dice %.4f over %d slice(s) with foreground\n",
               msx_dice_u8(pv, gt, n), n_seg ? sum_dice / n_seg : 0.0, n_seg);
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "segment: %s\n", msx_last_error());
done:
    msx_seg_ctx_free(ctx);
    msx_sam_ws_free(ws);
    msx_sam_free(m);
    msx_ckpt_free(ck);
    msx_volume_free(&vol);
    msx_volume_free(&lbl);
    msx_volume_free(&pred);
    msx_image_free(&img);
    msx_mask_free(&mask);
    free(u8);
    free(gt);
    free(has);
    free(boxes);
    free(pv);
    return rc;
}
#else
int msx_cmd_segment_volume(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "medsamix was built with MSX_NO_NIFTI: no NIfTI volumes\n");
    return 1;
}
#endif
