/* tools/cmd_common.c - option helpers shared by the commands (declared in
   tools/cli.h); also linked into build/medsamix-mpi. */
#include "../medsamix.h"
#include "cli.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int msx_cli_list(const char *cmd, int argc, char **argv, int *i, const char **list, int *n, int max) {
    const char *opt = argv[*i];
    int added = 0;
    while (*i + 1 < argc && strncmp(argv[*i + 1], "--", 2) != 0) {
        if (*n >= max) {
            fprintf(stderr, "%s: %s: at most %d values in total ('%s' is one too many)\n", cmd, opt, max, argv[*i + 1]);
            return 0;
        }
        list[(*n)++] = argv[++*i];
        added++;
    }
    if (!added) { fprintf(stderr, "%s: %s needs at least one value\n", cmd, opt); return 0; }
    return 1;
}

int msx_cli_num(const char *cmd, const char *opt, const char *v, double lo, double hi, double *out) {
    char *end;
    double x;
    if (!v) { fprintf(stderr, "%s: %s needs a value\n", cmd, opt); return 0; }
    errno = 0;
    x = strtod(v, &end);
    if (end == v || *end || !isfinite(x)) {
        fprintf(stderr, "%s: %s: '%s' is not a number (a finite value is needed)\n", cmd, opt, v);
        return 0;
    }
    if (!(x >= lo && x <= hi)) {
        fprintf(stderr, "%s: %s: %s is out of range [%g, %g]\n", cmd, opt, v, lo, hi);
        return 0;
    }
    *out = x;
    return 1;
}

int msx_cli_int(const char *cmd, const char *opt, const char *v, long lo, long hi, int *out) {
    char *end;
    long x;
    if (!v) { fprintf(stderr, "%s: %s needs a value\n", cmd, opt); return 0; }
    errno = 0;
    x = strtol(v, &end, 10);
    if (end == v || *end || errno == ERANGE) {
        fprintf(stderr, "%s: %s: '%s' is not a whole number\n", cmd, opt, v);
        return 0;
    }
    if (x < lo || x > hi) {
        fprintf(stderr, "%s: %s: %s is out of range %ld..%ld\n", cmd, opt, v, lo, hi);
        return 0;
    }
    *out = (int)x;
    return 1;
}

int msx_cli_check_outputs(const char *cmd, const char *const *in, int n_in, const char *const *out, int n_out) {
    int i;
    if (msx_check_outputs(in, n_in, out, n_out) != MSX_OK) {
        fprintf(stderr, "%s: %s\n", cmd, msx_last_error());
        return 0;
    }
    for (i = 0; i < n_out; i++) { /* the folder must be there before the work, not found missing after it */
        const char *o = out[i], *slash;
        char dir[4096];
        struct stat st;
        if (!o) continue;
        slash = strrchr(o, '/');
        if (!slash) continue;
        if ((size_t)(slash - o) >= sizeof dir) continue;
        memcpy(dir, o, (size_t)(slash - o));
        dir[slash - o] = 0;
        if (!dir[0]) continue;
        if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
            fprintf(stderr, "%s: %s: the folder %s does not exist\n", cmd, o, dir);
            return 0;
        }
    }
    return 1;
}

int msx_cli_has_ext(const char *path, const char *ext) {
    size_t n = strlen(path), k = strlen(ext), i;
    if (n <= k) return 0;
    for (i = 0; i < k; i++)
        if (tolower((unsigned char)path[n - k + i]) != tolower((unsigned char)ext[i])) return 0;
    return 1;
}

