"""The GPU benchmark (``bash perf/gpu_check.sh`` runs it): the real-layer suite on one CUDA
device, every competitor side by side in one process, each row appended to a JSON-lines file
the moment it is measured, so that a run cut off loses nothing.

    python -m perf.gpu_bench --dtypes float32 --out DIR      # measure; rows -> DIR/rows.jsonl
    python -m perf.gpu_bench --report DIR [DIR2 ...]         # DIR/gpu.json, .md, .png

Per layer, dtype and mode (forward; forward+backward), each implementation:

  ours / ours_cl        triton_kstconv, NCHW input / channels-last input
  cudnn / cudnn_cl      F.conv_transpose*d, torch.backends.cudnn.benchmark=True, NCHW /
                        channels-last (input and weight)
  flaggems              flag_gems' conv_transpose2d (Triton; 2D forward, NCHW), where the
                        installed flag_gems has one (PyPI's 5.0.2 has none)
  zero_insertion        the paper's baseline (triton_kstconv.reference)

and per implementation:

  first_ms      the first call: Triton's compile and autotune, cuDNN's algorithm search
  eager_ms      median of triton.testing.do_bench, rounds interleaved across implementations
  graph_ms      the call captured in a CUDA graph and replayed (no launch overhead)
  host_ms       median host time of one call, from its start to its return with the device
                idle before it (Python, dispatch and launches; the kernels left running)
  peak_mb       memory allocated during one call beyond what was allocated before it
                (outputs and gradients included: the same for every implementation)
  err           max |result - reference| / max |reference|, the reference cuDNN's in float64
                on the same values; for ours in forward+backward the worst of dx, dw, db
  ok            err within the dtype's tolerance (TF32's where PyTorch's flags allow TF32)
  configs       ours: where each Triton config came from (tuned table, autotune, heuristic)

Metadata (device, versions, TF32 flags, the peak: a large matmul in the same dtype under the
same flags) goes to DIR/meta-<dtypes>.json. ``--budget-s`` stops starting new layers after
that many seconds (those left are listed there and in the report).
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
import traceback

IMPLS = ("ours", "ours_cl", "cudnn", "cudnn_cl", "flaggems", "zero_insertion")
MODES = ("forward", "forward+backward")
TOL = {"float32": 1e-5, "tf32": 5e-3, "bfloat16": 3e-2, "float16": 5e-3}


# ------------------------------------------------------------------------------ environment
def tf32_flags() -> dict:
    import torch
    from triton_kstconv.triton_engine import cudnn_conv_tf32
    flags = {"cudnn_conv_tf32": cudnn_conv_tf32()}
    try:
        flags["cuda_matmul_fp32_precision"] = torch.backends.cuda.matmul.fp32_precision
    except (AttributeError, RuntimeError):
        flags["cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return flags


def metadata(device: str) -> dict:
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {"device": device, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "cudnn_benchmark": True, "tf32": tf32_flags(),
            "autotune": os.environ.get("KSTCONV_AUTOTUNE", "1")}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        meta.update(device_name=p.name, sms=p.multi_processor_count,
                    memory_gb=round(p.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    else:
        meta.update(device_name=platform.processor() or "cpu", threads=torch.get_num_threads())
    meta["flaggems"] = flaggems_status()[1]
    return meta


def flaggems_status():
    """(conv_transpose2d or None, a sentence saying what was found)."""
    try:
        import flag_gems
    except Exception as exc:   # not installed, or fails to import beside this torch/triton
        return None, f"not available ({type(exc).__name__}: {exc})"
    fn = getattr(getattr(flag_gems, "ops", None), "conv_transpose2d", None)
    version = getattr(flag_gems, "__version__", "?")
    if fn is None:
        return None, f"flag_gems {version} has no conv_transpose2d"
    return fn, f"flag_gems {version}"


# ------------------------------------------------------------------------------ measurement
def sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, device) -> float:
    if device == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))
    from perf.runner import time_ms
    return time_ms(fn, device)


def host_ms(fn, device, calls: int = 25) -> float:
    """Median host time of one call of ``fn``: the device is synchronised before each call and
    not after, so what is timed is the host's work (None off CUDA, where it is the whole call)."""
    if device != "cuda":
        return None
    ts = []
    for _ in range(calls):
        sync(device)
        start = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - start)
    sync(device)
    return statistics.median(ts) * 1e3


