/* ======================================================================== */
/* IMPLEMENTATION: core. Owns configuration defaults, the error slot,        */
/* allocation, the tensor table, JSON parsing/writing, safetensors, files,   */
/* RNG and timing. Every later section builds on these helpers.              */
/* ======================================================================== */

#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#if defined(MSX_MALLOC) && defined(MSX_FREE) && defined(MSX_REALLOC)
/* ok: all three given */
#elif !defined(MSX_MALLOC) && !defined(MSX_FREE) && !defined(MSX_REALLOC)
#define MSX_MALLOC(sz) malloc(sz)
#define MSX_REALLOC(p, newsz) realloc(p, newsz)
#define MSX_FREE(p) free(p)
#else
#error "Define all or none of MSX_MALLOC, MSX_REALLOC and MSX_FREE."
#endif

#ifndef MSX_ASSERT
#include <assert.h>
#define MSX_ASSERT(x) assert(x) /* internal invariants only, never user input */
#endif
#ifndef MSX_MAX_FILE_BYTES
#define MSX_MAX_FILE_BYTES ((size_t)16 << 30) /* 16 GiB: larger than ViT-H f32 */
#endif
#ifndef MSX_MAX_TENSORS
#define MSX_MAX_TENSORS 100000
#endif
#ifndef MSX_MAX_JSON_BYTES
#define MSX_MAX_JSON_BYTES ((size_t)256 << 20)
#endif
#ifndef MSX_MAX_JSON_DEPTH
#define MSX_MAX_JSON_DEPTH 64
#endif
#define MSX__ALIGN 64

#if defined(__cplusplus) && __cplusplus >= 201103L
#define MSX__TLS thread_local
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L && !defined(__STDC_NO_THREADS__)
#define MSX__TLS _Thread_local
#elif defined(__GNUC__) || defined(__clang__)
#define MSX__TLS __thread
#else
#define MSX__TLS /* no TLS: messages are shared between threads */
#endif

#if defined(__GNUC__) || defined(__clang__)
#define MSX__PRINTF(a, b) __attribute__((format(printf, a, b)))
#define MSX__UNUSED __attribute__((unused))
#else
#define MSX__PRINTF(a, b)
#define MSX__UNUSED
#endif

/* ---- errors ---------------------------------------------------------------- */

static MSX__TLS char msx__errbuf[1024];
static MSX__TLS msx_result msx__errcode; /* code of the last msx__err on this thread */

MSXDEF const char *msx_result_str(msx_result r) {
    switch (r) {
    case MSX_OK: return "ok";
    case MSX_E_IO: return "I/O error";
    case MSX_E_FORMAT: return "malformed file";
    case MSX_E_UNSUPPORTED: return "unsupported";
    case MSX_E_UNSAFE: return "unsafe content refused";
    case MSX_E_KEY_MISMATCH: return "tensor names do not match";
    case MSX_E_SHAPE: return "shape mismatch";
    case MSX_E_NOMEM: return "out of memory";
    case MSX_E_DNNL: return "oneDNN error";
    case MSX_E_ARG: return "invalid argument";
    case MSX_E_LIMIT: return "size limit exceeded";
    case MSX_E_CANCELLED: return "cancelled";
    case MSX_E_STATE: return "invalid state";
    default: return "unknown result";
    }
}

MSXDEF const char *msx_last_error(void) { return msx__errbuf; }
MSXDEF void msx_clear_error(void) { msx__errbuf[0] = 0; }

/* Sets the thread's message and returns r, so callers can `return msx__err(...)`. */
static MSX__PRINTF(2, 3) msx_result msx__err(msx_result r, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msx__errbuf, sizeof msx__errbuf, fmt, ap);
    va_end(ap);
    msx__errcode = r;
    return r;
}

/* ---- allocation ------------------------------------------------------------ */

MSXDEF void *msx_malloc(size_t n) { return MSX_MALLOC(n ? n : 1); }
MSXDEF void msx_free(void *p) { MSX_FREE(p); }

static void *msx__calloc(size_t n, size_t sz) {
    void *p;
    size_t bytes;
    if (sz && n > SIZE_MAX / sz) return NULL;
    bytes = n * sz;
    p = MSX_MALLOC(bytes > 0 ? bytes : 1);
    if (p) memset(p, 0, bytes);
    return p;
}

/* 64-byte aligned blocks on top of MSX_MALLOC: the offset to the raw pointer
   is stored in the byte before the aligned address. */
static void *msx__aligned_alloc(size_t n) {
    unsigned char *raw, *p;
    if (n > SIZE_MAX - MSX__ALIGN) return NULL;
    raw = (unsigned char *)MSX_MALLOC(n + MSX__ALIGN);
    if (!raw) return NULL;
    p = (unsigned char *)(((uintptr_t)raw + MSX__ALIGN) & ~(uintptr_t)(MSX__ALIGN - 1));
    p[-1] = (unsigned char)(p - raw);
    return p;
}
static void msx__aligned_free(void *ptr) {
    unsigned char *p = (unsigned char *)ptr;
    if (p) MSX_FREE(p - p[-1]);
}

static char *msx__strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = (char *)MSX_MALLOC(n);
    if (d) memcpy(d, s, n);
    return d;
}

/* ---- growable string buffer (JSON writing, messages) ----------------------- */

typedef struct msx__sb { char *s; size_t n, cap; int oom; } msx__sb;

