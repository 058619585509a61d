/* tests/embed/static_b.c - the second private copy (see static_a.c). */
#define MEDSAMIX_STATIC
#define MEDSAMIX_IMPLEMENTATION
#include "../../medsamix.h"

int static_b_groups(void) { return msx_merge_n_groups(24, 4); }
const char *static_b_last_error(void) { return msx_last_error(); }
