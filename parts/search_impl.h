/* ======================================================================== */
/* IMPLEMENTATION: search. Owns task folders (listing, validation, splits,   */
/* boxes), the calib-image cache, Dice evaluation, the MedSAMix search loop  */
/* (initial configs, ask/tell batches, parallel workers), the JSONL trial    */
/* log with resume, progress output and the report/plan/checkpoint outputs.  */
/* ======================================================================== */
#include <dirent.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- tasks ----------------------------------------------------------------- */

typedef struct msx__simg {
    char *image, *mask; /* paths */
    char *stem;
    int w, h;
    float box[4];
} msx__simg;

struct msx_task {
    char *name, *dir;
    msx_task_options opt;
    int n[2];
    msx__simg *img[2];
};

static int msx__search_is_image(const char *name) {
    const char *dot = strrchr(name, '.');
    static const char *const ext[] = {".png", ".jpg", ".jpeg", ".bmp", ".PNG", ".JPG", ".JPEG", ".BMP"};
    size_t i;
    if (!dot || name[0] == '.') return 0;
    for (i = 0; i < sizeof ext / sizeof ext[0]; i++)
        if (!strcmp(dot, ext[i])) return 1;
    return 0;
}

static int msx__search_cmpstr(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int msx__search_isdir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static char *msx__search_join(const char *a, const char *b) {
    size_t n = strlen(a) + strlen(b) + 2;
    char *s = (char *)MSX_MALLOC(n);
    if (s) snprintf(s, n, "%s%s%s", a, (a[0] && a[strlen(a) - 1] == '/') ? "" : "/", b);
    return s;
}

static void msx__search_free_list(char **v, int n) {
    int i;
    if (!v) return;
    for (i = 0; i < n; i++) MSX_FREE(v[i]);
    MSX_FREE(v);
}

/* Sorted image file names of a folder. */
static msx_result msx__search_list(const char *dir, char ***out, int *n_out) {
    DIR *d = opendir(dir);
    struct dirent *e;
    char **v = NULL;
    int n = 0, cap = 0;
    *out = NULL;
    *n_out = 0;
    if (!d) return msx__err(MSX_E_IO, "%s: cannot open folder (%s)", dir, strerror(errno));
    while ((e = readdir(d)) != NULL) {
        if (!msx__search_is_image(e->d_name)) continue;
        if (n == cap) {
            char **nv;
            cap = cap ? cap * 2 : 64;
            nv = (char **)MSX_REALLOC(v, (size_t)cap * sizeof *v);
            if (!nv) { closedir(d); msx__search_free_list(v, n); return msx__err(MSX_E_NOMEM, "out of memory"); }
            v = nv;
        }
        if (!(v[n] = msx__strdup(e->d_name))) { closedir(d); msx__search_free_list(v, n); return msx__err(MSX_E_NOMEM, "out of memory"); }
        n++;
    }
    closedir(d);
    if (n) qsort(v, (size_t)n, sizeof *v, msx__search_cmpstr);
    *out = v;
    *n_out = n;
    return MSX_OK;
}

static size_t msx__search_stemlen(const char *name) {
    const char *dot = strrchr(name, '.');
    return dot ? (size_t)(dot - name) : strlen(name);
}

static void msx__search_mask_opts(const msx_task_options *o, msx_mask_load_options *m) {
    memset(m, 0, sizeof *m);
    if (o->mask_rule == MSX_MASK_THRESHOLD) m->threshold = o->mask_value;
    else if (o->mask_rule == MSX_MASK_LABEL) { m->use_label = 1; m->label = o->mask_value; }
}

/* Loads a mask as 0/1 under the task's foreground rule (image section). */
static msx_result msx__search_load_mask(const msx_task *t, const msx__simg *s, msx_mask *out) {
    msx_mask_load_options mo;
    msx_result r;
    msx__search_mask_opts(&t->opt, &mo);
    if ((r = msx_mask_load(s->mask, &mo, out)) != MSX_OK) return r;
    if (out->w != s->w || out->h != s->h)
        return msx__err(MSX_E_SHAPE, "%s: mask is %dx%d but its image %s is %dx%d", s->mask, out->w, out->h, s->image, s->w, s->h);
    return MSX_OK;
}

/* Tight box (max inclusive) plus the seeded margin/jitter options. */
static int msx__search_box(const msx_task *t, const msx__simg *s, const msx_mask *m, float box[4]) {
    int b[4], k;
    if (msx_mask_bbox(m, b) != MSX_OK) { msx_clear_error(); return 0; }
    box[0] = (float)(b[0] - t->opt.box_margin);
    box[1] = (float)(b[1] - t->opt.box_margin);
    box[2] = (float)(b[2] + t->opt.box_margin);
    box[3] = (float)(b[3] + t->opt.box_margin);
    if (t->opt.box_jitter > 0) {
        /* One stream per image, keyed by its stem: the same boxes in every run
           and independent of listing order. */
        msx_rng r;
        uint64_t hsh = 1469598103934665603ULL;
        const char *p;
        double bw = b[2] - b[0], bh = b[3] - b[1];
        for (p = s->stem; *p; p++) hsh = (hsh ^ (unsigned char)*p) * 1099511628211ULL;
        msx_rng_seed(&r, t->opt.box_seed ^ hsh);
        for (k = 0; k < 4; k++)
            box[k] += (float)floor((2 * msx_rng_uniform(&r) - 1) * t->opt.box_jitter * (k & 1 ? bh : bw) + 0.5);
    }
    if (box[0] < 0) box[0] = 0;
    if (box[1] < 0) box[1] = 0;
    if (box[2] > s->w - 1) box[2] = (float)(s->w - 1);
    if (box[3] > s->h - 1) box[3] = (float)(s->h - 1);
    if (box[2] < box[0]) box[2] = box[0];
    if (box[3] < box[1]) box[3] = box[1];
    return 1;
}

MSXDEF void msx_task_free(msx_task *t) {
    int s, i;
    if (!t) return;
    for (s = 0; s < 2; s++) {
        for (i = 0; i < t->n[s]; i++) {
            MSX_FREE(t->img[s][i].image);
            MSX_FREE(t->img[s][i].mask);
            MSX_FREE(t->img[s][i].stem);
        }
        MSX_FREE(t->img[s]);
    }
    MSX_FREE(t->name);
    MSX_FREE(t->dir);
    MSX_FREE(t);
}

/* Pairs images/ and masks/ of one folder by stem; lists every unmatched file. */
static msx_result msx__search_pair(const char *dir, msx__simg **out, int *n_out) {
    char *idir = msx__search_join(dir, "images"), *mdir = msx__search_join(dir, "masks");
    char **iv = NULL, **mv = NULL;
    int ni = 0, nm = 0, i, j, n = 0;
    msx__simg *v = NULL;
    msx__sb miss = {NULL, 0, 0, 0};
    msx_result r = MSX_OK;
    *out = NULL;
    *n_out = 0;
    if (!idir || !mdir) { r = msx__err(MSX_E_NOMEM, "out of memory"); goto done; }
    if ((r = msx__search_list(idir, &iv, &ni)) != MSX_OK) goto done;
    if ((r = msx__search_list(mdir, &mv, &nm)) != MSX_OK) goto done;
    if (!ni) { r = msx__err(MSX_E_ARG, "%s: no images (.png/.jpg/.jpeg/.bmp)", idir); goto done; }
    v = (msx__simg *)msx__calloc((size_t)ni, sizeof *v);
    if (!v) { r = msx__err(MSX_E_NOMEM, "out of memory"); goto done; }
    /* both lists are sorted by full name; match stems with a scan */
    for (i = 0; i < ni; i++) {
        size_t li = msx__search_stemlen(iv[i]);
        int found = -1;
        for (j = 0; j < nm; j++) {
            if (!mv[j]) continue;
            if (msx__search_stemlen(mv[j]) == li && !strncmp(iv[i], mv[j], li)) {
                if (found >= 0) {
                    r = msx__err(MSX_E_ARG, "%s: two masks for image %s: %s and %s", mdir, iv[i], mv[found], mv[j]);
                    goto done;
                }
                found = j;
            }
        }
        if (found < 0) { msx__sb_printf(&miss, "%s%s/%s (no mask)", miss.n ? ", " : "", idir, iv[i]); continue; }
        v[n].image = msx__search_join(idir, iv[i]);
        v[n].mask = msx__search_join(mdir, mv[found]);
        v[n].stem = (char *)MSX_MALLOC(li + 1);
        if (!v[n].image || !v[n].mask || !v[n].stem) { n++; r = msx__err(MSX_E_NOMEM, "out of memory"); goto done; }
        memcpy(v[n].stem, iv[i], li);
        v[n].stem[li] = 0;
        MSX_FREE(mv[found]);
        mv[found] = NULL;
        n++;
    }
    for (j = 0; j < nm; j++)
        if (mv[j]) msx__sb_printf(&miss, "%s%s/%s (no image)", miss.n ? ", " : "", mdir, mv[j]);
    if (miss.n) {
        r = msx__err(MSX_E_ARG, "unmatched image/mask names (same stem required): %.900s", miss.s);
        goto done;
    }
done:
    if (r != MSX_OK && v) {
        for (i = 0; i < n; i++) { MSX_FREE(v[i].image); MSX_FREE(v[i].mask); MSX_FREE(v[i].stem); }
        MSX_FREE(v);
        v = NULL;
        n = 0;
    }
    msx__sb_free(&miss);
    msx__search_free_list(iv, ni);
    msx__search_free_list(mv, nm);
    MSX_FREE(idir);
    MSX_FREE(mdir);
    *out = v;
    *n_out = n;
    return r;
}

/* Decodes every image and mask: a broken file fails here, before any long
   work. */
static msx_result msx__search_validate(msx_task *t, int split) {
    int i;
    msx_image img;
    msx_mask m;
    msx_result r = MSX_OK;
    memset(&img, 0, sizeof img);
    memset(&m, 0, sizeof m);
    for (i = 0; r == MSX_OK && i < t->n[split]; i++) {
        msx__simg *s = &t->img[split][i];
        msx_image_free(&img);
        if ((r = msx_image_load(s->image, &img)) != MSX_OK) {
            r = msx__err(r, "unreadable image %s: %s", s->image, msx_last_error());
            break;
        }
        s->w = img.w;
        s->h = img.h;
        if ((r = msx__search_load_mask(t, s, &m)) != MSX_OK) break;
        if (!msx__search_box(t, s, &m, s->box))
            r = msx__err(MSX_E_ARG, "%s: empty mask (no foreground pixel under the %s rule); remove the pair or fix the mask",
                         s->mask, t->opt.mask_rule == MSX_MASK_NONZERO ? "non-zero" : t->opt.mask_rule == MSX_MASK_LABEL ? "label" : "threshold");
    }
    msx_image_free(&img);
    msx_mask_free(&m);
    return r;
}

MSXDEF msx_result msx_task_open(const char *dir, const msx_task_options *opt, msx_task **out) {
    msx_task *t;
    msx_result r = MSX_OK;
    char *sub = NULL;
    const char *base;
    size_t bl;
    int s;
    *out = NULL;
    if (!dir || !*dir) return msx__err(MSX_E_ARG, "msx_task_open: empty folder name");
    if (!msx__search_isdir(dir)) return msx__err(MSX_E_IO, "%s: not a folder (a task is a folder with calib/ and test/, or images/ and masks/)", dir);
    t = (msx_task *)msx__calloc(1, sizeof *t);
    if (!t) return msx__err(MSX_E_NOMEM, "out of memory");
    if (opt) t->opt = *opt;
    if (t->opt.calib_fraction <= 0) t->opt.calib_fraction = 0.2;
    t->dir = msx__strdup(dir);
    bl = strlen(dir);
    while (bl > 1 && dir[bl - 1] == '/') bl--;
    base = dir + bl;
    while (base > dir && base[-1] != '/') base--;
    t->name = (char *)MSX_MALLOC((size_t)(dir + bl - base) + 1);
    if (!t->dir || !t->name) { msx_task_free(t); return msx__err(MSX_E_NOMEM, "out of memory"); }
    memcpy(t->name, base, (size_t)(dir + bl - base));
    t->name[dir + bl - base] = 0;
    sub = msx__search_join(dir, "calib");
    if (!sub) { msx_task_free(t); return msx__err(MSX_E_NOMEM, "out of memory"); }
    if (t->opt.split == MSX_SPLIT_AUTO && msx__search_isdir(sub)) {
        char *ts = msx__search_join(dir, "test");
        if (!ts) r = msx__err(MSX_E_NOMEM, "out of memory");
        else if (!msx__search_isdir(ts)) r = msx__err(MSX_E_IO, "%s: has calib/ but no test/ folder", dir);
        if (r == MSX_OK) r = msx__search_pair(sub, &t->img[0], &t->n[0]);
        if (r == MSX_OK) r = msx__search_pair(ts, &t->img[1], &t->n[1]);
        MSX_FREE(ts);
    } else {
        msx__simg *all = NULL;
        int n = 0, nc, i;
        r = msx__search_pair(dir, &all, &n);
        if (r == MSX_OK) {
            if (t->opt.split == MSX_SPLIT_RANDOM) {
                msx_rng g;
                msx_rng_seed(&g, t->opt.split_seed);
                for (i = n - 1; i > 0; i--) { /* Fisher-Yates */
                    int j = (int)msx_rng_below(&g, (uint64_t)i + 1);
                    msx__simg tmp = all[i];
                    all[i] = all[j];
                    all[j] = tmp;
                }
                nc = (int)floor(t->opt.calib_fraction * n + 0.5);
            } else {
                nc = (int)(t->opt.calib_fraction * n); /* ref §5.1: int(0.2 N) */
            }
            if (nc < 1 || nc >= n) {
                for (i = 0; i < n; i++) { MSX_FREE(all[i].image); MSX_FREE(all[i].mask); MSX_FREE(all[i].stem); }
                MSX_FREE(all);
                r = msx__err(MSX_E_ARG, "%s: %d image(s) give an empty calib or test split at fraction %g; add images or change the fraction",
                             dir, n, t->opt.calib_fraction);
            } else {
                t->img[0] = all;
                t->n[0] = nc;
                t->img[1] = (msx__simg *)msx__calloc((size_t)(n - nc), sizeof(msx__simg));
                if (!t->img[1]) r = msx__err(MSX_E_NOMEM, "out of memory");
                else {
                    memcpy(t->img[1], all + nc, (size_t)(n - nc) * sizeof(msx__simg));
                    t->n[1] = n - nc;
                }
            }
        }
    }
    MSX_FREE(sub);
    if (r == MSX_OK && t->opt.max_images > 0)
        for (s = 0; s < 2; s++)
            if (t->n[s] > t->opt.max_images) {
                int i;
                for (i = t->opt.max_images; i < t->n[s]; i++) {
                    MSX_FREE(t->img[s][i].image); MSX_FREE(t->img[s][i].mask); MSX_FREE(t->img[s][i].stem);
                }
                t->n[s] = t->opt.max_images;
            }
    for (s = 0; r == MSX_OK && s < 2; s++) r = msx__search_validate(t, s);
    if (r != MSX_OK) { msx_task_free(t); return r; }
    *out = t;
    return MSX_OK;
}

MSXDEF const char *msx_task_name(const msx_task *t) { return t->name; }
MSXDEF int msx_task_count(const msx_task *t, int split) { return (split == 0 || split == 1) ? t->n[split] : 0; }
MSXDEF const char *msx_task_image(const msx_task *t, int split, int i) {
    return (split == 0 || split == 1) && i >= 0 && i < t->n[split] ? t->img[split][i].image : NULL;
}
MSXDEF void msx_task_box(const msx_task *t, int split, int i, float box[4]) {
    memcpy(box, t->img[split][i].box, sizeof(float) * 4);
}

/* ---- hashing (fingerprints of models, tasks and the search space) ---------- */

static uint64_t msx__search_hash(uint64_t h, const void *data, size_t n) {
    /* FNV-1a over 8-byte words (bytes for the tail): not cryptographic, only
       to tell "same setup" from "different setup" on --resume. */
    const unsigned char *p = (const unsigned char *)data;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h = (h ^ w) * 1099511628211ULL;
        h ^= h >> 29;
    }
    for (; i < n; i++) h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}