static void msx__sb_grow(msx__sb *b, size_t extra) {
    size_t cap;
    char *s;
    if (b->oom || b->n + extra + 1 <= b->cap) return;
    cap = b->cap ? b->cap : 256;
    while (cap < b->n + extra + 1) cap *= 2;
    s = (char *)MSX_REALLOC(b->s, cap);
    if (!s) { b->oom = 1; return; }
    b->s = s;
    b->cap = cap;
}
static void msx__sb_putn(msx__sb *b, const char *s, size_t n) {
    msx__sb_grow(b, n);
    if (b->oom) return;
    memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = 0;
}
static void msx__sb_puts(msx__sb *b, const char *s) { msx__sb_putn(b, s, strlen(s)); }
static MSX__PRINTF(2, 3) void msx__sb_printf(msx__sb *b, const char *fmt, ...) {
    va_list ap;
    int k;
    va_start(ap, fmt);
    k = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (k < 0) return;
    msx__sb_grow(b, (size_t)k);
    if (b->oom) return;
    va_start(ap, fmt);
    vsnprintf(b->s + b->n, (size_t)k + 1, fmt, ap);
    va_end(ap);
    b->n += (size_t)k;
}
/* JSON string literal with escapes. */
static void msx__sb_json_str(msx__sb *b, const char *s) {
    msx__sb_putn(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') { char e[2] = {'\\', (char)c}; msx__sb_putn(b, e, 2); }
        else if (c == '\n') msx__sb_puts(b, "\\n");
        else if (c == '\t') msx__sb_puts(b, "\\t");
        else if (c == '\r') msx__sb_puts(b, "\\r");
        else if (c < 0x20) msx__sb_printf(b, "\\u%04x", c);
        else msx__sb_putn(b, (const char *)&c, 1);
    }
    msx__sb_putn(b, "\"", 1);
}
/* Shortest round-tripping double (JSON has no NaN/inf: those become null). */
static MSX__UNUSED void msx__sb_json_num(msx__sb *b, double v) {
    char tmp[40];
    int p;
    if (!isfinite(v)) { msx__sb_puts(b, "null"); return; }
    for (p = 15; p <= 17; p++) {
        snprintf(tmp, sizeof tmp, "%.*g", p, v);
        if (strtod(tmp, NULL) == v) break;
    }
    msx__sb_puts(b, tmp);
}
static void msx__sb_free(msx__sb *b) { MSX_FREE(b->s); b->s = NULL; b->n = b->cap = 0; }

/* ---- JSON DOM (bounded, for untrusted headers, configs, plans, logs) ------ */

typedef enum { MSX__JNULL, MSX__JBOOL, MSX__JNUM, MSX__JSTR, MSX__JARR, MSX__JOBJ } msx__jtype;

typedef struct msx__json {
    msx__jtype type;
    double num;     /* JNUM, JBOOL (0/1) */
    char *str;      /* JSTR value (NUL-terminated, unescaped) */
    int n;          /* children of JARR / JOBJ */
    char **keys;    /* JOBJ keys */
    struct msx__json *kids;
} msx__json;

typedef struct msx__jparser {
    const char *s, *end, *start;
    const char *what; /* file name for messages */
    int depth;
    msx_result err;
} msx__jparser;

static void msx__json_free_kids(msx__json *j) {
    int i;
    if (j->type == MSX__JSTR) MSX_FREE(j->str);
    if (j->type == MSX__JARR || j->type == MSX__JOBJ) {
        for (i = 0; i < j->n; i++) {
            msx__json_free_kids(&j->kids[i]);
            if (j->keys) MSX_FREE(j->keys[i]);
        }
        MSX_FREE(j->kids);
        MSX_FREE(j->keys);
    }
    memset(j, 0, sizeof *j);
}
static void msx__json_free(msx__json *j) {
    if (!j) return;
    msx__json_free_kids(j);
    MSX_FREE(j);
}

