"""The Triton engine, host side: per-phase tables, weight packing, kernel configuration
(autotuned, from the shipped tuning table, or a heuristic) and the launches for forward,
grad_input and grad_weight. The kernels themselves are in triton_kernels.py.

Configuration, in order: a shape key found in ``tuned/*.json`` (written by
``perf/autotune.py``) uses its config with no tuning; ``TRITON_INTERPRET=1`` runs one small
fixed config (CPU tensors); else Triton's autotuner runs once per key (bucketed channels, taps,
dtype and layout, never batch or spatial size) and caches the result on disk;
``KSTCONV_AUTOTUNE=0`` skips tuning for a heuristic config (no start-up latency).
"""
from __future__ import annotations

import contextlib
import functools
import glob
import inspect
import json
import math
import os

import torch

from . import buffers
from .epilogue import Activation
from .geometry import Geometry

_TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def load():
    """Import triton (the engine's only requirement); raises ImportError without it."""
    import triton  # noqa: F401
    from . import triton_kernels  # noqa: F401
    return True


# ------------------------------------------------------------------------------------ tables
def _pad3(items, unit):
    return [unit] * (3 - len(items)) + list(items)


@functools.lru_cache(maxsize=256)
def _forward_plan(geom: Geometry):
    """Per-axis scalars and the per-phase table of a forward pass (cached per geometry)."""
    axes = []
    for a in range(geom.ndim):
        phs = geom.axis_phases(a)
        s, d = geom.stride[a], geom.dilation[a]
        axes.append(dict(L=geom.in_size[a], A=1, S=s, STEP=-(d // math.gcd(s, d)),
                         phases=[(ph.num_out, ph.num_taps, ph.offsets[0] if ph.num_taps else 0,
                                  ph.residue) for ph in phs]))
    unit = dict(L=1, A=1, S=1, STEP=0, phases=[(1, 1, 0, 0)])
    return _pad3(axes, unit)


@functools.lru_cache(maxsize=256)
def _grad_input_plan(geom: Geometry):
    axes = []
    for a in range(geom.ndim):
        axes.append(dict(L=geom.out_size[a], A=geom.stride[a], S=1, STEP=geom.dilation[a],
                         phases=[(geom.in_size[a], geom.kernel[a], -geom.padding[a], 0)]))
    unit = dict(L=1, A=1, S=1, STEP=0, phases=[(1, 1, 0, 0)])
    return _pad3(axes, unit)


def phase_table(axes, c_src_g: int, c_dst_g: int):
    """Rows Qd Qh Qw Td Th Tw OFFd OFFh OFFw Rd Rh Rw WOFF KP, phases in row-major (d, h, w)
    order (the order of geometry.Geometry.phases and of the packed weight)."""
    rows, woff = [], 0
    for pd in axes[0]["phases"]:
        for ph in axes[1]["phases"]:
            for pw in axes[2]["phases"]:
                kp = pd[1] * ph[1] * pw[1] * c_src_g
                rows.append([pd[0], ph[0], pw[0], pd[1], ph[1], pw[1], pd[2], ph[2], pw[2],
                             pd[3], ph[3], pw[3], woff, kp])
                woff += c_dst_g * kp
    return rows, woff


@functools.lru_cache(maxsize=256)
def _table_tensor(rows_key, device_str):
    t = torch.tensor(rows_key, dtype=torch.int64)
    if t.numel() and int(t.abs().max()) >= 2 ** 31:
        raise ValueError("triton_kstconv: a phase table entry does not fit in int32")
    return t.to(torch.int32).to(device_str)


def _table(rows, device):
    return _table_tensor(tuple(tuple(r) for r in rows), str(device))


# ---------------------------------------------------------------------------- weight packing
def pack_forward_weight(weight: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """[groups, sum over phases of C_out/g x (T x C_in/g)]: per phase the sub-kernel with the
    reduction (taps, c_in) contiguous for each output channel (geometry.segregate_weight)."""
    from .geometry import segregate_weight
    g = geom.groups
    parts = [sub.reshape(g, -1) for sub in segregate_weight(weight, geom)]
    return torch.cat(parts, dim=1).contiguous() if parts else weight.new_zeros(g, 0)


def pack_grad_input_weight(weight: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """[groups, C_in/g x (taps x C_out/g)]: the adjoint's single phase, every tap ascending."""
    g, nd = geom.groups, geom.ndim
    c_in, c_out_g = weight.shape[:2]
    w = weight.reshape(g, c_in // g, c_out_g, *weight.shape[2:])
    w = w.permute(0, 1, *range(3, 3 + nd), 2)
    return w.reshape(g, -1).contiguous()


# ---------------------------------------------------------------------------- configuration
def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v - 1).bit_length())


def _bucket(v: int) -> int:
    return min(_next_pow2(max(1, v)), 1024)


def _layout_code(t: torch.Tensor) -> int:
    return 1 if t.dim() >= 4 and t.stride(1) == 1 and t.shape[1] > 1 else 0


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not interpreting() and torch.backends.cudnn.allow_tf32:
        return "tf32"   # what cuDNN does for the native op under the same flag
    return "ieee"


def _autotune_enabled() -> bool:
    return os.environ.get("KSTCONV_AUTOTUNE", "1") != "0" and not interpreting()


@functools.lru_cache(maxsize=1)
def tuned_table() -> dict:
    """Configs chosen by perf/autotune.py for known shape keys (skips tuning at run time):
    every ``tuned/*.json`` shipped with the package, then ``KSTCONV_TUNED_TABLE`` if set."""
    paths = sorted(glob.glob(os.path.join(_TUNED_DIR, "*.json")))
    if os.environ.get("KSTCONV_TUNED_TABLE"):
        paths.append(os.environ["KSTCONV_TUNED_TABLE"])
    table = {}
    for path in paths:
        with open(path) as f:
            table.update(json.load(f).get("configs", {}))
    return table


def shape_key(kind: str, dtype: torch.dtype, c_src_g: int, c_dst_g: int, taps: int,
              layout: int, device_name: str = "") -> str:
    return f"{kind}|{str(dtype).replace('torch.', '')}|cin{_bucket(c_src_g)}|cout" \
           f"{_bucket(c_dst_g)}|taps{taps}|cl{layout}|{device_name}"


def heuristic_config(kind: str, m: int, c_src_g: int, c_dst_g: int, dtype) -> dict:
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=1)
    wide = dtype in (torch.float16, torch.bfloat16)
    if kind == "wgrad":
        bm = 64 if c_dst_g > 32 else 32
        return dict(BLOCK_M=bm, BLOCK_N=64 if c_src_g >= 64 else 32, BLOCK_K=64 if wide else 32,
                    GROUP_M=1, num_warps=4, num_stages=3)
    bn = max(16, min(128, _next_pow2(c_dst_g)))
    bm = 128 if m >= 4096 else 64
    bk = max(16, min(64 if wide else 32, _next_pow2(c_src_g)))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                num_warps=8 if bm * bn >= 128 * 128 else 4, num_stages=3)


