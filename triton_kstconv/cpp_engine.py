"""The C++ CPU engine: builds ``csrc/`` once with ``torch.utils.cpp_extension`` (cached under
``TORCH_EXTENSIONS_DIR``), encodes the geometry's phase plans for it, and wraps its entry points
as forward / grad_input / grad_weight / joint backward functions on N-first tensors of any
layout. Which strategy runs is the C++ chooser's decision (csrc/chooser.cpp); the knobs that
force one (KSTCONV_METHOD and friends, KSTCONV_JOINT) come from ``config``.

fp32 and fp64 run natively; fp16 and bf16 are computed in fp32 and cast once at the end.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import os
import shutil
import sys
import threading
import warnings

import torch

from . import buffers, config, weight_cache
from .epilogue import Activation
from .geometry import ConvArgumentError, Geometry, pass_plan

_LOCK = threading.Lock()
_MODULE = None
# The strategy each pass last ran ("fwd", "dgrad", "wgrad"): the tests check a forced one ran.
last_method: dict = {}


class CompilerMissingError(RuntimeError):
    pass


def _sources() -> list[str]:
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
    return sorted(glob.glob(os.path.join(here, "*.cpp")))


def _build_directory(name: str) -> str:
    """TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), one folder per Python and
    torch version and per build name."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions")
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__}".replace("+", "_")
    path = os.path.join(base, tag, name)
    os.makedirs(path, exist_ok=True)
    return path


