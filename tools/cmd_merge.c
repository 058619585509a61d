/* tools/cmd_merge.c - `medsamix merge` (merge checkpoints with a plan or one
   uniform method) and `medsamix bench-merge` (merge throughput of ViT-B-sized
   models against a STREAM-style copy measured in the same run). */
#include "../medsamix.h"
#include "cli.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static void merge_usage(FILE *f) {
    fprintf(f,
            "usage: medsamix merge --base BASE --models A [B ...] (--plan PLAN.json | --preset NAME |\n"
            "                      --method linear|ta|ties|slerp [--weights w0,w1,..] [--scale S]\n"
            "                      [--drop-rate R] [--t t0,t1,..]) [--granularity G] [--force]\n"
            "                      --out MERGED.safetensors|MERGED.pth\n"
            "\n"
            "Merges SAM checkpoints (.pth or .safetensors) layer group by layer group, exactly as the\n"
            "official MedSAMix code. Model 0 is the base, 1..N the --models in order.\n"
            "  --plan P          per-group plan (JSON \"medsamix-plan-v1\"); its granularity is used. A\n"
            "                    search's best_plan.json records its models: other models or another\n"
            "                    order are refused unless --force\n"
            "  --preset NAME     uniform baseline: base, model<k>, linear_avg, ta_<s>, ties_d<r>_s<s>, slerp_<t>\n"
            "  --method M        one method for every group:\n"
            "     linear  --weights w0,w1,..  one weight >= 0 per model, base first (default: equal)\n"
            "     ta      --scale S           base + S * sum of task vectors (needs >= 2 fine-tuned models)\n"
            "     ties    --drop-rate R --scale S   R in [0,1] is the fraction trimmed per tensor\n"
            "     slerp   --t t0,t1,..        per-model t in [0,1]; the two largest are interpolated\n"
            "  --granularity G   encoder blocks per layer group (default 2, or the plan's)\n"
            "  --config JSON     architecture config for loading (default: inferred from the shapes)\n"
            "  --strict          the reference's keep-the-base cases are errors, not warnings\n"
            "  --threads N       OpenMP threads (default: all)\n"
            "  --out PATH        merged model in the format its name says: .safetensors, or .pth / .pt\n"
            "                    (PyTorch zip checkpoint for torch.load / Sam.load_state_dict); the plan\n"
            "                    goes to PATH with the extension replaced by .plan.json. Never an input;\n"
            "                    an existing file keeps its mode, a read-only one is refused, a symbolic\n"
            "                    link is written through (its target replaced, the link kept)\n"
            "  --force           merge with a plan searched on other models\n"
            "A merge whose result holds NaN or infinite weights is an error, as are input models that do.\n");
}

/* Comma-separated finite doubles; returns the count or -1. */
static int parse_list(const char *s, double *v, int cap) {
    int n = 0;
    while (*s) {
        char *e;
        if (n == cap) return -1;
        v[n++] = strtod(s, &e);
        if (e == s || (*e && *e != ',') || !isfinite(v[n - 1])) return -1;
        s = *e ? e + 1 : e;
    }
    return n;
}