def config_space(kind: str):
    """The autotune space (pruned per problem by _prune): tile shapes, pipeline depth and tile
    order; the warp count follows the tile size (4 up to 64 x 128, else 8)."""
    import triton
    out = []
    for bm in (64, 128, 256) if kind != "wgrad" else (32, 64, 128):
        for bn in (32, 64, 128, 256):
            if bm * bn > 128 * 256:
                continue
            warps = 4 if bm * bn <= 64 * 128 else 8
            for bk in (32, 64):
                for stages in (3, 4):
                    for group_m in ((1, 8) if kind != "wgrad" else (None,)):
                        meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
                        if group_m is not None:
                            meta["GROUP_M"] = group_m
                        out.append(triton.Config(meta, num_warps=warps, num_stages=stages))
    return out


def _prune(kind):
    def prune(configs, named_args, **kwargs):
        c_src = named_args.get("C_src_g", named_args.get("C_in_g", 1))
        c_dst = named_args.get("C_dst_g", named_args.get("C_out_g", 1))
        x = named_args.get("X")
        four_byte = getattr(x, "element_size", lambda: 2)() >= 4
        keep = []
        for c in configs:
            k = c.kwargs
            if four_byte and k["BLOCK_K"] > 32:   # fp32/tf32 tiles: K = 32 fills the smem
                continue
            if kind == "wgrad":
                if k["BLOCK_M"] > 2 * max(16, _next_pow2(c_dst)):
                    continue
            elif k["BLOCK_N"] > 2 * max(16, _next_pow2(c_dst)) or \
                    k["BLOCK_K"] > 2 * max(16, _next_pow2(c_src)):
                continue
            elif k["GROUP_M"] == 1 and c_dst <= k["BLOCK_N"]:
                continue   # one column of tiles: the tile order makes no difference
            keep.append(c)
        return keep or configs[:1]
    return prune


@functools.lru_cache(maxsize=None)
def _tuned_kernel(kind: str):
    import triton
    from . import triton_kernels as tk
    base = tk.conv_phase_kernel if kind != "wgrad" else tk.wgrad_phase_kernel
    kwargs = {}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kwargs["cache_results"] = True   # Triton's on-disk autotune cache
    return triton.autotune(config_space(kind),
                           key=["key_cin", "key_cout", "key_taps", "key_layout"],
                           prune_configs_by={"early_config_prune": _prune(kind)},
                           **kwargs)(base)


