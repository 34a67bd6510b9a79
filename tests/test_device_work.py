"""Device work per call, counted (tests/device_work.py) in Triton's interpreter: the budget of
the Triton engine. Inference with an unchanged weight is one launch and nothing else when the
input is in the kernel layout (channels-last, channels a multiple of 16), two otherwise (the
layout pass); a training step after a weight update (forward + backward) at most 5 device
kernels (6 with a split grad_weight reduction), in either layout; never a host<->device copy
once a geometry has run."""
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
    "1d_k16s8p4": (1, 16, 16, 5, 16, dict(stride=8, padding=4)),
    "2d_k4s2p1": (2, 16, 32, 4, 4, dict(stride=2, padding=1)),
    "2d_k3s2p1op1_groups2": (2, 32, 32, 4, 3, dict(stride=2, padding=1, output_padding=1,
                                                    groups=2)),
    "3d_k2s2": (3, 16, 16, 3, 2, dict(stride=2)),
}


@pytest.fixture(autouse=True)
def _no_poison(knobs):
    knobs(poison=False)   # NaN fills are test-only work, not counted


def _kernel_layout(t):
    """t with its channels last (any number of spatial axes), as the kernels read it."""
    perm = [0, *range(2, t.dim()), 1]
    inv = [0, t.dim() - 1, *range(1, t.dim() - 1)]
    return t.permute(perm).contiguous().permute(inv)