int msx_cmd_merge(int argc, char **argv) {
    const char *base_path = NULL, *plan_path = NULL, *method = NULL, *out_path = NULL, *preset = NULL, *config = NULL;
    const char *models[MSX_MAX_MODELS];
    const char *weights_s = NULL, *t_s = NULL;
    double scale = NAN, drop = NAN;
    int n_models = 0, gran = 0, strict = 0, threads = 0, force = 0, i, rc = 1;
    msx_checkpoint *base = NULL, *ft[MSX_MAX_MODELS], *out = NULL;
    msx_merger *m = NULL;
    msx_plan *plan = NULL;
    msx_merge_report rep;
    msx_merge_options mo;
    msx_result r;
    double t0 = msx_time_now();
    memset(ft, 0, sizeof ft);
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has = i + 1 < argc;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { merge_usage(stdout); return 0; }
        else if (!strcmp(a, "--strict")) strict = 1;
        else if (!strcmp(a, "--force")) force = 1;
        else if (!has) { fprintf(stderr, "merge: %s needs a value\n", a); return 2; }
        else if (!strcmp(a, "--base")) base_path = argv[++i];
        else if (!strcmp(a, "--models")) {
            if (!msx_cli_list("merge", argc, argv, &i, models, &n_models, MSX_MAX_MODELS - 1)) return 2;
        } else if (!strcmp(a, "--plan")) plan_path = argv[++i];
        else if (!strcmp(a, "--preset")) preset = argv[++i];
        else if (!strcmp(a, "--method")) method = argv[++i];
        else if (!strcmp(a, "--weights")) weights_s = argv[++i];
        else if (!strcmp(a, "--t")) t_s = argv[++i];
        else if (!strcmp(a, "--config")) config = argv[++i];
        else if (!strcmp(a, "--out")) out_path = argv[++i];
        else if (!strcmp(a, "--scale")) {
            if (!msx_cli_num("merge", a, argv[++i], -1e300, 1e300, &scale)) return 2;
        } else if (!strcmp(a, "--drop-rate")) {
            if (!msx_cli_num("merge", a, argv[++i], 0, 1, &drop)) return 2;
        } else if (!strcmp(a, "--granularity")) {
            if (!msx_cli_int("merge", a, argv[++i], 1, 64, &gran)) return 2;
        } else if (!strcmp(a, "--threads")) {
            if (!msx_cli_int("merge", a, argv[++i], 0, 1024, &threads)) return 2;
        } else { fprintf(stderr, "merge: unknown option '%s'\n", a); merge_usage(stderr); return 2; }
    }
    if (!base_path || !n_models || !out_path || (!!plan_path + !!method + !!preset) != 1) {
        fprintf(stderr, "merge: needs --base, --models, --out and exactly one of --plan, --preset, --method\n\n");
        merge_usage(stderr);
        return 2;
    }
    if (!msx_cli_has_ext(out_path, ".safetensors") && !msx_cli_has_ext(out_path, ".pth") && !msx_cli_has_ext(out_path, ".pt")) {
        fprintf(stderr, "merge: --out %s: the name must end in .safetensors or .pth (the format follows the name)\n", out_path);
        return 2;
    }
    {
        /* every file read against every file written, before any work */
        const char *in[MSX_MAX_MODELS + 3], *outs[2];
        char plan_out[4096];
        size_t n = strlen(out_path), k = msx_cli_has_ext(out_path, ".safetensors") ? 12 : msx_cli_has_ext(out_path, ".pth") ? 4 : 3;
        int n_in = 0;
        if (n - k + 11 > sizeof plan_out) { fprintf(stderr, "merge: --out: path too long\n"); return 2; }
        memcpy(plan_out, out_path, n - k);
        strcpy(plan_out + n - k, ".plan.json");
        in[n_in++] = base_path;
        for (i = 0; i < n_models; i++) in[n_in++] = models[i];
        in[n_in++] = plan_path;
        in[n_in++] = config;
        outs[0] = out_path;
        outs[1] = plan_out;
        if (!msx_cli_check_outputs("merge", in, n_in, outs, 2)) return 2;
    }
    if (plan_path) {
        if ((r = msx_plan_load_json(plan_path, &plan)) != MSX_OK) goto fail;
        if (gran && gran != plan->granularity) {
            fprintf(stderr, "merge: --granularity %d disagrees with the plan's granularity %d\n", gran, plan->granularity);
            rc = 2;
            goto done;
        }
        gran = plan->granularity;
    }
    if (!gran) gran = 2; /* the reference's shipped layer_granularity */
    if ((r = msx_sam_load(base_path, config, &base, NULL)) != MSX_OK) goto fail;
    for (i = 0; i < n_models; i++)
        if ((r = msx_sam_load(models[i], config, &ft[i], NULL)) != MSX_OK) goto fail;
    if (plan_path) {
        const msx_checkpoint *all[MSX_MAX_MODELS];
        const char *paths[MSX_MAX_MODELS];
        int recorded;
        all[0] = base;
        paths[0] = base_path;
        for (i = 0; i < n_models; i++) { all[i + 1] = ft[i]; paths[i + 1] = models[i]; }
        r = msx_plan_check_models(plan_path, all, paths, n_models + 1, &recorded);
        if (r != MSX_OK && !force) goto fail;
        if (r != MSX_OK) fprintf(stderr, "warning (--force): %s\n", msx_last_error());
        else if (!recorded)
            fprintf(stderr, "note: %s records no models (not written by a search): the order of --models is not checked\n", plan_path);
    }
    if ((r = msx_merger_create(base, (const msx_checkpoint *const *)ft, n_models, gran, &m)) != MSX_OK) goto fail;
    memset(&mo, 0, sizeof mo);
    mo.strict = strict;
    mo.n_threads = threads;
    msx_merger_set_options(m, &mo);
    if (!plan) {
        if ((r = msx_merger_plan_create(m, &plan)) != MSX_OK) goto fail;
        if (preset) {
            if ((r = msx_plan_set_preset(plan, preset)) != MSX_OK) goto fail;
        } else {
            msx_group_plan g;
            int nm = n_models + 1;
            memset(&g, 0, sizeof g);
            if (!strcmp(method, "linear")) {
                g.method = MSX_MERGE_LINEAR;
                if (!weights_s) for (i = 0; i < nm; i++) g.weights[i] = 1;
                else if (parse_list(weights_s, g.weights, MSX_MAX_MODELS) != nm) {
                    fprintf(stderr, "merge: --weights '%s': needs %d comma-separated finite numbers (base first)\n", weights_s, nm);
                    rc = 2;
                    goto done;
                }
            } else if (!strcmp(method, "ta") || !strcmp(method, "task_arithmetic")) {
                if (!isnan(drop) || t_s || weights_s) fprintf(stderr, "merge: note: --method ta uses only --scale\n");
                g.method = MSX_MERGE_TASK_ARITHMETIC;
                g.scale = scale;
                if (isnan(scale)) { fprintf(stderr, "merge: --method ta needs --scale\n"); rc = 2; goto done; }
            } else if (!strcmp(method, "ties")) {
                g.method = MSX_MERGE_TIES;
                g.scale = scale;
                g.drop_rate = drop;
                if (isnan(scale) || isnan(drop)) { fprintf(stderr, "merge: --method ties needs --drop-rate and --scale\n"); rc = 2; goto done; }
            } else if (!strcmp(method, "slerp")) {
                g.method = MSX_MERGE_SLERP;
                if (!t_s || parse_list(t_s, g.t, MSX_MAX_MODELS) != nm) {
                    fprintf(stderr, "merge: --method slerp needs --t with %d comma-separated finite numbers (base first)%s%s%s\n", nm,
                            t_s ? ", not '" : "", t_s ? t_s : "", t_s ? "'" : "");
                    rc = 2;
                    goto done;
                }
            } else {
                fprintf(stderr, "merge: unknown method '%s' (linear, ta, ties, slerp)\n", method);
                rc = 2;
                goto done;
            }
            if ((r = msx_plan_set_uniform(plan, &g)) != MSX_OK) goto fail;
        }
    }
    if ((r = msx_ckpt_clone(base, &out)) != MSX_OK) goto fail;
    if ((r = msx_merger_run(m, plan, out, &rep)) != MSX_OK) goto fail;
    if ((r = msx_merger_check_finite(m, plan, out)) != MSX_OK) goto fail; /* nothing written */
    for (i = 0; i < rep.n_warnings && i < MSX_MERGE_MAX_WARNINGS; i++) fprintf(stderr, "warning: %s\n", rep.warnings[i]);
    if (rep.n_warnings > MSX_MERGE_MAX_WARNINGS)
        fprintf(stderr, "warning: ... %d more\n", rep.n_warnings - MSX_MERGE_MAX_WARNINGS);
    if ((r = msx_merge_export(out_path, out, plan)) != MSX_OK) goto fail;
    printf("merged %d tensors (%d kept the base, %d warnings) of %d models at granularity %d in %.3f s (total %.2f s)\n"
           "wrote %s and its .plan.json\n",
           rep.n_tensors_merged, rep.n_tensors_kept_base, rep.n_warnings, n_models + 1, gran, rep.seconds,
           msx_time_now() - t0, out_path);
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "medsamix merge: error (%s): %s\n", msx_result_str(r), msx_last_error());
    rc = 1;
