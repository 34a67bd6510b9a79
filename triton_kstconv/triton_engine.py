"""The Triton engine, host side: per-phase tables, the kernel layout of sources, weight packing,
and the launches of forward, grad_input, grad_weight and the joint backward. The kernels are in
triton_kernels.py, their configuration in triton_config.py.

Launches per call (asserted by tests/test_device_work.py):

* forward, weight unchanged, source already in the kernel layout: 1 (the GEMM), 2 where the
  reduction is split over the source channels (too few tiles to fill the GPU), + 1 to put a
  source in the kernel layout (NCHW input, or channels not a multiple of 16);
* training: the forward adds one launch that packs the weight for the forward and grad_input
  (and converts the input, same launch); the backward is grad_input + grad_weight (+1 to sum
  a split pixel reduction), with grad_out's layout pass, which also sums grad_bias, or one sum.

Host work per call: everything a launch derives from sizes, strides, dtype and the config state
is a *launch plan*, made the first time a signature runs and kept (``_PLANS``); a steady call
builds a key, allocates its outputs and goes through Triton's launcher.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading

import torch

from . import buffers, weight_cache
from . import triton_config as cfgs
from .epilogue import Activation
from .geometry import Geometry, pass_plan

# Configuration API, re-exported (perf/autotune.py, perf/static_check.py, the tests)
interpreting = cfgs.interpreting
fp32_dot_precision = cfgs.fp32_dot_precision
cudnn_conv_tf32 = cfgs.cudnn_conv_tf32
forced_config = cfgs.forced_config
config_log = cfgs.config_log
tuned_table = cfgs.tuned_table
reload_tuned_tables = cfgs.reload_tuned_tables
heuristic_config = cfgs.heuristic_config
shape_key = cfgs.shape_key
device_name = cfgs.device_name
config_space = cfgs.config_space

ALIGN = 16          # source channels per group are padded to a multiple of this many elements


def load():
    """Import triton (the engine's only requirement); raises ImportError without it."""
    import triton  # noqa: F401
    from . import triton_kernels  # noqa: F401
    return True


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad(c: int) -> int:
    return triton_cdiv(c, ALIGN) * ALIGN


# ------------------------------------------------------------------------------------ tables
def _pad3(items, unit):
    return [unit] * (3 - len(items)) + list(items)


_UNIT_AXIS = dict(L=1, A=1, S=1, STEP=0, JS=1, phases=[(1, 1, 0, 0, 0, 0, 1)])


@functools.lru_cache(maxsize=256)
def _axes(geom: Geometry, kind: str):
    """geometry.pass_plan(geom, kind) as the kernels see it: per axis (unit axes first) L, A
    (source stride), S (destination stride), STEP (source offset step per tap), JS (kernel
    index step per tap) and per phase (Q, T, OFF, R, J0, TV0, TV1)."""
    axes = []
    for a, ax in enumerate(pass_plan(geom, kind).axes):
        s, d = geom.stride[a], geom.dilation[a]
        step, js = (-(d // math.gcd(s, d)), s // math.gcd(s, d)) if kind == "forward" else (d, 1)
        axes.append(dict(L=ax.src_len, A=ax.src_stride, S=ax.dst_stride, STEP=step, JS=js,
                         phases=[(ph.num_out, ph.num_taps, ph.offsets[0] if ph.num_taps else 0,
                                  ph.residue, ph.taps[0] if ph.num_taps else 0, *ax.window(ph))
                                 for ph in ax.phases]))
    return _pad3(axes, _UNIT_AXIS)


def _forward_plan(geom: Geometry):
    return _axes(geom, "forward")


def _grad_input_plan(geom: Geometry):
    return _axes(geom, "grad_input")


def phase_table(axes, c_dst_g: int):
    """Rows of triton_kernels.PHASE_FIELDS ints (see there), phases in row-major (d, h, w)
    residue order (the order of geometry.Geometry.phases and of the packed weight). WOFF, the
    offset of the phase's block in a group of the packed weight, is in units of C_SRC."""
    rows, woff = [], 0
    for pd in axes[0]["phases"]:
        for ph in axes[1]["phases"]:
            for pw in axes[2]["phases"]:
                rows.append([pd[0], ph[0], pw[0], pd[1], ph[1], pw[1], pd[2], ph[2], pw[2],
                             pd[3], ph[3], pw[3], woff, pd[4], ph[4], pw[4],
                             pd[5], ph[5], pw[5], pd[6], ph[6], pw[6]])
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


# ------------------------------------------------------------------------------- launches
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


# ---------------------------------------------------------------------------- launch plans
# What a launch derives from sizes, strides, dtype and the config state (cfgs.state) is
# worked out the first time a signature runs and kept under it: a steady call then costs a key,
# its buffers and Triton's launcher. (The first GPU run measured about 1.2 ms of host time in a
# DCGAN layer's training step against 0.38 ms of kernels.)
class _Plan:
    def __init__(self, **fields):
        self.__dict__.update(fields)


_NOTHING = _Plan()             # a launch with nothing to do (an empty output)
_PLANS: dict = {}
_PLANS_MAX = 4096


def _plan(key, make, *args):
    """The plan kept under ``key``, made by ``make(*args)`` the first time."""
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[key] = make(*args)
    return plan


_TUNING = threading.Lock()   # a launch through the autotuner and the read of its choice


def _launch_planned(key, plan, kernel, *args):
    """Launch ``plan``'s kernel; a plan still on Triton's autotuner is settled after it."""
    if plan.kernel is kernel:
        launch(kernel, plan.grid, *args, **plan.kwargs)
        return
    with _TUNING:   # best_config is the autotuner's last choice: no other launch in between
        launch(plan.kernel, plan.grid, *args, **plan.kwargs)
        _settle(key, plan, kernel)


def _settle(key, plan, kernel):
    """After a launch through Triton's autotuner: the plan kept under ``key`` launches its
    choice directly from now on. The autotuner's choice for the plan's shape key cannot change,
    and its dispatch (argument dicts, key, grid function) costs host time on every call (~42
    µs a launch on the 2-core VM, triton 3.9). The grid and split keep what it ran with."""
    cfg = None if _RECORDERS else cfgs.autotuned_config(plan.kernel)
    if cfg is None:            # recorded, not run: nothing was chosen
        return
    settled = _Plan(**plan.__dict__)
    settled.grid, settled.kwargs = _with_config(plan.grid, plan.kwargs, cfg)
    settled.kernel, settled.log = kernel, (plan.log[0], "autotune", cfg)
    cfgs.config_log[plan.log[0]] = ("autotune", cfg)   # the same source: log_choice keeps None
    _PLANS[key] = settled


def _with_config(grid, kwargs, cfg):
    """A launch's grid and keyword arguments with ``cfg`` fixed (grid: a function of the
    config's meta-parameters, as Triton's autotuner calls it)."""
    meta, launch_opts = cfgs.split_launch_options(cfg)
    return grid(meta), dict(kwargs, **meta, **launch_opts)


def _contiguous_strides(shape):
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= size
    return strides[::-1]


def _check_device(t: torch.Tensor):
    if t.device.type == "cpu" and not interpreting():
        raise RuntimeError("the Triton engine needs CUDA tensors, or TRITON_INTERPRET=1 for CPU "
                           "tensors")


def _strides5(t: torch.Tensor):
    st = list(t.stride())
    return st[:2] + [0] * (5 - t.dim()) + st[2:]


def _sizes3(sizes):
    return [1] * (3 - len(sizes)) + list(sizes)


def _layout_code(t: torch.Tensor) -> int:
    return 1 if t.dim() >= 3 and t.stride(1) == 1 and t.shape[1] > 1 else 0


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its memory exactly (some permutation of a contiguous
    tensor)."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    expect = 1
    for st, sz in dims:
        if st != expect:
            return False
        expect *= sz
    return True


def _idx64(*tensors) -> bool:
    return any(t is not None and t.numel() >= 2 ** 31 for t in tensors)


# ------------------------------------------------------------------------ kernel layout
def in_kernel_layout(t: torch.Tensor, c_g: int) -> bool:
    """Whether the kernels can read ``t`` as it is: channels contiguous, each group's channels
    and every other stride a multiple of 16 elements, 16-byte aligned."""
    return (c_g % ALIGN == 0 and t.stride(1) == 1 and
            all(s % ALIGN == 0 for i, s in enumerate(t.stride()) if i != 1) and
            t.data_ptr() % 16 == 0)


def _kernel_layout_buffer(t: torch.Tensor, groups: int):
    """An empty tensor of ``t``'s logical shape in the kernel layout: [N, *spatial, groups,
    channels per group padded], seen as [N, C_padded_total, *spatial]."""
    n, c, *spatial = t.shape
    cp = _pad(c // groups)
    nd = len(spatial)
    buf = buffers.empty((n, *spatial, groups * cp), t.dtype, t.device)
    return buf.permute(0, nd + 1, *range(1, nd + 1))


def _convert_ints(t, groups, with_sums):
    """prepare_kernel's conversion sizes and strides for putting ``t`` into its kernel layout,
    and the programs that takes."""
    n, c, *spatial = t.shape
    sd, sh, sw = _sizes3(spatial)
    p, c_g, c_pad = n * sd * sh * sw, c // groups, _pad(c // groups)
    programs = triton_cdiv(p, _BLOCK_P) * groups * triton_cdiv(c_pad, _BLOCK_C)
    return (p, c_g, c_pad, groups, sd, sh, sw, *_strides5(t)), with_sums, programs


_BLOCK_P, _BLOCK_C, _BLOCK_PACK = 64, 32, 512


# ---------------------------------------------------------------------------- preparation
def _pack_key(weight, geom):
    return ("triton", tuple(weight.shape), geom.kernel, geom.stride, geom.padding,
            geom.dilation, geom.groups)


_NO_CONVERSION = ((0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0), False, 0)
_NO_PACK = _Plan(ints=(0,) * 20, programs=0, pack_fwd=False, pack_dgrad=False)


def _pack_plan(weight, geom, parts):
    """prepare_kernel's packing sizes (the ints after its tensors), the phase table and the
    programs packing takes, from the weight's sizes and strides and the geometry."""
    g = geom.groups
    c_in, c_out_g = weight.shape[:2]
    c_in_g, taps = c_in // g, math.prod(geom.kernel)
    c_src, c_dy = _pad(c_in_g), _pad(c_out_g)
    axes = _forward_plan(geom)
    rows = phase_table(axes, c_out_g)
    fwd_programs = triton_cdiv(max([c_out_g * r[3] * r[4] * r[5] * c_src for r in rows]
                                   + [1]), _BLOCK_PACK)
    dgrad_programs = triton_cdiv(max(c_in_g * taps * c_dy, 1), _BLOCK_PACK)
    pack_fwd = "fwd" in parts and weight.numel() > 0
    pack_dgrad = "dgrad" in parts and weight.numel() > 0
    programs = g * (len(rows) * fwd_programs * pack_fwd + dgrad_programs * pack_dgrad)
    ints = (c_in_g, c_out_g, c_src, c_dy, taps, *_sizes3(geom.kernel),
            *[a["JS"] for a in axes], *_strides5(weight), len(rows), g, fwd_programs,
            dgrad_programs)
    return _Plan(ints=ints, table=_table(rows, weight.device), programs=programs,
                 pack_fwd=pack_fwd, pack_dgrad=pack_dgrad,
                 fwd_shape=(g, c_out_g * taps * c_src), dgrad_shape=(g, c_in_g * taps * c_dy))


def _prepare(weight, geom, parts, convert=None):
    """One launch of prepare_kernel: the packed weights ``parts`` ("fwd": [groups, C_out/g x
    taps x C_SRC], "dgrad": [groups, C_in/g x taps x C_DY]) and, with ``convert`` ((source,
    its kernel-layout buffer, the grad_bias partial sums or None, _convert_ints)), a source put
    into the kernel layout. ``weight`` None: the conversion alone. Returns {part: tensor}."""
    from . import triton_kernels as tk
    out = {}
    if weight is None:
        anchor = convert[0]
        pack = _NO_PACK
        table = anchor
    else:
        key = ("pack", geom, weight.shape, weight.stride(), weight.device, parts)
        pack = _plan(key, _pack_plan, weight, geom, parts)
        if "fwd" in parts:
            out["fwd"] = buffers.empty(pack.fwd_shape, weight.dtype, weight.device)
        if "dgrad" in parts:
            out["dgrad"] = buffers.empty(pack.dgrad_shape, weight.dtype, weight.device)
        anchor = weight
        table = pack.table
    x, xk, sums, (conv_ints, with_sums, conv_programs) = \
        convert if convert is not None else (anchor, anchor, None, _NO_CONVERSION)
    programs = pack.programs + conv_programs
    if programs == 0:
        return out
    launch(tk.prepare_kernel, (programs,), anchor, out.get("fwd", anchor),
           out.get("dgrad", anchor), table, x, xk, sums if sums is not None else xk,
           *pack.ints, *conv_ints, PACK_FWD=pack.pack_fwd, PACK_DGRAD=pack.pack_dgrad,
           CONVERT=convert is not None, WITH_SUMS=with_sums, BLOCK=_BLOCK_PACK,
           BLOCK_P=_BLOCK_P, BLOCK_C=_BLOCK_C)
    return out


def _source(t: torch.Tensor, groups: int, with_sums: bool = False):
    """(t in the kernel layout or None if it is already there, prepare_kernel's conversion
    (see _prepare) or None, the grad_bias partial sums buffer or None)."""
    c_g = t.shape[1] // groups
    if in_kernel_layout(t, c_g) or t.numel() == 0:
        return None, None, None
    tk = _kernel_layout_buffer(t, groups)   # every element written, the padding with zeros
    key = ("convert", t.shape, t.stride(), groups, with_sums)
    ints = _plan(key, _convert_ints, t, groups, with_sums)
    parts = None
    if with_sums:
        n_pblocks = triton_cdiv(t.numel() // max(t.shape[1], 1), _BLOCK_P)
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        parts = torch.empty((n_pblocks, t.shape[1]), dtype=acc, device=t.device)
    return tk, (t, tk, parts, ints), parts


def _packed_and_source(weight, geom, parts, src, reuse: bool, with_sums=False):
    """The packed weights ``parts`` and ``src`` in the kernel layout, in at most one launch.
    ``reuse``: packs may come from (and go to) the per-version cache (weight_cache)."""
    key = _pack_key(weight, geom)
    src_k, conv, sums = _source(src, geom.groups, with_sums) if src is not None else \
        (None, None, None)
    have = weight_cache.lookup(weight, key, parts) if reuse else None
    if have is not None or not parts:
        if conv is not None:
            _prepare(None, geom, (), conv)
        return have or {}, src_k, sums
    made = _prepare(weight, geom, parts, conv)
    if reuse:
        weight_cache.store(weight, key, made)
    return made, src_k, sums


# ----------------------------------------------------------------------------- the GEMMs
def _split_plan(m_max, c_dst_g, n_phases, groups, c_src, taps, cfg, device):
    """(splits, source channels per split) for a forward / grad_input GEMM. Split the reduction
    over source channels (in multiples of 64, so that the split does not depend on the tile)
    only for the small-M, deep-K layers (DCGAN's and pix2pix's few-pixel layers: at most two
    row tiles) whose tiles leave most of the GPU idle: their fp32 partial sums are small, so the
    second launch costs less than the idle SMs would."""
    m_tiles = triton_cdiv(m_max, cfg["BLOCK_M"])
    tiles = m_tiles * triton_cdiv(c_dst_g, cfg["BLOCK_N"]) * n_phases * groups
    sms = cfgs.sm_count(device)
    if _SPLIT_OVERRIDE:
        want = _SPLIT_OVERRIDE[-1]
    elif m_tiles > 2 or tiles * 2 >= sms or c_src * taps < 1024:
        return 1, c_src
    else:
        want = triton_cdiv(2 * sms, tiles)
    per = max(64, triton_cdiv(triton_cdiv(c_src, want), 64) * 64)
    return triton_cdiv(c_src, per), per


_SPLIT_OVERRIDE: list = []   # tests: force a number of splits


def _run_conv(src, wp, bias, dst, pre, axes, geom, c_src, c_dst_g, act: Activation, kind):
    """Forward (kind "fwd") or grad_input ("dgrad"), ``src`` in the kernel layout with ``c_src``
    channels per group: one launch over every phase, two where the reduction is split."""
    from . import triton_kernels as tk
    key = (kind, geom, c_src, c_dst_g, src.shape, src.stride(), wp.numel(), dst.shape,
           dst.stride(), None if pre is None else (pre.shape, pre.stride()), bias is not None, act,
           src.dtype, src.device, cfgs.state(src.dtype), tuple(_SPLIT_OVERRIDE))
    plan = _plan(key, _conv_plan, src, wp, bias, dst, pre, axes, geom, c_src, c_dst_g, act,
                 kind)
    if plan is _NOTHING:
        return
    ws = None
    if plan.splits > 1:   # [splits, N, *spatial, C] fp32 partial sums
        ws = torch.empty(plan.ws_shape, dtype=plan.acc, device=src.device)
    cfgs.log_choice(*plan.log)
    _launch_planned(key, plan, tk.conv_phase_kernel, src, wp,
                    bias if bias is not None else wp, dst, pre if pre is not None else dst,
                    ws if ws is not None else dst, plan.table, *plan.ints)
    if ws is not None:
        launch(tk.split_epilogue_kernel, plan.epilogue_grid, ws,
               bias if bias is not None else ws, dst, pre if pre is not None else dst,
               *plan.epilogue_ints, **plan.epilogue_kwargs)


def _conv_plan(src, wp, bias, dst, pre, axes, geom, c_src, c_dst_g, act, kind):
    """_run_conv's launches, worked out from the sizes, strides and config state (its key)."""
    import triton
    from . import triton_kernels as tk
    rows = phase_table(axes, c_dst_g)
    n = src.shape[0]
    m_max = n * max(r[0] * r[1] * r[2] for r in rows) if rows else 0
    if dst.numel() == 0 or m_max == 0:
        return _NOTHING
    dtype = src.dtype
    taps = max(r[3] * r[4] * r[5] for r in rows)
    layout = _layout_code(dst)
    device = src.device
    log = cfgs.choose(kind, m_max, c_src, c_dst_g, dtype, taps, layout, device)
    cfg = log[2]
    nominal = cfg or cfgs.heuristic_config(kind, m_max, c_src, c_dst_g, dtype, layout)
    splits, c_per_split = _split_plan(m_max, c_dst_g, len(rows), geom.groups, c_src, taps,
                                      nominal, device)
    ws_shape = (splits, n, *dst.shape[2:], dst.shape[1])
    st = _contiguous_strides(ws_shape)
    sws = [0] * 5 if splits == 1 else st[:2] + [0] * (4 - (len(ws_shape) - 2)) + st[2:-1]
    sx, sy = _strides5(src), _strides5(dst)
    sp = _strides5(pre) if pre is not None else sy
    taps_total = sum(r[3] * r[4] * r[5] for r in rows)
    ints = (n, c_src, c_dst_g,
            *[a["L"] for a in axes], *[a["A"] for a in axes], *[a["S"] for a in axes],
            *[a["STEP"] for a in axes], sx[0], *sx[2:], *sy, *sp, *sws[1:], sws[0], taps_total,
            float(act.param), m_max, len(rows), c_per_split,
            cfgs.bucket(c_src), cfgs.bucket(c_dst_g), taps, cfgs.m_bucket(m_max), layout)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    pixel_major = dst.dim() >= 3 and dst.stride(1) != 1
    kwargs = dict(ACT=act.code, HAS_BIAS=bias is not None, HAS_PRE=pre is not None,
                  ACC_FP64=dtype == torch.float64,
                  UPCAST=interpreting() and dtype == torch.bfloat16,
                  PRECISION=cfgs.precision(dtype), SPLIT=splits > 1,
                  PIXEL_MAJOR_OUT=pixel_major,
                  IDX64=_idx64(src, wp, dst, pre) or (splits > 1 and
                                                      math.prod(ws_shape) >= 2 ** 31))
    n_rows = len(rows)

    def grid(meta):
        return (triton.cdiv(m_max, meta["BLOCK_M"]) * triton.cdiv(c_dst_g, meta["BLOCK_N"])
                * n_rows, splits, geom.groups)

    if cfg is None:
        kernel = cfgs.tuned_kernel(kind)
    else:
        kernel = tk.conv_phase_kernel
        grid, kwargs = _with_config(grid, kwargs, cfg)
    plan = _Plan(kernel=kernel, grid=grid, table=_table(rows, device), ints=ints,
                 kwargs=kwargs, log=log, splits=splits, ws_shape=ws_shape, acc=acc)
    if splits > 1:
        block = 1024
        numel = math.prod(ws_shape[1:])
        plan.epilogue_grid = (triton.cdiv(numel, block),)
        plan.epilogue_ints = (numel, dst.shape[1], *_sizes3(dst.shape[2:]), splits, *sy, *sp,
                              float(act.param))
        plan.epilogue_kwargs = dict(ACT=act.code, HAS_BIAS=bias is not None,
                                    HAS_PRE=pre is not None, ACC_FP64=dtype == torch.float64,
                                    BLOCK=block)
    return plan


def forward(x, weight, bias, geom: Geometry, act: Activation, keep_pre: bool, state=None):
    """``state`` None (a pass that records no graph): the weight packed by an earlier call is
    reused while the weight is unchanged (weight_cache). Else the weight is packed afresh, for
    grad_input too when the input requires grad, and that pack and the input in the kernel
    layout are left in ``state`` for this pass's backward."""
    _check_device(x)
    g = geom.groups
    shape = (x.shape[0], weight.shape[1] * g, *geom.out_size)
    fmt = buffers.output_memory_format(geom.ndim, x, weight)
    out = buffers.empty(shape, x.dtype, x.device, fmt)
    pre = buffers.empty(shape, x.dtype, x.device, fmt) if keep_pre else None
    training = state is not None
    parts = ("fwd", "dgrad") if training and x.requires_grad else ("fwd",)
    packs, xk, _ = _packed_and_source(weight, geom, parts, x, reuse=not training)
    if training:
        state["dgrad"] = packs.get("dgrad")
        state["x_kernel"] = xk
    _run_conv(x if xk is None else xk, packs["fwd"], bias, out, pre, _forward_plan(geom), geom,
              _pad(x.shape[1] // g), weight.shape[1], act, "fwd")
    return out, pre


def _grad_input_with(grad_k, wp, weight, geom, fmt, like=None):
    """dx (memory format ``fmt``, or the strides of ``like``, the input, where it is dense:
    autograd then takes it as the input's gradient without a copy) from grad_out in the kernel
    layout and the packed weight."""
    g = geom.groups
    shape = (grad_k.shape[0], weight.shape[0], *geom.in_size)
    if like is not None and like.shape == shape and _dense(like):
        dx = buffers.empty_strided(shape, like.stride(), grad_k.dtype, grad_k.device)
    else:
        dx = buffers.empty(shape, grad_k.dtype, grad_k.device, fmt)
    _run_conv(grad_k, wp, None, dx, None, _grad_input_plan(geom), geom, _pad(weight.shape[1]),
              weight.shape[0] // g, Activation(), "dgrad")
    return dx


def grad_input(grad, weight, geom: Geometry, state=None):
    """One launch with the weight packed by the forward (``state``) and grad_out in the kernel
    layout; one more for either."""
    _check_device(grad)
    wp = (state or {}).get("dgrad")
    packs, gk, _ = _packed_and_source(weight, geom, () if wp is not None else ("dgrad",), grad,
                                      reuse=False)
    return _grad_input_with(grad if gk is None else gk,
                            wp if wp is not None else packs["dgrad"], weight, geom,
                            buffers.output_memory_format(geom.ndim, grad, weight))


WGRAD_SPLIT_ALIGN = 64   # grad_weight's pixel slices are multiples of this (any BLOCK_K divides it)


def wgrad_splits(m_max: int, tiles: int, block_k: int, device: torch.device) -> int:
    """How many slices the pixel reduction of grad_weight is cut into, so that the GPU is full
    (about 4 programs per SM); 1 where the tiles alone fill it (then no workspace, no sum)."""
    target = 4 * cfgs.sm_count(device)
    return max(1, min(triton_cdiv(target, max(1, tiles)), triton_cdiv(m_max, 4 * block_k), 64))


def _grad_weight_with(xk, gk, weight_shape, geom, dtype, parts=None, db=None):
    """dW from x and grad_out in the kernel layout; with ``parts``, db summed from them too."""
    from . import triton_kernels as tk
    dw = buffers.empty(tuple(weight_shape), dtype, xk.device)
    if dw.numel() == 0 and db is None:
        return dw
    key = ("wgrad", geom, tuple(weight_shape), xk.shape, xk.stride(), gk.shape, gk.stride(),
           None if parts is None else parts.shape, db is not None, dtype, xk.device,
           cfgs.state(dtype))
    plan = _plan(key, _wgrad_plan, xk, gk, dw, geom, dtype, parts, db)
    out = dw if plan.splits == 1 else buffers.empty(plan.ws_shape, plan.acc, xk.device)
    cfgs.log_choice(*plan.log)
    _launch_planned(key, plan, tk.wgrad_phase_kernel, xk, gk, out, plan.table,
                    parts if parts is not None else out, db if db is not None else out,
                    *plan.ints)
    if plan.splits > 1:
        launch(tk.sum_splits_kernel, plan.sum_grid, out, dw, dw.numel(), plan.splits,
               ACC_FP64=dtype == torch.float64, BLOCK=plan.sum_block)
    return dw


def _wgrad_plan(xk, gk, dw, geom, dtype, parts, db):
    """_grad_weight_with's launches, worked out from the sizes, strides and config state."""
    import triton
    from . import triton_kernels as tk
    g = geom.groups
    weight_shape = tuple(dw.shape)
    c_in, c_out_g = weight_shape[0], weight_shape[1]
    c_in_g = c_in // g
    c_src, c_dy = _pad(c_in_g), _pad(c_out_g)
    axes = _forward_plan(geom)
    rows = phase_table(axes, c_out_g)
    n = xk.shape[0]
    m_max = n * max(r[0] * r[1] * r[2] for r in rows)
    taps = max(r[3] * r[4] * r[5] for r in rows)
    layout = 1
    device = xk.device
    log = cfgs.choose("wgrad", m_max, c_src, c_out_g, dtype, taps, layout, device)
    cfg = log[2]
    nominal = cfg or cfgs.heuristic_config("wgrad", m_max, c_src, c_out_g, dtype)
    kp_max = taps * c_src
    tiles = triton.cdiv(kp_max, nominal["BLOCK_M"]) * triton.cdiv(c_out_g, nominal["BLOCK_N"])
    splits = wgrad_splits(m_max, tiles * len(rows) * g, nominal["BLOCK_K"], device)
    per_split = triton.cdiv(triton.cdiv(max(m_max, 1), splits), WGRAD_SPLIT_ALIGN) \
        * WGRAD_SPLIT_ALIGN
    splits = max(1, triton.cdiv(m_max, per_split))
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ws_shape = (splits, *weight_shape)
    c_total = c_out_g * g
    sx, sy = _strides5(xk), _strides5(gk)
    ints = (n, c_src, c_in_g, c_dy, c_out_g,
            *[a["L"] for a in axes], *[a["S"] for a in axes], *[a["STEP"] for a in axes],
            *[a["JS"] for a in axes], sx[0], *sx[2:], sy[0], *sy[2:],
            _contiguous_strides(ws_shape)[0] if splits > 1 else 0, *_strides5(dw), splits,
            per_split, len(rows), parts.shape[0] if parts is not None else 0, c_total,
            cfgs.bucket(c_src), cfgs.bucket(c_out_g), taps, cfgs.m_bucket(m_max), layout)
    kwargs = dict(ACC_FP64=dtype == torch.float64,
                  UPCAST=interpreting() and dtype == torch.bfloat16,
                  PRECISION=cfgs.precision(dtype),
                  IDX64=_idx64(xk, gk, dw) or (splits > 1 and math.prod(ws_shape) >= 2 ** 31),
                  BIAS_PARTS=db is not None)
    n_rows, has_db = len(rows), db is not None   # the grid keeps no tensor alive

    def grid(meta):
        tiles = triton.cdiv(kp_max, meta["BLOCK_M"]) * triton.cdiv(c_out_g, meta["BLOCK_N"])
        if has_db:
            tiles = max(tiles, triton.cdiv(c_total, meta["BLOCK_N"]))
        return (tiles, n_rows + has_db, g * splits)

    if cfg is None:
        kernel = cfgs.tuned_kernel("wgrad")
    else:
        kernel = tk.wgrad_phase_kernel
        grid, kwargs = _with_config(grid, kwargs, cfg)
    block = 1024
    return _Plan(kernel=kernel, grid=grid, table=_table(rows, device), ints=ints,
                 kwargs=kwargs, log=log, splits=splits, ws_shape=ws_shape, acc=acc_dtype,
                 sum_block=block, sum_grid=(triton.cdiv(dw.numel(), block),))


def grad_weight(x, grad, weight_shape, geom: Geometry, dtype, state=None):
    """dW in one launch, written in its own layout; two where the pixel reduction is split, one
    more for each of x and grad_out not in the kernel layout."""
    _check_device(x)
    xk = (state or {}).get("x_kernel")
    if xk is None:
        xk = _source_now(x, geom)
    return _grad_weight_with(xk, _source_now(grad, geom), weight_shape, geom, dtype)


def _source_now(t, geom):
    """``t`` in the kernel layout (one launch where it is not already)."""
    tk, conv, _ = _source(t, geom.groups)
    if conv is not None:
        _prepare(None, geom, (), conv)
    return t if tk is None else tk


def joint_backward(grad, x, weight, geom: Geometry, need_dx: bool, need_dw: bool,
                   need_db: bool, state=None):
    """grad_input, grad_weight and grad_bias (None where not needed) with grad_out put in the
    kernel layout once (that pass also sums grad_bias, which grad_weight's launch adds up), the
    weight packed by the forward and x as the forward left it in ``state``."""
    _check_device(grad)
    state = state or {}
    wp = state.get("dgrad")
    want = ("dgrad",) if need_dx and wp is None else ()
    packs, gk, sums = _packed_and_source(weight, geom, want, grad, reuse=False,
                                         with_sums=need_db and need_dw)
    if wp is None:
        wp = packs.get("dgrad")
    grad_k = grad if gk is None else gk
    dx = dw = db = None
    if need_dx:
        dx = _grad_input_with(grad_k, wp, weight, geom,
                              buffers.output_memory_format(geom.ndim, grad, weight), like=x)
    if need_db and sums is not None:
        db = buffers.empty((grad.shape[1],), grad.dtype, grad.device)
    if need_dw:
        xk = state.get("x_kernel")
        if xk is None:
            xk = _source_now(x, geom)
        dw = _grad_weight_with(xk, grad_k, tuple(weight.shape), geom, x.dtype, sums, db)
    if need_db and db is None:
        db = grad.sum([0] + list(range(2, grad.dim())))
    return dx, dw, db
