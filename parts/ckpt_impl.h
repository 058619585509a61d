/* ======================================================================== */
/* IMPLEMENTATION: ckpt. Owns reading checkpoints: the torch.save zip        */
/* container, a safe pickle-subset interpreter, format sniffing, wrapper and */
/* prefix handling, and the SAM architecture (inference from shapes, JSON    */
/* override, key/shape validation, canonical order). Formats and the safe    */
/* pickle subset follow docs/ecosystem-and-style.md section B5.              */
/* ======================================================================== */

#ifndef MSX_MAX_PICKLE_BYTES
#define MSX_MAX_PICKLE_BYTES ((size_t)256 << 20) /* data.pkl of ViT-H is ~100 KB */
#endif
#ifndef MSX_MAX_PICKLE_OBJECTS
#define MSX_MAX_PICKLE_OBJECTS (1 << 22) /* ViT-H state dict: ~20k values */
#endif
#ifndef MSX_MAX_PICKLE_MEMO
#define MSX_MAX_PICKLE_MEMO (1 << 22)
#endif
#ifndef MSX_MAX_ZIP_ENTRIES
#define MSX_MAX_ZIP_ENTRIES 1000000
#endif

static uint32_t msx__ck_rd16(const unsigned char *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }
static uint32_t msx__ck_rd32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static uint64_t msx__ck_rd64(const unsigned char *p) {
    return (uint64_t)msx__ck_rd32(p) | ((uint64_t)msx__ck_rd32(p + 4) << 32);
}

MSXDEF const char *msx_dtype_torch_name(msx_dtype t) {
    static const char *const names[MSX_DTYPE_COUNT] = {"float32", "float16", "bfloat16", "float64", "int64",
                                                       "int32", "int16", "int8", "uint8", "bool"};
    return (unsigned)t < MSX_DTYPE_COUNT ? names[t] : "?";
}

/* ---- zip container (stored entries, zip64) ---------------------------------- */
/* torch's PyTorchStreamWriter writes every entry uncompressed and 64-byte
   aligned, so the data of an entry is a slice of the file (B5). */

typedef struct msx__zent {
    const char *name;
    size_t name_len, off, size;
    uint32_t crc;
    int crc_ok; /* 1 once the data was checked against crc */
} msx__zent;

/* CRC-32 (zip polynomial), slicing by 8. The 8 KB table is built per call:
   no shared state, and the cost is nothing next to a storage's bytes. */
static MSX__UNUSED uint32_t msx__ck_crc32(const unsigned char *p, size_t n) {
    uint32_t t[8][256], c, lo, hi;
    int i, k;
    for (i = 0; i < 256; i++) {
        c = (uint32_t)i;
        for (k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        t[0][i] = c;
    }
    for (i = 0; i < 256; i++)
        for (k = 1; k < 8; k++) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 255];
    c = 0xFFFFFFFFu;
    for (; n >= 8; n -= 8, p += 8) {
        lo = c ^ ((uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24));
        hi = (uint32_t)p[4] | ((uint32_t)p[5] << 8) | ((uint32_t)p[6] << 16) | ((uint32_t)p[7] << 24);
        c = t[7][lo & 255] ^ t[6][(lo >> 8) & 255] ^ t[5][(lo >> 16) & 255] ^ t[4][lo >> 24] ^
            t[3][hi & 255] ^ t[2][(hi >> 8) & 255] ^ t[1][(hi >> 16) & 255] ^ t[0][hi >> 24];
    }
    while (n--) c = t[0][(c ^ *p++) & 255] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

typedef struct msx__zip {
    const unsigned char *buf;
    size_t len;
    msx__zent *e;
    int n;
    const char *what;
} msx__zip;

static void msx__zip_close(msx__zip *z) { MSX_FREE(z->e); z->e = NULL; z->n = 0; }

static msx_result msx__zip_open(const unsigned char *b, size_t len, const char *what, msx__zip *z) {
    size_t eocd = 0, i, lim, p, cd_end;
    uint64_t n, cd_size, cd_off;
    int found = 0;
    uint64_t k;
    memset(z, 0, sizeof *z);
    z->buf = b;
    z->len = len;
    z->what = what;
    if (len < 22) return msx__err(MSX_E_FORMAT, "%s: %lu bytes is too short for a zip archive (truncated file?)", what, (unsigned long)len);
    /* End of central directory: 22 bytes + a comment of at most 65535. */
    lim = len > 22 + 65535 ? len - 22 - 65535 : 0;
    for (i = len - 22;; i--) {
        if (msx__ck_rd32(b + i) == 0x06054b50u && i + 22 + msx__ck_rd16(b + i + 20) <= len) { eocd = i; found = 1; break; }
        if (i == lim) break;
    }
    if (!found) return msx__err(MSX_E_FORMAT, "%s: zip end-of-central-directory record not found (truncated or corrupt file)", what);
    n = msx__ck_rd16(b + eocd + 10);
    cd_size = msx__ck_rd32(b + eocd + 12);
    cd_off = msx__ck_rd32(b + eocd + 16);
    if (n == 0xFFFF || cd_size == 0xFFFFFFFFu || cd_off == 0xFFFFFFFFu) {
        uint64_t z64;
        if (eocd < 20 || msx__ck_rd32(b + eocd - 20) != 0x07064b50u)
            return msx__err(MSX_E_FORMAT, "%s: zip64 locator missing before offset %lu", what, (unsigned long)eocd);
        z64 = msx__ck_rd64(b + eocd - 20 + 8);
        if (z64 > len || len - z64 < 56 || msx__ck_rd32(b + z64) != 0x06064b50u)
            return msx__err(MSX_E_FORMAT, "%s: zip64 end record at offset %llu is invalid", what, (unsigned long long)z64);
        n = msx__ck_rd64(b + z64 + 32);
        cd_size = msx__ck_rd64(b + z64 + 40);
        cd_off = msx__ck_rd64(b + z64 + 48);
    }
    if (cd_off > len || cd_size > len - cd_off)
        return msx__err(MSX_E_FORMAT, "%s: zip central directory (offset %llu, %llu bytes) lies outside the %lu-byte file (truncated?)", what, (unsigned long long)cd_off, (unsigned long long)cd_size, (unsigned long)len);
    if (n > cd_size / 46 || n > MSX_MAX_ZIP_ENTRIES)
        return msx__err(MSX_E_FORMAT, "%s: zip claims %llu entries in a %llu-byte central directory", what, (unsigned long long)n, (unsigned long long)cd_size);
    z->e = (msx__zent *)msx__calloc((size_t)n + 1, sizeof *z->e);
    if (!z->e) return msx__err(MSX_E_NOMEM, "out of memory");
    p = (size_t)cd_off;
    cd_end = (size_t)(cd_off + cd_size);
    for (k = 0; k < n; k++) {
        uint32_t method, nlen, xlen, clen, lnlen, lxlen;
        uint64_t csize, usize, lho, data;
        size_t x, xend;
        msx__zent *e = &z->e[z->n];
        if (cd_end - p < 46 || msx__ck_rd32(b + p) != 0x02014b50u) {
            msx__zip_close(z);
            return msx__err(MSX_E_FORMAT, "%s: corrupt zip central directory at offset %lu (entry %llu)", what, (unsigned long)p, (unsigned long long)k);
        }
        method = msx__ck_rd16(b + p + 10);
        e->crc = msx__ck_rd32(b + p + 16);
        csize = msx__ck_rd32(b + p + 20);
        usize = msx__ck_rd32(b + p + 24);
        nlen = msx__ck_rd16(b + p + 28);
        xlen = msx__ck_rd16(b + p + 30);
        clen = msx__ck_rd16(b + p + 32);
        lho = msx__ck_rd32(b + p + 42);
        if (cd_end - p - 46 < (size_t)nlen + xlen + clen) {
            msx__zip_close(z);
            return msx__err(MSX_E_FORMAT, "%s: zip entry %llu at offset %lu overruns the central directory", what, (unsigned long long)k, (unsigned long)p);
        }
        /* zip64 extra field (id 1): the 64-bit values of the saturated fields, in order. */
        x = p + 46 + nlen;
        xend = x + xlen;
        while (xend - x >= 4) {
            uint32_t id = msx__ck_rd16(b + x), sz = msx__ck_rd16(b + x + 2);
            size_t q = x + 4, qend;
            if (sz > xend - x - 4) break;
            qend = q + sz;
            if (id == 1) {
                if (usize == 0xFFFFFFFFu) { if (qend - q < 8) break; usize = msx__ck_rd64(b + q); q += 8; }
                if (csize == 0xFFFFFFFFu) { if (qend - q < 8) break; csize = msx__ck_rd64(b + q); q += 8; }
                if (lho == 0xFFFFFFFFu) { if (qend - q < 8) break; lho = msx__ck_rd64(b + q); q += 8; }
            }
            x = qend;
        }
        e->name = (const char *)b + p + 46;
        e->name_len = nlen;
        if (method != 0) {
            msx_result r = msx__err(MSX_E_UNSUPPORTED, "%s: zip entry '%.*s' is compressed (method %u); torch.save writes stored entries only", what, (int)nlen, e->name, (unsigned)method);
            msx__zip_close(z);
            return r;
        }
        if (csize != usize || lho > len || len - lho < 30 || msx__ck_rd32(b + lho) != 0x04034b50u) {
            msx_result r = msx__err(MSX_E_FORMAT, "%s: zip entry '%.*s': bad local header at offset %llu (corrupt or truncated file)", what, (int)nlen, e->name, (unsigned long long)lho);
            msx__zip_close(z);
            return r;
        }
        /* The data offset comes from the local header: its extra field holds
           torch's alignment padding. */
        lnlen = msx__ck_rd16(b + lho + 26);
        lxlen = msx__ck_rd16(b + lho + 28);
        data = lho + 30 + lnlen + lxlen;
        if (data > len || usize > len - data) {
            msx_result r = msx__err(MSX_E_FORMAT, "%s: zip entry '%.*s' (%llu bytes at offset %llu) extends past the end of the %lu-byte file (truncated?)", what, (int)nlen, e->name, (unsigned long long)usize, (unsigned long long)data, (unsigned long)len);
            msx__zip_close(z);
            return r;
        }
        e->off = (size_t)data;
        e->size = (size_t)usize;
        z->n++;
        p += 46 + (size_t)nlen + xlen + clen;
    }
    return MSX_OK;
}

/* Checks an entry's bytes against its CRC once (corrupt downloads are
   caught here; define MSX_NO_CRC_CHECK to skip). */
static msx_result msx__zip_verify(const msx__zip *z, msx__zent *e) {
#ifndef MSX_NO_CRC_CHECK
    if (!e->crc_ok) {
        uint32_t c = msx__ck_crc32(z->buf + e->off, e->size);
        if (c != e->crc)
            return msx__err(MSX_E_FORMAT, "%s: zip entry '%.*s' fails its CRC-32 check (stored %08x, computed %08x): the file is corrupt (re-download it?)",
                            z->what, (int)(e->name_len > 200 ? 200 : e->name_len), e->name, (unsigned)e->crc, (unsigned)c);
        e->crc_ok = 1;
    }
#else
    (void)z; (void)e;
#endif
    return MSX_OK;
}

static msx__zent *msx__zip_find(const msx__zip *z, const char *prefix, size_t plen, const char *name, size_t nlen) {
    int i;
    for (i = 0; i < z->n; i++) {
        msx__zent *e = &z->e[i];
        if (e->name_len == plen + nlen && !memcmp(e->name, prefix, plen) && !memcmp(e->name + plen, name, nlen)) return e;
    }
    return NULL;
}

/* ---- safe pickle subset ------------------------------------------------------ */
/* A stack machine over an arena of values. Nothing is ever called: globals
   become tags; REDUCE on a whitelisted tag builds a dict, storage or tensor
   record, on any other tag an inert opaque value. Memo entries are shared
   references (indices into the arena), never copies. */

enum {
    MSX__P_NONE, MSX__P_BOOL, MSX__P_INT, MSX__P_FLOAT, MSX__P_STR, MSX__P_BYTES, MSX__P_TUPLE,
    MSX__P_LIST, MSX__P_DICT, MSX__P_SET, MSX__P_GLOBAL, MSX__P_OPAQUE, MSX__P_STORAGE, MSX__P_TENSOR
};
enum { MSX__G_OTHER, MSX__G_ODICT, MSX__G_RTENSOR, MSX__G_RPARAM, MSX__G_RFROMTYPE, MSX__G_STORAGE };

#define MSX__PT_DIMS 8
typedef struct msx__pobj {
    unsigned char type, kind, dtype;
    int n, cap;
    int *kids;     /* tuple/list/set items; dict: key, value, key, value ... */
    int64_t i;     /* int, bool, storage numel, tensor side-table index */
    double f;
    const char *s, *s2; /* str bytes; global module / name; storage key */
    uint32_t len, len2;
} msx__pobj;

typedef struct msx__pten {
    int storage, ndim;
    int64_t offset, shape[MSX__PT_DIMS], stride[MSX__PT_DIMS];
} msx__pten;

typedef struct msx__pvm {
    const unsigned char *b;
    size_t len, pos, op_pos;
    const char *what;
    msx__pobj *o;
    int no, co;
    msx__pten *t;
    int nt, ct;
    int *st, ns, cs;    /* value stack */
    int *mk, nm, cm;    /* mark stack */
    int *memo, cmemo, nmemo;
    int result;
} msx__pvm;

static void msx__pvm_free(msx__pvm *v) {
    int i;
    for (i = 0; i < v->no; i++) MSX_FREE(v->o[i].kids);
    MSX_FREE(v->o);
    MSX_FREE(v->t);
    MSX_FREE(v->st);
    MSX_FREE(v->mk);
    MSX_FREE(v->memo);
    memset(v, 0, sizeof *v);
}

static msx_result msx__perr(msx__pvm *v, msx_result r, const char *msg) {
    return msx__err(r, "%s: pickle offset %lu: %s", v->what, (unsigned long)v->op_pos, msg);
}

/* Grows an int array; 0 on failure. */
static int msx__ck_growi(int **a, int *cap, int need) {
    if (need > *cap) {
        int nc = *cap ? *cap : 16;
        int *na;
        while (nc < need) { if (nc > INT_MAX / 2) return 0; nc *= 2; }
        na = (int *)MSX_REALLOC(*a, (size_t)nc * sizeof(int));
        if (!na) return 0;
        *a = na;
        *cap = nc;
    }
    return 1;
}

static int msx__pnew(msx__pvm *v, int type) {
    msx__pobj *o;
    if (v->no >= MSX_MAX_PICKLE_OBJECTS) { msx__perr(v, MSX_E_LIMIT, "more than MSX_MAX_PICKLE_OBJECTS values"); return -1; }
    if (v->no == v->co) {
        int nc = v->co ? v->co * 2 : 256;
        msx__pobj *no = (msx__pobj *)MSX_REALLOC(v->o, (size_t)nc * sizeof *no);
        if (!no) { msx__err(MSX_E_NOMEM, "out of memory in the pickle interpreter"); return -1; }
        v->o = no;
        v->co = nc;
    }
    o = &v->o[v->no];
    memset(o, 0, sizeof *o);
    o->type = (unsigned char)type;
    return v->no++;
}
static int msx__ppush(msx__pvm *v, int id) {
    if (id < 0) return 0;
    if (!msx__ck_growi(&v->st, &v->cs, v->ns + 1)) { msx__err(MSX_E_NOMEM, "out of memory"); return 0; }
    v->st[v->ns++] = id;
    return 1;
}
static int msx__ppushnew(msx__pvm *v, int type) { return msx__ppush(v, msx__pnew(v, type)); }
static int msx__pkid(msx__pvm *v, int parent, int kid) {
    msx__pobj *o = &v->o[parent];
    if (!msx__ck_growi(&o->kids, &o->cap, o->n + 1)) { msx__err(MSX_E_NOMEM, "out of memory"); return 0; }
    o->kids[o->n++] = kid;
    return 1;
}
/* Start of the items above the topmost mark, -1 if there is no mark. */
static int msx__pmark(msx__pvm *v) {
    if (!v->nm) { msx__perr(v, MSX_E_FORMAT, "opcode needs a MARK but there is none"); return -1; }
    return v->mk[--v->nm];
}
/* New container of `type` holding stack items [from, ns); pops them. */
static int msx__pcollect(msx__pvm *v, int type, int from) {
    int id = msx__pnew(v, type), i;
    if (id < 0) return 0;
    if (v->ns - from > 0) {
        msx__pobj *o = &v->o[id];
        o->kids = (int *)MSX_MALLOC((size_t)(v->ns - from) * sizeof(int));
        if (!o->kids) { msx__err(MSX_E_NOMEM, "out of memory"); return 0; }
        o->cap = v->ns - from;
        for (i = from; i < v->ns; i++) o->kids[o->n++] = v->st[i];
    }
    v->ns = from;
    return msx__ppush(v, id);
}

static int msx__ck_streq(const char *s, size_t n, const char *lit) { return strlen(lit) == n && !memcmp(s, lit, n); }

/* Whitelist of interpreted globals; modules that can run code are refused
   outright, like torch's weights-only unpickler does. */
static int msx__pglobal_kind(const char *m, size_t ml, const char *nm, size_t nl, unsigned char *dtype) {
    static const char *const storages[][2] = {
        {"FloatStorage", "0"}, {"HalfStorage", "1"}, {"BFloat16Storage", "2"}, {"DoubleStorage", "3"},
        {"LongStorage", "4"}, {"IntStorage", "5"}, {"ShortStorage", "6"}, {"CharStorage", "7"},
        {"ByteStorage", "8"}, {"BoolStorage", "9"}};
    size_t i;
    if (msx__ck_streq(m, ml, "collections") && msx__ck_streq(nm, nl, "OrderedDict")) return MSX__G_ODICT;
    if (msx__ck_streq(m, ml, "torch._utils") && msx__ck_streq(nm, nl, "_rebuild_tensor_v2")) return MSX__G_RTENSOR;
    if (msx__ck_streq(m, ml, "torch._utils") && (msx__ck_streq(nm, nl, "_rebuild_parameter") || msx__ck_streq(nm, nl, "_rebuild_parameter_with_state"))) return MSX__G_RPARAM;
    if (msx__ck_streq(m, ml, "torch._tensor") && msx__ck_streq(nm, nl, "_rebuild_from_type_v2")) return MSX__G_RFROMTYPE;
    if (msx__ck_streq(m, ml, "torch"))
        for (i = 0; i < sizeof storages / sizeof storages[0]; i++)
            if (msx__ck_streq(nm, nl, storages[i][0])) { *dtype = (unsigned char)(storages[i][1][0] - '0'); return MSX__G_STORAGE; }
    return MSX__G_OTHER;
}
static int msx__pglobal_blocked(const char *m, size_t ml) {
    static const char *const bad[] = {"os", "posix", "nt", "sys", "subprocess", "builtins", "__builtin__", "shutil",
                                      "socket", "pty", "runpy", "importlib", "code", "commands", "webbrowser",
                                      "pickle", "_pickle", "marshal", "ctypes", "multiprocessing", "signal",
                                      "io", "platform", "asyncio", "threading", "types", "operator", "functools"};
    size_t i, n;
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        n = strlen(bad[i]);
        if (ml >= n && !memcmp(m, bad[i], n) && (ml == n || m[n] == '.')) return 1;
    }
    return 0;
}

