/* tools/gen_demo_nnunet.c - writes the demo world's small nnU-Net dataset,
   examples/demo/nnunet/: slices of the demo task ct_organ (examples/demo/
   tasks/ct_organ) stacked into 3-D volumes.
     Dataset801_DemoCT/dataset.json          file_ending ".nii.gz"
     Dataset801_DemoCT/imagesTr/demo_NN_0000.nii.gz   int16 "HU" = 8 * grey - 1024
     Dataset801_DemoCT/labelsTr/demo_NN.nii.gz        uint8, organ = 1
     tasks.json                               task "ct_organ_3d" = channel 0, foreground [1]
   Case NN stacks 4 slices (128 x 128, every second pixel of the 256 x 256
   PNGs): z = 0 has its label cleared (a slice without foreground, which the
   pipeline skips), z = 1..3 carry the organ. demo_00 takes calib images
   (it is the calibration case: int(5 - 5 * 0.8) = 1), demo_01..04 test ones.
   Spacing 1.5 x 1.5 x 3 mm. Deterministic; rerun after changing the tasks:
     cc -std=c99 -O2 -fopenmp -I. -I/usr/include/nifti -o build/gen_demo_nnunet \
        tools/gen_demo_nnunet.c -ldnnl -lstb -lnifti2 -lznz -lz -lm
     build/gen_demo_nnunet examples/demo */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#define NCASE 5
#define NZ 4
#define SIDE 128

static int fail(const char *what) {
    fprintf(stderr, "gen_demo_nnunet: %s: %s\n", what, msx_last_error());
    return 1;
}

int main(int argc, char **argv) {
    const char *demo = argc > 1 ? argv[1] : "examples/demo";
    static const double aff[4][4] = {{1.5, 0, 0, 0}, {0, 1.5, 0, 0}, {0, 0, 3.0, 0}, {0, 0, 0, 1}};
    char p[1400], ds[1024];
    int c, z, r, k;
    snprintf(p, sizeof p, "%s/nnunet", demo);
    mkdir(p, 0755);
    snprintf(ds, sizeof ds, "%s/nnunet/Dataset801_DemoCT", demo);
    mkdir(ds, 0755);
    snprintf(p, sizeof p, "%s/imagesTr", ds);
    mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/labelsTr", ds);
    mkdir(p, 0755);
    for (c = 0; c < NCASE; c++) {
        msx_volume img, lbl;
        memset(&img, 0, sizeof img);
        memset(&lbl, 0, sizeof lbl);
        if (msx_volume_create(SIDE, SIDE, NZ, aff, 1, &img) != MSX_OK || msx_volume_create(SIDE, SIDE, NZ, aff, 1, &lbl) != MSX_OK)
            return fail("volume");
        for (z = 0; z < NZ; z++) {
            msx_image im;
            msx_mask m;
            int idx = c == 0 ? z : (c - 1) * NZ + z;
            memset(&im, 0, sizeof im);
            memset(&m, 0, sizeof m);
            snprintf(p, sizeof p, "%s/tasks/ct_organ/%s/images/%03d.png", demo, c == 0 ? "calib" : "test", idx);
            if (msx_image_load(p, &im) != MSX_OK || im.w != 2 * SIDE || im.h != 2 * SIDE) return fail(p);
            snprintf(p, sizeof p, "%s/tasks/ct_organ/%s/masks/%03d.png", demo, c == 0 ? "calib" : "test", idx);
            if (msx_mask_load(p, NULL, &m) != MSX_OK) return fail(p);
            for (r = 0; r < SIDE; r++)
                for (k = 0; k < SIDE; k++) {
                    size_t v = (size_t)r + SIDE * ((size_t)k + SIDE * z); /* row = axis 0, column = axis 1 */
                    size_t q = (size_t)(2 * r) * im.w + 2 * k;
                    img.data[v] = 8.0 * im.data[3 * q] - 1024.0;
                    lbl.data[v] = z > 0 && m.data[q];
                }
            msx_image_free(&im);
            msx_mask_free(&m);
        }
        snprintf(p, sizeof p, "%s/imagesTr/demo_%02d_0000.nii.gz", ds, c);
        if (msx_volume_save(p, &img, MSX_I16) != MSX_OK) return fail(p);
        snprintf(p, sizeof p, "%s/labelsTr/demo_%02d.nii.gz", ds, c);
        if (msx_volume_save(p, &lbl, MSX_U8) != MSX_OK) return fail(p);
        msx_volume_free(&img);
        msx_volume_free(&lbl);
    }
    {
        static const char dj[] = "{\n  \"channel_names\": {\"0\": \"CT\"},\n  \"labels\": {\"background\": 0, \"organ\": 1},\n"
                                 "  \"numTraining\": 5,\n  \"file_ending\": \".nii.gz\"\n}\n";
        static const char tj[] = "{\n  \"format\": \"medsamix-nnunet-tasks-v1\",\n  \"tasks\": {\n"
                                 "    \"ct_organ_3d\": [{\"dataset\": \"Dataset801_DemoCT\", \"channel\": 0, \"foreground\": [1]}]\n  }\n}\n";
        snprintf(p, sizeof p, "%s/dataset.json", ds);
        if (msx_write_file_atomic(p, dj, sizeof dj - 1) != MSX_OK) return fail(p);
        snprintf(p, sizeof p, "%s/nnunet/tasks.json", demo);
        if (msx_write_file_atomic(p, tj, sizeof tj - 1) != MSX_OK) return fail(p);
    }
    printf("gen_demo_nnunet: %d cases of %dx%dx%d in %s\n", NCASE, SIDE, SIDE, NZ, ds);
    return 0;
}
