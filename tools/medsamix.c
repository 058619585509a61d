/* medsamix - command-line front end of medsamix.h.
   This file holds the implementation and the dispatcher; each family of
   subcommands lives in tools/cmd_*.c. */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "cli.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* The option helpers shared by the commands live in tools/cmd_common.c. */

static const struct { const char *name, *help; int (*fn)(int, char **); } cmds[] = {
    {"inspect", "inspect FILE [--json] [--config C]  architecture and per-tensor digest of a checkpoint", msx_cmd_inspect},
    {"forward", "forward --model M --cases IN --out OUT   SAM forward pass on golden-format cases", msx_cmd_forward},
    {"segment", "segment --model M --image IMG --box x0,y0,x1,y1 --out MASK.png   segment one object", msx_cmd_segment},
    {"bench", "bench [--threads N]               SAM ViT-B encoder/decoder timing vs the GEMM peak", msx_cmd_bench},
    {"merge", "merge --base B --models A [B..] (--plan P | --method M) --out OUT   merge checkpoints", msx_cmd_merge},
    {"bench-merge", "bench-merge                       merge throughput vs copy bandwidth", msx_cmd_bench_merge},
    {"bench-opt", "bench-opt                         optimiser vs random search on test functions", msx_cmd_bench_opt},
    {"bench-scale", "bench-scale                       the MPI coordinator simulated for 2..1024 workers", msx_cmd_bench_scale},
    {"search", "search --base B --models A .. --tasks DIR ..   MedSAMix search", msx_cmd_search},
    {"bench-search", "bench-search [--seeds K] [--task T|all]   search: racing vs full evaluation on the demo world", msx_cmd_bench_search},
    {"eval", "eval --model M --tasks DIR .. [--split test]   Dice of one model", msx_cmd_eval},
    {"prepare", "prepare --nnunet ROOT --task-table T.json --out DIR   nnU-Net volumes -> task folders", msx_cmd_prepare},
};

static void usage(FILE *f) {
    size_t i;
    fprintf(f, "medsamix %s - merge and search Segment Anything checkpoints on CPU\n\nusage:\n", MSX_VERSION_STRING);
    for (i = 0; i < sizeof cmds / sizeof cmds[0]; i++) fprintf(f, "  medsamix %s\n", cmds[i].help);
    fprintf(f, "\n'medsamix COMMAND --help' for a command's options.\n");
}

int main(int argc, char **argv) {
    size_t i;
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version")) { printf("medsamix %s\n", MSX_VERSION_STRING); return 0; }
    for (i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
        if (!strcmp(argv[1], cmds[i].name)) return cmds[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "medsamix: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