done:
    msx_plan_free(plan);
    msx_merger_free(m);
    msx_ckpt_free(out);
    msx_ckpt_free(base);
    for (i = 0; i < n_models; i++) msx_ckpt_free(ft[i]);
    return rc;
}

/* ---- bench-merge ----------------------------------------------------------- */

#define CHUNK 262144 /* elements per work item, as the merger's */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Fills a model with uniform noise (parallel, deterministic per tensor). */
static void fill_random(msx_checkpoint *c, const msx_checkpoint *like, uint64_t seed, float amp) {
    int i;
    for (i = 0; i < c->n; i++) {
        float *d = (float *)c->tensors[i].data;
        const float *b = like ? (const float *)like->tensors[i].data : NULL;
        int64_t n = c->tensors[i].numel, j;
        uint64_t s0 = seed * 0x9E3779B97F4A7C15ull + (uint64_t)i * 0xBF58476D1CE4E5B9ull + 1;
#pragma omp parallel for schedule(static)
        for (j = 0; j < n; j++) {
            uint64_t z = s0 + (uint64_t)j * 0x9E3779B97F4A7C15ull;
            float u;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
            z ^= z >> 31;
            u = (float)((double)(z >> 11) * (1.0 / 9007199254740992.0) * 2.0 - 1.0);
            d[j] = (b ? b[j] : 0.0f) + amp * u;
        }
    }
}