static uint64_t msx__search_hash_str(uint64_t h, const char *s) { return msx__search_hash(h, s, strlen(s) + 1); }

static uint64_t msx__search_ckpt_digest(const msx_checkpoint *c) {
    uint64_t h = 1469598103934665603ULL;
    int i;
    for (i = 0; i < c->n; i++) {
        const msx_tensor *t = &c->tensors[i];
        h = msx__search_hash_str(h, t->name);
        h = msx__search_hash(h, t->shape, sizeof(int64_t) * (size_t)t->ndim);
        h = msx__search_hash(h, t->data, (size_t)t->numel * msx_dtype_size(t->dtype));
    }
    return h;
}

static uint64_t msx__search_task_digest(const msx_task *t, int split) {
    uint64_t h = 1469598103934665603ULL;
    int i;
    h = msx__search_hash(h, &t->opt.mask_rule, sizeof t->opt.mask_rule);
    h = msx__search_hash(h, &t->opt.mask_value, sizeof t->opt.mask_value);
    for (i = 0; i < t->n[split]; i++) {
        const msx__simg *s = &t->img[split][i];
        struct stat st;
        int64_t sz[2] = {0, 0};
        if (stat(s->image, &st) == 0) sz[0] = (int64_t)st.st_size;
        if (stat(s->mask, &st) == 0) sz[1] = (int64_t)st.st_size;
        h = msx__search_hash_str(h, s->stem);
        h = msx__search_hash(h, s->box, sizeof s->box);
        h = msx__search_hash(h, sz, sizeof sz);
    }
    return h;
}

/* ---- small helpers --------------------------------------------------------- */

/* File name without folder and extension ("models/spec_ct.pth" -> "spec_ct"). */
static char *msx__search_stem(const char *path) {
    const char *b = strrchr(path, '/');
    size_t n;
    char *s;
    b = b ? b + 1 : path;
    n = msx__search_stemlen(b);
    s = (char *)MSX_MALLOC(n + 1);
    if (!s) return NULL;
    memcpy(s, b, n);
    s[n] = 0;
    return s;
}

static msx_result msx__search_mkdir(const char *path) {
    if (mkdir(path, 0755) == 0 || errno == EEXIST) {
        if (msx__search_isdir(path)) return MSX_OK;
        return msx__err(MSX_E_IO, "%s: exists and is not a folder", path);
    }
    return msx__err(MSX_E_IO, "%s: cannot create folder (%s)", path, strerror(errno));
}

static msx_result msx__search_write_sb(const char *path, msx__sb *b) {
    if (b->oom) return msx__err(MSX_E_NOMEM, "%s: out of memory while formatting", path);
    return msx_write_file_atomic(path, b->s ? b->s : "", b->n);
}

/* ---- JSONL trial log --------------------------------------------------------- */
/* First line: {"format":"medsamix-trials-v1", "fingerprint":..., setup}.
   Then one line per finished trial, written with one write() and fsync'd, so
   a crash leaves at most a torn last line (dropped on --resume). */

static msx_result msx__search_log_append(int fd, const char *path, const msx__sb *line) {
    const char *p = line->s;
    size_t left = line->n;
    if (line->oom) return msx__err(MSX_E_NOMEM, "%s: out of memory while formatting a log line", path);
    while (left) {
        ssize_t w = write(fd, p, left);
        if (w < 0) {
            if (errno == EINTR) continue;
            return msx__err(MSX_E_IO, "%s: write failed (%s)", path, strerror(errno));
        }
        p += w;
        left -= (size_t)w;
    }
    if (fsync(fd) != 0) return msx__err(MSX_E_IO, "%s: fsync failed (%s)", path, strerror(errno));
    return MSX_OK;
}

typedef struct msx__search_loglines {
    msx__json **v;  /* parsed lines; v[0] = header */
    int n;
    size_t good_len; /* bytes up to the end of the last complete, parseable line */
    int dropped;     /* torn/unparseable trailing lines */
} msx__search_loglines;

static void msx__search_loglines_free(msx__search_loglines *l) {
    int i;
    for (i = 0; i < l->n; i++) msx__json_free(l->v[i]);
    MSX_FREE(l->v);
    memset(l, 0, sizeof *l);
}

static msx_result msx__search_log_read(const char *path, msx__search_loglines *out) {
    void *data;
    size_t len, pos = 0;
    int cap = 0, lineno = 0;
    msx_result r = msx_read_file(path, 0, &data, &len);
    memset(out, 0, sizeof *out);
    if (r != MSX_OK) return r;
    while (pos < len) {
        const char *s = (const char *)data + pos;
        const char *nl = (const char *)memchr(s, '\n', len - pos);
        size_t n;
        msx__json *j;
        char what[64];
        lineno++;
        if (!nl) { out->dropped++; break; } /* torn last line */
        n = (size_t)(nl - s);
        snprintf(what, sizeof what, "trials.jsonl line %d", lineno);
        j = msx__json_parse(s, n, what);
        if (!j || j->type != MSX__JOBJ) {
            msx__json_free(j);
            /* only the last line may be damaged (a crash mid-write) */
            if ((size_t)(nl - (const char *)data) + 1 < len) {
                r = msx__err(MSX_E_FORMAT, "%s: line %d is not a JSON object but later lines follow; the log is corrupt", path, lineno);
                break;
            }
            out->dropped++;
            break;
        }
        if (out->n == cap) {
            msx__json **nv;
            cap = cap ? cap * 2 : 256;
            nv = (msx__json **)MSX_REALLOC(out->v, (size_t)cap * sizeof *nv);
            if (!nv) { msx__json_free(j); r = msx__err(MSX_E_NOMEM, "out of memory"); break; }
            out->v = nv;
        }
        out->v[out->n++] = j;
        pos += n + 1;
        out->good_len = pos;
    }
    msx_free(data);
    if (r == MSX_OK && out->n == 0) r = msx__err(MSX_E_FORMAT, "%s: empty log (no header line); start without --resume", path);
    if (r != MSX_OK) msx__search_loglines_free(out);
    return r;
}

/* ---- progress ------------------------------------------------------------------ */

typedef struct msx__search_progress {
    int mode;      /* 0 live line, 1 plain lines, -1 quiet */
    double t0;
    int done0;     /* trials already in the log when this process started */
    int live_open;
} msx__search_progress;

static void msx__search_progress_init(msx__search_progress *p, int opt_mode, int done0) {
    p->mode = opt_mode < 0 ? -1 : opt_mode == 1 ? 1 : (isatty(fileno(stdout)) ? 0 : 1);
    p->t0 = msx_time_now();
    p->done0 = done0;
    p->live_open = 0;
}

