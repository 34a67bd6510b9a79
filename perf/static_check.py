"""Static check of the Triton kernels for the H100 (sm_90) and the A100 (sm_80), no GPU needed.

Every launch the library would make for a layer is captured from its own host code
(``triton_engine.capture_launches``, on meta tensors, as on an H100 with 132 SMs), specialised
as Triton's JIT specialises it (the JIT's own binder: ints equal to 1 become constants, ints and
pointers divisible by 16 are marked so), compiled with ``triton.compile`` for the target, and
read back:

  regs, spills     ptxas's own report (``ptxas -v`` on the PTX, as Triton compiles it)
  smem             the kernel's shared memory (Triton's metadata)
  mma              wgmma (Hopper), mma.sync (Ampere), or fma, per tl.dot, from the TTGIR
  A / B            how each dot operand reaches shared memory: "cp.async N B" (pipelined),
                   "TMA", or "sync" (a plain load the pipeliner left alone)
  store            the widest global store (vectorised epilogue: 16 B)
  loop             SASS instructions per step of the loop that holds the MMA (nvdisasm), and
                   the integer divisions among them (one MUFU.RCP a runtime divisor, each some
                   twenty instructions): device work a step, beside the MMAs it feeds

    python -m perf.static_check                   # quick suite, heuristic + tuned configs
    python -m perf.static_check --space           # + every config of the autotune space
    python -m perf.static_check --full --space    # every suite layer (long)
    python -m perf.static_check --ci              # the subset the tests run (< 3 minutes)

Variants are deduplicated by what the compiler sees. Writes ``perf/results/static-<triton>-
<date>.{json,md}`` (``--out``). Exit status 1 if a variant the library can launch fails to
compile, spills, overflows shared memory, misses wgmma on sm_90 for a tensor-core dtype,
(channels-last input, sm_90) loads a dot operand without cp.async of >= 8 B or TMA, or divides
by a runtime size inside its MMA loop.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import datetime
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

SMEM_LIMIT = {90: 232448, 80: 166912}       # bytes per block (opt-in maximum)
DTYPES = {"bf16": ("bfloat16", None), "fp16": ("float16", None),
          "tf32": ("float32", "tf32"), "ieee": ("float32", "ieee")}
TENSOR_CORE = ("bf16", "fp16", "tf32")
H100 = dict(name="NVIDIA H100 80GB HBM3", sms=132)


# ------------------------------------------------------------------------------ capture
@contextlib.contextmanager
def _as_h100(precision, autotune: bool):
    """The library's host code as it runs on an H100: its device name and SM count, float32
    precision as PyTorch's flags say, autotuning on or off."""
    import torch
    from triton_kstconv import config
    from triton_kstconv import triton_config as cfgs
    from triton_kstconv import triton_engine as te
    saved = (cfgs.device_name, cfgs.sm_count)
    conv = torch.backends.cudnn.conv
    saved_prec = conv.fp32_precision
    cfgs.device_name = lambda device: H100["name"]
    cfgs.sm_count = lambda device: H100["sms"]
    if precision:
        conv.fp32_precision = precision
    try:
        with config.override(autotune=autotune):
            yield te
    finally:
        cfgs.device_name, cfgs.sm_count = saved
        conv.fp32_precision = saved_prec