static int msx__jfail(msx__jparser *p, const char *msg) {
    if (p->err == MSX_OK)
        p->err = msx__err(MSX_E_FORMAT, "%s: JSON error at byte %ld: %s", p->what,
                          (long)(p->s - p->start), msg);
    return 0;
}
static void msx__jws(msx__jparser *p) {
    while (p->s < p->end && (*p->s == ' ' || *p->s == '\t' || *p->s == '\n' || *p->s == '\r')) p->s++;
}
static int msx__jhex(msx__jparser *p, unsigned *out) {
    unsigned v = 0;
    int i;
    if (p->end - p->s < 4) return msx__jfail(p, "short \\u escape");
    for (i = 0; i < 4; i++) {
        char c = p->s[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return msx__jfail(p, "bad \\u escape");
    }
    p->s += 4;
    *out = v;
    return 1;
}
static int msx__jstring(msx__jparser *p, char **out) {
    msx__sb b = {0, 0, 0, 0};
    p->s++; /* opening quote */
    while (1) {
        const char *run = p->s;
        while (p->s < p->end && *p->s != '"' && *p->s != '\\' && (unsigned char)*p->s >= 0x20) p->s++;
        msx__sb_putn(&b, run, (size_t)(p->s - run));
        if (p->s >= p->end) { msx__sb_free(&b); return msx__jfail(p, "unterminated string"); }
        if (*p->s == '"') { p->s++; break; }
        if ((unsigned char)*p->s < 0x20) { msx__sb_free(&b); return msx__jfail(p, "control character in string"); }
        p->s++; /* backslash */
        if (p->s >= p->end) { msx__sb_free(&b); return msx__jfail(p, "unterminated escape"); }
        {
            char c = *p->s++;
            char o[4];
            unsigned u, u2;
            switch (c) {
            case '"': case '\\': case '/': msx__sb_putn(&b, &c, 1); break;
            case 'b': msx__sb_putn(&b, "\b", 1); break;
            case 'f': msx__sb_putn(&b, "\f", 1); break;
            case 'n': msx__sb_putn(&b, "\n", 1); break;
            case 'r': msx__sb_putn(&b, "\r", 1); break;
            case 't': msx__sb_putn(&b, "\t", 1); break;
            case 'u':
                if (!msx__jhex(p, &u)) { msx__sb_free(&b); return 0; }
                if (u >= 0xD800 && u < 0xDC00 && p->end - p->s >= 6 && p->s[0] == '\\' && p->s[1] == 'u') {
                    p->s += 2;
                    if (!msx__jhex(p, &u2)) { msx__sb_free(&b); return 0; }
                    u = 0x10000 + ((u - 0xD800) << 10) + (u2 & 0x3FF);
                }
                if (u == 0) u = 0xFFFD; /* keep strings NUL-free */
                if (u < 0x80) { o[0] = (char)u; msx__sb_putn(&b, o, 1); }
                else if (u < 0x800) { o[0] = (char)(0xC0 | (u >> 6)); o[1] = (char)(0x80 | (u & 63)); msx__sb_putn(&b, o, 2); }
                else if (u < 0x10000) { o[0] = (char)(0xE0 | (u >> 12)); o[1] = (char)(0x80 | ((u >> 6) & 63)); o[2] = (char)(0x80 | (u & 63)); msx__sb_putn(&b, o, 3); }
                else { o[0] = (char)(0xF0 | (u >> 18)); o[1] = (char)(0x80 | ((u >> 12) & 63)); o[2] = (char)(0x80 | ((u >> 6) & 63)); o[3] = (char)(0x80 | (u & 63)); msx__sb_putn(&b, o, 4); }
                break;
            default: msx__sb_free(&b); return msx__jfail(p, "bad escape");
            }
        }
    }
    if (b.oom) { msx__sb_free(&b); p->err = msx__err(MSX_E_NOMEM, "%s: out of memory in JSON", p->what); return 0; }
    if (!b.s) { b.s = msx__strdup(""); if (!b.s) { p->err = msx__err(MSX_E_NOMEM, "out of memory"); return 0; } }
    *out = b.s;
    return 1;
}
static int msx__jvalue(msx__jparser *p, msx__json *v);
static int msx__jpush(msx__jparser *p, msx__json *v, int *cap, char *key) {
    if (v->n == *cap) {
        int nc = *cap ? *cap * 2 : 4;
        msx__json *k = (msx__json *)MSX_REALLOC(v->kids, (size_t)nc * sizeof *k);
        if (!k) { MSX_FREE(key); p->err = msx__err(MSX_E_NOMEM, "out of memory"); return 0; }
        v->kids = k;
        if (v->type == MSX__JOBJ) {
            char **kk = (char **)MSX_REALLOC(v->keys, (size_t)nc * sizeof *kk);
            if (!kk) { MSX_FREE(key); p->err = msx__err(MSX_E_NOMEM, "out of memory"); return 0; }
            v->keys = kk;
        }
        *cap = nc;
    }
    memset(&v->kids[v->n], 0, sizeof v->kids[0]);
    if (v->type == MSX__JOBJ) v->keys[v->n] = key;
    v->n++;
    return msx__jvalue(p, &v->kids[v->n - 1]);
}
static int msx__jvalue(msx__jparser *p, msx__json *v) {
    msx__jws(p);
    if (p->s >= p->end) return msx__jfail(p, "unexpected end");
    if (++p->depth > MSX_MAX_JSON_DEPTH) return msx__jfail(p, "nesting too deep");
    switch (*p->s) {
    case '{': case '[': {
        int obj = *p->s == '{', cap = 0;
        char close = obj ? '}' : ']';
        v->type = obj ? MSX__JOBJ : MSX__JARR;
        p->s++;
        msx__jws(p);
        if (p->s < p->end && *p->s == close) { p->s++; break; }
        while (1) {
            char *key = NULL;
            msx__jws(p);
            if (obj) {
                if (p->s >= p->end || *p->s != '"') return msx__jfail(p, "expected a string key");
                if (!msx__jstring(p, &key)) return 0;
                msx__jws(p);
                if (p->s >= p->end || *p->s != ':') { MSX_FREE(key); return msx__jfail(p, "expected ':'"); }
                p->s++;
            }
            if (!msx__jpush(p, v, &cap, key)) return 0;
            msx__jws(p);
            if (p->s < p->end && *p->s == ',') { p->s++; continue; }
            if (p->s < p->end && *p->s == close) { p->s++; break; }
            return msx__jfail(p, obj ? "expected ',' or '}'" : "expected ',' or ']'");
        }
        break;
    }
    case '"':
        v->type = MSX__JSTR;
        if (!msx__jstring(p, &v->str)) { v->type = MSX__JNULL; return 0; }
        break;
    case 't':
        if (p->end - p->s >= 4 && !memcmp(p->s, "true", 4)) { v->type = MSX__JBOOL; v->num = 1; p->s += 4; break; }
        return msx__jfail(p, "bad literal");
    case 'f':
        if (p->end - p->s >= 5 && !memcmp(p->s, "false", 5)) { v->type = MSX__JBOOL; v->num = 0; p->s += 5; break; }
        return msx__jfail(p, "bad literal");
    case 'n':
        if (p->end - p->s >= 4 && !memcmp(p->s, "null", 4)) { v->type = MSX__JNULL; p->s += 4; break; }
        return msx__jfail(p, "bad literal");
    default: {
        /* Strict JSON number: -?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)? ; NaN/Infinity refused. */
        const char *q = p->s;
        char tmp[64];
        size_t len;
        if (q < p->end && *q == '-') q++;
        if (q >= p->end || *q < '0' || *q > '9') return msx__jfail(p, "unexpected character (NaN/Infinity are not JSON)");
        while (q < p->end && ((*q >= '0' && *q <= '9') || *q == '.' || *q == 'e' || *q == 'E' || *q == '+' || *q == '-')) q++;
        len = (size_t)(q - p->s);
        if (len >= sizeof tmp) return msx__jfail(p, "number too long");
        memcpy(tmp, p->s, len);
        tmp[len] = 0;
        {
            char *e;
            v->num = strtod(tmp, &e);
            if (*e) return msx__jfail(p, "bad number");
        }
        v->type = MSX__JNUM;
        p->s = q;
    }
    }
    p->depth--;
    return 1;
}
/* Parses a JSON document of `len` bytes. NULL on error (message set). */
static msx__json *msx__json_parse(const char *s, size_t len, const char *what) {
    msx__jparser p;
    msx__json *v;
    if (len > MSX_MAX_JSON_BYTES) {
        msx__err(MSX_E_LIMIT, "%s: JSON text of %lu bytes exceeds MSX_MAX_JSON_BYTES", what, (unsigned long)len);
        return NULL;
    }
    v = (msx__json *)msx__calloc(1, sizeof *v);
    if (!v) { msx__err(MSX_E_NOMEM, "out of memory"); return NULL; }
    p.s = p.start = s;
    p.end = s + len;
    p.what = what;
    p.depth = 0;
    p.err = MSX_OK;
    if (msx__jvalue(&p, v)) {
        msx__jws(&p);
        if (p.s != p.end) msx__jfail(&p, "trailing characters after the JSON value");
    }
    if (p.err != MSX_OK) { msx__json_free(v); return NULL; }
    return v;
}
/* Object member lookup (first match), NULL when absent or j is not an object. */
static const msx__json *msx__json_get(const msx__json *j, const char *key) {
    int i;
    if (!j || j->type != MSX__JOBJ) return NULL;
    for (i = 0; i < j->n; i++)
        if (!strcmp(j->keys[i], key)) return &j->kids[i];
    return NULL;
}
/* Number member (or default when absent). Returns 0 when present but not a number. */
static MSX__UNUSED int msx__json_num(const msx__json *j, const char *key, double *out, double dflt) {
    const msx__json *v = msx__json_get(j, key);
    if (!v) { *out = dflt; return 1; }
    if (v->type == MSX__JNUM || v->type == MSX__JBOOL) { *out = v->num; return 1; }
    return 0;
}
static MSX__UNUSED const char *msx__json_str(const msx__json *j, const char *key) {
    const msx__json *v = msx__json_get(j, key);
    return v && v->type == MSX__JSTR ? v->str : NULL;
}

/* ---- files ------------------------------------------------------------------ */

MSXDEF msx_result msx_read_file(const char *path, size_t max_bytes, void **data, size_t *len) {
    FILE *f;
    long sz;
    unsigned char *buf;
    if (!max_bytes) max_bytes = MSX_MAX_FILE_BYTES;
    *data = NULL;
    *len = 0;
    f = fopen(path, "rb");
    if (!f) return msx__err(MSX_E_IO, "%s: cannot open (%s)", path, strerror(errno));
    if (fseek(f, 0, SEEK_END) != 0 || (sz = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return msx__err(MSX_E_IO, "%s: cannot determine the file size (not a regular file?)", path);
    }
    if ((unsigned long)sz > max_bytes) {
        fclose(f);
        return msx__err(MSX_E_LIMIT, "%s: %ld bytes exceeds the limit of %lu bytes", path, sz, (unsigned long)max_bytes);
    }
    buf = (unsigned char *)MSX_MALLOC((size_t)sz + 1);
    if (!buf) { fclose(f); return msx__err(MSX_E_NOMEM, "%s: cannot allocate %ld bytes", path, sz); }
    if (sz && fread(buf, 1, (size_t)sz, f) != (size_t)sz) {
        fclose(f);
        MSX_FREE(buf);
        return msx__err(MSX_E_IO, "%s: short read", path);
    }
    fclose(f);
    buf[sz] = 0; /* convenient for text */
    *data = buf;
    *len = (size_t)sz;
    return MSX_OK;
}

MSXDEF msx_result msx_write_file_atomic(const char *path, const void *data, size_t len) {
    size_t n = strlen(path);
    char *tmp = (char *)MSX_MALLOC(n + 32);
    int fd;
    const unsigned char *p = (const unsigned char *)data;
    size_t left = len;
    if (!tmp) return msx__err(MSX_E_NOMEM, "out of memory");
    snprintf(tmp, n + 32, "%s.tmp.%ld", path, (long)getpid());
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        msx_result r = msx__err(MSX_E_IO, "%s: cannot create temporary file %s (%s)", path, tmp, strerror(errno));
        MSX_FREE(tmp);
        return r;
    }
    while (left) {
        ssize_t w = write(fd, p, left);
        if (w < 0) {
            if (errno == EINTR) continue;
            close(fd);
            unlink(tmp);
            MSX_FREE(tmp);
            return msx__err(MSX_E_IO, "%s: write failed (%s)", path, strerror(errno));
        }
        p += w;
        left -= (size_t)w;
    }
    if (fsync(fd) != 0 || close(fd) != 0 || rename(tmp, path) != 0) {
        msx_result r = msx__err(MSX_E_IO, "%s: cannot finish writing (%s)", path, strerror(errno));
        unlink(tmp);
        MSX_FREE(tmp);
        return r;
    }
    MSX_FREE(tmp);
    return MSX_OK;
}

/* ---- dtypes and half-precision conversion ---------------------------------- */

static const char *const msx__dtype_names[MSX_DTYPE_COUNT] = {"F32", "F16", "BF16", "F64", "I64",
                                                              "I32", "I16", "I8", "U8", "BOOL"};
static const size_t msx__dtype_sizes[MSX_DTYPE_COUNT] = {4, 2, 2, 8, 8, 4, 2, 1, 1, 1};

MSXDEF const char *msx_dtype_name(msx_dtype t) { return (unsigned)t < MSX_DTYPE_COUNT ? msx__dtype_names[t] : "?"; }
MSXDEF size_t msx_dtype_size(msx_dtype t) { return (unsigned)t < MSX_DTYPE_COUNT ? msx__dtype_sizes[t] : 0; }

static float msx__f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    float f;
    if (exp == 0) {
        f = ldexpf((float)man, -24); /* zero or subnormal: exact */
        return sign ? -f : f;
    }
    if (exp == 31) bits = sign | 0x7F800000u | (man << 13);
    else bits = sign | ((exp + 112) << 23) | (man << 13);
    memcpy(&f, &bits, 4);
    return f;
}
static float msx__bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
/* Round-to-nearest-even float -> bf16 (NaN kept quiet). */
static MSX__UNUSED uint16_t msx__f32_to_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((b >> 16) | 0x40);
    b += 0x7FFFu + ((b >> 16) & 1);
    return (uint16_t)(b >> 16);
}

