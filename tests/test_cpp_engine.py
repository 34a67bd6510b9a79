"""Every inner strategy of the C++ engine, forced, against PyTorch (the chooser must never pick
a wrong one), including work split into many small items, ASan-friendly sizes."""
import math
import os

import pytest
import torch

from triton_kstconv import cpp_engine, epilogue
from triton_kstconv.epilogue import parse_activation
from triton_kstconv.ops import geometry_of
from cases import BY_NAME, GROUPED_BLOCKS, _c
from conftest import assert_close, make_case, reduction_length, reference

NAMES = ["dcgan_k4s2p1", "unet_k2s2", "autoenc_k3s2p1op1", "k2_s3_empty_phase",
         "k3s2_dil2_gcd_empty", "big_padding", "groups3_k4s2", "depthwise", "wide_channels",
         "stride1_1x1_input", "1x1_input_groups2_k3s2", "1d_hifigan_k16s8p4", "3d_anisotropic", "3d_groups"]
# forward: 1-5, 7, 8; grad_input: 1, 3-7; grad_weight: 1-5. 3-5 and 8 need float32 (brgemm); 7
# (direct) grouped layers in the forward (any layer in grad_input), 8 (Winograd) 2-d layers of
# kernel 2 x stride; grad_weight 4 (direct) at most 16 input channels a group.
FWD = [(1, torch.float64), (2, torch.float64), (1, torch.float32), (2, torch.float32),
       (3, torch.float32), (4, torch.float32), (5, torch.float32), (7, torch.float64),
       (7, torch.float32), (8, torch.float32)]
NAMES += ["depthwise_mult2", "1d_depthwise"] + [c.name for c in GROUPED_BLOCKS]


def _winograd_fits(nd, kernel, stride, dilation):
    """Whether forward method 8 serves a layer (inputs that meet every tap): 2-d, every phase
    2 x 2 taps at neighbouring offsets."""
    return nd == 2 and all(k == 2 * s and d == 1 for k, s, d in zip(kernel, stride, dilation))


def _geom(c):
    return geometry_of(c.size, c.kernel, c.stride, c.padding, c.output_padding, c.groups,
                       c.dilation)


@pytest.fixture(params=[False, True], ids=["big_items", "small_items"])
def items(request):
    if not request.param:
        yield
        return
    # many tiny work items: row splitting, halos, class clipping
    with cpp_engine.tuning(item_pixels=64, cols_cap=256, gemm_first_cap=64, brg_rows=3,
                           brg_cols=5):
        yield


def _forced(kind, method, call, refused=False):
    """A strategy forced on a pass: it runs (and the engine says it was that one), or, where it
    cannot run here, it is refused with the reason (never another strategy instead)."""
    if refused:
        with pytest.raises(RuntimeError, match="cannot run"):
            call()
        return None
    out = call()
    assert cpp_engine.last_method[kind] == method, (kind, cpp_engine.last_method)
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("method,dtype", FWD, ids=lambda v: str(v).replace("torch.", ""))
def test_forward_methods(name, method, dtype, items):
    c = BY_NAME[name]
    x, w, b = make_case(c.nd, 2, c.c_in, c.c_out, c.groups, tuple(s + 3 for s in c.size),
                        c.kernel, c.stride, c.padding, c.output_padding, c.dilation, True, dtype)
    geom = geometry_of(x.shape[2:], c.kernel, c.stride, c.padding, c.output_padding, c.groups,
                       c.dilation)
    act = parse_activation("silu")
    out_pre = _forced("fwd", method,
                      lambda: cpp_engine.forward(x, w, b, geom, act, True, method=method),
                      refused=(method == 7 and c.groups == 1) or
                      (method == 8 and not _winograd_fits(c.nd, c.kernel, c.stride, c.dilation)))
    if out_pre is None:
        return
    out, pre = out_pre
    ref_pre = reference(x, w, b, c.nd, **c.conv)
    k = reduction_length(c.c_in, c.groups, c.kernel, c.stride)
    assert_close(pre, ref_pre, dtype, k)
    assert_close(out, torch.nn.functional.silu(ref_pre), dtype, k)


EPILOGUE_ACTS = ["relu", "relu6", ("leaky_relu", 0.2), "tanh", "sigmoid", "gelu", "gelu_tanh",
                 "silu"]


