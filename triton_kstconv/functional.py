"""The public functional API: ``conv_transpose1d/2d/3d`` with ``torch.nn.functional``'s
signatures and argument semantics, plus ``activation=`` (a fused epilogue) and ``backend=``.

Owns argument checking (errors that name the bad argument, as PyTorch's do) and unbatched
input; the engine is the registry's choice (engines.py): ``backend`` argument, else
``KSTCONV_BACKEND``, else by device.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import config, engines, ops
from .epilogue import Activation, parse_activation
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


# What the checks concluded for a call signature (shapes, dtypes, devices, arguments, knobs):
# a layer called again with the same signature skips them (they were a third of a small layer's
# per-call cost). Only signatures whose every argument hashes without loss are kept: ints,
# tuples of ints, an activation's name (a bool, which equals 1, never passes for an int).
_CHECKED: dict = {}
_CHECKED_MAX = 4096


def _exact(v) -> bool:
    return type(v) is int or (type(v) is tuple and all(type(e) is int for e in v))


def _signature(ndim, input, weight, bias, stride, padding, output_padding, groups, dilation,
               activation, backend):
    """The call's cache key, or None where it cannot be one (any argument of another kind)."""
    if not (isinstance(input, Tensor) and isinstance(weight, Tensor)
            and (bias is None or isinstance(bias, Tensor))
            and all(_exact(v) for v in (stride, padding, output_padding, groups, dilation))
            and (activation is None or type(activation) is str
                 or isinstance(activation, Activation))
            and (backend is None or type(backend) is str)):
        return None
    b = None if bias is None else (bias.shape, bias.dtype, bias.device)
    return (ndim, input.shape, input.dtype, input.device, weight.shape, weight.dtype,
            weight.device, b, stride, padding, output_padding, groups, dilation, activation,
            backend, config.knobs())


def _check_call(ndim, input, weight, bias, stride, padding, output_padding, groups, dilation,
                activation, backend):
    """Every argument check, as PyTorch makes them; returns (conv, activation, engine name)."""
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
    shape = input.shape if input.dim() == ndim + 2 else (1, *input.shape)
    if shape[1] != weight.shape[0]:
        raise ConvArgumentError(
            f"Given transposed=1, weight of size {list(weight.shape)}, expected input"
            f"{list(shape)} to have {weight.shape[0]} channels, but got {shape[1]} channels "
            "instead")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[1] * g):
        raise ConvArgumentError(
            f"Given transposed=1, weight of size {list(weight.shape)}, expected bias to be "
            f"1-dimensional with {weight.shape[1] * g} elements, but got bias of size "
            f"{list(bias.shape)} instead")
    if shape[0] > 0 and shape[1] > 0 and any(s == 0 for s in shape[2:]):
        raise ConvArgumentError(
            f"Only zero batch or zero channel inputs are supported, but got input shape: "
            f"{list(shape)}")
    if any(k == 0 for k in weight.shape[2:]):
        raise ConvArgumentError(f"{name}: kernel size must be positive, got weight of size "
                                f"{list(weight.shape)}")
    make_geometry(params, list(shape[2:]), list(weight.shape[2:]))  # output size check
    act = parse_activation(activation)
    engine = resolve_backend(backend, input.device)
    conv = (params.stride, params.padding, params.output_padding, g, params.dilation)
    return conv, act, engine   # tuples only: shared by every call with the signature


def conv_transpose(ndim: int, input: Tensor, weight: Tensor, bias: Tensor | None = None,
                   stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                   activation=None, backend: str | None = None) -> Tensor:
    """n-d transposed convolution; see ``conv_transpose2d``."""
    args = (ndim, input, weight, bias, stride, padding, output_padding, groups, dilation,
            activation, backend)
    compiling = torch.compiler.is_compiling()
    key = None if compiling else _signature(*args)
    try:
        checked = _CHECKED.get(key) if key is not None else None
    except TypeError:   # symbolic sizes (make_fx, fake tensors with a shape env): not hashable
        key = checked = None
    if checked is None:
        checked = _check_call(*args)
        if key is not None:
            if len(_CHECKED) >= _CHECKED_MAX:
                _CHECKED.clear()
            _CHECKED[key] = checked
    conv, act, engine = checked
    batched = input.dim() == ndim + 2
    x = input if batched else input.unsqueeze(0)
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (
        bias is not None and bias.requires_grad))
    keep_pre = act.needs_preactivation and wants_grad
    if compiling:   # traced: the registered op (fake impl, autograd formula)
        out, _ = ops.conv_transpose(x, weight, bias, *conv, act.name or "", act.param, keep_pre,
                                    engine, not wants_grad)
    else:           # eager: the same engines, less dispatch
        out = ops.conv_transpose_eager(x, weight, bias, conv, act, keep_pre, engine,
                                       wants_grad)
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
