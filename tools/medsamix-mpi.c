/* medsamix-mpi - the MedSAMix search across the ranks of an MPI job.

     mpirun -np P medsamix-mpi search <the options of `medsamix search`>
                                      [--sync] [--coordinator-only]

   Rank 0 owns the optimiser, the trial log, --resume and the reports; every
   rank (rank 0 too, unless --coordinator-only) loads the models and its
   calib images once (msx_search_worker) and evaluates the units of work it
   is sent with its own --jobs x --threads. A unit is "configuration on these
   calib images -> per-image Dice" (a trial, or one racing stage of it):
   messages carry configurations and Dice, never weights.
   Schedules: asynchronous by default (a new trial starts whenever a worker
   slot frees; results depend on timing), or --sync: batches of --batch B
   trials whose records equal those of `medsamix search --batch B` with the
   same seed and threads per evaluation. The log header records which.
   Start-up: every rank loads its data and sends rank 0 its status and the
   fingerprint of its models and task folders; rank 0 prints every problem
   and all ranks stop together (no hang) before any long work. With -np 1 it
   runs as a single process. A rank that dies takes the job down (MPI's
   default); rerunning the same command with --resume loses only the trials
   that were in flight.
   MPI use: rank 0's main thread alone talks to the other ranks
   (MPI_THREAD_FUNNELED); evaluations run on one POSIX thread per slot. */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "cli.h"

#include <mpi.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>

enum { TAG_UNIT = 1, TAG_RESULT = 2, TAG_ERRTEXT = 3, TAG_STOP = 4 };

static volatile sig_atomic_t stop_flag = 0;   /* the search: Ctrl-C / SIGTERM on rank 0 */
static volatile sig_atomic_t worker_stop = 0; /* this rank's evaluations: no longer wanted */
static void on_signal(int sig) {
    stop_flag = 1;
    signal(sig, SIG_DFL);
}

static void nap(void) {
    struct timespec ts = {0, 200000}; /* 0.2 ms: polling cost is negligible next to a unit */
    nanosleep(&ts, NULL);
}

/* ---- slots: one POSIX thread per local worker slot --------------------------- */

typedef struct slot {
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    msx_search_worker *w;
    int index;             /* worker slot */
    int has_job, done, quit, failed;
    int tag, n;            /* the unit (tag: the requester's) */
    double *cfg, *dice;
    int *ids;
    char err[1024];
} slot;

static void *slot_main(void *arg) {
    slot *s = (slot *)arg;
    for (;;) {
        msx_result r;
        pthread_mutex_lock(&s->mu);
        while (!s->has_job && !s->quit) pthread_cond_wait(&s->cv, &s->mu);
        if (s->quit) { pthread_mutex_unlock(&s->mu); break; }
        pthread_mutex_unlock(&s->mu);
        r = msx_search_worker_eval(s->w, s->index, s->cfg, s->ids, s->n, s->dice);
        pthread_mutex_lock(&s->mu);
        s->failed = r != MSX_OK;
        if (r != MSX_OK) snprintf(s->err, sizeof s->err, "%s", msx_last_error());
        s->has_job = 0;
        s->done = 1;
        pthread_mutex_unlock(&s->mu);
    }
    return NULL;
}

static int slots_start(slot *s, int n, msx_search_worker *w) {
    int i, dim = msx_search_worker_dim(w), ni = msx_search_worker_n_images(w);
    for (i = 0; i < n; i++) {
        memset(&s[i], 0, sizeof s[i]);
        s[i].w = w;
        s[i].index = i;
        s[i].cfg = (double *)malloc(sizeof(double) * (size_t)(dim + 1));
        s[i].dice = (double *)malloc(sizeof(double) * (size_t)(ni + 1));
        s[i].ids = (int *)malloc(sizeof(int) * (size_t)(ni + 1));
        if (!s[i].cfg || !s[i].dice || !s[i].ids) return 0;
        pthread_mutex_init(&s[i].mu, NULL);
        pthread_cond_init(&s[i].cv, NULL);
        if (pthread_create(&s[i].th, NULL, slot_main, &s[i]) != 0) return 0;
    }
    return 1;
}

static void slots_stop(slot *s, int n) {
    int i;
    for (i = 0; i < n; i++) {
        pthread_mutex_lock(&s[i].mu);
        s[i].quit = 1;
        pthread_cond_signal(&s[i].cv);
        pthread_mutex_unlock(&s[i].mu);
        pthread_join(s[i].th, NULL);
        pthread_mutex_destroy(&s[i].mu);
        pthread_cond_destroy(&s[i].cv);
        free(s[i].cfg);
        free(s[i].dice);
        free(s[i].ids);
    }
}

