"""``nn`` layers: drop-in subclasses of ``torch.nn.ConvTranspose1d/2d/3d`` that run the
segregated kernels, and ``convert(model)``, which swaps them into an existing model in place.

Same constructor, parameters, ``state_dict`` and ``forward(input, output_size=None)`` as the
PyTorch classes; two extra keyword arguments, ``activation`` (fused epilogue) and ``backend``.
"""
from __future__ import annotations

import torch
from torch import nn

from . import functional as KF
from .epilogue import parse_activation
from .geometry import output_padding_for_size


class _ConvTransposeMixin:
    _ndim: int

    def _init_extra(self, activation, backend):
        parse_activation(activation)  # validate early
        self.activation = activation
        self.backend = backend

    def forward(self, input: torch.Tensor, output_size=None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise ValueError(f"Only 'zeros' padding mode is supported for {type(self).__name__}")
        output_padding = self.output_padding
        if output_size is not None:
            spatial = input.shape[-self._ndim:]
            output_padding = output_padding_for_size(
                list(output_size), spatial, self.kernel_size, self.stride, self.padding,
                self.dilation)
        return KF.conv_transpose(self._ndim, input, self.weight, self.bias, self.stride,
                                 self.padding, output_padding, self.groups, self.dilation,
                                 activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.activation is not None:
            s += f", activation={self.activation!r}"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s


class ConvTranspose1d(_ConvTransposeMixin, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` computed by kernel segregation."""
    _ndim = 1

    def __init__(self, *args, activation=None, backend=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_extra(activation, backend)


class ConvTranspose2d(_ConvTransposeMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` computed by kernel segregation."""
    _ndim = 2

    def __init__(self, *args, activation=None, backend=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_extra(activation, backend)


class ConvTranspose3d(_ConvTransposeMixin, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` computed by kernel segregation."""
    _ndim = 3

    def __init__(self, *args, activation=None, backend=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_extra(activation, backend)


_SWAP = {nn.ConvTranspose1d: ConvTranspose1d, nn.ConvTranspose2d: ConvTranspose2d,
         nn.ConvTranspose3d: ConvTranspose3d}


def _swapped(old: nn.Module, cls, backend) -> nn.Module:
    new = cls.__new__(cls)
    new.__dict__.update(old.__dict__)          # same Parameter objects: weights are shared
    for attr in ("_parameters", "_buffers", "_modules"):
        setattr(new, attr, dict(getattr(old, attr)))
    new.activation = None
    new.backend = backend
    return new


def convert(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Replace every ``nn.ConvTranspose1d/2d/3d`` in ``model`` (in place, the model itself
    included) by the segregated layer, sharing its parameters. Returns the model."""
    if type(model) in _SWAP:
        return _swapped(model, _SWAP[type(model)], backend)
    for name, child in list(model.named_children()):
        if type(child) in _SWAP:
            setattr(model, name, _swapped(child, _SWAP[type(child)], backend))
        else:
            convert(child, backend)
    return model
