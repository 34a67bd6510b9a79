"""The Triton engine's host work per call, without a GPU: every launch is counted and dropped
(a launch recorder, as ``triton_engine.capture_launches`` uses them), so what is timed is the
Python from the module call to Triton's launcher (not the launcher itself). CPU tensors under
TRITON_INTERPRET=1, one thread.

    python -m perf.host_cost                       # the quick layers
    python -m perf.host_cost --layers dcgan/256 --profile 25

Per layer: a training step (forward + backward, bias included, grads set to None between
steps) and an inference forward (no_grad, packed weight reused), median and best of 25 blocks
of 40 calls, in µs; Python function calls per training step (cProfile's count, deterministic).
The first GPU run (perf/results/gpu-h200-20261130-2052) measured 0.7-1.9 ms of host time in a
training call there; this is the part of it that is ours.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported


def _blocks(fn, blocks=25, per_block=40):
    ts = []
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(per_block):
            fn()
        ts.append((time.perf_counter() - t) / per_block * 1e6)
    return statistics.median(ts), min(ts)


class _Count(list):
    """A launch recorder that keeps nothing (the buffers of a recorded launch would stay alive)."""
    launches = 0

    def append(self, item):
        self.launches += 1


def measure(layer, profile_rows: int = 0) -> dict:
    import torch
    import triton_kstconv as K
    from triton_kstconv import triton_engine as te
    mod = {1: K.ConvTranspose1d, 2: K.ConvTranspose2d, 3: K.ConvTranspose3d}[layer.nd](
        layer.c_in, layer.c_out, layer.kernel, **layer.conv_kwargs(), bias=layer.bias,
        backend="triton")
    x = torch.randn(layer.batch, layer.c_in, *layer.size, requires_grad=True)
    gy = torch.randn(layer.batch, layer.c_out, *layer.out_size)

    def step():
        x.grad = None
        mod.zero_grad(set_to_none=True)
        mod(x).backward(gy)

    def infer():
        with torch.no_grad():
            mod(x)

    rec = _Count()
    te._RECORDERS.append(rec)
    gc.disable()
    try:
        for _ in range(3):
            step()
            infer()
        before = rec.launches
        step()
        launches = rec.launches - before
        train = _blocks(step)
        inference = _blocks(infer)
        prof = cProfile.Profile(time.perf_counter)
        prof.enable()
        for _ in range(20):
            step()
        prof.disable()
    finally:
        gc.enable()
        te._RECORDERS.remove(rec)
    stats = pstats.Stats(prof)
    if profile_rows:
        stats.sort_stats("cumulative").print_stats(profile_rows)
    return dict(layer=layer.key, train_us=train, infer_us=inference, launches=launches,
                calls_per_step=stats.total_calls / 20)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", nargs="*", help="substrings of suite layer keys")
    ap.add_argument("--profile", type=int, default=0, help="print this many cProfile rows")
    args = ap.parse_args(argv)
    import torch
    from perf import layers as L
    torch.set_num_threads(1)
    print(f"{'layer':34s} {'train µs (median / best)':>26s} {'infer µs':>16s} "
          f"{'launches':>9s} {'calls/step':>11s}")
    out = []
    for layer in L.select(args.layers, quick=not args.layers):
        r = measure(layer, args.profile)
        out.append(r)
        print(f"{r['layer']:34s} {r['train_us'][0]:12.0f} / {r['train_us'][1]:6.0f}      "
              f"{r['infer_us'][0]:7.0f} / {r['infer_us'][1]:5.0f} {r['launches']:9d} "
              f"{r['calls_per_step']:11.0f}", flush=True)
    return out


if __name__ == "__main__":
    main()