static double msx__elem_as_double(const void *data, msx_dtype t, int64_t i) {
    const unsigned char *p = (const unsigned char *)data;
    switch (t) {
    case MSX_F32: { float v; memcpy(&v, p + 4 * i, 4); return v; }
    case MSX_F64: { double v; memcpy(&v, p + 8 * i, 8); return v; }
    case MSX_F16: { uint16_t v; memcpy(&v, p + 2 * i, 2); return msx__f16_to_f32(v); }
    case MSX_BF16: { uint16_t v; memcpy(&v, p + 2 * i, 2); return msx__bf16_to_f32(v); }
    case MSX_I64: { int64_t v; memcpy(&v, p + 8 * i, 8); return (double)v; }
    case MSX_I32: { int32_t v; memcpy(&v, p + 4 * i, 4); return v; }
    case MSX_I16: { int16_t v; memcpy(&v, p + 2 * i, 2); return v; }
    case MSX_I8: return (signed char)p[i];
    case MSX_U8: case MSX_BOOL: return p[i];
    default: return 0;
    }
}

MSXDEF void msx_tensor_sums(const msx_tensor *t, double *sum, double *abs_sum) {
    double s = 0, a = 0;
    int64_t i;
    for (i = 0; i < t->numel; i++) {
        double v = msx__elem_as_double(t->data, t->dtype, i);
        s += v;
        a += fabs(v);
    }
    *sum = s;
    *abs_sum = a;
}

