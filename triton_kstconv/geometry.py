"""Phase geometry of a transposed convolution: pure maths shared by every backend.

Owns argument normalisation (an int or a tuple per spatial axis) with PyTorch's checks, the output
size (and the ``output_size=`` form of ``nn.ConvTranspose*d.forward``), the output phases with their
tap sets and input offsets, the validity classes of each phase, and the segregation of a weight into
packed per-phase sub-kernels.

Per spatial axis, with stride s, dilation d, padding p, kernel k, input length L, output padding op:

    L_out = (L - 1) * s - 2 * p + d * (k - 1) + op + 1
    input i and tap j land on output o = i * s - p + j * d

An output o = q * s + r (residue r = o mod s) only meets the taps T_r = {j : j*d = r + p (mod s)},
each reading input i = q + (r + p - j * d) / s (an exact division). So phase r is a dense stride-1
correlation of the real input with the sub-kernel w[..., T_r]. T_r may be empty (k < s, or
gcd(s, d) > 1): those outputs get the bias only. In d dimensions the phases are the products of
the axes' phases (s_1 * ... * s_d of them).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Sequence

import torch


class ConvArgumentError(ValueError, RuntimeError):
    """A bad argument. Subclasses both ValueError and RuntimeError (what PyTorch raises)."""


def _ntuple(value, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, tuple, list, torch.Size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConvArgumentError(
                f"expected {name} to be an int or a tuple of {n} ints, but got {name}={value!r}")
    if isinstance(value, bool):
        raise ConvArgumentError(f"expected {name} to be an int, but got {name}={value!r}")
    if isinstance(value, int):
        return (value,) * n
    vals = tuple(value)
    if len(vals) == 1 and n > 1:
        vals = vals * n
    if len(vals) != n:
        raise ConvArgumentError(
            f"expected {name} to be a single integer value or a list of {n} values to match the "
            f"convolution dimensions, but got {name}={list(vals)}")
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConvArgumentError(f"expected {name} to hold ints, but got {name}={list(vals)}")
    return vals


def conv_transpose_output_length(length: int, kernel: int, stride: int, padding: int,
                                 dilation: int, output_padding: int) -> int:
    """``L_out`` of one spatial axis (same formula as PyTorch)."""
    return (length - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def _axis_names(n: int) -> tuple[str, ...]:
    return {1: ("width",), 2: ("height", "width"), 3: ("depth", "height", "width")}[n]


@dataclasses.dataclass(frozen=True)
class ConvParams:
    """Normalised hyper-parameters of an n-d transposed convolution (n = len(stride))."""
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    output_padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @property
    def ndim(self) -> int:
        return len(self.stride)


def normalize_params(ndim: int, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1) -> ConvParams:
    """Turn ints or tuples into per-axis tuples and check them as PyTorch does."""
    if ndim not in (1, 2, 3):
        raise ConvArgumentError(f"only 1, 2 or 3 spatial dimensions are supported, got {ndim}")
    s = _ntuple(stride, ndim, "stride")
    p = _ntuple(padding, ndim, "padding")
    op = _ntuple(output_padding, ndim, "output_padding")
    d = _ntuple(dilation, ndim, "dilation")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise ConvArgumentError(f"expected groups to be an int, but got groups={groups!r}")
    names = _axis_names(ndim)
    if any(v <= 0 for v in s):
        raise ConvArgumentError(f"non-positive stride is not supported, got stride={s}")
    if any(v < 0 for v in p):
        raise ConvArgumentError(f"negative padding is not supported, got padding={p}")
    if any(v < 0 for v in op):
        raise ConvArgumentError(
            f"negative output_padding is not supported, got output_padding={op}")
    if any(v <= 0 for v in d):
        raise ConvArgumentError(
            f"dilation should be greater than zero, but got dilation={d}")
    if groups <= 0:
        raise ConvArgumentError(f"non-positive groups is not supported, got groups={groups}")
    for ax in range(ndim):
        if op[ax] >= s[ax] and op[ax] >= d[ax]:
            raise ConvArgumentError(
                f"output padding must be smaller than either stride or dilation, but got "
                f"output_padding_{names[ax]}: {op[ax]} stride_{names[ax]}: {s[ax]} "
                f"dilation_{names[ax]}: {d[ax]} (output_padding={op}, stride={s}, dilation={d})")
    return ConvParams(s, p, op, d, groups)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Everything about one call that is not data: sizes, params, output size."""
    params: ConvParams
    in_size: tuple[int, ...]      # spatial input size
    kernel: tuple[int, ...]       # spatial kernel size
    out_size: tuple[int, ...]     # spatial output size

    @property
    def ndim(self) -> int:
        return self.params.ndim

    @property
    def stride(self):
        return self.params.stride

    @property
    def padding(self):
        return self.params.padding

    @property
    def dilation(self):
        return self.params.dilation

    @property
    def output_padding(self):
        return self.params.output_padding

    @property
    def groups(self):
        return self.params.groups

    def axis_phases(self, axis: int) -> list["AxisPhase"]:
        return axis_phases(self.in_size[axis], self.kernel[axis], self.stride[axis],
                           self.padding[axis], self.dilation[axis], self.out_size[axis])

    def phases(self) -> list["Phase"]:
        """All output phases (product over axes), in row-major residue order."""
        per_axis = [self.axis_phases(a) for a in range(self.ndim)]
        return [Phase(tuple(combo)) for combo in itertools.product(*per_axis)]