@pytest.mark.parametrize("method", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("act", EPILOGUE_ACTS, ids=str)
@pytest.mark.parametrize("keep_pre", [False, True], ids=["no_pre", "pre"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_epilogue_activations(method, act, keep_pre, channels_last):
    """Every activation through every forward method, with and without the pre-activation
    (transcendental ones run after the sums, in place or from `pre`; the cheap ones in the
    epilogue), either memory layout; a NaN bias makes its channel NaN, as in PyTorch (a
    branchy max(0, v) once turned NaN into 0)."""
    c = BY_NAME["depthwise" if method == 7 else "dcgan_k4s2p1"]
    x, w, b = make_case(c.nd, 2, c.c_in, c.c_out, c.groups, tuple(s + 3 for s in c.size),
                        c.kernel, c.stride, c.padding, c.output_padding, c.dilation, True,
                        torch.float32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    b[1] = float("nan")
    x = x * 8   # sums past 6 for relu6
    geom = geometry_of(x.shape[2:], c.kernel, c.stride, c.padding, c.output_padding, c.groups,
                       c.dilation)
    a = parse_activation(act)
    out_pre = _forced("fwd", method,
                      lambda: cpp_engine.forward(x, w, b, geom, a, keep_pre, method=method),
                      refused=method == 4 and channels_last)   # KM reads the source in place
    if out_pre is None:
        return   # the refusal was the check
    out, pre = out_pre
    ref_pre = reference(x, w, b, c.nd, **c.conv)
    ref = epilogue.apply(ref_pre, a)
    if act == "relu6":   # both clips reached
        assert (ref[:, 0] == 6).any() and (ref[:, 0] == 0).any()
    assert out.isnan()[:, 1].all() and not out.isnan()[:, 0].any()
    keep = [i for i in range(out.shape[1]) if i != 1]
    k = reduction_length(c.c_in, c.groups, c.kernel, c.stride)
    assert_close(out[:, keep], ref[:, keep], torch.float32, k)
    if keep_pre:
        assert_close(pre[:, keep], ref_pre[:, keep], torch.float32, k)
    else:
        assert pre is None


WINOGRAD_SHAPES = [
    # (batch, c_in, c_out, groups, size, kernel, stride, padding, output_padding)
    (2, 6, 5, 1, (4, 4), 4, 2, 1, 0),        # DCGAN's k4s2p1
    (3, 5, 7, 1, (5, 7), 4, 2, 1, 1),        # odd sizes, output padding: phases of unequal length
    (2, 4, 3, 1, (6, 5), 4, 2, 0, 0),        # no padding: the border taps read zero rows
    (1, 3, 4, 1, (4, 6), 4, 2, 2, 1),        # padding past one tap
    (2, 4, 4, 1, (5, 4), 6, 3, 1, 2),        # k6s3: three phases a side
    (2, 3, 2, 1, (4, 5), (8, 4), (4, 2), (3, 1), (1, 0)),  # anisotropic k8s4 x k4s2
    (2, 8, 6, 2, (5, 5), 4, 2, 1, 0),        # groups
    (1, 70, 33, 1, (3, 4), 4, 2, 1, 0),      # channels past a vector
    (2, 2, 3, 1, (2, 2), 4, 2, 1, 0),        # 2 x 2 input: each phase's second tap
]


@pytest.mark.parametrize("shape", WINOGRAD_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_forward_winograd(shape, layout, bias, items):
    """Forward method 8 (Winograd F(2x2, 2x2) per phase) against PyTorch: phases of unequal
    length (odd sizes, output padding), any padding, kernels 2 x stride beyond k4s2, groups,
    channel counts past a vector, every source layout; outputs poisoned, items tiny or not."""
    n, ci, co, g, size, k, s, p, op = shape
    k, s, p, op = ((v, v) if isinstance(v, int) else v for v in (k, s, p, op))
    x, w, b = make_case(2, n, ci, co, g, size, k, s, p, op, (1, 1), bias, torch.float32)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.cat([x, x], 3)[..., ::2]   # pixel stride 2, row stride 2 x W
    geom = geometry_of(x.shape[2:], k, s, p, op, g, (1, 1))
    out, pre = _forced("fwd", 8, lambda: cpp_engine.forward(
        x, w, b, geom, parse_activation(("leaky_relu", 0.1)), True, method=8))
    ref_pre = reference(x, w, b, 2, stride=s, padding=p, output_padding=op, groups=g)
    kk = reduction_length(ci, g, k, s)
    assert_close(pre, ref_pre, torch.float32, kk)
    assert_close(out, torch.nn.functional.leaky_relu(ref_pre, 0.1), torch.float32, kk)


def test_forward_winograd_refusals():
    """Method 8 forced where it cannot run is refused with the reason: float64, a kernel
    other than 2 x stride, a 1-d layer, grad_input."""
    act = parse_activation(None)
    x, w, b = make_case(2, 2, 4, 3, 1, (4, 4), (4, 4), (2, 2), (1, 1), (0, 0), (1, 1), True,
                        torch.float64)
    geom = geometry_of((4, 4), (4, 4), (2, 2), (1, 1), (0, 0), 1, (1, 1))
    with pytest.raises(RuntimeError, match="method 8 .* cannot run this forward: it needs float32"):
        cpp_engine.forward(x, w, b, geom, act, False, method=8)
    x3, w3, b3 = make_case(2, 2, 4, 3, 1, (4, 4), (3, 3), (2, 2), (1, 1), (0, 0), (1, 1), True,
                           torch.float32)
    g3 = geometry_of((4, 4), (3, 3), (2, 2), (1, 1), (0, 0), 1, (1, 1))
    with pytest.raises(RuntimeError, match="method 8 .* needs a 2-d layer whose every phase"):
        cpp_engine.forward(x3, w3, b3, g3, act, False, method=8)
    x1, w1, b1 = make_case(1, 2, 4, 3, 1, (8,), (4,), (2,), (1,), (0,), (1,), True, torch.float32)
    g1 = geometry_of((8,), (4,), (2,), (1,), (0,), 1, (1,))
    with pytest.raises(RuntimeError, match="method 8 .* needs a 2-d layer"):
        cpp_engine.forward(x1, w1, b1, g1, act, False, method=8)
    with pytest.raises(RuntimeError, match="method 8 .* cannot run this grad_input: it serves the forward only"):
        cpp_engine.grad_input(torch.randn(2, 3, 8, 8), w.float(), geom, method=8)


@pytest.mark.parametrize("per_call", [False, True], ids=["cached", "per_call"])
def test_forward_rule_winograd(per_call):
    """The rules take Winograd for float32 k4s2 layers from 64 input and 32 output channels and
    64 tiles a phase (batch 4 at 8 x 8: 4 x 16), not below any of those, nor in float64, nor
    with the switch off."""
    if not cpp_engine.gemm_paths()["brgemm"]:
        pytest.skip("method 8 needs ATen's brgemm, which this PyTorch does not export")
    act = parse_activation("relu")

    def run(n, ci, co, size, dtype=torch.float32):
        x, w, b = make_case(2, n, ci, co, 1, size, (4, 4), (2, 2), (1, 1), (0, 0), (1, 1), True,
                            dtype)
        geom = geometry_of(size, (4, 4), (2, 2), (1, 1), (0, 0), 1, (1, 1))
        out, _ = cpp_engine.forward(x, w, b, geom, act, False, state={} if per_call else None)
        ref = torch.relu(reference(x, w, b, 2, stride=(2, 2), padding=(1, 1)))
        assert_close(out, ref, dtype, reduction_length(ci, 1, (4, 4), (2, 2)))
        return cpp_engine.last_method["fwd"]

    assert run(4, 64, 32, (8, 8)) == 8
    assert run(1, 64, 32, (16, 16)) == 8
    assert run(3, 64, 32, (8, 8)) != 8      # 48 tiles a phase
    assert run(4, 32, 32, (8, 8)) != 8      # 32 input channels
    assert run(4, 64, 16, (8, 8)) != 8      # 16 output channels
    assert run(4, 64, 32, (8, 8), torch.float64) != 8
    with cpp_engine.tuning(winograd=0):
        assert run(4, 64, 32, (8, 8)) != 8


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("method,dtype", [(1, torch.float64), (1, torch.float32),
                                          (3, torch.float32), (4, torch.float32),
                                          (5, torch.float32), (6, torch.float64),
                                          (6, torch.float32), (7, torch.float64),
                                          (7, torch.float32)], ids=str)
def test_grad_input_methods(name, method, dtype, items):
    c = BY_NAME[name]
    x, w, _ = make_case(c.nd, 2, c.c_in, c.c_out, c.groups, c.size, c.kernel, c.stride,
                        c.padding, c.output_padding, c.dilation, False, torch.float64)
    xr = x.clone().requires_grad_()
    y = reference(xr, w, None, c.nd, **c.conv)
    g = torch.randn_like(y)
    y.backward(g)
    # method 4 reads grad_out in place, which the adjoint's stride-s gather along w rules out
    dx = _forced("dgrad", method,
                 lambda: cpp_engine.grad_input(g.to(dtype), w.to(dtype), _geom(c), method=method),
                 refused=(method == 4 and c.stride[-1] > 1) or
                 (method == 7 and c.groups == 1 and c.c_out > 16))
    if dx is None:
        return
    assert_close(dx, xr.grad, dtype, reduction_length(c.c_out, c.groups, c.kernel, (1,) * c.nd))


def _grad_weight_case(c, dtype):
    """A case's x and grad_out, the weight's shape, PyTorch's grad_weight and the reduction
    length its tolerance takes."""
    x, w, _ = make_case(c.nd, 2, c.c_in, c.c_out, c.groups, c.size, c.kernel, c.stride,
                        c.padding, c.output_padding, c.dilation, False, dtype)
    wr = w.clone().requires_grad_()
    y = reference(x, wr, None, c.nd, **c.conv)
    g = torch.randn_like(y)
    y.backward(g)
    return x, g, w.shape, wr.grad, 2 * y[0, 0].numel()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("method,dtype", [(1, torch.float64), (2, torch.float64),
                                          (1, torch.float32), (2, torch.float32),
                                          (3, torch.float32), (4, torch.float64),
                                          (4, torch.float32), (5, torch.float32),
                                          (5, torch.float64)], ids=str)
def test_grad_weight_methods(name, method, dtype, items):
    """Every grad_weight strategy forced on every case: PyTorch's sums, or, where it cannot run
    (direct past 16 input channels a group, the register tiles in float64 or without AVX-512),
    refused with the reason."""
    c = BY_NAME[name]
    x, g, shape, ref, length = _grad_weight_case(c, torch.float64)
    refused = (method == 4 and c.c_in > 16 * c.groups) or (
        method == 5 and (dtype != torch.float32 or not cpp_engine.gemm_paths()["wgrad_rows"]))
    dw = _forced("wgrad", method, lambda: cpp_engine.grad_weight(
        x.to(dtype), g.to(dtype), shape, _geom(c), dtype, method=method), refused=refused)
    if dw is None:
        return
    assert_close(dw, ref, dtype, length)


@pytest.mark.parametrize("name", NAMES)
def test_grad_weight_brgemm_padded_rows(name):
    """grad_weight's brgemm strategy with padded rows everywhere (the rule takes shifted input
    copies on narrow images, which most cases are)."""
    c = BY_NAME[name]
    x, g, shape, ref, length = _grad_weight_case(c, torch.float32)
    with cpp_engine.tuning(wgrad_shifted=0):
        dw = cpp_engine.grad_weight(x, g, shape, _geom(c), torch.float32, method=3)
    assert_close(dw, ref, torch.float32, length)


@pytest.mark.parametrize("shifted", [0, 1])
@pytest.mark.parametrize("k,pad,dil", [(3, 4, 4), (9, 4, 1), (5, 6, 3)], ids=str)
def test_grad_weight_brgemm_taps_past_the_input(k, pad, dil, shifted):
    """Taps that meet no input column (large padding, dilation): with shifted input copies an
    offset may reach no column at all (its copy is all zeros); with padded rows, wide padding."""
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    w = torch.randn(16, 12, k, k, dtype=torch.float64)
    geom = geometry_of((3, 3), (k, k), (1, 1), (pad, pad), (0, 0), 1, (dil, dil))
    wr = w.clone().requires_grad_()
    y = torch.nn.functional.conv_transpose2d(x, wr, None, 1, pad, 0, 1, dil)
    g = torch.randn_like(y)
    y.backward(g)
    with cpp_engine.tuning(wgrad_shifted=shifted):
        dw = cpp_engine.grad_weight(x.float(), g.float(), w.shape, geom, torch.float32, method=3)
    assert_close(dw, wr.grad, torch.float32, 2 * y[0, 0].numel())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "expanded", "strided"])
@pytest.mark.parametrize("nd,n,c_in,c_out,size,k,s,p", [
    (1, 2, 64, 40, 1500, 4, 2, 1),    # one row outgrows a chunk: pieces along w
    (2, 1, 70, 20, 70, 3, 2, 1),      # many rows: chunks of rows, 70 input channels (a masked tail)
    (2, 5, 16, 13, 6, 4, 2, 1),       # a chunk of several images, 13 output channels
    (3, 2, 8, 12, 5, 2, 2, 0)], ids=str)
def test_grad_weight_rows_any_grad_out(nd, n, c_in, c_out, size, k, s, p, layout):
    """grad_weight's register tiles read grad_out where it lies, whatever its strides (a
    channels-last gradient, the expanded one of y.sum(), a strided slice), over chunks of rows
    and of columns: PyTorch's sums."""
    _rows_or_skip(True)
    x = torch.randn(n, c_in, *(size,) * nd, dtype=torch.float64)
    w = torch.randn(c_in, c_out, *(k,) * nd, dtype=torch.float64)
    conv = [None, torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d,
            torch.nn.functional.conv_transpose3d][nd]
    out_shape = conv(x[:1], w, None, s, p).shape[1:]
    if layout == "expanded":
        g = torch.ones(()).expand(n, *out_shape)
    elif layout == "strided":
        g = torch.randn(n, 2 * out_shape[0], *out_shape[1:])[:, ::2]
    else:
        g = torch.randn(n, *out_shape)
        if layout == "channels_last":
            g = g.movedim(1, -1).contiguous().movedim(-1, 1)
    assert layout == "contiguous" or not g.is_contiguous()
    wr = w.clone().requires_grad_()
    conv(x, wr, None, s, p).backward(g.double())
    geom = geometry_of(x.shape[2:], (k,) * nd, (s,) * nd, (p,) * nd, (0,) * nd, 1, (1,) * nd)
    dw = _forced("wgrad", 5, lambda: cpp_engine.grad_weight(
        x.float(), g, w.shape, geom, torch.float32, method=5))
    assert_close(dw, wr.grad, torch.float32, n * math.prod(out_shape[1:]))


def _amd_with_avx512() -> bool:
    with open("/proc/cpuinfo") as fh:
        info = fh.read()
    return "AuthenticAMD" in info and " avx512f" in info


def _has_avx512() -> bool:
    with open("/proc/cpuinfo") as fh:
        return " avx512f" in fh.read()


def _rows_or_skip(rows):
    """grad_weight's register tiles (method 5) need AVX-512: a case that takes them is skipped
    where this CPU has none."""
    if rows and not cpp_engine.gemm_paths()["wgrad_rows"]:
        pytest.skip("grad_weight's register tiles need AVX-512")


def test_gemm_paths_found():
    """The GEMMs the engine takes from libtorch_cpu (the CPU wheel this project pins has all),
    and its own short-dimension GEMMs (AVX2 with FMA, which every machine this project runs on
    has); the float32 GEMMs go over brgemm tiles where MKL runs below the CPU's widest vectors
    (an AMD processor with AVX-512)."""
    mode = os.environ.get("KSTCONV_BLAS", "") or "auto"
    if mode not in ("auto", "mkl", "brgemm"):
        pytest.skip(f"KSTCONV_BLAS={mode} changes the paths")
    brgemm_gemm = {"auto": _amd_with_avx512(), "mkl": False, "brgemm": True}[mode]
    assert cpp_engine.gemm_paths() == {"mkl_gemm": True, "mkl_packed_gemm": True, "brgemm": True,
                                       "skinny": True, "brgemm_gemm": brgemm_gemm,
                                       "wgrad_rows": _has_avx512()}


def test_stale_build_lock_is_removed(tmp_path):
    """A build killed midway leaves torch's lock file behind; the next build must not wait on it
    forever (it did: a CI run hung for its whole time limit)."""
    (tmp_path / "lock").write_text("")
    with pytest.warns(RuntimeWarning, match="killed midway"):
        with cpp_engine._build_lock(str(tmp_path)):
            assert not (tmp_path / "lock").exists()


def test_forced_method_that_cannot_run_is_refused():
    c = BY_NAME["dcgan_k4s2p1"]
    x, w, b = make_case(c.nd, 2, c.c_in, c.c_out, c.groups, c.size, c.kernel, c.stride,
                        c.padding, c.output_padding, c.dilation, True, torch.float64)
    with pytest.raises(RuntimeError, match="method 3 .* cannot run this forward: it needs float32"):
        cpp_engine.forward(x, w, b, _geom(c), parse_activation(None), False, method=3)
    with pytest.raises(RuntimeError, match="method 6 .* serves grad_input only"):
        cpp_engine.forward(x, w, b, _geom(c), parse_activation(None), False, method=6)


def test_validity_classes_agree_with_geometry():
    """The C++ plan recomputes the forward phases' validity classes: they must be
    geometry.validity_classes."""
    from triton_kstconv.geometry import validity_classes
    mod = cpp_engine.load()
    for name in NAMES:
        geom = _geom(BY_NAME[name])
        got = mod.plan_classes(cpp_engine.forward_plan(geom))[3 - geom.ndim:]
        for ax in range(geom.ndim):
            want = [[list(c) for c in validity_classes(ph, geom.in_size[ax])]
                    for ph in geom.axis_phases(ax)]
            assert got[ax] == want, (name, ax)


# Rows long enough for the vector paths (8 x 8 transposes, the stride-2 phase split of grad_out),
# with channel and pixel tails, a batch that grad_weight splits into ranges, and odd strides.
WIDE = [dict(c_in=20, c_out=36, size=(6, 41), kernel=(4, 4), stride=(2, 2), padding=(1, 1)),
        dict(c_in=33, c_out=17, size=(5, 29), kernel=(3, 5), stride=(1, 2), padding=(1, 2)),
        dict(c_in=16, c_out=40, size=(4, 19), kernel=(3, 3), stride=(3, 3), padding=(0, 1))]


@pytest.mark.parametrize("case", WIDE, ids=["k4s2", "k35s12", "k3s3"])
@pytest.mark.parametrize("batch", [1, 5])
def test_wide_rows_all_passes(case, batch):
    nd, dtype = 2, torch.float32
    x, w, b = make_case(nd, batch, case["c_in"], case["c_out"], 1, case["size"], case["kernel"],
                        case["stride"], case["padding"], (0, 0), (1, 1), True, torch.float64)
    conv = dict(stride=case["stride"], padding=case["padding"], output_padding=(0, 0), groups=1,
                dilation=(1, 1))
    geom = geometry_of(x.shape[2:], case["kernel"], case["stride"], case["padding"], (0, 0), 1,
                       (1, 1))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = reference(xr, wr, b, nd, **conv)
    g = torch.randn_like(y)
    y.backward(g)
    k = reduction_length(case["c_in"], 1, case["kernel"], case["stride"])
    for method in (3, 4, 5):
        out, pre = cpp_engine.forward(x.to(dtype), w.to(dtype), b.to(dtype), geom,
                                      parse_activation(("leaky_relu", 0.1)), True, method=method)
        assert_close(pre, y.detach(), dtype, k)
        assert_close(out, torch.nn.functional.leaky_relu(y.detach(), 0.1), dtype, k)
    dx = cpp_engine.grad_input(g.to(dtype), w.to(dtype), geom, method=3)
    assert_close(dx, xr.grad, dtype, reduction_length(case["c_out"], 1, case["kernel"], (1, 1)))
    dw = cpp_engine.grad_weight(x.to(dtype), g.to(dtype), w.shape, geom, dtype, method=3)
    assert_close(dw, wr.grad, dtype, 2 * y[0, 0].numel())


# The joint backward (grad_input, grad_weight, grad_bias in one pass over grad_out), forced on
# for every geometry; each subset of outputs, both memory layouts, batch splits mid-image.
NEEDS = {"all": (True, True, True), "dx": (True, False, False), "dw_db": (False, True, True)}


def _joint_case(c, batch, size, channels_last, dtype=torch.float32):
    x, w, b = make_case(c.nd, batch, c.c_in, c.c_out, c.groups, size, c.kernel, c.stride,
                        c.padding, c.output_padding, c.dilation, True, torch.float64)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y = reference(xr, wr, br, c.nd, **c.conv)
    g = torch.randn_like(y)
    y.backward(g)
    xf, gf = x.to(dtype), g.to(dtype)
    if channels_last:
        fmt = {2: torch.channels_last, 3: torch.channels_last_3d}[c.nd]
        xf, gf = xf.contiguous(memory_format=fmt), gf.contiguous(memory_format=fmt)
    return xf, w.to(dtype), gf, (xr.grad, wr.grad, br.grad), y


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("need", list(NEEDS))
@pytest.mark.parametrize("batch", [1, 3])
def test_joint_backward(name, need, batch, knobs):
    knobs(joint=1)
    c = BY_NAME[name]
    xf, wf, gf, refs, y = _joint_case(c, batch, c.size, False)
    got = cpp_engine.joint_backward(gf, xf, wf, _geom(c), *NEEDS[need])
    assert got is not None, "the joint backward refused a float32 layer"
    ks = (reduction_length(c.c_out, c.groups, c.kernel, (1,) * c.nd), 2 * batch * y[0, 0].numel(),
          batch * y[0, 0].numel())
    for out, ref, k, wanted in zip(got, refs, ks, NEEDS[need]):
        if wanted:
            assert_close(out, ref, torch.float32, k)
        else:
            assert out is None


@pytest.mark.parametrize("case", WIDE, ids=["k4s2", "k35s12", "k3s3"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_joint_backward_wide_rows(case, channels_last, knobs):
    knobs(joint=1)
    from types import SimpleNamespace
    c = SimpleNamespace(nd=2, groups=1, output_padding=(0, 0), dilation=(1, 1), **case)
    c.conv = dict(stride=c.stride, padding=c.padding, output_padding=(0, 0), groups=1,
                  dilation=(1, 1))
    xf, wf, gf, refs, y = _joint_case(c, 5, c.size, channels_last)
    geom = geometry_of(c.size, c.kernel, c.stride, c.padding, (0, 0), 1, (1, 1))
    dx, dw, db = cpp_engine.joint_backward(gf, xf, wf, geom, True, True, True)
    assert_close(dx, refs[0], torch.float32, reduction_length(c.c_out, 1, c.kernel, (1, 1)))
    assert_close(dw, refs[1], torch.float32, 2 * 5 * y[0, 0].numel())
    assert_close(db, refs[2], torch.float32, 5 * y[0, 0].numel())
    if channels_last:
        assert dx.is_contiguous(memory_format=torch.channels_last)


def test_joint_backward_independent_of_threads(knobs, threads):
    """Fixed row ranges with their own accumulators: bitwise the same result on 1, 2 or more
    threads than ranges."""
    knobs(joint=1)
    c = BY_NAME["dcgan_k4s2p1"]
    xf, wf, gf, _, _ = _joint_case(c, 5, c.size, False)
    outs = []
    for n in (1, 2, 8):
        threads(n)
        outs.append(cpp_engine.joint_backward(gf, xf, wf, _geom(c), True, True, True))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_joint_backward_rule_and_threads(knobs, threads):
    """The rules take the joint pass for a layer with channels and rows enough while the
    threads fit its fixed ranges, and leave it to the separate passes (which use every thread)
    beyond; forced, it still runs."""
    c = _c("joint_rule", 2, 2, 32, 16, (6, 10), 4, 2, 1)
    xf, wf, gf, refs, _ = _joint_case(c, 2, c.size, False)
    for n, mode, runs in ((2, -1, True), (4, -1, True), (5, -1, False), (8, 1, True)):
        threads(n)
        knobs(joint=mode)
        got = cpp_engine.joint_backward(gf, xf, wf, _geom(c), True, True, True)
        assert (got is not None) == runs, (n, mode)
        if got is not None:
            assert_close(got[0], refs[0], torch.float32, 16 * 4)


@pytest.mark.parametrize("l2_kib,runs", [(512, False), (1024, True)])
def test_joint_backward_rule_tile_in_l2(knobs, threads, l2_kib, runs):
    """The joint pass keeps one (kd, kh) tile of grad_weight in L2 (a quarter of it, at least
    128 KiB): a 256 KiB tile (128 x 4 x 128 floats) takes it with 1 MiB of L2, not with 512."""
    c = _c("joint_l2", 2, 2, 128, 128, (6, 10), 4, 2, 1)
    xf, wf, gf, refs, _ = _joint_case(c, 2, c.size, False)
    threads(2)
    knobs(joint=-1)
    with cpp_engine.tuning(l2_bytes=l2_kib << 10):
        got = cpp_engine.joint_backward(gf, xf, wf, _geom(c), True, True, True)
    assert (got is not None) == runs
    if got is not None:
        assert_close(got[1], refs[1], torch.float32, 2 * 12 * 20)


def test_joint_backward_off_and_refusals(knobs):
    c = BY_NAME["dcgan_k4s2p1"]
    xf, wf, gf, _, _ = _joint_case(c, 2, c.size, False)
    knobs(joint=0)
    assert cpp_engine.joint_backward(gf, xf, wf, _geom(c), True, True, True) is None
    knobs(joint=1)
    assert cpp_engine.joint_backward(gf.double(), xf.double(), wf.double(), _geom(c),
                                     True, True, True) is None


def _binding_args():
    """A small layer's input, weight and grad_out as the 5-d tensors the bindings take."""
    c = BY_NAME["dcgan_k4s2p1"]
    xf, wf, gf, _, _ = _joint_case(c, 2, c.size, False)
    return cpp_engine.load(), _geom(c), *(cpp_engine._as5d(t) for t in (xf, wf, gf))


def test_joint_backward_rejects_inconsistent_arguments():
    """The binding checks what it is given (a clear error, never an out-of-bounds access)."""
    mod, geom, x5, w5, g5 = _binding_args()
    geo = cpp_engine._joint_geo(geom)
    with pytest.raises(RuntimeError, match="geometry does not match"):
        mod.joint_backward_ok(x5, g5[..., :-1], w5, geo, 1, -1)
    with pytest.raises(RuntimeError, match="groups"):
        mod.joint_backward_ok(x5, g5, w5, geo, 0, -1)
    with pytest.raises(RuntimeError, match="grad_bias"):
        mod.joint_backward(x5, g5, w5, None, None, torch.empty(1), geo, 1)
    with pytest.raises(RuntimeError, match="grad_input"):
        mod.joint_backward(x5, g5, w5, torch.empty_like(g5), None, None, geo, 1)


# The patch backward (grad_input, grad_weight, grad_bias from one patch matrix of grad_out),
# forced on (KSTCONV_JOINT=2) for every geometry, both dtypes and layouts, each subset of
# outputs; tiny row blocks split the patch matrix mid-image.
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("need", list(NEEDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_patch_backward(name, need, dtype, channels_last, items, knobs):
    knobs(joint=2)
    c = BY_NAME[name]
    if channels_last and c.nd == 1:
        pytest.skip("no channels-last layout in 1D")
    xf, wf, gf, refs, y = _joint_case(c, 3, c.size, channels_last, dtype)
    got = _forced("backward", "patch",
                  lambda: cpp_engine.joint_backward(gf, xf, wf, _geom(c), *NEEDS[need]))
    ks = (reduction_length(c.c_out, c.groups, c.kernel, (1,) * c.nd), 2 * 3 * y[0, 0].numel(),
          3 * y[0, 0].numel())
    for out, ref, k, wanted in zip(got, refs, ks, NEEDS[need]):
        if wanted:
            assert out.dtype == dtype
            assert_close(out, ref, dtype, k)
        else:
            assert out is None


def test_patch_backward_deterministic(knobs):
    """Row blocks in a fixed order: bitwise the same result run after run."""
    knobs(joint=2)
    c = BY_NAME["dcgan_k4s2p1"]
    xf, wf, gf, _, _ = _joint_case(c, 5, c.size, False)
    with cpp_engine.tuning(cols_cap=512):
        a = cpp_engine.joint_backward(gf, xf, wf, _geom(c), True, True, True)
        b = cpp_engine.joint_backward(gf, xf, wf, _geom(c), True, True, True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def _patch_rule_case(c_in, c_out, size, batch, groups=1, k=4, s=2, p=1):
    """Runs the rules' backward on a layer (k4s2p1 unless told); returns which path ran, after
    checking the gradients against float64."""
    nd = len(size)
    c = _c("patch_rule", nd, batch, c_in, c_out, size, k, s, p, g=groups)
    xf, wf, gf, refs, y = _joint_case(c, batch, size, False)
    got = cpp_engine.joint_backward(gf, xf, wf, _geom(c), True, True, True)
    path = cpp_engine.last_method["backward"]
    if got is None:
        return path
    assert_close(got[0], refs[0], torch.float32,
                 reduction_length(c_out, groups, c.kernel, (1,) * nd))
    assert_close(got[1], refs[1], torch.float32, 2 * batch * y[0, 0].numel())
    return path


def test_patch_backward_rule(knobs):
    """The rule gives the patch backward a deep layer (512 input channels, a 4096-long patch row,
    DCGAN's 4x4; 256 channels and a 2048-long row up to 1024 rows), a very long patch row, and
    a layer of one or two input pixels in the batch (a U-Net's innermost up-convolution at
    batch 1, 1-D too), and leaves a shallow layer, 4 pixels, 256 channels past 1024 rows and a
    grouped layer of one pixel to the other paths."""
    knobs(joint=-1)
    with cpp_engine.tuning(brgemm_rules=0):
        _patch_backward_rule_mkl()


def _patch_backward_rule_mkl():
    assert _patch_rule_case(512, 256, (4, 4), 8) == "patch"
    assert _patch_rule_case(64, 64, (1, 1), 1) == "patch"
    assert _patch_rule_case(64, 64, (1, 1), 2) == "patch"
    assert _patch_rule_case(32, 16, (1,), 2) == "patch"
    assert _patch_rule_case(64, 64, (2, 2), 1) != "patch"
    assert _patch_rule_case(64, 64, (1, 1), 1, groups=64) != "patch"
    assert _patch_rule_case(16, 8, (8, 8), 2) != "patch"
    # 256 input channels and a 2048-long row: HiFi-GAN's 256-128 k16s8 (64 rows), DCGAN's
    # 256-128@8 at 1024 rows; past 1024 rows, the separate passes
    assert _patch_rule_case(256, 128, (16,), 4, k=16, s=8, p=4) == "patch"
    assert _patch_rule_case(256, 128, (8, 8), 16) == "patch"
    assert _patch_rule_case(256, 128, (8, 8), 17) != "patch"
    assert _patch_rule_case(256, 128, (72,), 16, k=16, s=8, p=4) != "patch"   # 1152 rows
    assert _patch_rule_case(128, 128, (8, 8), 4) != "patch"
    # a very long row (FCN's k64s32: 16384 of 4 channels)
    assert _patch_rule_case(4, 4, (4, 4), 4, k=64, s=32, p=16) == "patch"


def test_patch_backward_rule_brgemm(knobs):
    """Where the GEMMs go over brgemm tiles (an AMD CPU with AVX-512), the patch backward
    keeps one or two input pixels in the batch, the very long rows and the deep layers up to
    512 rows; past them the separate passes, on brgemm's own tiles, won."""
    knobs(joint=-1)
    with cpp_engine.tuning(brgemm_rules=1):
        assert _patch_rule_case(64, 64, (1, 1), 1) == "patch"
        assert _patch_rule_case(32, 16, (1,), 2) == "patch"
        assert _patch_rule_case(512, 256, (4, 4), 8) == "patch"      # 128 rows
        assert _patch_rule_case(256, 128, (8, 8), 8) == "patch"      # 512 rows
        assert _patch_rule_case(256, 128, (8, 8), 9) != "patch"      # 576 rows
        assert _patch_rule_case(4, 4, (4, 4), 4, k=64, s=32, p=16) == "patch"
        assert _patch_rule_case(64, 64, (1, 1), 1, groups=64) != "patch"


def test_forward_rule_weight_panel_past_l2():
    """The forward rule: implicit GEMM while a phase's weight panel for one tap row fits one
    core's L2, the patch matrix x BLAS once it does not (its tiles would stream it again)."""
    if not cpp_engine.gemm_paths()["brgemm"]:
        pytest.skip("the rule picks among brgemm paths; this PyTorch exports no brgemm")
    x = torch.randn(2, 64, 12, 12)
    w = torch.randn(64, 32, 4, 4)
    geom = geometry_of((12, 12), (4, 4), (2, 2), (1, 1), (0, 0), 1, (1, 1))
    ref = torch.nn.functional.conv_transpose2d(x.double(), w.double(), stride=2, padding=1)
    act = parse_activation(None)
    # panel: 2 taps along w x 64 x 32 channels x 4 bytes = 16 KiB
    for l2, method in ((1 << 20, 3), (8 << 10, 1)):
        with cpp_engine.tuning(l2_bytes=l2, winograd=0):
            out, _ = cpp_engine.forward(x, w, None, geom, act, False)
        assert cpp_engine.last_method["fwd"] == method, (l2, cpp_engine.last_method)
        assert_close(out, ref, torch.float32, reduction_length(64, 1, (4, 4), (2, 2)))


@pytest.mark.parametrize("c_in,size,no_graph,graph", [
    (1024, (4, 4), 2, 2), (1024, (2, 2), 2, 2), (1024, (1, 1), 5, 2), (1024, (1, 2), 5, 2),
    (1024, (4, 5), 1, 1), (256, (2, 2), 5, 2), (256, (8, 8), 1, 1)], ids=str)
def test_forward_rule_weight_heavy(c_in, size, no_graph, graph):
    """A weight-heavy layer (a big weight, a few pixels): with a weight of 16 MiB and more, up
    to 16 pixels GEMM first, which streams the weight once, in place (gemm_short_m: the counter
    says it ran); where fewer than half of its products land in the output (a 1x1 or 1x2 input at
    stride 2) or the weight is smaller (2 MiB), the patch matrix x brgemm with the weight packed
    once (cached) when no graph is recorded, and GEMM first in a pass that records one
    (training: the weight changes every step, so it would be packed on every call); from 17
    pixels the patch matrix x BLAS."""
    if not (cpp_engine.gemm_paths()["brgemm"] and cpp_engine.gemm_paths()["skinny"]):
        pytest.skip("the rule picks among brgemm paths and the short-dimension GEMMs")
    import triton_kstconv as K
    x = torch.randn(1, c_in, *size)
    w = torch.randn(c_in, 256, 4, 4)
    ref = torch.nn.functional.conv_transpose2d(x.double(), w.double(), stride=2, padding=1)
    runs = cpp_engine.load().skinny_gemm_runs
    for wt, expect in ((w, no_graph), (w.clone().requires_grad_(), graph)):
        before = runs()
        with torch.set_grad_enabled(wt.requires_grad), cpp_engine.tuning(brgemm_rules=0,
                                                                         winograd=0):
            out = K.conv_transpose2d(x, wt, stride=2, padding=1, backend="cpp")
        assert cpp_engine.last_method["fwd"] == expect, wt.requires_grad
        assert (runs() > before) == (expect == 2)
        assert_close(out.detach(), ref, torch.float32, reduction_length(c_in, 1, (4, 4), (2, 2)))


@pytest.mark.parametrize("c_in,c_out,size,batch,graph", [
    (1024, 256, (16, 16), 1, 2), (1024, 512, (8, 8), 1, 2), (512, 256, (4, 4), 16, 1),
    (256, 128, (8, 8), 16, 3), (512, 256, (4, 4), 64, 1)], ids=str)
def test_forward_rule_brgemm(c_in, c_out, size, batch, graph):
    """The forward rule where the GEMMs go over brgemm tiles: in a training pass GEMM first
    where the weight outweighs input and output eightfold (pix2pix's deep layers at batch 1),
    the patch matrix from a 512 KiB weight panel whatever the L2 (DCGAN 512-256 at 4x4),
    implicit GEMM below it (DCGAN 256-128 at 8x8)."""
    if not (cpp_engine.gemm_paths()["brgemm"] and cpp_engine.gemm_paths()["skinny"]):
        pytest.skip("the rule picks among brgemm paths and the short-dimension GEMMs")
    import triton_kstconv as K
    x = torch.randn(batch, c_in, *size)
    w = torch.randn(c_in, c_out, 4, 4, requires_grad=True)
    ref = torch.nn.functional.conv_transpose2d(x.double(), w.detach().double(), stride=2,
                                               padding=1)
    with cpp_engine.tuning(brgemm_rules=1, l2_bytes=2 << 20, winograd=0):
        out = K.conv_transpose2d(x, w, stride=2, padding=1, backend="cpp")
    assert cpp_engine.last_method["fwd"] == graph
    assert_close(out.detach(), ref, torch.float32, reduction_length(c_in, 1, (4, 4), (2, 2)))


def test_forward_rule_weight_heavy_one_tap_a_phase():
    """A weight-heavy k2s2 layer past 16 pixels (a U-Net's deep up-convolution): in a pass that
    records a graph (the weight packed for that call only) GEMM first, which multiplies the
    weight as it is; with the packed weight kept (no graph), the patch matrix x BLAS."""
    if not (cpp_engine.gemm_paths()["brgemm"] and cpp_engine.gemm_paths()["skinny"]):
        pytest.skip("the rule picks among brgemm paths and the short-dimension GEMMs")
    import triton_kstconv as K
    x = torch.randn(1, 512, 8, 8)
    w = torch.randn(512, 256, 2, 2)
    ref = torch.nn.functional.conv_transpose2d(x.double(), w.double(), stride=2)
    for wt, expect in ((w, 1), (w.clone().requires_grad_(), 2)):
        with torch.set_grad_enabled(wt.requires_grad):
            out = K.conv_transpose2d(x, wt, stride=2, backend="cpp")
        assert cpp_engine.last_method["fwd"] == expect, wt.requires_grad
        assert_close(out.detach(), ref, torch.float32, reduction_length(512, 1, (2, 2), (2, 2)))


@pytest.mark.parametrize("nd,size,k,s,p,act", [
    (2, (6, 16), 4, 2, 1, "relu"),      # two phases interleaved, rows of 32
    (2, (5, 12), 3, 2, 1, None),        # rows of 23: the aligned head, then the tail
    (1, (13,), 16, 8, 4, "silu"),       # eight phases interleaved by transposes
    (1, (7,), 16, 8, 0, None),
], ids=str)
def test_direct_streaming_stores(nd, size, k, s, p, act):
    """The direct strategy's non-temporal row writes (taken for large destinations; forced here
    for any size) and the epilogue run on the phase sums before them, against PyTorch."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, *size)
    w = torch.randn(6, 2, *(k,) * nd)
    b = torch.randn(12)
    geom = geometry_of(size, (k,) * nd, (s,) * nd, (p,) * nd, (0,) * nd, 6, (1,) * nd)
    conv = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d}[nd]
    ref = conv(x.double(), w.double(), b.double(), stride=s, padding=p, groups=6)
    ref = {None: ref, "relu": torch.relu(ref), "silu": torch.nn.functional.silu(ref)}[act]
    for stream_bytes, row_kernel in ((1, 1), (1, 0), (1 << 40, 1), (1 << 40, 0)):
        with cpp_engine.tuning(stream_bytes=stream_bytes, row_kernel=row_kernel):
            out, _ = _forced("fwd", 7, lambda: cpp_engine.forward(
                x, w, b, geom, parse_activation(act), False, method=7))
        assert_close(out, ref, torch.float32, reduction_length(1, 1, (k,) * nd, (s,) * nd))


def _switch_both_ways(switch, runs, method, call, ref, ref_pre, red):
    """A float32 forward forced to ``method`` with the tuning switch on, then off: the pass
    counter ``runs()`` says the switched path ran exactly when on, and both outputs (and the
    pre-activation, where ``ref_pre`` is given) are PyTorch's."""
    for on in (1, 0):
        before = runs()
        with cpp_engine.tuning(**{switch: on}):
            out, pre = _forced("fwd", method, call)
        assert runs() - before == on
        assert_close(out, ref, torch.float32, red)
        if ref_pre is not None:
            assert_close(pre, ref_pre, torch.float32, red)


# (nd, size, kernel, stride, padding, output_padding, dilation, channels a group out)
ROW_KERNEL_CASES = [
    (2, (16, 16), (4, 4), (2, 2), (1, 1), (0, 0), (1, 1), 1),  # decoders' k4s2p1, rows of 32
    (2, (5, 12), (3, 3), (2, 2), (1, 1), (1, 1), (1, 1), 1),   # one and two taps a phase
    (2, (7, 9), (2, 2), (2, 2), (0, 0), (0, 0), (1, 1), 2),    # k2s2, channel multiplier 2
    (2, (6, 11), (5, 5), (2, 2), (2, 2), (1, 1), (1, 1), 3),   # rows of 23: the partial tail
    (1, (37,), (4,), (2,), (1,), (0,), (1,), 1),               # 1-D: two vectors, then one
    (2, (4, 5), (3, 3), (2, 2), (0, 0), (0, 0), (2, 2), 1),    # dilation 2
    (2, (6, 9), (3, 4), (1, 2), (1, 1), (0, 0), (1, 1), 1),    # stride 1 along h
    (2, (5, 6), (2, 4), (3, 2), (0, 1), (0, 0), (1, 1), 1),    # rows no h-phase reaches
    (2, (3, 20), (9, 9), (2, 2), (4, 4), (1, 1), (1, 1), 2),   # 25 taps a phase (run-time count)
]


@pytest.mark.parametrize("case", ROW_KERNEL_CASES, ids=str)
@pytest.mark.parametrize("act", [None, "relu6", ("leaky_relu", 0.2), "silu"], ids=str)
@pytest.mark.parametrize("keep_pre", [False, True], ids=["no_pre", "pre"])
def test_direct_row_kernel(case, act, keep_pre):
    """The direct forward's row kernel (depthwise and channel multipliers, stride 2 along w,
    float32) and the general direct path it replaces, both against PyTorch: the counter says
    which ran."""
    nd, size, k, s, p, op, dil, mult = case
    groups = 5
    x, w, b = make_case(nd, 2, groups, groups * mult, groups, size, k, s, p, op, dil, True,
                        torch.float32, seed=3)
    x = x * 8   # sums past relu6's clip
    geom = geometry_of(size, k, s, p, op, groups, dil)
    a = parse_activation(act)
    ref_pre = reference(x, w, b, nd, stride=s, padding=p, output_padding=op, groups=groups,
                        dilation=dil)
    ref = epilogue.apply(ref_pre, a)
    _switch_both_ways("row_kernel", cpp_engine.load().row_kernel_runs, 7,
                      lambda: cpp_engine.forward(x, w, b, geom, a, keep_pre, method=7),
                      ref, ref_pre if keep_pre else None,
                      reduction_length(1, 1, k, s) * math.prod(dil))


# (nd, size, kernel, stride, padding, output_padding, groups, channels_last)
WHOLE_ROW_CASES = [
    (2, (8, 8), 4, 2, 1, 0, 1, False),     # DCGAN's k4s2p1: rows of 8, padded on both sides
    (2, (6, 5), 3, 2, 1, 1, 1, False),     # phases of 5 and 6 pixels, h classes at the border
    (2, (7, 6), 5, 3, 2, 2, 1, False),     # three phases, taps clipped at the h borders
    (2, (5, 9), 3, 1, 1, 0, 1, False),     # stride 1: one phase
    (2, (6, 6), 2, 2, 0, 0, 2, False),     # k2s2, two groups: pixel step past the group
    (2, (6, 7), 2, 2, 0, 0, 1, True),      # k2s2 from a channels-last source read in place
    (3, (3, 4, 5), 2, 2, 0, 0, 1, False),  # 3-D U-Net's k2s2
    (3, (4, 3, 4), 4, 2, 1, 0, 1, False),  # 3-D k4s2p1: d classes too
]


@pytest.mark.parametrize("case", WHOLE_ROW_CASES, ids=str)
@pytest.mark.parametrize("act", [None, "relu"], ids=str)
def test_implicit_whole_rows(case, act, threads):
    """Implicit GEMM's whole-row tiles (a tile spans rows shorter than it, the pixels between
    rows computed and dropped) and one row a tile, both against PyTorch, with the pre-activation
    kept: the counter says which ran. Two threads: the path needs 4 items a thread, and with
    many threads the blocks shrink to one row."""
    threads(2)
    nd, size, k, s, p, op, groups, cl = case
    kk, ss, pp, oo, dd = (k,) * nd, (s,) * nd, (p,) * nd, (op,) * nd, (1,) * nd
    x, w, b = make_case(nd, 3, 6 * groups, 5 * groups, groups, size, kk, ss, pp, oo, dd, True,
                        torch.float32, seed=5)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    geom = geometry_of(size, kk, ss, pp, oo, groups, dd)
    a = parse_activation(act)
    ref_pre = reference(x, w, b, nd, stride=ss, padding=pp, output_padding=oo, groups=groups)
    ref = epilogue.apply(ref_pre, a)
    _switch_both_ways("whole_rows", cpp_engine.load().implicit_whole_row_runs, 3,
                      lambda: cpp_engine.forward(x, w, b, geom, a, True, method=3),
                      ref, ref_pre, reduction_length(6 * groups, groups, kk, ss))


@pytest.mark.parametrize("why", ["float64", "channels_last", "taps", "grouped", "3d"])
def test_direct_row_kernel_declines(why):
    """Layers the row kernel does not serve go to the general direct path (and are right)."""
    nd, size, k, s, cin_g = 2, (6, 7), (4, 4), (2, 2), 1
    dtype = torch.float64 if why == "float64" else torch.float32
    if why == "taps":
        k = (13, 13)            # 7 x 7 taps a phase: past the kernel's register tables
    if why == "grouped":
        cin_g = 2               # two source channels a group
    if why == "3d":
        nd, size, k, s = 3, (3, 4, 5), (2, 4, 4), (2, 2, 2)
    groups = 3
    x, w, b = make_case(nd, 2, groups * cin_g, groups, groups, size, k, s, (1,) * nd, (0,) * nd,
                        (1,) * nd, True, dtype)
    if why == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    geom = geometry_of(size, k, s, (1,) * nd, (0,) * nd, groups, (1,) * nd)
    mod = cpp_engine.load()
    runs = mod.row_kernel_runs()
    out, _ = _forced("fwd", 7, lambda: cpp_engine.forward(x, w, b, geom, parse_activation(None),
                                                           False, method=7))
    assert mod.row_kernel_runs() == runs
    ref = reference(x, w, b, nd, stride=s, padding=(1,) * nd, groups=groups)
    assert_close(out, ref, dtype, reduction_length(groups * cin_g, groups, k, s))


def test_patch_backward_rejects_inconsistent_arguments():
    mod, geom, x5, w5, g5 = _binding_args()
    gi = cpp_engine.grad_input_plan(geom)
    with pytest.raises(RuntimeError, match="groups"):
        mod.patch_backward_ok(x5, g5, w5, 0, 2)
    with pytest.raises(RuntimeError, match="dtypes"):
        mod.patch_backward_ok(x5.double(), g5, w5, 1, 2)
    with pytest.raises(RuntimeError, match="groups"):
        mod.patch_backward(x5, g5, w5, torch.empty_like(x5), None, None, gi, 2)
    with pytest.raises(RuntimeError, match="grad_bias"):
        mod.patch_backward(x5, g5, w5, None, None, torch.empty(1), gi, 1)
    with pytest.raises(RuntimeError, match="grad_input"):
        mod.patch_backward(x5, g5, w5, torch.empty_like(g5), None, None, gi, 1)
    with pytest.raises(RuntimeError, match="every tap"):
        mod.patch_backward(x5, g5[..., :-2, :-2], w5, torch.empty_like(x5), None, None, gi, 1)


# Weight-heavy layers of a few pixels (pix2pix's inner levels at batch 1) through the engine's
# short-dimension GEMMs (gemm_skinny.cpp).
# (nd, N, c_in, c_out, groups, size, kernel, stride, padding, output_padding, dilation)
SKINNY_CASES = [
    (2, 1, 64, 40, 1, (2, 2), (4, 4), (2, 2), (1, 1), (0, 0), (1, 1)),   # pix2pix's 2x2 level
    (2, 1, 48, 21, 1, (4, 4), (3, 3), (2, 2), (1, 1), (1, 1), (1, 1)),   # 16 pixels, 189 columns
    (2, 2, 40, 12, 2, (3, 5), (5, 5), (3, 3), (2, 2), (0, 0), (1, 1)),   # groups, 30 pixels
    (3, 1, 24, 10, 1, (2, 2, 3), (2, 2, 2), (2, 2, 2), (0, 0, 0), (0, 0, 0), (1, 1, 1)),  # 3-D
    (1, 3, 32, 17, 1, (5,), (4,), (2,), (1,), (0,), (1,)),               # 1-D, 3 images of 5
    (2, 4, 33, 9, 1, (1, 1), (4, 4), (1, 1), (0, 0), (0, 0), (1, 1)),    # a 1x1 latent
    (2, 1, 20, 8, 1, (4, 8), (4, 4), (2, 2), (1, 1), (0, 0), (2, 2)),    # 32 pixels, dilation 2
    (2, 1, 130, 6, 1, (3, 3), (2, 2), (2, 2), (0, 0), (0, 0), (1, 1)),   # 130 rows of dW, 8 columns
]


@pytest.mark.parametrize("case", SKINNY_CASES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice"])
def test_skinny_gemms(case, layout, knobs, threads):
    """Few-pixel layers through the short-dimension GEMMs: the forward's GEMM first (C = X x W,
    the weight streamed in place, up to 32 pixels; rows in tiles of 6 and a tail, columns in
    strips of 16 and a partial one), grad_weight's GEMM first and the patch backward (dW written
    from a reduction over at most 16 pixels; one image at a time, accumulating, where the images
    do not sit at one stride). The counter says when the GEMMs ran (the reduction of grad_weight
    only up to 16 pixels), every output is PyTorch's, and bitwise the same on 1 and 3 threads."""
    if not cpp_engine.gemm_paths()["skinny"]:
        pytest.skip("the short-dimension GEMMs need AVX2 with FMA")
    nd, N, ci, co, g, size, k, s, p, op, dil = case
    if layout == "channels_last" and nd == 1:
        pytest.skip("no channels-last layout in 1D")
    x, w, b = make_case(nd, N, ci, co, g, size, k, s, p, op, dil, True, torch.float32, seed=5)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if nd == 2 else torch.channels_last_3d)
    elif layout == "channel_slice":   # images one batch stride apart, not c_in x pixels
        x = torch.cat([x, torch.randn_like(x[:, :3])], 1)[:, :ci]
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    y = reference(xr, wr, br, nd, stride=s, padding=p, output_padding=op, groups=g, dilation=dil)
    gy = torch.randn_like(y)
    y.backward(gy)
    geom = geometry_of(size, k, s, p, op, g, dil)
    runs = cpp_engine.load().skinny_gemm_runs
    short_k = N * math.prod(size) <= 16
    fwd = lambda: cpp_engine.forward(x, w, b, geom, parse_activation(None), False,  # noqa: E731
                                     method=2)[0]
    wgrad = lambda: cpp_engine.grad_weight(x, gy.float(), w.shape, geom,  # noqa: E731
                                           torch.float32, method=2)
    threads(3)
    out3, dw3 = fwd(), wgrad()
    threads(1)
    before = runs()
    out = _forced("fwd", 2, fwd)
    assert runs() > before
    assert_close(out, y, torch.float32, reduction_length(ci, g, k, s))
    before = runs()
    dw = _forced("wgrad", 2, wgrad)
    assert (runs() > before) == short_k
    assert_close(dw, wr.grad, torch.float32, N * math.prod(size))
    assert torch.equal(out, out3) and torch.equal(dw, dw3)
    knobs(joint=2)
    before = runs()
    dx, dw, db = _forced("backward", "patch", lambda: cpp_engine.joint_backward(
        gy.float(), x, w, geom, True, True, True))
    assert (runs() > before) == short_k
    assert_close(dx, xr.grad, torch.float32, reduction_length(co, g, k, (1,) * nd))
    assert_close(dw, wr.grad, torch.float32, N * math.prod(size))
    assert_close(db, br.grad, torch.float32, y[0, 0].numel() * N)


@pytest.mark.parametrize("rows", [0, 1])
@pytest.mark.parametrize("c_in,c_out,expect", [(16, 16, 3), (8, 4, 3), (4, 16, 3), (21, 21, 3),
                                               (64, 3, 2), (32, 1, 2)])
def test_grad_weight_rule_few_channels(c_in, c_out, expect, rows):
    """grad_weight's rule for ungrouped 2-D layers of few channels: brgemm from 4 input and 4
    output channels (FCN's 21 classes, small decoders), or the register tiles where AVX-512 runs
    them (rows=1), GEMM first for 1-3 output channels (RGB and grey heads); either way the sums
    are PyTorch's."""
    if not cpp_engine.gemm_paths()["brgemm"]:
        pytest.skip("the rule picks among brgemm paths; this PyTorch exports no brgemm")
    _rows_or_skip(rows)
    expect = 5 if rows and expect == 3 else expect
    x = torch.randn(2, c_in, 9, 7)
    w = torch.randn(c_in, c_out, 4, 4)
    geom = geometry_of(x.shape[2:], (4, 4), (2, 2), (1, 1), (0, 0), 1, (1, 1))
    xr, wr = x.double(), w.double().requires_grad_()
    y = torch.nn.functional.conv_transpose2d(xr, wr, None, 2, 1)
    g = torch.randn_like(y)
    y.backward(g)
    with cpp_engine.tuning(wgrad_rows=rows):
        dw = cpp_engine.grad_weight(x, g.float(), w.shape, geom, torch.float32)
    assert cpp_engine.last_method["wgrad"] == expect
    assert_close(dw, wr.grad, torch.float32, 2 * y[0, 0].numel())


@pytest.mark.parametrize("c_in,rows_taken", [(64, True), (65, False), (71, False), (72, True),
                                              (97, False), (100, True), (130, True), (21, True)])
def test_grad_weight_rule_rows_lanes(c_in, rows_taken):
    """The register tiles hold 16 input channels a vector: from 64 channels, where more than an
    eighth of the lanes would be padding, the rule leaves the layer to the other strategies."""
    _rows_or_skip(True)
    x = torch.randn(2, c_in, 8, 8)   # as many input elements as weights: not weight-heavy
    w = torch.randn(c_in, 8, 4, 4)
    geom = geometry_of(x.shape[2:], (4, 4), (2, 2), (1, 1), (0, 0), 1, (1, 1))
    xr, wr = x.double(), w.double().requires_grad_()
    y = torch.nn.functional.conv_transpose2d(xr, wr, None, 2, 1)
    g = torch.randn_like(y)
    y.backward(g)
    dw = cpp_engine.grad_weight(x, g.float(), w.shape, geom, torch.float32)
    assert (cpp_engine.last_method["wgrad"] == 5) == rows_taken, cpp_engine.last_method
    assert_close(dw, wr.grad, torch.float32, 2 * y[0, 0].numel())


@pytest.mark.parametrize("n,c_in,c_out,size", [(6, 128, 64, 6), (1, 128, 64, 9), (3, 48, 40, 5),
                                             (2, 256, 130, 4)], ids=str)
@pytest.mark.parametrize("method", [3, 5])
def test_grad_weight_tiles_independent_of_threads(n, c_in, c_out, size, method, threads):
    """grad_weight's brgemm (3) and register tiles (5) split the batch into ranges fixed by the
    shape, and only then cut smaller tiles where threads would be idle (a batch of one): bitwise
    the same sums on 1, 2, 3 and 8 threads, and PyTorch's."""
    if not cpp_engine.gemm_paths()["brgemm"]:
        pytest.skip("this PyTorch exports no brgemm")
    _rows_or_skip(method == 5)
    x, w, _ = make_case(2, n, c_in, c_out, 1, (size, size), (4, 4), (2, 2), (1, 1), (0, 0),
                        (1, 1), False, torch.float32, seed=7)
    geom = geometry_of(x.shape[2:], (4, 4), (2, 2), (1, 1), (0, 0), 1, (1, 1))
    xr, wr = x.double(), w.double().requires_grad_()
    y = torch.nn.functional.conv_transpose2d(xr, wr, None, 2, 1)
    g = torch.randn_like(y)
    y.backward(g)
    outs = []
    for t in (1, 2, 3, 8):
        threads(t)
        outs.append(_forced("wgrad", method, lambda: cpp_engine.grad_weight(
            x, g.float(), w.shape, geom, torch.float32, method=method)))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    assert_close(outs[0], wr.grad, torch.float32, n * size * size * 4)


@pytest.mark.parametrize("rows", [0, 1])
@pytest.mark.parametrize("cin_g,groups,expect", [(1, 16, 4), (8, 4, 4), (4, 8, 4), (16, 2, 3)])
def test_grad_weight_rule_grouped(cin_g, groups, expect, rows):
    """grad_weight's rule for grouped layers: the direct dot products up to 8 input channels a
    group (depthwise included), brgemm from 16, or there the register tiles where AVX-512 runs
    them (rows=1); either way the sums are PyTorch's."""
    if expect == 3 and not cpp_engine.gemm_paths()["brgemm"]:
        pytest.skip("this PyTorch build has no brgemm")
    _rows_or_skip(rows)
    expect = 5 if rows and expect == 3 else expect
    c_in = cin_g * groups
    x = torch.randn(2, c_in, 9, 7)
    w = torch.randn(c_in, 8, 4, 4)
    geom = geometry_of(x.shape[2:], (4, 4), (2, 2), (1, 1), (0, 0), groups, (1, 1))
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    y = torch.nn.functional.conv_transpose2d(xr, wr, None, 2, 1, groups=groups)
    g = torch.randn_like(y)
    y.backward(g)
    with cpp_engine.tuning(wgrad_rows=rows):
        dw = cpp_engine.grad_weight(x, g.float(), w.shape, geom, torch.float32)
    assert cpp_engine.last_method["wgrad"] == expect
    assert_close(dw, wr.grad, torch.float32, 2 * y[0, 0].numel())


@pytest.mark.parametrize("nd,c_out,method,rules", [
    (2, 64, 3, 0), (2, 128, 1, 0), (3, 64, 3, 0), (3, 128, 1, 0), (2, 128, 3, 1), (3, 128, 3, 1)],
    ids=str)
def test_grad_input_rule_kernel_equals_stride(nd, c_out, method, rules):
    """grad_input of a k2s2 layer (U-Net decoders) of at least 1024 input pixels: the patch
    matrix (grad_out rearranged, one dense GEMM) from 128 grad_out channels, implicit GEMM
    below; implicit GEMM throughout where the GEMMs go over brgemm tiles (rules=1). Either way
    PyTorch's values."""
    if not cpp_engine.gemm_paths()["brgemm"]:
        pytest.skip("the rule picks among brgemm paths; this PyTorch exports no brgemm")
    size = {2: (32, 33), 3: (8, 10, 13)}[nd]   # rows of more than 8 pixels
    k = (2,) * nd
    x, w, _ = make_case(nd, 1, 8, c_out, 1, size, k, k, (0,) * nd, (0,) * nd, (1,) * nd, False,
                        torch.float64)
    xr = x.clone().requires_grad_()
    y = reference(xr, w, None, nd, stride=k)
    g = torch.randn_like(y)
    y.backward(g)
    with cpp_engine.tuning(brgemm_rules=rules):
        dx = cpp_engine.grad_input(g.float(), w.float(), geometry_of(size, k, k, (0,) * nd,
                                                                     (0,) * nd, 1, (1,) * nd))
    assert cpp_engine.last_method["dgrad"] == method, cpp_engine.last_method
    assert_close(dx, xr.grad, torch.float32, reduction_length(c_out, 1, k, k))


@pytest.mark.parametrize("nd,c_out,k,dtype,n_threads,direct", [
    (2, 3, 4, torch.float32, 2, True), (2, 1, 9, torch.float32, 2, True),
    (1, 4, 16, torch.float32, 2, True), (3, 1, 2, torch.float32, 2, True),
    (2, 8, 4, torch.float32, 2, False), (3, 3, 4, torch.float32, 2, False),
    (2, 3, 4, torch.float64, 2, False), (2, 3, 4, torch.float32, 13, False)], ids=str)
def test_grad_input_rule_few_channels(nd, c_out, k, dtype, n_threads, direct, threads):
    """grad_input's rule for an ungrouped layer with a handful of output channels: the direct
    path up to 4 of them and 81 products an element (float32), while its blocks (image x 4
    input channels: 12 here) give every thread one; a GEMM path otherwise. Either way PyTorch's
    values."""
    threads(n_threads)
    size = {1: (37,), 2: (9, 11), 3: (5, 4, 6)}[nd]
    x, w, _ = make_case(nd, 2, 24, c_out, 1, size, (k,) * nd, (2,) * nd, (1,) * nd, (0,) * nd,
                        (1,) * nd, False, torch.float64)
    xr = x.clone().requires_grad_()
    conv = dict(stride=(2,) * nd, padding=(1,) * nd, output_padding=(0,) * nd, groups=1,
                dilation=(1,) * nd)
    y = reference(xr, w, None, nd, **conv)
    g = torch.randn_like(y)
    y.backward(g)
    geom = geometry_of(size, (k,) * nd, (2,) * nd, (1,) * nd, (0,) * nd, 1, (1,) * nd)
    dx = cpp_engine.grad_input(g.to(dtype), w.to(dtype), geom)
    assert (cpp_engine.last_method["dgrad"] == 7) == direct, cpp_engine.last_method
    assert_close(dx, xr.grad, dtype, reduction_length(c_out, 1, (k,) * nd, (1,) * nd))