int msx_cmd_bench_merge(int argc, char **argv) {
    int reps = 5, threads = 0, i, k, rc = 1, enc_runs = 2;
    double enc_s = 0;
    msx_sam_arch arch;
    msx_checkpoint *models[3] = {NULL, NULL, NULL}, *out = NULL;
    msx_merger *m = NULL;
    msx_plan *plan = NULL;
    msx_result r;
    int64_t numel = 0;
    float *a = NULL, *b = NULL;
    double copy_gbs, times[6][64], ties_early[1] = {0};
    msx_group_plan cfg[5];
    static const char *const names[5] = {"linear", "task_arithmetic", "ties (r=0.2)", "ties (r=0.7)", "slerp"};
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: medsamix bench-merge [--reps N] [--threads N] [--encoder-runs N]\n"
                   "Merges three ViT-B-sized models (base + 2 fine-tuned, 93.7 M random float32 parameters each,\n"
                   "the real SAM ViT-B key set) with each method and reports the median time and the achieved\n"
                   "bandwidth (bytes read + written: every source read once, the output written once) against a\n"
                   "STREAM-style copy (8 bytes per element) measured in the same run. The first round is a warm-up;\n"
                   "its TIES run (a merger's first) is reported on its own. TIES is then put against a search trial\n"
                   "on ViT-B with 8 calibration images, taken as 8 image-encoder passes: the encoder is timed in the\n"
                   "same run on the merged model (median of --encoder-runs, default 2, after one warm-up);\n"
                   "--encoder-runs 0 skips it and assumes 5 s per pass.\n");
            return 0;
        } else if (i + 1 < argc && (!strcmp(argv[i], "--reps") || !strcmp(argv[i], "--threads") ||
                                     !strcmp(argv[i], "--encoder-runs"))) {
            int v;
            if (!msx_cli_int("bench-merge", argv[i], argv[i + 1], !strcmp(argv[i], "--reps") ? 1 : 0,
                             !strcmp(argv[i], "--reps") ? 63 : !strcmp(argv[i], "--encoder-runs") ? 31 : 1024, &v))
                return 2;
            if (!strcmp(argv[i], "--reps")) reps = v;
            else if (!strcmp(argv[i], "--encoder-runs")) enc_runs = v;
            else threads = v;
            i++;
        } else { fprintf(stderr, "bench-merge: unknown option '%s'\n", argv[i]); return 2; }
    }
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(threads);
    threads = omp_get_max_threads();
