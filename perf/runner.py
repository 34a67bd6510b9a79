"""Measurement machinery for perf/bench.py: metadata, the matmul peak, interleaved timing of the
three implementations, summaries, the Markdown table and the chart."""
from __future__ import annotations

import datetime
import math
import os
import platform
import statistics

import torch
import torch.nn.functional as F

import triton_kstconv as K

NATIVE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
OURS = {1: K.conv_transpose1d, 2: K.conv_transpose2d, 3: K.conv_transpose3d}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _cpu_vector_isa() -> str:
    """The widest x86 vector extension the processor reports (results differ by it: oneDNN's
    and our brgemm paths use AVX-512 where present)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return "?"
    for isa in ("avx512f", "avx2", "sse4_2"):
        if isa in flags:
            return isa
    return "?"


def metadata(device: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    return {
        "device": device, "device_name": name, "torch": torch.__version__,
        "triton": triton_version, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "cpu_isa": _cpu_vector_isa() if device == "cpu" else None,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "malloc_env": {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_",
                                                       "MALLOC_TRIM_THRESHOLD_")},
        "cudnn_benchmark": device == "cuda",
        "tf32": torch.backends.cuda.matmul.allow_tf32 if device == "cuda" else None,
    }


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, rounds_hint: int = 1) -> float:
    """Median time of one call in ms (GPU: triton.testing.do_bench; CPU: torch.utils.benchmark
    with the process's thread count)."""
    if device == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=5, rep=25, return_mode="median"))
    import time
    from torch.utils import benchmark
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    if once > 1.0:  # slow: that call was the measurement
        return once * 1e3
    number = max(1, int(0.05 / max(once, 1e-6)))  # about 50 ms per measurement
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn},
                            num_threads=torch.get_num_threads())
    return timer.timeit(number).median * 1e3


def time_interleaved(fns: dict, device: str, rounds: int, slow_s: float = 1.0) -> dict:
    """Each implementation timed once per round, the order rotated every round; medians.
    An implementation whose single call takes over ``slow_s`` seconds (zero insertion on the
    large-stride layers) is timed in the first round only."""
    import time
    names = list(fns)
    slow = set()
    for n, f in fns.items():  # warm up (compilation, autotuning, caches); spot the slow ones
        start = time.perf_counter()
        f()
        _sync(device)
        if time.perf_counter() - start > slow_s:
            slow.add(n)
        else:
            f()
    _sync(device)
    samples = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        if r % 2:
            order = order[::-1]
        for n in order:
            if n in slow and samples[n]:
                continue
            samples[n].append(time_ms(fns[n], device))
    return {n: statistics.median(v) for n, v in samples.items()}


def measure_peak(device: str, dtypes) -> dict:
    """The GEMM rate this device reaches (GFLOP/s), per dtype: the roof for the layers. A roof
    is a maximum: the best of several sizes and repeats, and of every GEMM engine PyTorch has
    here (MKL's sgemm through torch.mm, and on the CPU also oneDNN's, through a 1x1 convolution:
    on AMD processors MKL takes a slower path than oneDNN's brgemm, which the layers use), under
    the layers' thread count and allocator setting."""
    import torch.nn.functional as F
    out = {}
    sizes = (4096, 8192) if device == "cuda" else (1024, 2048, 3072)
    for name in dtypes:
        dt = getattr(torch, name)
        probes = []
        for n in sizes:
            a = torch.randn(n, n, device=device, dtype=dt)
            b = torch.randn(n, n, device=device, dtype=dt)
            c = torch.empty(n, n, device=device, dtype=dt)
            probes.append((2 * n ** 3, lambda a=a, b=b, c=c: torch.mm(a, b, out=c)))
        if device == "cpu":
            for ch, hw in ((1024, 64), (2048, 32)):
                x = torch.randn(1, ch, hw, hw, dtype=dt)
                w = torch.randn(ch, ch, 1, 1, dtype=dt)
                probes.append((2 * ch * ch * hw * hw, lambda x=x, w=w: F.conv2d(x, w)))
        best = 0.0
        for flop, fn in probes:
            fn()   # warm: threads up, pages touched
            for _ in range(3):
                best = max(best, flop / (time_ms(fn, device) * 1e-3) / 1e9)
        out[name] = best
    return out


