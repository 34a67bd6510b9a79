"""Real decoders and generators, written from their papers' published architectures, for the
model benchmark (perf/model_bench.py) and the tests: what a user's model looks like around its
transposed convolutions (normalisation, activations, skips, residual blocks, weight norm).

* DCGAN generator (Radford et al. 2016; pytorch/examples): z -> 4x4 -> ... -> 64x64 RGB,
  ConvTranspose + BatchNorm + ReLU, Tanh out.
* pix2pix U-Net generator (Isola et al. 2017, "unet_128": 7 levels): encoder Conv + BatchNorm +
  LeakyReLU(0.2), decoder ConvTranspose + BatchNorm + ReLU (+ Dropout in the innermost three)
  with skip concatenations, Tanh out.
* HiFi-GAN V1 generator (Kong et al. 2020): Conv1d 80 -> 512, four ConvTranspose1d upsamplers
  (8, 8, 2, 2) with weight norm (torch.nn.utils.parametrizations), LeakyReLU(0.1), multi-
  receptive-field residual blocks (kernels 3, 7, 11; dilations 1, 3, 5), Conv1d -> 1, Tanh.
* 3D U-Net (Cicek et al. 2016; the MLPerf variant's decoder shape): Conv3d + InstanceNorm +
  LeakyReLU encoder, ConvTranspose3d k2 s2 upsampling, skip concatenations.
* Depthwise decoder (MobileNet-style): per stage a depthwise ConvTranspose2d (groups = channels,
  k4 s2 p1), a pointwise Conv2d, BatchNorm, ReLU6.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations


class DCGANGenerator(nn.Module):
    def __init__(self, nz=100, ngf=64, nc=3):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())

    def forward(self, z):
        return self.main(z)


class _UNetBlock(nn.Module):
    """One level of pix2pix's U-Net: down, the inner levels, up, and the skip concatenation."""

    def __init__(self, outer, inner, submodule=None, outermost=False, innermost=False,
                 dropout=False, in_ch=None):
        super().__init__()
        self.outermost = outermost
        in_ch = outer if in_ch is None else in_ch
        down = [nn.Conv2d(in_ch, inner, 4, 2, 1, bias=False)]
        if outermost:
            up = [nn.ReLU(True), nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1), nn.Tanh()]
            layers = down + [submodule] + up
        elif innermost:
            down = [nn.LeakyReLU(0.2, True)] + down
            up = [nn.ReLU(True), nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=False),
                  nn.BatchNorm2d(outer)]
            layers = down + up
        else:
            down = [nn.LeakyReLU(0.2, True)] + down + [nn.BatchNorm2d(inner)]
            up = [nn.ReLU(True), nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1, bias=False),
                  nn.BatchNorm2d(outer)] + ([nn.Dropout(0.5)] if dropout else [])
            layers = down + [submodule] + up
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class Pix2PixUNet(nn.Module):
    def __init__(self, in_ch=3, out_ch=3, ngf=64, levels=7):
        super().__init__()
        block = _UNetBlock(ngf * 8, ngf * 8, innermost=True)
        for _ in range(levels - 5):
            block = _UNetBlock(ngf * 8, ngf * 8, block, dropout=True)
        block = _UNetBlock(ngf * 4, ngf * 8, block)
        block = _UNetBlock(ngf * 2, ngf * 4, block)
        block = _UNetBlock(ngf, ngf * 2, block)
        self.model = _UNetBlock(out_ch, ngf, block, outermost=True, in_ch=in_ch)

    def forward(self, x):
        return self.model(x)


