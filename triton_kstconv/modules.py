"""``nn`` layers: drop-in subclasses of ``torch.nn.ConvTranspose1d/2d/3d`` that run the
segregated kernels, and ``convert(model)``, which swaps them into an existing model in place.

Same constructor, parameters, ``state_dict`` and ``forward(input, output_size=None)`` as the
PyTorch classes; two extra keyword arguments, ``activation`` (fused epilogue) and ``backend``.
``convert`` also takes subclasses that keep PyTorch's forward and parametrized layers (weight
norm, spectral norm: the parametrization keeps working), and with ``fuse=True`` folds a
following BatchNorm and activation into the layer (see ``convert``).
"""
from __future__ import annotations

import torch
from torch import nn

import dataclasses
import functools
import warnings

from . import functional as KF
from .epilogue import apply as apply_activation
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
        fusion = self.__dict__.get("_kst_fusion")
        if fusion is not None:
            return _fused_forward(self, input, output_padding, *fusion)
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


_OURS = {nn.ConvTranspose1d: ConvTranspose1d, nn.ConvTranspose2d: ConvTranspose2d,
         nn.ConvTranspose3d: ConvTranspose3d}
_STOCK = tuple(_OURS)


def _parametrized_class(cls: type) -> bool:
    """A class torch.nn.utils.parametrize made (it names it after the one it extends)."""
    return len(cls.__bases__) == 1 and cls.__name__ == "Parametrized" + cls.__bases__[0].__name__


@functools.lru_cache(maxsize=None)
def _converted_class(cls: type) -> type:
    """The class a module of ``cls`` becomes: ours for PyTorch's own classes; for a subclass that
    keeps PyTorch's forward, a class that is both ours and the subclass (its other methods and
    attributes stay); for a parametrized class (torch.nn.utils.parametrize), a parametrized
    class over the converted original, so that removing the parametrization leaves it
    converted."""
    if cls in _OURS:
        return _OURS[cls]
    if _parametrized_class(cls):
        base = _converted_class(cls.__bases__[0])
        body = {k: v for k, v in cls.__dict__.items()
                if k not in ("__dict__", "__weakref__", "__module__", "__qualname__")}
        return type(cls.__name__, (base,), body)
    ours = next(_OURS[b] for b in cls.__mro__ if b in _OURS)
    return type(f"Segregated{cls.__name__}", (ours, cls), {"__module__": cls.__module__})


def _why_not(module: nn.Module) -> str | None:
    """Why a ConvTranspose module stays stock (None: it can be converted)."""
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} (only 'zeros' is computed here)"
    cls = type(module)
    if _parametrized_class(cls):
        cls = cls.__bases__[0]
    for klass in cls.__mro__:
        if klass in _STOCK:
            return None
        if "forward" in klass.__dict__ or "_output_padding" in klass.__dict__:
            return f"{klass.__name__} overrides forward: its own computation is kept"
    return None


@dataclasses.dataclass
class ConversionReport:
    """What ``convert`` did to each transposed convolution (and fused layer): rows of (name,
    class, action, detail); action is "converted", "fused" or "left stock"."""
    rows: list = dataclasses.field(default_factory=list)

    def add(self, name, module, action, detail=""):
        self.rows.append((name or "(the model)", type(module).__name__, action, detail))

    @property
    def left_stock(self):
        return [r for r in self.rows if r[2] == "left stock"]

    def __str__(self):
        width = max([len(r[0]) for r in self.rows] + [4])
        return "\n".join(f"{n:{width}s}  {c:28s} {a:11s} {d}" for n, c, a, d in self.rows)


# ---------------------------------------------------------------------------------- fusion
_ACTIVATIONS = {nn.ReLU: lambda m: "relu", nn.ReLU6: lambda m: "relu6",
                nn.SiLU: lambda m: "silu", nn.Tanh: lambda m: "tanh", nn.Sigmoid: lambda m: "sigmoid",
                nn.LeakyReLU: lambda m: ("leaky_relu", m.negative_slope),
                nn.GELU: lambda m: "gelu_tanh" if m.approximate == "tanh" else "gelu"}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _PassThrough:
    """A BatchNorm or activation fused into the transposed convolution before it: it keeps its
    parameters, buffers and state_dict keys, and passes its input through (the convolution
    has applied it)."""

    def forward(self, input, *args, **kwargs):
        return input


@functools.lru_cache(maxsize=None)
def _passthrough_class(cls: type) -> type:
    return type(f"FusedAway{cls.__name__}", (_PassThrough, cls), {"__module__": cls.__module__})


def _uses_batch_stats(bn) -> bool:
    """BatchNorm's own rule: batch statistics in training, or without running statistics."""
    return bn.training or not bn.track_running_stats or bn.running_mean is None


