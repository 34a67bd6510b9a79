#!/usr/bin/env bash
# Everything that needs a GPU, in ONE device call (the device tool runs it in the repository
# root; results land under $OUT, which comes back). A session's device time is 15 minutes, the
# machine's start included, so the call is sized to end inside GPU_TOTAL_S (default 480 s):
#
#   device run (timeout_s 600):  bash perf/gpu_check.sh
#   here:  python -m perf.gpu_bench --report <files_at> --out perf/results/gpu-<device>-<date>
#
# 1. env (nvidia-smi, versions);
# 2. the CUDA tests (`-k "triton or cuda"`, in parallel where pytest-xdist is there), stopped
#    with SIGINT at GPU_TESTS_S (default 150 s) so that pytest still prints which tests failed
#    and why (the first run, 2026-11-30, lost both to a SIGTERM);
# 3. `perf.host_cost --split cuda` on three layers (GPU_SPLIT_S, 75 s at most): a training
#    call's host time split into Triton's launches, the engine's own work and autograd's, with
#    cuDNN's beside it (the second run measured ~1.1 ms against cuDNN's 0.27);
# 4. the real-layer suite, float32 (PyTorch's TF32 flags) and bfloat16 layer by layer, ours
#    and cuDNN in both layouts (GPU_IMPLS; zero insertion costs minutes on the k64s32 layer),
#    each row appended to rows.jsonl as it is measured; no layer is started after the budget,
#    and a layer still running at the hard limit is killed (its rows so far are kept);
# 5. the report (gpu.json / .md / .png) from whatever rows there are.
#
# At most 8 files come back: tests.log, host_split.md, bench.log, rows.jsonl, meta-*.json,
# gpu.json/.md/.png.
# Triton configs: the shipped tuning table where it has the layer, else the heuristic
# (KSTCONV_AUTOTUNE=0); KSTCONV_AUTOTUNE=1 tunes on the fly (slow). FlagGems competes where a
# wheel of it travels in .whl/ (carry .whl and add flaggems to GPU_IMPLS).
set -uo pipefail
OUT="${OUT:-perf/results/gpu-$(date +%Y%m%d-%H%M)}"
mkdir -p "$OUT"
export KSTCONV_TEST_GPU=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export KSTCONV_AUTOTUNE="${KSTCONV_AUTOTUNE:-0}"
total=${GPU_TOTAL_S:-480}
impls=${GPU_IMPLS:-"ours ours_cl cudnn cudnn_cl"}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
start=$(date +%s)
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} 2>&1 | tee "$OUT/tests.log"
xdist=""
python3 -c "import xdist" 2>/dev/null && xdist="-n 8"
timeout -s INT -k 20 "${GPU_TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider tests \
  -k "triton or cuda" $xdist --tb=short -rfE 2>&1 | tee -a "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
# where a training call's host time goes (Triton's launches, the engine, autograd), vs cuDNN
# (heuristic configs, as the suite: KSTCONV_AUTOTUNE=0 above; its errors go to tests.log)
timeout -s INT -k 10 "${GPU_SPLIT_S:-75}" python3 -m perf.host_cost --split cuda \
  --layers "dcgan/256-128@8" "fcn/21-21@16 k4s2" "pix2pix/1024-512@2" \
  2>>"$OUT/tests.log" | tee "$OUT/host_split.md"
spent=$(( $(date +%s) - start ))
budget=$(( total - spent - 60 ))          # the last layer started and the report fit in 60 s
hard=$(( total - spent - 20 ))
[ "$hard" -lt 10 ] && hard=10              # SIGINT at the hard limit, SIGKILL 20 s later
timeout -s INT -k 20 "$hard" python3 -m perf.gpu_bench --full \
  --dtypes float32 bfloat16 --impls $impls --out "$OUT" --budget-s "$budget" \
  2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
python3 -m perf.gpu_bench --report "$OUT" 2>&1 | tail -12
echo "tests rc=$tests_rc (${spent}s) bench rc=$bench_rc, $(( $(date +%s) - start ))s in all"
exit $(( tests_rc || bench_rc ))