static int msx__pglobal(msx__pvm *v, const char *m, size_t ml, const char *nm, size_t nl) {
    int id;
    msx__pobj *o;
    unsigned char dt = 0;
    if (msx__pglobal_blocked(m, ml)) {
        msx__err(MSX_E_UNSAFE, "%s: pickle offset %lu: refusing global '%.*s.%.*s' (it can run code); a checkpoint "
                 "only needs tensors - this file is not loaded", v->what, (unsigned long)v->op_pos,
                 (int)(ml > 100 ? 100 : ml), m, (int)(nl > 100 ? 100 : nl), nm);
        return 0;
    }
    id = msx__pnew(v, MSX__P_GLOBAL);
    if (id < 0) return 0;
    o = &v->o[id];
    o->kind = (unsigned char)msx__pglobal_kind(m, ml, nm, nl, &dt);
    o->dtype = dt;
    o->s = m;
    o->len = (uint32_t)ml;
    o->s2 = nm;
    o->len2 = (uint32_t)nl;
    return msx__ppush(v, id);
}

static int msx__pint_of(const msx__pvm *v, int id, int64_t *out) {
    const msx__pobj *o = &v->o[id];
    if (o->type != MSX__P_INT && o->type != MSX__P_BOOL) return 0;
    *out = o->i;
    return 1;
}

/* _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks[, metadata]) */
static int msx__prebuild_tensor(msx__pvm *v, int args) {
    const msx__pobj *a = &v->o[args];
    const msx__pobj *sz, *sd;
    msx__pten *t;
    int id, k;
    int64_t off;
    if (a->type != MSX__P_TUPLE || a->n < 4 || v->o[a->kids[0]].type != MSX__P_STORAGE || !msx__pint_of(v, a->kids[1], &off) ||
        v->o[a->kids[2]].type != MSX__P_TUPLE || v->o[a->kids[3]].type != MSX__P_TUPLE) {
        msx__perr(v, MSX_E_FORMAT, "malformed _rebuild_tensor_v2 arguments (expected storage, offset, size, stride)");
        return 0;
    }
    sz = &v->o[a->kids[2]];
    sd = &v->o[a->kids[3]];
    if (sz->n != sd->n || sz->n > MSX__PT_DIMS || off < 0) {
        msx__perr(v, MSX_E_FORMAT, "tensor record with a negative offset, too many dimensions or size/stride of different lengths");
        return 0;
    }
    if (v->nt == v->ct) {
        int nc = v->ct ? v->ct * 2 : 64;
        msx__pten *nt = (msx__pten *)MSX_REALLOC(v->t, (size_t)nc * sizeof *nt);
        if (!nt) { msx__err(MSX_E_NOMEM, "out of memory"); return 0; }
        v->t = nt;
        v->ct = nc;
    }
    t = &v->t[v->nt];
    memset(t, 0, sizeof *t);
    t->storage = a->kids[0];
    t->offset = off;
    t->ndim = sz->n;
    for (k = 0; k < sz->n; k++) {
        if (!msx__pint_of(v, sz->kids[k], &t->shape[k]) || !msx__pint_of(v, sd->kids[k], &t->stride[k]) || t->shape[k] < 0 || t->stride[k] < 0) {
            msx__perr(v, MSX_E_FORMAT, "tensor size/stride entries must be non-negative integers");
            return 0;
        }
    }
    id = msx__pnew(v, MSX__P_TENSOR);
    if (id < 0) return 0;
    v->o[id].i = v->nt++;
    return msx__ppush(v, id);
}

/* REDUCE / NEWOBJ: callable(args) without calling anything. */
static int msx__preduce(msx__pvm *v, int fn, int args, int depth) {
    const msx__pobj *f = &v->o[fn];
    const msx__pobj *a = &v->o[args];
    int id;
    if (f->type == MSX__P_GLOBAL) {
        switch (f->kind) {
        case MSX__G_ODICT: return msx__ppushnew(v, MSX__P_DICT);
        case MSX__G_RTENSOR: return msx__prebuild_tensor(v, args);
        case MSX__G_RPARAM:
            if (a->type == MSX__P_TUPLE && a->n >= 1 && v->o[a->kids[0]].type == MSX__P_TENSOR) return msx__ppush(v, a->kids[0]);
            break;
        case MSX__G_RFROMTYPE: /* (func, type, args, state): apply func to args */
            if (a->type == MSX__P_TUPLE && a->n >= 3 && depth < 4 && v->o[a->kids[2]].type == MSX__P_TUPLE)
                return msx__preduce(v, a->kids[0], a->kids[2], depth + 1);
            break;
        default: break;
        }
    }
    /* Anything else is inert: it keeps the global's name for messages. */
    id = msx__pnew(v, MSX__P_OPAQUE);
    if (id < 0) return 0;
    if (v->o[fn].type == MSX__P_GLOBAL || v->o[fn].type == MSX__P_OPAQUE) {
        v->o[id].s = v->o[fn].s;
        v->o[id].len = v->o[fn].len;
        v->o[id].s2 = v->o[fn].s2;
        v->o[id].len2 = v->o[fn].len2;
    }
    return msx__ppush(v, id);
}

/* BINPERSID ('storage', StorageType, key, location, numel[, view_metadata]) */
static int msx__ppersid(msx__pvm *v, int pid) {
    const msx__pobj *p = &v->o[pid];
    const msx__pobj *ty, *key;
    int64_t numel;
    int id;
    if (p->type != MSX__P_TUPLE || p->n < 5 || v->o[p->kids[0]].type != MSX__P_STR || !msx__ck_streq(v->o[p->kids[0]].s, v->o[p->kids[0]].len, "storage")) {
        msx__perr(v, MSX_E_FORMAT, "unsupported persistent id (expected a ('storage', type, key, location, numel) tuple)");
        return 0;
    }
    ty = &v->o[p->kids[1]];
    key = &v->o[p->kids[2]];
    if (ty->type != MSX__P_GLOBAL || ty->kind != MSX__G_STORAGE) {
        msx__perr(v, MSX_E_UNSUPPORTED, "storage of an unsupported type (known: Float, Half, BFloat16, Double, Long, Int, Short, Char, Byte, Bool)");
        return 0;
    }
    if (key->type != MSX__P_STR || !msx__pint_of(v, p->kids[4], &numel) || numel < 0) {
        msx__perr(v, MSX_E_FORMAT, "storage record with a non-string key or an invalid element count");
        return 0;
    }
    {
        unsigned char dt = ty->dtype;
        const char *ks = key->s;
        uint32_t kl = key->len;
        id = msx__pnew(v, MSX__P_STORAGE); /* may move the arena: ty/key are stale after this */
        if (id < 0) return 0;
        v->o[id].dtype = dt;
        v->o[id].s = ks;
        v->o[id].len = kl;
        v->o[id].i = numel;
    }
    return msx__ppush(v, id);
}