def graph_ms(fn, device):
    """Median time of one replay of ``fn`` captured in a CUDA graph (None off CUDA)."""
    if device != "cuda":
        return None
    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return bench_ms(graph.replay, device)


def peak_mb(fn, device):
    if device != "cuda":
        return None
    import torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    keep = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    del keep
    return extra / 2 ** 20


def rel_err(got, ref) -> float:
    scale = ref.abs().max().item() if ref.numel() else 1.0
    return (got.double() - ref).abs().max().item() / max(scale, 1e-30) if ref.numel() else 0.0


# ------------------------------------------------------------------------------ the layers
def make_impls(layer, device, dtype, flaggems):
    """{impl: (x, w, b, fn)}: fn(x, w, b) -> output; each with its own copies of the inputs."""
    import torch
    import torch.nn.functional as F
    import triton_kstconv as K
    nd = layer.nd
    kw = layer.conv_kwargs()
    native = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
    ours = {1: K.conv_transpose1d, 2: K.conv_transpose2d, 3: K.conv_transpose3d}[nd]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(layer.batch, layer.c_in, *layer.size, generator=g).to(device, dtype)
    w = (torch.randn(*layer.weight_shape(), generator=g)
         / math.sqrt(layer.c_in // layer.groups * layer.kernel ** nd)).to(device, dtype)
    b = torch.randn(layer.c_out, generator=g).to(device, dtype) if layer.bias else None
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(nd)
    cl = (lambda t: t.contiguous(memory_format=fmt)) if fmt else None
    impls = {
        "ours": (x, w, b, lambda x, w, b: ours(x, w, b, **kw)),
        "cudnn": (x, w, b, lambda x, w, b: native(x, w, b, **kw)),
        "zero_insertion": (x, w, b, lambda x, w, b: K.conv_transpose_zero_insertion(x, w, b,
                                                                                    **kw)),
    }
    if cl is not None:
        impls["ours_cl"] = (cl(x), w, b, impls["ours"][3])
        impls["cudnn_cl"] = (cl(x), cl(w), b, impls["cudnn"][3])
    if flaggems is not None and nd == 2:
        impls["flaggems"] = (x, w, b, lambda x, w, b: flaggems(x, w, b, **kw))
    return impls


def make_call(fn, x, w, b, mode):
    """The timed callable of one implementation: forward (no grad), or forward+backward."""
    import torch
    if mode == "forward":
        def call():
            with torch.no_grad():
                return fn(x, w, b)
        return call, None
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    with torch.no_grad():
        gy = torch.randn_like(fn(x, w, b))

    def call():
        for t in leaves:
            t.grad = None
        fn(*leaves, *([None] * (3 - len(leaves)))).backward(gy)
        return [t.grad for t in leaves]
    return call, (leaves, gy)


def check(layer, fn, x, w, b, mode, device, leaves_gy):
    """err of one implementation against cuDNN's float64 result on the same values."""
    import torch
    import torch.nn.functional as F
    native = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[layer.nd]
    kw = layer.conv_kwargs()
    ref_in = [t.detach().double().requires_grad_(mode != "forward") for t in (x, w, b)
              if t is not None]
    ref = native(*ref_in, *([None] * (3 - len(ref_in))), **kw)
    if mode == "forward":
        with torch.no_grad():
            return rel_err(fn(x, w, b), ref.detach())
    leaves, gy = leaves_gy
    ref.backward(gy.double())
    for t in leaves:
        t.grad = None
    fn(*leaves, *([None] * (3 - len(leaves)))).backward(gy)
    return max(rel_err(t.grad, r.grad) for t, r in zip(leaves, ref_in))


def tolerance(dtype_name: str, tf32: bool) -> float:
    return TOL["tf32"] if dtype_name == "float32" and tf32 else TOL[dtype_name]


def measure_layer(layer, device, dtype_name, mode, impl_names, flaggems, rounds, write):
    """Every implementation of one (layer, dtype, mode): one row each, written at once."""
    import torch
    from triton_kstconv import triton_engine
    dtype = getattr(torch, dtype_name)
    impls = {n: v for n, v in make_impls(layer, device, dtype, flaggems).items()
             if n in impl_names and not (mode != "forward" and n == "flaggems")}
    flops = layer.useful_flops() * (3 if mode != "forward" else 1)
    tf32 = tf32_flags()["cudnn_conv_tf32"]
    rows, calls = {}, {}
    for name, (x, w, b, fn) in impls.items():
        row = rows[name] = {"layer": layer.key, "model": layer.model, "nd": layer.nd,
                            "dtype": dtype_name, "mode": mode, "impl": name,
                            "useful_gflop": flops / 1e9}
        try:
            torch.backends.cudnn.benchmark = True
            call, leaves_gy = make_call(fn, x, w, b, mode)
            triton_engine.config_log.clear()
            start = time.perf_counter()
            call()
            sync(device)
            row["first_ms"] = (time.perf_counter() - start) * 1e3
            if name.startswith("ours"):
                row["configs"] = {k: list(v) for k, v in triton_engine.config_log.items()}
            row["err"] = check(layer, fn, x, w, b, mode, device, leaves_gy)
            row["tol"] = tolerance(dtype_name, tf32)
            row["ok"] = row["err"] <= row["tol"]
            row["peak_mb"] = peak_mb(call, device)
            calls[name] = call
        except Exception as exc:   # one implementation failing must not lose the others
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc(limit=4)
    samples = {n: [] for n in calls}
    names = list(calls)
    for r in range(rounds):   # interleaved, the order rotated each round
        order = names[r % max(1, len(names)):] + names[:r % max(1, len(names))]
        for n in (order if r % 2 == 0 else order[::-1]):
            try:
                samples[n].append(bench_ms(calls[n], device))
            except Exception as exc:
                rows[n]["error"] = f"{type(exc).__name__}: {exc}"
    for n, call in calls.items():
        row = rows[n]
        if samples[n]:
            row["eager_ms"] = statistics.median(samples[n])
            row["tflops"] = flops / (row["eager_ms"] * 1e-3) / 1e12
        row["host_ms"] = host_ms(call, device)
        try:
            row["graph_ms"] = graph_ms(call, device)
        except Exception as exc:
            row["graph_error"] = f"{type(exc).__name__}: {exc}"
    for row in rows.values():
        write(row)
    return list(rows.values())


def measure_peak(device, dtype_name) -> float:
    """TFLOP/s of a large matmul in the dtype, float32 in TF32 exactly where the convolutions
    may use it (cuDNN's flag), so that the roof and the layers run under the same precision."""
    import torch
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype_name))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype_name))
    matmul = torch.backends.cuda.matmul
    use_new = hasattr(matmul, "fp32_precision")
    saved = matmul.fp32_precision if use_new else matmul.allow_tf32
    tf32 = tf32_flags()["cudnn_conv_tf32"]
    try:
        if use_new:
            matmul.fp32_precision = "tf32" if tf32 else "ieee"
        else:
            matmul.allow_tf32 = tf32
        ms = min(bench_ms(lambda: a @ b, device) for _ in range(3))
    finally:
        if use_new:
            matmul.fp32_precision = saved
        else:
            matmul.allow_tf32 = saved
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


