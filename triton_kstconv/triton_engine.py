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

from . import buffers, weight_cache
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


_UNIT_AXIS = dict(L=1, A=1, S=1, STEP=0, JS=1, phases=[(1, 1, 0, 0, 0)])


@functools.lru_cache(maxsize=256)
def _forward_plan(geom: Geometry):
    """Per-axis scalars and phases (Q, T, OFF, R, J0) of a forward pass (cached per geometry)."""
    axes = []
    for a in range(geom.ndim):
        phs = geom.axis_phases(a)
        s, d = geom.stride[a], geom.dilation[a]
        axes.append(dict(L=geom.in_size[a], A=1, S=s, STEP=-(d // math.gcd(s, d)),
                         JS=s // math.gcd(s, d),
                         phases=[(ph.num_out, ph.num_taps, ph.offsets[0] if ph.num_taps else 0,
                                  ph.residue, ph.taps[0] if ph.num_taps else 0) for ph in phs]))
    return _pad3(axes, _UNIT_AXIS)


@functools.lru_cache(maxsize=256)
def _grad_input_plan(geom: Geometry):
    axes = []
    for a in range(geom.ndim):
        axes.append(dict(L=geom.out_size[a], A=geom.stride[a], S=1, STEP=geom.dilation[a], JS=1,
                         phases=[(geom.in_size[a], geom.kernel[a], -geom.padding[a], 0, 0)]))
    return _pad3(axes, _UNIT_AXIS)


def phase_table(axes, c_dst_g: int):
    """Rows of triton_kernels.PHASE_FIELDS ints: Qd Qh Qw Td Th Tw OFFd OFFh OFFw Rd Rh Rw WOFF
    J0d J0h J0w, phases in row-major (d, h, w) residue order (the order of
    geometry.Geometry.phases and of the packed weight). WOFF, the offset of the phase's block
    in a group of the packed weight, is in units of C_src_g."""
    rows, woff = [], 0
    for pd in axes[0]["phases"]:
        for ph in axes[1]["phases"]:
            for pw in axes[2]["phases"]:
                rows.append([pd[0], ph[0], pw[0], pd[1], ph[1], pw[1], pd[2], ph[2], pw[2],
                             pd[3], ph[3], pw[3], woff, pd[4], ph[4], pw[4]])
                woff += c_dst_g * pd[1] * ph[1] * pw[1]
    return rows


@functools.lru_cache(maxsize=256)
def _table_tensor(rows_key, device_str):
    t = torch.tensor(rows_key, dtype=torch.int64)
    if t.numel() and int(t.abs().max()) >= 2 ** 31:
        raise ValueError("triton_kstconv: a phase table entry does not fit in int32")
    return t.to(torch.int32).to(device_str)


def _table(rows, device):
    """The phase table as an int32 tensor on ``device``: made (one host copy) the first time a
    geometry runs on a device, then served from the cache."""
    return _table_tensor(tuple(tuple(r) for r in rows), str(device))


# ---------------------------------------------------------------------------- weight packing
def _pack(weight: torch.Tensor, geom: Geometry, parts) -> dict:
    """The packed weights ``parts`` ("fwd" and/or "dgrad"), reused while the weight is
    unchanged (weight_cache), else made in ONE launch (_pack_now)."""
    key = ("triton", tuple(weight.shape), geom.kernel, geom.stride, geom.padding,
           geom.dilation, geom.groups)
    return weight_cache.packed(weight, key, parts, lambda missing: _pack_now(weight, geom,
                                                                             missing))


def _pack_now(weight, geom, parts):
    """The packed weights ``parts`` in one launch of pack_weight_kernel."""
    from . import triton_kernels as tk
    g = geom.groups
    out = {p: buffers.empty((g, weight.numel() // g), weight.dtype, weight.device)
           for p in parts}
    if weight.numel() == 0:
        return out
    c_in, c_out_g = weight.shape[:2]
    axes = _forward_plan(geom)
    table = _table(phase_table(axes, c_out_g), weight.device)
    ks, ss = _sizes3(geom.kernel), _sizes3(geom.stride)
    ds, ps = _sizes3(geom.dilation), [0] * (3 - geom.ndim) + list(geom.padding)
    block = 1024
    fwd, dgrad = out.get("fwd"), out.get("dgrad")
    launch(tk.pack_weight_kernel, (triton_cdiv(weight.numel(), block),),
           weight, fwd if fwd is not None else weight, dgrad if dgrad is not None else weight,
           table, weight.numel(), c_in // g, c_out_g, *ks, *ss, *ds, *ps,
           *[a["JS"] for a in axes], *_strides5(weight),
           PACK_FWD=fwd is not None, PACK_DGRAD=dgrad is not None, BLOCK=block)
    return out


# ---------------------------------------------------------------------------- configuration
def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v - 1).bit_length())


def _bucket(v: int) -> int:
    return min(_next_pow2(max(1, v)), 1024)


def _layout_code(t: torch.Tensor) -> int:
    return 1 if t.dim() >= 4 and t.stride(1) == 1 and t.shape[1] > 1 else 0


def cudnn_conv_tf32() -> bool:
    """Whether PyTorch lets cuDNN run float32 convolutions in TF32: ``torch.backends.cudnn.conv
    .fp32_precision`` (inherited from ``cudnn.fp32_precision``, then ``torch.backends
    .fp32_precision``, where "none"), or the legacy ``torch.backends.cudnn.allow_tf32``
    (default True) where the new flags do not exist. Read through the new flags first, because
    the legacy getter raises when a program set conv and RNN flags apart."""
    cudnn = torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        for value in (conv.fp32_precision, getattr(cudnn, "fp32_precision", "none"),
                      getattr(torch.backends, "fp32_precision", "none")):
            if value != "none":
                return value == "tf32"
        return False
    return bool(cudnn.allow_tf32)


def fp32_dot_precision() -> str:
    """The one rule for float32 products on the GPU, used by the engine and its tests alike:
    TF32 exactly where PyTorch's own transposed convolution (cuDNN) may use it."""
    return "tf32" if cudnn_conv_tf32() else "ieee"


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not interpreting():
        return fp32_dot_precision()
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
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
        return cfg if kind == "wgrad" else dict(cfg, GROUP_M=1)
    wide = dtype in (torch.float16, torch.bfloat16)
    if kind == "wgrad":
        bm = 64 if c_dst_g > 32 else 32
        return dict(BLOCK_M=bm, BLOCK_N=64 if c_src_g >= 64 else 32, BLOCK_K=64 if wide else 32,
                    num_warps=4, num_stages=3)
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


@functools.lru_cache(maxsize=16)
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# shape key -> where its config came from ("forced", "tuned", "interpreter", "autotune",
# "heuristic") and the config (for "autotune": the one Triton's autotuner picked, once known)
config_log: dict = {}


def choose_config(kind: str, m: int, c_src_g: int, c_dst_g: int, dtype, taps: int,
                  layout: int, device: torch.device):
    """A config dict, or None to autotune (see the module docstring for the order)."""
    key = shape_key(kind, dtype, c_src_g, c_dst_g, taps, layout, device_name(device))
    if _FORCED:
        source, cfg = "forced", _FORCED[-1]
    elif key in tuned_table():
        source, cfg = "tuned", tuned_table()[key]
    elif interpreting():
        source, cfg = "interpreter", heuristic_config(kind, m, c_src_g, c_dst_g, dtype)
    elif _autotune_enabled():
        source, cfg = "autotune", None
    else:
        source, cfg = "heuristic", heuristic_config(kind, m, c_src_g, c_dst_g, dtype)
    if config_log.get(key, (None,))[0] != source:
        config_log[key] = (source, cfg)
    return cfg


def _note_autotuned(kind: str, key_args):
    """Record the config Triton's autotuner chose (for the benchmark's report)."""
    best = getattr(_tuned_kernel(kind), "best_config", None)
    if best is not None:
        config_log[key_args] = ("autotune", dict(best.kwargs, num_warps=best.num_warps,
                                                 num_stages=best.num_stages))


def _split_launch_options(cfg: dict):
    cfg = dict(cfg)
    launch_opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    return cfg, launch_opts


def _check_device(t: torch.Tensor):
    if t.device.type == "cpu" and not interpreting():
        raise RuntimeError("the Triton engine needs CUDA tensors, or TRITON_INTERPRET=1 for CPU "
                           "tensors")


def _strides5(t: torch.Tensor):
    st = list(t.stride())
    return st[:2] + [0] * (5 - t.dim()) + st[2:]


def _sizes3(sizes):
    return [1] * (3 - len(sizes)) + list(sizes)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


_RECORDERS: list = []   # launch recorders (capture_launches)


@contextlib.contextmanager
def capture_launches():
    """Record every launch inside the block as (kernel, grid, args, kwargs) instead of running
    it: the static check (perf/static_check.py) compiles exactly what the host code launches."""
    rec: list = []
    _RECORDERS.append(rec)
    try:
        yield rec
    finally:
        _RECORDERS.remove(rec)


def launch(kernel, grid, *args, **kwargs):
    """The engine's one way to start a kernel (a JIT function or its autotuner)."""
    if _RECORDERS:
        _RECORDERS[-1].append((kernel, grid, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# ----------------------------------------------------------------------------- the passes
def _run_conv(src, wp, bias, dst, pre, axes, geom, c_src_g, c_dst_g, act: Activation, kind):
    """Forward (kind "fwd") or grad_input ("dgrad"): one launch over every phase."""
    import triton
    from . import triton_kernels as tk
    rows = phase_table(axes, c_dst_g)
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
        launch(_tuned_kernel(kind), grid, *args, **meta_const)
        _note_autotuned(kind, shape_key(kind, dtype, c_src_g, c_dst_g, taps, layout,
                                        device_name(src.device)))
        return
    meta, launch_opts = _split_launch_options(cfg)
    launch(tk.conv_phase_kernel, grid(meta), *args, **meta_const, **meta, **launch_opts)


def forward(x, weight, bias, geom: Geometry, act: Activation, keep_pre: bool, state=None):
    """One launch. ``state`` None (a pass that records no graph): the weight packed by an
    earlier call is reused while the weight is unchanged (weight_cache). Else one more launch
    packs the weight for this pass and, when the input requires grad, for grad_input too,
    left in ``state`` for this pass's backward."""
    _check_device(x)
    g = geom.groups
    shape = (x.shape[0], weight.shape[1] * g, *geom.out_size)
    fmt = buffers.output_memory_format(geom.ndim, x, weight)
    out = buffers.empty(shape, x.dtype, x.device, fmt)
    pre = buffers.empty(shape, x.dtype, x.device, fmt) if keep_pre else None
    if state is None:
        wp = _pack(weight, geom, ("fwd",))["fwd"]
    else:
        packs = _pack_now(weight, geom, ("fwd", "dgrad") if x.requires_grad else ("fwd",))
        state["dgrad"] = packs.get("dgrad")
        wp = packs["fwd"]
    _run_conv(x, wp, bias, out, pre, _forward_plan(geom), geom, x.shape[1] // g,
              weight.shape[1], act, "fwd")
    return out, pre


def grad_input(grad, weight, geom: Geometry, state=None):
    """One launch with the weight packed by the forward (``state``), else two."""
    _check_device(grad)
    g = geom.groups
    shape = (grad.shape[0], weight.shape[0], *geom.in_size)
    dx = buffers.empty(shape, grad.dtype, grad.device,
                       buffers.output_memory_format(geom.ndim, grad, weight))
    wp = (state or {}).get("dgrad")
    if wp is None:
        wp = _pack_now(weight, geom, ("dgrad",))["dgrad"]
    _run_conv(grad, wp, None, dx, None, _grad_input_plan(geom), geom,
              weight.shape[1], weight.shape[0] // g, Activation(), "dgrad")
    return dx


def wgrad_splits(m_max: int, tiles: int, block_k: int, device: torch.device) -> int:
    """How many slices the pixel reduction of grad_weight is cut into, so that the GPU is full
    (about 4 programs per SM); 1 where the tiles alone fill it (then no workspace, no sum)."""
    target = 4 * _sm_count(device)
    return max(1, min(triton_cdiv(target, max(1, tiles)), triton_cdiv(m_max, 4 * block_k), 64))


def grad_weight(x, grad, weight_shape, geom: Geometry, dtype):
    """dW in one launch, written in its own layout; two where the pixel reduction is split (the
    slices land in a workspace that one more launch adds up in a fixed order)."""
    _check_device(x)
    import triton
    from . import triton_kernels as tk
    g = geom.groups
    c_in, c_out_g = weight_shape[0], weight_shape[1]
    c_in_g = c_in // g
    dw = buffers.empty(tuple(weight_shape), dtype, x.device)
    if dw.numel() == 0:
        return dw
    axes = _forward_plan(geom)
    rows = phase_table(axes, c_out_g)
    n = x.shape[0]
    m_max = n * max(r[0] * r[1] * r[2] for r in rows)
    taps = max(r[3] * r[4] * r[5] for r in rows)
    layout = _layout_code(x)
    cfg = choose_config("wgrad", m_max, c_in_g, c_out_g, dtype, taps, layout, x.device)
    nominal = cfg or heuristic_config("wgrad", m_max, c_in_g, c_out_g, dtype)
    kp_max = taps * c_in_g
    tiles = triton.cdiv(c_out_g, nominal["BLOCK_M"]) * triton.cdiv(kp_max, nominal["BLOCK_N"])
    splits = wgrad_splits(m_max, tiles * len(rows) * g, nominal["BLOCK_K"], x.device)
    per_split = triton.cdiv(triton.cdiv(max(m_max, 1), splits), nominal["BLOCK_K"]) \
        * nominal["BLOCK_K"]
    splits = max(1, triton.cdiv(m_max, per_split))
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = dw if splits == 1 else buffers.empty((splits, *weight_shape), acc_dtype, x.device)
    so = _strides5(dw)
    args = (x, grad, out, _table(rows, x.device), n, c_in_g, c_out_g,
            *[a["L"] for a in axes], *[a["S"] for a in axes], *[a["STEP"] for a in axes],
            *[a["JS"] for a in axes], *_strides5(x), *_strides5(grad),
            out.stride(0) if splits > 1 else 0, *so, splits, per_split,
            _bucket(c_in_g), _bucket(c_out_g), taps, layout)
    meta_const = dict(ACC_FP64=dtype == torch.float64,
                      UPCAST=interpreting() and dtype == torch.bfloat16,
                      PRECISION=_precision(dtype))

    def grid(meta):
        return (triton.cdiv(c_out_g, meta["BLOCK_M"]) * triton.cdiv(kp_max, meta["BLOCK_N"]),
                len(rows), g * splits)

    if cfg is None:
        launch(_tuned_kernel("wgrad"), grid, *args, **meta_const)
        _note_autotuned("wgrad", shape_key("wgrad", dtype, c_in_g, c_out_g, taps, layout,
                                           device_name(x.device)))
    else:
        meta, launch_opts = _split_launch_options(cfg)
        launch(tk.wgrad_phase_kernel, grid(meta), *args, **meta_const, **meta, **launch_opts)
    if splits > 1:
        block = 1024
        launch(tk.sum_splits_kernel, (triton.cdiv(dw.numel(), block),), out, dw, dw.numel(),
               splits, ACC_FP64=dtype == torch.float64, BLOCK=block)
    return dw