static int msx__pneed(msx__pvm *v, size_t n) {
    if (v->len - v->pos < n) { msx__perr(v, MSX_E_FORMAT, "operand runs past the end of the pickle (truncated?)"); return 0; }
    return 1;
}
/* Items above the topmost mark (opcodes other than the *S ones see only these). */
static int msx__pavail(const msx__pvm *v) { return v->ns - (v->nm ? v->mk[v->nm - 1] : 0); }
static int msx__ppop(msx__pvm *v, int *id) {
    if (msx__pavail(v) < 1) { msx__perr(v, MSX_E_FORMAT, "stack underflow"); return 0; }
    *id = v->st[--v->ns];
    return 1;
}
static int msx__pstring(msx__pvm *v, int type, uint64_t n) {
    int id;
    if (n > v->len - v->pos) { msx__perr(v, MSX_E_FORMAT, "string length runs past the end of the pickle (truncated or corrupt)"); return 0; }
    id = msx__pnew(v, type);
    if (id < 0) return 0;
    v->o[id].s = (const char *)v->b + v->pos;
    v->o[id].len = (uint32_t)n;
    v->pos += (size_t)n;
    return msx__ppush(v, id);
}
static int msx__pmemo_put(msx__pvm *v, uint64_t idx) {
    int old;
    if (!v->ns) { msx__perr(v, MSX_E_FORMAT, "memo store with an empty stack"); return 0; }
    if (idx >= MSX_MAX_PICKLE_MEMO) { msx__perr(v, MSX_E_LIMIT, "memo index above MSX_MAX_PICKLE_MEMO"); return 0; }
    /* Picklers number memo entries 0, 1, 2, ...: a far jump only serves to
       make us allocate, so it is refused. */
    if (idx > (uint64_t)v->nmemo + 4096) { msx__perr(v, MSX_E_FORMAT, "memo index far out of sequence"); return 0; }
    old = v->cmemo;
    if (!msx__ck_growi(&v->memo, &v->cmemo, (int)idx + 1)) { msx__err(MSX_E_NOMEM, "out of memory"); return 0; }
    while (old < v->cmemo) v->memo[old++] = -1;
    v->memo[idx] = v->st[v->ns - 1];
    if ((int)idx >= v->nmemo) v->nmemo = (int)idx + 1;
    return 1;
}
static int msx__pmemo_get(msx__pvm *v, uint64_t idx) {
    if (idx >= (uint64_t)v->cmemo || v->memo[idx] < 0) { msx__perr(v, MSX_E_FORMAT, "memo fetch of an index never stored"); return 0; }
    return msx__ppush(v, v->memo[idx]);
}
/* Adds stack items [from, ns) to the container `target` (pairs for dicts). */
static int msx__padd_items(msx__pvm *v, int target, int from, int pairs) {
    int i, type = v->o[target].type;
    if (pairs && (v->ns - from) % 2) { msx__perr(v, MSX_E_FORMAT, "odd number of items for a dict"); return 0; }
    if (type == MSX__P_OPAQUE) { v->ns = from; return 1; } /* inert object: state dropped */
    if (type != (pairs ? MSX__P_DICT : MSX__P_LIST) && !(type == MSX__P_SET && !pairs)) {
        msx__perr(v, MSX_E_FORMAT, pairs ? "SETITEM(S) on a value that is not a dict" : "APPEND(S) on a value that is not a list");
        return 0;
    }
    for (i = from; i < v->ns; i++)
        if (!msx__pkid(v, target, v->st[i])) return 0;
    v->ns = from;
    return 1;
}

/* Runs the pickle in b[0, len). On success v->result is the top value. */
static msx_result msx__pickle_run(msx__pvm *v, const unsigned char *b, size_t len, const char *what) {
    memset(v, 0, sizeof *v);
    v->b = b;
    v->len = len;
    v->what = what;
    v->result = -1;
    if (len > MSX_MAX_PICKLE_BYTES) return msx__err(MSX_E_LIMIT, "%s: pickle of %lu bytes exceeds MSX_MAX_PICKLE_BYTES", what, (unsigned long)len);
    msx_clear_error();
    while (v->pos < v->len) {
        unsigned op = b[v->pos];
        int ok = 1, a, c, from;
        v->op_pos = v->pos++;
        switch (op) {
        case 0x80: ok = msx__pneed(v, 1); if (ok) { if (b[v->pos] > 5) { msx__perr(v, MSX_E_UNSUPPORTED, "pickle protocol above 5"); ok = 0; } v->pos++; } break; /* PROTO */
        case 0x95: ok = msx__pneed(v, 8); v->pos += ok ? 8 : 0; break; /* FRAME: framing only */
        case '.': /* STOP */
            if (!v->ns) { msx__perr(v, MSX_E_FORMAT, "STOP with an empty stack"); return msx__errcode; }
            v->result = v->st[v->ns - 1];
            return MSX_OK;
        case '(': /* MARK */
            if (!msx__ck_growi(&v->mk, &v->cm, v->nm + 1)) { msx__err(MSX_E_NOMEM, "out of memory"); ok = 0; break; }
            v->mk[v->nm++] = v->ns;
            break;
        case 'c': { /* GLOBAL "module\nname\n" */
            const char *m = (const char *)b + v->pos, *nm, *e;
            size_t rest = v->len - v->pos, ml, nl;
            e = (const char *)memchr(m, '\n', rest > 512 ? 512 : rest);
            if (!e) { msx__perr(v, MSX_E_FORMAT, "GLOBAL without a module line"); ok = 0; break; }
            ml = (size_t)(e - m);
            nm = e + 1;
            rest = (size_t)((const char *)b + v->len - nm);
            e = (const char *)memchr(nm, '\n', rest > 512 ? 512 : rest);
            if (!e) { msx__perr(v, MSX_E_FORMAT, "GLOBAL without a name line"); ok = 0; break; }
            nl = (size_t)(e - nm);
            v->pos = (size_t)((const unsigned char *)e + 1 - b);
            ok = msx__pglobal(v, m, ml, nm, nl);
            break;
        }
        case 0x93: { /* STACK_GLOBAL */
            int mi, ni;
            ok = msx__ppop(v, &ni) && msx__ppop(v, &mi);
            if (!ok) break;
            if (v->o[mi].type != MSX__P_STR || v->o[ni].type != MSX__P_STR) { msx__perr(v, MSX_E_FORMAT, "STACK_GLOBAL needs two strings"); ok = 0; break; }
            ok = msx__pglobal(v, v->o[mi].s, v->o[mi].len, v->o[ni].s, v->o[ni].len);
            break;
        }
        case 'q': ok = msx__pneed(v, 1) && msx__pmemo_put(v, b[v->pos]); v->pos += ok; break; /* BINPUT */
        case 'r': ok = msx__pneed(v, 4) && msx__pmemo_put(v, msx__ck_rd32(b + v->pos)); v->pos += ok ? 4 : 0; break;
        case 0x94: ok = msx__pmemo_put(v, (uint64_t)v->nmemo); break; /* MEMOIZE */
        case 'h': ok = msx__pneed(v, 1) && msx__pmemo_get(v, b[v->pos]); v->pos += ok; break; /* BINGET */
        case 'j': ok = msx__pneed(v, 4) && msx__pmemo_get(v, msx__ck_rd32(b + v->pos)); v->pos += ok ? 4 : 0; break;
        case ')': ok = msx__ppushnew(v, MSX__P_TUPLE); break;
        case ']': ok = msx__ppushnew(v, MSX__P_LIST); break;
        case '}': ok = msx__ppushnew(v, MSX__P_DICT); break;
        case 0x8f: ok = msx__ppushnew(v, MSX__P_SET); break; /* EMPTY_SET */
        case 't': from = msx__pmark(v); ok = from >= 0 && msx__pcollect(v, MSX__P_TUPLE, from); break;
        case 'l': from = msx__pmark(v); ok = from >= 0 && msx__pcollect(v, MSX__P_LIST, from); break;
        case 0x91: from = msx__pmark(v); ok = from >= 0 && msx__pcollect(v, MSX__P_SET, from); break; /* FROZENSET */
        case 'd':
            from = msx__pmark(v);
            ok = from >= 0;
            if (ok && (v->ns - from) % 2) { msx__perr(v, MSX_E_FORMAT, "odd number of items for DICT"); ok = 0; }
            if (ok) ok = msx__pcollect(v, MSX__P_DICT, from);
            break;
        case 0x85: case 0x86: case 0x87: /* TUPLE1..3 */
            c = (int)op - 0x84;
            if (msx__pavail(v) < c) { msx__perr(v, MSX_E_FORMAT, "stack underflow"); ok = 0; break; }
            ok = msx__pcollect(v, MSX__P_TUPLE, v->ns - c);
            break;
        case 'a': /* APPEND: list and item both above the topmost mark */
            if (msx__pavail(v) < 2) { msx__perr(v, MSX_E_FORMAT, "stack underflow in APPEND"); ok = 0; break; }
            ok = msx__padd_items(v, v->st[v->ns - 2], v->ns - 1, 0);
            break;
        case 'e': case 'u': case 0x90: /* APPENDS, SETITEMS, ADDITEMS */
            from = msx__pmark(v);
            ok = from >= 0;
            if (ok && from - 1 < (v->nm ? v->mk[v->nm - 1] : 0)) { msx__perr(v, MSX_E_FORMAT, "no container below the MARK"); ok = 0; }
            if (ok && op == 0x90 && v->o[v->st[from - 1]].type != MSX__P_SET) { msx__perr(v, MSX_E_FORMAT, "ADDITEMS on a value that is not a set"); ok = 0; }
            if (ok) ok = msx__padd_items(v, v->st[from - 1], from, op == 'u');
            break;
        case 's': /* SETITEM */
            if (msx__pavail(v) < 3) { msx__perr(v, MSX_E_FORMAT, "stack underflow in SETITEM"); ok = 0; break; }
            ok = msx__padd_items(v, v->st[v->ns - 3], v->ns - 2, 1);
            break;
        case 'X': ok = msx__pneed(v, 4); if (ok) { uint64_t n = msx__ck_rd32(b + v->pos); v->pos += 4; ok = msx__pstring(v, MSX__P_STR, n); } break;
        case 0x8c: ok = msx__pneed(v, 1); if (ok) { uint64_t n = b[v->pos++]; ok = msx__pstring(v, MSX__P_STR, n); } break;
        case 0x8d: ok = msx__pneed(v, 8); if (ok) { uint64_t n = msx__ck_rd64(b + v->pos); v->pos += 8; ok = msx__pstring(v, MSX__P_STR, n); } break;
        case 'T': ok = msx__pneed(v, 4); if (ok) { uint64_t n = msx__ck_rd32(b + v->pos); v->pos += 4; ok = msx__pstring(v, MSX__P_STR, n); } break;
        case 'U': ok = msx__pneed(v, 1); if (ok) { uint64_t n = b[v->pos++]; ok = msx__pstring(v, MSX__P_STR, n); } break;
        case 'B': ok = msx__pneed(v, 4); if (ok) { uint64_t n = msx__ck_rd32(b + v->pos); v->pos += 4; ok = msx__pstring(v, MSX__P_BYTES, n); } break;
        case 'C': ok = msx__pneed(v, 1); if (ok) { uint64_t n = b[v->pos++]; ok = msx__pstring(v, MSX__P_BYTES, n); } break;
        case 0x8e: ok = msx__pneed(v, 8); if (ok) { uint64_t n = msx__ck_rd64(b + v->pos); v->pos += 8; ok = msx__pstring(v, MSX__P_BYTES, n); } break;
        case 'J': case 'K': case 'M': { /* BININT (i32), BININT1 (u8), BININT2 (u16) */
            size_t n = op == 'J' ? 4 : op == 'K' ? 1 : 2;
            int id;
            if (!msx__pneed(v, n)) { ok = 0; break; }
            id = msx__pnew(v, MSX__P_INT);
            if (id < 0) { ok = 0; break; }
            v->o[id].i = op == 'J' ? (int64_t)(int32_t)msx__ck_rd32(b + v->pos) : op == 'K' ? (int64_t)b[v->pos] : (int64_t)msx__ck_rd16(b + v->pos);
            v->pos += n;
            ok = msx__ppush(v, id);
            break;
        }
        case 0x8a: case 0x8b: { /* LONG1, LONG4: little-endian two's complement */
            uint64_t n, k, u = 0;
            int id;
            if (op == 0x8a) { ok = msx__pneed(v, 1); if (!ok) break; n = b[v->pos++]; }
            else { ok = msx__pneed(v, 4); if (!ok) break; n = msx__ck_rd32(b + v->pos); v->pos += 4; if (n > 0x7FFFFFFFu) { msx__perr(v, MSX_E_FORMAT, "negative LONG4 length"); ok = 0; break; } }
            if (n > v->len - v->pos) { msx__perr(v, MSX_E_FORMAT, "LONG runs past the end of the pickle"); ok = 0; break; }
            id = msx__pnew(v, n <= 8 ? MSX__P_INT : MSX__P_OPAQUE); /* bigger ints: never needed for tensors */
            if (id < 0) { ok = 0; break; }
            if (n <= 8) {
                for (k = 0; k < n; k++) u |= (uint64_t)b[v->pos + k] << (8 * k);
                if (n && n < 8 && (b[v->pos + n - 1] & 0x80)) u |= ~(uint64_t)0 << (8 * n);
                memcpy(&v->o[id].i, &u, 8);
            }
            v->pos += (size_t)n;
            ok = msx__ppush(v, id);
            break;
        }
        case 'G': { /* BINFLOAT: big-endian double */
            uint64_t u = 0;
            int k, id;
            if (!msx__pneed(v, 8)) { ok = 0; break; }
            for (k = 0; k < 8; k++) u = (u << 8) | b[v->pos + k];
            v->pos += 8;
            id = msx__pnew(v, MSX__P_FLOAT);
            if (id < 0) { ok = 0; break; }
            memcpy(&v->o[id].f, &u, 8);
            ok = msx__ppush(v, id);
            break;
        }
        case 'N': ok = msx__ppushnew(v, MSX__P_NONE); break;
        case 0x88: case 0x89: {
            int id = msx__pnew(v, MSX__P_BOOL);
            ok = id >= 0;
            if (ok) { v->o[id].i = op == 0x88; ok = msx__ppush(v, id); }
            break;
        }
        case 'R': case 0x81: /* REDUCE, NEWOBJ */
            ok = msx__ppop(v, &a) && msx__ppop(v, &c);
            if (ok) ok = msx__preduce(v, c, a, 0);
            break;
        case 0x92: /* NEWOBJ_EX: cls, args, kwargs (kwargs ignored) */
            ok = msx__ppop(v, &from) && msx__ppop(v, &a) && msx__ppop(v, &c);
            if (ok) ok = msx__preduce(v, c, a, 0);
            break;
        case 'b': /* BUILD: state kept out of the object (the state dict's _metadata is ignored) */
            if (msx__pavail(v) < 2) { msx__perr(v, MSX_E_FORMAT, "BUILD with nothing to build"); ok = 0; break; }
            v->ns--;
            break;
        case 'Q': ok = msx__ppop(v, &a) && msx__ppersid(v, a); break; /* BINPERSID */
        case '0': ok = msx__ppop(v, &a); break;                        /* POP */
        case '1': from = msx__pmark(v); ok = from >= 0; if (ok) v->ns = from; break; /* POP_MARK */
        case '2': /* DUP */
            if (msx__pavail(v) < 1) { msx__perr(v, MSX_E_FORMAT, "DUP on an empty stack"); ok = 0; break; }
            ok = msx__ppush(v, v->st[v->ns - 1]);
            break;
        default: {
            char msg[160];
            snprintf(msg, sizeof msg, "unknown or unsupported pickle opcode 0x%02x ('%c'); only the binary opcodes torch.save emits are read", op, op >= 32 && op < 127 ? (int)op : '?');
            msx__perr(v, MSX_E_FORMAT, msg);
            ok = 0;
        }
        }
        if (!ok) {
            if (!msx_last_error()[0]) msx__perr(v, MSX_E_FORMAT, "malformed pickle");
            return msx__errcode ? msx__errcode : MSX_E_FORMAT;
        }
    }
    return msx__err(MSX_E_FORMAT, "%s: the pickle ends without STOP after %lu bytes (truncated?)", what, (unsigned long)len);
}

