"""The packed-weight cache and the float32 precision rule (host side, any machine)."""
import gc
import weakref

import pytest
import torch

import triton_kstconv as K
from conftest import backends, device_for
from triton_kstconv import triton_engine, weight_cache


def _make(calls):
    def make(parts):
        calls.append(tuple(parts))
        return {p: torch.full((2,), float(len(calls))) for p in parts}
    return make


def test_one_pack_per_weight_version():
    w, calls = torch.randn(3, 3), []
    a = weight_cache.packed(w, "k", ("fwd", "dgrad"), _make(calls))
    b = weight_cache.packed(w, "k", ("dgrad",), _make(calls))       # made together: a hit
    assert calls == [("fwd", "dgrad")] and b["dgrad"] is a["dgrad"]
    with torch.no_grad():
        w.add_(1)                                                    # new version
    c = weight_cache.packed(w, "k", ("fwd",), _make(calls))
    assert calls[-1] == ("fwd",) and c["fwd"] is not a["fwd"]
    weight_cache.packed(w, "other geometry", ("fwd",), _make(calls))
    assert len(calls) == 3


def test_a_dead_weight_takes_its_packs_with_it():
    w = torch.randn(4, 4)
    packed = weight_cache.packed(w, "k", ("fwd",), lambda parts: {"fwd": torch.randn(16)})
    ref = weakref.ref(packed["fwd"])
    del w, packed
    gc.collect()
    assert ref() is None


def test_untrackable_weights_are_packed_every_call():
    calls = []
    with torch.inference_mode():
        w = torch.randn(3, 3)                    # an inference tensor: no version counter
    weight_cache.packed(w, "k", ("fwd",), _make(calls))
    weight_cache.packed(w, "k", ("fwd",), _make(calls))
    assert len(calls) == 2


def test_data_edits_need_clear():
    # documented limit: edits through .data bypass the version counter
    w, calls = torch.randn(3, 3), []
    weight_cache.packed(w, "k", ("fwd",), _make(calls))
    w.data.mul_(2)
    weight_cache.packed(w, "k", ("fwd",), _make(calls))
    assert len(calls) == 1
    weight_cache.clear()
    weight_cache.packed(w, "k", ("fwd",), _make(calls))
    assert len(calls) == 2


@pytest.mark.parametrize("backend", backends())
def test_results_follow_weight_updates(backend):
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64, device=device_for(backend))
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, device=device_for(backend))
    for step in range(3):
        got = K.conv_transpose2d(x, w, stride=2, padding=1, backend=backend)
        torch.testing.assert_close(got, torch.nn.functional.conv_transpose2d(
            x, w, stride=2, padding=1), rtol=1e-9, atol=1e-9)
        with torch.no_grad():
            w.mul_(-0.5).add_(0.25)


def test_fp32_precision_follows_cudnn_conv_flag():
    conv = torch.backends.cudnn.conv
    saved = conv.fp32_precision
    try:
        conv.fp32_precision = "ieee"
        assert triton_engine.fp32_dot_precision() == "ieee"
        conv.fp32_precision = "tf32"
        assert triton_engine.fp32_dot_precision() == "tf32"
    finally:
        conv.fp32_precision = saved
