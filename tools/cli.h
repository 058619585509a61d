/* tools/cli.h - subcommands of the medsamix tool (one tools/cmd_*.c each).
   Each takes argv with argv[0] = the subcommand name and returns the exit
   status: 0 success, 1 failure (message on stderr), 2 usage error. */
#ifndef MSX_CLI_H
#define MSX_CLI_H
int msx_cmd_inspect(int argc, char **argv);     /* cmd_inspect.c */
int msx_cmd_forward(int argc, char **argv);     /* cmd_forward.c */
int msx_cmd_bench(int argc, char **argv);       /* cmd_forward.c */
int msx_cmd_segment(int argc, char **argv);     /* cmd_segment.c */
int msx_cmd_merge(int argc, char **argv);       /* cmd_merge.c */
int msx_cmd_bench_merge(int argc, char **argv); /* cmd_merge.c */
int msx_cmd_bench_opt(int argc, char **argv);   /* cmd_opt.c */
int msx_cmd_search(int argc, char **argv);      /* cmd_search.c */
int msx_cmd_eval(int argc, char **argv);        /* cmd_search.c */
int msx_cmd_bench_scale(int argc, char **argv); /* cmd_scale.c */
int msx_cmd_bench_search(int argc, char **argv); /* cmd_bench_search.c */
/* cmd_search.c, shared with tools/medsamix-mpi.c (needs medsamix.h first) */
#ifdef MEDSAMIX_H
int msx_cli_search_parse(int argc, char **argv, msx_search_options *o, const char **models, const char **tasks, int *help);
int msx_cli_search_finish(const msx_search_options *o, const msx_search_summary *s, msx_result r);
#endif
int msx_cmd_prepare(int argc, char **argv);     /* cmd_prepare.c */
/* segment --volume: called by msx_cmd_segment when --volume is given */
int msx_cmd_segment_volume(int argc, char **argv); /* cmd_volume.c */

/* Option helpers shared by the commands (tools/medsamix.c). Each prints
   "CMD: OPTION: ..." naming the offending value and returns 0 on failure. */
/* A list option appends every value up to the next --option to list[*n]
   (so "--models A --models B" keeps both); at least one value; at most max
   in total. */
int msx_cli_list(const char *cmd, int argc, char **argv, int *i, const char **list, int *n, int max);
/* A finite number in [lo, hi] ("nan", "inf", "abc", "" are refused). */
int msx_cli_num(const char *cmd, const char *opt, const char *v, double lo, double hi, double *out);
/* A whole number in [lo, hi]. */
int msx_cli_int(const char *cmd, const char *opt, const char *v, long lo, long hi, int *out);
/* Refuses outputs that are inputs or each other (msx_check_outputs). */
int msx_cli_check_outputs(const char *cmd, const char *const *in, int n_in, const char *const *out, int n_out);
/* 1 when path ends in ext (ASCII case-insensitive). */
int msx_cli_has_ext(const char *path, const char *ext);
#endif
