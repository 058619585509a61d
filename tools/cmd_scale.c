/* tools/cmd_scale.c - `medsamix bench-scale`: the asynchronous coordinator
   (tools/medsamix-mpi.c without --sync) simulated for P = 2..1024 workers on
   a virtual clock, with ViT-B-sized trials and the coordinator's real costs.

   Coordinator costs, measured here first: msx_opt_ask (one proposal) and
   msx_opt_tell_config CPU time on the real MedSAMix space (ViT-B depth 12,
   base + 2 models, granularity 2, no pruning: 190 hyperparameters) with
   r observations, r = 0, 32, .., 2048 (log-log interpolation between them,
   linear in r beyond), plus one fsync'd log line per trial. A proposal with
   p trials pending pays the kriging believer's second forest fit on r + p
   rows (fit share of the measured ask).
   Trials: encoder passes = the fraction of the calib images a raced trial
   used, drawn from the demo world's measured distribution (MedSAMix-M, six
   tasks, 2 x 80 trials, seeds 1-2), times --images calib images; a trial
   lasts --merge-s + passes x --image-s (a ViT-B encoder pass at 4 threads
   per worker: the 1-thread 14.3 s of `medsamix bench`, / 4 at ~90 %).
   Schedule (as msx__srun_async with poll_any): every finished trial is
   logged and told, then one ask proposes for all idle workers (at most
   256; the believer refits at most 8 times per ask); the coordinator is one
   thread. Utilisation is measured until the last trial
   starts (afterwards the run drains by design). No sleeping; bounded by the
   cost measurement (about a minute on a loaded 2-core machine). */
#include "../medsamix.h"
#include "cli.h"

#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

/* A deterministic synthetic cost of a configuration: the optimiser's work
   does not depend on what the costs mean, only on how many there are. */
static double synth_cost(const msx_space *s, const double *x) {
    double u[512], c = 0;
    int i, d = msx_space_dim(s);
    msx_space_to_unit(s, x, u);
    for (i = 0; i < d && i < 512; i++)
        if (u[i] == u[i]) c += (u[i] - 0.3) * (u[i] - 0.3) / d;
    return c;
}

#define N_ROWS 8
static const int rows_grid[N_ROWS] = {0, 32, 64, 128, 256, 512, 1024, 2048};

typedef struct costs {
    double ask[N_ROWS], fit_share[N_ROWS], tell, log;
} costs;

static double interp(const costs *c, const double *v, double r) {
    int i;
    if (r <= rows_grid[1]) return r <= 0 ? v[0] : v[0] + (v[1] - v[0]) * r / rows_grid[1];
    for (i = 1; i + 1 < N_ROWS; i++)
        if (r <= rows_grid[i + 1]) {
            double a = log((double)rows_grid[i]), b = log((double)rows_grid[i + 1]), t = (log(r) - a) / (b - a);
            return exp(log(v[i]) + t * (log(v[i + 1]) - log(v[i])));
        }
    (void)c;
    return v[N_ROWS - 1] * r / rows_grid[N_ROWS - 1];
}

/* CPU seconds of one proposal with n told and p pending. */
static double ask_cost(const costs *c, int n, int p) {
    double a = interp(c, c->ask, n);
    if (p > 0 && n > 0) a += interp(c, c->ask, n + p) * interp(c, c->fit_share, n + p);
    return a;
}

