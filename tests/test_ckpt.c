/* tests/test_ckpt.c - checkpoint loading against PyTorch's own digests, the
   layout fixtures of tests/data/checkpoints, hand-made pickles for every
   refusal path, truncated and mutated files, and the SAM architecture
   against the config.json files written beside the checkpoints. */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "test.h"
#include "fuzz/mkpth.h"

/* A scratch file name in $TMPDIR (or /tmp), unique to this process. */
static const char *tmp_path(const char *name) {
    static char buf[2][512];
    static int k;
    const char *dir = getenv("TMPDIR");
    char *b = buf[k++ & 1];
    snprintf(b, sizeof buf[0], "%s/msx_test_ckpt_%ld_%s", dir && *dir ? dir : "/tmp", (long)getpid(), name);
    return b;
}

static msx__json *load_json(const char *path) {
    void *text;
    size_t len;
    msx__json *j;
    if (msx_read_file(path, 0, &text, &len) != MSX_OK) return NULL;
    j = msx__json_parse((const char *)text, len, path);
    msx_free(text);
    return j;
}

/* Every tensor of ck against a digest written by PyTorch: names (and order
   when check_order), stored dtype, shape, float64 sums (<= 1e-9 relative to
   the absolute sum) and the first values (exact). */
static void check_digest(const msx_checkpoint *ck, const char *digest, int check_order, const char *label) {
    msx__json *j = load_json(digest);
    const msx__json *ts;
    int i, k, bad = 0;
    MSX_CHECK(j != NULL, "%s: cannot read %s", label, digest);
    if (!j) return;
    ts = msx__json_get(j, "tensors");
    MSX_CHECK(ts && ts->type == MSX__JARR, "%s: digest has no tensors", label);
    if (!ts) { msx__json_free(j); return; }
    MSX_CHECK(ts->n == ck->n, "%s: %d tensors, digest has %d", label, ck->n, ts->n);
    for (i = 0; i < ts->n; i++) {
        const msx__json *d = &ts->kids[i], *sh = msx__json_get(d, "shape"), *first = msx__json_get(d, "first");
        const char *name = msx__json_str(d, "name"), *dtype = msx__json_str(d, "dtype");
        const msx_tensor *t = name ? msx_ckpt_find(ck, name) : NULL;
        double sum, asum, ds = 0, da = 0;
        int ok = 1;
        if (!t) { MSX_CHECK(0, "%s: tensor '%s' missing", label, name ? name : "?"); bad++; continue; }
        if (check_order && i < ck->n) MSX_CHECK(!strcmp(ck->tensors[i].name, name), "%s: tensor %d is '%s', torch order has '%s'", label, i, ck->tensors[i].name, name);
        MSX_CHECK(dtype && !strcmp(dtype, msx_dtype_torch_name(t->src_dtype)), "%s: '%s' stored dtype %s, digest %s", label, name, msx_dtype_torch_name(t->src_dtype), dtype ? dtype : "?");
        MSX_CHECK(t->dtype == MSX_F32, "%s: '%s' not converted to float32", label, name);
        ok = sh && sh->n == t->ndim;
        for (k = 0; ok && k < sh->n; k++) ok = sh->kids[k].num == (double)t->shape[k];
        MSX_CHECK(ok, "%s: '%s' shape differs from the digest", label, name);
        msx_tensor_sums(t, &sum, &asum);
        msx__json_num(d, "sum", &ds, 0);
        msx__json_num(d, "abs_sum", &da, 0);
        MSX_CHECK(fabs(sum - ds) <= 1e-9 * da + 1e-300, "%s: '%s' sum %.17g, torch %.17g", label, name, sum, ds);
        MSX_CHECK(fabs(asum - da) <= 1e-9 * da + 1e-300, "%s: '%s' abs_sum %.17g, torch %.17g", label, name, asum, da);
        ok = first && first->type == MSX__JARR && first->n >= 1 && first->n <= t->numel;
        for (k = 0; ok && k < first->n; k++) ok = ((const float *)t->data)[k] == (float)first->kids[k].num;
        MSX_CHECK(ok, "%s: '%s' first values differ from the digest", label, name);
    }
    msx__json_free(j);
}

static void test_goldens(void) {
    static const char *const files[][2] = {
        {"golden/sam/tiny_a/model.pth", "golden/sam/tiny_a/weights_digest.json"},
        {"golden/sam/tiny_b/model.pth", "golden/sam/tiny_b/weights_digest.json"},
    };
    static const char *const demo[] = {"base", "spec_ct", "spec_mri"};
    char p[512], d[512];
    size_t i;
    for (i = 0; i < 2; i++) {
        msx_checkpoint *ck = NULL;
        MSX_CHECK_OK(msx_ckpt_load(msx_test_path(files[i][0]), &ck));
        if (ck) check_digest(ck, msx_test_path(files[i][1]), 1, files[i][0]);
        msx_ckpt_free(ck);
    }
    for (i = 0; i < 3; i++) {
        msx_checkpoint *ck = NULL;
        snprintf(p, sizeof p, "examples/demo/models/%s.pth", demo[i]);
        snprintf(d, sizeof d, "examples/demo/models/%s.digest.json", demo[i]);
        MSX_CHECK_OK(msx_ckpt_load(p, &ck));
        if (ck) check_digest(ck, d, 1, p);
        msx_ckpt_free(ck);
    }
}

