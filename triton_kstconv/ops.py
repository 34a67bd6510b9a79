"""Operator registration and autograd: four ``torch.library`` custom ops and their glue.

* ``kstconv::conv_transpose``              y = act(conv_transpose(x, w) + b), and the value before
                                           the activation where its derivative needs it
* ``kstconv::conv_transpose_backward``     dL/dx, dL/dw, dL/db of that op together (the engine's
                                           one-pass backward where it has one)
* ``kstconv::conv_transpose_grad_input``   dL/dx, an ordinary strided convolution of grad_out
* ``kstconv::conv_transpose_grad_weight``  dL/dw, per-phase correlations of x with grad_out

Each has a fake (meta) implementation, so ``torch.compile`` traces through them, and an autograd
formula written with the others, so first and second derivatives work. Every op takes the
engine by name (``"cpp"``, ``"torch"``, ``"triton"``); ``functional`` picks it.
"""
from __future__ import annotations

import contextlib
import functools
from typing import List, Optional

import torch
from torch import Tensor

from . import engines, epilogue
from .buffers import output_memory_format
from .epilogue import Activation
from .geometry import Geometry, make_geometry, normalize_params

def engine(name: str):
    """The engine for a registry name or device default (engines.get)."""
    return engines.get(name)


def geometry_of(in_size, kernel, stride, padding, output_padding, groups, dilation) -> Geometry:
    args = (tuple(in_size), tuple(kernel), tuple(stride), tuple(padding), tuple(output_padding),
            groups, tuple(dilation))
    if all(type(v) is int for v in args[0] + args[1]):
        return _geometry(*args)
    return _geometry.__wrapped__(*args)   # symbolic sizes (tracing): not hashable, not cached


@functools.lru_cache(maxsize=4096)
def _geometry(in_size, kernel, stride, padding, output_padding, groups, dilation) -> Geometry:
    params = normalize_params(len(in_size), stride, padding, output_padding, groups, dilation)
    return make_geometry(params, in_size, kernel)


def _empty(shape, like: Tensor, fmt) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device).contiguous(memory_format=fmt)


# ------------------------------------------------------------ implementations (ops and eager)
def _forward_impl(x, weight, bias, conv, act: Activation, keep_pre, backend, state):
    """``state``: None for a pass that records no graph (the engine may reuse a packed weight
    across calls, weight_cache.py), else a dict that the engine fills with what this pass's
    own backward may reuse (the weight packed for grad_input, made with the forward's pack).
    Returns ``(out, pre)``, ``pre`` None unless ``keep_pre``."""
    geom = geometry_of(x.shape[2:], weight.shape[2:], *conv)
    out, pre = engine(backend).forward(x, weight, bias, geom, act, keep_pre, state)
    fmt = output_memory_format(geom.ndim, x, weight)
    out = out.contiguous(memory_format=fmt)
    return out, (pre.contiguous(memory_format=fmt) if keep_pre else None)


def _grad_input_impl(grad, weight, in_size, conv, backend, state=None):
    geom = geometry_of(in_size, weight.shape[2:], *conv)
    dx = engine(backend).grad_input(grad, weight, geom, state)
    return dx.contiguous(memory_format=output_memory_format(geom.ndim, grad, weight))


def _grad_weight_impl(x, grad, weight_size, conv, backend):
    geom = geometry_of(x.shape[2:], weight_size[2:], *conv)
    return engine(backend).grad_weight(x, grad, list(weight_size), geom, x.dtype).contiguous()


def _backward(ctx, grad_out, grad_pre, differentiable: bool):
    """Shared backward of the forward op: the activation's derivative, then grad_input,
    grad_weight and grad_bias as needed. ``differentiable``: through the registered ops (so
    that a second derivative exists), else straight to the engine."""
    x, weight, out, pre = ctx.saved_tensors
    grad = epilogue.backward(grad_out, out, pre, ctx.act)
    if grad_pre is not None and grad_pre.numel():
        grad = grad + grad_pre
    need = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
            bool(ctx.has_bias and ctx.needs_input_grad[2])]
    if differentiable:
        dx, dw, db = conv_transpose_backward(grad, x, weight, *ctx.conv, ctx.backend, need)
    else:
        dx, dw, db = _backward_impl(grad, x, weight, ctx.conv, ctx.backend, need,
                                    getattr(ctx, "state", None), exact_layout=False)
    return tuple(t if wanted else None for t, wanted in zip((dx, dw, db), need))


