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
int msx_cmd_bench_search(int argc, char **argv); /* cmd_bench_search.c */
#endif
