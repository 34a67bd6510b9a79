#!/usr/bin/env bash
# Builds the C++ engine with AddressSanitizer + UndefinedBehaviorSanitizer and runs its tests.
# Any report fails the run. Not part of CI (the instrumented build and run take a few minutes).
#   bash .ci/sanitize.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
export KSTCONV_CXXFLAGS="-fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
python -m pytest -q -p no:cacheprovider tests/test_cpp_engine.py tests/test_functional.py \
  tests/test_property.py -k "cpp" "$@"
echo "sanitizers: no report"
