/* tests/test.h - the few macros our tests share.
   Each test program includes medsamix.h with the implementation, calls
   MSX_CHECK for every assertion and ends with `return msx_test_summary("name");`,
   which prints "name: N passed, N failed" and returns non-zero on any failure. */
#ifndef MSX_TEST_H
#define MSX_TEST_H
#if defined(__GNUC__)
#define MSX_TEST_UNUSED __attribute__((unused))
#else
#define MSX_TEST_UNUSED
#endif
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int msx_test_pass, msx_test_fail;

#define MSX_CHECK(cond, ...)                                                        \
    do {                                                                            \
        if (cond) msx_test_pass++;                                                  \
        else {                                                                      \
            msx_test_fail++;                                                        \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);       \
            fprintf(stderr, __VA_ARGS__);                                           \
            fprintf(stderr, "\n");                                                  \
        }                                                                           \
    } while (0)

/* A call that must return MSX_OK; prints msx_last_error() otherwise. */
#define MSX_CHECK_OK(expr)                                                          \
    do {                                                                            \
        msx_result msx_test_r_ = (expr);                                            \
        MSX_CHECK(msx_test_r_ == MSX_OK, "%s -> %s: %s", #expr,                    \
                  msx_result_str(msx_test_r_), msx_last_error());                  \
    } while (0)

/* Path of a fixture below tests/data (tests run from the project root; the
   MSX_TEST_DATA environment variable overrides). */
static MSX_TEST_UNUSED const char *msx_test_path(const char *rel) {
    static char buf[8][1024];
    static int k;
    const char *root = getenv("MSX_TEST_DATA");
    char *b = buf[k++ & 7];
    snprintf(b, sizeof buf[0], "%s/%s", root ? root : "tests/data", rel);
    return b;
}

static int msx_test_summary(const char *name) {
    printf("%s: %d passed, %d failed\n", name, msx_test_pass, msx_test_fail);
    return msx_test_fail ? 1 : 0;
}
/* Trial records of a search log (trials.jsonl) by trial index, with the
   "seconds" field (timing) cut out so that two runs compare as strings;
   returns how many, -1 if unreadable. rec[t] is malloc'd, NULL = absent;
   release with msx_test_free_records. Needs medsamix.h included first. */
static MSX_TEST_UNUSED int msx_test_log_records(const char *path, char **rec, int max) {
    void *d;
    size_t n;
    char *s, *line, *next;
    int k = 0, t;
    for (t = 0; t < max; t++) rec[t] = NULL;
    if (msx_read_file(path, 0, &d, &n) != MSX_OK) return -1;
    s = (char *)malloc(n + 1);
    if (s) memcpy(s, d, n);
    msx_free(d);
    if (!s) return -1;
    s[n] = 0;
    for (line = s; *line; line = next) {
        char *a, *b;
        next = strchr(line, '\n');
        if (next) *next++ = 0;
        else next = line + strlen(line);
        a = strstr(line, "\"seconds\"");
        b = strstr(line, "\"status\"");
        if (strncmp(line, "{\"trial\": ", 10)) continue;
        t = atoi(line + 10);
        if (t < 0 || t >= max || rec[t]) continue;
        if (a && b && b > a) memmove(a, b, strlen(b) + 1);
        rec[t] = (char *)malloc(strlen(line) + 1);
        if (rec[t]) strcpy(rec[t], line);
        k++;
    }
    free(s);
    return k;
}

static MSX_TEST_UNUSED void msx_test_free_records(char **rec, int max) {
    int t;
    for (t = 0; t < max; t++) { free(rec[t]); rec[t] = NULL; }
}

#endif
