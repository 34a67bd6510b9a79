"""The C++ CPU engine: builds ``csrc/kstconv.cpp`` once with ``torch.utils.cpp_extension`` (cached
under ``TORCH_EXTENSIONS_DIR``), encodes the geometry's phase plans for it, and wraps its entry
points as forward / grad_input / grad_weight functions on N-first tensors of any layout.

fp32 and fp64 run natively; fp16 and bf16 are computed in fp32 and cast once at the end.
"""
from __future__ import annotations

import functools
import os
import shutil
import threading

import torch

from . import buffers, weight_cache
from .epilogue import Activation
from .geometry import ConvArgumentError, Geometry, adjoint_axis_phase

_LOCK = threading.Lock()
_MODULE = None
# Adjacent validity classes are merged while the zero taps they add stay under this fraction of
# the useful ones (fewer, larger GEMMs). See perf/ for the sweep that chose it.
MERGE_TAU = float(os.environ.get("KSTCONV_MERGE_TAU", "0.07"))


class CompilerMissingError(RuntimeError):
    pass


def _sources() -> list[str]:
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
    return [os.path.join(here, "kstconv.cpp")]


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
        extra = os.environ.get("KSTCONV_CXXFLAGS", "").split()
        name = "kstconv_cpu" + ("_" + str(abs(hash(" ".join(extra))) % 10**8) if extra else "")
        _MODULE = _load(name=name, sources=_sources(), extra_cflags=flags + extra,
                        extra_ldflags=["-fopenmp"] + [f for f in extra if f.startswith("-fsan")],
                        verbose=verbose)
        return _MODULE


# ------------------------------------------------------------------------------------- plans
_UNIT_AXIS = [1, 1, 1, 1, 1, 0, 1, 1, 0, 0]   # L_src L_dst a s n | dst_off Q T widx soff


def _encode_axis(l_src, l_dst, a, s, phases) -> list[int]:
    out = [l_src, l_dst, a, s, len(phases)]
    for dst_off, ph in phases:
        out += [dst_off, ph.num_out, ph.num_taps, *ph.taps, *ph.offsets]
    return out


@functools.lru_cache(maxsize=1024)
def forward_plan(geom: Geometry) -> list[int]:
    """Per axis: one phase per residue, gathering the input at stride 1."""
    flat = _UNIT_AXIS * (3 - geom.ndim)
    for ax in range(geom.ndim):
        phases = [(ph.residue, ph) for ph in geom.axis_phases(ax)]
        flat += _encode_axis(geom.in_size[ax], geom.out_size[ax], 1, geom.stride[ax], phases)
    return flat


@functools.lru_cache(maxsize=1024)
def grad_input_plan(geom: Geometry) -> list[int]:
    """Per axis: one phase over the input positions, gathering grad_out at stride s."""
    flat = _UNIT_AXIS * (3 - geom.ndim)
    for ax in range(geom.ndim):
        ph = adjoint_axis_phase(geom.in_size[ax], geom.kernel[ax], geom.stride[ax],
                                geom.padding[ax], geom.dilation[ax])
        flat += _encode_axis(geom.out_size[ax], geom.in_size[ax], geom.stride[ax], 1, [(0, ph)])
    return flat


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


def _conv(mod, src, weight, dst, plan, groups: int, swap: bool, method: int, reuse: bool):
    """The method conv() will run, and the weight prepared for it in the compute dtype; with
    ``reuse`` (a pass that records no graph) made once per weight version (weight_cache),
    else left to conv() itself. Returns (method, weight in the compute dtype, prepared)."""
    cdt = dst.dtype
    m = mod.conv_method(src, _as5d(weight), dst, plan, groups, swap, method)
    if not reuse:
        return m, weight.to(cdt), []
    key = ("cpp", swap, tuple(weight.shape), tuple(plan), groups, m,
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
    m, wc, prep = _conv(mod, xc, weight, _as5d(out), plan, geom.groups, False, method,
                        state is None)
    mod.conv(xc, _as5d(wc), bc, _as5d(out), None if pre is None else _as5d(pre), plan,
             geom.groups, False, act.code, act.param, MERGE_TAU, m, prep)
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
    m, wc, prep = _conv(mod, gc, weight, _as5d(dx), plan, geom.groups, True, method, False)
    mod.conv(gc, _as5d(wc), None, _as5d(dx), None, plan, geom.groups, True, 0, 0.0, MERGE_TAU,
             m, prep)
    return dx.to(grad.dtype)


def grad_weight(x: torch.Tensor, grad: torch.Tensor, weight_shape, geom: Geometry,
                dtype: torch.dtype, method: int = 0) -> torch.Tensor:
    mod = load()
    cdt = _compute_dtype(dtype)
    dw = torch.empty(tuple(weight_shape), dtype=cdt)   # the engine writes every element
    mod.grad_weight(_as5d(x.to(cdt)), _as5d(grad.to(cdt)), _as5d(dw), forward_plan(geom),
                    grad_input_plan(geom), geom.groups, MERGE_TAU, method)
    return dw.to(dtype)


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
    if grad.dtype != torch.float32 or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return None
    mod = load()
    xs, gs, ws, geo = _as5d(x), _as5d(grad), _as5d(weight), _joint_geo(geom)
    if not mod.joint_backward_ok(xs, gs, ws, geo, geom.groups):
        return None
    dx = dw = db = None
    if need_dx:
        fmt = buffers.output_memory_format(geom.ndim, grad, weight)
        dx = buffers.empty((x.shape[0], weight.shape[0], *geom.in_size), grad.dtype, grad.device,
                           fmt)
    if need_dw:
        dw = buffers.empty(tuple(weight.shape), weight.dtype, weight.device)
    if need_db:
        db = buffers.empty((grad.shape[1],), grad.dtype, grad.device)
    mod.joint_backward(xs, gs, ws, None if dx is None else _as5d(dx),
                       None if dw is None else _as5d(dw), db, geo, geom.groups)
    return dx, dw, db
