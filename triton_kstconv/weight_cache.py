"""Packed weights, made once per weight version and shared by the engines.

Every engine multiplies a *packed* weight (the segregated sub-kernels laid out for its kernels),
and packing costs a pass over the weight (a launch on the GPU). This cache makes that pass once
per weight version: an unchanged weight (inference, or the backward of the step that packed it)
is never repacked.

Entries hang off the weight tensor object, held weakly (a dead weight's entries go with it), and
are stamped with what identifies the weight's contents: its version counter (bumped by every
in-place update: optimizer steps, ``load_state_dict``, ``copy_`` under ``no_grad``), data
pointer, strides, dtype and device. A stamp that no longer matches is a miss, and the new
packing replaces the old one (one entry per weight and packing, never a history).

Not cached, packed on every call instead:
* inference tensors (made under ``torch.inference_mode``: they carry no version counter);
* tensors without a real storage (functorch wrappers, fake tensors);
* calls made while a CUDA graph is being captured: the graph must repack on every replay, or it
  would keep multiplying the weight it saw at capture after an optimizer step changed it;
* everything, with ``KSTCONV_WEIGHT_CACHE=0``.

In-place edits made through ``.data`` bypass the version counter (as they bypass autograd's own
checks). After such an edit, call ``triton_kstconv.clear_weight_cache()``, or edit under
``torch.no_grad()`` without ``.data``, as ``torch.optim`` does.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Hashable, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

_ENTRIES = WeakIdKeyDictionary()   # weight -> {(key, part): (stamp, packed tensor)}
_LOCK = threading.Lock()
ENABLED = os.environ.get("KSTCONV_WEIGHT_CACHE", "1") != "0"
PER_WEIGHT = 16   # packings kept per weight; past that, the one made longest ago goes
stats = {"hits": 0, "packs": 0}


def _stamp(weight: torch.Tensor):
    """What identifies the weight's contents, or None where it cannot be tracked."""
    if not ENABLED or weight.is_inference():
        return None
    if weight.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    try:
        return (weight._version, weight.data_ptr(), tuple(weight.stride()), weight.dtype,
                weight.device)
    except (RuntimeError, NotImplementedError):   # no storage: functorch, fake, sparse
        return None


def packed(weight: torch.Tensor, key: Hashable, parts: Sequence[Hashable],
           make: Callable[[Sequence[Hashable]], dict]) -> dict:
    """The packed tensors ``parts`` of ``weight`` under ``key`` (a packing's description: engine,
    geometry, dtype, ...). Missing or stale parts are made by ONE call of ``make(missing)``,
    which returns ``{part: tensor}``, so that an engine can pack several layouts in one pass."""
    stamp = _stamp(weight)
    if stamp is None:
        stats["packs"] += 1
        return make(list(parts))
    with _LOCK:
        slot = _ENTRIES.get(weight)
        if slot is None:
            slot = _ENTRIES[weight] = {}
        have = {p: slot[(key, p)][1] for p in parts
                if (key, p) in slot and slot[(key, p)][0] == stamp}
    missing = [p for p in parts if p not in have]
    if not missing:
        stats["hits"] += 1
        return have
    stats["packs"] += 1
    made = make(missing)
    with _LOCK:
        for p in missing:
            slot.pop((key, p), None)
            slot[(key, p)] = (stamp, made[p])
        while len(slot) > PER_WEIGHT:           # a weight used at many geometries: drop the
            del slot[next(iter(slot))]          # packing made longest ago
    have.update(made)
    return have


def clear() -> None:
    """Forget every packed weight (after editing a weight in place through ``.data``)."""
    with _LOCK:
        _ENTRIES.clear()
