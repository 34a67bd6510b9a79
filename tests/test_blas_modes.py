"""The C++ engine's GEMM back ends: the float32 GEMM over brgemm tiles (csrc/gemm_brgemm.cpp)
against torch.matmul, and every strategy built on a GEMM under each KSTCONV_BLAS mode (a fresh
process each: the mode is read once), whichever the machine's default is."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from triton_kstconv import cpp_engine


@pytest.mark.parametrize("ta", [False, True], ids=["A", "At"])
@pytest.mark.parametrize("tb", [False, True], ids=["B", "Bt"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["set", "add"])
@pytest.mark.parametrize("threads", [True, False], ids=["threads", "in_region"])
@pytest.mark.parametrize("mnk", [(1, 1, 1), (70, 129, 3), (64, 64, 513), (130, 7, 1100),
                                 (5, 200, 0)])
def test_gemm_brgemm_matches_matmul(ta, tb, accumulate, threads, mnk):
    if not cpp_engine.gemm_paths()["brgemm"]:
        pytest.skip("this PyTorch exports no brgemm")
    M, N, K = mnk
    g = torch.Generator().manual_seed(M * 7 + N * 3 + K)
    a = torch.randn(M, K, generator=g)
    b = torch.randn(K, N, generator=g)
    c0 = torch.randn(M, N, generator=g)
    want = a.double() @ b.double() + (c0.double() if accumulate else 0)
    c = c0.clone()
    cpp_engine.load().gemm_brgemm(a.t().contiguous() if ta else a, b.t().contiguous() if tb else b,
                                  c, ta, tb, accumulate, threads)
    tol = 1e-5 * max(K, 1) ** 0.5 * 4
    assert torch.allclose(c.double(), want, rtol=tol, atol=tol), (c.double() - want).abs().max()


_SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch.nn import functional as F
    from triton_kstconv import cpp_engine, config
    from triton_kstconv.ops import geometry_of
    from triton_kstconv.epilogue import Activation
    mode = sys.argv[1]
    paths = cpp_engine.gemm_paths()
    assert paths["brgemm_gemm"] == (mode == "brgemm"), paths
    g = torch.Generator().manual_seed(0)
    # DCGAN-like k4s2p1 (patch matrices), U-Net k2s2 (one GEMM), a 2x2 input (weight-heavy)
    for cin, cout, k, s, p, h, n in [(24, 20, 4, 2, 1, 6, 3), (40, 24, 2, 2, 0, 5, 2),
                                     (48, 32, 4, 2, 1, 2, 1)]:
        x = torch.randn(n, cin, h, h, generator=g)
        w = torch.randn(cin, cout, k, k, generator=g)
        geom = geometry_of((h, h), (k, k), (s, s), (p, p), (0, 0), 1, (1, 1))
        gy = torch.randn(n, cout, *geom.out_size, generator=g)
        ref_y = F.conv_transpose2d(x.double(), w.double(), stride=s, padding=p)
        ref_dx, ref_dw, _ = torch.ops.aten.convolution_backward(
            gy.double(), x.double(), w.double(), None, [s] * 2, [p] * 2, [1] * 2, True, [0] * 2,
            1, [True, True, False])
        def close(got, want, what):
            err = ((got.double() - want).abs().max() / want.abs().max()).item()
            assert err < 1e-5, (mode, cin, cout, k, what, err)
        for m in (1, 2):
            close(cpp_engine.forward(x, w, None, geom, Activation(), False, state={}, method=m)[0],
                  ref_y, f"forward {m}")
        for m in (1, 6):
            close(cpp_engine.grad_input(gy, w, geom, method=m), ref_dx, f"grad_input {m}")
        for m in (1, 2):
            close(cpp_engine.grad_weight(x, gy, w.shape, geom, torch.float32, method=m), ref_dw,
                  f"grad_weight {m}")
        with config.override(joint=2):
            dx, dw, _ = cpp_engine.joint_backward(gy, x, w, geom, True, True, False)
        close(dx, ref_dx, "patch backward dx")
        close(dw, ref_dw, "patch backward dw")
    print("OK")
""")


@pytest.mark.parametrize("mode", ["mkl", "brgemm"])
def test_gemm_strategies_under_each_blas_mode(mode):
    if not cpp_engine.gemm_paths()["brgemm"] or not cpp_engine.gemm_paths()["mkl_gemm"]:
        pytest.skip("this PyTorch lacks MKL's sgemm or ATen's brgemm")
    env = dict(os.environ, KSTCONV_BLAS=mode)
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]