def _layer(name, layout="nchw", batch=2):
    nd, c_in, c_out, size, k, conv = LAYERS[name]
    g = conv.get("groups", 1)
    x = torch.randn(batch, c_in, *([size] * nd))
    x = (_kernel_layout(x) if layout == "kernel" else x).requires_grad_()
    w = torch.randn(c_in, c_out // g, *([k] * nd), requires_grad=True)
    b = torch.randn(c_out, requires_grad=True)
    return (lambda: FN[nd](x, w, b, **conv, backend="triton")), x, w, b


@pytest.mark.parametrize("layout", ["kernel", "nchw"])
@pytest.mark.parametrize("name", LAYERS)
def test_inference_launches(name, layout):
    call, x, w, b = _layer(name, layout)
    assert triton_engine.in_kernel_layout(x, x.shape[1] // LAYERS[name][5].get("groups", 1)) \
        == (layout == "kernel")
    with torch.no_grad():
        call()                                   # first call: packs, builds the phase table
        with count_device_work() as work:
            call()
    expected = {"conv_phase_kernel": 1} if layout == "kernel" else \
        {"prepare_kernel": 1, "conv_phase_kernel": 1}
    assert work.launches == expected, work
    assert work.kernels == len(expected) and work.host_copies == 0, work


@pytest.mark.parametrize("name,layout,split",
                         [(n, lay, False) for n in LAYERS for lay in ("kernel", "nchw")]
                         + [("2d_k4s2p1", lay, True) for lay in ("kernel", "nchw")])
def test_training_step_budget(name, layout, split, monkeypatch):
    if split:
        monkeypatch.setattr(triton_engine, "wgrad_splits", lambda *a: 3)
        monkeypatch.setattr(triton_engine, "WGRAD_SPLIT_ALIGN", 16)
        monkeypatch.setattr(triton_engine, "_PLANS", {})   # no plan made without the patch
    call, x, w, b = _layer(name, layout)
    gy = torch.randn_like(call())
    if layout == "kernel":
        gy = _kernel_layout(gy)
    call().backward(gy)                          # a first step: tables exist from now on
    for t in (x, w, b):
        t.grad = None
    with torch.no_grad():
        w.add_(0.01)                             # an optimizer step: the weight changed
    with count_device_work() as work:
        call().backward(gy)
    # prepare (weight packed for the forward and grad_input, input put in the kernel layout),
    # forward, grad_input, grad_weight (+ its split sum), grad_bias (a sum, or the layout
    # pass of grad_out sums it and grad_weight's launch adds the partial sums up)
    assert work.launches["prepare_kernel"] == (1 if layout == "kernel" else 2), work
    assert work.launches["sum_splits_kernel"] == (1 if split else 0), work
    assert work.kernels <= (6 if split else 5), work
    assert work.host_copies == 0, work
    assert x.grad is not None and w.grad is not None and b.grad is not None


@pytest.mark.parametrize("layout", ["kernel", "nchw"])
def test_split_forward_is_two_launches(layout):
    # a deep reduction split over the source channels (in blocks of 64): GEMM + epilogue
    x = torch.randn(2, 128, 2, 2)
    x = _kernel_layout(x) if layout == "kernel" else x
    w = torch.randn(128, 16, 4, 4) / 32
    b = torch.randn(16)
    triton_engine._SPLIT_OVERRIDE.append(2)
    try:
        with torch.no_grad():
            K.conv_transpose2d(x, w, b, stride=2, padding=1, backend="triton")
            with count_device_work() as work:
                y = K.conv_transpose2d(x, w, b, stride=2, padding=1, backend="triton")
        # with an activation whose derivative needs the pre-activation, under autograd
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        y2 = K.conv_transpose2d(xg, wg, bg, stride=2, padding=1, activation="silu",
                                backend="triton")
        y2.backward(torch.ones_like(y2))
    finally:
        triton_engine._SPLIT_OVERRIDE.pop()
    expected = {"conv_phase_kernel": 1, "split_epilogue_kernel": 1}
    if layout == "nchw":
        expected["prepare_kernel"] = 1
    assert work.launches == expected, work
    ref = torch.nn.functional.conv_transpose2d(x, w, b, stride=2, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y2, torch.nn.functional.silu(ref), rtol=1e-4, atol=1e-4)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    torch.nn.functional.silu(torch.nn.functional.conv_transpose2d(
        xr, wr, br, stride=2, padding=1)).backward(torch.ones_like(y2))
    for got, want in ((xg, xr), (wg, wr), (bg, br)):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)


def test_a_pass_that_records_a_graph_packs_afresh():
    # gradcheck perturbs weights through .data, which leaves the version counter alone: a pass
    # whose gradient may be taken never takes a packed weight from an earlier call
    call, x, w, b = _layer("2d_k4s2p1", "kernel")
    y0 = call()
    w.data.add_(1.0)
    with count_device_work() as work:
        y1 = call()
    assert work.launches["prepare_kernel"] == 1, work
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


def test_steady_calls_reuse_their_launch_plans(monkeypatch):
    """Host work: what a launch derives from sizes, strides and the config state is worked out
    once per signature (launch plans); a steady training step makes none, whatever the data."""
    monkeypatch.setattr(triton_engine, "_PLANS", {})   # earlier tests ran this signature
    made = []
    for name in ("_conv_plan", "_wgrad_plan", "_pack_plan", "_convert_ints"):
        real = getattr(triton_engine, name)
        monkeypatch.setattr(triton_engine, name,
                            lambda *a, _real=real, _name=name, **k: made.append(_name)
                            or _real(*a, **k))
    call, x, w, b = _layer("2d_k4s2p1")
    call().backward(torch.randn(2, 32, 8, 8))
    assert sorted(set(made)) == ["_conv_plan", "_convert_ints", "_pack_plan", "_wgrad_plan"]
    made.clear()
    for _ in range(2):
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
            w.add_(0.01)
        call().backward(torch.randn(2, 32, 8, 8))
    assert made == []
    # another batch is another signature
    x2 = torch.randn(3, 16, 4, 4, requires_grad=True)
    K.conv_transpose2d(x2, w, b, stride=2, padding=1, backend="triton").sum().backward()
    assert "_conv_plan" in made and "_wgrad_plan" in made


def test_launch_plans_follow_the_config_state():
    """A plan is kept under the config state too: a forced config, then none, and a cleared
    config log are each seen by the next call of the same signature."""
    from triton_kstconv import triton_config as cfgs
    from triton_kstconv import triton_kernels as tk
    call, x, w, b = _layer("2d_k4s2p1", "kernel")

    def conv_meta():
        with triton_engine.capture_launches() as rec, torch.no_grad():
            call()
        (kw,) = [kw for kernel, grid, args, kw in rec if kernel is tk.conv_phase_kernel]
        return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]

    base = conv_meta()
    forced = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)
    assert base != (32, 64, 32)
    with cfgs.forced_config(forced):
        assert conv_meta() == (32, 64, 32)
    assert conv_meta() == base
    cfgs.config_log.clear()
    conv_meta()
    assert [v[0] for v in cfgs.config_log.values()] == ["interpreter"]


def test_host_cost_tool_counts_a_training_step():
    """perf/host_cost.py (the host work per call without a GPU): launches dropped, not kept."""
    from perf import host_cost
    from perf.layers import Layer
    r = host_cost.measure(Layer("test", "16-32@4 k4s2p1", 2, 16, 32, (4, 4), 4, 2, 1))
    assert r["launches"] == 5 and r["calls_per_step"] > 0
    assert r["train_us"][1] > 0 and r["infer_us"][1] > 0
    assert triton_engine._RECORDERS == []