_FORCED: list = []   # configs forced by forced_config() (the autotune sweep)


@contextlib.contextmanager
def forced_config(cfg: dict):
    """Run every launch inside the block with ``cfg`` (used by perf/autotune.py)."""
    _FORCED.append(cfg)
    try:
        yield
    finally:
        _FORCED.pop()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def choose_config(kind: str, m: int, c_src_g: int, c_dst_g: int, dtype, taps: int,
                  layout: int, device: torch.device):
    """A config dict, or None to autotune (see the module docstring for the order)."""
    if _FORCED:
        return _FORCED[-1]
    key = shape_key(kind, dtype, c_src_g, c_dst_g, taps, layout, device_name(device))
    cfg = tuned_table().get(key)
    if cfg is not None:
        return cfg
    if interpreting():
        return heuristic_config(kind, m, c_src_g, c_dst_g, dtype)
    if _autotune_enabled():
        return None
    return heuristic_config(kind, m, c_src_g, c_dst_g, dtype)


def _split_launch_options(cfg: dict):
    cfg = dict(cfg)
    launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    return cfg, launch


def _check_device(t: torch.Tensor):
    if t.device.type == "cpu" and not interpreting():
        raise RuntimeError("the Triton engine needs CUDA tensors, or TRITON_INTERPRET=1 for CPU "
                           "tensors")


def _strides5(t: torch.Tensor):
    st = list(t.stride())
    return st[:2] + [0] * (5 - t.dim()) + st[2:]


def _sizes3(sizes):
    return [1] * (3 - len(sizes)) + list(sizes)


# ----------------------------------------------------------------------------- the passes
def _run_conv(src, wp, bias, dst, pre, axes, geom, c_src_g, c_dst_g, act: Activation, kind):
    """Forward (kind "fwd") or grad_input ("dgrad"): one launch over every phase."""
    import triton
    from . import triton_kernels as tk
    rows, _ = phase_table(axes, c_src_g, c_dst_g)
    n = src.shape[0]
    m_max = n * max(r[0] * r[1] * r[2] for r in rows) if rows else 0
    if dst.numel() == 0 or m_max == 0:
        return
    dtype = src.dtype
    taps = max(r[3] * r[4] * r[5] for r in rows)
    layout = _layout_code(src)
    sx, sy = _strides5(src), _strides5(dst)
    sp = _strides5(pre) if pre is not None else sy
    args = (src, wp, bias if bias is not None else wp, dst, pre if pre is not None else dst,
            _table(rows, src.device), n, c_src_g, c_dst_g, *[a["L"] for a in axes],
            *[a["A"] for a in axes], *[a["S"] for a in axes], *[a["STEP"] for a in axes],
            *sx, *sy, *sp, wp.stride(0), float(act.param), m_max,
            _bucket(c_src_g), _bucket(c_dst_g), taps, layout)
    meta_const = dict(ACT=act.code, HAS_BIAS=bias is not None, HAS_PRE=pre is not None,
                      ACC_FP64=dtype == torch.float64,
                      UPCAST=interpreting() and dtype == torch.bfloat16,
                      PRECISION=_precision(dtype))
    n_phases = len(rows)

    def grid(meta):
        return (triton.cdiv(m_max, meta["BLOCK_M"]) * triton.cdiv(c_dst_g, meta["BLOCK_N"]),
                n_phases, geom.groups)

    cfg = choose_config(kind, m_max, c_src_g, c_dst_g, dtype, taps, layout, src.device)
    if cfg is None:
        _tuned_kernel(kind)[grid](*args, **meta_const)
        return
    meta, launch = _split_launch_options(cfg)
    tk.conv_phase_kernel[grid(meta)](*args, **meta_const, **meta, **launch)


def forward(x, weight, bias, geom: Geometry, act: Activation, keep_pre: bool):
    _check_device(x)
    g = geom.groups
    shape = (x.shape[0], weight.shape[1] * g, *geom.out_size)
    fmt = buffers.output_memory_format(geom.ndim, x, weight)
    out = buffers.empty(shape, x.dtype, x.device, fmt)
    pre = buffers.empty(shape, x.dtype, x.device, fmt) if keep_pre else None
    wp = pack_forward_weight(weight, geom)
    _run_conv(x, wp, bias, out, pre, _forward_plan(geom), geom, x.shape[1] // g,
              weight.shape[1], act, "fwd")
    return out, pre


