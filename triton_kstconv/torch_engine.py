"""The pure-PyTorch segregated engine: each output phase is a stride-1 convolution of the real
input with its (flipped) sub-kernel, written into its strided slice of the output.

It needs no compiler and runs on any device, so it is the fallback where the C++ engine cannot be
built and a readable statement of the method. Forward, grad_input and grad_weight follow the same
per-phase decomposition (grad_input as the adjoint: an ordinary strided convolution of grad_out).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from . import buffers, epilogue
from .geometry import AxisPhase, Geometry, Phase

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def load():
    """Nothing to build or import: this engine runs wherever PyTorch does."""
    return True


def _conv_weight(w: torch.Tensor, groups: int) -> torch.Tensor:
    """ConvTranspose layout [C_in, C_out/g, *k] -> Conv layout [C_out, C_in/g, *k]."""
    c_in, c_out_g = w.shape[:2]
    w = w.reshape(groups, c_in // groups, c_out_g, *w.shape[2:]).transpose(1, 2)
    return w.reshape(groups * c_out_g, c_in // groups, *w.shape[3:])


def _from_conv_weight(wc: torch.Tensor, groups: int) -> torch.Tensor:
    c_out, c_in_g = wc.shape[:2]
    w = wc.reshape(groups, c_out // groups, c_in_g, *wc.shape[2:]).transpose(1, 2)
    return w.reshape(groups * c_in_g, c_out // groups, *wc.shape[2:])


def _step(ap: AxisPhase) -> int:
    return ap.offsets[0] - ap.offsets[1] if ap.num_taps > 1 else 1


def _phase_input(x: torch.Tensor, phase: Phase, in_size) -> torch.Tensor:
    """The input padded (or cropped) so that a valid stride-1 convolution yields exactly the
    phase's outputs: position q reads q + offsets[t]."""
    pads = []
    for ap, L in zip(reversed(phase.axes), reversed(in_size)):
        lo, hi = ap.offsets[-1], ap.offsets[0]
        pads += [-lo, (ap.num_out - 1 + hi) - (L - 1)]
    return F.pad(x, pads)


def _phase_slices(phase: Phase):
    return (Ellipsis,) + tuple(slice(ap.residue, None, ap.stride) for ap in phase.axes)


@functools.lru_cache(maxsize=1024)
def _cached_taps(taps: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(taps, dtype=torch.long, device=device)


def _taps(taps: tuple, like: torch.Tensor) -> torch.Tensor:
    """A phase's tap indices on ``like``'s device, made once per device (no host copy per call).
    Tracing with fake tensors (make_fx) makes its own: a kept real tensor cannot mix with fake
    ones, and a fake one must not be kept for the real calls after the trace."""
    if is_fake(like):
        return torch.tensor(taps, dtype=torch.long, device=like.device)
    return _cached_taps(taps, like.device)


def _sub_kernel(weight: torch.Tensor, phase: Phase) -> torch.Tensor:
    sub = weight
    for ax, ap in enumerate(phase.axes):
        sub = sub.index_select(2 + ax, _taps(ap.taps, weight))
    return sub.flip(list(range(2, 2 + len(phase.axes))))


def forward(x, weight, bias, geom: Geometry, act: epilogue.Activation, keep_pre: bool,
            state=None):
    nd, g = geom.ndim, geom.groups
    shape = (x.shape[0], weight.shape[1] * g, *geom.out_size)
    fmt = buffers.output_memory_format(nd, x, weight)
    out = buffers.empty(shape, x.dtype, x.device, fmt)
    if out.numel() == 0:
        return out, (out if keep_pre else None)
    for phase in geom.phases():
        if phase.num_out == 0:
            continue
        if phase.num_taps == 0:   # no tap meets these outputs: bias only
            out[_phase_slices(phase)] = 0
            continue
        wc = _conv_weight(_sub_kernel(weight, phase), g)
        dil = tuple(_step(ap) for ap in phase.axes)
        out[_phase_slices(phase)] = _CONV[nd](_phase_input(x, phase, geom.in_size), wc, None, 1,
                                              0, dil, g)
    if bias is not None:
        out += bias.reshape(1, -1, *([1] * nd))
    pre = out if keep_pre else None
    return epilogue.apply(out, act), pre


def grad_input(grad, weight, geom: Geometry, state=None):
    nd = geom.ndim
    if grad.numel() == 0:
        return grad.new_zeros(grad.shape[0], weight.shape[0], *geom.in_size)
    dx = _CONV[nd](grad, weight, None, geom.stride, geom.padding, geom.dilation, geom.groups)
    return dx[(Ellipsis,) + tuple(slice(0, L) for L in geom.in_size)]


def grad_weight(x, grad, weight_shape, geom: Geometry, dtype):
    nd, g = geom.ndim, geom.groups
    dw = torch.zeros(weight_shape, dtype=dtype, device=x.device)
    if x.numel() == 0 or grad.numel() == 0:
        return dw
    for phase in geom.phases():
        if phase.num_out == 0 or phase.num_taps == 0:
            continue
        xp = _phase_input(x, phase, geom.in_size)
        gph = grad[_phase_slices(phase)]
        dil = tuple(_step(ap) for ap in phase.axes)
        wc_shape = (weight_shape[1] * g, weight_shape[0] // g, *(ap.num_taps for ap in phase.axes))
        wc = torch.empty(wc_shape, dtype=x.dtype, device=x.device)
        gwc = torch.ops.aten.convolution_backward(
            gph.contiguous(), xp, wc, None, [1] * nd, [0] * nd, list(dil), False, [0] * nd, g,
            [False, True, False])[1]
        sub = _from_conv_weight(gwc, g).flip(list(range(2, 2 + nd)))
        idx = torch.meshgrid(*[_taps(ap.taps, x) for ap in phase.axes], indexing="ij")
        dw[(slice(None), slice(None)) + tuple(idx)] = sub
    return dw