static void msx__search_fmt_dur(char *buf, size_t cap, double s) {
    long t = (long)(s + 0.5);
    if (s < 0 || s > 1e8) snprintf(buf, cap, "--:--");
    else if (t >= 3600) snprintf(buf, cap, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    else snprintf(buf, cap, "%ld:%02ld", t / 60, t % 60);
}

static void msx__search_progress_show(msx__search_progress *p, int done, int total, int id, double best, double last, const char *origin) {
    double el = msx_time_now() - p->t0;
    int here = done - p->done0;
    double rate = here > 0 && el > 0 ? here / el * 60.0 : 0.0;
    char eta[32], elb[32];
    if (p->mode < 0) return;
    msx__search_fmt_dur(eta, sizeof eta, rate > 0 ? (total - done) / rate * 60.0 : -1);
    msx__search_fmt_dur(elb, sizeof elb, el);
    if (p->mode == 0) {
        printf("\r\033[Ktrial %d/%d  best Dice %.4f  %.1f trials/min  elapsed %s  ETA %s", done, total, best, rate, elb, eta);
        p->live_open = 1;
    } else {
        printf("trial %d/%d  #%-4d %-18s Dice %.4f  best %.4f  %.1f trials/min  ETA %s\n", done, total, id, origin, last, best, rate, eta);
    }
    fflush(stdout);
}

static void msx__search_progress_end(msx__search_progress *p) {
    if (p->mode == 0 && p->live_open) { printf("\n"); fflush(stdout); }
    p->live_open = 0;
}

/* ---- reports ---------------------------------------------------------------- */
/* Labels: the input stems, the four uniform merges, "medsamix". dice is
   [label][split][task]; NaN = not evaluated. */
typedef struct msx__search_table {
    int n_labels, n_inputs, n_tasks;
    char **labels;
    char **tasks;
    double *dice;
} msx__search_table;

static const char *const msx__search_uniform_names[4] = {"linear", "task_arithmetic", "ties", "slerp"};

static double *msx__search_cell(const msx__search_table *t, int label, int split, int task) {
    return &t->dice[((size_t)label * 2 + (size_t)split) * (size_t)t->n_tasks + (size_t)task];
}

static void msx__search_report_json(const msx__search_table *t, msx__sb *b) {
    int k, s, l;
    msx__sb_puts(b, "{\"format\": \"medsamix-report-v1\", \"tasks\": {");
    for (k = 0; k < t->n_tasks; k++) {
        msx__sb_puts(b, k ? ", " : "");
        msx__sb_json_str(b, t->tasks[k]);
        msx__sb_puts(b, ": {");
        for (s = 0; s < 2; s++) {
            int first = 1;
            msx__sb_puts(b, s ? ", \"test\": {" : "\"calib\": {");
            for (l = 0; l < t->n_labels; l++) {
                double v = *msx__search_cell(t, l, s, k);
                if (!isfinite(v)) continue;
                msx__sb_puts(b, first ? "" : ", ");
                first = 0;
                msx__sb_json_str(b, t->labels[l]);
                msx__sb_puts(b, ": ");
                msx__sb_json_num(b, v);
            }
            msx__sb_puts(b, "}");
        }
        msx__sb_puts(b, "}");
    }
    msx__sb_puts(b, "}, \"inputs\": [");
    for (l = 0; l < t->n_inputs; l++) {
        msx__sb_puts(b, l ? ", " : "");
        msx__sb_json_str(b, t->labels[l]);
    }
    msx__sb_puts(b, "], \"uniform\": [\"linear\", \"task_arithmetic\", \"ties\", \"slerp\"], \"result\": \"medsamix\"}\n");
}

static void msx__search_report_md_table(const msx__search_table *t, int split, msx__sb *b) {
    int k, l;
    double best[MSX_SEARCH_MAX_TASKS + 1];
    msx__sb_printf(b, "\n### Dice (%%) on `%s`\n\n| model |", split ? "test" : "calib");
    for (k = 0; k < t->n_tasks; k++) msx__sb_printf(b, " %s |", t->tasks[k]);
    msx__sb_puts(b, " mean |\n|---|");
    for (k = 0; k <= t->n_tasks; k++) msx__sb_puts(b, "---:|");
    msx__sb_puts(b, "\n");
    for (k = 0; k <= t->n_tasks; k++) best[k] = -1;
    for (l = 0; l < t->n_labels; l++) {
        double m = 0;
        int ok = 1;
        for (k = 0; k < t->n_tasks; k++) {
            double v = *msx__search_cell(t, l, split, k);
            if (!isfinite(v)) ok = 0;
            else if (v > best[k]) best[k] = v;
            m += v;
        }
        if (ok && m / t->n_tasks > best[t->n_tasks]) best[t->n_tasks] = m / t->n_tasks;
    }
    for (l = 0; l < t->n_labels; l++) {
        double m = 0;
        int ok = 1;
        msx__sb_printf(b, "| %s |", t->labels[l]);
        for (k = 0; k <= t->n_tasks; k++) {
            double v;
            if (k < t->n_tasks) {
                v = *msx__search_cell(t, l, split, k);
                if (!isfinite(v)) ok = 0;
                m += v;
            } else v = ok ? m / t->n_tasks : NAN;
            if (!isfinite(v)) msx__sb_puts(b, " – |");
            /* bold the column maximum at the printed precision */
            else if (floor(v * 1000 + 0.5) == floor(best[k] * 1000 + 0.5)) msx__sb_printf(b, " **%.1f** |", 100 * v);
            else msx__sb_printf(b, " %.1f |", 100 * v);
        }
        msx__sb_puts(b, "\n");
    }
}

/* ---- evaluation: cached items, workers ---------------------------------------- */

#ifndef MSX_SEARCH_CACHE_BYTES
#define MSX_SEARCH_CACHE_BYTES ((size_t)4 << 30) /* preprocessed inputs kept in RAM up to this */
#endif

/* One labelled image. The preprocessed input is identical for every trial, so
   it is computed once (cached) when the set fits MSX_SEARCH_CACHE_BYTES;
   otherwise the decoded image is kept and preprocessed per evaluation. */
typedef struct msx__sitem {
    msx_sam_input in;
    msx_image img;
    msx_mask gt;
    float box[4];
    int cached;
} msx__sitem;

typedef struct msx__sset {
    msx__sitem *it;
    int n, n_groups;
    int *off; /* n_groups + 1 offsets: images of group g are it[off[g] .. off[g+1]) */
} msx__sset;

static void msx__sset_free(msx__sset *s) {
    int i;
    for (i = 0; i < s->n; i++) {
        msx_sam_input_free(&s->it[i].in);
        msx_image_free(&s->it[i].img);
        msx_mask_free(&s->it[i].gt);
    }
    MSX_FREE(s->it);
    MSX_FREE(s->off);
    memset(s, 0, sizeof *s);
}

/* Builds a set of (task, split) groups: group g = tasks[g / n_splits], split
   splits[g % n_splits]. */
static msx_result msx__sset_build(msx__sset *s, msx_task *const *tasks, int n_tasks, const int *splits, int n_splits,
                                  const msx_sam_arch *arch, msx_preprocess_mode mode) {
    int g, i, k = 0, ng = n_tasks * n_splits;
    double bytes;
    int cache;
    msx_result r = MSX_OK;
    memset(s, 0, sizeof *s);
    s->n_groups = ng;
    s->off = (int *)msx__calloc((size_t)ng + 1, sizeof(int));
    if (!s->off) return msx__err(MSX_E_NOMEM, "out of memory");
    for (g = 0; g < ng; g++) s->off[g + 1] = s->off[g] + tasks[g / n_splits]->n[splits[g % n_splits]];
    s->n = s->off[ng];
    bytes = (double)s->n * 3.0 * arch->img_size * arch->img_size * sizeof(float);
    cache = bytes <= (double)MSX_SEARCH_CACHE_BYTES;
    s->it = (msx__sitem *)msx__calloc((size_t)(s->n ? s->n : 1), sizeof(msx__sitem));
    if (!s->it) { s->n = 0; return msx__err(MSX_E_NOMEM, "out of memory"); }
    for (g = 0; g < ng && r == MSX_OK; g++) {
        const msx_task *t = tasks[g / n_splits];
        int sp = splits[g % n_splits];
        for (i = 0; i < t->n[sp] && r == MSX_OK; i++, k++) {
            msx__sitem *it = &s->it[k];
            const msx__simg *si = &t->img[sp][i];
            memcpy(it->box, si->box, sizeof it->box);
            if ((r = msx_image_load(si->image, &it->img)) != MSX_OK) break;
            if ((r = msx__search_load_mask(t, si, &it->gt)) != MSX_OK) break;
            if (cache) {
                if ((r = msx_sam_preprocess(&it->img, arch->img_size, arch->pixel_mean, arch->pixel_std, mode, &it->in)) != MSX_OK) break;
                msx_image_free(&it->img);
                it->cached = 1;
            }
        }
    }
    if (r != MSX_OK) msx__sset_free(s);
    return r;
}

/* Per-worker state: its own model (merged weights when it merges), SAM,
   workspace, segmentation context and merger. */
typedef struct msx__swork {
    msx_checkpoint *ck;       /* owned merged copy, or borrowed (ck_owned = 0) */
    int ck_owned;
    msx_sam *sam;
    msx_sam_ws *ws;
    msx_seg_ctx *ctx;
    msx_merger *mg;
    msx_plan *plan;
    msx_mask pred;
} msx__swork;

static void msx__swork_free(msx__swork *w) {
    msx_mask_free(&w->pred);
    msx_plan_free(w->plan);
    msx_merger_free(w->mg);
    msx_seg_ctx_free(w->ctx);
    msx_sam_ws_free(w->ws);
    msx_sam_free(w->sam);
    if (w->ck_owned) msx_ckpt_free(w->ck);
    memset(w, 0, sizeof *w);
}

/* base/ft/n_ft: a merging worker (own copy of the base); otherwise ck is
   borrowed as is. */
static msx_result msx__swork_init(msx__swork *w, const msx_checkpoint *ck, const msx_checkpoint *const *ft, int n_ft,
                                  int granularity, const msx_sam_arch *arch, int n_threads) {
    msx_sam_options so;
    msx_result r;
    memset(w, 0, sizeof *w);
    memset(&so, 0, sizeof so);
    so.n_threads = n_threads;
    if (n_ft > 0) {
        msx_merge_options mo;
        if ((r = msx_ckpt_clone(ck, &w->ck)) != MSX_OK) return r;
        w->ck_owned = 1;
        if ((r = msx_merger_create(ck, ft, n_ft, granularity, &w->mg)) != MSX_OK) goto fail;
        memset(&mo, 0, sizeof mo);
        mo.n_threads = n_threads;
        msx_merger_set_options(w->mg, &mo);
        if ((r = msx_merger_plan_create(w->mg, &w->plan)) != MSX_OK) goto fail;
    } else {
        w->ck = (msx_checkpoint *)ck;
    }
    if ((r = msx_sam_create(w->ck, arch, &so, &w->sam)) != MSX_OK) goto fail;
    if ((r = msx_sam_ws_create(w->sam, &w->ws)) != MSX_OK) goto fail;
    if ((r = msx_seg_ctx_create(&w->ctx)) != MSX_OK) goto fail;
    return MSX_OK;
fail:
    msx__swork_free(w);
    return r;
}

static msx_result msx__swork_eval_item(msx__swork *w, const msx__sitem *it, const msx_seg_options *so, double *dice) {
    msx_result r = it->cached ? msx_segment_input(w->ctx, w->sam, w->ws, &it->in, it->box, so, &w->pred)
                              : msx_segment_box_ctx(w->ctx, w->sam, w->ws, &it->img, it->box, so, &w->pred);
    if (r != MSX_OK) return r;
    return msx_dice(&w->pred, &it->gt, dice);
}

/* Mean Dice of each group of a set, images spread over the workers (which
   must all hold the same weights). Image-pooled mean in image order, so the
   result does not depend on the number of workers. */
static msx_result msx__sset_eval(const msx__sset *s, msx__swork *w, int n_work, const msx_seg_options *so,
                                 const volatile sig_atomic_t *cancel, double *mean) {
    double *d = (double *)MSX_MALLOC(sizeof(double) * (size_t)(s->n ? s->n : 1));
    msx_result first = MSX_OK;
    char msg[1024];
    int i, g;
    if (!d) return msx__err(MSX_E_NOMEM, "out of memory");
    msg[0] = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_work) schedule(dynamic, 1) if (n_work > 1)
#endif
    for (i = 0; i < s->n; i++) {
        int tid = 0;
        msx_result r;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        if (first != MSX_OK || (cancel && *cancel)) continue;
        r = msx__swork_eval_item(&w[tid], &s->it[i], so, &d[i]);
        if (r != MSX_OK) {
#ifdef _OPENMP
#pragma omp critical(msx__search_err)
#endif
            if (first == MSX_OK) { first = r; snprintf(msg, sizeof msg, "%s", msx_last_error()); }
        }
    }
    (void)n_work;
    if (first == MSX_OK && cancel && *cancel) { MSX_FREE(d); return msx__err(MSX_E_CANCELLED, "stopped on request"); }
    if (first != MSX_OK) { MSX_FREE(d); return msx__err(first, "%s", msg); }
    for (g = 0; g < s->n_groups; g++) {
        double sum = 0;
        for (i = s->off[g]; i < s->off[g + 1]; i++) sum += d[i];
        mean[g] = s->off[g + 1] > s->off[g] ? sum / (s->off[g + 1] - s->off[g]) : NAN;
    }
    MSX_FREE(d);
    return MSX_OK;
}