def capture(layer, dtype_key, channels_last, passes=("fwd", "dgrad", "wgrad"), space=False):
    """[(label, kernel, args, kwargs)] for one layer: every launch of its forward (training
    form: the weight packed for grad_input too), grad_input and grad_weight; an autotuned launch
    becomes one entry per config of its pruned space (``space``) or its heuristic config."""
    import torch
    from triton_kstconv.epilogue import Activation
    from triton_kstconv.ops import geometry_of
    dname, precision = DTYPES[dtype_key]
    dtype = getattr(torch, dname)
    nd = layer.nd
    geom = geometry_of(layer.size, (layer.kernel,) * nd, (layer.stride,) * nd,
                       (layer.padding,) * nd, (layer.output_padding,) * nd, 1, (1,) * nd)
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(nd)
    if channels_last and fmt is None:
        return []

    def make(*shape):
        t = torch.empty(shape, device="meta", dtype=dtype)
        return t.contiguous(memory_format=fmt) if channels_last and len(shape) == nd + 2 else t

    x = make(layer.batch, layer.c_in, *layer.size).requires_grad_()
    w = torch.empty(layer.c_in, layer.c_out, *(layer.kernel,) * nd, device="meta", dtype=dtype)
    b = torch.empty(layer.c_out, device="meta", dtype=dtype)
    gy = make(layer.batch, layer.c_out, *geom.out_size)
    out = []
    with _as_h100(precision, autotune=space) as te, te.capture_launches() as rec:
        calls = {"fwd": lambda: te.forward(x, w, b, geom, Activation(), False, {}),
                 "dgrad": lambda: te.grad_input(gy, w, geom, {}),
                 "wgrad": lambda: te.grad_weight(x, gy, tuple(w.shape), geom, dtype)}
        for kind in passes:
            start = len(rec)
            calls[kind]()
            for kernel, grid, args, kwargs in rec[start:]:
                out += _expand(kind, kernel, args, kwargs, space)
    base = dict(layer=layer.key, dtype=dtype_key, layout="cl" if channels_last else "nchw")
    return [(dict(base, **label), k, a, kw) for label, k, a, kw in out]


def _expand(kind, kernel, args, kwargs, space):
    """One (label, JITFunction, args, kwargs) per config the launch may run with."""
    from triton_kstconv import triton_config as cfgs
    autotuner = hasattr(kernel, "configs")
    fn = kernel.fn if autotuner else kernel           # the JITFunction
    name = fn.__name__
    tuned_kind = {"conv_phase_kernel": kind, "wgrad_phase_kernel": "wgrad"}.get(name)
    if not autotuner:   # a plain launch: its config is in kwargs
        cfg = {k: v for k, v in kwargs.items() if k.isupper() and k.startswith("BLOCK")
               or k in ("GROUP_M", "num_warps", "num_stages")}
        return [(dict(kernel=name, pass_=kind, config=_cfg_name(cfg)), fn, args, kwargs)]
    named = dict(zip(fn.arg_names, args))
    if space:
        configs = cfgs.prune(tuned_kind)(kernel.configs, named)
    else:
        m = named.get("M_MAX", 0)
        h = cfgs.heuristic_config(tuned_kind, m, named["C_SRC"],
                                  named.get("C_dst_g", named.get("C_out_g")), _dtype_of(named),
                                  named["key_layout"])
        configs = [_as_config(h)]
    out = []
    for c in configs:
        kw = dict(kwargs, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        if tuned_kind == "wgrad":
            kw.pop("GROUP_M", None)
        cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        out.append((dict(kernel=name, pass_=kind, config=_cfg_name(cfg)), fn, args, kw))
    return out


def _dtype_of(named):
    return named["X"].dtype


def _as_config(d):
    import triton
    d = dict(d)
    warps, stages = d.pop("num_warps"), d.pop("num_stages")
    return triton.Config(d, num_warps=warps, num_stages=stages)


def _cfg_name(cfg) -> str:
    order = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "BLOCK", "num_warps", "num_stages")
    short = {"BLOCK_M": "", "BLOCK_N": "x", "BLOCK_K": "x", "GROUP_M": " g", "BLOCK": "b",
             "num_warps": " w", "num_stages": " s"}
    return "".join(f"{short[k]}{cfg[k]}" for k in order if k in cfg).strip()