class _ResBlock1(nn.Module):
    """HiFi-GAN's ResBlock1: three dilated convolutions, each with a plain one after it."""

    def __init__(self, ch, k, dilations=(1, 3, 5)):
        super().__init__()
        wn = parametrizations.weight_norm
        self.convs1 = nn.ModuleList(wn(nn.Conv1d(ch, ch, k, 1, dilation=d,
                                                 padding=(k * d - d) // 2)) for d in dilations)
        self.convs2 = nn.ModuleList(wn(nn.Conv1d(ch, ch, k, 1, padding=(k - 1) // 2))
                                    for _ in dilations)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(self.act(c1(self.act(x))))
        return x


class HiFiGANGenerator(nn.Module):
    def __init__(self, mels=80, ch=512, rates=(8, 8, 2, 2), kernels=(16, 16, 4, 4),
                 res_kernels=(3, 7, 11)):
        super().__init__()
        wn = parametrizations.weight_norm
        self.pre = wn(nn.Conv1d(mels, ch, 7, 1, padding=3))
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for i, (u, k) in enumerate(zip(rates, kernels)):
            c_in, c_out = ch // 2 ** i, ch // 2 ** (i + 1)
            self.ups.append(wn(nn.ConvTranspose1d(c_in, c_out, k, u, padding=(k - u) // 2)))
            self.blocks.append(nn.ModuleList(_ResBlock1(c_out, rk) for rk in res_kernels))
        self.post = wn(nn.Conv1d(ch // 2 ** len(rates), 1, 7, 1, padding=3))
        self.act = nn.LeakyReLU(0.1)

    def forward(self, mel):
        x = self.pre(mel)
        for up, blocks in zip(self.ups, self.blocks):
            x = up(self.act(x))
            x = sum(b(x) for b in blocks) / len(blocks)
        return torch.tanh(self.post(self.act(x)))


class UNet3D(nn.Module):
    def __init__(self, in_ch=1, out_ch=3, base=16, levels=3):
        super().__init__()
        chs = [base * 2 ** i for i in range(levels + 1)]

        def conv(a, b, stride=1):
            return nn.Sequential(nn.Conv3d(a, b, 3, stride, 1, bias=False),
                                 nn.InstanceNorm3d(b, affine=True), nn.LeakyReLU(0.01, True))
        self.enc = nn.ModuleList([conv(in_ch, chs[0])] +
                                 [conv(chs[i], chs[i + 1], 2) for i in range(levels)])
        self.up = nn.ModuleList(nn.ConvTranspose3d(chs[i + 1], chs[i], 2, 2)
                                for i in reversed(range(levels)))
        self.dec = nn.ModuleList(conv(2 * chs[i], chs[i]) for i in reversed(range(levels)))
        self.out = nn.Conv3d(chs[0], out_ch, 1)

    def forward(self, x):
        skips = []
        for e in self.enc:
            x = e(x)
            skips.append(x)
        skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], 1))
        return self.out(x)


class DepthwiseDecoder(nn.Module):
    def __init__(self, channels=(256, 128, 64, 32), out_ch=3):
        super().__init__()
        layers = []
        for c_in, c_out in zip(channels, channels[1:] + (out_ch,)):
            layers += [nn.ConvTranspose2d(c_in, c_in, 4, 2, 1, groups=c_in, bias=False),
                       nn.BatchNorm2d(c_in), nn.ReLU6(True),
                       nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU6(True)]
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        return self.main(x)


def zoo(scale: str = "cpu"):
    """{name: (model factory, input factory, batch)}: sizes for a 2-core CPU or for a GPU."""
    cpu = scale == "cpu"
    return {
        "dcgan": (DCGANGenerator, lambda n: torch.randn(n, 100, 1, 1), 16 if cpu else 64),
        "pix2pix_unet128": (Pix2PixUNet, lambda n: torch.randn(n, 3, 128, 128), 1),
        "hifigan_v1": (HiFiGANGenerator, lambda n: torch.randn(n, 80, 32), 2 if cpu else 16),
        "unet3d": (UNet3D, lambda n: torch.randn(n, 1, 32, 32, 32), 1 if cpu else 2),
        "depthwise_decoder": (DepthwiseDecoder, lambda n: torch.randn(n, 256, 16, 16),
                              4 if cpu else 32),
    }
