"""Property-based sweep: random legal configurations (1-3D, strides 1-4, kernels 1-7, padding,
every legal output_padding, dilation 1-3, groups incl. depthwise, bias, layouts, dtypes), each
engine's forward and gradients against PyTorch in float64."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import triton_kstconv as K
from conftest import assert_close, backends, device_for, reduction_length, reference, tolerance

FN = {1: K.conv_transpose1d, 2: K.conv_transpose2d, 3: K.conv_transpose3d}


@st.composite
def configs(draw, max_nd=3):
    nd = draw(st.integers(1, max_nd))
    per_axis = lambda lo, hi: draw(st.lists(st.integers(lo, hi), min_size=nd, max_size=nd))  # noqa: E731
    stride, kernel, dilation = per_axis(1, 4), per_axis(1, 7), per_axis(1, 3)
    padding = [draw(st.integers(0, (k - 1) * d)) for k, d in zip(kernel, dilation)]
    output_padding = [draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation)]
    size = per_axis(1, 5 if nd < 3 else 3)
    for ax in range(nd):  # keep the output non-empty
        while (size[ax] - 1) * stride[ax] - 2 * padding[ax] + dilation[ax] * (kernel[ax] - 1) \
                + output_padding[ax] + 1 <= 0:
            size[ax] += 1
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = draw(st.booleans()) and groups > 1
    c_in = groups * (1 if depthwise else draw(st.integers(1, 3)))
    c_out = groups * draw(st.integers(1, 3))
    return dict(nd=nd, N=draw(st.integers(0, 3)), c_in=c_in, c_out=c_out, groups=groups,
                size=size, conv=dict(stride=stride, padding=padding,
                                     output_padding=output_padding, groups=groups,
                                     dilation=dilation),
                kernel=kernel, bias=draw(st.booleans()), unbatched=draw(st.booleans()),
                channels_last=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float64, torch.float64, torch.float32,
                                            torch.bfloat16, torch.float16])))


def _check(cfg, backend):
    dtype = cfg["dtype"]
    if backend == "triton" and dtype == torch.float64:
        dtype = torch.float32
    dev = device_for(backend)
    g = torch.Generator().manual_seed(0)
    nd, N = cfg["nd"], cfg["N"]
    x = torch.randn(N, cfg["c_in"], *cfg["size"], generator=g, dtype=torch.float64)
    w = torch.randn(cfg["c_in"], cfg["c_out"] // cfg["groups"], *cfg["kernel"], generator=g,
                    dtype=torch.float64) / math.sqrt(cfg["c_in"] * math.prod(cfg["kernel"]))
    b = torch.randn(cfg["c_out"], generator=g, dtype=torch.float64) if cfg["bias"] else None
    if cfg["unbatched"] and N > 0:
        x = x[0]
    xs, ws = x.to(dtype), w.to(dtype)
    if cfg["channels_last"] and xs.dim() == nd + 2 and nd >= 2:
        xs = xs.contiguous(memory_format=torch.channels_last if nd == 2 else torch.channels_last_3d)
    xs = xs.to(dev).requires_grad_()
    ws = ws.to(dev).requires_grad_()
    bs = b.to(dtype).to(dev).requires_grad_() if b is not None else None
    xr = xs.detach().double().cpu().requires_grad_()
    wr = ws.detach().double().cpu().requires_grad_()
    br = bs.detach().double().cpu().requires_grad_() if bs is not None else None
    out = FN[nd](xs, ws, bs, **cfg["conv"], backend=backend)
    ref = reference(xr, wr, br, nd, **cfg["conv"])
    k = reduction_length(cfg["c_in"], cfg["groups"], cfg["kernel"], cfg["conv"]["stride"])
    tol = tolerance(backend, dtype)
    assert_close(out, ref, dtype, k, tol)
    gy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    out.backward(gy.to(dtype).to(dev))
    ref.backward(gy)
    assert_close(xs.grad, xr.grad, dtype, reduction_length(cfg["c_out"], cfg["groups"],
                                                           cfg["kernel"], [1] * nd), tol)
    assert_close(ws.grad, wr.grad, dtype, max(1, ref.numel() // max(1, cfg["c_out"])), tol)
    if bs is not None:
        assert_close(bs.grad, br.grad, dtype, max(1, ref.numel() // max(1, cfg["c_out"])), tol)


@given(cfg=configs())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_cpp_engine_sweep(cfg):
    _check(cfg, "cpp")


@given(cfg=configs())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_torch_engine_sweep(cfg):
    _check(cfg, "torch")


@pytest.mark.slow
@pytest.mark.skipif("triton" not in backends(), reason="triton not installed, and no GPU or "
                    "TRITON_INTERPRET=1 to run it")
@given(cfg=configs(max_nd=2))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_triton_engine_sweep(cfg):
    _check(cfg, "triton")