def _make_fns(layer, device, dtype, mode, impls):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(layer.batch, layer.c_in, *layer.size, generator=g).to(device, dtype)
    fan = layer.c_in // layer.groups * layer.kernel ** layer.nd
    w = (torch.randn(*layer.weight_shape(), generator=g) / math.sqrt(fan)).to(device, dtype)
    b = torch.randn(layer.c_out, generator=g).to(device, dtype) if layer.bias else None
    kw = layer.conv_kwargs()
    nd = layer.nd
    native_x = x
    native_cl = None
    if device == "cuda" and nd >= 2:
        fmt = torch.channels_last if nd == 2 else torch.channels_last_3d
        native_cl = (x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt))
    impl_fn = {
        "ours": lambda x, w, b: OURS[nd](x, w, b, **kw),
        "native": lambda x, w, b: NATIVE[nd](x, w, b, **kw),
        "zero_insertion": lambda x, w, b: K.conv_transpose_zero_insertion(x, w, b, **kw),
    }
    fns = {}
    leaves = {}
    for name in impls:
        f = impl_fn[name]
        xi, wi = x, w
        if name == "native" and device == "cuda" and nd >= 2:
            xi, wi = native_cl if _native_prefers_cl(layer, dtype, device, native_x, w, b, kw,
                                                      native_cl) else (x, w)
        if mode == "forward":
            def fwd(f=f, xi=xi, wi=wi):
                with torch.no_grad():
                    return f(xi, wi, b)
            fns[name] = fwd
        else:
            xr, wr, br = (t.detach().clone().requires_grad_() if t is not None else None
                          for t in (xi, wi, b))
            gy = torch.randn_like(f(xr, wr, br).detach())
            leaves[name] = (xr, wr, br)

            def fb(f=f, xr=xr, wr=wr, br=br, gy=gy):
                xr.grad = wr.grad = None
                if br is not None:
                    br.grad = None
                f(xr, wr, br).backward(gy)
            fns[name] = fb
    return fns


_CL_CHOICE: dict = {}


def _native_prefers_cl(layer, dtype, device, x, w, b, kw, cl) -> bool:
    """cuDNN: the better of NCHW and channels-last, decided once per layer and dtype."""
    key = (layer.key, str(dtype))
    if key not in _CL_CHOICE:
        torch.backends.cudnn.benchmark = True
        f = NATIVE[layer.nd]
        t_nchw = time_ms(lambda: f(x, w, b, **kw), device)
        t_cl = time_ms(lambda: f(cl[0], cl[1], b, **kw), device)
        _CL_CHOICE[key] = t_cl < t_nchw
    return _CL_CHOICE[key]


def run_suite(suite, device, dtypes, modes, impls, rounds, peak):
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        from tqdm import tqdm
        progress = tqdm(total=len(suite) * len(dtypes) * len(modes), desc="layers")
    except ImportError:
        progress = None
    results = []
    for layer in suite:
        flops = layer.useful_flops()
        for dname in dtypes:
            dtype = getattr(torch, dname)
            for mode in modes:
                fns = _make_fns(layer, device, dtype, mode, impls)
                ms = time_interleaved(fns, device, rounds)
                work = flops * (3 if mode != "forward" else 1)
                row = {"model": layer.model, "layer": layer.name, "key": layer.key,
                       "nd": layer.nd, "stride": layer.stride, "dtype": dname, "mode": mode,
                       "ms": ms, "useful_gflop": work / 1e9,
                       "gflops": {n: work / (t * 1e-3) / 1e9 for n, t in ms.items()}}
                row["frac_peak"] = {n: g / peak[dname] for n, g in row["gflops"].items()}
                if "native" in ms and "ours" in ms:
                    row["speedup_vs_native"] = ms["native"] / ms["ours"]
                if "zero_insertion" in ms and "ours" in ms:
                    row["speedup_vs_zero_insertion"] = ms["zero_insertion"] / ms["ours"]
                results.append(row)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix_str(f"{layer.key} {dname} {mode}")
                else:
                    print(f"  {layer.key:38s} {dname:9s} {mode:17s} " +
                          " ".join(f"{n} {t:8.3f} ms" for n, t in ms.items()), flush=True)
    if progress is not None:
        progress.close()
    return results


