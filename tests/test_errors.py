"""Bad arguments raise clear exceptions (naming the argument and value), like PyTorch's."""
import pytest
import torch

import triton_kstconv as K

x = torch.randn(1, 4, 5, 5)
w = torch.randn(4, 2, 3, 3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(stride=0), "non-positive stride"),
    (dict(stride=(1, 2, 3)), "stride"),
    (dict(stride=1.5), "stride"),
    (dict(padding=-1), "negative padding"),
    (dict(output_padding=-1), "negative output_padding"),
    (dict(output_padding=2, stride=2), "output padding must be smaller"),
    (dict(output_padding=(0, 1)), "output padding must be smaller"),
    (dict(dilation=0), "dilation should be greater than zero"),
    (dict(groups=0), "non-positive groups"),
    (dict(groups=3), "groups=3"),
    (dict(groups=True), "groups"),
    (dict(bias=torch.randn(3)), "bias"),
    (dict(activation="swish"), "unknown activation"),
    (dict(activation=("leaky_relu", float("nan"))), "negative_slope"),
    (dict(activation=("relu", 1.0)), "takes no parameter"),
    (dict(backend="cuda"), "unknown backend"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, RuntimeError, TypeError), match=match):
        K.conv_transpose2d(x, w, **kwargs)


def test_errors_are_value_and_runtime_errors():
    with pytest.raises(ValueError):
        K.conv_transpose2d(x, w, stride=0)
    with pytest.raises(RuntimeError):  # code written against PyTorch keeps working
        K.conv_transpose2d(x, w, stride=0)


@pytest.mark.parametrize("inp,wt,match", [
    (torch.randn(1, 5, 5, 5), w, "to have 4 channels, but got 5"),
    (torch.randn(5, 5), w, "Expected 3D \\(unbatched\\) or 4D \\(batched\\)"),
    (x, torch.randn(4, 2, 3), "weight"),
    (torch.randn(1, 4, 0, 5), w, "Only zero batch or zero channel"),
    (torch.randn(1, 4, 1, 1), torch.randn(4, 2, 1, 1), None),  # fine
    (x.double(), w, "same dtype"),
    (x.int(), w.int(), "floating-point"),
    ([1.0], w, "must be a Tensor"),
])
def test_bad_tensors(inp, wt, match):
    if match is None:   # the control: a valid call succeeds
        assert K.conv_transpose2d(inp, wt).shape == (1, 2, 1, 1)
    else:
        with pytest.raises((ValueError, RuntimeError, TypeError), match=match):
            K.conv_transpose2d(inp, wt)


def test_output_too_small():
    with pytest.raises(RuntimeError, match="Output size is too small"):
        K.conv_transpose2d(torch.randn(1, 4, 1, 1), torch.randn(4, 2, 1, 1), padding=1)


def test_output_size_out_of_range():
    m = K.ConvTranspose2d(4, 2, 3, stride=2)
    with pytest.raises(ValueError, match="requested an output size of \\[20, 20\\]"):
        m(x, output_size=[20, 20])


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.conv_transpose2d(x, w, backend="triton")


def test_cpp_needs_cpu_tensors():
    meta = torch.empty(1, 4, 5, 5, device="meta")
    with pytest.raises(RuntimeError, match="backend='cpp' runs on CPU tensors"):
        K.conv_transpose2d(meta, w.to("meta"), backend="cpp")


def test_padding_mode_rejected_like_pytorch():
    with pytest.raises(ValueError, match="padding mode"):
        K.ConvTranspose2d(4, 2, 3, padding_mode="reflect")


def test_checks_cached_per_signature_still_reject_bad_arguments():
    """A call signature that passed the checks skips them when it comes again (functional's
    cache); arguments that equal a cached good one but are wrong (True == 1), another dtype or
    device, or changed knobs never ride on it."""
    from triton_kstconv import config, functional
    from triton_kstconv.geometry import ConvArgumentError
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 3, 3, 3)
    good = K.conv_transpose2d(x, w, stride=1, padding=(0, 0), groups=1)
    assert any(k[1] == x.shape and k[4] == w.shape for k in functional._CHECKED)
    for kw, match in [(dict(stride=True), "stride"), (dict(groups=True), "groups"),
                      (dict(padding=(True, 0)), "padding"),
                      (dict(activation=("leaky_relu", True)), "leaky_relu")]:
        with pytest.raises(ConvArgumentError, match=match):
            K.conv_transpose2d(x, w, **kw)
    with pytest.raises(TypeError, match="dtype"):
        K.conv_transpose2d(x, w.double())
    with pytest.raises(ConvArgumentError, match="channels"):
        K.conv_transpose2d(torch.randn(1, 5, 5, 5), w)
    torch.testing.assert_close(K.conv_transpose2d(x, w, stride=1, padding=(0, 0), groups=1), good)
    with config.override(backend="torch"):   # the knobs are part of the signature
        torch.testing.assert_close(K.conv_transpose2d(x, w), good)
        with pytest.raises(ConvArgumentError, match="backend"):
            K.conv_transpose2d(x, w, backend="nope")


def test_symbolic_shapes_bypass_the_check_cache(monkeypatch):
    """Symbolic sizes (make_fx's symbolic tracing) do not hash: such a call takes the checks
    every time instead of failing in the cache. (The engine is stubbed with PyTorch's op: what
    is under test is the functional layer.)"""
    from torch.fx.experimental.proxy_tensor import make_fx
    from triton_kstconv import ops
    monkeypatch.setattr(ops, "conv_transpose_eager", lambda x, w, b, conv, *rest:
                        torch.nn.functional.conv_transpose2d(x, w, b, *conv[:3], conv[3],
                                                             conv[4]))
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 3, 3, 3)
    traced = make_fx(lambda x, w: K.conv_transpose2d(x, w, stride=2), tracing_mode="symbolic")(
        x, w)
    torch.testing.assert_close(traced(x, w), torch.nn.functional.conv_transpose2d(x, w, stride=2))