/* ---- from pickle values to a checkpoint -------------------------------------- */

static const msx__pobj *msx__pdict_get(const msx__pvm *v, const msx__pobj *d, const char *key) {
    int i;
    if (d->type != MSX__P_DICT) return NULL;
    for (i = 0; i + 1 < d->n; i += 2) {
        const msx__pobj *k = &v->o[d->kids[i]];
        if (k->type == MSX__P_STR && msx__ck_streq(k->s, k->len, key)) return &v->o[d->kids[i + 1]];
    }
    return NULL;
}
static int msx__pdict_has_tensor(const msx__pvm *v, const msx__pobj *d) {
    int i;
    if (d->type != MSX__P_DICT) return 0;
    for (i = 1; i < d->n; i += 2)
        if (v->o[d->kids[i]].type == MSX__P_TENSOR) return 1;
    return 0;
}

/* Strips training-wrapper prefixes: "module.", "sam.", "module.sam.", "_orig_mod.". */
static const char *msx__ck_strip(const char *name) {
    static const char *const pre[] = {"module.", "_orig_mod.", "sam."};
    int again = 1;
    size_t i;
    while (again) {
        again = 0;
        for (i = 0; i < 3; i++) {
            size_t n = strlen(pre[i]);
            if (!strncmp(name, pre[i], n) && name[n]) { name += n; again = 1; }
        }
    }
    return name;
}

static int msx__ck_key_ok(const char *s, size_t n) {
    size_t i;
    if (n == 0 || n > 128 || (n == 2 && s[0] == '.' && s[1] == '.')) return 0;
    for (i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == '-' || c == '.')) return 0;
    }
    return 1;
}

/* Copies one tensor record out of its storage entry (views made contiguous). */
static msx_result msx__ck_materialise(const msx__pvm *v, const msx__zip *z, const char *prefix, size_t plen, const char *name,
                                      const msx__pten *t, msx_checkpoint *c, uint64_t *total) {
    const msx__pobj *st = &v->o[t->storage];
    msx__zent *e;
    msx_dtype dt = (msx_dtype)st->dtype;
    size_t es = msx_dtype_size(dt);
    uint64_t numel = 1, extent = 0, avail;
    int64_t shape[MSX_MAX_DIMS];
    int k, nd = t->ndim, contiguous = 1;
    unsigned char *dst;
    const unsigned char *src;
    char key[140];
    msx_result r;
    if (nd > MSX_MAX_DIMS) return msx__err(MSX_E_UNSUPPORTED, "%s: tensor '%s' has %d dimensions (at most %d supported)", z->what, name, nd, MSX_MAX_DIMS);
    if (!msx__ck_key_ok(st->s, st->len)) return msx__err(MSX_E_FORMAT, "%s: tensor '%s' names an invalid storage key", z->what, name);
    memcpy(key, "data/", 5);
    memcpy(key + 5, st->s, st->len);
    key[5 + st->len] = 0;
    e = msx__zip_find(z, prefix, plen, key, 5 + st->len);
    if (!e) return msx__err(MSX_E_FORMAT, "%s: tensor '%s': storage record '%.*s%s' is missing from the archive", z->what, name, (int)plen, prefix, key);
    if ((r = msx__zip_verify(z, e)) != MSX_OK) return r;
    /* Extent in elements: offset + sum (size-1)*stride + 1, overflow-checked. */
    for (k = 0; k < nd; k++) {
        if (t->shape[k] > ((int64_t)1 << 40) || t->stride[k] > ((int64_t)1 << 40))
            return msx__err(MSX_E_FORMAT, "%s: tensor '%s': implausible size or stride in dimension %d", z->what, name, k);
        if (t->shape[k] == 0) numel = 0;
        else if (numel) {
            if (numel > ((uint64_t)1 << 40) / (uint64_t)t->shape[k]) return msx__err(MSX_E_LIMIT, "%s: tensor '%s' is too large", z->what, name);
            numel *= (uint64_t)t->shape[k];
        }
    }
    if (numel) {
        if ((uint64_t)t->offset > ((uint64_t)1 << 42)) return msx__err(MSX_E_FORMAT, "%s: tensor '%s': storage offset %lld is implausible", z->what, name, (long long)t->offset);
        extent = (uint64_t)t->offset + 1;
        for (k = 0; k < nd; k++) {
            uint64_t s1 = (uint64_t)t->shape[k] - 1, sd = (uint64_t)t->stride[k];
            if (s1 && sd > ((uint64_t)1 << 60) / s1) return msx__err(MSX_E_FORMAT, "%s: tensor '%s': stride %lld in dimension %d reaches past any storage", z->what, name, (long long)t->stride[k], k);
            extent += s1 * sd; /* each term < 2^60 and at most 8 terms: no overflow */
        }
    }
    avail = e->size / es;
    if ((uint64_t)st->i < avail) avail = (uint64_t)st->i;
    if (extent > avail)
        return msx__err(MSX_E_FORMAT, "%s: tensor '%s': shape, stride and offset %lld need %llu elements but storage '%.*s' holds %llu (%lu bytes)",
                        z->what, name, (long long)t->offset, (unsigned long long)extent, (int)st->len, st->s, (unsigned long long)avail, (unsigned long)e->size);
    /* A view never has more elements than its storage unless strides
       overlap (0-stride broadcasts, as_strided windows). Those never occur in
       state dicts and would let a tiny file demand gigabytes: refused. */
    if (numel > avail)
        return msx__err(MSX_E_FORMAT, "%s: tensor '%s' has %llu elements but its storage '%.*s' only %llu: overlapping or broadcast (stride 0) views are not supported",
                        z->what, name, (unsigned long long)numel, (int)st->len, st->s, (unsigned long long)avail);
    for (k = 0; k < nd; k++) shape[k] = t->shape[k];
    if (numel > MSX_MAX_FILE_BYTES / es) return msx__err(MSX_E_LIMIT, "%s: tensor '%s' is too large", z->what, name);
    /* Many tensors over one big shared storage would multiply memory use:
       the copies may not exceed 4x the file (tied weights need 2x). */
    *total += numel * es;
    if (*total > 4 * (uint64_t)z->len + ((uint64_t)64 << 20))
        return msx__err(MSX_E_LIMIT, "%s: tensor '%s': the tensors need %llu bytes, more than 4x the %lu-byte file (storages shared by too many tensors)",
                        z->what, name, (unsigned long long)*total, (unsigned long)z->len);
    dst = (unsigned char *)msx__aligned_alloc((size_t)numel * es + 1);
    if (!dst) return msx__err(MSX_E_NOMEM, "%s: tensor '%s': cannot allocate %llu bytes", z->what, name, (unsigned long long)numel * es);
    src = z->buf + e->off + (size_t)t->offset * es;
    {
        int64_t expect = 1;
        for (k = nd - 1; k >= 0; k--) {
            if (t->shape[k] != 1 && t->stride[k] != expect) contiguous = 0;
            expect *= t->shape[k];
        }
    }
    if (numel && contiguous) memcpy(dst, src, (size_t)numel * es);
    else if (numel) {
        /* Odometer over all but the last dimension; the last one is a strided row. */
        int64_t idx[MSX__PT_DIMS] = {0};
        int64_t last = nd ? t->shape[nd - 1] : 1, ls = nd ? t->stride[nd - 1] : 0, j;
        uint64_t rows = numel / (uint64_t)last, rr;
        unsigned char *d = dst;
        for (rr = 0; rr < rows; rr++) {
            int64_t base = 0;
            for (k = 0; k < nd - 1; k++) base += idx[k] * t->stride[k];
            /* fixed-size copies so the compiler inlines them */
            if (es == 4) for (j = 0; j < last; j++, d += 4) memcpy(d, src + (size_t)(base + j * ls) * 4, 4);
            else if (es == 2) for (j = 0; j < last; j++, d += 2) memcpy(d, src + (size_t)(base + j * ls) * 2, 2);
            else for (j = 0; j < last; j++, d += es) memcpy(d, src + (size_t)(base + j * ls) * es, es);
            for (k = nd - 2; k >= 0; k--) {
                if (++idx[k] < t->shape[k]) break;
                idx[k] = 0;
            }
        }
    }
    r = msx__ckpt_add_owned(c, name, dt, nd, shape, dst, NULL);
    if (r != MSX_OK) {
        msx__aligned_free(dst);
        if (r == MSX_E_KEY_MISMATCH) return msx__err(MSX_E_KEY_MISMATCH, "%s: duplicate tensor name '%s' (after stripping wrapper prefixes)", z->what, name);
    }
    return r;
}