static int measure(costs *c, int quiet) {
    static const char *const stems[3] = {"base", "spec_a", "spec_b"};
    msx_space *s = NULL;
    double x[512];
    int g, i;
    if (msx_search_space_create(12, 2, stems, 3, 0, &s) != MSX_OK) { fprintf(stderr, "bench-scale: %s\n", msx_last_error()); return 0; }
    for (g = 0; g < N_ROWS; g++) {
        msx_opt_options o;
        msx_opt *opt = NULL;
        msx_rng r;
        double t0, tf, ta, best = 1e300, share = 0;
        int rep, id;
        memset(&o, 0, sizeof o);
        o.seed = 1;
        o.n_init = rows_grid[g] ? -1 : 0; /* r = 0: an initial-design proposal */
        o.n_trials = 1000;
        if (msx_opt_create(s, &o, &opt) != MSX_OK) { fprintf(stderr, "bench-scale: %s\n", msx_last_error()); msx_space_free(s); return 0; }
        msx_rng_seed(&r, 7);
        t0 = cpu_now();
        for (i = 0; i < rows_grid[g]; i++) {
            double cost;
            msx_space_sample(s, &r, x);
            cost = synth_cost(s, x);
            msx_opt_tell_config(opt, x, &cost, 0);
        }
        if (rows_grid[g]) c->tell = (cpu_now() - t0) / rows_grid[g];
        for (rep = 0; rep < (rows_grid[g] >= 1024 ? 1 : 2); rep++) { /* best of: the machine is shared */
            double cost;
            t0 = cpu_now();
            if (msx_opt_ask(opt, 1, x, &id) != MSX_OK) { fprintf(stderr, "bench-scale: %s\n", msx_last_error()); break; }
            t0 = cpu_now() - t0;
            msx_opt_last_timing(opt, &tf, &ta);
            if (t0 < best) { best = t0; share = tf + ta > 0 ? tf / (tf + ta) : 0; }
            cost = synth_cost(s, x);
            msx_opt_tell(opt, id, &cost, 0);
        }
        c->ask[g] = best > 1e-6 ? best : 1e-6;
        c->fit_share[g] = share > 1e-3 ? share : 1e-3;
        if (!quiet) printf("  measured: %4d observations: ask %.4f s CPU (forest fit %.0f %%)\n", rows_grid[g], c->ask[g], 100 * share);
        fflush(stdout);
        msx_opt_free(opt);
    }
    msx_space_free(s);
    { /* one fsync'd log line, as the trial log writes it */
        char path[64], line[2048];
        int fd, k;
        double t1;
        snprintf(path, sizeof path, "/tmp/msx_scale_%ld.log", (long)getpid());
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        memset(line, 'x', sizeof line);
        line[sizeof line - 1] = '\n';
        t1 = msx_time_now();
        for (k = 0; k < 20 && fd >= 0; k++)
            if (write(fd, line, sizeof line) < 0 || fsync(fd) != 0) break;
        c->log = fd >= 0 ? (msx_time_now() - t1) / 20 : 0.005;
        if (fd >= 0) { close(fd); unlink(path); }
    }
    return 1;
}

/* The demo world's measured passes per raced trial, as fractions of the
   calib images (MedSAMix-M, 6 tasks x 16 calib images, 160 trials):
   119 x 1/8, 10 x 1/4, 9 x 1/2, 22 x 1. */
static double draw_fraction(msx_rng *r) {
    double u = msx_rng_uniform(r) * 160;
    return u < 119 ? 0.125 : u < 129 ? 0.25 : u < 138 ? 0.5 : 1.0;
}

/* One ask for k idle workers with n told and p pending: the believer
   refits min(k, MSX_OPT_BELIEVER_REFITS = 8) times (see msx_opt_ask). */
static double ask_k_cost(const costs *c, int n, int p, int k) {
    int refits = k < 8 ? k : 8, stride = (k + 7) / 8, i;
    double a = 0;
    for (i = 0; i < refits; i++) a += ask_cost(c, n, p + i * stride);
    return a;
}

typedef struct result {
    double per_proposal, coord_busy, last_start, trials_per_hour, util;
} result;

/* The schedule of msx__srun_async on a virtual clock: take in every
   finished trial (log + tell), then one ask for all idle workers (at most
   256), start them; else wait for the next finish. Utilisation = busy
   worker time within [0, horizon] / (P x horizon). */
static result simulate(const costs *c, int P, int N, double images, double image_s, double merge_s, uint64_t seed, double horizon) {
    double *fin = (double *)malloc(sizeof(double) * (size_t)P), *st = (double *)malloc(sizeof(double) * (size_t)P);
    int *idle = (int *)malloc(sizeof(int) * (size_t)P);
    int n_idle = P, n_asked = 0, n_told = 0, in_flight = 0, i;
    double now = 0, coord = 0, ask_total = 0, work = 0;
    msx_rng r;
    result res;
    memset(&res, 0, sizeof res);
    if (!fin || !idle || !st) { free(fin); free(idle); free(st); return res; }
    msx_rng_seed(&r, seed);
    for (i = 0; i < P; i++) { idle[i] = i; fin[i] = -1; }
    while (n_told < N) {
        int any = 0, k;
        for (i = 0; i < P; i++)
            if (fin[i] >= 0 && fin[i] <= now) {
                double t = c->log + c->tell;
                now += t;
                coord += t;
                if (horizon > 0) work += (fin[i] < horizon ? fin[i] : horizon) - (st[i] < horizon ? st[i] : horizon);
                fin[i] = -1;
                idle[n_idle++] = i;
                in_flight--;
                n_told++;
                any = 1;
            }
        k = n_idle < N - n_asked ? n_idle : N - n_asked;
        if (k > 256) k = 256;
        if (k > 0) {
            double a = ask_k_cost(c, n_told, in_flight, k);
            now += a;
            coord += a;
            ask_total += a;
            while (k-- > 0) {
                int w = idle[--n_idle];
                st[w] = now;
                fin[w] = now + merge_s + draw_fraction(&r) * images * image_s;
                n_asked++;
                in_flight++;
            }
            res.last_start = now;
            continue;
        }
        if (!any) {
            double nx = 1e300;
            for (i = 0; i < P; i++)
                if (fin[i] >= 0 && fin[i] < nx) nx = fin[i];
            if (nx >= 1e300) break;
            if (nx > now) now = nx;
        }
    }
    res.per_proposal = n_asked ? ask_total / n_asked : 0;
    res.coord_busy = now > 0 ? coord / now : 0;
    res.trials_per_hour = now > 0 ? N / now * 3600 : 0;
    res.util = horizon > 0 ? work / (P * horizon) : 0;
    free(fin);
    free(idle);
    free(st);
    return res;
}

