/* tests/embed/static_a.c - MEDSAMIX_STATIC: every unit may hold its own
   private copy of the implementation. static_a.c and static_b.c both
   define MEDSAMIX_IMPLEMENTATION with MEDSAMIX_STATIC and are linked into
   one program: no symbol may clash, and each copy keeps its own state
   (the thread-local error message). Built by `make test`. */
#define MEDSAMIX_STATIC
#define MEDSAMIX_IMPLEMENTATION
#include "../../medsamix.h"
#include <stdio.h>

int static_b_groups(void);
const char *static_b_last_error(void);

int main(void) {
    int pass = 0, fail = 0;
#define CHECK(c) do { if (c) pass++; else { fail++; printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #c); } } while (0)
    CHECK(msx_merge_n_groups(12, 2) == 19);
    CHECK(static_b_groups() == 19);
    msx_clear_error();
    CHECK(msx_merge_tensor_linear(NULL, NULL, NULL, 0, 0) == MSX_E_ARG && msx_last_error()[0] != 0);
    CHECK(static_b_last_error()[0] == 0); /* b's copy has its own message buffer */
    printf("test_embed_static: %d passed, %d failed\n", pass, fail);
    return fail != 0;
}