static msx_result msx__torch_zip_load(const unsigned char *b, size_t len, const char *what, msx_checkpoint **out) {
    msx__zip z;
    msx__pvm v;
    msx__zent *pkl = NULL;
    const msx__zent *rec;
    const msx__pobj *root, *sd = NULL;
    size_t plen = 0;
    const char *prefix = "";
    char pwhat[600];
    uint64_t total = 0;
    msx_checkpoint *c = NULL;
    msx_result r;
    int i;
    *out = NULL;
    r = msx__zip_open(b, len, what, &z);
    if (r != MSX_OK) return r;
    /* The archive's top folder is read from the data.pkl entry name. */
    for (i = 0; i < z.n; i++) {
        const msx__zent *e = &z.e[i];
        if (e->name_len >= 8 && !memcmp(e->name + e->name_len - 8, "data.pkl", 8) &&
            (e->name_len == 8 || e->name[e->name_len - 9] == '/')) {
            if (!pkl || e->name_len < pkl->name_len) pkl = &z.e[i];
        }
    }
    if (!pkl) { msx__zip_close(&z); return msx__err(MSX_E_FORMAT, "%s: zip archive without a data.pkl record: not a torch.save file", what); }
    prefix = pkl->name;
    plen = pkl->name_len - 8;
    if ((r = msx__zip_verify(&z, pkl)) != MSX_OK) { msx__zip_close(&z); return r; }
    rec = msx__zip_find(&z, prefix, plen, "byteorder", 9);
    if (rec && !(rec->size >= 6 && !memcmp(b + rec->off, "little", 6))) {
        msx__zip_close(&z);
        return msx__err(MSX_E_UNSUPPORTED, "%s: big-endian torch archive (byteorder record); re-save on a little-endian machine", what);
    }
    snprintf(pwhat, sizeof pwhat, "%s:%.*s", what, (int)(pkl->name_len > 200 ? 200 : pkl->name_len), pkl->name);
    r = msx__pickle_run(&v, b + pkl->off, pkl->size, pwhat);
    if (r != MSX_OK) { msx__pvm_free(&v); msx__zip_close(&z); return r; }
    root = &v.o[v.result];
    if (root->type == MSX__P_OPAQUE) {
        r = msx__err(MSX_E_UNSUPPORTED, "%s: the file pickles a whole '%.*s.%.*s' object, not a state dict; save model.state_dict() instead",
                     what, (int)(root->len > 100 ? 100 : root->len), root->s ? root->s : "", (int)(root->len2 > 100 ? 100 : root->len2), root->s2 ? root->s2 : "");
        goto done;
    }
    if (root->type != MSX__P_DICT) { r = msx__err(MSX_E_FORMAT, "%s: the pickle's top value is not a dict (no state dict found)", what); goto done; }
    if (msx__pdict_has_tensor(&v, root)) sd = root;
    else {
        static const char *const wrap[] = {"state_dict", "model_state", "model", "module", "net"};
        size_t w;
        for (w = 0; w < sizeof wrap / sizeof wrap[0] && !sd; w++) {
            const msx__pobj *x = msx__pdict_get(&v, root, wrap[w]);
            if (x && msx__pdict_has_tensor(&v, x)) sd = x;
        }
    }
    if (!sd) {
        msx__sb keys = {0, 0, 0, 0};
        for (i = 0; i + 1 < root->n; i += 2) {
            const msx__pobj *k = &v.o[root->kids[i]], *val = &v.o[root->kids[i + 1]];
            if (k->type == MSX__P_STR && val->type == MSX__P_OPAQUE && val->s) {
                r = msx__err(MSX_E_UNSAFE, "%s: key '%.*s' is built by '%.*s.%.*s', which is not interpreted: the tensors of this file cannot be resolved",
                             what, (int)(k->len > 100 ? 100 : k->len), k->s, (int)(val->len > 100 ? 100 : val->len), val->s,
                             (int)(val->len2 > 100 ? 100 : val->len2), val->s2);
                goto done;
            }
        }
        for (i = 0; i + 1 < root->n && i < 16; i += 2) {
            const msx__pobj *k = &v.o[root->kids[i]];
            if (k->type == MSX__P_STR) msx__sb_printf(&keys, "%s'%.*s'", i ? ", " : "", (int)(k->len > 60 ? 60 : k->len), k->s);
        }
        r = msx__err(MSX_E_FORMAT, "%s: no tensors found (top-level keys: %s); expected a state dict or {\"model\"|\"model_state\"|\"state_dict\": state dict}",
                     what, keys.s ? keys.s : "none");
        msx__sb_free(&keys);
        goto done;
    }
    c = msx_ckpt_new();
    if (!c) { r = msx__err(MSX_E_NOMEM, "out of memory"); goto done; }
    for (i = 0; i + 1 < sd->n; i += 2) {
        const msx__pobj *k = &v.o[sd->kids[i]], *val = &v.o[sd->kids[i + 1]];
        char name[512];
        if (k->type != MSX__P_STR || k->len == 0 || k->len >= sizeof name || memchr(k->s, 0, k->len)) {
            r = msx__err(MSX_E_FORMAT, "%s: state dict entry %d has a key that is not a (reasonable) string", what, i / 2);
            goto done;
        }
        memcpy(name, k->s, k->len);
        name[k->len] = 0;
        if (val->type != MSX__P_TENSOR) {
            if (val->type == MSX__P_OPAQUE && val->s)
                r = msx__err(MSX_E_UNSAFE, "%s: key '%s' is built by '%.*s.%.*s', which is not interpreted: the tensors of this file cannot be resolved",
                             what, name, (int)(val->len > 100 ? 100 : val->len), val->s, (int)(val->len2 > 100 ? 100 : val->len2), val->s2);
            else r = msx__err(MSX_E_FORMAT, "%s: state dict key '%s' does not hold a tensor", what, name);
            goto done;
        }
        r = msx__ck_materialise(&v, &z, prefix, plen, msx__ck_strip(name), &v.t[val->i], c, &total);
        if (r != MSX_OK) goto done;
    }
    r = MSX_OK;
done:
    msx__pvm_free(&v);
    msx__zip_close(&z);
    if (r != MSX_OK) { msx_ckpt_free(c); return r; }
    *out = c;
    return MSX_OK;
}

MSXDEF msx_result msx_ckpt_load_mem(const void *buf, size_t len, const char *what, msx_checkpoint **out) {
    static const unsigned char legacy[] = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};
    const unsigned char *b = (const unsigned char *)buf;
    msx_result r;
    if (!out) return msx__err(MSX_E_ARG, "msx_ckpt_load_mem: out is NULL");
    *out = NULL;
    if (!what) what = "(memory)";
    if (!b && len) return msx__err(MSX_E_ARG, "%s: NULL buffer", what);
    if (len >= 4 && b[0] == 'P' && b[1] == 'K' && ((b[2] == 3 && b[3] == 4) || (b[2] == 5 && b[3] == 6)))
        r = msx__torch_zip_load(b, len, what, out);
    else if (len >= sizeof legacy && !memcmp(b, legacy, sizeof legacy))
        return msx__err(MSX_E_UNSUPPORTED, "%s: legacy (pre-1.6, non-zip) torch serialization; re-save it with the default zip format: "
                        "python -c \"import torch; torch.save(torch.load('IN', map_location='cpu'), 'OUT.pth')\" (torch >= 1.6)", what);
    else if (len >= 2 && b[0] == 0x80 && b[1] <= 5)
        return msx__err(MSX_E_UNSUPPORTED, "%s: a bare pickle without the torch zip container; save it with torch.save (zip format) or as .safetensors", what);
    else if (len >= 9 && b[8] == '{' && msx__ck_rd64(b) <= len - 8)
        r = msx_safetensors_load_mem(b, len, what, out);
    else if (len < 4)
        return msx__err(MSX_E_FORMAT, "%s: %lu bytes is too short to be a checkpoint (truncated or empty file)", what, (unsigned long)len);
    else
        return msx__err(MSX_E_FORMAT, "%s: unknown file format (first bytes %02x %02x %02x %02x): expected a torch.save zip (.pth) or .safetensors",
                        what, b[0], b[1], b[2], b[3]);
    if (r != MSX_OK) return r;
    {
        msx_checkpoint *c = *out;
        int i;
        for (i = 0; i < c->n && r == MSX_OK; i++) {
            const char *s = msx__ck_strip(c->tensors[i].name);
            if (s != c->tensors[i].name) {
                r = msx_ckpt_rename(c, i, s);
                if (r == MSX_E_KEY_MISMATCH) r = msx__err(MSX_E_KEY_MISMATCH, "%s: duplicate tensor name '%s' after stripping wrapper prefixes", what, s);
            }
        }
        if (r == MSX_OK) r = msx_ckpt_to_f32(c);
        if (r != MSX_OK) { msx_ckpt_free(c); *out = NULL; }
    }
    return r;
}

MSXDEF msx_result msx_ckpt_load(const char *path, msx_checkpoint **out) {
    int fd;
    struct stat st;
    void *map;
    msx_result r;
    if (!out) return msx__err(MSX_E_ARG, "msx_ckpt_load: out is NULL");
    *out = NULL;
    if (!path) return msx__err(MSX_E_ARG, "msx_ckpt_load: path is NULL");
    fd = open(path, O_RDONLY);
    if (fd < 0) return msx__err(MSX_E_IO, "%s: cannot open (%s)", path, strerror(errno));
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) { close(fd); return msx__err(MSX_E_IO, "%s: not a regular file", path); }
    if ((uint64_t)st.st_size > (uint64_t)MSX_MAX_FILE_BYTES) { close(fd); return msx__err(MSX_E_LIMIT, "%s: larger than MSX_MAX_FILE_BYTES", path); }
    if (st.st_size == 0) { close(fd); return msx__err(MSX_E_FORMAT, "%s: empty file", path); }
    /* Memory-mapped: storages are copied straight out of the page cache. */
    map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return msx__err(MSX_E_IO, "%s: mmap failed (%s)", path, strerror(errno));
    r = msx_ckpt_load_mem(map, (size_t)st.st_size, path, out);
    munmap(map, (size_t)st.st_size);
    if (r == MSX_OK) {
        MSX_FREE((*out)->path);
        (*out)->path = msx__strdup(path);
    }
    return r;
}

/* ---- SAM architecture ----------------------------------------------------------- */

MSXDEF void msx_sam_arch_default(msx_sam_arch *a) {
    int k;
    memset(a, 0, sizeof *a);
    a->img_size = 1024; a->patch_size = 16; a->in_chans = 3;
    a->embed_dim = 768; a->depth = 12; a->num_heads = 12; a->mlp_dim = 3072;
    a->window_size = 14; a->n_global = 4;
    for (k = 0; k < 4; k++) a->global_idx[k] = 3 * k + 2;
    a->use_rel_pos = 1; a->use_abs_pos = 1;
    a->out_chans = 256; a->prompt_dim = 256; a->mask_in_chans = 16;
    a->dec_depth = 2; a->dec_dim = 256; a->dec_mlp_dim = 2048; a->dec_heads = 8; a->dec_downsample = 2;
    a->num_mask_tokens = 4; a->iou_head_depth = 3; a->iou_head_hidden = 256;
    a->pixel_mean[0] = 123.675f; a->pixel_mean[1] = 116.28f; a->pixel_mean[2] = 103.53f;
    a->pixel_std[0] = 58.395f; a->pixel_std[1] = 57.12f; a->pixel_std[2] = 57.375f;
    a->abs_pos_size = 64; a->rel_pos_len_win = 27; a->rel_pos_len_glob = 127;
}

/* Recomputes the fields that follow from the others. */
static void msx__sam_derive(msx_sam_arch *a) {
    int g = a->patch_size > 0 ? a->img_size / a->patch_size : 0;
    a->abs_pos_size = a->use_abs_pos ? g : 0;
    a->rel_pos_len_win = a->use_rel_pos && a->window_size > 0 ? 2 * a->window_size - 1 : 0;
    a->rel_pos_len_glob = a->use_rel_pos ? 2 * g - 1 : 0;
}

static int msx__sam_is_global(const msx_sam_arch *a, int blk) {
    int k;
    if (a->window_size <= 0) return 1;
    for (k = 0; k < a->n_global && k < 64; k++)
        if (a->global_idx[k] == blk) return 1;
    return 0;
}