def _backward_impl(grad, x, weight, conv, backend, need, state=None, exact_layout=True):
    """grad_input, grad_weight, grad_bias (None where not needed): in one pass over grad_out
    where the engine has a joint backward for the layer, else in separate passes. ``state``:
    what the forward left for its backward (see _forward_impl), if any. ``exact_layout``:
    grad_input in PyTorch's layout rule (what the registered op's fake declares); else the
    engine's choice stands (the input's own strides, so that autograd takes it uncopied)."""
    joint = getattr(engine(backend), "joint_backward", None)
    if joint is not None and (need[0] or need[1]):
        got = joint(grad, x, weight, geometry_of(x.shape[2:], weight.shape[2:], *conv), *need,
                    state=state)
        if got is not None:
            dx, dw, db = got
            if dx is not None and exact_layout:
                dx = dx.contiguous(memory_format=output_memory_format(x.dim() - 2, grad, weight))
            return dx, dw.contiguous() if dw is not None else None, db
    dx = _grad_input_impl(grad, weight, list(x.shape[2:]), conv, backend, state) \
        if need[0] else None
    dw = _grad_weight_impl(x, grad, list(weight.shape), conv, backend) if need[1] else None
    db = grad.sum([0] + list(range(2, grad.dim()))) if need[2] else None
    return dx, dw, db


def _save(ctx, x, weight, bias, conv, act: Activation, backend, out, pre, keep_pre):
    ctx.conv = conv
    ctx.act = act
    ctx.backend = backend
    ctx.in_size = list(x.shape[2:])
    ctx.weight_size = list(weight.shape)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, out if act.name else None, pre if keep_pre else None)


