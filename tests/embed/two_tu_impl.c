/* tests/embed/two_tu_impl.c - the translation unit that holds the
   implementation (MEDSAMIX_IMPLEMENTATION) in the two-unit embedding test;
   two_tu_main.c includes only the declarations. Built by `make test`. */
#define MEDSAMIX_IMPLEMENTATION
#include "../../medsamix.h"

int embed_impl_groups(void) { return msx_merge_n_groups(12, 2); }
