#!/bin/sh
# Inlines parts/*.h into medsamix.h (the development shell includes them).
# Run once when sections are developed in parts/; the result is the single
# shipped header. Usage: sh tools/amalgamate.sh [IN] [OUT]
set -e
in=${1:-medsamix.h}; out=${2:-medsamix.h}
tmp=$out.amalg.$$
awk '
/^#ifndef MSX_SKIP_[A-Z]+$/ { skip_guard = $0; next }
/^#include "parts\/[a-z_]+\.h"$/ {
    f = $2; gsub(/"/, "", f)
    while ((getline line < f) > 0) print line
    close(f); pending_endif = (skip_guard != ""); skip_guard = ""; next
}
/^#endif$/ && pending_endif { pending_endif = 0; next }
{ if (skip_guard != "") { print skip_guard; skip_guard = "" } print }
' "$in" > "$tmp"
mv "$tmp" "$out"