@contextlib.contextmanager
def _build_lock(build_dir: str):
    """An OS lock around the build (released by the kernel if its holder dies). torch's own
    lock is a plain file that a build killed midway leaves behind, and every later build then
    waits on it forever; holding ours, no live build can own that file, so a leftover one is
    stale and is removed."""
    try:
        import fcntl
    except ImportError:          # not POSIX: torch's own lock alone
        yield
        return
    with open(os.path.join(build_dir, ".kstconv_build.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            stale = os.path.join(build_dir, "lock")
            if os.path.exists(stale):
                warnings.warn(f"triton_kstconv: removing {stale}, left by a build of the C++ "
                              "engine that was killed midway", RuntimeWarning, stacklevel=3)
                os.remove(stale)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load(verbose: bool = False):
    """Compile (first call only; cached on disk afterwards) and import the extension."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    with _LOCK:
        if _MODULE is not None:
            return _MODULE
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            raise CompilerMissingError(
                f"triton_kstconv's CPU engine needs a C++ compiler to build once, but {cxx!r} was "
                "not found. Install one (Debian/Ubuntu: `apt-get install g++`; conda: "
                "`conda install gxx_linux-64`) or set CXX, or use backend='torch' "
                "(KSTCONV_BACKEND=torch), the pure-PyTorch path.")
        from torch.utils.cpp_extension import load as _load
        flags = ["-O3", "-fopenmp", "-std=c++17"]
        extra = list(config.knobs().cxxflags)
        # a build of its own per set of extra flags (a stable name: built once, then cached)
        tag = hashlib.sha1(" ".join(extra).encode()).hexdigest()[:10] if extra else ""
        name = "kstconv_cpu" + (f"_{tag}" if tag else "")
        build_dir = _build_directory(name)
        with _build_lock(build_dir):
            mod = _load(name=name, sources=_sources(), extra_cflags=flags + extra,
                        extra_ldflags=["-fopenmp"] + [f for f in extra if f.startswith("-fsan")],
                        build_directory=build_dir, verbose=verbose)
        mod.configure(("auto", "aten", "mkl", "brgemm").index(config.knobs().blas))
        _MODULE = mod
        return _MODULE


def gemm_paths() -> dict:
    """Which GEMMs the engine found in libtorch_cpu: MKL's sgemm (else at::mm), its packed
    operands, ATen's brgemm (else the strategies that need it do not run); and whether this
    CPU runs grad_weight's AVX-512 register tiles (wgrad_rows)."""
    return dict(load().gemm_paths())


@contextlib.contextmanager
def tuning(**values):
    """Work-item sizes inside the block (the tests cut passes into many tiny items):
    cols_cap, item_pixels, gemm_first_cap, brg_rows, brg_cols; l2_bytes, the cache size the
    forward's rule compares weight panels with; stream_bytes, the destination size from which
    the direct strategy writes with non-temporal stores; row_kernel (1 or 0), whether the direct
    forward takes its row kernel where it applies; whole_rows (1 or 0), whether implicit GEMM's
    tiles may span rows shorter than a tile; wgrad_shifted (1 or 0), whether grad_weight's
    brgemm strategy takes shifted input copies on narrow images; wgrad_rows (1 or 0), whether
    the rules may give grad_weight to its AVX-512 register tiles; winograd (1 or 0), whether the
    rules may give the forward to Winograd (method 8); brgemm_rules (-1, 0 or 1),
    the chooser's rules for a CPU whose GEMMs go over brgemm: where they do, never, always."""
    mod = load()
    saved = dict(mod.get_tuning())
    mod.set_tuning(values)
    try:
        yield
    finally:
        mod.set_tuning(saved)


# ------------------------------------------------------------------------------------- plans
_UNIT_AXIS = [1, 1, 1, 1, 1, 0, 1, 1, 0, 0]   # L_src L_dst a s n | dst_off Q T widx soff


@functools.lru_cache(maxsize=1024)
def encode_plan(geom: Geometry, kind: str) -> tuple[int, ...]:
    """geometry.pass_plan(geom, kind) as the C++ plan's flat sequence (csrc/plan.h): per axis
    (unit axes first for 1D/2D) L_src, L_dst, src_stride, dst_stride, n_phases, then per phase
    dst_off, Q, T, widx[T], soff[T]. A tuple: cached and shared, and a weight-cache key as is."""
    flat = _UNIT_AXIS * (3 - geom.ndim)
    for ax in pass_plan(geom, kind).axes:
        flat += [ax.src_len, ax.dst_len, ax.src_stride, ax.dst_stride, len(ax.phases)]
        for ph in ax.phases:
            flat += [ph.residue, ph.num_out, ph.num_taps, *ph.taps, *ph.offsets]
    return tuple(flat)


def forward_plan(geom: Geometry) -> tuple[int, ...]:
    return encode_plan(geom, "forward")


def grad_input_plan(geom: Geometry) -> tuple[int, ...]:
    return encode_plan(geom, "grad_input")


def _as5d(t: torch.Tensor) -> torch.Tensor:
    while t.dim() < 5:
        t = t.unsqueeze(2)
    return t


_NATIVE = (torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype in _NATIVE:
        return dtype
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    raise ConvArgumentError(
        f"the C++ engine supports float16/bfloat16/float32/float64, got {dtype}")


@functools.lru_cache(maxsize=256)
def _shape_only(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The chooser reads the weight's shape and dtype only: a stand-in without storage (made
    once per shape: building it cost a fifth of a small layer's call)."""
    return torch.empty((), dtype=dtype, device="cpu").expand(
        _as5d(torch.empty(shape, device="meta")).shape)


def _conv(mod, src, weight, dst, plan, groups: int, swap: bool, method: int, reuse: bool):
    """The method conv() will run, and the weight prepared for it in the compute dtype; with
    ``reuse`` (a pass that records no graph) made once per weight version (weight_cache),
    else left to conv() itself. Returns (method, weight in the compute dtype, prepared)."""
    cdt = dst.dtype
    m = mod.conv_method(src, _shape_only(weight.shape, cdt), dst, plan, groups, swap, method,
                        not reuse)
    last_method["dgrad" if swap else "fwd"] = m
    if not reuse:
        return m, weight.to(cdt), []
    key = ("cpp", swap, weight.shape, plan, groups, m,
           src.shape[1] > 1 and src.stride(1) == 1, cdt)

    def make(_):
        wc = weight.to(cdt)
        # the converted weight is kept only where it is a new tensor (a cache value must not
        # hold the weight it hangs off, or the weight would never be freed)
        return {"prep": (wc if wc is not weight else None,
                         mod.pack_weight(src, _as5d(wc), dst, plan, groups, swap, m))}

    wc, prep = weight_cache.packed(weight, key, ("prep",), make)["prep"]
    return m, (weight if wc is None else wc), prep


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: Geometry,
            act: Activation, keep_pre: bool, state: dict | None = None, method: int = 0):
    """Returns ``(out, pre)``; ``pre`` (the value before the activation) only if ``keep_pre``.
    ``state`` None: a pass that records no graph (the packed weight is reused across calls).
    ``method`` forces one of the engine's inner strategies (0: its own choice; see csrc)."""
    mod = load()
    cdt = _compute_dtype(x.dtype)
    xc = _as5d(x.to(cdt))
    bc = bias.to(cdt) if bias is not None else None
    shape = (x.shape[0], weight.shape[1] * geom.groups, *geom.out_size)
    fmt = buffers.output_memory_format(geom.ndim, x, weight)
    out = buffers.empty(shape, cdt, x.device, fmt)
    pre = buffers.empty(shape, cdt, x.device, fmt) if keep_pre else None
    plan = forward_plan(geom)
    m, wc, prep = _conv(mod, xc, weight, _as5d(out), plan, geom.groups, False,
                        method or config.knobs().method, state is None)
    mod.conv(xc, _as5d(wc), bc, _as5d(out), None if pre is None else _as5d(pre), plan,
             geom.groups, False, act.code, act.param, m, prep)
    if cdt != x.dtype:
        out = out.to(x.dtype)
        pre = pre.to(x.dtype) if pre is not None else None
    return out, pre


def grad_input(grad: torch.Tensor, weight: torch.Tensor, geom: Geometry,
               state: dict | None = None, method: int = 0) -> torch.Tensor:
    mod = load()
    cdt = _compute_dtype(grad.dtype)
    gc = _as5d(grad.to(cdt))
    shape = (grad.shape[0], weight.shape[0], *geom.in_size)
    fmt = buffers.output_memory_format(geom.ndim, grad, weight)
    dx = buffers.empty(shape, cdt, grad.device, fmt)
    plan = grad_input_plan(geom)
    m, wc, prep = _conv(mod, gc, weight, _as5d(dx), plan, geom.groups, True,
                        method or config.knobs().dgrad_method, False)
    mod.conv(gc, _as5d(wc), None, _as5d(dx), None, plan, geom.groups, True, 0, 0.0, m, prep)
    return dx.to(grad.dtype)


def grad_weight(x: torch.Tensor, grad: torch.Tensor, weight_shape, geom: Geometry,
                dtype: torch.dtype, method: int = 0) -> torch.Tensor:
    mod = load()
    cdt = _compute_dtype(dtype)
    dw = buffers.empty(tuple(weight_shape), cdt, x.device)   # the engine writes every element
    last_method["wgrad"] = mod.grad_weight(
        _as5d(x.to(cdt)), _as5d(grad.to(cdt)), _as5d(dw), forward_plan(geom),
        grad_input_plan(geom), geom.groups, method or config.knobs().wgrad_method)
    return dw.to(dtype)


def _backward_outputs(grad, x, weight, geom, need_dx, need_dw, need_db):
    dx = dw = db = None
    if need_dx:
        fmt = buffers.output_memory_format(geom.ndim, grad, weight)
        dx = buffers.empty((x.shape[0], weight.shape[0], *geom.in_size), grad.dtype, grad.device,
                           fmt)
    if need_dw:
        dw = buffers.empty(tuple(weight.shape), weight.dtype, weight.device)
    if need_db:
        db = buffers.empty((grad.shape[1],), grad.dtype, grad.device)
    return dx, dw, db


def _patch_backward(mod, xs, gs, ws, grad, x, weight, geom, need_dx, need_dw, need_db):
    """The three gradients from one patch matrix of grad_out (csrc/backward_patch.cpp);
    xs, gs, ws: x, grad, weight as 5-d views."""
    dx, dw, db = _backward_outputs(grad, x, weight, geom, need_dx, need_dw, need_db)
    mod.patch_backward(xs, gs, ws, None if dx is None else _as5d(dx),
                       None if dw is None else _as5d(dw), db, grad_input_plan(geom), geom.groups)
    last_method["backward"] = "patch"
    return dx, dw, db


@functools.lru_cache(maxsize=1024)
def _joint_geo(geom: Geometry) -> list[int]:
    """Per axis (d, h, w; unit axes first for 1D/2D): L_in, L_out, k, s, p, dil."""
    flat = [1, 1, 1, 1, 0, 1] * (3 - geom.ndim)
    for ax in range(geom.ndim):
        flat += [geom.in_size[ax], geom.out_size[ax], geom.kernel[ax], geom.stride[ax],
                 geom.padding[ax], geom.dilation[ax]]
    return flat


def joint_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, geom: Geometry,
                   need_dx: bool, need_dw: bool, need_db: bool, state=None):
    """grad_input, grad_weight and grad_bias (None where not needed) in one pass over grad_out,
    or None where the engine's joint path does not serve the layer (the caller then runs the
    separate passes)."""
    mod = load()
    knob = config.knobs().joint
    last_method["backward"] = "separate"
    if not grad.dtype == x.dtype == weight.dtype or grad.dtype not in (torch.float32,
                                                                       torch.float64):
        return None
    xs, gs, ws = _as5d(x), _as5d(grad), _as5d(weight)
    if mod.patch_backward_ok(xs, gs, ws, geom.groups, knob):
        return _patch_backward(mod, xs, gs, ws, grad, x, weight, geom, need_dx, need_dw, need_db)
    if grad.dtype != torch.float32:
        return None
    geo = _joint_geo(geom)
    if not mod.joint_backward_ok(xs, gs, ws, geo, geom.groups, knob):
        return None
    dx, dw, db = _backward_outputs(grad, x, weight, geom, need_dx, need_dw, need_db)
    last_method["backward"] = "joint"
    mod.joint_backward(xs, gs, ws, None if dx is None else _as5d(dx),
                       None if dw is None else _as5d(dw), db, geo, geom.groups)
    return dx, dw, db
