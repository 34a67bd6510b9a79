"""CUDA-graph capture of the Triton engine (GPU only): the steady state launches no host copy,
so a forward, and a whole training step, can be captured; replays follow in-place weight updates
(under capture the weight is packed inside the graph, never taken from the per-version cache)."""
import math

import pytest
import torch
import torch.nn.functional as F

import triton_kstconv as K
from conftest import CUDA, assert_close, tolerance

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
CONV = dict(stride=2, padding=1)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 6, generator=g).cuda()
    w = (torch.randn(8, 4, 4, 4, generator=g) / math.sqrt(8 * 16)).cuda()
    b = torch.randn(4, generator=g).cuda()
    return x, w, b


def _capture(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def test_inference_replays_follow_weight_updates():
    x, w, b = _data()
    with torch.no_grad():
        graph, out = _capture(lambda: K.conv_transpose2d(x, w, b, **CONV, backend="triton"))
        for _ in range(3):
            w.mul_(-0.5).add_(0.01)
            graph.replay()
            torch.cuda.synchronize()
            ref = F.conv_transpose2d(x.double(), w.double(), b.double(), **CONV)
            assert_close(out, ref, torch.float32, 32, tolerance("triton", torch.float32))


def test_training_step_replays():
    x, w, b = _data()
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    gy = torch.randn(2, 4, 12, 12, device="cuda")

    def step():
        for t in leaves:
            t.grad = None
        K.conv_transpose2d(*leaves, **CONV, backend="triton").backward(gy)
        return [t.grad for t in leaves]

    graph, grads = _capture(step)
    for _ in range(2):
        with torch.no_grad():
            leaves[1].mul_(-0.5)
        graph.replay()
        torch.cuda.synchronize()
        ref = [t.detach().double().requires_grad_() for t in leaves]
        F.conv_transpose2d(*ref, **CONV).backward(gy.double())
        tol = tolerance("triton", torch.float32)
        for got, r, k in zip(grads, ref, (64, 2 * 144, 2 * 144)):
            assert_close(got, r.grad, torch.float32, k, tol)