# ------------------------------------------------------------------------------ the run
def run(args):
    import torch
    from perf import layers as L
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.out, exist_ok=True)
    fn, _ = flaggems_status()
    meta = metadata(device)
    meta_path = os.path.join(args.out, f"meta-{'-'.join(args.dtypes)}.json")
    print(f"# {meta.get('device_name')} torch {meta['torch']} triton {meta['triton']} "
          f"tf32 {meta['tf32']} flaggems: {meta['flaggems']}", flush=True)
    meta["peak_tflops"] = {d: measure_peak(device, d) for d in args.dtypes}
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    rows_path = os.path.join(args.out, "rows.jsonl")
    suite = L.select(args.layers, quick=not args.full, suite=args.suite)

    def write(row):
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        t = row.get("eager_ms")
        print(f"  {row['layer']:34s} {row['dtype']:8s} {row['mode']:16s} {row['impl']:14s} "
              + (f"{t:9.4f} ms" if t is not None else row.get("error", "-")), flush=True)

    start = time.perf_counter()
    plan = [(layer, dname, mode) for layer in suite for dname in args.dtypes
            for mode in args.modes]
    left = []
    try:
        for i, (layer, dname, mode) in enumerate(plan):
            if time.perf_counter() - start > args.budget_s:
                left = plan[i:]
                break
            measure_layer(layer, device, dname, mode, args.impls, fn, args.rounds, write)
    except KeyboardInterrupt:     # gpu_check.sh's hard limit: the layer under way is left too
        left = plan[i:]
        print("# interrupted", flush=True)
    meta["left_unmeasured"] = [[layer.key, dname, mode] for layer, dname, mode in left]
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    if left:
        print(f"# budget of {args.budget_s} s spent: {len(left)} measurements left", flush=True)


