"""The Triton engine's host work per call, without a GPU: every launch is counted and dropped
(a launch recorder, as ``triton_engine.capture_launches`` uses them), so what is timed is the
Python from the module call to Triton's launcher (not the launcher itself). CPU tensors under
TRITON_INTERPRET=1, one thread.

    python -m perf.host_cost                       # the quick layers
    python -m perf.host_cost --layers dcgan/256 --profile 25
    python -m perf.host_cost --split cuda --layers dcgan/256   # on a GPU, launches running

Per layer: a training step (forward + backward, bias included, grads set to None between
steps) and an inference forward (no_grad, packed weight reused), median and best of 25 blocks
of 40 calls, in µs; Python function calls per training step (cProfile's count, deterministic).
The first GPU run (perf/results/gpu-h200-20261130-2052) measured 0.7-1.9 ms of host time in a
training call there; this is the part of it that is ours. ``--split cuda`` (perf/gpu_check.sh
runs it) times a training call there with the launches running, split into Triton's launches,
the engine's forward and backward, and autograd's share, beside PyTorch's layer.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import os
import pstats
import statistics
import time


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


class _Timed:
    """Wraps a module function: its wall time and calls add up in ``acc[name]``."""

    def __init__(self, module, name, acc):
        self.module, self.name, self.acc = module, name, acc
        self.orig = getattr(module, name)

    def __enter__(self):
        orig, acc, name = self.orig, self.acc, self.name

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                acc[name] = acc.get(name, 0.0) + time.perf_counter() - t
                acc[name + "_calls"] = acc.get(name + "_calls", 0) + 1
        setattr(self.module, self.name, timed)

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.orig)


def split(layer, device, calls: int = 30, warmup: int = 3) -> dict:
    """Where one training call's host time goes, launches running (the GPU: the device is
    synchronised before each call, never inside it): forward and backward by wall clock, and
    inside them Triton's launches (``triton_engine.launch``, the JIT's binder, cache lookup
    and launcher) and the engine's own forward and joint backward; what is left of the
    backward is autograd's. PyTorch's layer (cuDNN on a GPU) beside it. Medians, µs."""
    import torch
    import triton_kstconv as K
    from triton_kstconv import triton_engine as te
    from perf.gpu_bench import sync
    dev = torch.device(device)
    stock = {1: torch.nn.ConvTranspose1d, 2: torch.nn.ConvTranspose2d,
             3: torch.nn.ConvTranspose3d}[layer.nd](layer.c_in, layer.c_out, layer.kernel,
                                                    **layer.conv_kwargs(), bias=layer.bias)
    ours = K.convert(copy.deepcopy(stock), backend="triton")       # convert works in place
    stock, ours = stock.to(dev), ours.to(dev)
    x = torch.randn(layer.batch, layer.c_in, *layer.size, device=dev, requires_grad=True)
    gy = torch.randn(layer.batch, layer.c_out, *layer.out_size, device=dev)

    def run(mod):
        x.grad = None
        mod.zero_grad(set_to_none=True)
        sync(dev.type)
        t0 = time.perf_counter()
        y = mod(x)
        t1 = time.perf_counter()
        y.backward(gy)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    out = {"layer": layer.key, "device": str(dev)}
    for name, mod in (("stock", stock), ("ours", ours)):
        for _ in range(warmup):
            run(mod)                                 # compile, autotune, plans
        rows = []
        for _ in range(calls):
            acc: dict = {}
            with _Timed(te, "launch", acc), _Timed(te, "forward", acc), \
                    _Timed(te, "joint_backward", acc):
                fwd, bwd = run(mod)
            rows.append((fwd, bwd, acc))
        med = lambda f: statistics.median(f(r) for r in rows) * 1e6  # noqa: E731
        r = {"forward_us": med(lambda r: r[0]), "backward_us": med(lambda r: r[1])}
        if name == "ours":
            r.update(
                launches=rows[-1][2].get("launch_calls", 0),
                launch_us=med(lambda r: r[2].get("launch", 0.0)),
                engine_forward_us=med(lambda r: r[2].get("forward", 0.0)),
                engine_backward_us=med(lambda r: r[2].get("joint_backward", 0.0)),
                autograd_backward_us=med(lambda r: r[1] - r[2].get("joint_backward", 0.0)))
        out[name] = r
    sync(dev.type)
    return out


_SPLIT_HEADER = ("| layer | device | stock fwd / bwd µs | ours fwd / bwd µs | launches "
                 "| in launches µs | engine fwd / bwd µs (launches included) "
                 "| bwd outside the engine µs |\n|---|---|---|---|---|---|---|---|")


def _split_row(r) -> str:
    s, o = r["stock"], r["ours"]
    return (f"| {r['layer']} | {r['device']} | {s['forward_us']:.0f} / {s['backward_us']:.0f} | "
            f"{o['forward_us']:.0f} / {o['backward_us']:.0f} | {o['launches']} | "
            f"{o['launch_us']:.0f} | {o['engine_forward_us']:.0f} / "
            f"{o['engine_backward_us']:.0f} | {o['autograd_backward_us']:.0f} |")


def split_markdown(rows) -> str:
    return "\n".join([_SPLIT_HEADER] + [_split_row(r) for r in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", nargs="*", help="substrings of suite layer keys")
    ap.add_argument("--profile", type=int, default=0, help="print this many cProfile rows")
    ap.add_argument("--split", default=None, metavar="DEVICE",
                    help="launches running on DEVICE (cuda): where a training call's host "
                         "time goes, ours and PyTorch's (Markdown)")
    args = ap.parse_args(argv)
    if args.split in (None, "cpu"):
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported
    import torch
    from perf import layers as L
    if args.split:   # each row printed as it is measured (a time limit keeps those done)
        print(_SPLIT_HEADER, flush=True)
        rows = []
        for layer in L.select(args.layers, quick=not args.layers):
            rows.append(split(layer, args.split))
            print(_split_row(rows[-1]), flush=True)
        return rows
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