static const char *const scale_usage =
    "usage: medsamix bench-scale [--images N] [--image-s S] [--merge-s S] [--trials-per-worker K] [--max-workers P]\n"
    "Simulates the asynchronous MPI coordinator for P = 2, 4, .., 1024 workers on a virtual clock.\n"
    "  --images N      calib images per trial in full (default 32: two tasks x 16)\n"
    "  --image-s S     seconds per encoder pass on one worker (default 4.0: ViT-B at 4 threads)\n"
    "  --merge-s S     seconds to merge a configuration (default 0.2: ViT-B, base + 2)\n"
    "  --trials-per-worker K   trials simulated per worker (default 4, at least 200 in all)\n";

int msx_cmd_bench_scale(int argc, char **argv) {
    costs c;
    double images = 32, image_s = 4.0, merge_s = 0.2;
    int tpw = 4, maxp = 1024, i, P;
    double t0 = msx_time_now();
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { fputs(scale_usage, stdout); return 0; }
        if (!v) { fprintf(stderr, "bench-scale: %s needs a value\n\n%s", a, scale_usage); return 2; }
        if (!strcmp(a, "--images")) images = atof(v);
        else if (!strcmp(a, "--image-s")) image_s = atof(v);
        else if (!strcmp(a, "--merge-s")) merge_s = atof(v);
        else if (!strcmp(a, "--trials-per-worker")) tpw = atoi(v);
        else if (!strcmp(a, "--max-workers")) maxp = atoi(v);
        else { fprintf(stderr, "bench-scale: unknown option %s\n\n%s", a, scale_usage); return 2; }
        i++;
        if (!(images > 0 && image_s > 0 && merge_s >= 0 && tpw >= 1 && maxp >= 2 && maxp <= 65536)) {
            fprintf(stderr, "bench-scale: %s %s is out of range\n", a, v);
            return 2;
        }
    }
    printf("bench-scale: coordinator costs on the 190-dim MedSAMix space (CPU time, best of 2 where cheap)\n");
    memset(&c, 0, sizeof c);
    if (!measure(&c, 0)) return 1;
    printf("  tell %.2e s, fsync'd log line %.2e s\n", c.tell, c.log);
    printf("trials: %.2f s merge + passes x %.2f s, passes = demo-world fraction x %.0f images (mean %.1f passes)\n\n", merge_s, image_s,
           images, images * (119 * 0.125 + 10 * 0.25 + 9 * 0.5 + 22 * 1.0) / 160);
    printf("| workers | trials | coordinator CPU per proposal | coordinator busy | worker utilisation | trials per hour |\n");
    printf("|---:|---:|---:|---:|---:|---:|\n");
    for (P = 2; P <= maxp; P *= 2) {
        int N = tpw * P < 200 ? 200 : tpw * P;
        result r0 = simulate(&c, P, N, images, image_s, merge_s, 42, 0);
        result r = simulate(&c, P, N, images, image_s, merge_s, 42, r0.last_start);
        printf("| %d | %d | %.3f s | %.0f %% | %.1f %% | %.0f |\n", P, N, r.per_proposal, 100 * r.coord_busy, 100 * r.util, r.trials_per_hour);
        fflush(stdout);
    }
    printf("\n(%.0f s; utilisation until the last trial starts, the drain after it excluded)\n", msx_time_now() - t0);
    return 0;
}