# ------------------------------------------------------------------------------ the report
def load_rows(out_dir):
    """The rows of a run; a line cut off by a killed run is skipped."""
    rows = []
    with open(os.path.join(out_dir, "rows.jsonl")) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize(rows) -> dict:
    """Per (dtype, mode): geomean speedups of ours (the better of its two layouts, and NCHW
    alone) over the best cuDNN layout, eager and graphed; worst layer."""
    out = {}
    by = {}
    for r in rows:
        by.setdefault((r["dtype"], r["mode"]), {}).setdefault(r["layer"], {})[r["impl"]] = r
    for (dname, mode), layers in sorted(by.items()):
        s = {}
        for timing in ("eager_ms", "graph_ms"):
            best_ours, nchw, worst = [], [], None
            for key, impls in layers.items():
                cudnn = [impls[n][timing] for n in ("cudnn", "cudnn_cl")
                         if impls.get(n, {}).get(timing)]
                ours = [impls[n][timing] for n in ("ours", "ours_cl")
                        if impls.get(n, {}).get(timing)]
                if not cudnn or not ours:
                    continue
                sp = min(cudnn) / min(ours)
                best_ours.append(sp)
                if impls.get("ours", {}).get(timing):
                    nchw.append(min(cudnn) / impls["ours"][timing])
                if worst is None or sp < worst[1]:
                    worst = (key, sp)
            s[timing] = {"layers": len(best_ours), "geomean_vs_cudnn": _geomean(best_ours),
                         "geomean_nchw_vs_cudnn": _geomean(nchw),
                         "worst": list(worst) if worst else None}
        s["failed_checks"] = sorted({f"{r['layer']} {r['impl']}" for r in rows
                                     if r["dtype"] == dname and r["mode"] == mode
                                     and (r.get("ok") is False or "error" in r)})
        out[f"{dname}/{mode}"] = s
    return out


def markdown(rows, summary, meta) -> str:
    lines = [f"# GPU benchmark: {meta.get('device_name')}", "",
             f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}, CUDA "
             f"{meta.get('cuda')}, cuDNN {meta.get('cudnn')}; TF32 flags {meta['tf32']}; "
             f"KSTCONV_AUTOTUNE={meta['autotune']}; FlagGems: {meta['flaggems']}.", "",
             "Times in ms (eager: do_bench median; graph: CUDA-graph replay; host: one "
             "call's host time, the device idle before it). ×cuDNN: the best "
             "cuDNN layout over the best of ours. err: max relative error against cuDNN in "
             "float64.", "",
             "Matmul peak (TFLOP/s, same dtype and flags): "
             + ", ".join(f"{k} {v:.0f}" for k, v in meta.get("peak_tflops", {}).items()) + ".",
             ""]
    if meta.get("left_unmeasured"):
        lines += [f"Not measured (time budget): {len(meta['left_unmeasured'])} "
                  f"(layer, dtype, mode): {meta['left_unmeasured']}", ""]
    head = "| layer | dtype | mode | impl | first ms | eager ms | graph ms | host ms | TFLOP/s " \
           "| peak MB | err | ok |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    f = lambda v, p=3: "-" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))  # noqa: E731
    for r in rows:
        lines.append(f"| {r['layer']} | {r['dtype']} | {r['mode']} | {r['impl']} | "
                     f"{f(r.get('first_ms'), 1)} | {f(r.get('eager_ms'), 4)} | "
                     f"{f(r.get('graph_ms'), 4)} | {f(r.get('host_ms'), 4)} | "
                     f"{f(r.get('tflops'), 1)} | "
                     f"{f(r.get('peak_mb'), 1)} | "
                     f"{'%.1e' % r['err'] if 'err' in r else r.get('error', '-')[:60]} | "
                     f"{f(r.get('ok'))} |")
    lines += ["", "| dtype/mode | timing | layers | geomean ×cuDNN | NCHW only | worst |",
              "|---|---|---|---|---|---|"]
    for k, s in summary.items():
        for timing in ("eager_ms", "graph_ms"):
            t = s[timing]
            lines.append(f"| {k} | {timing[:-3]} | {t['layers']} | {f(t['geomean_vs_cudnn'], 2)}"
                         f" | {f(t['geomean_nchw_vs_cudnn'], 2)} | {t['worst']} |")
        if s["failed_checks"]:
            lines.append(f"| {k} | failed checks | {', '.join(s['failed_checks'])} | | | |")
    return "\n".join(lines) + "\n"


