"""Counting the device work of a call: every aten op that reaches the dispatcher (a
TorchDispatchMode), every Triton launch (the interpreter's grid executor, run with the mode
paused so that the interpreter's own copies are not counted), and every host<->device copy."""
from __future__ import annotations

import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

# Ops that allocate, or only describe memory: no kernel runs.
NO_KERNEL = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view",
    "_unsafe_view", "as_strided", "detach", "alias", "t", "transpose", "permute", "expand",
    "unsqueeze", "squeeze", "select", "slice", "unbind", "split", "chunk", "is_same_size",
    "_reshape_alias", "view_as", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "set_", "resize_", "is_pinned", "_has_compatible_shallow_copy_type",
}
# Ops that move data between the host and the device (or make a tensor from Python data).
HOST = {"_local_scalar_dense", "lift_fresh", "lift_fresh_copy", "tensor", "scalar_tensor",
        "_pin_memory", "pin_memory"}


class DeviceWork:
    def __init__(self):
        self.ops = collections.Counter()
        self.launches = collections.Counter()

    @property
    def kernels(self) -> int:
        """Device kernels: Triton launches plus aten ops that run one."""
        return sum(self.launches.values()) + sum(
            n for op, n in self.ops.items() if op not in NO_KERNEL and op not in HOST)

    @property
    def host_copies(self) -> int:
        return sum(n for op, n in self.ops.items() if op in HOST) + self.ops["cross_device"]

    def __repr__(self):
        return f"launches={dict(self.launches)} ops={dict(self.ops)}"


class _Mode(TorchDispatchMode):
    def __init__(self, work: DeviceWork):
        super().__init__()
        self.work = work

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("_to_copy", "copy_"):
            devs = {a.device for a in list(args) + list(kwargs.values())
                    if isinstance(a, torch.Tensor)}
            if "device" in kwargs and kwargs["device"] is not None:
                devs.add(torch.device(kwargs["device"]))
            if len(devs) > 1:
                name = "cross_device"
        self.work.ops[name] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_device_work():
    """Yields a DeviceWork filled in by everything run inside the block."""
    from triton.runtime import interpreter
    work = DeviceWork()
    original = interpreter.GridExecutor.__call__

    def counted(self, *args, **kwargs):
        work.launches[self.fn.__name__ if hasattr(self.fn, "__name__") else str(self.fn)] += 1
        with _disable_current_modes():
            return original(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = counted
    try:
        with _Mode(work):
            yield work
    finally:
        interpreter.GridExecutor.__call__ = original