static msx_result msx__sam_arch_check(const msx_sam_arch *a, const char *what) {
    int k;
#define MSX__ACHK(cond, ...) do { if (!(cond)) return msx__err(MSX_E_ARG, __VA_ARGS__); } while (0)
    MSX__ACHK(a->patch_size > 0 && a->img_size > 0 && a->img_size % a->patch_size == 0 && a->img_size <= 16384, "%s: img_size %d must be a positive multiple of patch_size %d", what, a->img_size, a->patch_size);
    MSX__ACHK(a->in_chans > 0 && a->in_chans <= 64, "%s: in_chans %d out of range", what, a->in_chans);
    MSX__ACHK(a->embed_dim > 0 && a->num_heads > 0 && a->embed_dim % a->num_heads == 0 && a->embed_dim <= 65536, "%s: embed_dim %d must be a positive multiple of num_heads %d", what, a->embed_dim, a->num_heads);
    MSX__ACHK(a->depth > 0 && a->depth <= 64, "%s: depth %d out of range 1..64", what, a->depth);
    MSX__ACHK(a->mlp_dim > 0 && a->mlp_dim <= 1 << 20, "%s: mlp_dim %d out of range", what, a->mlp_dim);
    MSX__ACHK(a->window_size >= 0 && a->window_size <= 4096, "%s: window_size %d out of range", what, a->window_size);
    MSX__ACHK(a->n_global >= 0 && a->n_global <= 64, "%s: %d global blocks (at most 64)", what, a->n_global);
    for (k = 0; k < a->n_global; k++) MSX__ACHK(a->global_idx[k] >= 0 && a->global_idx[k] < a->depth, "%s: global attention block %d outside 0..%d", what, a->global_idx[k], a->depth - 1);
    MSX__ACHK(a->out_chans > 0 && a->out_chans <= 65536, "%s: out_chans %d out of range", what, a->out_chans);
    MSX__ACHK(a->prompt_dim == a->out_chans && a->dec_dim == a->out_chans, "%s: out_chans %d, prompt_dim %d and dec_dim %d must be equal in SAM", what, a->out_chans, a->prompt_dim, a->dec_dim);
    MSX__ACHK(a->prompt_dim % 2 == 0, "%s: prompt_dim %d must be even", what, a->prompt_dim);
    MSX__ACHK(a->mask_in_chans > 0 && a->mask_in_chans % 4 == 0 && a->mask_in_chans <= 65536, "%s: mask_in_chans %d must be a positive multiple of 4", what, a->mask_in_chans);
    MSX__ACHK(a->dec_depth > 0 && a->dec_depth <= 64, "%s: decoder depth %d out of range", what, a->dec_depth);
    MSX__ACHK(a->dec_dim % 8 == 0, "%s: dec_dim %d must be a multiple of 8 (output upscaling)", what, a->dec_dim);
    MSX__ACHK(a->dec_downsample > 0 && a->dec_dim % a->dec_downsample == 0, "%s: dec_dim %d is not divisible by the attention downsample rate %d", what, a->dec_dim, a->dec_downsample);
    MSX__ACHK(a->dec_heads > 0 && (a->dec_dim / a->dec_downsample) % a->dec_heads == 0 && a->dec_dim % a->dec_heads == 0, "%s: decoder heads %d do not divide the attention width %d", what, a->dec_heads, a->dec_dim / a->dec_downsample);
    MSX__ACHK(a->dec_mlp_dim > 0 && a->dec_mlp_dim <= 1 << 20, "%s: decoder mlp_dim %d out of range", what, a->dec_mlp_dim);
    MSX__ACHK(a->num_mask_tokens > 0 && a->num_mask_tokens <= 64, "%s: num_mask_tokens %d out of range", what, a->num_mask_tokens);
    MSX__ACHK(a->iou_head_depth > 0 && a->iou_head_depth <= 64 && a->iou_head_hidden > 0 && a->iou_head_hidden <= 1 << 20, "%s: IoU head depth %d / hidden %d out of range", what, a->iou_head_depth, a->iou_head_hidden);
    for (k = 0; k < 3; k++) MSX__ACHK(isfinite(a->pixel_mean[k]) && isfinite(a->pixel_std[k]) && a->pixel_std[k] > 0, "%s: pixel_mean/pixel_std must be finite with std > 0", what);
#undef MSX__ACHK
    return MSX_OK;
}

/* The official state_dict, in order, generated from the architecture. */
typedef struct msx__samkey { char name[100]; int ndim; int64_t shape[MSX_MAX_DIMS]; } msx__samkey;
typedef struct msx__samkeys { msx__samkey *k; int n, cap, want; msx__samkey one; } msx__samkeys;

/* Records key number L->n; when `want` >= 0 only that one is kept (no allocation). */
static MSX__PRINTF(7, 8) void msx__sk(msx__samkeys *L, int nd, int64_t d0, int64_t d1, int64_t d2, int64_t d3, const char *fmt, ...) {
    msx__samkey *s = NULL;
    va_list ap;
    if (L->want >= 0) { if (L->n == L->want) s = &L->one; }
    else if (L->n < L->cap) s = &L->k[L->n];
    if (s) {
        va_start(ap, fmt);
        vsnprintf(s->name, sizeof s->name, fmt, ap);
        va_end(ap);
        s->ndim = nd;
        s->shape[0] = d0; s->shape[1] = d1; s->shape[2] = d2; s->shape[3] = d3;
    }
    L->n++;
}
static void msx__sk_ln(msx__samkeys *L, int64_t d, const char *pre) {
    msx__sk(L, 1, d, 0, 0, 0, "%s.weight", pre);
    msx__sk(L, 1, d, 0, 0, 0, "%s.bias", pre);
}
static void msx__sk_lin(msx__samkeys *L, int64_t out, int64_t in, const char *pre) {
    msx__sk(L, 2, out, in, 0, 0, "%s.weight", pre);
    msx__sk(L, 1, out, 0, 0, 0, "%s.bias", pre);
}
static void msx__sk_attn(msx__samkeys *L, int64_t d, int64_t di, const char *pre) {
    char b[96];
    snprintf(b, sizeof b, "%s.q_proj", pre); msx__sk_lin(L, di, d, b);
    snprintf(b, sizeof b, "%s.k_proj", pre); msx__sk_lin(L, di, d, b);
    snprintf(b, sizeof b, "%s.v_proj", pre); msx__sk_lin(L, di, d, b);
    snprintf(b, sizeof b, "%s.out_proj", pre); msx__sk_lin(L, d, di, b);
}
static void msx__sam_keys(const msx_sam_arch *a, msx__samkeys *L) {
    int64_t C = a->embed_dim, g = a->img_size / a->patch_size, D = a->prompt_dim, Dd = a->dec_dim;
    int64_t mi = a->mask_in_chans, di = a->dec_dim / a->dec_downsample, hd = a->embed_dim / a->num_heads;
    int i, j;
    char b[96];
    L->n = 0;
    if (a->use_abs_pos) msx__sk(L, 4, 1, g, g, C, "image_encoder.pos_embed");
    msx__sk(L, 4, C, a->in_chans, a->patch_size, a->patch_size, "image_encoder.patch_embed.proj.weight");
    msx__sk(L, 1, C, 0, 0, 0, "image_encoder.patch_embed.proj.bias");
    for (i = 0; i < a->depth; i++) {
        int64_t rows = msx__sam_is_global(a, i) ? 2 * g - 1 : 2 * (int64_t)a->window_size - 1;
        snprintf(b, sizeof b, "image_encoder.blocks.%d.norm1", i); msx__sk_ln(L, C, b);
        if (a->use_rel_pos) {
            msx__sk(L, 2, rows, hd, 0, 0, "image_encoder.blocks.%d.attn.rel_pos_h", i);
            msx__sk(L, 2, rows, hd, 0, 0, "image_encoder.blocks.%d.attn.rel_pos_w", i);
        }
        snprintf(b, sizeof b, "image_encoder.blocks.%d.attn.qkv", i); msx__sk_lin(L, 3 * C, C, b);
        snprintf(b, sizeof b, "image_encoder.blocks.%d.attn.proj", i); msx__sk_lin(L, C, C, b);
        snprintf(b, sizeof b, "image_encoder.blocks.%d.norm2", i); msx__sk_ln(L, C, b);
        snprintf(b, sizeof b, "image_encoder.blocks.%d.mlp.lin1", i); msx__sk_lin(L, a->mlp_dim, C, b);
        snprintf(b, sizeof b, "image_encoder.blocks.%d.mlp.lin2", i); msx__sk_lin(L, C, a->mlp_dim, b);
    }
    msx__sk(L, 4, a->out_chans, C, 1, 1, "image_encoder.neck.0.weight");
    msx__sk_ln(L, a->out_chans, "image_encoder.neck.1");
    msx__sk(L, 4, a->out_chans, a->out_chans, 3, 3, "image_encoder.neck.2.weight");
    msx__sk_ln(L, a->out_chans, "image_encoder.neck.3");
    msx__sk(L, 2, 2, D / 2, 0, 0, "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix");
    for (i = 0; i < 4; i++) msx__sk(L, 2, 1, D, 0, 0, "prompt_encoder.point_embeddings.%d.weight", i);
    msx__sk(L, 2, 1, D, 0, 0, "prompt_encoder.not_a_point_embed.weight");
    msx__sk(L, 4, mi / 4, 1, 2, 2, "prompt_encoder.mask_downscaling.0.weight");
    msx__sk(L, 1, mi / 4, 0, 0, 0, "prompt_encoder.mask_downscaling.0.bias");
    msx__sk_ln(L, mi / 4, "prompt_encoder.mask_downscaling.1");
    msx__sk(L, 4, mi, mi / 4, 2, 2, "prompt_encoder.mask_downscaling.3.weight");
    msx__sk(L, 1, mi, 0, 0, 0, "prompt_encoder.mask_downscaling.3.bias");
    msx__sk_ln(L, mi, "prompt_encoder.mask_downscaling.4");
    msx__sk(L, 4, D, mi, 1, 1, "prompt_encoder.mask_downscaling.6.weight");
    msx__sk(L, 1, D, 0, 0, 0, "prompt_encoder.mask_downscaling.6.bias");
    msx__sk(L, 2, 1, D, 0, 0, "prompt_encoder.no_mask_embed.weight");
    for (i = 0; i < a->dec_depth; i++) {
        snprintf(b, sizeof b, "mask_decoder.transformer.layers.%d.self_attn", i); msx__sk_attn(L, Dd, Dd, b);
        snprintf(b, sizeof b, "mask_decoder.transformer.layers.%d.norm1", i); msx__sk_ln(L, Dd, b);
        snprintf(b, sizeof b, "mask_decoder.transformer.layers.%d.cross_attn_token_to_image", i); msx__sk_attn(L, Dd, di, b);
        snprintf(b, sizeof b, "mask_decoder.transformer.layers.%d.norm2", i); msx__sk_ln(L, Dd, b);
        snprintf(b, sizeof b, "mask_decoder.transformer.layers.%d.mlp.lin1", i); msx__sk_lin(L, a->dec_mlp_dim, Dd, b);
        snprintf(b, sizeof b, "mask_decoder.transformer.layers.%d.mlp.lin2", i); msx__sk_lin(L, Dd, a->dec_mlp_dim, b);
        snprintf(b, sizeof b, "mask_decoder.transformer.layers.%d.norm3", i); msx__sk_ln(L, Dd, b);
        snprintf(b, sizeof b, "mask_decoder.transformer.layers.%d.norm4", i); msx__sk_ln(L, Dd, b);
        snprintf(b, sizeof b, "mask_decoder.transformer.layers.%d.cross_attn_image_to_token", i); msx__sk_attn(L, Dd, di, b);
    }
    msx__sk_attn(L, Dd, di, "mask_decoder.transformer.final_attn_token_to_image");
    msx__sk_ln(L, Dd, "mask_decoder.transformer.norm_final_attn");
    msx__sk(L, 2, 1, Dd, 0, 0, "mask_decoder.iou_token.weight");
    msx__sk(L, 2, a->num_mask_tokens, Dd, 0, 0, "mask_decoder.mask_tokens.weight");
    msx__sk(L, 4, Dd, Dd / 4, 2, 2, "mask_decoder.output_upscaling.0.weight");
    msx__sk(L, 1, Dd / 4, 0, 0, 0, "mask_decoder.output_upscaling.0.bias");
    msx__sk_ln(L, Dd / 4, "mask_decoder.output_upscaling.1");
    msx__sk(L, 4, Dd / 4, Dd / 8, 2, 2, "mask_decoder.output_upscaling.3.weight");
    msx__sk(L, 1, Dd / 8, 0, 0, 0, "mask_decoder.output_upscaling.3.bias");
    for (i = 0; i < a->num_mask_tokens; i++)
        for (j = 0; j < 3; j++) {
            snprintf(b, sizeof b, "mask_decoder.output_hypernetworks_mlps.%d.layers.%d", i, j);
            msx__sk_lin(L, j == 2 ? Dd / 8 : Dd, Dd, b);
        }
    for (j = 0; j < a->iou_head_depth; j++) {
        snprintf(b, sizeof b, "mask_decoder.iou_prediction_head.layers.%d", j);
        msx__sk_lin(L, j == a->iou_head_depth - 1 ? a->num_mask_tokens : a->iou_head_hidden, j == 0 ? Dd : a->iou_head_hidden, b);
    }
}

MSXDEF int msx_sam_key_count(const msx_sam_arch *arch) {
    msx__samkeys L;
    if (!arch || msx__sam_arch_check(arch, "arch") != MSX_OK) return 0;
    memset(&L, 0, sizeof L);
    L.want = -1;
    msx__sam_keys(arch, &L);
    return L.n;
}

MSXDEF msx_result msx_sam_key_at(const msx_sam_arch *arch, int i, char *name, size_t name_cap, int *ndim, int64_t shape[MSX_MAX_DIMS]) {
    msx__samkeys L;
    msx_result r;
    int k;
    if (!arch) return msx__err(MSX_E_ARG, "msx_sam_key_at: arch is NULL");
    if ((r = msx__sam_arch_check(arch, "arch")) != MSX_OK) return r;
    memset(&L, 0, sizeof L);
    L.want = i;
    msx__sam_keys(arch, &L);
    if (i < 0 || i >= L.n) return msx__err(MSX_E_ARG, "msx_sam_key_at: index %d outside 0..%d", i, L.n - 1);
    if (name && name_cap) snprintf(name, name_cap, "%s", L.one.name);
    if (ndim) *ndim = L.one.ndim;
    if (shape) for (k = 0; k < MSX_MAX_DIMS; k++) shape[k] = k < L.one.ndim ? L.one.shape[k] : 0;
    return MSX_OK;
}

