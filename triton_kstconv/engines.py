"""The engines and the one registry that resolves a backend name to one.

An engine is a module with this interface (every pass takes N-first tensors of any layout and a
``geometry.Geometry``; ``state`` is what a forward leaves for its own backward, None for a pass
that records no graph):

    load()                                              -> raises if the engine cannot run here
    forward(x, weight, bias, geom, act, keep_pre, state=None)  -> (out, pre or None)
    grad_input(grad, weight, geom, state=None)          -> dx
    grad_weight(x, grad, weight_shape, geom, dtype)     -> dw
    joint_backward(grad, x, weight, geom, need_dx, need_dw, need_db, state=None)
                                                        -> (dx, dw, db) or None (optional)

Engines: ``cpp`` (cpp_engine.py: the C++ CPU engine), ``triton`` (triton_engine.py: the Triton
GPU engine; CPU tensors under TRITON_INTERPRET=1), ``torch`` (torch_engine.py: per-phase
``F.conv``, any device). A call names one, or lets its device choose (CPU: cpp, CUDA: triton,
else torch; ``KSTCONV_BACKEND`` changes the default); a default engine that cannot load falls
back to ``torch`` with one warning, a named one raises.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from . import config
from .geometry import ConvArgumentError

MODULES = {"cpp": "cpp_engine", "triton": "triton_engine", "torch": "torch_engine"}
NAMES = tuple(MODULES)
DEFAULTS = {"cpu": "cpp", "cuda": "triton"}   # by device; every other device: torch
_RESOLVED: dict[str, str] = {}                # device default -> the engine that loaded


def resolve(backend: str | None, device: torch.device) -> str:
    """The registry name of the engine for a call on ``device``: an explicit ``backend`` (checked
    against the device), else KSTCONV_BACKEND, else the device's default ("cpu" / "cuda": those
    defaults fall back to torch where their engine cannot load)."""
    if backend is None:
        backend = config.knobs().backend
    if backend is None:
        return device.type if device.type in DEFAULTS else "torch"
    if backend not in NAMES:
        raise ConvArgumentError(f"unknown backend={backend!r}; expected one of {NAMES} or None")
    if backend == "cpp" and device.type != "cpu":
        raise ConvArgumentError(f"backend='cpp' runs on CPU tensors, got a {device.type} tensor")
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConvArgumentError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before triton is "
            "imported); use backend='cpp' for CPU work")
    return backend


def get(name: str):
    """The engine module for a registry name, or for a device default ("cpu", "cuda"), imported
    (and for the C++ engine built) on first use."""
    if name in DEFAULTS:
        if name not in _RESOLVED:
            preferred = DEFAULTS[name]
            try:
                _module(preferred).load()
                _RESOLVED[name] = preferred
            except Exception as exc:
                warnings.warn(f"triton_kstconv: the {preferred} engine is unavailable ({exc}); "
                              "using the pure-PyTorch engine", RuntimeWarning, stacklevel=2)
                _RESOLVED[name] = "torch"
        name = _RESOLVED[name]
    return _module(name)


_MODULES: dict = {}   # registry name -> imported engine module (importing again cost 1.5 us a call)


def _module(name: str):
    mod = _MODULES.get(name)
    if mod is None:
        mod = _MODULES[name] = importlib.import_module(f".{MODULES[name]}", __package__)
    return mod
