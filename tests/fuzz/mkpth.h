/* tests/fuzz/mkpth.h - builds small torch.save-style files in memory for the
   checkpoint tests and the fuzz seed corpus: a pickle byte writer and a
   stored-entry zip writer (optionally with zip64 records). Test-only code;
   uses plain malloc. */
#ifndef MSX_MKPTH_H
#define MSX_MKPTH_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__)
#define MK_FN static __attribute__((unused))
#else
#define MK_FN static
#endif

typedef struct mk_buf { unsigned char *p; size_t n, cap; } mk_buf;

MK_FN void mk_put(mk_buf *b, const void *s, size_t n) {
    if (b->n + n > b->cap) {
        size_t c = b->cap ? b->cap : 256;
        while (c < b->n + n) c *= 2;
        b->p = (unsigned char *)realloc(b->p, c);
        if (!b->p) abort();
        b->cap = c;
    }
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
}
MK_FN void mk_u8(mk_buf *b, unsigned v) { unsigned char c = (unsigned char)v; mk_put(b, &c, 1); }
MK_FN void mk_u16(mk_buf *b, unsigned v) { mk_u8(b, v & 255); mk_u8(b, (v >> 8) & 255); }
MK_FN void mk_u32(mk_buf *b, uint32_t v) { mk_u16(b, v & 0xFFFF); mk_u16(b, v >> 16); }
MK_FN void mk_u64(mk_buf *b, uint64_t v) { mk_u32(b, (uint32_t)v); mk_u32(b, (uint32_t)(v >> 32)); }
MK_FN void mk_free(mk_buf *b) { free(b->p); b->p = NULL; b->n = b->cap = 0; }

/* ---- pickle opcodes (protocol 2, as torch.save writes them) ---- */
MK_FN void pk_op(mk_buf *b, unsigned op) { mk_u8(b, op); }
MK_FN void pk_proto(mk_buf *b) { mk_u8(b, 0x80); mk_u8(b, 2); }
MK_FN void pk_str(mk_buf *b, const char *s) { mk_u8(b, 'X'); mk_u32(b, (uint32_t)strlen(s)); mk_put(b, s, strlen(s)); }
MK_FN void pk_int(mk_buf *b, int32_t v) { mk_u8(b, 'J'); mk_u32(b, (uint32_t)v); }
MK_FN void pk_global(mk_buf *b, const char *mod, const char *name) {
    mk_u8(b, 'c'); mk_put(b, mod, strlen(mod)); mk_u8(b, '\n'); mk_put(b, name, strlen(name)); mk_u8(b, '\n');
}
MK_FN void pk_ints(mk_buf *b, int n, const int64_t *v) {
    int i;
    mk_u8(b, '(');
    for (i = 0; i < n; i++) pk_int(b, (int32_t)v[i]);
    mk_u8(b, 't');
}
/* _rebuild_tensor_v2(('storage', <stype>, key, 'cpu', numel), offset, size, stride, False, OrderedDict()) */
MK_FN void pk_tensor(mk_buf *b, const char *stype, const char *key, int64_t numel, int64_t offset, int nd,
                      const int64_t *shape, const int64_t *stride) {
    pk_global(b, "torch._utils", "_rebuild_tensor_v2");
    mk_u8(b, '(');
    mk_u8(b, '(');
    pk_str(b, "storage");
    pk_global(b, "torch", stype);
    pk_str(b, key);
    pk_str(b, "cpu");
    pk_int(b, (int32_t)numel);
    mk_u8(b, 't');
    mk_u8(b, 'Q');
    pk_int(b, (int32_t)offset);
    pk_ints(b, nd, shape);
    pk_ints(b, nd, stride);
    mk_u8(b, 0x89);
    pk_global(b, "collections", "OrderedDict");
    mk_u8(b, ')');
    mk_u8(b, 'R');
    mk_u8(b, 't');
    mk_u8(b, 'R');
}