def make_geometry(params: ConvParams, in_size: Sequence[int], kernel: Sequence[int]) -> Geometry:
    """Compute the output size and reject sizes PyTorch rejects."""
    out = tuple(conv_transpose_output_length(L, k, s, p, d, op) for L, k, s, p, d, op in zip(
        in_size, kernel, params.stride, params.padding, params.dilation, params.output_padding))
    if any(o <= 0 for o in out):
        raise ConvArgumentError(
            f"Given input size per channel: ({' x '.join(map(str, in_size))}). Calculated output "
            f"size per channel: ({' x '.join(map(str, out))}). Output size is too small "
            f"(kernel={tuple(kernel)}, stride={params.stride}, padding={params.padding}, "
            f"dilation={params.dilation}, output_padding={params.output_padding})")
    return Geometry(params, tuple(in_size), tuple(kernel), out)


def output_padding_for_size(output_size: Sequence[int], in_size: Sequence[int],
                            kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                            dilation: Sequence[int]) -> tuple[int, ...]:
    """The output_padding that makes the output ``output_size`` (``nn.ConvTranspose*d`` forward's
    ``output_size=`` argument); raises like PyTorch when the size is out of reach."""
    n = len(in_size)
    out = list(output_size)
    if len(out) == n + 2:
        out = out[2:]
    elif len(out) == n + 1:
        out = out[1:]
    if len(out) != n:
        raise ConvArgumentError(
            f"output_size must have {n} or {n + 2} elements (got {len(list(output_size))})")
    mins = [conv_transpose_output_length(L, k, s, p, d, 0)
            for L, k, s, p, d in zip(in_size, kernel, stride, padding, dilation)]
    maxs = [m + s - 1 for m, s in zip(mins, stride)]
    for o, lo, hi in zip(out, mins, maxs):
        if not (lo <= o <= hi):
            raise ConvArgumentError(
                f"requested an output size of {list(out)}, but valid sizes range from {mins} to "
                f"{maxs} (for an input of {list(in_size)})")
    return tuple(o - lo for o, lo in zip(out, mins))


@dataclasses.dataclass(frozen=True)
class AxisPhase:
    """One output residue of one axis.

    Outputs ``o = q * stride + residue`` for ``q`` in ``[0, num_out)`` read, for tap number ``t``,
    kernel index ``taps[t]`` at input ``i = q + offsets[t]``. ``taps`` ascend, so ``offsets``
    descend (by ``dilation / gcd(stride, dilation)`` per tap).
    """
    residue: int
    stride: int
    num_out: int
    taps: tuple[int, ...]
    offsets: tuple[int, ...]

    @property
    def num_taps(self) -> int:
        return len(self.taps)


