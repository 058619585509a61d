/* tests/embed/two_tu_main.c - an embedder's second translation unit: the
   header without MEDSAMIX_IMPLEMENTATION gives declarations only, linked
   against two_tu_impl.c. Fails to link if the header defines anything
   outside the implementation block, or declares something it never
   defines. */
#include "../../medsamix.h"
#include <stdio.h>
#include <string.h>

int embed_impl_groups(void);

int main(void) {
    int pass = 0, fail = 0;
    msx_plan *p = NULL;
#define CHECK(c) do { if (c) pass++; else { fail++; printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #c); } } while (0)
    CHECK(embed_impl_groups() == 19);
    CHECK(msx_merge_n_groups(24, 4) == 19);
    CHECK(!strcmp(msx_result_str(MSX_OK), msx_result_str((msx_result)0)));
    CHECK(msx_plan_create(12, 3, 2, &p) == MSX_OK && p && p->n_groups == 19);
    msx_plan_free(p);
    CHECK(msx_merge_tensor_linear(NULL, NULL, NULL, 0, 0) == MSX_E_ARG && msx_last_error()[0] != 0);
    printf("test_embed_two_tu: %d passed, %d failed\n", pass, fail);
    return fail != 0;
}