# ------------------------------------------------------------------------------ compile
def _triton_bin(tool: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def specialise(fn, args, kwargs, cap):
    """(signature, constexprs, attrs, options) exactly as Triton's JIT would make them for
    these arguments on a device of compute capability ``cap``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", cap, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return target, signature, constexprs, attrs, options


def compile_key(fn, args, kwargs, cap) -> str:
    _, signature, constexprs, attrs, options = specialise(fn, args, kwargs, cap)
    return repr((fn.__name__, cap, sorted(signature.items()), sorted(constexprs.items()),
                 sorted((k, str(v)) for k, v in attrs.items()), sorted(options.__dict__.items())))


def compile_and_read(fn, args, kwargs, cap) -> dict:
    import triton
    from triton.compiler import ASTSource
    target, signature, constexprs, attrs, options = specialise(fn, args, kwargs, cap)
    start = time.perf_counter()
    ck = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                        options=options.__dict__)
    res = dict(compile_s=round(time.perf_counter() - start, 2), smem=ck.metadata.shared)
    res.update(_ptxas_report(ck.asm["ptx"], cap))
    res.update(read_ttgir(ck.asm["ttgir"]))
    res.update(read_ptx(ck.asm["ptx"]))
    res.update(read_sass(ck.asm["cubin"]))
    return res


def read_sass(cubin: bytes) -> dict:
    """The loop that holds the first MMA, from the disassembly: its instructions a step and
    the integer divisions among them (MUFU.RCP); empty where there is no such loop."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        try:
            text = subprocess.run([_triton_bin("nvdisasm"), "-c", path], capture_output=True,
                                  text=True).stdout
        except OSError:      # a Triton without its nvdisasm: the loop goes unread
            return {}
    lines = text.splitlines()
    mma = next((i for i, line in enumerate(lines) if re.search(r"\bH[G]?MMA\b", line)), None)
    if mma is None:
        return {}
    labels = {m.group(1): i for i, line in enumerate(lines)
              if (m := re.match(r"^\s*(\.L_x_\d+):", line))}
    for j in range(mma, len(lines)):        # the first branch back over the MMA closes it
        m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", lines[j])
        if m and labels.get(m.group(1), len(lines)) < mma:
            body = [line for line in lines[labels[m.group(1)]:j + 1]
                    if re.search(r"/\*[0-9a-f]{4}\*/", line)]
            return dict(loop_sass=len(body),
                        loop_divides=sum("MUFU.RCP" in line for line in body))
    return {}


def _ptxas(cap: int) -> str:
    """The ptxas Triton itself uses for this target."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(cap).path
    except (ImportError, AttributeError):
        return _triton_bin("ptxas")


def _ptxas_report(ptx: str, cap: int) -> dict:
    arch = "sm_90a" if cap == 90 else f"sm_{cap}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([_ptxas(cap), "-v", f"--gpu-name={arch}", src, "-o",
                              os.path.join(d, "k.cubin")], capture_output=True, text=True)
    text = log.stderr + log.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return dict(regs=int(regs.group(1)) if regs else None, spills=max(spill, default=0))


_DEF = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")
_REF = re.compile(r"%[\w.$-]+")


def read_ttgir(ttgir: str) -> dict:
    """Per tl.dot: its instruction (wgmma / mma.sync / fma) and how each operand reaches it."""
    defs, alias, copies = {}, {}, {}
    for line in ttgir.splitlines():
        m = _DEF.match(line)
        if not m:
            continue
        name, op, rest = m.groups()
        defs[name] = (op, rest)
        if op == "scf.for":   # loop-carried values: iter_arg -> its initial value
            for a, b in re.findall(r"(%[\w.$-]+) = (%[\w.$-]+)", rest.split("iter_args(", 1)[-1]):
                alias[a] = b
        if op in ("ttg.async_copy_global_to_local", "ttng.async_tma_copy_global_to_local"):
            refs = _REF.findall(rest)
            dst = refs[1] if op.startswith("ttg.") else refs[-1]
            width = re.search(r"contiguity = (\d+)", rest)
            copies.setdefault(_root(dst, defs, alias), set()).add(
                "TMA" if "tma" in op else int(width.group(1)) if width else 1)
    dots = []
    for name, (op, rest) in defs.items():
        if op not in ("ttng.warp_group_dot", "tt.dot"):
            continue
        a, b = _REF.findall(rest)[:2]
        kind = "wgmma" if op == "ttng.warp_group_dot" else (
            "mma.sync" if "#mma" in rest.split("->")[-1] else "fma")
        elem = _elem_bytes(rest)
        dots.append(dict(mma=kind, a=_operand(a, defs, alias, copies, elem),
                         b=_operand(b, defs, alias, copies, elem)))
    return dict(dots=dots)


def _elem_bytes(text: str) -> int:
    m = re.search(r"x(bf16|f16|f32|f64|tf32|i8|f8E\w+)[,>]", text)
    return {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i8": 1}.get(m.group(1), 1) if m else 2


def _root(name, defs, alias, depth=0):
    """The allocation (or load) a value comes from, through views and loop-carried aliases."""
    name = name.split("#")[0]
    while name in alias:
        name = alias[name]
    if depth > 30 or name not in defs:
        return name
    op, rest = defs[name]
    if op in ("ttg.memdesc_index", "ttg.memdesc_subview", "ttg.memdesc_subslice",
              "ttg.memdesc_trans", "ttg.memdesc_reinterpret", "ttg.memdesc_reshape",
              "ttg.local_load", "ttg.convert_layout", "tt.trans", "arith.truncf", "tt.fp_to_fp"):
        return _root(_REF.findall(rest)[0], defs, alias, depth + 1)
    return name


def _operand(name, defs, alias, copies, elem) -> str:
    root = _root(name, defs, alias)
    if root in copies:
        widths = copies[root]
        if "TMA" in widths:
            return "TMA"
        return f"cp.async {min(widths) * elem} B"
    op, rest = defs.get(root, ("?", ""))
    if op == "ttg.local_alloc" and _REF.findall(rest):
        src = _root(_REF.findall(rest)[0], defs, alias)
        return "TMA" if defs.get(src, ("",))[0].startswith("tt.descriptor") else "sync"
    return "sync" if op == "tt.load" else op


def read_ptx(ptx: str) -> dict:
    """The widest global store, in bytes (16: a vectorised epilogue)."""
    widths = []
    for token in re.findall(r"st\.global[\w.]*", ptx):
        vec = re.search(r"\.v(\d)", token)
        bits = re.search(r"\.[bfsu](\d+)$", token)
        if bits:
            widths.append((int(vec.group(1)) if vec else 1) * int(bits.group(1)) // 8)
    return dict(store_bytes=max(widths, default=0))


# ------------------------------------------------------------------------------ verdicts
def verdict(label, res) -> list[str]:
    """What is wrong with one compiled variant (empty: nothing)."""
    bad = []
    if "error" in res:
        return [f"compile failed: {res['error'][:200]}"]
    if res["spills"]:
        bad.append(f"spills {res['spills']} B")
    if res["smem"] > SMEM_LIMIT[label["cap"]]:
        bad.append(f"shared memory {res['smem']} B")
    if res.get("loop_divides"):
        bad.append(f"{res['loop_divides']} integer divisions in the MMA loop")
    if label["cap"] == 90 and label["dtype"] in TENSOR_CORE:
        if any(d["mma"] != "wgmma" for d in res["dots"]):
            bad.append("no wgmma: " + ", ".join(d["mma"] for d in res["dots"]))
        if label["layout"] == "cl":
            for d in res["dots"]:
                for op in ("a", "b"):
                    if not _pipelined(d[op]):
                        bad.append(f"operand {op.upper()} not pipelined ({d[op]})")
    return bad


def _pipelined(text: str) -> bool:
    if text == "TMA":
        return True
    m = re.match(r"cp\.async (\d+) B", text)
    return bool(m) and int(m.group(1)) >= 8


# ------------------------------------------------------------------------------ driver
_JOBS: list = []


def _run_job(i):
    label, fn, args, kwargs = _JOBS[i]
    try:
        return i, compile_and_read(fn, args, kwargs, label["cap"])
    except Exception as exc:   # a failed compile is a finding, not a crash
        return i, {"error": f"{type(exc).__name__}: {exc}"}


def collect(layers, dtypes, layouts, caps, passes, space):
    """Unique variants: [(label, fn, args, kwargs)] (label has cap and a compile key)."""
    seen, jobs = {}, []
    for layer in layers:
        for dt in dtypes:
            for layout in layouts:
                for label, fn, args, kwargs in capture(layer, dt, layout == "cl", passes, space):
                    for cap in caps:
                        if cap == 80 and label["kernel"] != "conv_phase_kernel" and \
                                label["kernel"] != "wgrad_phase_kernel":
                            continue
                        key = compile_key(fn, args, kwargs, cap)
                        lab = dict(label, cap=cap)
                        if key in seen:
                            seen[key]["layers"].add(layer.key)
                            continue
                        lab["layers"] = {layer.key}
                        seen[key] = lab
                        jobs.append((lab, fn, args, kwargs))
    return jobs


def run(jobs, workers: int, progress=True):
    global _JOBS
    _JOBS = jobs
    results = [None] * len(jobs)
    ctx = multiprocessing.get_context("fork")
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for n, (i, res) in enumerate(pool.map(_run_job, range(len(jobs)))):
            results[i] = res
            if progress:
                label = jobs[i][0]
                print(f"  [{n + 1}/{len(jobs)}] {label['kernel']:20s} {label['pass_']:5s} "
                      f"{label['dtype']:4s} {label['layout']:4s} sm_{label['cap']} "
                      f"{label['config']:22s} " + (res.get("error", "")[:60] or
                                                   f"regs {res['regs']} spills {res['spills']}"),
                      flush=True)
    return results


def summarize(jobs, results) -> dict:
    rows = []
    for (label, *_), res in zip(jobs, results):
        row = dict(label, layers=sorted(label["layers"]), **res)
        row["problems"] = verdict(label, res)
        rows.append(row)
    tc = [r for r in rows if r["dtype"] in TENSOR_CORE and r.get("dots") and r["cap"] == 90]
    cl = [r for r in tc if r["layout"] == "cl"]
    summary = {
        "variants": len(rows),
        "failed_compiles": sum("error" in r for r in rows),
        "spilling": sum(bool(r.get("spills")) for r in rows),
        "tensor_core_variants_sm90": len(tc),
        "without_wgmma_sm90": sum(any(d["mma"] != "wgmma" for d in r["dots"]) for r in tc),
        "channels_last_sm90": len(cl),
        "channels_last_not_pipelined": sum(
            any(not _pipelined(d[o]) for d in r["dots"] for o in "ab") for r in cl),
        "dividing_in_mma_loop": sum(bool(r.get("loop_divides")) for r in rows),
        "with_problems": sum(bool(r["problems"]) for r in rows),
    }
    return dict(summary=summary, rows=rows)


def _loop_text(r) -> str:
    return f"{r['loop_sass']} ({r['loop_divides']})" if "loop_sass" in r else "-"


def markdown(report, meta) -> str:
    s = report["summary"]
    lines = [f"# Static check of the Triton kernels: triton {meta['triton']}", "",
             f"{meta['date']}; targets sm_90 (H100, 132 SMs as the host code sees it) and sm_80; "
             f"configs: {meta['configs']}; layers: {meta['layers']}.", "",
             "| variants | failed compiles | spilling | tensor-core sm_90 | without wgmma | "
             "channels-last sm_90 | an operand not pipelined | dividing in the MMA loop | "
             "with problems |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| {s['variants']} | {s['failed_compiles']} | {s['spilling']} | "
             f"{s['tensor_core_variants_sm90']} | {s['without_wgmma_sm90']} | "
             f"{s['channels_last_sm90']} | {s['channels_last_not_pipelined']} | "
             f"{s.get('dividing_in_mma_loop', '-')} | {s['with_problems']} |", "",
             "| kernel | pass | dtype | layout | sm | config | regs | spills | smem KiB | mma | A | "
             "B | store B | loop SASS (div) | problems | layers |", "|" + "---|" * 16]
    for r in report["rows"]:
        dots = r.get("dots") or []
        lines.append(
            f"| {r['kernel']} | {r['pass_']} | {r['dtype']} | {r['layout']} | {r['cap']} | "
            f"{r['config']} | {r.get('regs', '-')} | {r.get('spills', '-')} | "
            f"{r.get('smem', 0) / 1024:.0f} | {'/'.join(d['mma'] for d in dots) or '-'} | "
            f"{'/'.join(d['a'] for d in dots) or '-'} | {'/'.join(d['b'] for d in dots) or '-'} | "
            f"{r.get('store_bytes', '-')} | {_loop_text(r)} | "
            f"{'; '.join(r['problems']) or 'ok'} | "
            f"{len(r['layers'])}: {r['layers'][0]}{' ...' if len(r['layers']) > 1 else ''} |")
    return "\n".join(lines) + "\n"


def selftest() -> int:
    """The check must see what it claims to: a tile below wgmma's 64 rows (mma.sync), one too
    big for the registers (spills), and a division inside an MMA loop (none in ours)."""
    from perf import layers as L
    layer = next(x for x in L.SUITE if x.key == "dcgan/256-128@8 k4s2p1")
    label, fn, args, kwargs = next(j for j in capture(layer, "bf16", True, passes=("fwd",))
                                   if j[0]["kernel"] == "conv_phase_kernel")
    label = dict(label, cap=90)
    small = compile_and_read(fn, args, dict(kwargs, BLOCK_M=32, BLOCK_N=32, num_warps=4), 90)
    big = compile_and_read(fn, args, dict(kwargs, BLOCK_M=256, BLOCK_N=256, num_warps=4), 90)
    base = compile_and_read(fn, args, kwargs, 90)
    divides = _division_probe()
    ok = ({d["mma"] for d in small["dots"]} == {"mma.sync"} and
          any("no wgmma" in p for p in verdict(label, small)) and big["spills"] > 0 and
          any("spills" in p for p in verdict(label, big)) and
          base.get("loop_sass", 0) > 0 and base.get("loop_divides") == 0 and
          divides.get("loop_divides", 0) >= 1 and
          any("integer divisions" in p for p in verdict(label, divides)))
    print("selftest ok" if ok else f"selftest FAILED: {small} {big} {base} {divides}",
          flush=True)
    return 0 if ok else 1


def _division_probe() -> dict:
    """A dot in a loop that divides by a runtime size every step, compiled for sm_90 and read:
    the loop metric must count the division."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def probe(A, B, C, n, d, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for k in range(0, n):
            row = (k * BLOCK + offs) // d                     # the division under test
            a = tl.load(A + row[:, None] * BLOCK + offs[None, :])
            b = tl.load(B + offs[:, None] * BLOCK + offs[None, :])
            acc += tl.dot(a, b)
        tl.store(C + offs[:, None] * BLOCK + offs[None, :], acc)

    t = torch.empty(64 * 64, device="meta", dtype=torch.bfloat16)
    return compile_and_read(probe, (t, t, torch.empty(64 * 64, device="meta"), 7, 3),
                            dict(BLOCK=64, num_warps=4, num_stages=3), 90)


CI_LAYERS = ["dcgan/256-128@8 k4s2p1", "unet/256-128@64 k2s2", "fsrcnn/56-1@64 k9s3p4op2"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="every suite layer (default: quick)")
    ap.add_argument("--layers", nargs="*", help="substrings of layer keys")
    ap.add_argument("--space", action="store_true", help="every config of the autotune space")
    ap.add_argument("--dtypes", nargs="*", default=list(DTYPES))
    ap.add_argument("--layouts", nargs="*", default=["cl", "nchw"])
    ap.add_argument("--caps", nargs="*", type=int, default=[90, 80])
    ap.add_argument("--passes", nargs="*", default=["fwd", "dgrad", "wgrad"])
    ap.add_argument("--ci", action="store_true",
                    help=f"the test subset: {CI_LAYERS}, bf16 and tf32, sm_90, heuristic")
    ap.add_argument("--selftest", action="store_true",
                    help="compile two variants that must fail (BLOCK_M 32: no wgmma; a 256 x 256 "
                         "tile on 4 warps: spills) and check that the verdicts say so")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=None, help="results path prefix")
    return ap.parse_args(argv)