static int msx__search_default_threads(int threads) {
    if (threads > 0) return threads;
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

MSXDEF msx_result msx_eval_checkpoint(const msx_checkpoint *ck, const msx_sam_arch *arch, msx_task *const *tasks,
                                      int n_tasks, int split, msx_preprocess_mode preprocess, int n_threads,
                                      double *dice) {
    msx__sset set;
    msx__swork w[64];
    msx_seg_options so;
    int nw, i, sp = split;
    msx_result r;
    if (!ck || !arch || !tasks || n_tasks < 1 || !dice || (split != 0 && split != 1))
        return msx__err(MSX_E_ARG, "msx_eval_checkpoint: bad arguments (need a model, an arch, >= 1 task, split 0/1)");
    /* images in parallel, one worker of one thread each: the encoder of a
       small model scales better across images than across threads */
    nw = msx__search_default_threads(n_threads);
    if (nw > 64) nw = 64;
    memset(&so, 0, sizeof so);
    so.preprocess = preprocess;
    if ((r = msx__sset_build(&set, tasks, n_tasks, &sp, 1, arch, preprocess)) != MSX_OK) return r;
    if (nw > set.n) nw = set.n > 0 ? set.n : 1;
    memset(w, 0, sizeof w);
    for (i = 0; i < nw && r == MSX_OK; i++) r = msx__swork_init(&w[i], ck, NULL, 0, 0, arch, 1);
    if (r == MSX_OK) r = msx__sset_eval(&set, w, nw, &so, NULL, dice);
    for (i = 0; i < nw; i++) msx__swork_free(&w[i]);
    msx__sset_free(&set);
    return r;
}

/* ---- search space (ref §2.3) ------------------------------------------------- */
/* Per searched group: the method selector and the conditional parameters of
   each method, named as in the reference (models by file stem). The groups
   that cannot change a box-only, single-mask Dice (ref §2.2 "dead
   dimensions": prompt_encoder_group_1 not_a_point_embed, _2 mask_downscaling,
   mask_decoder_group_5 IoU head) are not searched unless no_prune; they stay
   at the base (linear one-hot on model 0). */

typedef struct msx__sgroup {
    int sel;                    /* space index of the selector, -1 = pruned (fixed at base) */
    int lin[MSX_MAX_MODELS];
    int ta, ties_r, ties_s;
    int slerp[MSX_MAX_MODELS];
} msx__sgroup;

static int msx__search_is_dead_group(const char *id) {
    return !strcmp(id, "prompt_encoder_group_1") || !strcmp(id, "prompt_encoder_group_2") ||
           !strcmp(id, "mask_decoder_group_5");
}

static msx_result msx__search_space(const msx_plan *tmpl, char *const *stems, int n_models, int prune,
                                    msx_space **out, msx__sgroup **groups_out) {
    static const char *const methods[4] = {"linear", "task_arithmetic", "ties", "slerp"};
    msx_space *s = msx_space_new();
    msx__sgroup *gs = (msx__sgroup *)msx__calloc((size_t)tmpl->n_groups, sizeof *gs);
    char name[256];
    int g, m, bad = 0;
    if (!s || !gs) { msx_space_free(s); MSX_FREE(gs); return msx__err(MSX_E_NOMEM, "out of memory"); }
    for (g = 0; g < tmpl->n_groups && !bad; g++) {
        const char *id = tmpl->ids[g];
        msx__sgroup *q = &gs[g];
        if (prune && msx__search_is_dead_group(id)) { q->sel = -1; continue; }
        if (!strncmp(id, "layer_", 6)) snprintf(name, sizeof name, "layer_selection_method_%s", id + 6);
        else snprintf(name, sizeof name, "%s_method", id);
        if ((q->sel = msx_space_add_cat(s, name, 4, methods)) < 0) { bad = 1; break; }
        for (m = 0; m < n_models && !bad; m++) {
            snprintf(name, sizeof name, "model_%s_%s_method_linear_param_weights", stems[m], id);
            if ((q->lin[m] = msx_space_add_float(s, name, 0, 1, 0)) < 0 ||
                msx_space_add_condition(s, q->lin[m], q->sel, MSX_MERGE_LINEAR) != MSX_OK) bad = 1;
        }
        snprintf(name, sizeof name, "%s_method_task_arithmetic_param_scaling_coefficient", id);
        if (!bad && ((q->ta = msx_space_add_float(s, name, 0, 1, 0)) < 0 ||
                     msx_space_add_condition(s, q->ta, q->sel, MSX_MERGE_TASK_ARITHMETIC) != MSX_OK)) bad = 1;
        snprintf(name, sizeof name, "%s_method_ties_param_param_value_mask_rate", id);
        if (!bad && ((q->ties_r = msx_space_add_float(s, name, 0, 0.99, 0)) < 0 ||
                     msx_space_add_condition(s, q->ties_r, q->sel, MSX_MERGE_TIES) != MSX_OK)) bad = 1;
        snprintf(name, sizeof name, "%s_method_ties_param_scaling_coefficient", id);
        if (!bad && ((q->ties_s = msx_space_add_float(s, name, 0, 1, 0)) < 0 ||
                     msx_space_add_condition(s, q->ties_s, q->sel, MSX_MERGE_TIES) != MSX_OK)) bad = 1;
        for (m = 0; m < n_models && !bad; m++) {
            snprintf(name, sizeof name, "model_%s_%s_method_slerp_param_slerp_t", stems[m], id);
            if ((q->slerp[m] = msx_space_add_float(s, name, 0, 1, 0)) < 0 ||
                msx_space_add_condition(s, q->slerp[m], q->sel, MSX_MERGE_SLERP) != MSX_OK) bad = 1;
        }
    }
    if (bad) {
        msx_result r = msx__err(MSX_E_ARG, "building the search space: %s", msx_last_error());
        msx_space_free(s);
        MSX_FREE(gs);
        return r;
    }
    *out = s;
    *groups_out = gs;
    return MSX_OK;
}

/* Configuration (space values, NAN = inactive) -> merge plan (ref §2.4: a
   missing weight reads as 0). */
static void msx__search_cfg_to_plan(const msx__sgroup *gs, int n_models, const double *cfg, msx_plan *p) {
    int g, m;
    for (g = 0; g < p->n_groups; g++) {
        const msx__sgroup *q = &gs[g];
        msx_group_plan *gp = &p->groups[g];
        memset(gp, 0, sizeof *gp);
        if (q->sel < 0 || !isfinite(cfg[q->sel])) {
            gp->method = MSX_MERGE_LINEAR;
            gp->weights[0] = 1;
            continue;
        }
        gp->method = (msx_merge_method)(int)cfg[q->sel];
        switch (gp->method) {
        case MSX_MERGE_LINEAR:
            for (m = 0; m < n_models; m++) gp->weights[m] = isfinite(cfg[q->lin[m]]) ? cfg[q->lin[m]] : 0;
            break;
        case MSX_MERGE_TASK_ARITHMETIC: gp->scale = cfg[q->ta]; break;
        case MSX_MERGE_TIES: gp->drop_rate = cfg[q->ties_r]; gp->scale = cfg[q->ties_s]; break;
        default:
            for (m = 0; m < n_models; m++) gp->t[m] = isfinite(cfg[q->slerp[m]]) ? cfg[q->slerp[m]] : 0;
            break;
        }
    }
}

/* Starting points, as configurations. First the reference's hand-made ones
   (ref §2.5): each model alone (linear one-hot), uniform SLERP (its three
   all-equal-t configs give one model, so only t = 0.5 is kept), TA and TIES
   (r = 0.2) with λ in {0.3, 0.5, 0.6, 0.7, 0.8, 1.0}; then the two uniform
   merges of the report that are not among them (linear with equal weights,
   TIES r = 0.5 λ = 1), so the search starts from every baseline it is
   compared with. */
static const double msx__search_init_lambda[6] = {0.3, 0.5, 0.6, 0.7, 0.8, 1.0};

MSXDEF int msx_search_n_initial(int n_models) { return (n_models + 1) + 1 + 6 + 6 + 2; }

static void msx__search_initial(const msx__sgroup *gs, int n_groups, int n_models, int dim, int i, double *cfg, char *origin,
                                size_t origin_cap, char *const *stems) {
    int g, m, kind, arg;
    double lambda = 0, drop = 0.2;
    for (m = 0; m < dim; m++) cfg[m] = NAN;
    /* kind: 0 one-hot, 1 TA, 2 TIES, 3 SLERP, 4 linear equal */
    if (i < n_models) { kind = 0; arg = i; }
    else if (i == n_models) { kind = 3; arg = 0; }
    else if (i < n_models + 7) { kind = 1; arg = i - n_models - 1; lambda = msx__search_init_lambda[arg]; }
    else if (i < n_models + 13) { kind = 2; arg = i - n_models - 7; lambda = msx__search_init_lambda[arg]; }
    else if (i == n_models + 13) { kind = 4; arg = 0; }
    else { kind = 2; arg = 0; lambda = 1.0; drop = 0.5; }
    for (g = 0; g < n_groups; g++) {
        const msx__sgroup *q = &gs[g];
        if (q->sel < 0) continue;
        if (kind == 0 || kind == 4) {
            cfg[q->sel] = MSX_MERGE_LINEAR;
            for (m = 0; m < n_models; m++) cfg[q->lin[m]] = kind == 4 ? 1.0 : m == arg ? 1.0 : 0.0;
        } else if (kind == 1) {
            cfg[q->sel] = MSX_MERGE_TASK_ARITHMETIC;
            cfg[q->ta] = lambda;
        } else if (kind == 2) {
            cfg[q->sel] = MSX_MERGE_TIES;
            cfg[q->ties_r] = drop;
            cfg[q->ties_s] = lambda;
        } else {
            cfg[q->sel] = MSX_MERGE_SLERP;
            for (m = 0; m < n_models; m++) cfg[q->slerp[m]] = 0.5;
        }
    }
    if (kind == 0) snprintf(origin, origin_cap, "init:%s", stems[arg]);
    else if (kind == 1) snprintf(origin, origin_cap, "init:ta_%g", lambda);
    else if (kind == 2) snprintf(origin, origin_cap, "init:ties_d%g_s%g", drop, lambda);
    else if (kind == 3) snprintf(origin, origin_cap, "init:slerp_0.5");
    else snprintf(origin, origin_cap, "init:linear_equal");
}

/* ---- the search run ------------------------------------------------------------ */

typedef struct msx__strial {
    double *cfg;      /* dim values */
    double dice[MSX_SEARCH_MAX_TASKS];
    double cost[MSX_SEARCH_MAX_TASKS];
    double seconds;
    int failed, batch, batch_size, slot, logged;
    char origin[40];
} msx__strial;

typedef struct msx__srun {
    const msx_search_options *o;
    int n_models;                      /* base + fine-tuned */
    msx_checkpoint *ck[MSX_MAX_MODELS];
    char *stems[MSX_MAX_MODELS];
    uint64_t model_digest[MSX_MAX_MODELS];
    msx_sam_arch arch;
    msx_task *tasks[MSX_SEARCH_MAX_TASKS];
    int n_tasks, n_eval;               /* tasks, tasks evaluated per trial */
    int n_obj;
    int granularity, prune, jobs, tpj, threads, batch, n_trials;
    msx_plan *tmpl;
    msx_space *space;
    msx__sgroup *groups;
    int dim;
    msx_opt *opt;
    double *init_cfg;                  /* n_init x dim */
    char (*init_origin)[40];
    int n_init;
    msx__sset calib;
    msx__swork *w;
    int n_w;
    msx_seg_options so;
    msx__strial *tr;                   /* trials by index */
    int n_tr, cap_tr;
    char *out, *log_path;
    int log_fd;
    uint64_t fingerprint;
    msx__search_progress prog;
    int n_fin;                         /* finished trials (logged), for progress */
    double best_score;
} msx__srun;

static msx__strial *msx__srun_trial(msx__srun *R, int t) {
    if (t >= R->cap_tr) {
        int cap = R->cap_tr ? R->cap_tr : 64;
        msx__strial *nv;
        while (cap <= t) cap *= 2;
        nv = (msx__strial *)MSX_REALLOC(R->tr, (size_t)cap * sizeof *nv);
        if (!nv) return NULL;
        memset(nv + R->cap_tr, 0, (size_t)(cap - R->cap_tr) * sizeof *nv);
        R->tr = nv;
        R->cap_tr = cap;
    }
    if (!R->tr[t].cfg) {
        R->tr[t].cfg = (double *)MSX_MALLOC(sizeof(double) * (size_t)(R->dim ? R->dim : 1));
        if (!R->tr[t].cfg) return NULL;
    }
    if (t >= R->n_tr) R->n_tr = t + 1;
    return &R->tr[t];
}

/* Objective value shown as "best Dice": mean calib Dice over the searched tasks. */
static double msx__srun_score(const msx__srun *R, const msx__strial *T) {
    double s = 0;
    int k;
    if (T->failed) return -1;
    for (k = 0; k < R->n_eval; k++) s += T->dice[k];
    return s / R->n_eval;
}

static void msx__srun_free(msx__srun *R) {
    int i;
    for (i = 0; i < R->n_w; i++) msx__swork_free(&R->w[i]);
    MSX_FREE(R->w);
    msx__sset_free(&R->calib);
    msx_opt_free(R->opt);
    msx_space_free(R->space);
    MSX_FREE(R->groups);
    msx_plan_free(R->tmpl);
    for (i = 0; i < R->n_models; i++) { msx_ckpt_free(R->ck[i]); MSX_FREE(R->stems[i]); }
    for (i = 0; i < R->n_tasks; i++) msx_task_free(R->tasks[i]);
    for (i = 0; i < R->cap_tr; i++) MSX_FREE(R->tr[i].cfg);
    MSX_FREE(R->tr);
    MSX_FREE(R->init_cfg);
    MSX_FREE(R->init_origin);
    MSX_FREE(R->out);
    MSX_FREE(R->log_path);
    if (R->log_fd >= 0) close(R->log_fd);
}

/* Header line of the log: the whole search setup. The fingerprint covers
   everything that changes what a replayed trial means (models' weights,
   task images and boxes, space, objectives, seed, preprocessing). */
static void msx__srun_header(msx__srun *R, msx__sb *b) {
    int i;
    uint64_t h = 1469598103934665603ULL, sd = 1469598103934665603ULL;
    char hex[24];
    for (i = 0; i < R->dim; i++) {
        msx_param_type ty = msx_space_type(R->space, i);
        sd = msx__search_hash_str(sd, msx_space_name(R->space, i));
        sd = msx__search_hash(sd, &ty, sizeof ty);
    }
    for (i = 0; i < R->n_models; i++) h = msx__search_hash(h, &R->model_digest[i], 8);
    for (i = 0; i < R->n_eval; i++) {
        uint64_t td = msx__search_task_digest(R->tasks[i], 0);
        h = msx__search_hash(h, &td, 8);
    }
    h = msx__search_hash(h, &sd, 8);
    h = msx__search_hash(h, &R->n_obj, sizeof R->n_obj);
    h = msx__search_hash(h, &R->o->seed, sizeof R->o->seed);
    h = msx__search_hash(h, &R->so.preprocess, sizeof R->so.preprocess);
    if (R->o->mo_mean) h = msx__search_hash(h, "mean", 4); /* keeps ParEGO fingerprints unchanged */
    R->fingerprint = h;
    snprintf(hex, sizeof hex, "%016llx", (unsigned long long)h);
    msx__sb_puts(b, "{\"format\": \"medsamix-trials-v1\", \"fingerprint\": ");
    msx__sb_json_str(b, hex);
    msx__sb_puts(b, ", \"models\": [");
    for (i = 0; i < R->n_models; i++) {
        snprintf(hex, sizeof hex, "%016llx", (unsigned long long)R->model_digest[i]);
        msx__sb_printf(b, "%s{\"stem\": ", i ? ", " : "");
        msx__sb_json_str(b, R->stems[i]);
        msx__sb_puts(b, ", \"digest\": ");
        msx__sb_json_str(b, hex);
        msx__sb_puts(b, "}");
    }
    msx__sb_puts(b, "], \"tasks\": [");
    for (i = 0; i < R->n_eval; i++) {
        snprintf(hex, sizeof hex, "%016llx", (unsigned long long)msx__search_task_digest(R->tasks[i], 0));
        msx__sb_printf(b, "%s{\"name\": ", i ? ", " : "");
        msx__sb_json_str(b, R->tasks[i]->name);
        msx__sb_printf(b, ", \"calib_images\": %d, \"digest\": ", R->tasks[i]->n[0]);
        msx__sb_json_str(b, hex);
        msx__sb_puts(b, "}");
    }
    snprintf(hex, sizeof hex, "%016llx", (unsigned long long)sd);
    msx__sb_printf(b, "], \"multi\": %s, \"granularity\": %d, \"prune\": %s, \"seed\": %llu, \"batch\": %d, "
                      "\"hyperparameters\": %d, \"space_digest\": \"%s\", \"preprocess\": \"%s\", \"version\": \"%s\"}\n",
                   R->o->multi ? "true" : "false", R->granularity, R->prune ? "true" : "false",
                   (unsigned long long)R->o->seed, R->batch, R->dim, hex,
                   R->so.preprocess == MSX_PREPROCESS_MEDSAM ? "medsam" : "sam", MSX_VERSION_STRING);
}

/* Explains how a log header differs from this run (the first difference). */
static msx_result msx__srun_check_header(msx__srun *R, const msx__json *h) {
    const char *fmt = msx__json_str(h, "format"), *fp = msx__json_str(h, "fingerprint");
    const msx__json *mv = msx__json_get(h, "models"), *tv = msx__json_get(h, "tasks");
    char hex[24];
    double v;
    int i;
    const char *p = R->log_path;
    if (!fmt || strcmp(fmt, "medsamix-trials-v1"))
        return msx__err(MSX_E_FORMAT, "%s: first line is not a medsamix-trials-v1 header", p);
    if (!mv || mv->type != MSX__JARR || mv->n != R->n_models)
        return msx__err(MSX_E_STATE, "%s: the log was written for %d model(s), this run has %d; use another --out", p,
                        mv && mv->type == MSX__JARR ? mv->n : -1, R->n_models);
    for (i = 0; i < R->n_models; i++) {
        const char *st = msx__json_str(&mv->kids[i], "stem"), *dg = msx__json_str(&mv->kids[i], "digest");
        snprintf(hex, sizeof hex, "%016llx", (unsigned long long)R->model_digest[i]);
        if (!st || strcmp(st, R->stems[i]) || !dg || strcmp(dg, hex))
            return msx__err(MSX_E_STATE, "%s: model %d differs from the logged run (logged %s digest %s, now %s digest %s); use another --out",
                            p, i, st ? st : "?", dg ? dg : "?", R->stems[i], hex);
    }
    if (!tv || tv->type != MSX__JARR || tv->n != R->n_eval)
        return msx__err(MSX_E_STATE, "%s: the log was written for %d searched task(s), this run has %d; use another --out", p,
                        tv && tv->type == MSX__JARR ? tv->n : -1, R->n_eval);
    for (i = 0; i < R->n_eval; i++) {
        const char *nm = msx__json_str(&tv->kids[i], "name"), *dg = msx__json_str(&tv->kids[i], "digest");
        snprintf(hex, sizeof hex, "%016llx", (unsigned long long)msx__search_task_digest(R->tasks[i], 0));
        if (!nm || strcmp(nm, R->tasks[i]->name) || !dg || strcmp(dg, hex))
            return msx__err(MSX_E_STATE, "%s: task %d differs from the logged run (logged %s, now %s, or its calib images/masks changed); use another --out",
                            p, i, nm ? nm : "?", R->tasks[i]->name);
    }
    if (!msx__json_num(h, "granularity", &v, -1) || (int)v != R->granularity)
        return msx__err(MSX_E_STATE, "%s: different search space: the log used granularity %g, this run %d", p, v, R->granularity);
    if (!msx__json_num(h, "hyperparameters", &v, -1) || (int)v != R->dim)
        return msx__err(MSX_E_STATE, "%s: different search space: the log has %g hyperparameters, this run %d (--no-prune?)", p, v, R->dim);
    if (!msx__json_num(h, "multi", &v, -1) || (int)v != (R->o->multi != 0))
        return msx__err(MSX_E_STATE, "%s: the log is a %s search, this run is %s", p, v ? "multi-task" : "single-task",
                        R->o->multi ? "multi-task" : "single-task");
    if (!msx__json_num(h, "seed", &v, -1) || (uint64_t)v != R->o->seed)
        return msx__err(MSX_E_STATE, "%s: the log used --seed %.0f, this run %llu", p, v, (unsigned long long)R->o->seed);
    snprintf(hex, sizeof hex, "%016llx", (unsigned long long)R->fingerprint);
    if (!fp || strcmp(fp, hex))
        return msx__err(MSX_E_STATE, "%s: search setup fingerprint %s differs from this run's %s (different search space or preprocessing); use another --out",
                        p, fp ? fp : "?", hex);
    if (msx__json_num(h, "batch", &v, 0) && v >= 1) { /* keep the logged schedule */
        if (v > 256) return msx__err(MSX_E_FORMAT, "%s: batch %g in the header exceeds 256; the log was edited?", p, v);
        R->batch = (int)v;
    }
    return MSX_OK;
}

static void msx__srun_trial_json(const msx__srun *R, int t, msx__sb *b) {
    const msx__strial *T = &R->tr[t];
    int i, first = 1;
    msx__sb_printf(b, "{\"trial\": %d, \"batch\": %d, \"batch_size\": %d, \"slot\": %d, \"origin\": ", t, T->batch,
                   T->batch_size, T->slot);
    msx__sb_json_str(b, T->origin);
    msx__sb_puts(b, ", \"config\": {");
    for (i = 0; i < R->dim; i++) {
        if (!isfinite(T->cfg[i])) continue;
        msx__sb_puts(b, first ? "" : ", ");
        first = 0;
        msx__sb_json_str(b, msx_space_name(R->space, i));
        msx__sb_puts(b, ": ");
        if (msx_space_type(R->space, i) == MSX_PARAM_CAT) msx__sb_json_str(b, msx_space_choice(R->space, i, (int)T->cfg[i]));
        else msx__sb_json_num(b, T->cfg[i]);
    }
    msx__sb_puts(b, "}, \"dice\": {");
    for (i = 0; i < R->n_eval; i++) {
        msx__sb_puts(b, i ? ", " : "");
        msx__sb_json_str(b, R->tasks[i]->name);
        msx__sb_puts(b, ": ");
        if (T->failed) msx__sb_puts(b, "null");
        else msx__sb_json_num(b, T->dice[i]);
    }
    msx__sb_puts(b, "}, \"cost\": [");
    for (i = 0; i < R->n_obj; i++) {
        msx__sb_puts(b, i ? ", " : "");
        if (T->failed) msx__sb_puts(b, "null");
        else msx__sb_json_num(b, T->cost[i]);
    }
    msx__sb_printf(b, "], \"seconds\": %.3f, \"status\": \"%s\"}\n", T->seconds, T->failed ? "failed" : "ok");
}

/* Parses a logged trial line into slot t. */
static msx_result msx__srun_trial_parse(msx__srun *R, const msx__json *j, int line) {
    double v, tb, bs, sl;
    const msx__json *cfg = msx__json_get(j, "config"), *cost = msx__json_get(j, "cost");
    const char *st = msx__json_str(j, "status"), *org = msx__json_str(j, "origin");
    msx__strial *T;
    int t, i;
    if (!msx__json_num(j, "trial", &v, -1) || v < 0 || v > 1e7 || !msx__json_num(j, "batch", &tb, -1) || tb < 0 ||
        !msx__json_num(j, "batch_size", &bs, -1) || bs < 1 || !msx__json_num(j, "slot", &sl, -1) || sl < 0 || sl >= bs ||
        !cfg || cfg->type != MSX__JOBJ || !st)
        return msx__err(MSX_E_FORMAT, "%s: line %d is not a trial record (trial, batch, batch_size, slot, config, status)", R->log_path, line);
    t = (int)v;
    if (!(T = msx__srun_trial(R, t))) return msx__err(MSX_E_NOMEM, "out of memory");
    if (T->logged) return msx__err(MSX_E_FORMAT, "%s: line %d repeats trial %d", R->log_path, line, t);
    T->logged = 1;
    T->batch = (int)tb;
    T->batch_size = (int)bs;
    T->slot = (int)sl;
    T->failed = strcmp(st, "ok") != 0;
    snprintf(T->origin, sizeof T->origin, "%s", org ? org : "optimizer");
    msx__json_num(j, "seconds", &T->seconds, 0);
    for (i = 0; i < R->dim; i++) T->cfg[i] = NAN;
    for (i = 0; i < cfg->n; i++) {
        int k = msx_space_find(R->space, cfg->keys[i]);
        const msx__json *x = &cfg->kids[i];
        if (k < 0) return msx__err(MSX_E_STATE, "%s: line %d: hyperparameter '%s' is not in this search space", R->log_path, line, cfg->keys[i]);
        if (msx_space_type(R->space, k) == MSX_PARAM_CAT) {
            int c, found = -1;
            for (c = 0; c < 4 && x->type == MSX__JSTR; c++)
                if (msx_space_choice(R->space, k, c) && !strcmp(msx_space_choice(R->space, k, c), x->str)) found = c;
            if (found < 0) return msx__err(MSX_E_FORMAT, "%s: line %d: '%s' has an unknown choice", R->log_path, line, cfg->keys[i]);
            T->cfg[k] = found;
        } else {
            if (x->type != MSX__JNUM) return msx__err(MSX_E_FORMAT, "%s: line %d: '%s' is not a number", R->log_path, line, cfg->keys[i]);
            T->cfg[k] = x->num;
        }
    }
    if (!T->failed) {
        const msx__json *dv = msx__json_get(j, "dice");
        if (!cost || cost->type != MSX__JARR || cost->n != R->n_obj || !dv || dv->type != MSX__JOBJ)
            return msx__err(MSX_E_FORMAT, "%s: line %d: expected %d cost(s) and a dice object", R->log_path, line, R->n_obj);
        for (i = 0; i < R->n_obj; i++) {
            if (cost->kids[i].type != MSX__JNUM) return msx__err(MSX_E_FORMAT, "%s: line %d: cost %d is not a number", R->log_path, line, i);
            T->cost[i] = cost->kids[i].num;
        }
        for (i = 0; i < R->n_eval; i++)
            if (!msx__json_num(dv, R->tasks[i]->name, &T->dice[i], NAN) || !isfinite(T->dice[i]))
                return msx__err(MSX_E_FORMAT, "%s: line %d: no Dice for task %s", R->log_path, line, R->tasks[i]->name);
    }
    return MSX_OK;
}

static int msx__search_cfg_eq(const double *a, const double *b, int dim) {
    int i;
    for (i = 0; i < dim; i++)
        if (!((isnan(a[i]) && isnan(b[i])) || a[i] == b[i])) return 0;
    return 1;
}

static void msx__srun_origin(msx__srun *R, msx__strial *T) {
    int i;
    for (i = 0; i < R->n_init; i++)
        if (msx__search_cfg_eq(T->cfg, R->init_cfg + (size_t)i * R->dim, R->dim)) {
            snprintf(T->origin, sizeof T->origin, "%s", R->init_origin[i]);
            return;
        }
    snprintf(T->origin, sizeof T->origin, "optimizer");
}

/* Merge the trial's plan into the worker's model and score the calib images. */
static msx_result msx__srun_eval_trial(msx__srun *R, msx__swork *w, msx__strial *T) {
    msx_result r;
    int k, i;
    const volatile sig_atomic_t *cancel = R->o->cancel;
    msx__search_cfg_to_plan(R->groups, R->n_models, T->cfg, w->plan);
    if ((r = msx_merger_run(w->mg, w->plan, w->ck, NULL)) != MSX_OK) return r;
    if ((r = msx_sam_refresh(w->sam)) != MSX_OK) return r;
    for (k = 0; k < R->n_eval; k++) {
        double sum = 0, d;
        for (i = R->calib.off[k]; i < R->calib.off[k + 1]; i++) {
            if (cancel && *cancel) return msx__err(MSX_E_CANCELLED, "stopped on request");
            if ((r = msx__swork_eval_item(w, &R->calib.it[i], &R->so, &d)) != MSX_OK) return r;
            sum += d;
        }
        T->dice[k] = sum / (R->calib.off[k + 1] - R->calib.off[k]);
        T->cost[k] = 1.0 - T->dice[k];
    }
    return MSX_OK;
}

static void msx__srun_update_best(msx__srun *R, const msx__strial *T) {
    double s = msx__srun_score(R, T);
    if (s > R->best_score) R->best_score = s;
}

/* Finished trial: log line (one write + fsync), progress, callback. Called
   inside a critical section. */
static msx_result msx__srun_finish(msx__srun *R, int t) {
    msx__sb b = {NULL, 0, 0, 0};
    msx__strial *T = &R->tr[t];
    msx_result r;
    msx__srun_trial_json(R, t, &b);
    r = msx__search_log_append(R->log_fd, R->log_path, &b);
    msx__sb_free(&b);
    if (r != MSX_OK) return r;
    T->logged = 1;
    msx__srun_update_best(R, T);
    R->n_fin++;
    msx__search_progress_show(&R->prog, R->n_fin, R->n_trials, t, R->best_score, msx__srun_score(R, T), T->origin);
    if (R->o->on_trial) {
        msx_trial_info info;
        memset(&info, 0, sizeof info);
        info.trial = t;
        info.n_trials = R->n_trials;
        info.failed = T->failed;
        info.seconds = T->seconds;
        info.n_tasks = R->n_eval;
        info.dice = T->dice;
        info.best_score = R->best_score;
        info.origin = T->origin;
        R->o->on_trial(&info, R->o->user);
    }
    return MSX_OK;
}

/* Evaluates the trials t0 + s for the slots with need[s] != 0, in parallel
   over the workers. MSX_E_CANCELLED when stopped (finished trials are
   logged). */
static msx_result msx__srun_batch(msx__srun *R, int t0, int k, const unsigned char *need) {
    int s, n_need = 0, nt;
    int slots[256];
    msx_result fatal = MSX_OK;
    int cancelled = 0;
    char msg[1024];
    msg[0] = 0;
    for (s = 0; s < k; s++)
        if (need[s]) slots[n_need++] = s;
    nt = n_need < R->n_w ? n_need : R->n_w;
    if (nt < 1) return MSX_OK;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
#endif
    for (s = 0; s < n_need; s++) {
        int tid = 0, t = t0 + slots[s];
        msx__strial *T = &R->tr[t];
        double t1 = msx_time_now();
        msx_result r;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        if (fatal != MSX_OK || cancelled) continue;
        r = msx__srun_eval_trial(R, &R->w[tid], T);
        T->seconds = msx_time_now() - t1;
        if (r == MSX_E_CANCELLED) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            cancelled = 1;
            continue;
        }
        if (r != MSX_OK) {
            /* a trial that cannot be evaluated is a failed trial (ref §3:
               crash cost), the search goes on */
            if (R->prog.mode >= 0) fprintf(stderr, "\ntrial %d failed: %s\n", t, msx_last_error());
            T->failed = 1;
        }
#ifdef _OPENMP
#pragma omp critical(msx__search_log)
#endif
        {
            msx_result lr = msx__srun_finish(R, t);
            if (lr != MSX_OK && fatal == MSX_OK) { fatal = lr; snprintf(msg, sizeof msg, "%s", msx_last_error()); }
        }
    }
    if (fatal != MSX_OK) return msx__err(fatal, "%s", msg);
    if (cancelled || (R->o->cancel && *R->o->cancel)) return msx__err(MSX_E_CANCELLED, "stopped on request");
    return MSX_OK;
}

