/* tests/png16.h - writes 16-bit grey PNGs (stb_image_write has no 16-bit
   PNG): stored deflate blocks, real CRC-32 and Adler-32. Shared by the
   tests that need 16-bit images. */
#ifndef MSX_TEST_PNG16_H
#define MSX_TEST_PNG16_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* 16-bit grey PNG (stored deflate blocks, real CRC and Adler-32). */
static MSX_TEST_UNUSED void be32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16); p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
}
static MSX_TEST_UNUSED uint32_t crc_png(const unsigned char *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    size_t i;
    int k;
    for (i = 0; i < n; i++) {
        c ^= p[i];
        for (k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
    return c ^ 0xFFFFFFFFu;
}
static MSX_TEST_UNUSED void chunk(FILE *f, const char *type, const unsigned char *data, size_t n) {
    unsigned char h[8], *buf = (unsigned char *)malloc(n + 4);
    be32(h, (uint32_t)n);
    memcpy(h + 4, type, 4);
    memcpy(buf, type, 4);
    if (n) memcpy(buf + 4, data, n);
    fwrite(h, 1, 8, f);
    if (n) fwrite(data, 1, n, f);
    be32(h, crc_png(buf, n + 4));
    fwrite(h, 1, 4, f);
    free(buf);
}
static MSX_TEST_UNUSED void write_png16(const char *path, int w, int h, const unsigned short *px) {
    size_t raw_n = (size_t)h * (1 + 2 * (size_t)w), i, o = 0, nb = (raw_n + 65534) / 65535;
    unsigned char *raw = (unsigned char *)malloc(raw_n), *z = (unsigned char *)malloc(raw_n + 5 * nb + 6), ih[13];
    uint32_t a = 1, b = 0;
    int x, y;
    FILE *f = fopen(path, "wb");
    for (y = 0; y < h; y++) {
        unsigned char *r = raw + (size_t)y * (1 + 2 * (size_t)w);
        r[0] = 0;
        for (x = 0; x < w; x++) { r[1 + 2 * x] = (unsigned char)(px[y * w + x] >> 8); r[2 + 2 * x] = (unsigned char)px[y * w + x]; }
    }
    z[o++] = 0x78; z[o++] = 0x01;
    for (i = 0; i < raw_n; i += 65535) {
        size_t len = raw_n - i < 65535 ? raw_n - i : 65535;
        z[o++] = (unsigned char)(i + len == raw_n);
        z[o++] = (unsigned char)len; z[o++] = (unsigned char)(len >> 8);
        z[o++] = (unsigned char)~len; z[o++] = (unsigned char)(~len >> 8);
        memcpy(z + o, raw + i, len);
        o += len;
    }
    for (i = 0; i < raw_n; i++) { a = (a + raw[i]) % 65521u; b = (b + a) % 65521u; }
    be32(z + o, (b << 16) | a);
    o += 4;
    fwrite("\x89PNG\r\n\x1a\n", 1, 8, f);
    be32(ih, (uint32_t)w); be32(ih + 4, (uint32_t)h);
    ih[8] = 16; ih[9] = 0; ih[10] = ih[11] = ih[12] = 0;
    chunk(f, "IHDR", ih, 13);
    chunk(f, "IDAT", z, o);
    chunk(f, "IEND", NULL, 0);
    fclose(f);
    free(raw);
    free(z);
}
#endif