/* ---- the tensor table -------------------------------------------------------- */

static uint32_t msx__hash(const char *s) {
    uint32_t h = 2166136261u; /* FNV-1a */
    while (*s) { h ^= (unsigned char)*s++; h *= 16777619u; }
    return h;
}

MSXDEF msx_checkpoint *msx_ckpt_new(void) {
    return (msx_checkpoint *)msx__calloc(1, sizeof(msx_checkpoint));
}

MSXDEF void msx_ckpt_free(msx_checkpoint *c) {
    int i;
    if (!c) return;
    for (i = 0; i < c->n; i++) {
        MSX_FREE(c->tensors[i].name);
        msx__aligned_free(c->tensors[i].data);
    }
    MSX_FREE(c->tensors);
    MSX_FREE(c->index);
    MSX_FREE(c->path);
    MSX_FREE(c->metadata_json);
    MSX_FREE(c);
}

static int msx__ckpt_reindex(msx_checkpoint *c) {
    int cap = 16, i;
    while (cap < 2 * c->n + 2) cap *= 2;
    if (cap != c->index_cap) {
        int *idx = (int *)MSX_REALLOC(c->index, (size_t)cap * sizeof(int));
        if (!idx) return 0;
        c->index = idx;
        c->index_cap = cap;
    }
    for (i = 0; i < cap; i++) c->index[i] = -1;
    for (i = 0; i < c->n; i++) {
        uint32_t h = msx__hash(c->tensors[i].name) & (uint32_t)(cap - 1);
        while (c->index[h] >= 0) h = (h + 1) & (uint32_t)(cap - 1);
        c->index[h] = i;
    }
    return 1;
}

MSXDEF msx_tensor *msx_ckpt_find(const msx_checkpoint *c, const char *name) {
    uint32_t h;
    if (!c || !c->index_cap) return NULL;
    h = msx__hash(name) & (uint32_t)(c->index_cap - 1);
    while (c->index[h] >= 0) {
        msx_tensor *t = &c->tensors[c->index[h]];
        if (!strcmp(t->name, name)) return t;
        h = (h + 1) & (uint32_t)(c->index_cap - 1);
    }
    return NULL;
}

