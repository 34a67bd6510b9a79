"""The Triton engine's launches through Triton's autotuner, and the host cost tool, in the
interpreter or on a GPU (gpu_check.sh's ``-k triton`` runs them there): after its first launch
through the autotuner a plan launches the autotuner's choice directly."""
import pytest
import torch
import torch.nn.functional as F

import triton_kstconv as K
from conftest import backends, device_for, tolerance
from triton_kstconv import triton_engine

pytestmark = pytest.mark.skipif("triton" not in backends(), reason="needs Triton")


def test_triton_host_cost_split_times_the_parts_of_a_training_call():
    """``perf.host_cost --split`` (run by gpu_check.sh on the GPU): launches running, the
    call's parts add up, every launch is timed, and the engine is left unwrapped."""
    from perf import host_cost
    from perf.layers import Layer
    layer = Layer("test", "4-4@2 k4s2p1", 1, 4, 4, (2, 2), 4, 2, 1)
    r = host_cost.split(layer, device_for("triton"), calls=1, warmup=1)
    o = r["ours"]
    assert o["launches"] >= 3                      # pack, forward GEMM, grad_weight at least
    assert 0 < o["launch_us"] <= o["engine_forward_us"] + o["engine_backward_us"]
    assert o["engine_forward_us"] <= o["forward_us"]
    assert 0 <= o["autograd_backward_us"] < o["backward_us"]
    assert r["stock"]["forward_us"] > 0 and r["stock"]["backward_us"] > 0
    assert "| test/4-4@2 k4s2p1 |" in host_cost.split_markdown([r])
    assert triton_engine.launch.__name__ == "launch"
    assert triton_engine.joint_backward.__name__ == "joint_backward"


def test_triton_autotuned_plan_then_launches_its_choice_directly(monkeypatch):
    """Two configs, the second timed faster: each pass goes through the autotuner once over
    three training calls, then its plan launches that second config straight to the kernel
    (the autotuner's dispatch costs host time every call); results equal PyTorch's, and
    config_log names the choice."""
    import triton
    from triton_kstconv import triton_config as cfgs
    from triton_kstconv import triton_kernels as tk
    tuners, runs = {}, {}
    small = [dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16), dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16)]

    def tuned_kernel(kind):
        if kind not in tuners:
            metas = [m if kind == "wgrad" else dict(m, GROUP_M=1) for m in small]
            timed = iter([[2.0] * 3, [1.0] * 3])           # the second config wins
            base = tk.wgrad_phase_kernel if kind == "wgrad" else tk.conv_phase_kernel
            tuner = triton.autotune([triton.Config(m, num_warps=4, num_stages=1)
                                     for m in metas], key=[],
                                    do_bench=lambda fn, quantiles: next(timed))(base)
            run = tuner.run

            def counted(*args, **kwargs):
                runs[kind] = runs.get(kind, 0) + 1
                return run(*args, **kwargs)
            tuner.run = counted
            tuners[kind] = tuner
        return tuners[kind]

    choose = cfgs.choose
    monkeypatch.setattr(cfgs, "tuned_kernel", tuned_kernel)
    monkeypatch.setattr(cfgs, "choose", lambda *a: (choose(*a)[0], "autotune", None))
    monkeypatch.setattr(triton_engine, "_PLANS", {})
    cfgs.config_log.clear()
    dev = device_for("triton")
    rtol, atol = tolerance("triton", torch.float32)
    x = torch.randn(2, 8, 5, 6, device=dev, requires_grad=True)
    w = torch.randn(8, 4, 4, 4, device=dev, requires_grad=True)
    b = torch.randn(4, device=dev, requires_grad=True)
    gy = torch.randn(2, 4, 10, 12, device=dev)
    ref = F.conv_transpose2d(*(t.double() for t in (x, w, b)), stride=2, padding=1)
    ref_grads = torch.autograd.grad(ref, (x, w, b), gy.double())
    for _ in range(3):
        y = K.conv_transpose2d(x, w, b, stride=2, padding=1, backend="triton")
        grads = torch.autograd.grad(y, (x, w, b), gy)
        torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)
    assert runs == {"fwd": 1, "dgrad": 1, "wgrad": 1}
    logged = {k.split("|")[0]: v for k, v in cfgs.config_log.items()}
    win = dict(small[1], num_warps=4, num_stages=1)
    assert logged["fwd"] == logged["dgrad"] == ("autotune", dict(win, GROUP_M=1))
    assert logged["wgrad"] == ("autotune", win)