/* Hands a unit to an idle slot. */
static void slot_give(slot *s, int tag, const double *cfg, int dim, const int *ids, int n) {
    pthread_mutex_lock(&s->mu);
    memcpy(s->cfg, cfg, sizeof(double) * (size_t)dim);
    memcpy(s->ids, ids, sizeof(int) * (size_t)n);
    s->tag = tag;
    s->n = n;
    s->done = 0;
    s->has_job = 1;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

static int slot_take_done(slot *s) {
    int d;
    pthread_mutex_lock(&s->mu);
    d = s->done;
    s->done = 0;
    pthread_mutex_unlock(&s->mu);
    return d;
}

/* ---- messages ------------------------------------------------------------------ */
/* unit:   doubles [tag, slot, n, cfg[dim] (NAN = inactive), ids[n]]
   result: doubles [tag, failed, n, dice[n]], then TAG_ERRTEXT if failed.
   Integers are exact in doubles (all below 2^53). */

static void send_result(int tag, int failed, int n, const double *dice, const char *err) {
    double *b = (double *)malloc(sizeof(double) * (size_t)(n + 3));
    int i;
    if (!b) MPI_Abort(MPI_COMM_WORLD, 1);
    b[0] = tag;
    b[1] = failed;
    b[2] = failed ? 0 : n;
    for (i = 0; i < n && !failed; i++) b[3 + i] = dice[i];
    MPI_Send(b, failed ? 3 : n + 3, MPI_DOUBLE, 0, TAG_RESULT, MPI_COMM_WORLD);
    if (failed) MPI_Send((void *)err, (int)strlen(err) + 1, MPI_CHAR, 0, TAG_ERRTEXT, MPI_COMM_WORLD);
    free(b);
}

/* A rank > 0: evaluate what rank 0 sends until it says stop. */
static int serve(msx_search_worker *w, volatile sig_atomic_t *cancel) {
    int ns = msx_search_worker_slots(w), dim = msx_search_worker_dim(w), ni = msx_search_worker_n_images(w);
    int stop = 0, busy = 0, i;
    slot *s = (slot *)calloc((size_t)ns, sizeof *s);
    double *buf = (double *)malloc(sizeof(double) * (size_t)(dim + ni + 3));
    if (!s || !buf || !slots_start(s, ns, w)) { fprintf(stderr, "medsamix-mpi: out of memory\n"); MPI_Abort(MPI_COMM_WORLD, 1); }
    while (!stop || busy) {
        int flag = 0, any = 0;
        MPI_Status st;
        MPI_Iprobe(0, MPI_ANY_TAG, MPI_COMM_WORLD, &flag, &st);
        if (flag) {
            any = 1;
            if (st.MPI_TAG == TAG_STOP) {
                MPI_Recv(NULL, 0, MPI_CHAR, 0, TAG_STOP, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                stop = 1;
                *cancel = 1; /* units still running return early; their results are not wanted */
            } else if (st.MPI_TAG == TAG_UNIT) {
                int cnt, tag, sl, n, k;
                MPI_Get_count(&st, MPI_DOUBLE, &cnt);
                if (cnt > dim + ni + 3) { fprintf(stderr, "medsamix-mpi: unit of %d values from rank 0 (at most %d)\n", cnt, dim + ni + 3); MPI_Abort(MPI_COMM_WORLD, 1); }
                MPI_Recv(buf, cnt, MPI_DOUBLE, 0, TAG_UNIT, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                tag = (int)buf[0];
                sl = (int)buf[1];
                n = (int)buf[2];
                if (sl < 0 || sl >= ns || n < 0 || cnt != 3 + dim + n || s[sl].has_job) {
                    fprintf(stderr, "medsamix-mpi: malformed unit from rank 0 (slot %d, %d images, %d values)\n", sl, n, cnt);
                    MPI_Abort(MPI_COMM_WORLD, 1);
                }
                for (k = 0; k < n; k++) s[sl].ids[k] = (int)buf[3 + dim + k];
                slot_give(&s[sl], tag, buf + 3, dim, s[sl].ids, n);
                busy++;
            } else {
                fprintf(stderr, "medsamix-mpi: unexpected message tag %d from rank 0\n", st.MPI_TAG);
                MPI_Abort(MPI_COMM_WORLD, 1);
            }
        }
        for (i = 0; i < ns; i++)
            if (slot_take_done(&s[i])) {
                any = 1;
                busy--;
                if (!stop) send_result(s[i].tag, s[i].failed, s[i].n, s[i].dice, s[i].err);
            }
        if (!any) nap();
    }
    slots_stop(s, ns);
    free(s);
    free(buf);
    return 0;
}

/* ---- rank 0: the executor -------------------------------------------------------- */

typedef struct exec_slot { int rank, slot; double *dice; int n; } exec_slot;

typedef struct mpi_exec {
    msx_search_executor x;
    exec_slot *map;          /* tag -> (rank, slot) */
    int n_map;
    slot *local;             /* rank 0's slots */
    int n_local;
    int size, stopped;
    double *buf;
    int dim, n_images;
    msx_search_worker *w;    /* rank 0's worker, freed when the search needs no more units */
} mpi_exec;

static msx_result ex_submit(void *user, int tag, const double *cfg, int dim, const int *ids, int n, double *dice) {
    mpi_exec *E = (mpi_exec *)user;
    exec_slot *m = &E->map[tag];
    int k;
    m->dice = dice;
    m->n = n;
    if (m->rank == 0) {
        slot_give(&E->local[m->slot], tag, cfg, dim, ids, n);
        return MSX_OK;
    }
    E->buf[0] = tag;
    E->buf[1] = m->slot;
    E->buf[2] = n;
    memcpy(E->buf + 3, cfg, sizeof(double) * (size_t)dim);
    for (k = 0; k < n; k++) E->buf[3 + dim + k] = ids[k];
    MPI_Send(E->buf, 3 + dim + n, MPI_DOUBLE, m->rank, TAG_UNIT, MPI_COMM_WORLD);
    return MSX_OK;
}

static msx_result ex_poll(mpi_exec *E, int *tag, int *failed, int *got);

static msx_result ex_wait_any(void *user, int *tag, int *failed) {
    mpi_exec *E = (mpi_exec *)user;
    for (;;) {
        int got = 0;
        msx_result r = ex_poll(E, tag, failed, &got);
        if (r != MSX_OK || got) return r;
        nap();
    }
}

static msx_result ex_poll_any(void *user, int *tag, int *failed, int *got) { return ex_poll((mpi_exec *)user, tag, failed, got); }

/* One look at rank 0's slots and the incoming results. */
static msx_result ex_poll(mpi_exec *E, int *tag, int *failed, int *got) {
    *got = 1;
    {
        int i, flag = 0;
        MPI_Status st;
        for (i = 0; i < E->n_local; i++)
            if (slot_take_done(&E->local[i])) {
                slot *s = &E->local[i];
                *tag = s->tag;
                *failed = s->failed;
                if (s->failed) fprintf(stderr, "\nmedsamix-mpi: rank 0 slot %d: %s\n", i, s->err);
                else memcpy(E->map[s->tag].dice, s->dice, sizeof(double) * (size_t)s->n);
                return MSX_OK;
            }
        MPI_Iprobe(MPI_ANY_SOURCE, TAG_RESULT, MPI_COMM_WORLD, &flag, &st);
        if (flag) {
            int cnt, t, n;
            MPI_Get_count(&st, MPI_DOUBLE, &cnt);
            if (cnt < 3 || cnt > 3 + E->n_images) { fprintf(stderr, "medsamix-mpi: result of %d values from rank %d\n", cnt, st.MPI_SOURCE); return MSX_E_STATE; }
            {
                double *b = (double *)malloc(sizeof(double) * (size_t)cnt);
                if (!b) return MSX_E_NOMEM;
                MPI_Recv(b, cnt, MPI_DOUBLE, st.MPI_SOURCE, TAG_RESULT, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                t = (int)b[0];
                *failed = b[1] != 0;
                n = (int)b[2];
                if (t < 0 || t >= E->n_map || E->map[t].rank != st.MPI_SOURCE || (!*failed && n != E->map[t].n) || cnt != 3 + n) {
                    free(b);
                    fprintf(stderr, "medsamix-mpi: malformed result from rank %d\n", st.MPI_SOURCE);
                    return MSX_E_STATE;
                }
                if (!*failed) memcpy(E->map[t].dice, b + 3, sizeof(double) * (size_t)n);
                free(b);
            }
            if (*failed) {
                char msg[1024];
                MPI_Recv(msg, sizeof msg, MPI_CHAR, st.MPI_SOURCE, TAG_ERRTEXT, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                msg[sizeof msg - 1] = 0;
                fprintf(stderr, "\nmedsamix-mpi: rank %d slot %d: %s\n", st.MPI_SOURCE, E->map[t].slot, msg);
            }
            *tag = t;
            return MSX_OK;
        }
    }
    *got = 0;
    return MSX_OK;
}

/* The search needs no more units: release the other ranks (they exit) and
   rank 0's own worker slots, before the report builds its workers. */
static void ex_done(void *user) {
    mpi_exec *E = (mpi_exec *)user;
    int r;
    if (E->stopped) return;
    E->stopped = 1;
    for (r = 1; r < E->size; r++) MPI_Send(NULL, 0, MPI_CHAR, r, TAG_STOP, MPI_COMM_WORLD);
    worker_stop = 1; /* rank 0's slots still evaluating return early */
    slots_stop(E->local, E->n_local);
    E->n_local = 0;
    msx_search_worker_free(E->w);
    E->w = NULL;
}

/* ---- start-up: every rank's status and fingerprint on rank 0 --------------------- */

typedef struct rank_status {
    int ok, slots;
    unsigned long long fingerprint;
    char host[64];
    char msg[2048]; /* error, or the worker's description */
} rank_status;

static const char *const usage =
    "usage: mpirun -np P medsamix-mpi search <options of `medsamix search`> [--sync] [--coordinator-only]\n"
    "\n"
    "  --sync               synchronous batches of --batch B trials (default B = all worker slots, at\n"
    "                       most 256): the trial records equal `medsamix search --batch B`'s with the\n"
    "                       same seed and threads per evaluation; default: asynchronous (a trial starts\n"
    "                       whenever a slot frees, results depend on timing)\n"
    "  --coordinator-only   rank 0 runs the optimiser, the log and the report but evaluates no units\n"
    "  --jobs J --threads T worker slots x threads per evaluation, on each rank\n"
    "Rank 0 owns trials.jsonl, --resume and the reports; every rank loads the models and the calib\n"
    "images once. A rank that dies ends the job; rerun the command with --resume to continue.\n";

int main(int argc, char **argv) {
    int rank, size, provided, i, sync = 0, coord_only = 0, help = 0, rc, na = 0, go;
    char **av;
    const char *models[MSX_MAX_MODELS], *tasks[MSX_SEARCH_MAX_TASKS];
    msx_search_options o;
    msx_search_summary sum;
    msx_search_worker *w = NULL;
    rank_status me, *all = NULL;
    msx_result r = MSX_OK;

    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (argc < 2 || strcmp(argv[1], "search")) {
        int asked = argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"));
        if (rank == 0) fputs(usage, asked ? stdout : stderr);
        MPI_Finalize();
        return asked ? 0 : 2;
    }
    /* our options out, the rest to the `search` parser (quiet on ranks > 0) */
    av = (char **)calloc((size_t)argc + 1, sizeof *av);
    if (!av) MPI_Abort(MPI_COMM_WORLD, 1);
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--sync")) sync = 1;
        else if (!strcmp(argv[i], "--coordinator-only")) coord_only = 1;
        else av[na++] = argv[i];
    }
    if (rank != 0) { /* usage errors are printed once, by rank 0 */
        int saved[2] = {dup(1), dup(2)}, null = open("/dev/null", O_WRONLY);
        fflush(NULL);
        if (null >= 0) { dup2(null, 1); dup2(null, 2); close(null); }
        rc = msx_cli_search_parse(na, av, &o, models, tasks, &help);
        fflush(NULL);
        for (i = 0; i < 2; i++)
            if (saved[i] >= 0) { dup2(saved[i], i + 1); close(saved[i]); }
    } else {
        rc = msx_cli_search_parse(na, av, &o, models, tasks, &help);
        if (help) fputs(usage, stdout);
    }
    if (rc != 0 || help) {
        free(av);
        MPI_Finalize();
        return rc;
    }

    if (size == 1) { /* nothing to distribute */
        if (o.progress >= 0) printf("medsamix-mpi: 1 rank: running as a single process (synchronous batches, as medsamix search)\n");
        o.cancel = &stop_flag;
        signal(SIGINT, on_signal);
        signal(SIGTERM, on_signal);
        r = msx_search_run(&o, &sum);
        rc = msx_cli_search_finish(&o, &sum, r);
        free(av);
        MPI_Finalize();
        return rc;
    }

    /* 1. every rank loads its data (rank 0 a one-slot worker when it only
          coordinates: enough for the fingerprint) */
    memset(&me, 0, sizeof me);
    gethostname(me.host, sizeof me.host - 1);
    {
        msx_search_options wo = o;
        volatile sig_atomic_t *cancel = &worker_stop;
        if (rank == 0 && coord_only) { wo.jobs = 1; wo.threads = 1; }
        wo.cancel = cancel;
        r = msx_search_worker_create(&wo, &w);
    }
    me.ok = r == MSX_OK;
    if (me.ok) {
        me.slots = rank == 0 && coord_only ? 0 : msx_search_worker_slots(w);
        me.fingerprint = msx_search_worker_fingerprint(w);
        snprintf(me.msg, sizeof me.msg, "%s", msx_search_worker_describe(w));
    } else snprintf(me.msg, sizeof me.msg, "%s", msx_last_error());
    if (rank == 0 && !(all = (rank_status *)calloc((size_t)size, sizeof *all))) MPI_Abort(MPI_COMM_WORLD, 1);
    MPI_Gather(&me, (int)sizeof me, MPI_BYTE, all, (int)sizeof me, MPI_BYTE, 0, MPI_COMM_WORLD);
    /* 2. rank 0 judges: every problem printed, then all ranks stop together */
    go = 1;
    if (rank == 0) {
        int ref = -1, total = 0;
        for (i = 0; i < size; i++) {
            if (!all[i].ok) {
                fprintf(stderr, "medsamix-mpi: rank %d (%s) cannot load its data: %s\n", i, all[i].host, all[i].msg);
                go = 0;
                continue;
            }
            total += all[i].slots;
            if (ref < 0) ref = i;
            else if (all[i].fingerprint != all[ref].fingerprint) {
                fprintf(stderr, "medsamix-mpi: rank %d (%s) sees different model files or task folders than rank %d (%s):\n"
                                "  rank %d: %s\n  rank %d: %s\n", i, all[i].host, ref, all[ref].host, ref, all[ref].msg, i, all[i].msg);
                go = 0;
            }
        }
        if (go && total < 1) { fprintf(stderr, "medsamix-mpi: no worker slots (--coordinator-only needs -np >= 2)\n"); go = 0; }
        if (!go) fprintf(stderr, "medsamix-mpi: stopped before the search started; every rank must see the same files\n");
    }
    MPI_Bcast(&go, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (!go) {
        msx_search_worker_free(w);
        free(all);
        free(av);
        MPI_Finalize();
        return 1;
    }
    if (rank != 0) {
        serve(w, &worker_stop);
        msx_search_worker_free(w);
        free(av);
        MPI_Finalize();
        return 0;
    }

    /* 3. rank 0: the search, its units on every rank's slots */
    {
        mpi_exec E;
        int k, j, n_local = coord_only ? 0 : all[0].slots;
        memset(&E, 0, sizeof E);
        E.size = size;
        E.dim = msx_search_worker_dim(w);
        E.n_images = msx_search_worker_n_images(w);
        for (i = 0; i < size; i++) E.n_map += i == 0 ? n_local : all[i].slots;
        E.map = (exec_slot *)calloc((size_t)E.n_map, sizeof *E.map);
        E.buf = (double *)malloc(sizeof(double) * (size_t)(E.dim + msx_search_worker_n_images(w) + 3));
        E.local = (slot *)calloc((size_t)(n_local ? n_local : 1), sizeof *E.local);
        if (!E.map || !E.buf || !E.local) MPI_Abort(MPI_COMM_WORLD, 1);
        /* interleave the ranks so a partly filled batch spreads over them */
        for (k = 0, j = 0; k < E.n_map; j++)
            for (i = 0; i < size && k < E.n_map; i++)
                if (j < (i == 0 ? n_local : all[i].slots)) { E.map[k].rank = i; E.map[k].slot = j; k++; }
        if (coord_only) { msx_search_worker_free(w); w = NULL; }
        else if (!slots_start(E.local, n_local, w)) MPI_Abort(MPI_COMM_WORLD, 1);
        E.w = w;
        w = NULL;
        E.n_local = n_local;
        E.x.n_slots = E.n_map;
        E.x.submit = ex_submit;
        E.x.wait_any = ex_wait_any;
        E.x.poll_any = ex_poll_any;
        E.x.done = ex_done;
        E.x.user = &E;
        o.executor = &E.x;
        o.async = !sync;
        o.cancel = &stop_flag;
        if (o.progress >= 0)
            printf("medsamix-mpi: %d ranks, %d worker slot(s)%s, %s schedule\n", size, E.n_map,
                   coord_only ? " (rank 0 coordinates only)" : "", sync ? "synchronous (--sync)" : "asynchronous");
        signal(SIGINT, on_signal);
        signal(SIGTERM, on_signal);
        r = msx_search_run(&o, &sum); /* calls ex_done when its units are over */
        ex_done(&E);
        rc = msx_cli_search_finish(&o, &sum, r);
        free(E.map);
        free(E.buf);
        free(E.local);
    }
    free(all);
    free(av);
    MPI_Finalize();
    return rc;
}