static msx_result msx__srun_tell(msx__srun *R, int t, int id) {
    const msx__strial *T = &R->tr[t];
    msx_result r = id >= 0 ? msx_opt_tell(R->opt, id, T->failed ? NULL : T->cost, T->failed)
                           : msx_opt_tell_config(R->opt, T->cfg, T->failed ? NULL : T->cost, T->failed);
    if (r != MSX_OK) return msx__err(r, "telling trial %d to the optimiser: %s", t, msx_last_error());
    return MSX_OK;
}

/* Asks a batch of k and fills the trial slots t0.. with its configurations. */
static msx_result msx__srun_ask(msx__srun *R, int t0, int k, int batch, double *cfgs, int *ids) {
    int s;
    msx_result r = msx_opt_ask(R->opt, k, cfgs, ids);
    if (r != MSX_OK) return msx__err(r, "optimiser ask: %s", msx_last_error());
    for (s = 0; s < k; s++) {
        msx__strial *T = msx__srun_trial(R, t0 + s);
        if (!T) return msx__err(MSX_E_NOMEM, "out of memory");
        if (!T->logged) {
            memcpy(T->cfg, cfgs + (size_t)s * R->dim, sizeof(double) * (size_t)R->dim);
            T->batch = batch;
            T->batch_size = k;
            T->slot = s;
            T->failed = 0;
            msx__srun_origin(R, T);
        }
    }
    return MSX_OK;
}