/* Adds a tensor whose (aligned) data block is handed over, no copy. */
static msx_result msx__ckpt_add_owned(msx_checkpoint *c, const char *name, msx_dtype dtype, int ndim,
                                      const int64_t *shape, void *data, msx_tensor **out) {
    msx_tensor *t;
    int64_t numel = 1;
    int i;
    if (ndim < 0 || ndim > MSX_MAX_DIMS) return msx__err(MSX_E_SHAPE, "tensor '%s': %d dimensions (at most %d)", name, ndim, MSX_MAX_DIMS);
    for (i = 0; i < ndim; i++) {
        if (shape[i] < 0 || (shape[i] && numel > INT64_MAX / shape[i])) return msx__err(MSX_E_SHAPE, "tensor '%s': invalid dimension %lld", name, (long long)shape[i]);
        numel *= shape[i];
    }
    if (msx_ckpt_find(c, name)) return msx__err(MSX_E_KEY_MISMATCH, "duplicate tensor name '%s'", name);
    if (c->n >= MSX_MAX_TENSORS) return msx__err(MSX_E_LIMIT, "more than MSX_MAX_TENSORS (%d) tensors", MSX_MAX_TENSORS);
    if (c->n == c->cap) {
        int nc = c->cap ? c->cap * 2 : 64;
        msx_tensor *nt = (msx_tensor *)MSX_REALLOC(c->tensors, (size_t)nc * sizeof *nt);
        if (!nt) return msx__err(MSX_E_NOMEM, "out of memory");
        c->tensors = nt;
        c->cap = nc;
    }
    t = &c->tensors[c->n];
    memset(t, 0, sizeof *t);
    t->name = msx__strdup(name);
    if (!t->name) return msx__err(MSX_E_NOMEM, "out of memory");
    t->dtype = t->src_dtype = dtype;
    t->ndim = ndim;
    for (i = 0; i < ndim; i++) t->shape[i] = shape[i];
    t->numel = numel;
    t->data = data;
    c->n++;
    if (2 * c->n + 2 > c->index_cap) {
        if (!msx__ckpt_reindex(c)) { c->n--; MSX_FREE(t->name); return msx__err(MSX_E_NOMEM, "out of memory"); }
    } else {
        uint32_t h = msx__hash(name) & (uint32_t)(c->index_cap - 1);
        while (c->index[h] >= 0) h = (h + 1) & (uint32_t)(c->index_cap - 1);
        c->index[h] = c->n - 1;
    }
    if (out) *out = t;
    return MSX_OK;
}

MSXDEF msx_result msx_ckpt_add(msx_checkpoint *c, const char *name, msx_dtype dtype, int ndim,
                               const int64_t *shape, const void *data, msx_tensor **out) {
    int64_t numel = 1;
    int i;
    size_t bytes;
    void *buf;
    msx_result r;
    if ((unsigned)dtype >= MSX_DTYPE_COUNT) return msx__err(MSX_E_ARG, "tensor '%s': invalid dtype", name);
    if (ndim < 0 || ndim > MSX_MAX_DIMS) return msx__err(MSX_E_SHAPE, "tensor '%s': %d dimensions (at most %d)", name, ndim, MSX_MAX_DIMS);
    for (i = 0; i < ndim; i++) {
        if (shape[i] < 0 || (shape[i] && numel > (int64_t)(MSX_MAX_FILE_BYTES / 8) / shape[i]))
            return msx__err(MSX_E_SHAPE, "tensor '%s': invalid or too large dimension %lld", name, (long long)shape[i]);
        numel *= shape[i];
    }
    bytes = (size_t)numel * msx_dtype_size(dtype);
    buf = msx__aligned_alloc(bytes ? bytes : 1);
    if (!buf) return msx__err(MSX_E_NOMEM, "tensor '%s': cannot allocate %lu bytes", name, (unsigned long)bytes);
    if (data) memcpy(buf, data, bytes);
    else memset(buf, 0, bytes);
    r = msx__ckpt_add_owned(c, name, dtype, ndim, shape, buf, out);
    if (r != MSX_OK) msx__aligned_free(buf);
    return r;
}

MSXDEF msx_result msx_ckpt_clone(const msx_checkpoint *src, msx_checkpoint **out) {
    msx_checkpoint *c = msx_ckpt_new();
    int i;
    *out = NULL;
    if (!c) return msx__err(MSX_E_NOMEM, "out of memory");
    for (i = 0; i < src->n; i++) {
        const msx_tensor *t = &src->tensors[i];
        msx_tensor *nt;
        msx_result r = msx_ckpt_add(c, t->name, t->dtype, t->ndim, t->shape, t->data, &nt);
        if (r != MSX_OK) { msx_ckpt_free(c); return r; }
        nt->src_dtype = t->src_dtype;
    }
    if (src->path) c->path = msx__strdup(src->path);
    if (src->metadata_json) c->metadata_json = msx__strdup(src->metadata_json);
    *out = c;
    return MSX_OK;
}

MSXDEF msx_result msx_ckpt_rename(msx_checkpoint *c, int i, const char *new_name) {
    char *nn;
    msx_tensor *other;
    if (i < 0 || i >= c->n) return msx__err(MSX_E_ARG, "rename: index %d out of range", i);
    other = msx_ckpt_find(c, new_name);
    if (other && other != &c->tensors[i]) return msx__err(MSX_E_KEY_MISMATCH, "renaming '%s' to '%s' creates a duplicate name", c->tensors[i].name, new_name);
    nn = msx__strdup(new_name);
    if (!nn) return msx__err(MSX_E_NOMEM, "out of memory");
    MSX_FREE(c->tensors[i].name);
    c->tensors[i].name = nn;
    if (!msx__ckpt_reindex(c)) return msx__err(MSX_E_NOMEM, "out of memory");
    return MSX_OK;
}

MSXDEF void msx_ckpt_filter(msx_checkpoint *c, const unsigned char *keep) {
    int i, j = 0;
    for (i = 0; i < c->n; i++) {
        if (keep[i]) c->tensors[j++] = c->tensors[i];
        else { MSX_FREE(c->tensors[i].name); msx__aligned_free(c->tensors[i].data); }
    }
    c->n = j;
    msx__ckpt_reindex(c); /* shrinking never needs more memory than we have */
}

MSXDEF msx_result msx_ckpt_to_f32(msx_checkpoint *c) {
    int i;
    for (i = 0; i < c->n; i++) {
        msx_tensor *t = &c->tensors[i];
        float *f;
        int64_t k;
        if (t->dtype == MSX_F32 || !(t->dtype == MSX_F16 || t->dtype == MSX_BF16 || t->dtype == MSX_F64)) continue;
        f = (float *)msx__aligned_alloc((size_t)t->numel * 4 + 1);
        if (!f) return msx__err(MSX_E_NOMEM, "tensor '%s': out of memory converting to float32", t->name);
        for (k = 0; k < t->numel; k++) f[k] = (float)msx__elem_as_double(t->data, t->dtype, k);
        msx__aligned_free(t->data);
        t->data = f;
        t->dtype = MSX_F32;
    }
    return MSX_OK;
}