/* IEEE binary16 round-to-nearest-even (reference for the f16 fixture). */
static uint16_t ref_f32_to_f16(float f) {
    uint32_t x, sign, man, h, rem, half;
    int32_t exp;
    int shift;
    memcpy(&x, &f, 4);
    sign = (x >> 16) & 0x8000u;
    exp = (int32_t)((x >> 23) & 0xFF) - 127 + 15;
    man = x & 0x7FFFFFu;
    if (((x >> 23) & 0xFF) == 0xFF) return (uint16_t)(sign | 0x7C00u | (man ? 0x200u : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7C00u);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000u;
        shift = 14 - exp;
        h = man >> shift;
        rem = man & ((1u << shift) - 1);
        half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    h = ((uint32_t)exp << 10) | (man >> 13);
    rem = man & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++; /* a carry into the exponent is right */
    return (uint16_t)(sign | h);
}

static void test_layouts(void) {
    static const char *const same[] = {"checkpoints/tiny_a_model_state_sam_prefix.pt", "checkpoints/tiny_a_model_module_prefix.pth",
                                       "checkpoints/tiny_a_views.pth", "checkpoints/tiny_a_weights.safetensors"};
    msx_checkpoint *ref = NULL, *ck = NULL;
    size_t i;
    int k;
    MSX_CHECK_OK(msx_ckpt_load(msx_test_path("golden/sam/tiny_a/model.pth"), &ref));
    if (!ref) return;
    for (i = 0; i < sizeof same / sizeof same[0]; i++) {
        int equal = 1;
        MSX_CHECK_OK(msx_ckpt_load(msx_test_path(same[i]), &ck));
        if (!ck) continue;
        check_digest(ck, msx_test_path("golden/sam/tiny_a/weights_digest.json"), 1, same[i]);
        MSX_CHECK(ck->n == ref->n, "%s: %d tensors", same[i], ck->n);
        for (k = 0; k < ref->n && equal; k++) {
            const msx_tensor *a = &ref->tensors[k], *b = msx_ckpt_find(ck, a->name);
            equal = b && b->numel == a->numel && !memcmp(a->data, b->data, (size_t)a->numel * 4);
        }
        MSX_CHECK(equal, "%s: values differ from tiny_a/model.pth (first at tensor %d)", same[i], k - 1);
        msx_ckpt_free(ck);
        ck = NULL;
    }
    /* f16 / bf16: every value equals the rounded original. */
    for (i = 0; i < 2; i++) {
        const char *f = i ? "checkpoints/tiny_a_bf16.pth" : "checkpoints/tiny_a_f16.pth";
        int64_t bad = 0, n = 0, j;
        MSX_CHECK_OK(msx_ckpt_load(msx_test_path(f), &ck));
        if (!ck) continue;
        MSX_CHECK(ck->n == ref->n, "%s: %d tensors", f, ck->n);
        for (k = 0; k < ref->n; k++) {
            const msx_tensor *a = &ref->tensors[k], *b = msx_ckpt_find(ck, a->name);
            if (!b || b->numel != a->numel || b->dtype != MSX_F32 || b->src_dtype != (i ? MSX_BF16 : MSX_F16)) { bad++; continue; }
            for (j = 0; j < a->numel; j++, n++) {
                float x = ((const float *)a->data)[j], y = ((const float *)b->data)[j];
                float want = i ? msx__bf16_to_f32(msx__f32_to_bf16(x)) : msx__f16_to_f32(ref_f32_to_f16(x));
                if (memcmp(&want, &y, 4)) bad++;
            }
        }
        MSX_CHECK(bad == 0 && n == 307628, "%s: %lld of %lld values differ from the rounded originals", f, (long long)bad, (long long)n);
        msx_ckpt_free(ck);
        ck = NULL;
    }
    /* Refusals. */
    MSX_CHECK(msx_ckpt_load(msx_test_path("checkpoints/tiny_a_legacy.pth"), &ck) == MSX_E_UNSUPPORTED && !ck, "legacy accepted");
    MSX_CHECK(strstr(msx_last_error(), "legacy") && strstr(msx_last_error(), "torch.save(torch.load("), "legacy message: %s", msx_last_error());
    MSX_CHECK(msx_ckpt_load(msx_test_path("checkpoints/tiny_a_malicious_reduce.pth"), &ck) == MSX_E_UNSAFE && !ck, "malicious accepted");
    MSX_CHECK(strstr(msx_last_error(), "posix.system") != NULL, "malicious message: %s", msx_last_error());
    {
        msx_sam_arch a;
        MSX_CHECK(msx_sam_load(msx_test_path("checkpoints/tiny_a_malicious_reduce.pth"), NULL, &ck, &a) == MSX_E_UNSAFE && !ck, "malicious loads as a model");
    }
    MSX_CHECK(msx_ckpt_load(msx_test_path("checkpoints/README.md"), &ck) == MSX_E_FORMAT && !ck, "text file accepted");
    /* One flipped bit inside a storage: the CRC check names the entry. */
    {
        void *f;
        size_t n;
        if (msx_read_file(msx_test_path("golden/sam/tiny_a/model.pth"), 0, &f, &n) == MSX_OK) {
            ((unsigned char *)f)[n / 2] ^= 0x10;
            MSX_CHECK(msx_ckpt_load_mem(f, n, "flipped.pth", &ck) == MSX_E_FORMAT && !ck && strstr(msx_last_error(), "CRC-32") && strstr(msx_last_error(), "model/data/"), "bit flip: %s", msx_last_error());
            msx_free(f);
        }
    }
    MSX_CHECK(msx_ckpt_load(msx_test_path("checkpoints/does_not_exist.pth"), &ck) == MSX_E_IO && !ck, "missing file");
    msx_ckpt_free(ref);
}

/* Truncated copies (exact-size buffers, so ASan sees any over-read) and
   random byte mutations of the zip directory and the pickle. */
static void test_truncated_and_mutated(void) {
    void *file;
    size_t len, cut, i, cd_pkl = 0;
    int refused = 0, tries = 0, it;
    msx_rng rng;
    msx__zip z;
    const msx__zent *pkl = NULL;
    MSX_CHECK_OK(msx_read_file(msx_test_path("golden/sam/tiny_b/model.pth"), 0, &file, &len));
    if (!file) return;
    for (cut = 0; cut < len; cut += (cut < 128 || cut > len - 256) ? 1 : len / 300 + 1) {
        unsigned char *b = (unsigned char *)malloc(cut ? cut : 1);
        msx_checkpoint *ck = NULL;
        msx_result r;
        memcpy(b, file, cut);
        msx_clear_error(); /* the message checked below must come from this call */
        r = msx_ckpt_load_mem(b, cut, "cut", &ck);
        tries++;
        if (r != MSX_OK && !ck && msx_last_error()[0]) refused++;
        msx_ckpt_free(ck);
        free(b);
    }
    MSX_CHECK(refused == tries, "%d of %d truncated copies refused", refused, tries);
    /* Mutations: 1-4 random bytes in the central directory or data.pkl. */
    MSX_CHECK_OK(msx__zip_open((const unsigned char *)file, len, "tiny_b", &z));
    for (i = 0; i < (size_t)z.n; i++)
        if (z.e[i].name_len >= 8 && !memcmp(z.e[i].name + z.e[i].name_len - 8, "data.pkl", 8)) pkl = &z.e[i];
    MSX_CHECK(pkl != NULL, "no data.pkl");
    /* Central directory record of data.pkl, to keep its CRC valid after
       mutating the pickle (otherwise the CRC check stops every mutant). */
    for (i = len - 46; pkl && i > 0; i--) {
        const unsigned char *q = (const unsigned char *)file + i;
        if (q[0] == 'P' && q[1] == 'K' && q[2] == 1 && q[3] == 2 && msx__ck_rd16(q + 28) == pkl->name_len &&
            !memcmp(q + 46, pkl->name, pkl->name_len)) { cd_pkl = i; break; }
    }
    MSX_CHECK(cd_pkl > 0, "no central record for data.pkl");
    msx_rng_seed(&rng, 12345);
    tries = 0;
    for (it = 0; pkl && it < 400; it++) {
        unsigned char *b = (unsigned char *)malloc(len);
        msx_checkpoint *ck = NULL;
        int m, nm = 1 + (int)msx_rng_below(&rng, 4);
        size_t lo = it % 2 ? pkl->off : len - 22 - (size_t)z.n * 60, span = it % 2 ? pkl->size : (size_t)z.n * 60 + 22;
        memcpy(b, file, len);
        for (m = 0; m < nm; m++) b[lo + msx_rng_below(&rng, span)] = (unsigned char)msx_rng_below(&rng, 256);
        if (it % 2 && cd_pkl) {
            uint32_t c = msx__ck_crc32(b + pkl->off, pkl->size);
            for (m = 0; m < 4; m++) b[cd_pkl + 16 + (size_t)m] = (unsigned char)(c >> (8 * m));
        }
        msx_clear_error();
        if (msx_ckpt_load_mem(b, len, "mutant", &ck) != MSX_OK) { MSX_CHECK(ck == NULL && msx_last_error()[0], "failure without message"); }
        else tries++;
        msx_ckpt_free(ck);
        free(b);
    }
    printf("mutations: %d of 400 still loaded (harmless bytes), the rest refused cleanly\n", tries);
    /* Every proper prefix of the pickle lacks STOP and is refused. */
    if (pkl) {
        int all = 1;
        for (cut = 0; cut < pkl->size; cut += cut < 64 ? 1 : pkl->size / 500 + 1 + cut % 7) {
            unsigned char *b = (unsigned char *)malloc(cut ? cut : 1);
            msx__pvm v;
            memcpy(b, (const unsigned char *)file + pkl->off, cut);
            if (msx__pickle_run(&v, b, cut, "prefix") == MSX_OK) all = 0;
            msx__pvm_free(&v);
            free(b);
        }
        MSX_CHECK(all, "a truncated pickle was accepted");
    }
    msx__zip_close(&z);
    msx_free(file);
}

/* ---- hand-made torch files ---------------------------------------------- */

static const float stor0[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};

static msx_result load_pkl(const mk_buf *pkl, const char *dir, int zip64, size_t stor_bytes, msx_checkpoint **ck) {
    static const char *const keys[1] = {"0"};
    const void *data[1] = {stor0};
    size_t lens[1];
    mk_buf f = {0, 0, 0};
    msx_result r;
    lens[0] = stor_bytes;
    mk_pth(&f, dir, pkl, 1, keys, data, lens, zip64);
    r = msx_ckpt_load_mem(f.p, f.n, "handmade.pth", ck);
    mk_free(&f);
    return r;
}

static void test_handmade(void) {
    mk_buf p = {0, 0, 0};
    msx_checkpoint *ck = NULL;
    const msx_tensor *w, *b;
    /* Views, shared storage, prefixes, wrapper, arbitrary folder name, zip64. */
    static const char *const pre[] = {"", "module.", "sam.", "module.sam.", "_orig_mod."};
    static const char *const wraps[] = {NULL, "model", "model_state", "state_dict"};
    int i, j, z;
    for (i = 0; i < 5; i++)
        for (j = 0; j < 4; j++)
            for (z = 0; z < 2; z++) {
                p.n = 0;
                mk_two(&p, pre[i], wraps[j], 0);
                MSX_CHECK_OK(load_pkl(&p, z ? "archive" : "some_other-name.v2", z, sizeof stor0, &ck));
                if (!ck) continue;
                w = msx_ckpt_find(ck, "w");
                b = msx_ckpt_find(ck, "b");
                MSX_CHECK(ck->n == 2 && w && b, "prefix '%s' wrap %s: names not stripped/unwrapped", pre[i], wraps[j] ? wraps[j] : "none");
                if (w && b) {
                    /* w[r][c] = storage[2 + r*1 + c*3]: the transpose made contiguous */
                    const float want_w[6] = {3, 6, 4, 7, 5, 8}, want_b[4] = {5, 6, 7, 8};
                    MSX_CHECK(w->ndim == 2 && w->shape[0] == 3 && w->shape[1] == 2 && !memcmp(w->data, want_w, sizeof want_w), "strided view wrong");
                    MSX_CHECK(b->ndim == 1 && b->shape[0] == 4 && !memcmp(b->data, want_b, sizeof want_b), "storage offset wrong");
                }
                msx_ckpt_free(ck);
                ck = NULL;
            }
    /* Parameters (_rebuild_parameter) and subclass rebuilds (_rebuild_from_type_v2) unwrap to the tensor. */
    {
        int64_t s[1] = {4}, st[1] = {1};
        p.n = 0;
        pk_proto(&p); pk_op(&p, '}'); pk_op(&p, '(');
        pk_str(&p, "p");
        pk_global(&p, "torch._utils", "_rebuild_parameter");
        pk_op(&p, '('); pk_tensor(&p, "FloatStorage", "0", 12, 1, 1, s, st); pk_op(&p, 0x88);
        pk_global(&p, "collections", "OrderedDict"); pk_op(&p, ')'); pk_op(&p, 'R'); pk_op(&p, 't'); pk_op(&p, 'R');
        pk_str(&p, "q");
        pk_global(&p, "torch._tensor", "_rebuild_from_type_v2");
        pk_op(&p, '(');
        pk_global(&p, "torch._utils", "_rebuild_tensor_v2");
        pk_global(&p, "torch", "Tensor");
        pk_op(&p, '(');
        pk_op(&p, '('); pk_str(&p, "storage"); pk_global(&p, "torch", "FloatStorage"); pk_str(&p, "0"); pk_str(&p, "cpu"); pk_int(&p, 12); pk_op(&p, 't'); pk_op(&p, 'Q');
        pk_int(&p, 8); pk_ints(&p, 1, s); pk_ints(&p, 1, st); pk_op(&p, 0x89); pk_global(&p, "collections", "OrderedDict"); pk_op(&p, ')'); pk_op(&p, 'R');
        pk_op(&p, 't');
        pk_op(&p, '}');
        pk_op(&p, 't'); pk_op(&p, 'R');
        pk_op(&p, 'u'); pk_op(&p, '.');
        MSX_CHECK_OK(load_pkl(&p, "par", 0, sizeof stor0, &ck));
        if (ck) {
            const float wp[4] = {2, 3, 4, 5}, wq[4] = {9, 10, 11, 12};
            w = msx_ckpt_find(ck, "p");
            b = msx_ckpt_find(ck, "q");
            MSX_CHECK(w && !memcmp(w->data, wp, sizeof wp) && b && !memcmp(b->data, wq, sizeof wq), "parameter / from_type rebuild");
        }
        msx_ckpt_free(ck);
        ck = NULL;
    }
    /* Duplicate key. */
    p.n = 0;
    mk_two(&p, "", NULL, 1);
    MSX_CHECK(load_pkl(&p, "d", 0, sizeof stor0, &ck) == MSX_E_KEY_MISMATCH && !ck, "duplicate key accepted");
    MSX_CHECK(strstr(msx_last_error(), "'w'") != NULL, "duplicate message: %s", msx_last_error());
    /* Storage shorter than size x stride needs (11 floats < 2 + 2*3 + 2... = offset 4 + 4 = 8 ok, w needs 2+2+3+1=8) */
    p.n = 0;
    mk_two(&p, "", NULL, 0);
    MSX_CHECK(load_pkl(&p, "d", 0, 7 * sizeof(float), &ck) == MSX_E_FORMAT && !ck, "short storage accepted");
    MSX_CHECK(strstr(msx_last_error(), "'w'") && strstr(msx_last_error(), "holds"), "short storage message: %s", msx_last_error());
    /* Missing storage record. */
    {
        mk_buf f = {0, 0, 0};
        mk_pth(&f, "x", &p, 0, NULL, NULL, NULL, 0);
        MSX_CHECK(msx_ckpt_load_mem(f.p, f.n, "nostorage.pth", &ck) == MSX_E_FORMAT && strstr(msx_last_error(), "x/data/0"), "missing storage: %s", msx_last_error());
        mk_free(&f);
    }
    /* Unknown opcode (protocol-0 INT). */
    p.n = 0;
    pk_proto(&p); pk_op(&p, '}'); pk_op(&p, 'I'); mk_put(&p, "1\n", 2); pk_op(&p, '.');
    MSX_CHECK(load_pkl(&p, "d", 0, sizeof stor0, &ck) == MSX_E_FORMAT && strstr(msx_last_error(), "opcode 0x49") && strstr(msx_last_error(), "offset 3"), "unknown opcode: %s", msx_last_error());
    /* A non-whitelisted global stays inert; a tensor built by it cannot be resolved. */
    p.n = 0;
    pk_proto(&p); pk_op(&p, '}'); pk_op(&p, '(');
    pk_str(&p, "image_encoder.pos_embed"); pk_global(&p, "numpy.core.multiarray", "_reconstruct"); pk_op(&p, ')'); pk_op(&p, 'R');
    pk_op(&p, 'u'); pk_op(&p, '.');
    MSX_CHECK(load_pkl(&p, "d", 0, sizeof stor0, &ck) == MSX_E_UNSAFE && !ck && strstr(msx_last_error(), "numpy.core.multiarray._reconstruct") && strstr(msx_last_error(), "image_encoder.pos_embed"), "inert global: %s", msx_last_error());
    /* ... but unknown objects elsewhere (optimizer state) are skipped. */
    p.n = 0;
    pk_proto(&p); pk_op(&p, '}'); pk_op(&p, '(');
    pk_str(&p, "optimizer"); pk_global(&p, "torch.optim.adam", "Adam"); pk_op(&p, ')'); pk_op(&p, 0x81);
    pk_op(&p, '}'); pk_op(&p, 'b');
    pk_str(&p, "model");
    {
        int64_t s[1] = {12}, st[1] = {1};
        pk_op(&p, '}'); pk_op(&p, '('); pk_str(&p, "sam.x"); pk_tensor(&p, "FloatStorage", "0", 12, 0, 1, s, st); pk_op(&p, 'u');
    }
    pk_op(&p, 'u'); pk_op(&p, '.');
    MSX_CHECK_OK(load_pkl(&p, "d", 0, sizeof stor0, &ck));
    MSX_CHECK(ck && ck->n == 1 && msx_ckpt_find(ck, "x"), "wrapper with an opaque optimizer");
    msx_ckpt_free(ck);
    ck = NULL;
    /* Dangerous modules are refused at the GLOBAL, whatever the spelling. */
    {
        static const char *const bad[][2] = {{"os", "system"}, {"subprocess", "Popen"}, {"builtins", "eval"}, {"os.path", "join"}, {"__builtin__", "exec"}};
        for (i = 0; i < 5; i++) {
            p.n = 0;
            pk_proto(&p); pk_global(&p, bad[i][0], bad[i][1]); pk_op(&p, '.');
            MSX_CHECK(load_pkl(&p, "d", 0, sizeof stor0, &ck) == MSX_E_UNSAFE && !ck, "%s.%s not refused", bad[i][0], bad[i][1]);
        }
        /* STACK_GLOBAL (protocol 4) too. */
        p.n = 0;
        mk_u8(&p, 0x80); mk_u8(&p, 4); mk_u8(&p, 0x8c); mk_u8(&p, 5); mk_put(&p, "posix", 5); mk_u8(&p, 0x94);
        mk_u8(&p, 0x8c); mk_u8(&p, 6); mk_put(&p, "system", 6); mk_u8(&p, 0x94); mk_u8(&p, 0x93); pk_op(&p, '.');
        MSX_CHECK(load_pkl(&p, "d", 0, sizeof stor0, &ck) == MSX_E_UNSAFE && !ck, "STACK_GLOBAL posix.system not refused");
    }
    /* A whole pickled nn.Module. */
    p.n = 0;
    pk_proto(&p); pk_global(&p, "segment_anything.modeling.sam", "Sam"); pk_op(&p, ')'); pk_op(&p, 0x81); pk_op(&p, '.');
    MSX_CHECK(load_pkl(&p, "d", 0, sizeof stor0, &ck) == MSX_E_UNSUPPORTED && strstr(msx_last_error(), "state_dict()"), "whole module: %s", msx_last_error());
    /* Memo index never stored, BINUNICODE longer than the pickle, STOP missing. */
    p.n = 0; pk_proto(&p); pk_op(&p, 'h'); mk_u8(&p, 7); pk_op(&p, '.');
    MSX_CHECK(load_pkl(&p, "d", 0, sizeof stor0, &ck) == MSX_E_FORMAT && strstr(msx_last_error(), "memo"), "bad memo: %s", msx_last_error());
    p.n = 0; pk_proto(&p); pk_op(&p, 'X'); mk_u32(&p, 0xFFFFFFF0u); pk_op(&p, '.');
    MSX_CHECK(load_pkl(&p, "d", 0, sizeof stor0, &ck) == MSX_E_FORMAT, "oversized string: %s", msx_last_error());
    p.n = 0; pk_proto(&p); pk_op(&p, '}');
    MSX_CHECK(load_pkl(&p, "d", 0, sizeof stor0, &ck) == MSX_E_FORMAT && strstr(msx_last_error(), "STOP"), "no STOP: %s", msx_last_error());
    /* Negative size in a tensor record. */
    {
        int64_t s[1] = {-4}, st[1] = {1};
        p.n = 0;
        pk_proto(&p); pk_op(&p, '}'); pk_op(&p, '('); pk_str(&p, "x"); pk_tensor(&p, "FloatStorage", "0", 12, 0, 1, s, st); pk_op(&p, 'u'); pk_op(&p, '.');
        MSX_CHECK(load_pkl(&p, "d", 0, sizeof stor0, &ck) == MSX_E_FORMAT && !ck, "negative size accepted");
    }
    /* Protocol 4: FRAME, SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL, NEWOBJ_EX. */
    {
        const float want[3] = {1, 3, 5};
        mk_proto4_sd(&p);
        MSX_CHECK_OK(load_pkl(&p, "p4", 0, sizeof stor0, &ck));
        w = ck ? msx_ckpt_find(ck, "v") : NULL;
        MSX_CHECK(w && w->numel == 3 && !memcmp(w->data, want, sizeof want), "protocol 4 state dict");
        msx_ckpt_free(ck);
        ck = NULL;
    }
    /* Broadcast (stride 0) views would expand a tiny storage: refused. */
    {
        int64_t s[2] = {100000, 100000}, st[2] = {0, 0};
        p.n = 0;
        pk_proto(&p); pk_op(&p, '}'); pk_op(&p, '('); pk_str(&p, "x"); pk_tensor(&p, "FloatStorage", "0", 12, 0, 2, s, st); pk_op(&p, 'u'); pk_op(&p, '.');
        MSX_CHECK(load_pkl(&p, "d", 0, sizeof stor0, &ck) == MSX_E_FORMAT && !ck && strstr(msx_last_error(), "broadcast"), "broadcast view: %s", msx_last_error());
    }
    /* 3000 tensors over one 4 MB storage: more copies than 4x the file. */
    {
        static float big[1 << 20];
        static const char *const keys[1] = {"0"};
        const void *data[1] = {big};
        size_t lens[1] = {sizeof big};
        int64_t s[1] = {1 << 20}, st[1] = {1};
        mk_buf f = {0, 0, 0};
        char nm[32];
        p.n = 0;
        pk_proto(&p); pk_op(&p, '}'); pk_op(&p, '(');
        for (i = 0; i < 3000; i++) {
            snprintf(nm, sizeof nm, "t%d", i);
            pk_str(&p, nm);
            if (i == 0) { pk_tensor(&p, "FloatStorage", "0", 1 << 20, 0, 1, s, st); pk_op(&p, 'q'); mk_u8(&p, 0); }
            else { pk_op(&p, 'h'); mk_u8(&p, 0); }
        }
        pk_op(&p, 'u'); pk_op(&p, '.');
        mk_pth(&f, "shared", &p, 1, keys, data, lens, 0);
        MSX_CHECK(msx_ckpt_load_mem(f.p, f.n, "shared.pth", &ck) == MSX_E_LIMIT && !ck && strstr(msx_last_error(), "4x"), "shared storage bomb: %s", msx_last_error());
        mk_free(&f);
    }
    /* Compressed entries are refused. */
    {
        mk_buf f = {0, 0, 0};
        mk_entry e[1];
        e[0].name = "a/data.pkl"; e[0].data = "x"; e[0].len = 1;
        mk_zip(&f, e, 1, 0, 8);
        MSX_CHECK(msx_ckpt_load_mem(f.p, f.n, "deflate.pth", &ck) == MSX_E_UNSUPPORTED && strstr(msx_last_error(), "compressed"), "deflate: %s", msx_last_error());
        mk_free(&f);
    }
    mk_free(&p);
}

/* ---- SAM architecture ------------------------------------------------------ */

static int jint(const msx__json *o, const char *k) {
    const msx__json *v = msx__json_get(o, k);
    return v && (v->type == MSX__JNUM || v->type == MSX__JBOOL) ? (int)v->num : -12345;
}

/* The arch against numbers read straight from config.json (both layouts). */
static void check_arch_vs_config(const msx_sam_arch *a, const char *cfg, int heads_known) {
    msx__json *j = load_json(cfg);
    const msx__json *ie, *pe, *md, *tr, *gl, *pm, *ps;
    int k, ok;
    MSX_CHECK(j != NULL, "cannot read %s", cfg);
    if (!j) return;
    ie = msx__json_get(j, "image_encoder");
    if (ie) { /* official constructor names */
        pe = msx__json_get(j, "prompt_encoder");
        md = msx__json_get(j, "mask_decoder");
        tr = msx__json_get(md, "transformer");
        MSX_CHECK(a->img_size == jint(ie, "img_size") && a->patch_size == jint(ie, "patch_size") && a->in_chans == jint(ie, "in_chans"), "%s: image/patch/in_chans", cfg);
        MSX_CHECK(a->embed_dim == jint(ie, "embed_dim") && a->depth == jint(ie, "depth") && a->num_heads == jint(ie, "num_heads"), "%s: embed/depth/heads %d %d %d", cfg, a->embed_dim, a->depth, a->num_heads);
        MSX_CHECK(a->window_size == jint(ie, "window_size") && a->out_chans == jint(ie, "out_chans"), "%s: window/out_chans", cfg);
        MSX_CHECK(a->use_rel_pos == jint(ie, "use_rel_pos") && a->use_abs_pos == jint(ie, "use_abs_pos"), "%s: rel/abs pos", cfg);
        MSX_CHECK(a->mlp_dim == (int)(a->embed_dim * msx__json_get(ie, "mlp_ratio")->num), "%s: mlp_dim", cfg);
        gl = msx__json_get(ie, "global_attn_indexes");
        MSX_CHECK(a->prompt_dim == jint(pe, "embed_dim") && a->mask_in_chans == jint(pe, "mask_in_chans"), "%s: prompt", cfg);
        MSX_CHECK(a->dec_dim == jint(md, "transformer_dim") && a->num_mask_tokens == jint(md, "num_multimask_outputs") + 1, "%s: decoder dim/tokens", cfg);
        MSX_CHECK(a->iou_head_depth == jint(md, "iou_head_depth") && a->iou_head_hidden == jint(md, "iou_head_hidden_dim"), "%s: IoU head", cfg);
        MSX_CHECK(a->dec_depth == jint(tr, "depth") && a->dec_mlp_dim == jint(tr, "mlp_dim") && a->dec_downsample == jint(tr, "attention_downsample_rate"), "%s: transformer", cfg);
        if (heads_known) MSX_CHECK(a->dec_heads == jint(tr, "num_heads"), "%s: decoder heads %d", cfg, a->dec_heads);
    } else { /* build_sam names */
        MSX_CHECK(a->img_size == jint(j, "image_size") && a->patch_size == jint(j, "vit_patch_size") && a->in_chans == jint(j, "in_chans"), "%s: image/patch", cfg);
        MSX_CHECK(a->img_size / a->patch_size == jint(j, "image_embedding_size"), "%s: embedding size", cfg);
        MSX_CHECK(a->embed_dim == jint(j, "encoder_embed_dim") && a->depth == jint(j, "encoder_depth") && a->num_heads == jint(j, "encoder_num_heads"), "%s: encoder", cfg);
        MSX_CHECK(a->window_size == jint(j, "window_size") && a->out_chans == jint(j, "out_chans") && a->prompt_dim == jint(j, "prompt_embed_dim"), "%s: window/out", cfg);
        MSX_CHECK(a->mlp_dim == (int)(a->embed_dim * msx__json_get(j, "mlp_ratio")->num), "%s: mlp_dim", cfg);
        MSX_CHECK(a->mask_in_chans == jint(j, "mask_in_chans") && a->num_mask_tokens == jint(j, "num_multimask_outputs") + 1, "%s: mask", cfg);
        MSX_CHECK(a->dec_depth == jint(j, "transformer_depth") && a->dec_dim == jint(j, "transformer_dim") && a->dec_mlp_dim == jint(j, "transformer_mlp_dim"), "%s: transformer", cfg);
        MSX_CHECK(a->dec_downsample == jint(j, "transformer_attention_downsample_rate") && a->iou_head_depth == jint(j, "iou_head_depth") && a->iou_head_hidden == jint(j, "iou_head_hidden_dim"), "%s: decoder", cfg);
        MSX_CHECK(a->use_rel_pos == jint(j, "use_rel_pos") && a->use_abs_pos == jint(j, "use_abs_pos"), "%s: rel/abs pos", cfg);
        if (heads_known) MSX_CHECK(a->dec_heads == jint(j, "transformer_num_heads"), "%s: decoder heads", cfg);
        gl = msx__json_get(j, "encoder_global_attn_indexes");
    }
    ok = gl && gl->n == a->n_global;
    for (k = 0; ok && k < gl->n; k++) ok = a->global_idx[k] == (int)gl->kids[k].num;
    MSX_CHECK(ok, "%s: global blocks", cfg);
    pm = msx__json_get(j, "pixel_mean");
    ps = msx__json_get(j, "pixel_std");
    for (k = 0; k < 3; k++) MSX_CHECK(a->pixel_mean[k] == (float)pm->kids[k].num && a->pixel_std[k] == (float)ps->kids[k].num, "%s: pixel mean/std", cfg);
    MSX_CHECK(a->rel_pos_len_win == 2 * a->window_size - 1 && a->rel_pos_len_glob == 2 * (a->img_size / a->patch_size) - 1 && a->abs_pos_size == a->img_size / a->patch_size, "%s: derived rel-pos sizes", cfg);
    msx__json_free(j);
}

static void test_arch(void) {
    static const char *const m[][2] = {
        {"tests/data/golden/sam/tiny_a/model.pth", "tests/data/golden/sam/tiny_a/config.json"},
        {"tests/data/golden/sam/tiny_b/model.pth", "tests/data/golden/sam/tiny_b/config.json"},
        {"examples/demo/models/base.pth", "examples/demo/models/config.json"},
        {"examples/demo/models/spec_ct.pth", "examples/demo/models/config.json"},
        {"tests/data/checkpoints/tiny_a_model_state_sam_prefix.pt", "tests/data/golden/sam/tiny_a/config.json"},
    };
    size_t i;
    for (i = 0; i < sizeof m / sizeof m[0]; i++) {
        msx_checkpoint *ck = NULL, *raw = NULL;
        msx_sam_arch a, b;
        char *js = NULL, *js2 = NULL;
        int k, same = 1;
        MSX_CHECK_OK(msx_ckpt_load(m[i][0], &raw));
        if (!raw) continue;
        MSX_CHECK_OK(msx_sam_arch_infer(raw, &a));
        check_arch_vs_config(&a, m[i][1], 0);
        MSX_CHECK(a.dec_heads == 8, "default decoder heads %d", a.dec_heads);
        MSX_CHECK_OK(msx_sam_validate(raw, &a));
        MSX_CHECK(msx_sam_key_count(&a) == raw->n, "%s: key count %d vs %d", m[i][0], msx_sam_key_count(&a), raw->n);
        /* load + config: decoder heads from the JSON, tensors in canonical order = file order. */
        MSX_CHECK_OK(msx_sam_load(m[i][0], m[i][1], &ck, &b));
        if (!ck) { msx_ckpt_free(raw); continue; }
        check_arch_vs_config(&b, m[i][1], 1);
        for (k = 0; k < ck->n && same; k++) same = !strcmp(ck->tensors[k].name, raw->tensors[k].name) && !memcmp(ck->tensors[k].data, raw->tensors[k].data, (size_t)raw->tensors[k].numel * 4);
        MSX_CHECK(same && ck->n == raw->n, "%s: canonical order differs from torch's state_dict order at %d", m[i][0], k - 1);
        for (k = 0; k < ck->n; k++) {
            char nm[128];
            int nd;
            int64_t sh[MSX_MAX_DIMS];
            if (msx_sam_key_at(&b, k, nm, sizeof nm, &nd, sh) != MSX_OK || strcmp(nm, ck->tensors[k].name) || nd != ck->tensors[k].ndim) { same = 0; break; }
        }
        MSX_CHECK(same, "msx_sam_key_at disagrees at %d", k);
        /* JSON round trip. */
        MSX_CHECK_OK(msx_sam_arch_to_json(&b, &js));
        if (js) {
            msx_sam_arch c;
            msx_sam_arch_default(&c);
            MSX_CHECK_OK(msx_sam_arch_parse_json(js, strlen(js), "roundtrip", &c));
            MSX_CHECK_OK(msx_sam_arch_to_json(&c, &js2));
            MSX_CHECK(js2 && !strcmp(js, js2), "arch JSON round trip: %s vs %s", js, js2 ? js2 : "");
        }
        msx_free(js);
        msx_free(js2);
        /* Shuffled order comes back canonical. */
        if (ck->n > 3) {
            msx_tensor t0 = ck->tensors[0];
            ck->tensors[0] = ck->tensors[ck->n - 1];
            ck->tensors[ck->n - 1] = t0;
            msx__ckpt_reindex(ck);
            MSX_CHECK_OK(msx_sam_canonical_order(ck, &b));
            MSX_CHECK(!strcmp(ck->tensors[0].name, raw->tensors[0].name) && !strcmp(ck->tensors[ck->n - 1].name, raw->tensors[raw->n - 1].name), "reorder");
        }
        /* Validation failures name the key. */
        {
            msx_sam_arch w = b;
            w.mlp_dim += 4;
            MSX_CHECK(msx_sam_validate(ck, &w) == MSX_E_SHAPE && strstr(msx_last_error(), "image_encoder.blocks.0.mlp.lin1.weight"), "wrong mlp: %s", msx_last_error());
            w = b;
            w.depth += 1;
            MSX_CHECK(msx_sam_validate(ck, &w) == MSX_E_KEY_MISMATCH && strstr(msx_last_error(), "missing") && strstr(msx_last_error(), "blocks."), "extra depth: %s", msx_last_error());
            w = b;
            w.depth -= 1;
            w.n_global = 0;
            MSX_CHECK(msx_sam_validate(ck, &w) == MSX_E_KEY_MISMATCH && strstr(msx_last_error(), "unexpected"), "less depth: %s", msx_last_error());
            w = b;
            w.window_size += 1;
            MSX_CHECK(msx_sam_validate(ck, &w) == MSX_E_SHAPE && strstr(msx_last_error(), "rel_pos_h"), "window: %s", msx_last_error());
        }
        msx_ckpt_free(ck);
        msx_ckpt_free(raw);
    }
    /* The wrong config for a checkpoint is a shape error naming a key. */
    {
        msx_checkpoint *ck = NULL;
        msx_sam_arch a;
        MSX_CHECK(msx_sam_load(m[0][0], m[1][1], &ck, &a) == MSX_E_KEY_MISMATCH && !ck && strstr(msx_last_error(), "28 unexpected (image_encoder.blocks.2.norm1.weight"), "tiny_b config on tiny_a: %s", msx_last_error());
        MSX_CHECK(msx_sam_load(m[0][0], "tests/data/no_such_config.json", &ck, &a) == MSX_E_IO && !ck, "missing config");
        /* Same depth, other widths: a shape error naming key, got and expected. */
        {
            const char *cfg = tmp_path("cfg.json"), *txt = "{\"encoder_num_heads\": 8}";
            FILE *f = fopen(cfg, "w");
            if (f) { fputs(txt, f); fclose(f); }
            MSX_CHECK(msx_sam_load(m[0][0], cfg, &ck, &a) == MSX_E_SHAPE && !ck && strstr(msx_last_error(), "image_encoder.blocks.0.attn.rel_pos_h") && strstr(msx_last_error(), "[5, 16]") && strstr(msx_last_error(), "[5, 8]"), "heads 8: %s", msx_last_error());
            remove(cfg);
        }
    }
    /* safetensors export of a loaded .pth loads back identically, names stripped. */
    {
        msx_checkpoint *ck = NULL, *back = NULL;
        msx_sam_arch a;
        const char *tmp = tmp_path("roundtrip.safetensors");
        int k, same;
        MSX_CHECK_OK(msx_sam_load(msx_test_path("checkpoints/tiny_a_model_module_prefix.pth"), NULL, &ck, &a));
        if (ck) {
            MSX_CHECK_OK(msx_safetensors_save(tmp, ck, NULL, 0));
            MSX_CHECK_OK(msx_ckpt_load(tmp, &back));
            same = back && back->n == ck->n;
            for (k = 0; same && k < ck->n; k++)
                same = !strcmp(back->tensors[k].name, ck->tensors[k].name) && back->tensors[k].numel == ck->tensors[k].numel &&
                       !memcmp(back->tensors[k].data, ck->tensors[k].data, (size_t)ck->tensors[k].numel * 4);
            MSX_CHECK(same, "safetensors round trip differs at %d", k - 1);
            remove(tmp);
        }
        msx_ckpt_free(ck);
        msx_ckpt_free(back);
    }
    /* JSON config errors. */
    {
        msx_sam_arch a;
        const char *bad1 = "{\"encoder_depth\": -3}", *bad2 = "{\"pixel_mean\": [1, 2]}", *bad3 = "{\"window_size\": NaN}";
        msx_sam_arch_default(&a);
        MSX_CHECK(msx_sam_arch_parse_json(bad1, strlen(bad1), "c.json", &a) == MSX_E_ARG && strstr(msx_last_error(), "encoder_depth"), "negative depth: %s", msx_last_error());
        MSX_CHECK(msx_sam_arch_parse_json(bad2, strlen(bad2), "c.json", &a) == MSX_E_ARG && strstr(msx_last_error(), "pixel_mean"), "pixel_mean: %s", msx_last_error());
        MSX_CHECK(msx_sam_arch_parse_json(bad3, strlen(bad3), "c.json", &a) == MSX_E_FORMAT, "NaN: %s", msx_last_error());
        MSX_CHECK(a.depth == 12, "failed parse changed the arch");
    }
    /* A non-SAM checkpoint has no architecture. */
    {
        mk_buf p = {0, 0, 0};
        msx_checkpoint *ck = NULL;
        msx_sam_arch a;
        mk_two(&p, "", NULL, 0);
        MSX_CHECK_OK(load_pkl(&p, "x", 0, sizeof stor0, &ck));
        MSX_CHECK(ck && msx_sam_arch_infer(ck, &a) == MSX_E_KEY_MISMATCH, "non-SAM inferred");
        msx_ckpt_free(ck);
        mk_free(&p);
    }
}

int main(void) {
    test_goldens();
    test_layouts();
    test_handmade();
    test_truncated_and_mutated();
    test_arch();
    return msx_test_summary("test_ckpt");
}