def axis_phases(length: int, kernel: int, stride: int, padding: int, dilation: int,
                out_length: int) -> list[AxisPhase]:
    """The ``stride`` phases of one axis (some may have no taps, or no outputs)."""
    result = []
    for r in range(stride):
        num_out = max(0, -(-(out_length - r) // stride))
        taps = tuple(j for j in range(kernel) if (j * dilation - r - padding) % stride == 0)
        offsets = tuple((r + padding - j * dilation) // stride for j in taps)
        result.append(AxisPhase(r, stride, num_out, taps, offsets))
    return result


@dataclasses.dataclass(frozen=True)
class Phase:
    """An n-d output phase: one AxisPhase per spatial axis."""
    axes: tuple[AxisPhase, ...]

    @property
    def residue(self) -> tuple[int, ...]:
        return tuple(a.residue for a in self.axes)

    @property
    def num_taps(self) -> int:
        return math.prod(a.num_taps for a in self.axes)

    @property
    def num_out(self) -> int:
        return math.prod(a.num_out for a in self.axes)


def adjoint_axis_phase(length: int, kernel: int, stride: int, padding: int, dilation: int
                       ) -> AxisPhase:
    """grad_input's view of one axis: an ordinary strided convolution of grad_out. Input ``i``
    reads, for tap ``j``, grad_out at ``o = i * stride + (j * dilation - padding)``. Returned as a
    single phase over ``q = i`` whose ``offsets`` are relative to ``q * stride`` (ascending)."""
    taps = tuple(range(kernel))
    return AxisPhase(0, 1, length, taps, tuple(j * dilation - padding for j in taps))


@dataclasses.dataclass(frozen=True)
class AxisPlan:
    """One axis of a pass: destination position ``dst_stride * q + phase.residue`` reads, for tap
    t, source position ``src_stride * q + phase.offsets[t]``, with weight index
    ``phase.taps[t]``."""
    src_len: int
    dst_len: int
    src_stride: int
    dst_stride: int
    phases: tuple[AxisPhase, ...]

    def window(self, phase: AxisPhase) -> tuple[int, int]:
        """The taps [t0, t1) of ``phase`` that meet a real source position for some q (a range:
        the offsets are monotone); (0, 0) if none."""
        hits = [t for t, off in enumerate(phase.offsets) if phase.num_out > 0 and
                min(off, self.src_stride * (phase.num_out - 1) + off) < self.src_len and
                max(off, self.src_stride * (phase.num_out - 1) + off) >= 0]
        return (hits[0], hits[-1] + 1) if hits else (0, 0)


@dataclasses.dataclass(frozen=True)
class PassPlan:
    """What a pass multiplies, per spatial axis: the one plan type every engine encodes
    (cpp_engine.py into a flat list, triton_engine.py into a phase table). ``forward``: source =
    input, destination = output, one phase per residue. ``grad_input``: source = grad_out,
    destination = grad_input, one phase over the input positions with every tap (an ordinary
    strided convolution of grad_out)."""
    kind: str
    axes: tuple[AxisPlan, ...]


@functools.lru_cache(maxsize=1024)
def pass_plan(geom: Geometry, kind: str) -> PassPlan:
    """The plan of one pass of ``geom`` ("forward" or "grad_input"), made once per geometry."""
    axes = []
    for a in range(geom.ndim):
        L, k, s, p, d = (geom.in_size[a], geom.kernel[a], geom.stride[a], geom.padding[a],
                         geom.dilation[a])
        if kind == "forward":
            axes.append(AxisPlan(L, geom.out_size[a], 1, s, tuple(geom.axis_phases(a))))
        elif kind == "grad_input":
            axes.append(AxisPlan(geom.out_size[a], L, s, 1, (adjoint_axis_phase(L, k, s, p, d),)))
        else:
            raise ValueError(f"pass_plan: kind must be 'forward' or 'grad_input', got {kind!r}")
    return PassPlan(kind, tuple(axes))


def valid_taps_per_q(phase: AxisPhase, length: int) -> list[range]:
    """For each q of the phase, the tap numbers t whose input ``q + offsets[t]`` is in range.
    The offsets are monotone, so each is a contiguous range."""
    out = []
    for q in range(phase.num_out):
        ts = [t for t, off in enumerate(phase.offsets) if 0 <= q + off < length]
        out.append(range(ts[0], ts[-1] + 1) if ts else range(0))
    return out


def validity_classes(phase: AxisPhase, length: int) -> list[tuple[int, int, int, int]]:
    """Split ``[0, num_out)`` into runs of q with the same valid tap range.

    Returns ``(q_begin, q_end, t_begin, t_end)`` tuples; an empty tap range means bias only.
    A kernel that multiplies only these ranges never touches a padded or absent input.
    """
    classes: list[tuple[int, int, int, int]] = []
    for q, rng in enumerate(valid_taps_per_q(phase, length)):
        t0, t1 = (rng.start, rng.stop) if len(rng) else (0, 0)
        if classes and classes[-1][2:] == (t0, t1) and classes[-1][1] == q:
            classes[-1] = (classes[-1][0], q + 1, t0, t1)
        else:
            classes.append((q, q + 1, t0, t1))
    return classes


def useful_macs(geom: Geometry, batch: int, c_in: int, c_out: int) -> int:
    """Multiply-adds of the layer that touch a real input (what every exact method must do)."""
    per_axis = []
    for a in range(geom.ndim):
        per_axis.append(sum(sum(len(v) for v in valid_taps_per_q(ph, geom.in_size[a]))
                            for ph in geom.axis_phases(a)))
    return batch * (c_in * c_out // geom.groups) * math.prod(per_axis)


def segregate_weight(weight: torch.Tensor, geom: Geometry) -> list[torch.Tensor]:
    """Split a ConvTranspose weight ``[C_in, C_out/groups, *k]`` into one dense sub-kernel per
    phase, packed ``[groups, C_out/groups, T_1, ..., T_n, C_in/groups]`` (taps ascending, the
    reduction over (taps, C_in/groups) contiguous per output channel). Differentiable (it is a
    gather), so it may sit inside autograd."""
    g = geom.groups
    c_in, c_out_g = weight.shape[0], weight.shape[1]
    w = weight.reshape(g, c_in // g, c_out_g, *weight.shape[2:])
    # [g, C_out_g, *k, C_in_g]
    w = w.permute(0, 2, *range(3, 3 + geom.ndim), 1)
    packed = []
    for phase in geom.phases():
        sub = w
        for ax, ap in enumerate(phase.axes):
            idx = torch.tensor(ap.taps, dtype=torch.long, device=weight.device)
            sub = sub.index_select(2 + ax, idx)
        packed.append(sub.contiguous())
    return packed