class _EagerConvTranspose(torch.autograd.Function):
    """The eager path: the same engines without the custom-op dispatch (a third of the
    per-call overhead of a small layer). A second derivative goes through the registered ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv, act, keep_pre, backend):
        ctx.state = {}
        out, pre = _forward_impl(x, weight, bias, conv, act, keep_pre, backend, ctx.state)
        _save(ctx, x, weight, bias, conv, act, backend, out, pre, keep_pre)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with _named("kstconv::conv_transpose_backward"):
            dx, dw, db = _backward(ctx, grad_out, None, differentiable=torch.is_grad_enabled())
        return dx, dw, db, None, None, None, None


_NOT_PROFILING = contextlib.nullcontext()


def _named(name: str):
    """A range named ``name`` while torch.profiler records (the eager path bypasses the
    dispatcher, which would otherwise name it in a profiled model's tables), else nothing."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return _NOT_PROFILING


def conv_transpose_eager(x, weight, bias, conv, act: Activation, keep_pre, backend,
                         records_graph: bool):
    """Eager: through the autograd Function where a graph is recorded (``records_graph``: grad
    mode on and an argument that requires grad), else straight to the engine (which may then
    reuse the weight packed by an earlier call)."""
    with _named("kstconv::conv_transpose"):
        if records_graph:
            return _EagerConvTranspose.apply(x, weight, bias, conv, act, keep_pre, backend)
        return _forward_impl(x, weight, bias, conv, act, False, backend, None)[0]


# ------------------------------------------------------------------------------------ forward
@torch.library.custom_op("kstconv::conv_transpose", mutates_args=())
def conv_transpose(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
                   padding: List[int], output_padding: List[int], groups: int,
                   dilation: List[int], act: str, act_param: float, keep_pre: bool,
                   backend: str, reuse_packed: bool) -> tuple[Tensor, Tensor]:
    """``reuse_packed``: the pass records no graph, so the engine may reuse a weight packed by
    an earlier call (weight_cache.py)."""
    conv = (stride, padding, output_padding, groups, dilation)
    out, pre = _forward_impl(x, weight, bias, conv, Activation(act or None, act_param), keep_pre,
                             backend, None if reuse_packed else {})
    return out, (pre if keep_pre else x.new_empty(0))


@conv_transpose.register_fake
def _(x, weight, bias, stride, padding, output_padding, groups, dilation, act, act_param,
      keep_pre, backend, reuse_packed):
    nd = weight.dim() - 2
    geom = geometry_of(x.shape[2:], weight.shape[2:], stride, padding, output_padding, groups,
                       dilation)
    shape = (x.shape[0], weight.shape[1] * groups, *geom.out_size)
    fmt = output_memory_format(nd, x, weight)
    return _empty(shape, x, fmt), (_empty(shape, x, fmt) if keep_pre else x.new_empty(0))


# ------------------------------------------------------------------------------- grad_input
@torch.library.custom_op("kstconv::conv_transpose_grad_input", mutates_args=())
def conv_transpose_grad_input(grad: Tensor, weight: Tensor, in_size: List[int], stride: List[int],
                              padding: List[int], output_padding: List[int], groups: int,
                              dilation: List[int], backend: str) -> Tensor:
    return _grad_input_impl(grad, weight, in_size,
                            (stride, padding, output_padding, groups, dilation), backend)


@conv_transpose_grad_input.register_fake
def _(grad, weight, in_size, stride, padding, output_padding, groups, dilation, backend):
    fmt = output_memory_format(weight.dim() - 2, grad, weight)
    return _empty((grad.shape[0], weight.shape[0], *in_size), grad, fmt)


# ------------------------------------------------------------------------------ grad_weight
@torch.library.custom_op("kstconv::conv_transpose_grad_weight", mutates_args=())
def conv_transpose_grad_weight(x: Tensor, grad: Tensor, weight_size: List[int],
                               stride: List[int], padding: List[int], output_padding: List[int],
                               groups: int, dilation: List[int], backend: str) -> Tensor:
    return _grad_weight_impl(x, grad, weight_size,
                             (stride, padding, output_padding, groups, dilation), backend)


@conv_transpose_grad_weight.register_fake
def _(x, grad, weight_size, stride, padding, output_padding, groups, dilation, backend):
    return x.new_empty(weight_size)


# ------------------------------------------------------------------------ joint backward
@torch.library.custom_op("kstconv::conv_transpose_backward", mutates_args=())
def conv_transpose_backward(grad: Tensor, x: Tensor, weight: Tensor, stride: List[int],
                            padding: List[int], output_padding: List[int], groups: int,
                            dilation: List[int], backend: str, output_mask: List[bool]
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """grad_input, grad_weight, grad_bias of the forward op (empty where ``output_mask`` says
    not needed): the engine's one-pass backward where it has one, else the separate passes."""
    conv = (stride, padding, output_padding, groups, dilation)
    out = _backward_impl(grad, x, weight, conv, backend, output_mask)
    return tuple(t if t is not None else grad.new_empty(0) for t in out)


@conv_transpose_backward.register_fake
def _(grad, x, weight, stride, padding, output_padding, groups, dilation, backend, output_mask):
    fmt = output_memory_format(x.dim() - 2, grad, weight)
    return (_empty(x.shape, grad, fmt) if output_mask[0] else grad.new_empty(0),
            weight.new_empty(weight.shape) if output_mask[1] else grad.new_empty(0),
            grad.new_empty(grad.shape[1]) if output_mask[2] else grad.new_empty(0))


def _bw_setup(ctx, inputs, output):
    grad, x, weight, stride, padding, output_padding, groups, dilation, backend, mask = inputs
    ctx.conv = (list(stride), list(padding), list(output_padding), groups, list(dilation))
    ctx.backend = backend
    ctx.mask = list(mask)
    ctx.save_for_backward(grad, x, weight)


def _bw_backward(ctx, vdx, vdw, vdb):
    # dx = GI(g, w), dw = GW(x, g), db = sum(g): all linear in g; dx in w, dw in x
    grad, x, weight = ctx.saved_tensors
    dg = dx = dw = None
    if ctx.needs_input_grad[0]:
        parts = []
        if ctx.mask[0]:
            parts.append(_plain_forward(vdx, weight, ctx.conv, ctx.backend))
        if ctx.mask[1]:
            parts.append(_plain_forward(x, vdw, ctx.conv, ctx.backend))
        if ctx.mask[2]:
            parts.append(vdb.view(1, -1, *([1] * (grad.dim() - 2))).expand_as(grad))
        dg = sum(parts[1:], parts[0]) if parts else torch.zeros_like(grad)
    if ctx.needs_input_grad[1] and ctx.mask[1]:
        dx = conv_transpose_grad_input(grad, vdw, list(x.shape[2:]), *ctx.conv, ctx.backend)
    if ctx.needs_input_grad[2] and ctx.mask[0]:
        dw = conv_transpose_grad_weight(vdx, grad, list(weight.shape), *ctx.conv, ctx.backend)
    return dg, dx, dw, None, None, None, None, None, None, None


conv_transpose_backward.register_autograd(_bw_backward, setup_context=_bw_setup)


# ------------------------------------------------------------------------------- autograd
def _fwd_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, output_padding, groups, dilation, act, act_param, \
        keep_pre, backend, _ = inputs
    out, pre = output
    conv = (list(stride), list(padding), list(output_padding), groups, list(dilation))
    _save(ctx, x, weight, bias, conv, Activation(act or None, act_param), backend, out, pre,
          keep_pre)


def _fwd_backward(ctx, grad_out, grad_pre):
    return _backward(ctx, grad_out, grad_pre, differentiable=True) + (None,) * 10


conv_transpose.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def _plain_forward(x, weight, conv, backend):
    """conv_transpose without bias or activation (for the second derivatives)."""
    return conv_transpose(x, weight, None, *conv, "", 0.0, False, backend, False)[0]


def _gi_setup(ctx, inputs, output):
    grad, weight, in_size, stride, padding, output_padding, groups, dilation, backend = inputs
    ctx.conv = (list(stride), list(padding), list(output_padding), groups, list(dilation))
    ctx.backend = backend
    ctx.weight_size = list(weight.shape)
    ctx.save_for_backward(grad, weight)


def _gi_backward(ctx, v):
    # <v, GI(g, w)> = <g, conv_transpose(v, w)>
    grad, weight = ctx.saved_tensors
    dg = dw = None
    if ctx.needs_input_grad[0]:
        dg = _plain_forward(v, weight, ctx.conv, ctx.backend)
    if ctx.needs_input_grad[1]:
        dw = conv_transpose_grad_weight(v, grad, ctx.weight_size, *ctx.conv, ctx.backend)
    return dg, dw, None, None, None, None, None, None, None


conv_transpose_grad_input.register_autograd(_gi_backward, setup_context=_gi_setup)


def _gw_setup(ctx, inputs, output):
    x, grad, weight_size, stride, padding, output_padding, groups, dilation, backend = inputs
    ctx.conv = (list(stride), list(padding), list(output_padding), groups, list(dilation))
    ctx.backend = backend
    ctx.in_size = list(x.shape[2:])
    ctx.save_for_backward(x, grad)


def _gw_backward(ctx, v):
    # <v, GW(x, g)> = <g, conv_transpose(x, v)>
    x, grad = ctx.saved_tensors
    dx = dg = None
    if ctx.needs_input_grad[0]:
        dx = conv_transpose_grad_input(grad, v, ctx.in_size, *ctx.conv, ctx.backend)
    if ctx.needs_input_grad[1]:
        dg = _plain_forward(x, v, ctx.conv, ctx.backend)
    return dx, dg, None, None, None, None, None, None, None


conv_transpose_grad_weight.register_autograd(_gw_backward, setup_context=_gw_setup)