/* ---- safetensors ------------------------------------------------------------ */
/* Layout: u64 LE header length N, N bytes of JSON {name: {dtype, shape,
   data_offsets:[begin,end]}, "__metadata__": {str: str}}, then the data. */

static int msx__dtype_from_name(const char *s, msx_dtype *t) {
    int i;
    for (i = 0; i < MSX_DTYPE_COUNT; i++)
        if (!strcmp(s, msx__dtype_names[i])) { *t = (msx_dtype)i; return 1; }
    return 0;
}

/* 1 when x is a non-negative integer-valued number below 2^53. */
static int msx__json_is_index(const msx__json *v) {
    return v && v->type == MSX__JNUM && v->num >= 0 && v->num <= 9007199254740992.0 && floor(v->num) == v->num;
}

MSXDEF msx_result msx_safetensors_load_mem(const void *buf, size_t len, const char *what, msx_checkpoint **out) {
    const unsigned char *b = (const unsigned char *)buf;
    uint64_t hlen = 0;
    msx__json *h;
    msx_checkpoint *c;
    size_t data_len;
    int i, k;
    msx_result r = MSX_OK;
    *out = NULL;
    if (len < 8) return msx__err(MSX_E_FORMAT, "%s: %lu bytes is too short for a safetensors file (needs an 8-byte header length)", what, (unsigned long)len);
    for (k = 7; k >= 0; k--) hlen = (hlen << 8) | b[k];
    if (hlen > len - 8) return msx__err(MSX_E_FORMAT, "%s: header length %llu at offset 0 exceeds the file size %lu (truncated file?)", what, (unsigned long long)hlen, (unsigned long)len);
    if (hlen > MSX_MAX_JSON_BYTES) return msx__err(MSX_E_LIMIT, "%s: safetensors header of %llu bytes is larger than MSX_MAX_JSON_BYTES", what, (unsigned long long)hlen);
    h = msx__json_parse((const char *)b + 8, (size_t)hlen, what);
    if (!h) return msx__errcode;
    if (h->type != MSX__JOBJ) { msx__json_free(h); return msx__err(MSX_E_FORMAT, "%s: safetensors header is not a JSON object", what); }
    data_len = len - 8 - (size_t)hlen;
    c = msx_ckpt_new();
    if (!c) { msx__json_free(h); return msx__err(MSX_E_NOMEM, "out of memory"); }
    for (i = 0; i < h->n && r == MSX_OK; i++) {
        const char *name = h->keys[i];
        const msx__json *e = &h->kids[i], *dt, *sh, *off;
        msx_dtype dtype;
        int64_t shape[MSX_MAX_DIMS], numel = 1;
        uint64_t beg, end;
        msx_tensor *t;
        if (!strcmp(name, "__metadata__")) {
            msx__sb sb = {0, 0, 0, 0};
            if (e->type != MSX__JOBJ) { r = msx__err(MSX_E_FORMAT, "%s: __metadata__ is not an object", what); break; }
            msx__sb_puts(&sb, "{");
            for (k = 0; k < e->n; k++) {
                if (e->kids[k].type != MSX__JSTR) continue; /* spec: str -> str; ignore the rest */
                if (sb.n > 1) msx__sb_puts(&sb, ",");
                msx__sb_json_str(&sb, e->keys[k]);
                msx__sb_puts(&sb, ":");
                msx__sb_json_str(&sb, e->kids[k].str);
            }
            msx__sb_puts(&sb, "}");
            if (sb.oom) { msx__sb_free(&sb); r = msx__err(MSX_E_NOMEM, "out of memory"); break; }
            MSX_FREE(c->metadata_json);
            c->metadata_json = sb.s;
            continue;
        }
        dt = msx__json_get(e, "dtype");
        sh = msx__json_get(e, "shape");
        off = msx__json_get(e, "data_offsets");
        if (!dt || dt->type != MSX__JSTR || !msx__dtype_from_name(dt->str, &dtype)) { r = msx__err(MSX_E_FORMAT, "%s: tensor '%s' has a missing or unknown dtype", what, name); break; }
        if (!sh || sh->type != MSX__JARR || sh->n > MSX_MAX_DIMS) { r = msx__err(MSX_E_FORMAT, "%s: tensor '%s' has a missing shape or more than %d dimensions", what, name, MSX_MAX_DIMS); break; }
        if (!off || off->type != MSX__JARR || off->n != 2 || !msx__json_is_index(&off->kids[0]) || !msx__json_is_index(&off->kids[1])) { r = msx__err(MSX_E_FORMAT, "%s: tensor '%s' has invalid data_offsets", what, name); break; }
        for (k = 0; k < sh->n; k++) {
            if (!msx__json_is_index(&sh->kids[k])) { r = msx__err(MSX_E_FORMAT, "%s: tensor '%s' has an invalid dimension (negative, fractional, NaN or not a number)", what, name); break; }
            shape[k] = (int64_t)sh->kids[k].num;
            if (shape[k] && numel > (int64_t)data_len / shape[k] + 1) { r = msx__err(MSX_E_FORMAT, "%s: tensor '%s' is larger than the file", what, name); break; }
            numel *= shape[k];
        }
        if (r != MSX_OK) break;
        beg = (uint64_t)off->kids[0].num;
        end = (uint64_t)off->kids[1].num;
        if (end < beg || end > data_len) { r = msx__err(MSX_E_FORMAT, "%s: tensor '%s' data_offsets [%llu, %llu] lie outside the %lu data bytes (truncated file?)", what, name, (unsigned long long)beg, (unsigned long long)end, (unsigned long)data_len); break; }
        if (end - beg != (uint64_t)numel * msx_dtype_size(dtype)) { r = msx__err(MSX_E_FORMAT, "%s: tensor '%s' has %llu data bytes but shape and dtype need %llu", what, name, (unsigned long long)(end - beg), (unsigned long long)numel * msx_dtype_size(dtype)); break; }
        r = msx_ckpt_add(c, name, dtype, sh->n, shape, b + 8 + hlen + beg, &t);
        if (r == MSX_E_KEY_MISMATCH) r = msx__err(MSX_E_KEY_MISMATCH, "%s: duplicate tensor name '%s' in the header", what, name);
    }
    msx__json_free(h);
    if (r != MSX_OK) { msx_ckpt_free(c); return r; }
    *out = c;
    return MSX_OK;
}

