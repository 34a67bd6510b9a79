"""Benchmark the real-layer suite: triton_kstconv vs PyTorch's own transposed convolution vs
zero insertion (the paper's baseline), measured side by side in one run.

    python -m perf.bench              # quick subset on the device at hand (CUDA if present)
    python -m perf.bench --full       # every layer
    python -m perf.bench --device cpu --layers dcgan unet

Forward and forward+backward; on CUDA also bfloat16. Medians of interleaved, order-rotated
rounds. On CPU the process re-executes itself once with glibc's mmap threshold raised, so that
no implementation pays page faults on freshly mapped outputs that another does not (glibc maps
large buffers afresh on every call otherwise: ~15 ms of faults for a 16 MB output); the setting
is recorded in the results. Writes JSON and a Markdown
table under perf/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def _ensure_allocator_setting(argv, module="perf.bench"):
    """Re-execute ``module`` with glibc's mmap threshold raised (once; see the docstring)."""
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()) or "--no-malloc-env" in argv:
        return
    env = dict(os.environ, **MALLOC_ENV)
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="default: cuda if available, else cpu")
    ap.add_argument("--full", action="store_true", help="every layer (default: quick subset)")
    ap.add_argument("--suite", choices=["real", "grouped"], default="real",
                    help="the real-layer suite, or the depthwise / grouped one")
    ap.add_argument("--layers", nargs="*", help="substrings of layer keys (model/name)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (median)")
    ap.add_argument("--dtypes", nargs="*", default=None, help="float32 bfloat16 ...")
    ap.add_argument("--impls", nargs="*", default=["ours", "native", "zero_insertion"])
    ap.add_argument("--no-backward", action="store_true", help="forward only")
    ap.add_argument("--out", default=None, help="results path prefix (default: perf/results/...)")
    ap.add_argument("--no-malloc-env", action="store_true",
                    help="do not re-execute with the raised mmap threshold (CPU)")
    return ap.parse_args(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        _ensure_allocator_setting(argv)
    from perf import layers as L
    from perf import runner
    suite = L.select(args.layers, quick=not args.full, suite=args.suite)
    dtypes = args.dtypes or (["float32", "bfloat16"] if device == "cuda" else ["float32"])
    rounds = args.rounds or (7 if device == "cpu" else 20)
    modes = ["forward"] if args.no_backward else ["forward", "forward+backward"]
    meta = runner.metadata(device)
    print(f"# triton_kstconv benchmark on {meta['device_name']} ({device}), torch "
          f"{meta['torch']}, triton {meta['triton']}, {meta['threads']} threads", flush=True)
    peak = runner.measure_peak(device, dtypes)
    meta["peak_gflops"] = peak
    print("# measured matmul peak: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items()),
          flush=True)
    results = runner.run_suite(suite, device, dtypes, modes, args.impls, rounds, peak)
    summary = runner.summarize(results, args.impls)
    for key, s in summary.items():
        if s.get("max_frac_peak") and s["max_frac_peak"][1] > 1.0:
            print(f"# WARNING {key}: {s['max_frac_peak'][0]} runs at "
                  f"{100 * s['max_frac_peak'][1]:.0f} % of the measured matmul peak: the peak "
                  "measurement is off (was the machine busy?)", flush=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    kind = "grouped" if args.suite == "grouped" else "full" if args.full else "quick"
    prefix = args.out or os.path.join(os.path.dirname(__file__), "results",
                                      f"{device}-{kind}-{stamp}")
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump({"meta": meta, "results": results, "summary": summary}, f, indent=1)
    table = runner.markdown(results, summary, meta)
    with open(prefix + ".md", "w") as f:
        f.write(table)
    try:
        runner.chart(results, prefix + ".png", meta)
    except ImportError:
        print("# (matplotlib not installed: no chart; pip install -e .[perf])")
    print(table)
    print(f"# wrote {prefix}.json / .md / .png")
    return results, summary


if __name__ == "__main__":
    main()
