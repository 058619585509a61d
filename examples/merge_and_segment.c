/* examples/merge_and_segment.c - merge SAM checkpoints with a plan, then
   segment one image with a box prompt and score it against its mask.

     make && build/examples/merge_and_segment [PLAN.json] [IMAGE MASK]

   Without a plan it builds one by hand: TIES (drop rate 0.5, λ = 1) for the
   image encoder and prompt encoder, the mask decoder taken from the MRI
   specialist (linear one-hot). Writes runs/example-merge/{merged.safetensors,
   merged.plan.json, overlay.png}. */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"

#include <stdio.h>
#include <string.h>

#define CHECK(call)                                                        \
    do {                                                                   \
        if ((call) != MSX_OK) {                                            \
            fprintf(stderr, "%s failed: %s\n", #call, msx_last_error());   \
            return 1;                                                      \
        }                                                                  \
    } while (0)

int main(int argc, char **argv) {
    const char *paths[3] = {"examples/demo/models/base.pth", "examples/demo/models/spec_ct.pth",
                            "examples/demo/models/spec_mri.pth"};
    const char *plan_path = argc == 2 || argc == 4 ? argv[1] : NULL;
    const char *image_path = argc >= 3 ? argv[argc - 2] : "examples/demo/tasks/mri_ring/test/images/004.png";
    const char *mask_path = argc >= 3 ? argv[argc - 1] : "examples/demo/tasks/mri_ring/test/masks/004.png";
    msx_checkpoint *ck[3] = {NULL, NULL, NULL}, *merged = NULL;
    msx_sam_arch arch;
    msx_merger *merger = NULL;
    msx_plan *plan = NULL;
    msx_merge_report rep;
    msx_sam *sam = NULL;
    msx_sam_ws *ws = NULL;
    msx_image img;
    msx_mask gt, pred;
    msx_sam_options so;
    int i, b[4];
    float box[4];
    double dice;

    /* 1. load the base and the fine-tuned models (.pth or .safetensors) */
    for (i = 0; i < 3; i++) CHECK(msx_sam_load(paths[i], NULL, &ck[i], i == 0 ? &arch : NULL));

    /* 2. a merger for base + 2 fine-tuned models, 2 encoder blocks per group */
    CHECK(msx_merger_create(ck[0], (const msx_checkpoint *const *)(ck + 1), 2, 2, &merger));
    if (plan_path) {
        CHECK(msx_plan_load_json(plan_path, &plan)); /* e.g. a search's best_plan.json */
    } else {
        msx_group_plan mri;
        int g;
        CHECK(msx_merger_plan_create(merger, &plan));
        CHECK(msx_plan_set_preset(plan, "ties_d0.5_s1.0"));
        memset(&mri, 0, sizeof mri);
        mri.method = MSX_MERGE_LINEAR;       /* weights: base, spec_ct, spec_mri */
        mri.weights[2] = 1.0;
        for (g = 0; g < plan->n_groups; g++)
            if (!strncmp(plan->ids[g], "mask_decoder_group_", 19)) plan->groups[g] = mri;
    }

    /* 3. merge into a preallocated copy of the base (no allocation per run) */
    CHECK(msx_ckpt_clone(ck[0], &merged));
    CHECK(msx_merger_run(merger, plan, merged, &rep));
    printf("merged %d tensors in %.3f s (%d warning(s))\n", rep.n_tensors_merged, rep.seconds, rep.n_warnings);
    mkdir("runs", 0755);
    mkdir("runs/example-merge", 0755);
    CHECK(msx_merge_export("runs/example-merge/merged.safetensors", merged, plan));

    /* 4. segment: the tight box of the ground-truth mask as the prompt */
    memset(&so, 0, sizeof so);
    CHECK(msx_sam_create(merged, &arch, &so, &sam));
    CHECK(msx_sam_ws_create(sam, &ws));
    memset(&img, 0, sizeof img);
    memset(&gt, 0, sizeof gt);
    memset(&pred, 0, sizeof pred);
    CHECK(msx_image_load(image_path, &img));
    CHECK(msx_mask_load(mask_path, NULL, &gt));
    CHECK(msx_mask_bbox(&gt, b));
    for (i = 0; i < 4; i++) box[i] = (float)b[i];
    CHECK(msx_segment_box(sam, ws, &img, box, NULL, &pred));
    CHECK(msx_dice(&pred, &gt, &dice));
    printf("%s: box %d,%d,%d,%d  Dice %.4f\n", image_path, b[0], b[1], b[2], b[3], dice);
    CHECK(msx_overlay_png("runs/example-merge/overlay.png", &img, &pred, box));
    printf("wrote runs/example-merge/merged.safetensors, merged.plan.json, overlay.png\n");

    msx_image_free(&img);
    msx_mask_free(&gt);
    msx_mask_free(&pred);
    msx_sam_ws_free(ws);
    msx_sam_free(sam);
    msx_plan_free(plan);
    msx_merger_free(merger);
    msx_ckpt_free(merged);
    for (i = 0; i < 3; i++) msx_ckpt_free(ck[i]);
    return 0;
}
