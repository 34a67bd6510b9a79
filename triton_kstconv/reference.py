"""The conventional transposed convolution (the paper's baseline): insert ``stride - 1`` zeros
between input elements, pad, and run a stride-1 convolution with the flipped kernel.

It multiplies and stores every inserted zero (about ``stride**d`` times the useful work), which is
exactly what kernel segregation avoids. Used by the tests as an independent reference and by the
benchmarks as the baseline. Differentiable through PyTorch autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .geometry import ConvParams, make_geometry, normalize_params

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def zero_insert(x: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """``x`` with ``s - 1`` zeros between neighbours along each spatial axis."""
    nd = len(stride)
    spatial = x.shape[-nd:]
    up = x.new_zeros(*x.shape[:-nd], *[(L - 1) * s + 1 for L, s in zip(spatial, stride)])
    up[(...,) + tuple(slice(None, None, s) for s in stride)] = x
    return up


def conv_transpose_zero_insertion(x: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor | None = None, stride=1, padding=0,
                                  output_padding=0, groups=1, dilation=1) -> torch.Tensor:
    """Same semantics as ``F.conv_transpose{1,2,3}d`` (batched input), computed by zero
    insertion."""
    nd = weight.dim() - 2
    params: ConvParams = normalize_params(nd, stride, padding, output_padding, groups, dilation)
    geom = make_geometry(params, x.shape[2:], weight.shape[2:])
    g = params.groups
    up = zero_insert(x, params.stride)
    pads = []
    for ax in reversed(range(nd)):      # F.pad wants the last axis first
        full = params.dilation[ax] * (geom.kernel[ax] - 1)
        pads += [full - params.padding[ax], full - params.padding[ax] + params.output_padding[ax]]
    up = F.pad(up, pads)                # negative entries crop
    c_in, c_out_g = weight.shape[:2]
    w = weight.reshape(g, c_in // g, c_out_g, *weight.shape[2:]).transpose(1, 2)
    w = w.reshape(g * c_out_g, c_in // g, *weight.shape[2:]).flip(list(range(2, 2 + nd)))
    return _CONV[nd](up, w, bias, 1, 0, params.dilation, g)