/* Rebuilds the optimiser from the log: every complete batch is told in trial
   order (as the uninterrupted run did); a batch cut short by a crash is asked
   again (the optimiser proposes the same configurations for the same told
   history), its logged slots are reused and the rest evaluated. The log is
   then rewritten atomically with exactly the kept lines. */
static msx_result msx__srun_resume(msx__srun *R, msx__search_loglines *L, int *n_done, int *n_batches) {
    int i, t, start = 0, nb = 0, partial = 0, bs = 0;
    msx_result r = MSX_OK;
    double *cfgs = NULL, *canon = NULL;
    int ids[256];
    unsigned char need[256];
    msx__sb b = {NULL, 0, 0, 0};
    for (i = 1; i < L->n && r == MSX_OK; i++) r = msx__srun_trial_parse(R, L->v[i], i + 1);
    if (r != MSX_OK) return r;
    for (;;) {
        int f = -1, b0;
        for (t = start; t < R->n_tr; t++)
            if (R->tr[t].logged) { f = t; break; }
        if (f < 0) break;
        bs = R->tr[f].batch_size;
        b0 = R->tr[f].batch;
        if (f - R->tr[f].slot != start || bs > 256)
            return msx__err(MSX_E_FORMAT, "%s: trial %d says slot %d of a batch, but its batch should start at trial %d; the log was edited?",
                            R->log_path, f, R->tr[f].slot, start);
        partial = 0;
        for (t = start; t < start + bs; t++) {
            if (t >= R->n_tr || !R->tr[t].logged) { partial = 1; continue; }
            if (R->tr[t].batch != b0 || R->tr[t].batch_size != bs || R->tr[t].slot != t - start)
                return msx__err(MSX_E_FORMAT, "%s: trial %d has inconsistent batch fields; the log was edited?", R->log_path, t);
        }
        if (partial) {
            for (t = start + bs; t < R->n_tr; t++)
                if (R->tr[t].logged)
                    return msx__err(MSX_E_FORMAT, "%s: trials are missing before trial %d (only the last batch may be incomplete)", R->log_path, t);
            break;
        }
        for (t = start; t < start + bs; t++)
            if ((r = msx__srun_tell(R, t, -1)) != MSX_OK) return r;
        start += bs;
        nb++;
    }
    if (partial) {
        cfgs = (double *)MSX_MALLOC(sizeof(double) * (size_t)bs * (size_t)R->dim + 1);
        canon = (double *)MSX_MALLOC(sizeof(double) * (size_t)R->dim + 1);
        if (!cfgs || !canon) { r = msx__err(MSX_E_NOMEM, "out of memory"); goto done; }
        if ((r = msx__srun_ask(R, start, bs, nb, cfgs, ids)) != MSX_OK) goto done;
        for (i = 0; i < bs; i++) {
            msx__strial *T = &R->tr[start + i];
            need[i] = !T->logged;
            if (!T->logged) continue;
            if (msx_space_canonicalize(R->space, T->cfg, canon) != MSX_OK ||
                !msx__search_cfg_eq(canon, cfgs + (size_t)i * R->dim, R->dim)) {
                /* should not happen (the optimiser is deterministic); evaluate
                   what it proposes now instead of the logged configuration */
                if (R->prog.mode >= 0)
                    fprintf(stderr, "resume: trial %d differs from the re-proposed configuration; re-evaluating it\n", start + i);
                T->logged = 0;
                memcpy(T->cfg, cfgs + (size_t)i * R->dim, sizeof(double) * (size_t)R->dim);
                T->batch = nb;
                T->batch_size = bs;
                T->slot = i;
                T->failed = 0;
                msx__srun_origin(R, T);
                need[i] = 1;
            }
        }
    }
    /* rewrite: header + kept trial lines (drops a torn last line) */
    msx__srun_header(R, &b);
    for (t = 0; t < start + (partial ? bs : 0); t++)
        if (R->tr[t].logged) msx__srun_trial_json(R, t, &b);
    if ((r = msx__search_write_sb(R->log_path, &b)) != MSX_OK) goto done;
    R->log_fd = open(R->log_path, O_WRONLY | O_APPEND);
    if (R->log_fd < 0) { r = msx__err(MSX_E_IO, "%s: cannot open for appending (%s)", R->log_path, strerror(errno)); goto done; }
    for (t = 0; t < start + (partial ? bs : 0); t++)
        if (R->tr[t].logged) { msx__srun_update_best(R, &R->tr[t]); R->n_fin++; }
    R->prog.done0 = R->n_fin;
    R->prog.t0 = msx_time_now();
    if (partial) {
        if ((r = msx__srun_batch(R, start, bs, need)) != MSX_OK) goto done;
        for (i = 0; i < bs; i++)
            if ((r = msx__srun_tell(R, start + i, ids[i])) != MSX_OK) goto done;
        start += bs;
        nb++;
    }
done:
    msx__sb_free(&b);
    MSX_FREE(cfgs);
    MSX_FREE(canon);
    *n_done = start;
    *n_batches = nb;
    return r;
}

/* mkdir -p */
static msx_result msx__search_mkdirs(const char *path) {
    char buf[4096];
    size_t i, n = strlen(path);
    msx_result r;
    if (n >= sizeof buf) return msx__err(MSX_E_ARG, "%s: path too long", path);
    memcpy(buf, path, n + 1);
    for (i = 1; i < n; i++)
        if (buf[i] == '/') {
            buf[i] = 0;
            if (!msx__search_isdir(buf) && (r = msx__search_mkdir(buf)) != MSX_OK) return r;
            buf[i] = '/';
        }
    return msx__search_mkdir(buf);
}

/* Chosen result: single-task = highest calib Dice; multi-task = the highest
   mean calib Dice over the tasks (a point of the Pareto front; the
   reference deploys its first listed incumbent instead, ref §3). Earliest
   on ties. */
static int msx__srun_choose(const msx__srun *R, int n) {
    int t, best = -1;
    double bs = -1;
    for (t = 0; t < n; t++) {
        double s = msx__srun_score(R, &R->tr[t]);
        if (R->tr[t].logged && !R->tr[t].failed && s > bs) { bs = s; best = t; }
    }
    return best;
}

/* Plan JSON with extra top-level keys spliced in before its closing brace. */
static msx_result msx__search_plan_json(const msx_plan *p, const char *extra, msx__sb *b) {
    char *js = NULL;
    size_t n;
    msx_result r = msx_plan_to_json(p, &js);
    if (r != MSX_OK) return r;
    n = strlen(js);
    while (n > 0 && js[n - 1] != '}') n--;
    if (n == 0) { msx_free(js); return msx__err(MSX_E_STATE, "plan JSON without a closing brace"); }
    msx__sb_putn(b, js, n - 1);
    if (extra && *extra) { msx__sb_puts(b, ", "); msx__sb_puts(b, extra); }
    msx__sb_puts(b, "}\n");
    msx_free(js);
    return MSX_OK;
}

static void msx__srun_dice_obj(const msx__srun *R, const msx__strial *T, msx__sb *b) {
    int k;
    msx__sb_puts(b, "{");
    for (k = 0; k < R->n_eval; k++) {
        msx__sb_puts(b, k ? ", " : "");
        msx__sb_json_str(b, R->tasks[k]->name);
        msx__sb_puts(b, ": ");
        msx__sb_json_num(b, T->dice[k]);
    }
    msx__sb_puts(b, "}");
}

/* best_plan.json (and, multi-task, the Pareto front with every point's
   per-task calib Dice and plan, also as pareto.json). */