def main(argv=None):
    os.environ.pop("TRITON_INTERPRET", None)
    args = parse_args(argv)
    import triton
    from perf import layers as L
    if args.selftest:
        return selftest()
    if args.ci:
        args.layers, args.dtypes, args.caps = CI_LAYERS, ["bf16", "tf32"], [90]
    layers = L.select(args.layers, quick=not args.full)
    jobs = collect(layers, args.dtypes, args.layouts, args.caps, args.passes, args.space)
    print(f"# {len(jobs)} unique variants from {len(layers)} layers", flush=True)
    results = run(jobs, args.workers)
    report = summarize(jobs, results)
    meta = dict(triton=triton.__version__, date=datetime.datetime.now().isoformat(
        timespec="seconds"), configs="autotune space (pruned)" if args.space else
        "heuristic / tuned table", layers=[l.key for l in layers], dtypes=args.dtypes,
        caps=args.caps)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    prefix = args.out or os.path.join(os.path.dirname(__file__), "results",
                                      f"static-triton{triton.__version__}-{stamp}")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(dict(meta=meta, **report), f, indent=1, default=str)
    with open(prefix + ".md", "w") as f:
        f.write(markdown(report, meta))
    print(json.dumps(report["summary"]), flush=True)
    print(f"# wrote {prefix}.json / .md", flush=True)
    return 1 if report["summary"]["with_problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