def chart(rows, path, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = sorted({(r["dtype"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(len(groups), 1, figsize=(13, 3.4 * len(groups)), squeeze=False)
    for ax, (dname, mode) in zip(axes[:, 0], groups):
        layers = []
        for r in rows:
            if r["dtype"] == dname and r["mode"] == mode and r["layer"] not in layers:
                layers.append(r["layer"])
        get = {(r["layer"], r["impl"]): r.get("eager_ms") for r in rows
               if r["dtype"] == dname and r["mode"] == mode}
        impls = [i for i in IMPLS if i not in ("cudnn",) and any((k, i) in get for k in layers)]
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            vals = [get[(k, "cudnn")] / get[(k, impl)] if get.get((k, "cudnn")) and
                    get.get((k, impl)) else 0 for k in layers]
            ax.bar([i + (j - len(impls) / 2) * width for i in range(len(layers))], vals, width,
                   label=f"{impl} vs cudnn (NCHW)")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speedup (eager)")
        ax.set_title(f"{meta.get('device_name')} — {dname} {mode}", fontsize=9)
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out_dirs, out_dir=None):
    """gpu.json / gpu.md / gpu.png in ``out_dir`` (default: the first) from the rows of every
    folder in ``out_dirs`` (the GPU check's parts)."""
    out_dirs = [out_dirs] if isinstance(out_dirs, str) else list(out_dirs)
    out_dir = out_dir or out_dirs[0]
    rows = [r for d in out_dirs for r in load_rows(d)]
    metas = []
    for d in out_dirs:
        for p in sorted(os.listdir(d)):
            if p.startswith("meta-"):
                with open(os.path.join(d, p)) as f:
                    metas.append(json.load(f))
    meta = dict(metas[0])
    meta["peak_tflops"] = {k: v for m in metas for k, v in m.get("peak_tflops", {}).items()}
    meta["left_unmeasured"] = [x for m in metas for x in m.get("left_unmeasured", [])]
    summary = summarize(rows)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu.json"), "w") as f:
        json.dump({"meta": meta, "summary": summary, "rows": rows}, f, indent=1)
    md = markdown(rows, summary, meta)
    with open(os.path.join(out_dir, "gpu.md"), "w") as f:
        f.write(md)
    try:
        chart(rows, os.path.join(out_dir, "gpu.png"), meta)
    except ImportError:
        print("# matplotlib not installed: no chart")
    print(md)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=False, default=None, help="results folder")
    ap.add_argument("--report", nargs="*", default=None, metavar="DIR",
                    help="only write the report, from the rows of these folders (into --out, "
                         "default the first)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--dtypes", nargs="*", default=["float32"])
    ap.add_argument("--modes", nargs="*", default=list(MODES))
    ap.add_argument("--impls", nargs="*", default=list(IMPLS))
    ap.add_argument("--full", action="store_true", help="every layer (default: quick subset)")
    ap.add_argument("--suite", choices=["real", "grouped"], default="real",
                    help="the real-layer suite, or the depthwise / grouped one")
    ap.add_argument("--layers", nargs="*", help="substrings of layer keys")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=float("inf"))
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        return report(args.report, args.out)
    if not args.out:
        sys.exit("--out DIR is required to measure")
    return run(args)


if __name__ == "__main__":
    main()