/* ---- stored zip ---- */
MK_FN uint32_t mk_crc32(const void *data, size_t n) {
    const unsigned char *p = (const unsigned char *)data;
    uint32_t c = 0xFFFFFFFFu;
    int k;
    while (n--) {
        c ^= *p++;
        for (k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    }
    return c ^ 0xFFFFFFFFu;
}
typedef struct mk_entry { const char *name; const void *data; size_t len; } mk_entry;

/* Writes entries with torch's 64-byte data alignment (padding in the local
   extra field). zip64 != 0: saturated 32-bit fields + zip64 extra, end
   record and locator. method != 0 marks every entry as compressed. */
MK_FN void mk_zip(mk_buf *z, const mk_entry *e, int n, int zip64, int method) {
    size_t *lho = (size_t *)malloc((size_t)n * sizeof(size_t) + 1);
    size_t cd_start, cd_size;
    int i;
    static const unsigned char zeros[64] = {0};
    for (i = 0; i < n; i++) {
        size_t nl = strlen(e[i].name), hdr, pad;
        lho[i] = z->n;
        hdr = z->n + 30 + nl + 4;
        pad = (64 - hdr % 64) % 64;
        mk_u32(z, 0x04034b50u); mk_u16(z, 20); mk_u16(z, 0); mk_u16(z, (unsigned)method); mk_u16(z, 0); mk_u16(z, 0);
        mk_u32(z, mk_crc32(e[i].data, e[i].len)); mk_u32(z, (uint32_t)e[i].len); mk_u32(z, (uint32_t)e[i].len);
        mk_u16(z, (unsigned)nl); mk_u16(z, (unsigned)(4 + pad));
        mk_put(z, e[i].name, nl);
        mk_u16(z, 0x5346); mk_u16(z, (unsigned)pad); mk_put(z, zeros, pad); /* "FS" padding field like torch */
        mk_put(z, e[i].data, e[i].len);
    }
    cd_start = z->n;
    for (i = 0; i < n; i++) {
        size_t nl = strlen(e[i].name);
        mk_u32(z, 0x02014b50u); mk_u16(z, 20); mk_u16(z, zip64 ? 45 : 20); mk_u16(z, 0); mk_u16(z, (unsigned)method);
        mk_u16(z, 0); mk_u16(z, 0); mk_u32(z, mk_crc32(e[i].data, e[i].len));
        mk_u32(z, zip64 ? 0xFFFFFFFFu : (uint32_t)e[i].len); mk_u32(z, zip64 ? 0xFFFFFFFFu : (uint32_t)e[i].len);
        mk_u16(z, (unsigned)nl); mk_u16(z, zip64 ? 28 : 0); mk_u16(z, 0); mk_u16(z, 0); mk_u16(z, 0); mk_u32(z, 0);
        mk_u32(z, zip64 ? 0xFFFFFFFFu : (uint32_t)lho[i]);
        mk_put(z, e[i].name, nl);
        if (zip64) { mk_u16(z, 1); mk_u16(z, 24); mk_u64(z, e[i].len); mk_u64(z, e[i].len); mk_u64(z, lho[i]); }
    }
    cd_size = z->n - cd_start;
    if (zip64) {
        size_t z64 = z->n;
        mk_u32(z, 0x06064b50u); mk_u64(z, 44); mk_u16(z, 45); mk_u16(z, 45); mk_u32(z, 0); mk_u32(z, 0);
        mk_u64(z, (uint64_t)n); mk_u64(z, (uint64_t)n); mk_u64(z, cd_size); mk_u64(z, cd_start);
        mk_u32(z, 0x07064b50u); mk_u32(z, 0); mk_u64(z, z64); mk_u32(z, 1);
    }
    mk_u32(z, 0x06054b50u); mk_u16(z, 0); mk_u16(z, 0);
    mk_u16(z, zip64 ? 0xFFFF : (unsigned)n); mk_u16(z, zip64 ? 0xFFFF : (unsigned)n);
    mk_u32(z, zip64 ? 0xFFFFFFFFu : (uint32_t)cd_size); mk_u32(z, zip64 ? 0xFFFFFFFFu : (uint32_t)cd_start); mk_u16(z, 0);
    free(lho);
}

/* A torch.save file "<dir>/data.pkl" + "<dir>/data/<k>" storages + version. */
MK_FN void mk_pth(mk_buf *out, const char *dir, const mk_buf *pkl, int nstor, const char *const *keys,
                   const void *const *data, const size_t *lens, int zip64) {
    mk_entry e[40];
    char names[40][128];
    int i, n = 0;
    snprintf(names[n], sizeof names[n], "%s/data.pkl", dir);
    e[n].name = names[n]; e[n].data = pkl->p; e[n].len = pkl->n; n++;
    for (i = 0; i < nstor && n < 38; i++) {
        snprintf(names[n], sizeof names[n], "%s/data/%s", dir, keys[i]);
        e[n].name = names[n]; e[n].data = data[i]; e[n].len = lens[i]; n++;
    }
    snprintf(names[n], sizeof names[n], "%s/version", dir);
    e[n].name = names[n]; e[n].data = "3\n"; e[n].len = 2; n++;
    mk_zip(out, e, n, zip64, 0);
}
/* {prefix+"w": 3x2 transposed view of storage 0 (offset 2), prefix+"b": slice [4..8) of storage 0} */
MK_FN void mk_two_t(mk_buf *pkl, const char *prefix, const char *wrap, int dup, const char *stype) {
    int64_t s_w[2] = {3, 2}, st_w[2] = {1, 3}, s_b[1] = {4}, st_b[1] = {1};
    char n1[64], n2[64];
    snprintf(n1, sizeof n1, "%sw", prefix);
    snprintf(n2, sizeof n2, "%s%s", prefix, dup ? "w" : "b");
    pk_proto(pkl);
    if (wrap) { pk_op(pkl, '}'); pk_op(pkl, '('); pk_str(pkl, "epoch"); pk_int(pkl, 3); pk_str(pkl, wrap); }
    pk_global(pkl, "collections", "OrderedDict");
    pk_op(pkl, ')');
    pk_op(pkl, 'R');
    pk_op(pkl, '(');
    pk_str(pkl, n1);
    pk_tensor(pkl, stype, "0", 12, 2, 2, s_w, st_w);
    pk_str(pkl, n2);
    pk_tensor(pkl, stype, "0", 12, 4, 1, s_b, st_b);
    pk_op(pkl, 'u');
    /* state_dict()'s trailing BUILD with _metadata */
    pk_op(pkl, '}'); pk_op(pkl, '('); pk_str(pkl, ""); pk_op(pkl, '}'); pk_op(pkl, 'u');
    pk_op(pkl, 'b');
    if (wrap) pk_op(pkl, 'u');
    pk_op(pkl, '.');
}

MK_FN void mk_two(mk_buf *pkl, const char *prefix, const char *wrap, int dup) { mk_two_t(pkl, prefix, wrap, dup, "FloatStorage"); }
/* Protocol 4 state dict {"module.v": 3 floats at stride 2 of storage "0"}:
   FRAME, SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL, NEWOBJ_EX. */
MK_FN void mk_proto4_sd(mk_buf *p) {
    int64_t s[1] = {3}, st[1] = {2};
    p->n = 0;
    mk_u8(p, 0x80); mk_u8(p, 4); mk_u8(p, 0x95); mk_u64(p, 0);
    mk_u8(p, 0x8c); mk_u8(p, 11); mk_put(p, "collections", 11); mk_u8(p, 0x94);
    mk_u8(p, 0x8c); mk_u8(p, 11); mk_put(p, "OrderedDict", 11); mk_u8(p, 0x94);
    mk_u8(p, 0x93); mk_u8(p, ')'); mk_u8(p, '}'); mk_u8(p, 0x92); mk_u8(p, 0x94);
    mk_u8(p, '('); mk_u8(p, 0x8c); mk_u8(p, 8); mk_put(p, "module.v", 8);
    pk_tensor(p, "FloatStorage", "0", 12, 0, 1, s, st);
    mk_u8(p, 'u'); mk_u8(p, '.');
}
#endif
