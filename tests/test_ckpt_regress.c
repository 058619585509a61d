/* tests/test_ckpt_regress.c - every file in tests/fuzz/regressions/ (inputs
   that once crashed a parser, or hand-made malformed ones) goes through the
   fuzz target named by its prefix (zip-, pickle-, safetensors-) and must be
   refused with a message, no crash and no leak. The seed corpus must load
   without violating the loader's contract. */
/* Like the zip fuzz harness, without CRC checks: the inputs were found that
   way, and must still be refused by the parsers themselves. */
#define MSX_NO_CRC_CHECK
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "test.h"
#include "fuzz/fuzz_targets.h"
#include <dirent.h>

static int run_one(const char *dir, const char *name, int expect_error) {
    char path[1024];
    void *buf;
    size_t len;
    int ok;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (msx_read_file(path, 0, &buf, &len) != MSX_OK) { MSX_CHECK(0, "cannot read %s", path); return 0; }
    if (!strncmp(name, "zip-", 4) || !strcmp(dir + strlen(dir) - 3, "zip")) ok = msx_fuzz_zip((const unsigned char *)buf, len);
    else if (!strncmp(name, "pickle-", 7) || !strcmp(dir + strlen(dir) - 6, "pickle")) ok = msx_fuzz_pickle((const unsigned char *)buf, len);
    else ok = msx_fuzz_safetensors((const unsigned char *)buf, len);
    MSX_CHECK(ok, "%s: contract violated (result %s, message '%s')", path, msx_result_str(msx_fuzz_last), msx_last_error());
    if (expect_error) MSX_CHECK(msx_fuzz_last != MSX_OK, "%s: loaded, expected a clean error", path);
    msx_free(buf);
    return 1;
}

static int run_dir(const char *dir, int expect_error) {
    DIR *d = opendir(dir);
    struct dirent *e;
    int n = 0;
    if (!d) { MSX_CHECK(0, "cannot open %s", dir); return 0; }
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        n += run_one(dir, e->d_name, expect_error);
    }
    closedir(d);
    return n;
}

int main(void) {
    int n = run_dir("tests/fuzz/regressions", 1);
    MSX_CHECK(n >= 10, "only %d regression files", n);
    n = run_dir("tests/fuzz/corpus/zip", 0) + run_dir("tests/fuzz/corpus/pickle", 0) + run_dir("tests/fuzz/corpus/safetensors", 0);
    MSX_CHECK(n >= 15, "only %d corpus files", n);
    return msx_test_summary("test_ckpt_regress");
}