def _geomean(v):
    v = [x for x in v if x and x > 0]
    return math.exp(sum(map(math.log, v)) / len(v)) if v else None


def summarize(results, impls) -> dict:
    out = {}
    for dname in sorted({r["dtype"] for r in results}):
        for mode in sorted({r["mode"] for r in results}):
            rows = [r for r in results if r["dtype"] == dname and r["mode"] == mode]
            key = f"{dname}/{mode}"
            s = {"layers": len(rows)}
            if "native" in impls:
                sp = [r["speedup_vs_native"] for r in rows]
                s["geomean_vs_native"] = _geomean(sp)
                s["min_vs_native"] = min(sp) if sp else None
                s["worst_layer_vs_native"] = min(rows, key=lambda r: r["speedup_vs_native"])[
                    "key"] if rows else None
            top = max(rows, key=lambda r: max(r["frac_peak"].values()), default=None)
            if top is not None:   # no layer may beat the matmul roof: else the roof is wrong
                s["max_frac_peak"] = [top["key"], max(top["frac_peak"].values())]
            if "zero_insertion" in impls:
                s["geomean_vs_zero_insertion"] = _geomean(
                    [r["speedup_vs_zero_insertion"] for r in rows])
                s2 = [r["speedup_vs_zero_insertion"] for r in rows if r["stride"] == 2]
                s["geomean_vs_zero_insertion_stride2"] = _geomean(s2)
            out[key] = s
    return out


def markdown(results, summary, meta) -> str:
    lines = [f"# triton_kstconv vs PyTorch vs zero insertion — {meta['device_name']}",
             "",
             f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"{meta['threads']} threads, vector ISA {meta.get('cpu_isa')}, allocator {meta['malloc_env']}, matmul peak "
             + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in meta.get("peak_gflops", {}).items()),
             "", "Times are medians of interleaved rounds, in ms. ×native and ×zero-ins. are "
             "speedups of ours (higher is better); GF/s counts only useful multiply-adds.", ""]
    impls = [n for n in ("ours", "native", "zero_insertion") if n in results[0]["ms"]]
    head = ("| layer | dtype | mode | " + " | ".join(impls)
            + " | ×native | ×zero-ins. | ours GF/s | % peak |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        cells = [r["key"], r["dtype"], r["mode"]] + [f"{r['ms'][n]:.3f}" for n in impls]
        cells.append(f"{r.get('speedup_vs_native', float('nan')):.2f}")
        cells.append(f"{r.get('speedup_vs_zero_insertion', float('nan')):.2f}")
        cells.append(f"{r['gflops']['ours']:.0f}")
        cells.append(f"{100 * r['frac_peak']['ours']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| dtype/mode | layers | geomean ×native | min ×native (layer) | geomean "
              "×zero-ins. | ×zero-ins. stride 2 |", "|---|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for k, s in summary.items():
        lines.append(f"| {k} | {s['layers']} | {f(s.get('geomean_vs_native'))} | "
                     f"{f(s.get('min_vs_native'))} ({s.get('worst_layer_vs_native')}) | "
                     f"{f(s.get('geomean_vs_zero_insertion'))} | "
                     f"{f(s.get('geomean_vs_zero_insertion_stride2'))} |")
    return "\n".join(lines) + "\n"


def chart(results, path, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = sorted({(r["dtype"], r["mode"]) for r in results})
    fig, axes = plt.subplots(len(groups), 1, figsize=(12, 3.2 * len(groups)), squeeze=False)
    for ax, (dname, mode) in zip(axes[:, 0], groups):
        rows = [r for r in results if r["dtype"] == dname and r["mode"] == mode]
        labels = [r["key"] for r in rows]
        xs = range(len(rows))
        width = 0.4
        ax.bar([i - width / 2 for i in xs], [r.get("speedup_vs_native", 0) for r in rows], width,
               label="ours / native")
        ax.bar([i + width / 2 for i in xs], [r.get("speedup_vs_zero_insertion", 0) for r in rows],
               width, label="ours / zero insertion")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speedup")
        ax.set_title(f"{meta['device_name']} — {dname} {mode}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
