#include "../medsamix.h"
#include "cli.h"
#include <stdio.h>
int msx_cmd_bench_opt(int argc, char **argv) { (void)argc; fprintf(stderr, "%s: not built yet\n", argv[0]); return 1; }