static msx_result msx__srun_write_plans(msx__srun *R, int chosen, int n_done, msx_plan *plan) {
    msx__sb extra = {NULL, 0, 0, 0}, b = {NULL, 0, 0, 0}, pf = {NULL, 0, 0, 0};
    char *path = NULL;
    msx_result r = MSX_OK;
    int *idx = NULL, np = 0, i;
    const msx__strial *C = &R->tr[chosen];
    msx__sb_printf(&extra, "\"medsamix\": {\"objective\": \"%s\", \"trial\": %d, \"trials\": %d, \"origin\": ",
                   R->o->multi ? "multi-task" : "single-task", chosen, n_done);
    msx__sb_json_str(&extra, C->origin);
    msx__sb_puts(&extra, ", \"calib_dice\": ");
    msx__srun_dice_obj(R, C, &extra);
    msx__sb_printf(&extra, ", \"selection\": \"%s\"}", R->o->multi ? "highest mean calib Dice (on the Pareto front)" : "highest calib Dice");
    if (R->o->multi) {
        idx = (int *)MSX_MALLOC(sizeof(int) * (size_t)(n_done + 1));
        if (!idx) { r = msx__err(MSX_E_NOMEM, "out of memory"); goto done; }
        np = msx_opt_pareto(R->opt, idx, n_done);
        if (np > n_done) np = n_done;
        msx__sb_puts(&pf, "[");
        for (i = 0; i < np && r == MSX_OK; i++) {
            const msx__strial *T = &R->tr[idx[i]];
            msx__search_cfg_to_plan(R->groups, R->n_models, T->cfg, plan);
            msx__sb_printf(&pf, "%s\n  {\"trial\": %d, \"mean_dice\": ", i ? "," : "", idx[i]);
            msx__sb_json_num(&pf, msx__srun_score(R, T));
            msx__sb_puts(&pf, ", \"dice\": ");
            msx__srun_dice_obj(R, T, &pf);
            msx__sb_puts(&pf, ", \"plan\": ");
            r = msx__search_plan_json(plan, NULL, &pf);
            pf.n--; /* drop the newline */
            msx__sb_puts(&pf, "}");
        }
        msx__sb_puts(&pf, "]");
        if (r != MSX_OK) goto done;
        msx__sb_puts(&extra, ", \"pareto\": ");
        msx__sb_puts(&extra, pf.s);
        if (!(path = msx__search_join(R->out, "pareto.json"))) { r = msx__err(MSX_E_NOMEM, "out of memory"); goto done; }
        msx__sb_puts(&b, "{\"format\": \"medsamix-pareto-v1\", \"tasks\": [");
        for (i = 0; i < R->n_eval; i++) { msx__sb_puts(&b, i ? ", " : ""); msx__sb_json_str(&b, R->tasks[i]->name); }
        msx__sb_printf(&b, "], \"chosen\": %d, \"front\": ", chosen);
        msx__sb_puts(&b, pf.s);
        msx__sb_puts(&b, "}\n");
        if ((r = msx__search_write_sb(path, &b)) != MSX_OK) goto done;
        MSX_FREE(path);
        path = NULL;
        b.n = 0;
    }
    msx__search_cfg_to_plan(R->groups, R->n_models, C->cfg, plan);
    if ((r = msx__search_plan_json(plan, extra.s, &b)) != MSX_OK) goto done;
    if (!(path = msx__search_join(R->out, "best_plan.json"))) { r = msx__err(MSX_E_NOMEM, "out of memory"); goto done; }
    r = msx__search_write_sb(path, &b);
done:
    MSX_FREE(path);
    MSX_FREE(idx);
    msx__sb_free(&extra);
    msx__sb_free(&b);
    msx__sb_free(&pf);
    return r;
}

/* Loads `plan` into every worker's model. */
static msx_result msx__srun_load_plan(msx__srun *R, const msx_plan *plan) {
    int i;
    msx_result r;
    for (i = 0; i < R->n_w; i++) {
        if ((r = msx_merger_run(R->w[i].mg, plan, R->w[i].ck, NULL)) != MSX_OK) return r;
        if ((r = msx_sam_refresh(R->w[i].sam)) != MSX_OK) return r;
    }
    return MSX_OK;
}

/* report.md, report.json and overlays: calib and test Dice of every input
   model, the four uniform merges and the result, task by task. */
static msx_result msx__srun_report(msx__srun *R, const msx_plan *best, msx_search_summary *sum) {
    static const char *const presets[4] = {"linear_avg", "ta_0.5", "ties_d0.5_s1.0", "slerp_0.5"};
    msx__search_table tab;
    msx_plan *p = NULL;
    msx__sset set;
    msx__sb b = {NULL, 0, 0, 0};
    char *path = NULL, *ovdir = NULL, name[64];
    int k, l, i, splits[2] = {0, 1}, n_ov = R->o->n_overlays == 0 ? 3 : R->o->n_overlays < 0 ? 0 : R->o->n_overlays;
    msx_result r = MSX_OK;
    memset(&tab, 0, sizeof tab);
    memset(&set, 0, sizeof set);
    tab.n_inputs = R->n_models;
    tab.n_labels = R->n_models + 5;
    tab.n_tasks = R->n_tasks;
    tab.labels = (char **)msx__calloc((size_t)tab.n_labels, sizeof(char *));
    tab.tasks = (char **)msx__calloc((size_t)tab.n_tasks, sizeof(char *));
    tab.dice = (double *)MSX_MALLOC(sizeof(double) * (size_t)tab.n_labels * 2 * (size_t)tab.n_tasks);
    if (!tab.labels || !tab.tasks || !tab.dice) { r = msx__err(MSX_E_NOMEM, "out of memory"); goto done; }
    for (l = 0; l < R->n_models; l++) tab.labels[l] = R->stems[l];
    for (l = 0; l < 4; l++) tab.labels[R->n_models + l] = (char *)msx__search_uniform_names[l];
    tab.labels[R->n_models + 4] = (char *)"medsamix";
    for (k = 0; k < R->n_tasks; k++) tab.tasks[k] = R->tasks[k]->name;
    if ((r = msx_plan_clone(best, &p)) != MSX_OK) goto done;
    if (n_ov > 0) {
        if (!(ovdir = msx__search_join(R->out, "overlays"))) { r = msx__err(MSX_E_NOMEM, "out of memory"); goto done; }
        if ((r = msx__search_mkdir(ovdir)) != MSX_OK) goto done;
    }
    if (R->prog.mode >= 0) { printf("report: evaluating %d models on the calib and test splits of %d task(s)\n", tab.n_labels, R->n_tasks); fflush(stdout); }
    for (k = 0; k < R->n_tasks && r == MSX_OK; k++) {
        if ((r = msx__sset_build(&set, &R->tasks[k], 1, splits, 2, &R->arch, R->so.preprocess)) != MSX_OK) goto done;
        for (l = 0; l < tab.n_labels && r == MSX_OK; l++) {
            double m[2];
            if (l < R->n_models) {
                snprintf(name, sizeof name, l ? "model%d" : "base", l);
                r = msx_plan_set_preset(p, name);
            } else if (l < R->n_models + 4) r = msx_plan_set_preset(p, presets[l - R->n_models]);
            else memcpy(p->groups, best->groups, sizeof(msx_group_plan) * (size_t)best->n_groups);
            if (r != MSX_OK) break;
            if ((r = msx__srun_load_plan(R, p)) != MSX_OK) break;
            if ((r = msx__sset_eval(&set, R->w, R->n_w, &R->so, R->o->cancel, m)) != MSX_OK) break;
            *msx__search_cell(&tab, l, 0, k) = m[0];
            *msx__search_cell(&tab, l, 1, k) = m[1];
        }
        /* overlays of the first test images with the result (loaded last) */
        for (i = 0; r == MSX_OK && i < n_ov && i < R->tasks[k]->n[1]; i++) {
            const msx__simg *si = &R->tasks[k]->img[1][i];
            msx__sitem *it = &set.it[set.off[1] + i];
            msx_image img;
            double d;
            char *op, fn[512];
            memset(&img, 0, sizeof img);
            if ((r = msx__swork_eval_item(&R->w[0], it, &R->so, &d)) != MSX_OK) break;
            if ((r = msx_image_load(si->image, &img)) != MSX_OK) break;
            snprintf(fn, sizeof fn, "%s_%s.png", R->tasks[k]->name, si->stem);
            if (!(op = msx__search_join(ovdir, fn))) { msx_image_free(&img); r = msx__err(MSX_E_NOMEM, "out of memory"); break; }
            r = msx_overlay_png(op, &img, &R->w[0].pred, it->box);
            MSX_FREE(op);
            msx_image_free(&img);
        }
        msx__sset_free(&set);
    }
    if (r != MSX_OK) goto done;
    /* report.json */
    msx__search_report_json(&tab, &b);
    if (!(path = msx__search_join(R->out, "report.json"))) { r = msx__err(MSX_E_NOMEM, "out of memory"); goto done; }
    if ((r = msx__search_write_sb(path, &b)) != MSX_OK) goto done;
    MSX_FREE(path);
    path = NULL;
    b.n = 0;
    /* report.md */
    msx__sb_printf(&b, "# MedSAMix report (%s)\n\n", R->o->multi ? "MedSAMix-M, multi-task" : "MedSAMix-S, single-task");
    msx__sb_printf(&b, "- base: `%s`; fine-tuned:", R->o->base);
    for (i = 0; i < R->o->n_models; i++) msx__sb_printf(&b, " `%s`", R->o->models[i]);
    msx__sb_printf(&b, "\n- searched on the calib split of:");
    for (i = 0; i < R->n_eval; i++) msx__sb_printf(&b, " `%s`", R->tasks[i]->name);
    msx__sb_printf(&b, " (%s)\n- trials: %d, seed %llu, granularity %d, %d hyperparameters%s, batch %d (%d worker(s) x %d thread(s))\n",
                   R->o->multi ? (R->o->mo_mean ? "one objective per task, mean of normalised costs" : "one objective per task, ParEGO") : "objective: 1 - mean calib Dice",
                   sum->n_trials_done, (unsigned long long)R->o->seed, R->granularity, R->dim,
                   R->prune ? " (groups prompt_encoder_group_1/2 and mask_decoder_group_5 fixed at the base: they cannot change a box-only Dice)" : "",
                   R->batch, R->n_w, R->tpj);
    msx__sb_printf(&b, "- result: trial %d (`best_plan.json`, `best.safetensors`), chosen by %s\n",
                   sum->best_trial, R->o->multi ? "the highest mean calib Dice on the Pareto front" : "the highest calib Dice");
    msx__sb_puts(&b, "- uniform merges (every group alike): linear = equal weights over base + fine-tuned; "
                     "task_arithmetic = base + 0.5 x sum of task vectors; ties = drop rate 0.5, scale 1.0; "
                     "slerp = all t equal, i.e. SLERP(base, first fine-tuned, 0.5) (reference §2.5)\n");
    msx__sb_puts(&b, "- Dice per image = 2|P∩G|/(|P|+|G|), box prompt = tight ground-truth box, mask token 0; task score = mean over images\n");
    msx__search_report_md_table(&tab, 0, &b);
    msx__search_report_md_table(&tab, 1, &b);
    if (n_ov > 0) msx__sb_printf(&b, "\nOverlays of the first %d test images per task (result model): `overlays/`\n", n_ov);
    if (!(path = msx__search_join(R->out, "report.md"))) { r = msx__err(MSX_E_NOMEM, "out of memory"); goto done; }
    if ((r = msx__search_write_sb(path, &b)) != MSX_OK) goto done;
    for (k = 0; k < R->n_tasks && k < MSX_SEARCH_MAX_TASKS; k++) {
        sum->best_calib[k] = *msx__search_cell(&tab, R->n_models + 4, 0, k);
        sum->best_test[k] = *msx__search_cell(&tab, R->n_models + 4, 1, k);
    }
done:
    msx__sset_free(&set);
    msx_plan_free(p);
    MSX_FREE(tab.labels);
    MSX_FREE(tab.tasks);
    MSX_FREE(tab.dice);
    MSX_FREE(path);
    MSX_FREE(ovdir);
    msx__sb_free(&b);
    return r;
}

/* Default number of concurrent trials for `threads` threads: one worker per
   thread (J x 1). On the 2-core machine with the demo model, 2 x 1 ran 18
   trials in 4-7 s while 1 x 2 managed at most 7 in 150 s: a 2-thread forward
   joins hundreds of small oneDNN regions, each a barrier that stalls when the
   other core is busy, and even on an idle core pair it is no faster per image
   (18.8 vs 16.5 ms). */
static int msx__search_default_jobs(int threads) { return threads < 1 ? 1 : threads; }