def _folded(conv, bn):
    """The convolution's weight and bias with an eval-mode BatchNorm folded in: per output
    channel, scale = gamma / sqrt(running_var + eps), w' = w * scale, b' = (b - mean) * scale +
    beta. Cached while no tensor involved changes (their version counters)."""
    tensors = [conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    key = tuple((t.data_ptr(), t._version) if t is not None else None for t in tensors) + \
        (bn.eps, torch.is_grad_enabled())
    cached = conv.__dict__.get("_kst_folded")
    if cached is not None and cached[0] == key and not torch.is_grad_enabled():
        return cached[1], cached[2]
    if torch.is_inference_mode_enabled():
        # made under inference_mode, the folded weight would be an inference tensor: no version
        # counter, so the engines' weight cache could not keep its packing, and every later
        # call (this cache hands the same tensor to no_grad calls too) would repack it
        with torch.inference_mode(False), torch.no_grad():
            return _folded(conv, bn)
    w, g = conv.weight, conv.groups
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    c_out = w.shape[1] * g
    # w: [C_in, C_out/g, *k]; output channel g * C_out/g + co scales column co of group g
    shape = (g, 1, w.shape[1]) + (1,) * (w.dim() - 2)
    w2 = (w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:]) *
          scale.to(w.dtype).reshape(shape)).reshape(w.shape)
    b = conv.bias if conv.bias is not None else torch.zeros(c_out, dtype=w.dtype,
                                                               device=w.device)
    b2 = (b - bn.running_mean) * scale + (bn.bias if bn.bias is not None else 0)
    b2 = b2.to(w.dtype)
    if not torch.is_grad_enabled():
        conv.__dict__["_kst_folded"] = (key, w2, b2)
    return w2, b2


def _fused_forward(conv, x, output_padding, bn, act):
    """Convolution, BatchNorm, activation: in one call where the BatchNorm uses its running
    statistics (folded into the weight and bias, the activation in the epilogue); in training
    the BatchNorm needs the batch's statistics, so it runs on the convolution's output (its own
    forward, updating its running statistics as PyTorch's does), then the activation."""
    def conv_call(w, b, activation):
        return KF.conv_transpose(conv._ndim, x, w, b, conv.stride, conv.padding, output_padding,
                                 conv.groups, conv.dilation, activation=activation,
                                 backend=conv.backend)
    if bn is None:
        return conv_call(conv.weight, conv.bias, act)
    if not _uses_batch_stats(bn):
        return conv_call(*_folded(conv, bn), act)
    y = conv_call(conv.weight, conv.bias, None)
    y = super(_PassThrough, bn).forward(y)   # the BatchNorm's own forward
    return apply_activation(y, parse_activation(act)) if act is not None else y


def _fuse_sequential(seq: nn.Sequential, prefix: str, report: ConversionReport):
    """In an nn.Sequential: converted ConvTranspose, then optionally a BatchNorm of as many
    channels, then optionally an activation: the followers fused into the convolution."""
    mods = list(seq._modules.items())
    i = 0
    while i < len(mods):
        name, conv = mods[i]
        if not isinstance(conv, _ConvTransposeMixin) or conv.__dict__.get("_kst_fusion") \
                or conv.activation is not None:
            i += 1
            continue
        bn = act = None
        j = i + 1
        if j < len(mods) and type(mods[j][1]) in _BATCHNORMS and \
                mods[j][1].num_features == conv.out_channels:
            bn, j = mods[j][1], j + 1
        if j < len(mods) and type(mods[j][1]) in _ACTIVATIONS:
            act, j = _ACTIVATIONS[type(mods[j][1])](mods[j][1]), j + 1
        if j == i + 1:
            i += 1
            continue
        conv.__dict__["_kst_fusion"] = (bn, act)
        fused = []
        for k in range(i + 1, j):
            follower = mods[k][1]
            follower.__class__ = _passthrough_class(type(follower))
            fused.append(f"{prefix}{mods[k][0]}")
        report.add(prefix + name, conv, "fused", "with " + ", ".join(fused))
        i = j


def convert(model: nn.Module, backend: str | None = None, *, fuse: bool = False,
            report: bool = False):
    """Turn every ``nn.ConvTranspose1d/2d/3d`` in ``model`` into the segregated layer, in place
    (the model itself included): same module objects, parameters, hooks and state_dict. Also
    converted: subclasses that keep PyTorch's forward (their other methods stay) and
    parametrized layers (``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm``:
    the parametrization keeps working). Left stock, and said so: a subclass with its own
    forward, a ``padding_mode`` other than zeros.

    ``fuse=True``: in ``nn.Sequential`` chains a ConvTranspose followed by a BatchNorm and/or an
    activation (ReLU, LeakyReLU, SiLU, GELU, Tanh, Sigmoid) becomes one layer. In eval mode the
    BatchNorm is folded into the weight and bias (from its running statistics, refolded when any
    of them changes) and the activation runs in the kernels' epilogue: one call. In training mode
    the BatchNorm still needs its batch statistics: the convolution runs, then the BatchNorm
    (updating its running statistics exactly as before), then the activation; with no BatchNorm
    the activation is fused in training too. The BatchNorm and activation modules stay where
    they were (their parameters, buffers and state_dict keys unchanged) but pass their input
    through: used alone, outside the chain, they would no longer normalise or activate.
    ``model.train()`` / ``.eval()`` switch between the two forms at any time.

    Returns the model, or ``(model, ConversionReport)`` with ``report=True``. Without it, a
    layer left stock is reported by a warning."""
    rep = ConversionReport()

    def visit(module, name):
        if isinstance(module, _STOCK) and not isinstance(module, _ConvTransposeMixin):
            why = _why_not(module)
            if why:
                rep.add(name, module, "left stock", why)
            else:
                module.__class__ = _converted_class(type(module))
                module.__dict__.setdefault("activation", None)
                module.backend = backend
                rep.add(name, module, "converted")
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)
        if fuse and isinstance(module, nn.Sequential):
            _fuse_sequential(module, f"{name}." if name else "", rep)

    visit(model, "")
    if report:
        return model, rep
    if rep.left_stock:
        warnings.warn("triton_kstconv.convert left these layers stock:\n" +
                      "\n".join(f"  {n} ({c}): {d}" for n, c, _, d in rep.left_stock),
                      RuntimeWarning, stacklevel=2)
    return model
