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

import threading
from typing import Callable, Hashable, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import config

_ENTRIES = WeakIdKeyDictionary()   # weight -> {(key, part): (stamp, packed tensor)}
_LOCK = threading.Lock()
PER_WEIGHT = 16   # packings kept per weight; past that, the one made longest ago goes
stats = {"hits": 0, "packs": 0}


def _stamp(weight: torch.Tensor):
    """What identifies the weight's contents, or None where it cannot be tracked."""
    if not config.knobs().weight_cache or weight.is_inference():
        return None
    if weight.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    try:
        return (weight._version, weight.data_ptr(), tuple(weight.stride()), weight.dtype,
                weight.device)
    except (RuntimeError, NotImplementedError):   # no storage: functorch, fake, sparse
        return None


def lookup(weight: torch.Tensor, key: Hashable, parts: Sequence[Hashable]):
    """``{part: packed tensor}`` if every one of ``parts`` of ``weight`` under ``key`` (a
    packing's description: engine, geometry, ...) is cached for the weight as it is now, else
    None."""
    stamp = _stamp(weight)
    if stamp is None:
        return None
    have = {}
    with _LOCK:
        slot = _ENTRIES.get(weight)
        if slot is None:
            return None
        for p in parts:
            entry = slot.get((key, p))
            if entry is None or entry[0] != stamp:
                return None
            have[p] = entry[1]
    stats["hits"] += 1
    return have


def store(weight: torch.Tensor, key: Hashable, made: dict) -> None:
    """Keep ``made`` ({part: packed tensor}) for ``weight`` as it is now (where trackable)."""
    stats["packs"] += 1
    stamp = _stamp(weight)
    if stamp is None:
        return
    with _LOCK:
        slot = _ENTRIES.get(weight)
        if slot is None:
            slot = _ENTRIES[weight] = {}
        for p, tensor in made.items():
            slot.pop((key, p), None)
            slot[(key, p)] = (stamp, tensor)
        while len(slot) > PER_WEIGHT:           # a weight used at many geometries: drop the
            del slot[next(iter(slot))]          # packing made longest ago


def packed(weight: torch.Tensor, key: Hashable, parts: Sequence[Hashable],
           make: Callable[[Sequence[Hashable]], dict]) -> dict:
    """The packed tensors ``parts`` of ``weight`` under ``key``: from the cache, else made by
    ONE call of ``make(parts)`` (which returns ``{part: tensor}``) and kept."""
    have = lookup(weight, key, parts)
    if have is not None:
        return have
    made = make(list(parts))
    store(weight, key, made)
    return made


def clear() -> None:
    """Forget every packed weight (after editing a weight in place through ``.data``)."""
    with _LOCK:
        _ENTRIES.clear()
