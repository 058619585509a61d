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
#endif