MSXDEF msx_result msx_safetensors_load(const char *path, msx_checkpoint **out) {
    int fd;
    struct stat st;
    void *map;
    msx_result r;
    *out = NULL;
    fd = open(path, O_RDONLY);
    if (fd < 0) return msx__err(MSX_E_IO, "%s: cannot open (%s)", path, strerror(errno));
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) { close(fd); return msx__err(MSX_E_IO, "%s: not a regular file", path); }
    if ((size_t)st.st_size > MSX_MAX_FILE_BYTES) { close(fd); return msx__err(MSX_E_LIMIT, "%s: larger than MSX_MAX_FILE_BYTES", path); }
    if (st.st_size == 0) { close(fd); return msx__err(MSX_E_FORMAT, "%s: empty file", path); }
    /* Memory-mapped: only the pages of the header and the tensors are read. */
    map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return msx__err(MSX_E_IO, "%s: mmap failed (%s)", path, strerror(errno));
    r = msx_safetensors_load_mem(map, (size_t)st.st_size, path, out);
    munmap(map, (size_t)st.st_size);
    if (r == MSX_OK) (*out)->path = msx__strdup(path);
    return r;
}

MSXDEF msx_result msx_safetensors_save(const char *path, const msx_checkpoint *c, const char *const *metadata, int n_meta) {
    msx__sb h = {0, 0, 0, 0};
    uint64_t off = 0, hlen;
    unsigned char *file;
    size_t total;
    int i, k;
    msx_result r;
    msx__sb_puts(&h, "{");
    if (n_meta > 0) {
        msx__sb_puts(&h, "\"__metadata__\":{");
        for (k = 0; k < n_meta; k++) {
            if (k) msx__sb_puts(&h, ",");
            msx__sb_json_str(&h, metadata[2 * k]);
            msx__sb_puts(&h, ":");
            msx__sb_json_str(&h, metadata[2 * k + 1]);
        }
        msx__sb_puts(&h, "}");
    }
    for (i = 0; i < c->n; i++) {
        const msx_tensor *t = &c->tensors[i];
        uint64_t bytes = (uint64_t)t->numel * msx_dtype_size(t->dtype);
        if (i || n_meta > 0) msx__sb_puts(&h, ",");
        msx__sb_json_str(&h, t->name);
        msx__sb_printf(&h, ":{\"dtype\":\"%s\",\"shape\":[", msx_dtype_name(t->dtype));
        for (k = 0; k < t->ndim; k++) msx__sb_printf(&h, k ? ",%lld" : "%lld", (long long)t->shape[k]);
        msx__sb_printf(&h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off, (unsigned long long)(off + bytes));
        off += bytes;
    }
    msx__sb_puts(&h, "}");
    while (h.n % 8) msx__sb_puts(&h, " "); /* data starts 8-byte aligned */
    if (h.oom) { msx__sb_free(&h); return msx__err(MSX_E_NOMEM, "out of memory"); }
    hlen = h.n;
    total = 8 + (size_t)hlen + (size_t)off;
    file = (unsigned char *)MSX_MALLOC(total);
    if (!file) { msx__sb_free(&h); return msx__err(MSX_E_NOMEM, "%s: cannot allocate %lu bytes", path, (unsigned long)total); }
    for (k = 0; k < 8; k++) file[k] = (unsigned char)(hlen >> (8 * k));
    memcpy(file + 8, h.s, (size_t)hlen);
    off = 8 + hlen;
    for (i = 0; i < c->n; i++) {
        const msx_tensor *t = &c->tensors[i];
        size_t bytes = (size_t)t->numel * msx_dtype_size(t->dtype);
        if (bytes) memcpy(file + off, t->data, bytes);
        off += bytes;
    }
    msx__sb_free(&h);
    r = msx_write_file_atomic(path, file, total);
    MSX_FREE(file);
    return r;
}

/* ---- RNG and time ------------------------------------------------------------ */

static uint64_t msx__splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
MSXDEF void msx_rng_seed(msx_rng *r, uint64_t seed) {
    int i;
    for (i = 0; i < 4; i++) r->s[i] = msx__splitmix(&seed);
}
static uint64_t msx__rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
MSXDEF uint64_t msx_rng_u64(msx_rng *r) {
    uint64_t *s = r->s, res = msx__rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t; s[3] = msx__rotl(s[3], 45);
    return res;
}
MSXDEF double msx_rng_uniform(msx_rng *r) { return (double)(msx_rng_u64(r) >> 11) * (1.0 / 9007199254740992.0); }
MSXDEF double msx_rng_normal(msx_rng *r) {
    double u1 = msx_rng_uniform(r), u2 = msx_rng_uniform(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}
MSXDEF uint64_t msx_rng_below(msx_rng *r, uint64_t n) {
    uint64_t lim, x;
    if (n <= 1) return 0;
    lim = UINT64_MAX - UINT64_MAX % n;
    do x = msx_rng_u64(r); while (x >= lim);
    return x % n;
}
MSXDEF double msx_time_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
