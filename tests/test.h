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
#endif
