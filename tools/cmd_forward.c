#include "../medsamix.h"
#include "cli.h"
#include <stdio.h>
int msx_cmd_forward(int argc, char **argv) { (void)argc; fprintf(stderr, "%s: not built yet\n", argv[0]); return 1; }
int msx_cmd_bench(int argc, char **argv) { (void)argc; fprintf(stderr, "%s: not built yet\n", argv[0]); return 1; }
