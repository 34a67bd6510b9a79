"""Fused epilogue activations: parsing the ``activation=`` argument, their PyTorch definitions,
and their derivatives for the backward pass.

Every engine applies ``act(conv + bias)`` in its store epilogue; this module is the single source
of the names, the codes the C++ and Triton kernels switch on, and the maths in PyTorch terms.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .geometry import ConvArgumentError

# Codes shared with the C++ and Triton epilogues. Keep in sync with csrc/kstconv.h (Act) and
# triton_kernels.py (ACT_*).
CODES = {None: 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4, "gelu_tanh": 5,
         "tanh": 6, "sigmoid": 7, "relu6": 8}


@dataclasses.dataclass(frozen=True)
class Activation:
    name: str | None = None
    param: float = 0.0          # negative_slope of leaky_relu

    @property
    def code(self) -> int:
        return CODES[self.name]

    @property
    def needs_preactivation(self) -> bool:
        """Whether the derivative needs the value before the activation (else the output does)."""
        return self.name in ("silu", "gelu", "gelu_tanh") or (
            self.name == "leaky_relu" and self.param < 0)


def parse_activation(activation) -> Activation:
    """``None``, a name, or ``(name, param)`` (``("leaky_relu", 0.2)``)."""
    if activation is None or isinstance(activation, Activation):
        return activation or Activation()
    name, param = activation, None
    if isinstance(activation, (tuple, list)):
        if len(activation) != 2:
            raise ConvArgumentError(
                f"activation must be a name or (name, parameter), got activation={activation!r}")
        name, param = activation
    if not isinstance(name, str) or name not in CODES:
        raise ConvArgumentError(
            f"unknown activation={activation!r}; expected one of "
            f"{sorted(k for k in CODES if k)} or None")
    if name == "leaky_relu":
        slope = 0.01 if param is None else param
        if isinstance(slope, bool) or not isinstance(slope, (int, float)) \
                or not math.isfinite(slope):
            raise ConvArgumentError(f"leaky_relu needs a finite negative_slope, got {param!r}")
        return Activation(name, float(slope))
    if param is not None:
        raise ConvArgumentError(f"activation {name!r} takes no parameter, got {param!r}")
    return Activation(name)


def apply(t: torch.Tensor, act: Activation) -> torch.Tensor:
    """``act(t)`` in PyTorch."""
    n = act.name
    if n is None:
        return t
    if n == "relu":
        return F.relu(t)
    if n == "leaky_relu":
        return F.leaky_relu(t, act.param)
    if n == "silu":
        return F.silu(t)
    if n == "gelu":
        return F.gelu(t)
    if n == "gelu_tanh":
        return F.gelu(t, approximate="tanh")
    if n == "tanh":
        return torch.tanh(t)
    if n == "relu6":
        return F.relu6(t)
    return torch.sigmoid(t)


def backward(grad: torch.Tensor, out: torch.Tensor, pre: torch.Tensor | None,
             act: Activation) -> torch.Tensor:
    """d loss / d (pre-activation), from the output, or from the pre-activation where the
    derivative needs it. PyTorch's own backward formulas, so the gradients match it exactly."""
    aten = torch.ops.aten
    n = act.name
    if n is None:
        return grad
    if n == "relu":
        return aten.threshold_backward(grad, out, 0)
    if n == "leaky_relu":
        if act.needs_preactivation:
            return aten.leaky_relu_backward(grad, pre, act.param, False)
        return aten.leaky_relu_backward(grad, out, act.param, True)
    if n == "tanh":
        return aten.tanh_backward(grad, out)
    if n == "sigmoid":
        return aten.sigmoid_backward(grad, out)
    if n == "relu6":   # 0 < out < 6 exactly where 0 < pre < 6
        return aten.hardtanh_backward(grad, out, 0.0, 6.0)
    if n == "silu":
        return aten.silu_backward(grad, pre)
    return aten.gelu_backward(grad, pre, approximate="tanh" if n == "gelu_tanh" else "none")