#else
    threads = 1;
#endif
    msx_sam_arch_default(&arch);
    for (k = 0; k < 3; k++) {
        int nk = msx_sam_key_count(&arch);
        models[k] = msx_ckpt_new();
        if (!models[k]) { fprintf(stderr, "bench-merge: out of memory\n"); goto done; }
        for (i = 0; i < nk; i++) {
            char name[256];
            int nd;
            int64_t shape[MSX_MAX_DIMS];
            msx_tensor *t;
            if ((r = msx_sam_key_at(&arch, i, name, sizeof name, &nd, shape)) != MSX_OK) goto fail;
            if ((r = msx_ckpt_add(models[k], name, MSX_F32, nd, shape, NULL, &t)) != MSX_OK) goto fail;
            if (k == 0) numel += t->numel;
        }
        fill_random(models[k], k ? models[0] : NULL, (uint64_t)k + 1, k ? 0.002f : 0.05f);
    }
    if ((r = msx_ckpt_clone(models[0], &out)) != MSX_OK) goto fail;
    {
        const msx_checkpoint *fts[2] = {models[1], models[2]};
        if ((r = msx_merger_create(models[0], fts, 2, 2, &m)) != MSX_OK) goto fail;
    }
    if ((r = msx_merger_plan_create(m, &plan)) != MSX_OK) goto fail;
    memset(cfg, 0, sizeof cfg);
    cfg[0].method = MSX_MERGE_LINEAR;
    cfg[0].weights[0] = 0.4;
    cfg[0].weights[1] = cfg[0].weights[2] = 0.3;
    cfg[1].method = MSX_MERGE_TASK_ARITHMETIC;
    cfg[1].scale = 0.5;
    cfg[2].method = cfg[3].method = MSX_MERGE_TIES;
    cfg[2].drop_rate = 0.2;
    cfg[2].scale = 0.8;
    cfg[3].drop_rate = 0.7;
    cfg[3].scale = 1.0;
    cfg[4].method = MSX_MERGE_SLERP;
    cfg[4].t[0] = 0.93;
    cfg[4].t[1] = 0.90;
    cfg[4].t[2] = 0.1;
    printf("bench-merge: %d tensors, %.1f M parameters per model (SAM ViT-B keys), base + 2 fine-tuned, %d threads, "
           "median of %d\n", models[0]->n, (double)numel / 1e6, threads, reps);

    /* STREAM-style copy over a buffer of one model's size, scheduled like
       the merge (dynamic chunks), interleaved with the merges so every
       method sees the same machine load */
    a = (float *)msx_malloc((size_t)numel * 4);
    b = (float *)msx_malloc((size_t)numel * 4);
    if (!a || !b) { fprintf(stderr, "bench-merge: out of memory\n"); goto done; }
    {
        int64_t j, nch = (numel + CHUNK - 1) / CHUNK;
        double med[6];
#pragma omp parallel for schedule(static)
        for (j = 0; j < numel; j++) { a[j] = (float)j; b[j] = 0; }
        for (k = 0; k <= reps; k++) {
            double t0 = msx_time_now();
#pragma omp parallel for schedule(dynamic, 1)
            for (j = 0; j < nch; j++) {
                int64_t e = (j + 1) * CHUNK < numel ? (j + 1) * CHUNK : numel;
                memcpy(b + j * CHUNK, a + j * CHUNK, (size_t)(e - j * CHUNK) * sizeof(float));
            }
            if (k) times[0][k - 1] = msx_time_now() - t0; /* the first round warms up */
            for (i = 0; i < 5; i++) {
                if ((r = msx_plan_set_uniform(plan, &cfg[i])) != MSX_OK) goto fail;
                t0 = msx_time_now();
                if ((r = msx_merger_run(m, plan, out, NULL)) != MSX_OK) goto fail;
                if (k) times[i + 1][k - 1] = msx_time_now() - t0;
                else if (i == 2) ties_early[0] = msx_time_now() - t0; /* a merger's first TIES run */
            }
        }
        for (i = 0; i < 6; i++) med[i] = median(times[i], reps);
        copy_gbs = 8.0 * (double)numel / med[0] / 1e9;
        printf("  %-16s %8.1f ms  %6.2f GB/s  (baseline, 8 B/element)\n", "copy", med[0] * 1e3, copy_gbs);
        for (i = 0; i < 5; i++) {
            /* sources read once + output written once (slerp reads 2 models) */
            double bytes = 4.0 * (double)numel * (i == 4 ? 3.0 : 4.0);
            printf("  %-16s %8.1f ms  %6.2f GB/s  %5.1f %% of copy\n", names[i], med[i + 1] * 1e3,
                   bytes / med[i + 1] / 1e9, 100.0 * bytes / med[i + 1] / 1e9 / copy_gbs);
        }
        printf("  (TIES rows: later runs; a merger's first TIES run, which also allocates its scratch: %.1f ms)\n",
               ties_early[0] * 1e3);
        /* one ViT-B image-encoder pass on the merged model, timed here */
        if (enc_runs > 0) {
            msx_sam *sam = NULL;
            msx_sam_ws *ws = NULL;
            float *img = (float *)msx_malloc((size_t)3 * 1024 * 1024 * sizeof(float));
            double te[32];
            msx_rng g;
            if (!img) { fprintf(stderr, "bench-merge: out of memory\n"); goto done; }
            msx_rng_seed(&g, 7);
            for (k = 0; k < 3 * 1024 * 1024; k++) img[k] = (float)msx_rng_uniform(&g) * 4.0f - 2.0f;
            r = msx_sam_create(out, &arch, NULL, &sam);
            if (r == MSX_OK) r = msx_sam_ws_create(sam, &ws);
            if (r == MSX_OK) r = msx_sam_encode(sam, ws, img, NULL); /* warm-up */
            for (k = 0; r == MSX_OK && k < enc_runs; k++) {
                double t0 = msx_time_now();
                r = msx_sam_encode(sam, ws, img, NULL);
                te[k] = msx_time_now() - t0;
            }
            msx_sam_ws_free(ws);
            msx_sam_free(sam);
            msx_free(img);
            if (r != MSX_OK) goto fail;
            enc_s = median(te, enc_runs);
        }
        {
            double trial = 8.0 * (enc_runs > 0 ? enc_s : 5.0), tt = med[3] > med[4] ? med[3] : med[4];
            printf("  ViT-B image encoder: %.2f s per pass (%s)\n", enc_runs > 0 ? enc_s : 5.0,
                   enc_runs > 0 ? "measured in this run" : "assumed, --encoder-runs 0");
            printf("  TIES (slower of the two rows) = %.2f %% of a ViT-B trial with 8 calibration images (8 encoder passes, "
                   "%.1f s); first run %.2f %%\n", 100.0 * tt / trial, trial, 100.0 * ties_early[0] / trial);
        }
    }
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "bench-merge: %s: %s\n", msx_result_str(r), msx_last_error());
done:
    msx_free(a);
    msx_free(b);
    msx_plan_free(plan);
    msx_merger_free(m);
    msx_ckpt_free(out);
    for (k = 0; k < 3; k++) msx_ckpt_free(models[k]);
    return rc;
}