static msx_result msx__sam_keylist(const msx_sam_arch *a, msx__samkeys *L) {
    memset(L, 0, sizeof *L);
    L->want = -1;
    msx__sam_keys(a, L); /* count */
    L->cap = L->n;
    L->k = (msx__samkey *)msx__calloc((size_t)L->cap + 1, sizeof *L->k);
    if (!L->k) return msx__err(MSX_E_NOMEM, "out of memory");
    msx__sam_keys(a, L);
    return MSX_OK;
}

static const msx_tensor *msx__ck_need(const msx_checkpoint *ck, const char *name, int ndim, msx_result *r) {
    const msx_tensor *t = msx_ckpt_find(ck, name);
    if (*r != MSX_OK) return NULL;
    if (!t) { *r = msx__err(MSX_E_KEY_MISMATCH, "%s: not a SAM checkpoint: tensor '%s' is missing", ck->path ? ck->path : "checkpoint", name); return NULL; }
    if (t->ndim != ndim) { *r = msx__err(MSX_E_SHAPE, "%s: tensor '%s' has %d dimensions, SAM has %d", ck->path ? ck->path : "checkpoint", name, t->ndim, ndim); return NULL; }
    return t;
}

MSXDEF msx_result msx_sam_arch_infer(const msx_checkpoint *ck, msx_sam_arch *a) {
    const char *what;
    const msx_tensor *t, *pe;
    msx_result r = MSX_OK;
    char b[128];
    int i, g = 0, win_rows = 0, glob_rows = 0, rows_max = 0;
    if (!ck || !a) return msx__err(MSX_E_ARG, "msx_sam_arch_infer: NULL argument");
    what = ck->path ? ck->path : "checkpoint";
    msx_sam_arch_default(a);
    t = msx__ck_need(ck, "image_encoder.patch_embed.proj.weight", 4, &r);
    if (!t) return r;
    a->embed_dim = (int)t->shape[0];
    a->in_chans = (int)t->shape[1];
    a->patch_size = (int)t->shape[2];
    if (t->shape[2] != t->shape[3] || t->shape[0] <= 0 || t->shape[2] <= 0) return msx__err(MSX_E_SHAPE, "%s: patch_embed.proj.weight has a non-square or empty kernel", what);
    pe = msx_ckpt_find(ck, "image_encoder.pos_embed");
    a->use_abs_pos = pe != NULL;
    if (pe) {
        if (pe->ndim != 4 || pe->shape[1] != pe->shape[2] || pe->shape[1] <= 0) return msx__err(MSX_E_SHAPE, "%s: image_encoder.pos_embed must be 1 x H x H x C", what);
        g = (int)pe->shape[1];
    }
    for (i = 0; i < 64; i++) {
        snprintf(b, sizeof b, "image_encoder.blocks.%d.norm1.weight", i);
        if (!msx_ckpt_find(ck, b)) break;
    }
    if (i == 0) return msx__err(MSX_E_KEY_MISMATCH, "%s: not a SAM checkpoint: no image_encoder.blocks.0.*", what);
    a->depth = i;
    t = msx__ck_need(ck, "image_encoder.blocks.0.mlp.lin1.weight", 2, &r);
    if (!t) return r;
    a->mlp_dim = (int)t->shape[0];
    /* Rel-pos tables: head_dim = columns; rows = 2*window-1 (windowed) or 2*grid-1 (global). */
    snprintf(b, sizeof b, "image_encoder.blocks.0.attn.rel_pos_h");
    a->use_rel_pos = msx_ckpt_find(ck, b) != NULL;
    a->n_global = 0;
    if (a->use_rel_pos) {
        for (i = 0; i < a->depth; i++) {
            snprintf(b, sizeof b, "image_encoder.blocks.%d.attn.rel_pos_h", i);
            t = msx__ck_need(ck, b, 2, &r);
            if (!t) return r;
            if (t->shape[0] > rows_max) rows_max = (int)t->shape[0];
            if (i == 0) {
                if (t->shape[1] <= 0 || a->embed_dim % t->shape[1]) return msx__err(MSX_E_SHAPE, "%s: rel_pos_h of block 0 has %lld columns, which does not divide embed_dim %d", what, (long long)t->shape[1], a->embed_dim);
                a->num_heads = a->embed_dim / (int)t->shape[1];
            }
        }
        if (!g) g = (rows_max + 1) / 2;
        glob_rows = 2 * g - 1;
        for (i = 0; i < a->depth; i++) {
            snprintf(b, sizeof b, "image_encoder.blocks.%d.attn.rel_pos_h", i);
            t = msx_ckpt_find(ck, b);
            if (t->shape[0] == glob_rows) a->global_idx[a->n_global++] = i;
            else if (!win_rows) win_rows = (int)t->shape[0];
        }
        a->window_size = win_rows ? (win_rows + 1) / 2 : 0;
    } else {
        /* Shapes cannot tell heads, window or global blocks: SAM's pattern
           (head dim 64, window 14, 4 evenly spaced global blocks); a JSON
           config can override. */
        a->num_heads = a->embed_dim % 64 == 0 ? a->embed_dim / 64 : 1;
        a->n_global = a->depth >= 4 ? 4 : a->depth;
        for (i = 0; i < a->n_global; i++) a->global_idx[i] = (i + 1) * a->depth / a->n_global - 1;
    }
    if (!g) return msx__err(MSX_E_KEY_MISMATCH, "%s: neither pos_embed nor rel-pos tables: the image size cannot be inferred (give a JSON config)", what);
    a->img_size = g * a->patch_size;
    t = msx__ck_need(ck, "image_encoder.neck.0.weight", 4, &r);
    if (!t) return r;
    a->out_chans = (int)t->shape[0];
    t = msx__ck_need(ck, "prompt_encoder.point_embeddings.0.weight", 2, &r);
    if (!t) return r;
    a->prompt_dim = (int)t->shape[1];
    t = msx__ck_need(ck, "prompt_encoder.mask_downscaling.3.weight", 4, &r);
    if (!t) return r;
    a->mask_in_chans = (int)t->shape[0];
    for (i = 0; i < 64; i++) {
        snprintf(b, sizeof b, "mask_decoder.transformer.layers.%d.norm1.weight", i);
        if (!msx_ckpt_find(ck, b)) break;
    }
    a->dec_depth = i;
    t = msx__ck_need(ck, "mask_decoder.iou_token.weight", 2, &r);
    if (!t) return r;
    a->dec_dim = (int)t->shape[1];
    t = msx__ck_need(ck, "mask_decoder.transformer.layers.0.mlp.lin1.weight", 2, &r);
    if (!t) return r;
    a->dec_mlp_dim = (int)t->shape[0];
    t = msx__ck_need(ck, "mask_decoder.transformer.final_attn_token_to_image.q_proj.weight", 2, &r);
    if (!t) return r;
    a->dec_downsample = t->shape[0] > 0 && t->shape[1] % t->shape[0] == 0 ? (int)(t->shape[1] / t->shape[0]) : 2;
    t = msx__ck_need(ck, "mask_decoder.mask_tokens.weight", 2, &r);
    if (!t) return r;
    a->num_mask_tokens = (int)t->shape[0];
    for (i = 0; i < 64; i++) {
        snprintf(b, sizeof b, "mask_decoder.iou_prediction_head.layers.%d.weight", i);
        if (!msx_ckpt_find(ck, b)) break;
    }
    a->iou_head_depth = i;
    t = msx__ck_need(ck, "mask_decoder.iou_prediction_head.layers.0.weight", 2, &r);
    if (!t) return r;
    a->iou_head_hidden = (int)t->shape[0];
    a->dec_heads = 8; /* not visible in shapes */
    while (a->dec_heads > 1 && (a->dec_dim % a->dec_heads || (a->dec_dim / a->dec_downsample) % a->dec_heads)) a->dec_heads /= 2;
    msx__sam_derive(a);
    return msx__sam_arch_check(a, what);
}

/* ---- JSON config ----------------------------------------------------------------- */

static msx_result msx__ck_jint(const msx__json *o, const char *key, int *dst, const char *what) {
    const msx__json *v = msx__json_get(o, key);
    if (!v) return MSX_OK;
    if (v->type == MSX__JBOOL) { *dst = v->num != 0; return MSX_OK; }
    if (v->type != MSX__JNUM || !(v->num >= 0 && v->num <= (1 << 24)) || floor(v->num) != v->num)
        return msx__err(MSX_E_ARG, "%s: config key '%s' must be a non-negative integer", what, key);
    *dst = (int)v->num;
    return MSX_OK;
}
static msx_result msx__ck_jlist(const msx__json *o, const char *key, int *dst, int *n, const char *what) {
    const msx__json *v = msx__json_get(o, key);
    int k;
    if (!v) return MSX_OK;
    if (v->type != MSX__JARR || v->n > 64) return msx__err(MSX_E_ARG, "%s: config key '%s' must be a list of at most 64 block indices", what, key);
    for (k = 0; k < v->n; k++) {
        if (v->kids[k].type != MSX__JNUM || !(v->kids[k].num >= 0 && v->kids[k].num < 64) || floor(v->kids[k].num) != v->kids[k].num)
            return msx__err(MSX_E_ARG, "%s: config key '%s' has an invalid block index", what, key);
        dst[k] = (int)v->kids[k].num;
    }
    *n = v->n;
    return MSX_OK;
}
static msx_result msx__ck_jvec3(const msx__json *o, const char *key, float *dst, const char *what) {
    const msx__json *v = msx__json_get(o, key);
    int k;
    if (!v) return MSX_OK;
    if (v->type != MSX__JARR || v->n != 3) return msx__err(MSX_E_ARG, "%s: config key '%s' must be a list of 3 numbers", what, key);
    for (k = 0; k < 3; k++) {
        if (v->kids[k].type != MSX__JNUM) return msx__err(MSX_E_ARG, "%s: config key '%s' must hold numbers", what, key);
        dst[k] = (float)v->kids[k].num;
    }
    return MSX_OK;
}
static msx_result msx__ck_jratio(const msx__json *o, const char *key, double *dst, const char *what) {
    const msx__json *v = msx__json_get(o, key);
    if (!v) return MSX_OK;
    if (v->type != MSX__JNUM || !(v->num > 0 && v->num <= 64)) return msx__err(MSX_E_ARG, "%s: config key '%s' must be a positive number", what, key);
    *dst = v->num;
    return MSX_OK;
}

/* Applies one object of flat names: msx_sam_arch field names and build_sam names. */
static msx_result msx__ck_apply_flat(const msx__json *o, msx_sam_arch *a, double *ratio, const char *w) {
    msx_result r = MSX_OK;
    int dim = -1;
#define MSX__JI(k, f) if (r == MSX_OK) r = msx__ck_jint(o, k, &a->f, w)
    MSX__JI("img_size", img_size); MSX__JI("image_size", img_size);
    MSX__JI("patch_size", patch_size); MSX__JI("vit_patch_size", patch_size);
    MSX__JI("in_chans", in_chans);
    MSX__JI("embed_dim", embed_dim); MSX__JI("encoder_embed_dim", embed_dim);
    MSX__JI("depth", depth); MSX__JI("encoder_depth", depth);
    MSX__JI("num_heads", num_heads); MSX__JI("encoder_num_heads", num_heads);
    MSX__JI("mlp_dim", mlp_dim);
    MSX__JI("window_size", window_size);
    MSX__JI("use_rel_pos", use_rel_pos); MSX__JI("use_abs_pos", use_abs_pos);
    MSX__JI("out_chans", out_chans);
    MSX__JI("prompt_dim", prompt_dim);
    MSX__JI("mask_in_chans", mask_in_chans);
    MSX__JI("dec_depth", dec_depth); MSX__JI("transformer_depth", dec_depth);
    MSX__JI("dec_dim", dec_dim); MSX__JI("transformer_dim", dec_dim); MSX__JI("transformer_embedding_dim", dec_dim);
    MSX__JI("dec_mlp_dim", dec_mlp_dim); MSX__JI("transformer_mlp_dim", dec_mlp_dim);
    MSX__JI("dec_heads", dec_heads); MSX__JI("transformer_num_heads", dec_heads);
    MSX__JI("dec_downsample", dec_downsample); MSX__JI("transformer_attention_downsample_rate", dec_downsample);
    MSX__JI("num_mask_tokens", num_mask_tokens);
    MSX__JI("iou_head_depth", iou_head_depth);
    MSX__JI("iou_head_hidden", iou_head_hidden); MSX__JI("iou_head_hidden_dim", iou_head_hidden);
#undef MSX__JI
    if (r == MSX_OK) r = msx__ck_jint(o, "prompt_embed_dim", &dim, w);
    if (r == MSX_OK && dim >= 0) a->out_chans = a->prompt_dim = a->dec_dim = dim;
    dim = -1;
    if (r == MSX_OK) r = msx__ck_jint(o, "num_multimask_outputs", &dim, w);
    if (r == MSX_OK && dim >= 0) a->num_mask_tokens = dim + 1;
    if (r == MSX_OK) r = msx__ck_jlist(o, "global_idx", a->global_idx, &a->n_global, w);
    if (r == MSX_OK) r = msx__ck_jlist(o, "encoder_global_attn_indexes", a->global_idx, &a->n_global, w);
    if (r == MSX_OK) r = msx__ck_jlist(o, "global_attn_indexes", a->global_idx, &a->n_global, w);
    if (r == MSX_OK) r = msx__ck_jvec3(o, "pixel_mean", a->pixel_mean, w);
    if (r == MSX_OK) r = msx__ck_jvec3(o, "pixel_std", a->pixel_std, w);
    if (r == MSX_OK) r = msx__ck_jratio(o, "mlp_ratio", ratio, w);
    return r;
}

