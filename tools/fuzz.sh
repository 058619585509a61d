#!/bin/sh
# tools/fuzz.sh SECONDS [HARNESS...] - builds the libFuzzer harnesses of the
# checkpoint parsers (tests/fuzz/fuzz_{zip,pickle,safetensors}.c) and of the
# NIfTI reader (tests/fuzz/fuzz_nifti.c; regressions replayed by test_nifti) with
# clang -fsanitize=fuzzer,address,undefined and runs each for SECONDS
# (default 60) on a copy of its seed corpus. A crash leaves its input in
# build/fuzz/crash-*; copy it to tests/fuzz/regressions/<harness>-<name>
# so tests/test_ckpt_regress.c keeps checking it.
set -e
secs=${1:-60}
[ $# -gt 0 ] && shift
harnesses=${*:-"zip pickle safetensors nifti"}
CLANG=${CLANG:-clang}
command -v "$CLANG" >/dev/null 2>&1 || CLANG=clang-14
out=build/fuzz
mkdir -p "$out"
# (Re)generate the seed corpus from tests/fuzz/make_corpus.c.
cc -std=c99 -O1 -fopenmp -I. -I/usr/include/nifti -o "$out/make_corpus" tests/fuzz/make_corpus.c -ldnnl -lstb -lnifti2 -lznz -lz -lm
"$out/make_corpus" >/dev/null
status=0
for h in $harnesses; do
    # The zip harness skips CRC checks so that mutants reach the pickle.
    extra=""; [ "$h" = zip ] && extra="-DMSX_NO_CRC_CHECK"
    "$CLANG" -std=c99 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined $extra \
        -fopenmp -I. -I/usr/include/nifti -o "$out/fuzz_$h" "tests/fuzz/fuzz_$h.c" -ldnnl -lstb -lnifti2 -lznz -lz -lm
    mkdir -p "$out/corpus_$h" # kept between runs: the fuzzer grows it
    cp tests/fuzz/corpus/"$h"/* "$out/corpus_$h/"
    for f in tests/fuzz/regressions/"$h"-*; do
        if [ -f "$f" ]; then cp "$f" "$out/corpus_$h/"; fi
    done
    echo "== fuzz_$h for ${secs}s"
    if ! ASAN_OPTIONS=detect_leaks=1 "$out/fuzz_$h" -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 \
         -artifact_prefix="$out/crash-$h-" -print_final_stats=1 "$out/corpus_$h" 2>"$out/fuzz_$h.log"; then
        status=1
        echo "fuzz_$h: CRASH - see $out/fuzz_$h.log and $out/crash-$h-*"
    fi
    grep -E 'stat::number_of_executed_units|Done [0-9]+ runs' "$out/fuzz_$h.log" | tail -2
done
exit $status
