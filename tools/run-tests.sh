#!/bin/sh
# Runs every test program, then prints one closing line "N passed, N failed"
# summed over all of them. Exit status is non-zero if anything failed.
build=$1; shift
export MSX_BUILD="$build"   # tests that run the tools (test_mpi) find them here
pass=0; fail=0; bad=""
for t in "$@"; do
    out=$("$t" 2>&1); rc=$?
    printf '%s\n' "$out" | grep -E 'FAIL|passed, [0-9]+ failed' | head -40
    p=$(printf '%s\n' "$out" | sed -n 's/.*: \([0-9][0-9]*\) passed, \([0-9][0-9]*\) failed.*/\1/p' | tail -1)
    f=$(printf '%s\n' "$out" | sed -n 's/.*: \([0-9][0-9]*\) passed, \([0-9][0-9]*\) failed.*/\2/p' | tail -1)
    [ -n "$p" ] || { p=0; f=1; printf '%s\n' "$out" | tail -20; echo "$t: crashed or printed no summary (exit $rc)"; }
    [ "$rc" = 0 ] || [ "$f" != 0 ] || { f=1; echo "$t: exit status $rc"; }
    pass=$((pass + p)); fail=$((fail + f))
    [ "$f" = 0 ] || bad="$bad $(basename "$t")"
done
[ -z "$bad" ] || echo "failing:$bad"
echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
