#!/usr/bin/env bash
# Everything that needs a GPU, in one call (the device tool runs it in the repository root):
# the CUDA test suite, then the full benchmark (fp32 and bf16, forward and forward+backward),
# results written under $OUT (default perf/results/gpu-<date>) for committing to perf/results/.
#   device run:  bash perf/gpu_check.sh
# Configs come from the shipped tuning table (triton_kstconv/tuned/, written by
# `python -m perf.autotune`, a separate call) or the heuristic: tuning every key of the suite on
# the fly would not fit one call. KSTCONV_AUTOTUNE=1 bash perf/gpu_check.sh tunes anyway.
set -uo pipefail
OUT="${OUT:-perf/results/gpu-$(date +%Y%m%d-%H%M)}"
mkdir -p "$OUT"
export KSTCONV_TEST_GPU=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export KSTCONV_AUTOTUNE="${KSTCONV_AUTOTUNE:-0}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/env.txt"
python -m pytest -q -p no:cacheprovider tests -k "triton or cuda" -x 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
python -m perf.bench --device cuda --full --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