MSXDEF msx_result msx_search_run(const msx_search_options *o, msx_search_summary *sum) {
    msx__srun R;
    msx_search_summary dummy;
    msx_opt_options oo;
    msx__search_loglines L;
    int i, n_done = 0, n_batches = 0, chosen, resuming = 0, levels = 0;
    double t_start = msx_time_now(), *cfgs = NULL;
    int ids[256];
    unsigned char need[256];
    msx_plan *plan = NULL;
    msx_result r = MSX_OK;
    struct stat st;
    memset(&R, 0, sizeof R);
    memset(&L, 0, sizeof L);
    R.log_fd = -1;
    if (!sum) sum = &dummy;
    memset(sum, 0, sizeof *sum);
    for (i = 0; i < MSX_SEARCH_MAX_TASKS; i++) sum->best_calib[i] = sum->best_test[i] = NAN;
    sum->best_trial = -1;
    if (!o || !o->base || !o->models || o->n_models < 1 || !o->tasks || o->n_tasks < 1)
        return msx__err(MSX_E_ARG, "msx_search_run: need a base model, >= 1 fine-tuned model and >= 1 task");
    if (o->n_models + 1 > MSX_MAX_MODELS)
        return msx__err(MSX_E_LIMIT, "msx_search_run: %d fine-tuned models; at most %d (MSX_MAX_MODELS - 1)", o->n_models, MSX_MAX_MODELS - 1);
    if (o->n_tasks > MSX_SEARCH_MAX_TASKS)
        return msx__err(MSX_E_LIMIT, "msx_search_run: %d tasks; at most %d (MSX_SEARCH_MAX_TASKS)", o->n_tasks, MSX_SEARCH_MAX_TASKS);
    if (o->granularity < 0 || o->granularity > 4)
        return msx__err(MSX_E_ARG, "msx_search_run: granularity %d; use 1..4 (0 = the default 2)", o->granularity);
    if (o->n_trials < 0 || o->jobs < 0 || o->jobs > 256 || o->threads < 0)
        return msx__err(MSX_E_ARG, "msx_search_run: trials/jobs/threads must be >= 0 (jobs <= 256)");
    R.o = o;
    R.granularity = o->granularity ? o->granularity : 2;
    R.prune = !o->no_prune;
    R.n_trials = o->n_trials ? o->n_trials : 100;
    R.threads = msx__search_default_threads(o->threads);
    R.jobs = o->jobs ? o->jobs : msx__search_default_jobs(R.threads);
    R.tpj = R.threads / R.jobs > 0 ? R.threads / R.jobs : 1;
    R.batch = R.jobs;
    R.so.preprocess = o->preprocess;
    R.best_score = -1;
    R.n_models = o->n_models + 1;
    R.n_tasks = o->n_tasks;
    R.n_eval = o->multi ? o->n_tasks : 1;
    R.n_obj = R.n_eval;
    if (!(R.out = msx__strdup(o->out_dir ? o->out_dir : "runs/search")) || !(R.log_path = msx__search_join(R.out, "trials.jsonl"))) {
        r = msx__err(MSX_E_NOMEM, "out of memory");
        goto done;
    }
    msx__search_progress_init(&R.prog, o->progress, 0);
    /* 1. cheap validation first: tasks (every file decoded), then models */
    for (i = 0; i < o->n_tasks; i++) {
        int j;
        if ((r = msx_task_open(o->tasks[i], &o->task, &R.tasks[i])) != MSX_OK) goto done;
        for (j = 0; j < i; j++)
            if (!strcmp(R.tasks[j]->name, R.tasks[i]->name)) {
                r = msx__err(MSX_E_ARG, "tasks %s and %s have the same name '%s'; rename one folder", o->tasks[j], o->tasks[i], R.tasks[i]->name);
                goto done;
            }
    }
    if ((r = msx_sam_load(o->base, o->arch_config, &R.ck[0], &R.arch)) != MSX_OK) goto done;
    for (i = 1; i < R.n_models; i++) {
        msx_sam_arch a;
        const char *path = o->models[i - 1];
        if ((r = msx_sam_load(path, o->arch_config, &R.ck[i], &a)) != MSX_OK) goto done;
        if ((r = msx_sam_validate(R.ck[i], &R.arch)) != MSX_OK) {
            r = msx__err(r, "%s has a different architecture from the base %s (models must share one): %s", path, o->base, msx_last_error());
            goto done;
        }
    }
    for (i = 0; i < R.n_models; i++) {
        int j, dup = 0;
        if (!(R.stems[i] = msx__search_stem(i ? o->models[i - 1] : o->base))) { r = msx__err(MSX_E_NOMEM, "out of memory"); goto done; }
        for (j = 0; j < i; j++) dup |= !strcmp(R.stems[j], R.stems[i]);
        if (dup) { /* same file name in two folders: number it */
            char *s = (char *)MSX_MALLOC(strlen(R.stems[i]) + 16);
            if (!s) { r = msx__err(MSX_E_NOMEM, "out of memory"); goto done; }
            sprintf(s, "%s_%d", R.stems[i], i);
            MSX_FREE(R.stems[i]);
            R.stems[i] = s;
        }
        R.model_digest[i] = msx__search_ckpt_digest(R.ck[i]);
    }
    /* 2. search space, starting points, optimiser */
    if ((r = msx_plan_create(R.arch.depth, R.n_models, R.granularity, &R.tmpl)) != MSX_OK) goto done;
    if ((r = msx__search_space(R.tmpl, R.stems, R.n_models, R.prune, &R.space, &R.groups)) != MSX_OK) goto done;
    R.dim = msx_space_dim(R.space);
    R.n_init = msx_search_n_initial(o->n_models);
    R.init_cfg = (double *)MSX_MALLOC(sizeof(double) * (size_t)R.n_init * (size_t)R.dim);
    R.init_origin = (char (*)[40])msx__calloc((size_t)R.n_init, 40);
    if (!R.init_cfg || !R.init_origin) { r = msx__err(MSX_E_NOMEM, "out of memory"); goto done; }
    for (i = 0; i < R.n_init; i++) {
        double *c = R.init_cfg + (size_t)i * R.dim;
        msx__search_initial(R.groups, R.tmpl->n_groups, R.n_models, R.dim, i, c, R.init_origin[i], 40, R.stems);
        if ((r = msx_space_canonicalize(R.space, c, c)) != MSX_OK) goto done;
    }
    memset(&oo, 0, sizeof oo);
    oo.seed = o->seed;
    oo.n_objectives = R.n_obj;
    oo.n_trials = R.n_trials;
    oo.init_configs = R.init_cfg;
    oo.n_init_configs = R.n_init;
    oo.init_configs_last = 0;
    /* a small space-filling design after the reference's starting points
       (the reference draws 10 random configurations, ref §4) */
    oo.n_init = (R.n_trials - R.n_init) / 5;
    if (oo.n_init > 10) oo.n_init = 10;
    if (oo.n_init <= 0) oo.n_init = -1;
    oo.mo_mode = o->mo_mean ? MSX_MO_MEAN : MSX_MO_PAREGO;
    if ((r = msx_opt_create(R.space, &oo, &R.opt)) != MSX_OK) goto done;
    /* 3. the log: a new one, or the old one's header must match this setup */
    if ((r = msx__search_mkdirs(R.out)) != MSX_OK) goto done;
    {
        msx__sb hb = {NULL, 0, 0, 0};
        msx__srun_header(&R, &hb); /* computes the fingerprint */
        msx__sb_free(&hb);
    }
    if (stat(R.log_path, &st) == 0) {
        if (!o->resume) {
            r = msx__err(MSX_E_STATE, "%s already exists: continue it with --resume, or choose another --out", R.log_path);
            goto done;
        }
        if ((r = msx__search_log_read(R.log_path, &L)) != MSX_OK) goto done;
        if ((r = msx__srun_check_header(&R, L.v[0])) != MSX_OK) goto done;
        resuming = 1;
    }
    /* 4. the calib cache and the workers */
    {
        int sp0 = 0;
        if ((r = msx__sset_build(&R.calib, R.tasks, R.n_eval, &sp0, 1, &R.arch, R.so.preprocess)) != MSX_OK) goto done;
    }
    R.n_w = R.jobs;
    R.w = (msx__swork *)msx__calloc((size_t)R.n_w, sizeof *R.w);
    if (!R.w) { r = msx__err(MSX_E_NOMEM, "out of memory"); goto done; }
    for (i = 0; i < R.n_w; i++)
        if ((r = msx__swork_init(&R.w[i], R.ck[0], (const msx_checkpoint *const *)(R.ck + 1), o->n_models,
                                 R.granularity, &R.arch, R.tpj)) != MSX_OK) goto done;
#ifdef _OPENMP
    /* J workers of T threads: nested regions only when both exceed 1
       (restored at the end) */
    levels = omp_get_max_active_levels();
    omp_set_max_active_levels(R.jobs > 1 && R.tpj > 1 ? 2 : 1);
#endif
    /* 5. replay or start */
    if (resuming) {
        if (R.prog.mode >= 0) printf("resuming %s: %d logged line(s)%s\n", R.log_path, L.n - 1, L.dropped ? ", a torn last line dropped" : "");
        r = msx__srun_resume(&R, &L, &n_done, &n_batches);
        msx__search_loglines_free(&L);
        if (r == MSX_E_CANCELLED) { sum->cancelled = 1; }
        else if (r != MSX_OK) goto done;
    } else {
        msx__sb hb = {NULL, 0, 0, 0};
        msx__srun_header(&R, &hb);
        r = msx__search_write_sb(R.log_path, &hb);
        msx__sb_free(&hb);
        if (r != MSX_OK) goto done;
        R.log_fd = open(R.log_path, O_WRONLY | O_APPEND);
        if (R.log_fd < 0) { r = msx__err(MSX_E_IO, "%s: cannot open for appending (%s)", R.log_path, strerror(errno)); goto done; }
    }
    if (R.prog.mode >= 0 && !sum->cancelled)
        printf("search: %s, %d trial(s) (%d done), %d hyperparameters, %d worker(s) x %d thread(s), %d calib image(s)\n",
               o->multi ? "multi-task" : "single-task", R.n_trials, n_done, R.dim, R.n_w, R.tpj, R.calib.n);
    cfgs = (double *)MSX_MALLOC(sizeof(double) * (size_t)R.batch * (size_t)R.dim + 1);
    if (!cfgs) { r = msx__err(MSX_E_NOMEM, "out of memory"); goto done; }
    /* 6. ask a batch, evaluate it in parallel, tell it in slot order */
    while (!sum->cancelled && n_done < R.n_trials) {
        int k = R.n_trials - n_done < R.batch ? R.n_trials - n_done : R.batch;
        if (o->cancel && *o->cancel) { sum->cancelled = 1; break; }
        if ((r = msx__srun_ask(&R, n_done, k, n_batches, cfgs, ids)) != MSX_OK) goto done;
        memset(need, 1, (size_t)k);
        r = msx__srun_batch(&R, n_done, k, need);
        if (r == MSX_E_CANCELLED) { sum->cancelled = 1; break; }
        if (r != MSX_OK) goto done;
        for (i = 0; i < k; i++)
            if ((r = msx__srun_tell(&R, n_done + i, ids[i])) != MSX_OK) goto done;
        n_done += k;
        n_batches++;
    }
    msx__search_progress_end(&R.prog);
    r = MSX_OK;
    sum->n_trials_done = sum->cancelled ? R.n_fin : n_done; /* logged trials */
    sum->n_tasks = R.n_tasks;
    /* 7. outputs: plan, merged checkpoint, report */
    chosen = msx__srun_choose(&R, sum->cancelled ? R.n_tr : n_done);
    sum->best_trial = chosen;
    if (chosen < 0) {
        r = sum->cancelled ? msx__err(MSX_E_CANCELLED, "stopped before any trial finished")
                           : msx__err(MSX_E_STATE, "no trial succeeded; see the errors above");
        goto done;
    }
    for (i = 0; i < R.n_eval; i++) sum->best_calib[i] = R.tr[chosen].dice[i];
    if ((r = msx_plan_clone(R.tmpl, &plan)) != MSX_OK) goto done;
    if ((r = msx__srun_write_plans(&R, chosen, n_done, plan)) != MSX_OK) goto done;
    if (sum->cancelled) {
        r = msx__err(MSX_E_CANCELLED, "stopped on request with %d trial(s) logged; best_plan.json written; continue with --resume", R.n_fin);
        goto done;
    }
    msx__search_cfg_to_plan(R.groups, R.n_models, R.tr[chosen].cfg, plan);
    if ((r = msx__srun_load_plan(&R, plan)) != MSX_OK) goto done;
    {
        char *p = msx__search_join(R.out, "best.safetensors");
        if (!p) { r = msx__err(MSX_E_NOMEM, "out of memory"); goto done; }
        r = msx_merge_export(p, R.w[0].ck, plan);
        MSX_FREE(p);
        if (r != MSX_OK) goto done;
    }
    if (!o->no_report) r = msx__srun_report(&R, plan, sum);
    if (r == MSX_E_CANCELLED) sum->cancelled = 1;
done:
#ifdef _OPENMP
    if (levels > 0) omp_set_max_active_levels(levels);
#endif
    msx__search_progress_end(&R.prog);
    msx__search_loglines_free(&L);
    sum->seconds = msx_time_now() - t_start;
    MSX_FREE(cfgs);
    msx_plan_free(plan);
    msx__srun_free(&R);
    return r;
}
