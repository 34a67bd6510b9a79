"""Autograd, op registration and compilation: gradcheck / gradgradcheck in float64,
torch.library.opcheck on the four ops, and a fullgraph torch.compile of a small decoder."""
import pytest
import torch
from torch import nn

import triton_kstconv as K
from triton_kstconv import ops
from conftest import backends, device_for

CPU_BACKENDS = [b for b in backends() if b != "triton"]
# The Triton interpreter is slow: gradcheck's numerical Jacobians get a tiny case only.
ALL_BACKENDS = backends()


def _inputs(nd=2, groups=1):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *([3] * nd), dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 6 // groups, *([3] * nd), dtype=torch.float64, generator=g,
                    requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    return x, w, b


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("nd,groups,activation", [(1, 1, None), (2, 2, "gelu"),
                                                  (2, 1, ("leaky_relu", -0.3)), (3, 1, "tanh")])
def test_gradcheck(backend, nd, groups, activation):
    x, w, b = _inputs(nd, groups)
    fn = lambda x, w, b: K.conv_transpose1d(x, w, b, 2, 1, 1, groups, 1, activation=activation,  # noqa: E731
                                            backend=backend) if nd == 1 else \
        (K.conv_transpose2d if nd == 2 else K.conv_transpose3d)(
            x, w, b, 2, 1, 1, groups, (1,) * (nd - 1) + (2,), activation=activation,
            backend=backend)
    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradgradcheck(backend):
    x, w, b = _inputs()
    fn = lambda x, w, b: K.conv_transpose2d(x, w, b, 2, 1, 1, activation="sigmoid",  # noqa: E731
                                            backend=backend)
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.skipif("triton" not in ALL_BACKENDS, reason="triton not installed")
def test_gradcheck_triton_small():
    g = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(*shape, dtype=torch.float64, generator=g)
               .to(device_for("triton")).requires_grad_()
               for shape in ((1, 2, 3), (2, 2, 3), (2,)))
    fn = lambda x, w, b: K.conv_transpose1d(x, w, b, 2, 1, 1, activation="silu",  # noqa: E731
                                            backend="triton")
    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_opcheck(backend):
    dev = device_for(backend)
    x, w, b = (t.float().detach().to(dev).requires_grad_() for t in _inputs())
    conv = ([2, 2], [1, 1], [1, 1], 1, [1, 1])
    torch.library.opcheck(ops.conv_transpose, (x, w, b, *conv, "silu", 0.0, True, backend,
                                               False))
    torch.library.opcheck(ops.conv_transpose, (x, w, None, *conv, "", 0.0, False, backend,
                                               False))
    with torch.no_grad():    # the form a pass that records no graph takes (reuses packs)
        torch.library.opcheck(ops.conv_transpose, (x.detach(), w.detach(), None, *conv, "", 0.0,
                                                   False, backend, True))
    g = torch.randn(2, 6, 6, 6, device=dev)
    torch.library.opcheck(ops.conv_transpose_grad_input, (g, w, [3, 3], *conv, backend))
    torch.library.opcheck(ops.conv_transpose_grad_weight, (x, g, [4, 6, 3, 3], *conv, backend))
    for mask in ([True, True, True], [False, True, False], [True, False, True]):
        torch.library.opcheck(ops.conv_transpose_backward, (g, x, w, *conv, backend, mask))


class TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.up1 = K.ConvTranspose2d(8, 6, 4, 2, 1, activation="relu")
        self.up2 = K.ConvTranspose2d(6, 3, 3, 2, 1, output_padding=1)

    def forward(self, z):
        return torch.tanh(self.up2(self.up1(z)))


@pytest.mark.compile
def _count_joint_backward(monkeypatch):
    """The C++ engine's joint_backward, counted: one entry per call, True where it ran the
    layer, False where it left it to the separate passes."""
    from triton_kstconv import cpp_engine
    calls = []
    real = cpp_engine.joint_backward

    def counting(*a, **kw):
        out = real(*a, **kw)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(cpp_engine, "joint_backward", counting)
    return calls


@pytest.mark.parametrize("joint", ["0", "1"], ids=["separate_backward", "joint_backward"])
def test_compile_fullgraph_forward_and_backward(joint, monkeypatch, knobs):
    knobs(joint=int(joint))  # the C++ engine's backward paths, both
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyDecoder()
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    eager = model(z)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    from triton_kstconv import cpp_engine
    if ops.engine("cpu") is not cpp_engine:
        pytest.skip("the C++ engine did not load (no compiler): its backward paths are the test")
    calls = _count_joint_backward(monkeypatch)
    compiled = torch.compile(model, fullgraph=True)
    # compile afresh: a cached graph from an older checkout would test old code
    with torch._inductor.config.patch(force_disable_caches=True):
        out = compiled(z)
        out.sum().backward()
    # the compiled backward took the joint op's path (the C++ engine is the CPU default)
    assert calls == [joint == "1"] * 2
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("needs", ["all", "weight_only"])
def test_training_takes_joint_backward(activation, needs, monkeypatch, threads):
    """A float32 layer the C++ rule gives to the joint backward: the eager module takes that path
    (counted), and its gradients match PyTorch's (float64 reference). The rule serves at most
    4 threads (its fixed row ranges), so the test runs on at most 4."""
    from conftest import assert_close
    calls = _count_joint_backward(monkeypatch)
    threads(min(torch.get_num_threads(), 4))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 16, 12, 12, generator=g, dtype=torch.float64)
    m = K.ConvTranspose2d(16, 16, 4, stride=2, padding=1, activation=activation, backend="cpp")
    ref = nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1).double()
    ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    xa = x.float().requires_grad_(needs == "all")
    xr = x.clone().requires_grad_(needs == "all")
    y = m(xa)
    yr = ref(xr)
    yr = torch.relu(yr) if activation else yr
    gy = torch.randn(yr.shape, generator=g, dtype=torch.float64)
    y.backward(gy.float())
    yr.backward(gy)
    assert calls == [True]
    k = 2 * 3 * 24 * 24
    assert_close(m.weight.grad, ref.weight.grad, torch.float32, k)
    assert_close(m.bias.grad, ref.bias.grad, torch.float32, k)
    if needs == "all":
        assert_close(xa.grad, xr.grad, torch.float32, 16 * 4)
    else:
        assert xa.grad is None


def test_grouped_training_takes_separate_backward(monkeypatch):
    """A grouped layer of 8 channels a group, which the joint path's channel rule alone would
    take: it runs the separate passes (grad_weight's direct path), and matches PyTorch."""
    from triton_kstconv import cpp_engine
    from conftest import assert_close
    calls = _count_joint_backward(monkeypatch)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 32, 12, 12, generator=g, dtype=torch.float64)
    m = K.ConvTranspose2d(32, 32, 4, stride=2, padding=1, groups=4, backend="cpp")
    ref = nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1, groups=4).double()
    ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    xa, xr = x.float().requires_grad_(), x.clone().requires_grad_()
    y, yr = m(xa), ref(xr)
    gy = torch.randn(yr.shape, generator=g, dtype=torch.float64)
    y.backward(gy.float())
    yr.backward(gy)
    assert calls == [False] and cpp_engine.last_method["wgrad"] == 4
    k = 2 * 24 * 24
    assert_close(m.weight.grad, ref.weight.grad, torch.float32, k)
    assert_close(xa.grad, xr.grad, torch.float32, 8 * 4)