def grad_input(grad, weight, geom: Geometry):
    _check_device(grad)
    g = geom.groups
    shape = (grad.shape[0], weight.shape[0], *geom.in_size)
    dx = buffers.empty(shape, grad.dtype, grad.device,
                       buffers.output_memory_format(geom.ndim, grad, weight))
    wp = pack_grad_input_weight(weight, geom)
    _run_conv(grad, wp, None, dx, None, _grad_input_plan(geom), geom,
              weight.shape[1], weight.shape[0] // g, Activation(), "dgrad")
    return dx


def grad_weight(x, grad, weight_shape, geom: Geometry, dtype):
    _check_device(x)
    import triton
    from . import triton_kernels as tk
    g = geom.groups
    c_in, c_out_g = weight_shape[0], weight_shape[1]
    c_in_g = c_in // g
    axes = _forward_plan(geom)
    rows, per_group = phase_table(axes, c_in_g, c_out_g)
    dw = torch.zeros(tuple(weight_shape), dtype=dtype, device=x.device)
    n = x.shape[0]
    m_max = n * max(r[0] * r[1] * r[2] for r in rows) if rows else 0
    if m_max == 0 or x.numel() == 0 or grad.numel() == 0 or per_group == 0:
        return dw
    table = _table(rows, x.device)
    taps = max(r[3] * r[4] * r[5] for r in rows)
    cfg = choose_config("wgrad", m_max, c_in_g, c_out_g, dtype, taps, _layout_code(x), x.device)
    nominal = cfg or heuristic_config("wgrad", m_max, c_in_g, c_out_g, dtype)
    kp_max = max(r[13] for r in rows)
    tiles = triton.cdiv(c_out_g, nominal["BLOCK_M"]) * triton.cdiv(kp_max, nominal["BLOCK_N"])
    # split the pixel reduction so that the GPU is full; each split owns a workspace slot (the
    # split does not depend on the config, so autotuning may vary the tiles freely)
    target = 4 * (torch.cuda.get_device_properties(x.device).multi_processor_count
                  if x.device.type == "cuda" else 1)
    splits = max(1, min(triton.cdiv(target, max(1, tiles * len(rows) * g)),
                        triton.cdiv(m_max, 4 * nominal["BLOCK_K"]), 64))
    per_split = triton.cdiv(triton.cdiv(m_max, splits), nominal["BLOCK_K"]) * nominal["BLOCK_K"]
    splits = triton.cdiv(m_max, per_split)
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ws = buffers.empty((splits, g, per_group), acc_dtype, x.device)
    sx, sy = _strides5(x), _strides5(grad)
    fw = _forward_plan(geom)
    args = (x, grad, ws, table, n, c_in_g, c_out_g, *[a["L"] for a in fw],
            *[a["S"] for a in fw], *[a["STEP"] for a in fw], *sx, *sy,
            ws.stride(0), ws.stride(1), splits, per_split,
            _bucket(c_in_g), _bucket(c_out_g), taps, _layout_code(x))
    meta_const = dict(ACC_FP64=dtype == torch.float64,
                      UPCAST=interpreting() and dtype == torch.bfloat16,
                      PRECISION=_precision(dtype))

    def grid(meta):
        return (triton.cdiv(c_out_g, meta["BLOCK_M"]) * triton.cdiv(kp_max, meta["BLOCK_N"]),
                len(rows), g * splits)

    if cfg is None:
        _tuned_kernel("wgrad")[grid](*args, **meta_const)
    else:
        meta, launch = _split_launch_options(cfg)
        tk.wgrad_phase_kernel[grid(meta)](*args, **meta_const, **meta, **launch)
    packed = ws.sum(0)                               # fixed-order reduction of the splits
    _unpack_weight_grad(packed, dw, geom)
    return dw


def _unpack_weight_grad(packed: torch.Tensor, dw: torch.Tensor, geom: Geometry):
    """Scatter per-phase [C_out/g, (taps, C_in/g)] blocks back into dW[C_in, C_out/g, *k]."""
    g, nd = geom.groups, geom.ndim
    c_in, c_out_g = dw.shape[:2]
    c_in_g = c_in // g
    view = dw.view(g, c_in_g, c_out_g, *dw.shape[2:])
    off = 0
    for phase in geom.phases():
        taps = [ap.taps for ap in phase.axes]
        kp = math.prod(len(t) for t in taps) * c_in_g
        block = packed[:, off:off + c_out_g * kp]
        off += c_out_g * kp
        if kp == 0:
            continue
        sub = block.reshape(g, c_out_g, *[len(t) for t in taps], c_in_g)
        sub = sub.movedim(-1, 1)                     # [g, c_in_g, c_out_g, T...]
        idx = torch.meshgrid(*[torch.tensor(t, device=dw.device) for t in taps], indexing="ij")
        view[(slice(None), slice(None), slice(None)) + tuple(idx)] = sub.to(dw.dtype)
