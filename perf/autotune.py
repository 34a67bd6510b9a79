"""The autotune sweep: time every Triton config of the space (pruned per problem) on the
real-layer suite, or on your own shapes, and save the best per shape key as a table that the
library loads at run time (known shapes then skip tuning).

    python -m perf.autotune                              # the suite, on the GPU
    python -m perf.autotune --shape 8,256,128,32,32,4,2,1,0 --dtypes bfloat16
    python -m perf.autotune --smoke                      # plumbing check, Triton interpreter

Shapes are ``N,C_in,C_out,*spatial,k,s,p,op`` (1-3 spatial sizes). The table goes to
``triton_kstconv/tuned/<gpu>.json`` (``--out`` to change); keys bucket channels to powers of
two and never include batch or spatial size, so one entry serves every batch size.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys


MARGIN = 0.97   # a candidate is tabled only if at least 3 % faster than the current config


def parse_shape(text: str):
    from perf.layers import Layer
    v = [int(t) for t in text.split(",")]
    n, ci, co, *rest = v
    *size, k, s, p, op = rest
    if not 1 <= len(size) <= 3:
        raise SystemExit(f"--shape {text!r}: expected N,C_in,C_out,*spatial(1-3),k,s,p,op")
    return Layer("custom", text, n, ci, co, tuple(size), k, s, p, op)


def _bench(fn, device):
    import torch
    if device.type == "cuda":
        # kernel time, replayed in a CUDA graph: timed eagerly, a small layer's configs all
        # read as the launch's host cost (the H200 sweep of 2026-11-30 floored at ~0.08 ms)
        from triton.testing import do_bench_cudagraph
        torch.cuda.synchronize()   # its warm-up runs on a new stream, which waits for nothing
        return float(do_bench_cudagraph(fn, rep=20, return_mode="median"))
    import time
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def sweep_layer(layer, dtype, kinds, device, max_configs=None, smoke=False):
    """Best config per pass kind for one layer: {kind: (key, cfg, best_ms, current_ms)}, cfg
    None where no config beats by MARGIN what the engine takes now (a table's or the
    heuristic's, and the runtime autotuner's pick where autotuning is on)."""
    import torch
    from triton_kstconv import config
    from triton_kstconv import triton_engine as te
    from triton_kstconv.epilogue import Activation
    from triton_kstconv.ops import geometry_of
    nd = layer.nd
    geom = geometry_of(layer.size, (layer.kernel,) * nd, (layer.stride,) * nd,
                       (layer.padding,) * nd, (layer.output_padding,) * nd, 1, (1,) * nd)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(layer.batch, layer.c_in, *layer.size, generator=g).to(device, dtype)
    w = (torch.randn(layer.c_in, layer.c_out, *(layer.kernel,) * nd, generator=g)
         / math.sqrt(layer.c_in * layer.kernel ** nd)).to(device, dtype)
    gy = torch.randn(layer.batch, layer.c_out, *geom.out_size, generator=g).to(device, dtype)
    runs = {
        "fwd": lambda: te.forward(x, w, None, geom, Activation(), False),
        "dgrad": lambda: te.grad_input(gy, w, geom),
        "wgrad": lambda: te.grad_weight(x, gy, w.shape, geom, dtype),
    }
    out = {}
    for kind in kinds:
        # the key the engine itself computes for this pass and the config it takes without
        # tuning (a table's or the heuristic's; config_log records both)
        te.config_log.clear()
        with config.override(autotune=False):
            runs[kind]()
        key = next((k for k in te.config_log if k.startswith(kind + "|")), None)
        if key is None:
            continue
        baselines = [te.config_log[key][1]]
        if not smoke and config.knobs().autotune and not te.interpreting():
            runs[kind]()                       # the runtime autotuner's pick, where it is on
            picked = te.config_log.get(key, (None, None))
            if picked[0] == "autotune" and picked[1] and picked[1] not in baselines:
                baselines.append(picked[1])
        if smoke:
            space = [dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4,
                          num_stages=1),
                     dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4,
                          num_stages=1)]
        else:
            space = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                     for c in te.config_space(kind)]
            space = [c for c in space if _fits(c, kind, layer, dtype)]
        if kind == "wgrad":
            for c in space:
                c.pop("GROUP_M", None)
        if max_configs:
            space = space[:max_configs]
        # timed the way the candidates are (forced): timed through the runtime autotuner
        # instead, the H200 sweep of 2026-11-30 compared its dispatch cost, not configs
        current = float("inf")
        for cfg in baselines:
            with te.forced_config(cfg):
                current = min(current, _bench(runs[kind], device))
        best = (float("inf"), None)
        for cfg in space:
            try:
                with te.forced_config(cfg):
                    ms = _bench(runs[kind], device)
            except Exception as exc:  # a config the compiler rejects (resources)
                print(f"    skip {cfg}: {type(exc).__name__}", file=sys.stderr)
                continue
            if ms < best[0]:
                best = (ms, cfg)
        if best[0] >= MARGIN * current and not smoke:   # none beats it: left as it is
            best = (current, None)
        out[kind] = (key, best[1], best[0], current)
    return out


def _fits(cfg, kind, layer, dtype):
    """The engine's own pruning (triton_config.prune), from the layer's sizes."""
    import torch

    def p2(v):
        return 1 << max(0, int(v - 1).bit_length())
    if cfg["BLOCK_K"] != (64 if dtype in (torch.float16, torch.bfloat16) else 32):
        return False
    c_dst = {"fwd": layer.c_out, "dgrad": layer.c_in, "wgrad": layer.c_out}[kind]
    return cfg["BLOCK_N"] <= 2 * max(16, p2(c_dst))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", nargs="*", help="substrings of suite layer keys")
    ap.add_argument("--shape", action="append", default=[], help="N,C_in,C_out,*spatial,k,s,p,op")
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--kinds", nargs="*", default=["fwd", "dgrad", "wgrad"])
    ap.add_argument("--max-configs", type=int, default=None)
    ap.add_argument("--out", default=None,
                    help="table path (default triton_kstconv/tuned/<gpu>.json)")
    ap.add_argument("--smoke", action="store_true",
                    help="two tiny configs on one tiny layer in the Triton interpreter (CPU)")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from perf import layers as L
    from triton_kstconv import triton_engine as te
    if args.smoke:
        device = torch.device("cpu")
        suite = [parse_shape("1,4,4,3,3,4,2,1,0")]
        dtypes = ["float32"]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("perf.autotune times Triton kernels on a GPU (or --smoke)")
        device = torch.device("cuda")
        suite = [parse_shape(s) for s in args.shape] or L.select(args.layers)
        dtypes = args.dtypes
    try:
        from tqdm import tqdm
        progress = tqdm(total=len(suite) * len(dtypes), desc="autotune")
    except ImportError:
        progress = None
    name = re.sub(r"[^A-Za-z0-9]+", "_", te.device_name(device)).strip("_").lower()
    path = args.out or os.path.join(os.path.dirname(te.__file__), "tuned", f"{name}.json")
    table = {}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f).get("configs", {})
    rows = []
    for layer in suite:
        for dname in dtypes:
            res = sweep_layer(layer, getattr(torch, dname), args.kinds, device,
                              args.max_configs, args.smoke)
            for kind, (key, cfg, best, current) in res.items():
                if cfg is not None:
                    table[key] = cfg
                rows.append((layer.key, dname, kind, best, current, cfg or "current kept"))
            if progress is not None:
                progress.update(1)
    if progress is not None:
        progress.close()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"device": te.device_name(device), "torch": torch.__version__,
                   "configs": table}, f, indent=1, sort_keys=True)
    te.reload_tuned_tables()
    print("| layer | dtype | pass | best ms | current ms | speedup | config |")
    print("|---|---|---|---|---|---|---|")
    for key, dname, kind, best, current, cfg in rows:
        print(f"| {key} | {dname} | {kind} | {best:.4f} | {current:.4f} | {current / best:.2f} | "
              f"{json.dumps(cfg, sort_keys=True)} |")
    print(f"# wrote {path} ({len(table)} keys)")
    return path, rows


if __name__ == "__main__":
    main()
