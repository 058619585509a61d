/* tests/fuzz/make_corpus.c - writes the small seed corpus of the fuzz
   harnesses (tests/fuzz/corpus/{zip,pickle,safetensors}/). Run from the
   project root: build with tools/fuzz.sh --corpus, or
   cc -std=c99 -I. tests/fuzz/make_corpus.c -lm && ./a.out */
#define MEDSAMIX_IMPLEMENTATION
#include "../../medsamix.h"
#include "mkpth.h"
#include <stdio.h>

static void put(const char *dir, const char *name, const void *p, size_t n) {
    char path[512];
    FILE *f;
    snprintf(path, sizeof path, "tests/fuzz/corpus/%s/%s", dir, name);
    f = fopen(path, "wb");
    if (!f || fwrite(p, 1, n, f) != n) { fprintf(stderr, "cannot write %s\n", path); exit(1); }
    fclose(f);
}

static void pth(const char *name, const mk_buf *pkl, const char *dir, size_t esize, int zip64, size_t cut) {
    static unsigned char stor[64];
    static const char *const keys[1] = {"0"};
    const void *data[1];
    size_t lens[1];
    mk_buf f = {0, 0, 0};
    int i;
    for (i = 0; i < 64; i++) stor[i] = (unsigned char)(i * 7);
    data[0] = stor;
    lens[0] = 12 * esize;
    mk_pth(&f, dir, pkl, 1, keys, data, lens, zip64);
    put("zip", name, f.p, cut && cut < f.n ? cut : f.n);
    mk_free(&f);
}

int main(void) {
    mk_buf p = {0, 0, 0};
    char pk[64];
    /* state dicts: flat, wrapped, prefixed, half types, zip64, truncated */
    mk_two(&p, "", NULL, 0); pth("sd2.pth", &p, "sd2", 4, 0, 0); put("pickle", "sd2.pkl", p.p, p.n);
    p.n = 0; mk_two(&p, "module.", "model", 0); pth("model_module.pth", &p, "archive", 4, 0, 0); put("pickle", "model_module.pkl", p.p, p.n);
    p.n = 0; mk_two(&p, "sam.", "model_state", 0); pth("model_state_sam.pth", &p, "x", 4, 0, 0); put("pickle", "model_state_sam.pkl", p.p, p.n);
    p.n = 0; mk_two_t(&p, "", "state_dict", 0, "BFloat16Storage"); pth("bf16.pth", &p, "b", 2, 0, 0); put("pickle", "bf16.pkl", p.p, p.n);
    p.n = 0; mk_two_t(&p, "", NULL, 0, "HalfStorage"); pth("f16_zip64.pth", &p, "h", 2, 1, 0); put("pickle", "f16.pkl", p.p, p.n);
    p.n = 0; mk_two(&p, "", NULL, 1); pth("dup.pth", &p, "d", 4, 0, 0); put("pickle", "dup.pkl", p.p, p.n);
    p.n = 0; mk_two(&p, "", NULL, 0); pth("truncated.pth", &p, "t", 4, 0, 300);
    /* protocol 4 opcodes and an inert global */
    p.n = 0;
    mk_u8(&p, 0x80); mk_u8(&p, 4); mk_u8(&p, 0x95); mk_u64(&p, 40); mk_u8(&p, '}'); mk_u8(&p, 0x94);
    mk_u8(&p, 0x8c); mk_u8(&p, 5); mk_put(&p, "numpy", 5); mk_u8(&p, 0x8c); mk_u8(&p, 5); mk_put(&p, "dtype", 5); mk_u8(&p, 0x93);
    mk_u8(&p, 0x8c); mk_u8(&p, 2); mk_put(&p, "f4", 2); mk_u8(&p, 0x85); mk_u8(&p, 'R'); mk_u8(&p, '0');
    mk_u8(&p, 'N'); mk_u8(&p, 0x88); mk_u8(&p, 0x8a); mk_u8(&p, 2); mk_u16(&p, 0xFFFF); mk_u8(&p, 'G'); mk_u64(&p, 0x3FF0000000000000ull);
    mk_u8(&p, 0x8f); mk_u8(&p, '('); mk_u8(&p, 'K'); mk_u8(&p, 1); mk_u8(&p, 0x90);
    mk_u8(&p, ']'); mk_u8(&p, 'h'); mk_u8(&p, 0); mk_u8(&p, 'a'); mk_u8(&p, 'b'); mk_u8(&p, '.');
    put("pickle", "proto4.pkl", p.p, p.n);
    pth("proto4.pth", &p, "p4", 4, 0, 0);
    /* protocol 4 state dict: STACK_GLOBAL OrderedDict + NEWOBJ_EX, a strided tensor */
    {
        mk_proto4_sd(&p);
        put("pickle", "proto4_sd.pkl", p.p, p.n);
        pth("proto4_sd.pth", &p, "p4sd", 4, 0, 0);
    }
    /* refused globals */
    p.n = 0; pk_proto(&p); mk_u8(&p, '}'); pk_str(&p, "k"); pk_global(&p, "posix", "system"); pk_str(&p, "true"); mk_u8(&p, 0x85); mk_u8(&p, 'R'); mk_u8(&p, 's'); mk_u8(&p, '.');
    put("pickle", "reduce_system.pkl", p.p, p.n);
    pth("reduce_system.pth", &p, "m", 4, 0, 0);
    /* legacy magic, and a safetensors file */
    {
        static const unsigned char legacy[] = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e, 0x80, 0x02, 0x4d, 0xe9, 0x03, 0x2e};
        put("zip", "legacy_head.pth", legacy, sizeof legacy);
    }
    {
        msx_checkpoint *c = msx_ckpt_new();
        int64_t s2[2] = {3, 2}, s1[1] = {4};
        float w[6] = {1, 2, 3, 4, 5, 6}, b[4] = {-1, 0.5f, 2, 8};
        uint16_t h[4] = {0x3c00, 0xc000, 0x7bff, 0x0001};
        const char *meta[2] = {"format", "pt"};
        void *buf;
        size_t n;
        msx_ckpt_add(c, "w", MSX_F32, 2, s2, w, NULL);
        msx_ckpt_add(c, "module.b", MSX_F32, 1, s1, b, NULL);
        msx_ckpt_add(c, "h", MSX_F16, 1, s1, h, NULL);
        msx_safetensors_save("tests/fuzz/corpus/safetensors/three.safetensors", c, meta, 1);
        if (msx_read_file("tests/fuzz/corpus/safetensors/three.safetensors", 0, &buf, &n) == MSX_OK) {
            put("zip", "three.safetensors", buf, n);
            put("safetensors", "three_cut.safetensors", buf, n - 5);
            msx_free(buf);
        }
        msx_ckpt_free(c);
    }
    snprintf(pk, sizeof pk, "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}");
    {
        mk_buf s = {0, 0, 0};
        mk_u64(&s, strlen(pk)); mk_put(&s, pk, strlen(pk));
        put("safetensors", "empty_tensor.safetensors", s.p, s.n);
        mk_free(&s);
    }
    mk_free(&p);
    printf("corpus written to tests/fuzz/corpus/\n");
    return 0;
}
