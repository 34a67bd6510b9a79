"""The nn layers are drop-in: same parameters, state_dict, outputs, output_size; convert()
swaps them into a model sharing its weights."""
import pytest
import torch
from torch import nn

import triton_kstconv as K

PAIRS = [(nn.ConvTranspose1d, K.ConvTranspose1d, 1), (nn.ConvTranspose2d, K.ConvTranspose2d, 2),
         (nn.ConvTranspose3d, K.ConvTranspose3d, 3)]


@pytest.mark.parametrize("theirs,ours,nd", PAIRS, ids=["1d", "2d", "3d"])
def test_drop_in(theirs, ours, nd):
    torch.manual_seed(0)
    kw = dict(stride=2, padding=1, output_padding=1, groups=2, bias=True, dilation=1)
    a = theirs(4, 6, 3, **kw).double()
    b = ours(4, 6, 3, **kw).double()
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == set(b.state_dict())
    x = torch.randn(2, 4, *([4] * nd), dtype=torch.float64)
    torch.testing.assert_close(b(x), a(x))
    torch.testing.assert_close(b(x[0]), a(x[0]))           # unbatched
    size = [2 * 4 - 1] * nd                                 # output_size picks output_padding
    torch.testing.assert_close(b(x, output_size=size), a(x, output_size=size))
    assert isinstance(b, theirs)


def test_activation_and_repr():
    m = K.ConvTranspose2d(3, 2, 4, 2, 1, activation=("leaky_relu", 0.2), backend="torch")
    assert "activation=('leaky_relu', 0.2)" in repr(m) and "backend='torch'" in repr(m)
    x = torch.randn(1, 3, 5, 5)
    ref = torch.nn.functional.leaky_relu(nn.functional.conv_transpose2d(
        x, m.weight, m.bias, 2, 1), 0.2)
    torch.testing.assert_close(m(x), ref)


def test_convert_shares_weights_and_matches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(8, 4, 4, 2, 1), nn.ReLU(),
                          nn.Sequential(nn.ConvTranspose2d(4, 2, 3, 2, 1, output_padding=1)),
                          nn.Tanh())
    x = torch.randn(2, 8, 4, 4)
    ref = model(x)
    weights = [p for p in model.parameters()]
    K.convert(model)
    assert isinstance(model[0], K.ConvTranspose2d) and isinstance(model[2][0], K.ConvTranspose2d)
    assert all(p is q for p, q in zip(model.parameters(), weights))
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    single = K.convert(nn.ConvTranspose1d(2, 2, 3))
    assert isinstance(single, K.ConvTranspose1d)


def test_trains():
    torch.manual_seed(0)
    m = K.ConvTranspose2d(3, 2, 4, 2, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    teacher = nn.ConvTranspose2d(3, 2, 4, 2, 1)
    x = torch.randn(4, 3, 4, 4)
    y = teacher(x).detach()
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = ((m(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