MSXDEF msx_result msx_sam_arch_parse_json(const char *text, size_t len, const char *what, msx_sam_arch *a) {
    msx__json *j;
    const msx__json *ie, *pe, *md, *tr;
    msx_result r;
    double ratio = 0;
    int dim = -1;
    msx_sam_arch tmp;
    if (!text || !a) return msx__err(MSX_E_ARG, "msx_sam_arch_parse_json: NULL argument");
    if (!what) what = "config";
    j = msx__json_parse(text, len, what);
    if (!j) return msx__errcode;
    if (j->type != MSX__JOBJ) { msx__json_free(j); return msx__err(MSX_E_FORMAT, "%s: config is not a JSON object", what); }
    tmp = *a; /* applied to a copy: a failed parse leaves *a untouched */
    r = msx__ck_apply_flat(j, &tmp, &ratio, what);
    if (r == MSX_OK && msx__json_get(j, "build_sam_names")) r = msx__ck_apply_flat(msx__json_get(j, "build_sam_names"), &tmp, &ratio, what);
    /* Official constructor-argument layout. */
    ie = msx__json_get(j, "image_encoder");
    pe = msx__json_get(j, "prompt_encoder");
    md = msx__json_get(j, "mask_decoder");
    tr = msx__json_get(md, "transformer");
    if (r == MSX_OK && ie && ie->type == MSX__JOBJ) r = msx__ck_apply_flat(ie, &tmp, &ratio, what);
    if (r == MSX_OK && pe && pe->type == MSX__JOBJ) {
        r = msx__ck_jint(pe, "embed_dim", &tmp.prompt_dim, what);
        if (r == MSX_OK) r = msx__ck_jint(pe, "mask_in_chans", &tmp.mask_in_chans, what);
    }
    if (r == MSX_OK && md && md->type == MSX__JOBJ) {
        r = msx__ck_jint(md, "transformer_dim", &tmp.dec_dim, what);
        if (r == MSX_OK) r = msx__ck_jint(md, "num_multimask_outputs", &dim, what);
        if (r == MSX_OK && dim >= 0) tmp.num_mask_tokens = dim + 1;
        if (r == MSX_OK) r = msx__ck_jint(md, "iou_head_depth", &tmp.iou_head_depth, what);
        if (r == MSX_OK) r = msx__ck_jint(md, "iou_head_hidden_dim", &tmp.iou_head_hidden, what);
    }
    if (r == MSX_OK && tr && tr->type == MSX__JOBJ) {
        r = msx__ck_jint(tr, "depth", &tmp.dec_depth, what);
        if (r == MSX_OK) r = msx__ck_jint(tr, "embedding_dim", &tmp.dec_dim, what);
        if (r == MSX_OK) r = msx__ck_jint(tr, "mlp_dim", &tmp.dec_mlp_dim, what);
        if (r == MSX_OK) r = msx__ck_jint(tr, "num_heads", &tmp.dec_heads, what);
        if (r == MSX_OK) r = msx__ck_jint(tr, "attention_downsample_rate", &tmp.dec_downsample, what);
    }
    if (r == MSX_OK && ratio > 0 && !msx__json_get(j, "mlp_dim")) tmp.mlp_dim = (int)floor(tmp.embed_dim * ratio + 0.5);
    msx__json_free(j);
    if (r != MSX_OK) return r;
    msx__sam_derive(&tmp);
    *a = tmp;
    return MSX_OK;
}

MSXDEF msx_result msx_sam_arch_load_json(const char *path, msx_sam_arch *a) {
    void *text;
    size_t len;
    msx_result r;
    if (!path || !a) return msx__err(MSX_E_ARG, "msx_sam_arch_load_json: NULL argument");
    r = msx_read_file(path, (size_t)16 << 20, &text, &len);
    if (r != MSX_OK) return r;
    r = msx_sam_arch_parse_json((const char *)text, len, path, a);
    msx_free(text);
    return r;
}

/* Shortest decimal that reads back as the same float (123.675, not 123.67500305...). */
static void msx__ck_json_float(msx__sb *b, float v) {
    char tmp[40];
    int p;
    if (!isfinite(v)) { msx__sb_puts(b, "null"); return; }
    for (p = 6; p <= 9; p++) {
        snprintf(tmp, sizeof tmp, "%.*g", p, (double)v);
        if (strtof(tmp, NULL) == v) break;
    }
    msx__sb_puts(b, tmp);
}

MSXDEF msx_result msx_sam_arch_to_json(const msx_sam_arch *a, char **json) {
    msx__sb b = {0, 0, 0, 0};
    int k;
    if (!a || !json) return msx__err(MSX_E_ARG, "msx_sam_arch_to_json: NULL argument");
    *json = NULL;
    msx__sb_printf(&b, "{\"img_size\":%d,\"patch_size\":%d,\"in_chans\":%d,\"embed_dim\":%d,\"depth\":%d,\"num_heads\":%d,"
                   "\"mlp_dim\":%d,\"window_size\":%d,\"global_idx\":[",
                   a->img_size, a->patch_size, a->in_chans, a->embed_dim, a->depth, a->num_heads, a->mlp_dim, a->window_size);
    for (k = 0; k < a->n_global && k < 64; k++) msx__sb_printf(&b, k ? ",%d" : "%d", a->global_idx[k]);
    msx__sb_printf(&b, "],\"use_rel_pos\":%s,\"use_abs_pos\":%s,\"rel_pos_len_win\":%d,\"rel_pos_len_glob\":%d,\"abs_pos_size\":%d,"
                   "\"out_chans\":%d,\"prompt_dim\":%d,\"mask_in_chans\":%d,\"dec_depth\":%d,\"dec_dim\":%d,\"dec_mlp_dim\":%d,"
                   "\"dec_heads\":%d,\"dec_downsample\":%d,\"num_mask_tokens\":%d,\"iou_head_depth\":%d,\"iou_head_hidden\":%d,\"pixel_mean\":[",
                   a->use_rel_pos ? "true" : "false", a->use_abs_pos ? "true" : "false", a->rel_pos_len_win, a->rel_pos_len_glob,
                   a->abs_pos_size, a->out_chans, a->prompt_dim, a->mask_in_chans, a->dec_depth, a->dec_dim, a->dec_mlp_dim,
                   a->dec_heads, a->dec_downsample, a->num_mask_tokens, a->iou_head_depth, a->iou_head_hidden);
    for (k = 0; k < 3; k++) { if (k) msx__sb_puts(&b, ","); msx__ck_json_float(&b, a->pixel_mean[k]); }
    msx__sb_puts(&b, "],\"pixel_std\":[");
    for (k = 0; k < 3; k++) { if (k) msx__sb_puts(&b, ","); msx__ck_json_float(&b, a->pixel_std[k]); }
    msx__sb_puts(&b, "]}");
    if (b.oom) { msx__sb_free(&b); return msx__err(MSX_E_NOMEM, "out of memory"); }
    *json = b.s;
    return MSX_OK;
}

/* ---- validation and canonical order ------------------------------------------------ */

static void msx__ck_shape_str(char *buf, size_t cap, int nd, const int64_t *s) {
    size_t n = 0;
    int k;
    n += (size_t)snprintf(buf + n, cap - n, "[");
    for (k = 0; k < nd && n < cap; k++) n += (size_t)snprintf(buf + n, cap - n, k ? ", %lld" : "%lld", (long long)s[k]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
}

MSXDEF msx_result msx_sam_validate(const msx_checkpoint *ck, const msx_sam_arch *a) {
    msx__samkeys L;
    msx_result r;
    const char *what;
    int i, k, nmiss = 0, nextra = 0;
    msx__sb miss = {0, 0, 0, 0}, extra = {0, 0, 0, 0};
    unsigned char *seen;
    if (!ck || !a) return msx__err(MSX_E_ARG, "msx_sam_validate: NULL argument");
    what = ck->path ? ck->path : "checkpoint";
    if ((r = msx__sam_arch_check(a, what)) != MSX_OK) return r;
    if ((r = msx__sam_keylist(a, &L)) != MSX_OK) return r;
    seen = (unsigned char *)msx__calloc((size_t)ck->n + 1, 1);
    if (!seen) { MSX_FREE(L.k); return msx__err(MSX_E_NOMEM, "out of memory"); }
    for (i = 0; i < L.n; i++) {
        const msx_tensor *t = msx_ckpt_find(ck, L.k[i].name);
        if (!t) {
            if (nmiss < 5) msx__sb_printf(&miss, "%s%s", nmiss ? ", " : "", L.k[i].name);
            nmiss++;
            continue;
        }
        seen[t - ck->tensors] = 1;
        if (r == MSX_OK) {
            int same = t->ndim == L.k[i].ndim;
            for (k = 0; same && k < t->ndim; k++) same = t->shape[k] == L.k[i].shape[k];
            if (!same) {
                char got[96], exp[96];
                msx__ck_shape_str(got, sizeof got, t->ndim, t->shape);
                msx__ck_shape_str(exp, sizeof exp, L.k[i].ndim, L.k[i].shape);
                r = msx__err(MSX_E_SHAPE, "%s: tensor '%s' has shape %s but the architecture needs %s (wrong config?)", what, t->name, got, exp);
            } else if (t->dtype != MSX_F32)
                r = msx__err(MSX_E_SHAPE, "%s: tensor '%s' is %s, expected float32 after loading", what, t->name, msx_dtype_torch_name(t->dtype));
        }
    }
    for (i = 0; i < ck->n; i++)
        if (!seen[i]) {
            if (nextra < 5) msx__sb_printf(&extra, "%s%s", nextra ? ", " : "", ck->tensors[i].name);
            nextra++;
        }
    if (nmiss || nextra)
        r = msx__err(MSX_E_KEY_MISMATCH, "%s: the tensors do not match a SAM with this architecture: %d missing%s%s%s, %d unexpected%s%s%s",
                     what, nmiss, nmiss ? " (" : "", nmiss ? miss.s : "", nmiss ? (nmiss > 5 ? ", ...)" : ")") : "",
                     nextra, nextra ? " (" : "", nextra ? extra.s : "", nextra ? (nextra > 5 ? ", ...)" : ")") : "");
    msx__sb_free(&miss);
    msx__sb_free(&extra);
    MSX_FREE(seen);
    MSX_FREE(L.k);
    return r;
}

MSXDEF msx_result msx_sam_canonical_order(msx_checkpoint *ck, const msx_sam_arch *a) {
    msx__samkeys L;
    msx_tensor *nt;
    msx_result r;
    int i;
    if ((r = msx_sam_validate(ck, a)) != MSX_OK) return r;
    if ((r = msx__sam_keylist(a, &L)) != MSX_OK) return r;
    nt = (msx_tensor *)MSX_MALLOC((size_t)(ck->cap > 0 ? ck->cap : 1) * sizeof *nt);
    if (!nt) { MSX_FREE(L.k); return msx__err(MSX_E_NOMEM, "out of memory"); }
    for (i = 0; i < L.n; i++) nt[i] = *msx_ckpt_find(ck, L.k[i].name); /* validate: a bijection */
    MSX_FREE(ck->tensors);
    ck->tensors = nt;
    MSX_FREE(L.k);
    if (!msx__ckpt_reindex(ck)) return msx__err(MSX_E_NOMEM, "out of memory");
    return MSX_OK;
}

MSXDEF msx_result msx_sam_load(const char *path, const char *config_json, msx_checkpoint **ck, msx_sam_arch *arch) {
    msx_checkpoint *c = NULL;
    msx_sam_arch a;
    msx_result r;
    if (!ck) return msx__err(MSX_E_ARG, "msx_sam_load: ck is NULL");
    *ck = NULL;
    r = msx_ckpt_load(path, &c);
    if (r == MSX_OK) r = msx_sam_arch_infer(c, &a);
    if (r == MSX_OK && config_json) r = msx_sam_arch_load_json(config_json, &a);
    if (r == MSX_OK) r = msx_sam_canonical_order(c, &a); /* validates first */
    if (r != MSX_OK) { msx_ckpt_free(c); return r; }
    if (arch) *arch = a;
    *ck = c;
    return MSX_OK;
}
