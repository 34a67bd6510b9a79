"""The public functional API: ``conv_transpose1d/2d/3d`` with ``torch.nn.functional``'s
signatures and argument semantics, plus ``activation=`` (a fused epilogue) and ``backend=``.

Owns argument checking (errors that name the bad argument, as PyTorch's do) and unbatched
input; the engine is the registry's choice (engines.py): ``backend`` argument, else
``KSTCONV_BACKEND``, else by device.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import engines, ops
from .epilogue import parse_activation
from .geometry import ConvArgumentError, make_geometry, normalize_params

BACKENDS = engines.NAMES
_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The engine name for a call on ``device`` (engines.resolve)."""
    return engines.resolve(backend, device)


def _check_tensor(name: str, t, allow_none=False):
    if t is None and allow_none:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_TYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32, "
                        f"float64), got {t.dtype}")


def conv_transpose(ndim: int, input: Tensor, weight: Tensor, bias: Tensor | None = None,
                   stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                   activation=None, backend: str | None = None) -> Tensor:
    """n-d transposed convolution; see ``conv_transpose2d``."""
    name = f"conv_transpose{ndim}d"
    _check_tensor("input", input)
    _check_tensor("weight", weight)
    _check_tensor("bias", bias, allow_none=True)
    if input.dim() not in (ndim + 1, ndim + 2):
        raise ConvArgumentError(
            f"Expected {ndim + 1}D (unbatched) or {ndim + 2}D (batched) input to {name}, but got "
            f"input of size: {list(input.shape)}")
    if weight.dim() != ndim + 2:
        raise ConvArgumentError(
            f"Expected {ndim + 2}D weight [in_channels, out_channels/groups, *kernel] for {name}, "
            f"but got weight of size: {list(weight.shape)}")
    for t_name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != input.dtype:
            raise TypeError(f"{name}: input is {input.dtype} but {t_name} is {t.dtype}; they must "
                            "have the same dtype")
        if t is not None and t.device != input.device:
            raise ConvArgumentError(f"{name}: input is on {input.device} but {t_name} is on "
                                    f"{t.device}")
    params = normalize_params(ndim, stride, padding, output_padding, groups, dilation)
    g = params.groups
    if weight.shape[0] == 0:
        raise ConvArgumentError(
            f"Given groups={g}, expected weight to be at least 1 at dimension 0, but got weight "
            f"of size {list(weight.shape)} instead")
    if weight.shape[0] % g != 0:
        raise ConvArgumentError(
            f"Given groups={g}, expected weight to be divisible by {g} at dimension 0, but got "
            f"weight of size {list(weight.shape)} instead")
    batched = input.dim() == ndim + 2
    x = input if batched else input.unsqueeze(0)
    if x.shape[1] != weight.shape[0]:
        raise ConvArgumentError(
            f"Given transposed=1, weight of size {list(weight.shape)}, expected input"
            f"{list(x.shape)} to have {weight.shape[0]} channels, but got {x.shape[1]} channels "
            "instead")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[1] * g):
        raise ConvArgumentError(
            f"Given transposed=1, weight of size {list(weight.shape)}, expected bias to be "
            f"1-dimensional with {weight.shape[1] * g} elements, but got bias of size "
            f"{list(bias.shape)} instead")
    if x.shape[0] > 0 and x.shape[1] > 0 and any(s == 0 for s in x.shape[2:]):
        raise ConvArgumentError(
            f"Only zero batch or zero channel inputs are supported, but got input shape: "
            f"{list(x.shape)}")
    if any(k == 0 for k in weight.shape[2:]):
        raise ConvArgumentError(f"{name}: kernel size must be positive, got weight of size "
                                f"{list(weight.shape)}")
    make_geometry(params, list(x.shape[2:]), list(weight.shape[2:]))  # output size check
    act = parse_activation(activation)
    engine = resolve_backend(backend, x.device)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    keep_pre = act.needs_preactivation and wants_grad
    conv = (list(params.stride), list(params.padding), list(params.output_padding), g,
            list(params.dilation))
    if torch.compiler.is_compiling():   # traced: the registered op (fake impl, autograd formula)
        out, _ = ops.conv_transpose(x, weight, bias, *conv, act.name or "", act.param, keep_pre,
                                    engine, not wants_grad)
    else:                               # eager: the same engines, less dispatch
        out = ops.conv_transpose_eager(x, weight, bias, conv, act, keep_pre, engine)
    return out if batched else out.squeeze(0)


def conv_transpose1d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1,
                     padding=0, output_padding=0, groups=1, dilation=1, *, activation=None,
                     backend: str | None = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.conv_transpose1d`` (same arguments and results)."""
    return conv_transpose(1, input, weight, bias, stride, padding, output_padding, groups,
                          dilation, activation=activation, backend=backend)


def conv_transpose2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1,
                     padding=0, output_padding=0, groups=1, dilation=1, *, activation=None,
                     backend: str | None = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.conv_transpose2d``.

    ``activation``: ``None``, ``"relu"``, ``"relu6"``, ``("leaky_relu", slope)``, ``"silu"``,
    ``"gelu"``, ``"gelu_tanh"``, ``"tanh"`` or ``"sigmoid"``, applied in the kernels' epilogue.
    ``backend``: ``"cpp"``, ``"triton"``, ``"torch"`` or ``None`` (by device; env
    ``KSTCONV_BACKEND`` overrides the default).
    """
    return conv_transpose(2, input, weight, bias, stride, padding, output_padding, groups,
                          dilation, activation=activation, backend=backend)


def conv_transpose3d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1,
                     padding=0, output_padding=0, groups=1, dilation=1, *, activation=None,
                     backend: str | None = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.conv_transpose3d``."""
    return conv_transpose(3, input, weight, bias, stride, padding, output_padding, groups,
                          dilation, activation=activation, backend=backend)
