"""Output allocation shared by the engines: uninitialised memory normally; with
``KSTCONV_POISON=1`` (the tests set it) filled with NaN, so an element a kernel forgets to write
shows up as a failure instead of a lucky zero."""
from __future__ import annotations

import torch

from . import config


def poisoned() -> bool:
    return config.knobs().poison


def empty(shape, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    out = torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=memory_format)
    if poisoned():
        out.fill_(float("nan"))
    return out


def empty_strided(shape, strides, dtype, device) -> torch.Tensor:
    out = torch.empty_strided(tuple(shape), tuple(strides), dtype=dtype, device=device)
    if poisoned():
        out.fill_(float("nan"))
    return out


def output_memory_format(ndim: int, *tensors) -> torch.memory_format:
    """PyTorch's rule for convolutions: channels-last output if the input or the weight is."""
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(ndim)
    if fmt is not None:
        for t in tensors:
            if t is not None and t.dim() == ndim + 2 and t.is_contiguous(memory_format=fmt) \
                    and not t.is_contiguous():
                return fmt
    return torch.contiguous_format
