"""Device work per call, counted (tests/device_work.py) in Triton's interpreter: the budget of
the Triton engine. Inference with an unchanged weight is one launch and nothing else; a training
step after a weight update (forward + backward) at most 6 device kernels (7 with a split
grad_weight reduction); never a host<->device copy once a geometry has run."""
import pytest
import torch

import triton_kstconv as K
from conftest import CUDA, backends
from device_work import count_device_work
from triton_kstconv import triton_engine, weight_cache

pytestmark = pytest.mark.skipif("triton" not in backends() or CUDA,
                                reason="counts launches in Triton's interpreter")

FN = {1: K.conv_transpose1d, 2: K.conv_transpose2d, 3: K.conv_transpose3d}
LAYERS = {  # name: (nd, c_in, c_out, size, kernel, conv)
    "1d_k16s8p4": (1, 4, 6, 5, 16, dict(stride=8, padding=4)),
    "2d_k4s2p1": (2, 4, 6, 4, 4, dict(stride=2, padding=1)),
    "2d_k3s2p1op1_groups2": (2, 4, 6, 4, 3, dict(stride=2, padding=1, output_padding=1,
                                                  groups=2)),
    "3d_k2s2": (3, 4, 6, 3, 2, dict(stride=2)),
}


@pytest.fixture(autouse=True)
def _no_poison(monkeypatch):
    monkeypatch.setenv("KSTCONV_POISON", "0")   # NaN fills are test-only work, not counted


def _layer(name, batch=2):
    nd, c_in, c_out, size, k, conv = LAYERS[name]
    g = conv.get("groups", 1)
    x = torch.randn(batch, c_in, *([size] * nd), requires_grad=True)
    w = torch.randn(c_in, c_out // g, *([k] * nd), requires_grad=True)
    b = torch.randn(c_out, requires_grad=True)
    return (lambda: FN[nd](x, w, b, **conv, backend="triton")), x, w, b


@pytest.mark.parametrize("name", LAYERS)
def test_inference_is_one_launch(name):
    call, x, w, b = _layer(name)
    with torch.no_grad():
        call()                                   # first call: packs, builds the phase table
        with count_device_work() as work:
            call()
    assert work.launches == {"conv_phase_kernel": 1}, work
    assert work.kernels == 1 and work.host_copies == 0, work


@pytest.mark.parametrize("split", [False, True], ids=["one_slice", "split_reduction"])
@pytest.mark.parametrize("name", LAYERS)
def test_training_step_budget(name, split, monkeypatch):
    if split:
        monkeypatch.setattr(triton_engine, "wgrad_splits", lambda *a: 3)
    call, x, w, b = _layer(name, batch=8 if split else 2)   # 8: enough pixels to split
    gy = torch.randn_like(call())
    call().backward(gy)                          # a first step: tables exist from now on
    for t in (x, w, b):
        t.grad = None
    with torch.no_grad():
        w.add_(0.01)                             # an optimizer step: the weight changed
    with count_device_work() as work:
        call().backward(gy)
    # pack (fwd + dgrad in one launch), forward, grad_input, grad_weight (+ its split sum),
    # grad_bias (one reduction)
    assert work.launches["pack_weight_kernel"] == 1, work
    assert work.launches["sum_splits_kernel"] == (1 if split else 0), work
    assert work.kernels <= (6 if split else 5), work
    assert work.host_copies == 0, work
    assert x.grad is not None and w.grad is not None and b.grad is not None


def test_a_pass_that_records_a_graph_packs_afresh():
    # gradcheck perturbs weights through .data, which leaves the version counter alone: a pass
    # whose gradient may be taken never takes a packed weight from an earlier call
    call, x, w, b = _layer("2d_k4s2p1")
    y0 = call()
    w.data.add_(1.0)
    with count_device_work() as work:
        y1 = call()
    assert work.launches["pack_weight_kernel"] == 1, work
    assert not torch.allclose(y0, y1)


def test_cpp_engine_uses_the_cache():
    from triton_kstconv import cpp_engine
    cpp_engine.load()
    x, w = torch.randn(2, 8, 6, 6), torch.randn(8, 4, 4, 4)
    with torch.no_grad():
        K.conv_transpose2d(x, w, stride=2, padding=1, backend="cpp")
        before = dict(weight_cache.stats)
        K.conv_transpose2d(x, w, stride=2, padding=1, backend="cpp")
        assert weight_cache.stats["packs"] == before["packs"]
        assert weight_cache.stats["hits"] == before["hits"] + 1
        w.mul_(2)                                # a new version: packed again, exactly once
        K.conv_transpose2d(x, w, stride=2, padding=1, backend="cpp")
        assert weight_cache.stats["packs"] == before["packs"] + 1
