#!/usr/bin/env bash
# Everything that needs a GPU, in two device calls of under 9 minutes each (the device tool runs
# them in the repository root; results land under $OUT, which comes back):
#
#   device run:  bash perf/gpu_check.sh 1     # env, the CUDA tests, the float32 suite
#   device run:  bash perf/gpu_check.sh 2     # the bfloat16 suite
#   here:        python -m perf.gpu_bench --report <part 1 dir> <part 2 dir> \
#                    --out perf/results/gpu-<device>-<date>       # gpu.json / .md / .png
#
# Each part writes its rows to $OUT/rows.jsonl as they are measured and stops starting new
# layers before its time is up (GPU_BUDGET_S), so a cut-off run still returns what it measured,
# and ends with its own report (gpu.md). Triton configs: the shipped tuning table where it has
# the layer, else the heuristic (KSTCONV_AUTOTUNE=0); KSTCONV_AUTOTUNE=1 tunes on the fly (slow:
# first_ms then shows the tuning). FlagGems competes where a wheel of it travels in .whl/ (carry
# .whl; PyPI's flag-gems 5.0.2 has no conv_transpose2d, so only a build of its main branch does).
set -uo pipefail
part="${1:-1}"
OUT="${OUT:-perf/results/gpu-$(date +%Y%m%d-%H%M)-part$part}"
mkdir -p "$OUT"
export KSTCONV_TEST_GPU=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export KSTCONV_AUTOTUNE="${KSTCONV_AUTOTUNE:-0}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# (at most 8 files come back: tests.log, bench.log, rows.jsonl, meta-*.json, gpu.json/.md/.png)
log="$OUT/bench.log"
[ "$part" = 1 ] && log="$OUT/tests.log"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} 2>&1 | tee "$log"
start=$(date +%s)
tests_rc=0
if [ "$part" = 1 ]; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests -k "triton or cuda" --maxfail=25 \
    2>&1 | tee -a "$OUT/tests.log"
  tests_rc=${PIPESTATUS[0]}
  dtypes=float32
else
  dtypes=bfloat16
fi
spent=$(( $(date +%s) - start ))
budget=${GPU_BUDGET_S:-$(( 470 - spent ))}
python3 -m perf.gpu_bench --full --dtypes "$dtypes" --out "$OUT" --budget-s "$budget" \
  2>&1 | tee -a "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
python3 -m perf.gpu_bench --report "$OUT" > /dev/null 2>&1 || echo "report failed"
echo "part $part: tests rc=$tests_rc bench rc=$bench_rc (${spent}s of tests)"
exit $(( tests_rc || bench_rc ))
