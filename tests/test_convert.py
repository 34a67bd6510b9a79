"""convert(): subclasses and parametrized layers converted (the parametrization keeps working),
layers it cannot serve left stock and said so, and fuse=True: BatchNorm and activation folded in
eval mode, fused where they follow in training, state_dict unchanged."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import triton_kstconv as K
from triton_kstconv import weight_cache
from triton_kstconv.modules import ConversionReport


def _pair(model):
    """(stock, converted) copies of ``model``, in float64."""
    stock = model.double()
    ours = copy.deepcopy(stock)
    K.convert(ours)
    return stock, ours


def test_weight_norm_parametrization_converts_and_trains_like_stock():
    torch.manual_seed(0)
    stock = parametrizations.weight_norm(nn.ConvTranspose1d(6, 4, 16, stride=8, padding=4))
    stock = stock.double()
    ours = copy.deepcopy(stock)
    ours, rep = K.convert(ours, report=True)
    assert isinstance(ours, K.ConvTranspose1d) and parametrize.is_parametrized(ours, "weight")
    assert [r[2] for r in rep.rows] == ["converted"]
    assert ours.state_dict().keys() == stock.state_dict().keys()
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    target = torch.randn(2, 4, 40, dtype=torch.float64)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (stock, ours)]
    for _ in range(3):   # the same steps: weight_g and weight_v get the same gradients
        for m, opt in zip((stock, ours), opts):
            opt.zero_grad()
            ((m(x) - target) ** 2).mean().backward()
            opt.step()
    for (n, a), (_, b) in zip(stock.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(b, a, msg=n)
    # removing the parametrization leaves the layer converted, with the same weight
    parametrize.remove_parametrizations(ours, "weight")
    parametrize.remove_parametrizations(stock, "weight")
    assert isinstance(ours, K.ConvTranspose1d)
    torch.testing.assert_close(ours(x), stock(x))


def test_spectral_norm_parametrization():
    torch.manual_seed(0)
    stock, ours = _pair(parametrizations.spectral_norm(nn.ConvTranspose2d(4, 3, 4, 2, 1)))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(ours(x), stock(x))   # training: one power iteration each
    torch.testing.assert_close(ours.eval()(x), stock.eval()(x))


def test_subclass_keeping_forward_converts():
    class Up(nn.ConvTranspose2d):
        def scale(self):
            return self.stride[0]

    stock, ours = _pair(Up(4, 3, 4, 2, 1))
    assert isinstance(ours, Up) and isinstance(ours, K.ConvTranspose2d) and ours.scale() == 2
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x), stock(x))


def test_subclass_with_its_own_forward_is_left_stock_and_said_so():
    class Clipped(nn.ConvTranspose2d):
        def forward(self, x, output_size=None):
            return super().forward(x, output_size).clamp(-1, 1)

    model = nn.Sequential(nn.ConvTranspose2d(2, 2, 3), Clipped(2, 2, 3))
    with pytest.warns(RuntimeWarning, match=r"1 \(Clipped\): Clipped overrides forward"):
        K.convert(model)
    assert type(model[1]) is Clipped and isinstance(model[0], K.ConvTranspose2d)
    _, rep = K.convert(nn.Sequential(Clipped(2, 2, 3)), report=True)
    assert isinstance(rep, ConversionReport) and rep.left_stock[0][0] == "0"


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated")
def test_old_style_weight_norm_hook():
    def make():   # (such modules cannot be deep-copied: two, from one seed)
        torch.manual_seed(0)
        return torch.nn.utils.weight_norm(nn.ConvTranspose1d(3, 2, 4, 2, 1).double())
    stock, ours = make(), K.convert(make())
    assert isinstance(ours, K.ConvTranspose1d)
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    torch.testing.assert_close(ours(x), stock(x))


def _block(c_in=4, c_out=6, act=None, groups=1):
    layers = [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, groups=groups), nn.BatchNorm2d(c_out)]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers, nn.ConvTranspose2d(c_out, 3, 3, 1, 1), nn.Tanh())


@pytest.mark.parametrize("act,groups", [(nn.ReLU(), 1), (nn.LeakyReLU(0.2), 1), (nn.SiLU(), 2),
                                        (nn.GELU(), 1), (nn.ReLU6(True), 2), (None, 2)],
                         ids=["relu", "leaky", "silu_groups2", "gelu", "relu6_groups2",
                              "bn_only_groups2"])
def test_fuse_is_exact_in_eval_and_in_training(act, groups):
    torch.manual_seed(0)
    stock = _block(act=act, groups=groups).double()
    with torch.no_grad():   # a BatchNorm that has seen data
        stock[1].running_mean.uniform_(-1, 1)
        stock[1].running_var.uniform_(0.5, 2)
        stock[1].weight.uniform_(0.5, 1.5)
        stock[1].bias.uniform_(-0.5, 0.5)
    ours = copy.deepcopy(stock)
    _, rep = K.convert(ours, fuse=True, report=True)
    assert [r[2] for r in rep.rows].count("fused") == 2   # conv+bn(+act), conv+tanh
    assert ours.state_dict().keys() == stock.state_dict().keys()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    for mode in ("eval", "train", "eval"):
        getattr(stock, mode)()
        getattr(ours, mode)()
        torch.testing.assert_close(ours(x), stock(x))
        # training updates the running statistics exactly as PyTorch's BatchNorm does
        torch.testing.assert_close(ours[1].running_mean, stock[1].running_mean)
        torch.testing.assert_close(ours[1].running_var, stock[1].running_var)
    # a training step with the fused layers gives stock's gradients
    ours.train(), stock.train()
    for m in (stock, ours):
        m.zero_grad()
        m(x).square().mean().backward()
    for (n, a), (_, b) in zip(stock.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=n)
    # state_dict round trip into a stock model
    fresh = _block(act=act, groups=groups).double()
    fresh.load_state_dict(ours.state_dict())
    fresh.eval(), ours.eval()
    torch.testing.assert_close(ours(x), fresh(x))


def test_fused_eval_refolds_after_an_update():
    torch.manual_seed(0)
    stock = _block(act=nn.ReLU()).double().eval()
    ours = copy.deepcopy(stock)
    K.convert(ours, fuse=True)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), stock(x))
        for m in (stock, ours):      # new weights and statistics (a load, an optimizer step)
            m[0].weight.mul_(1.5)
            m[1].running_var.mul_(2)
        torch.testing.assert_close(ours(x), stock(x))


@pytest.mark.parametrize("first", ["inference_mode", "no_grad"])
def test_fused_eval_packs_once_under_inference_mode(first):
    """The folded weight is packed once, whichever of inference_mode and no_grad runs first (a
    weight folded under inference_mode was an inference tensor, repacked on every call: the
    inference_mode-first case; no_grad first guards that the fold made there serves both)."""
    torch.manual_seed(0)
    stock = _block(act=nn.ReLU()).eval()
    with torch.no_grad():
        stock[1].running_var.uniform_(0.5, 2)
    ours = copy.deepcopy(stock)
    K.convert(ours, fuse=True)
    x = torch.randn(2, 4, 5, 5)
    modes = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}
    order = [first] + [m for m in modes if m != first]
    with modes[order[0]]():
        ours(x)
    packs = weight_cache.stats["packs"]
    for mode in order * 2:
        with modes[mode]():
            torch.testing.assert_close(ours(x), stock(x), rtol=1e-5, atol=1e-5)
    assert weight_cache.stats["packs"] == packs


def test_convert_without_fuse_keeps_batchnorm_working():
    torch.manual_seed(0)
    stock, ours = _pair(_block(act=nn.ReLU()))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(ours(x), stock(x))
    assert type(ours[1]) is nn.BatchNorm2d
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K.convert(ours)   # converting twice changes nothing and warns nothing
