"""The real-layer suite: transposed convolutions as published decoders use them (DCGAN,
U-Net, pix2pix, FCN, FSRCNN, HiFi-GAN, 3D U-Net, autoencoders), each tagged with its model."""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Layer:
    model: str          # where the shape comes from
    name: str
    batch: int
    c_in: int
    c_out: int
    size: tuple         # input spatial size
    kernel: int
    stride: int
    padding: int = 0
    output_padding: int = 0
    groups: int = 1
    bias: bool = True   # False where the model follows the layer with a normalisation

    @property
    def nd(self) -> int:
        return len(self.size)

    @property
    def out_size(self) -> tuple:
        return tuple((L - 1) * self.stride - 2 * self.padding + self.kernel + self.output_padding
                     for L in self.size)

    @property
    def key(self) -> str:
        return f"{self.model}/{self.name}"

    def conv_kwargs(self) -> dict:
        kw = dict(stride=self.stride, padding=self.padding, output_padding=self.output_padding)
        if self.groups != 1:
            kw["groups"] = self.groups
        return kw

    def weight_shape(self) -> tuple:
        return (self.c_in, self.c_out // self.groups) + (self.kernel,) * self.nd

    def useful_flops(self) -> float:
        """2 x multiply-adds that touch a real input (what an exact method must do)."""
        from triton_kstconv.geometry import make_geometry, normalize_params, useful_macs
        nd = self.nd
        geom = make_geometry(normalize_params(nd, self.stride, self.padding, self.output_padding,
                                              self.groups), self.size, (self.kernel,) * nd)
        return 2.0 * useful_macs(geom, self.batch, self.c_in, self.c_out)

    def bytes_moved(self, itemsize: int = 4) -> float:
        """Each input, weight and output element once (the memory floor)."""
        n_in = self.batch * self.c_in * math.prod(self.size)
        n_out = self.batch * self.c_out * math.prod(self.out_size)
        n_w = self.c_in * self.c_out // self.groups * self.kernel ** self.nd
        return float(itemsize * (n_in + n_out + n_w))


def _L(model, name, n, ci, co, size, k, s, p=0, op=0):
    return Layer(model, name, n, ci, co, tuple(size), k, s, p, op)


SUITE = [
    # DCGAN generator (pytorch/examples, batch 64, nz=100, ngf=64)
    _L("dcgan", "100-512@1 k4s1", 64, 100, 512, (1, 1), 4, 1),
    _L("dcgan", "512-256@4 k4s2p1", 64, 512, 256, (4, 4), 4, 2, 1),
    _L("dcgan", "256-128@8 k4s2p1", 64, 256, 128, (8, 8), 4, 2, 1),
    _L("dcgan", "128-64@16 k4s2p1", 64, 128, 64, (16, 16), 4, 2, 1),
    _L("dcgan", "64-3@32 k4s2p1", 64, 64, 3, (32, 32), 4, 2, 1),
    # U-Net decoder (milesial/Pytorch-UNet, bilinear=False), 256x256 input, batch 1
    _L("unet", "1024-512@16 k2s2", 1, 1024, 512, (16, 16), 2, 2),
    _L("unet", "512-256@32 k2s2", 1, 512, 256, (32, 32), 2, 2),
    _L("unet", "256-128@64 k2s2", 1, 256, 128, (64, 64), 2, 2),
    _L("unet", "128-64@128 k2s2", 1, 128, 64, (128, 128), 2, 2),
    # pix2pix unet_256 decoder (batch 1)
    _L("pix2pix", "512-512@1 k4s2p1", 1, 512, 512, (1, 1), 4, 2, 1),
    _L("pix2pix", "1024-512@2 k4s2p1", 1, 1024, 512, (2, 2), 4, 2, 1),
    _L("pix2pix", "1024-512@4 k4s2p1", 1, 1024, 512, (4, 4), 4, 2, 1),
    _L("pix2pix", "1024-512@8 k4s2p1", 1, 1024, 512, (8, 8), 4, 2, 1),
    _L("pix2pix", "1024-256@16 k4s2p1", 1, 1024, 256, (16, 16), 4, 2, 1),
    _L("pix2pix", "512-128@32 k4s2p1", 1, 512, 128, (32, 32), 4, 2, 1),
    _L("pix2pix", "256-64@64 k4s2p1", 1, 256, 64, (64, 64), 4, 2, 1),
    _L("pix2pix", "128-3@128 k4s2p1", 1, 128, 3, (128, 128), 4, 2, 1),
    # FCN-8s / FCN-32s heads (21 classes) at ~16x16
    _L("fcn", "21-21@16 k4s2", 1, 21, 21, (16, 16), 4, 2),
    _L("fcn", "21-21@16 k16s8", 1, 21, 21, (16, 16), 16, 8),
    _L("fcn", "21-21@16 k64s32", 1, 21, 21, (16, 16), 64, 32),
    # FSRCNN (56 -> 1, k9, p4, op = s - 1) on a 64x64 low-resolution input
    _L("fsrcnn", "56-1@64 k9s2p4op1", 1, 56, 1, (64, 64), 9, 2, 4, 1),
    _L("fsrcnn", "56-1@64 k9s3p4op2", 1, 56, 1, (64, 64), 9, 3, 4, 2),
    _L("fsrcnn", "56-1@64 k9s4p4op3", 1, 56, 1, (64, 64), 9, 4, 4, 3),
    # HiFi-GAN V1 generator (ConvTranspose1d, batch 16, 32 mel frames)
    _L("hifigan", "512-256@32 k16s8p4", 16, 512, 256, (32,), 16, 8, 4),
    _L("hifigan", "256-128@256 k16s8p4", 16, 256, 128, (256,), 16, 8, 4),
    _L("hifigan", "128-64@2048 k4s2p1", 16, 128, 64, (2048,), 4, 2, 1),
    _L("hifigan", "64-32@4096 k4s2p1", 16, 64, 32, (4096,), 4, 2, 1),
    # 3D U-Net (MLPerf, batch 2, ConvTranspose3d k2 s2)
    _L("unet3d", "320-320@4 k2s2", 2, 320, 320, (4, 4, 4), 2, 2),
    _L("unet3d", "320-256@8 k2s2", 2, 320, 256, (8, 8, 8), 2, 2),
    _L("unet3d", "256-128@16 k2s2", 2, 256, 128, (16, 16, 16), 2, 2),
    _L("unet3d", "128-64@32 k2s2", 2, 128, 64, (32, 32, 32), 2, 2),
    _L("unet3d", "64-32@64 k2s2", 2, 64, 32, (64, 64, 64), 2, 2),
    # the paper's one-layer MNIST model (perf/paper.py digits), batch 64
    _L("mnist", "32-32@28 k4s2p1", 64, 32, 32, (28, 28), 4, 2, 1),
    # generic autoencoder decoders, k3 s2 p1 op1
    _L("decoder", "64-64@64 k3s2p1op1", 8, 64, 64, (64, 64), 3, 2, 1, 1),
    _L("decoder", "128-64@32 k3s2p1op1", 8, 128, 64, (32, 32), 3, 2, 1, 1),
    _L("decoder", "64-64@128 k3s2p1op1", 2, 64, 64, (128, 128), 3, 2, 1, 1),
]

# Depthwise and grouped layers (lightweight decoders: MobileNet-style upsampling heads,
# depthwise U-Net decoders, a vocoder's depthwise upsampler), bias-free as they are followed by
# a normalisation; `python -m perf.bench --suite grouped`.
def _G(model, name, n, c, mult, size, k, s, p=0, op=0, groups=None):
    return Layer(model, name, n, c, c * mult, tuple(size), k, s, p, op,
                 groups=c if groups is None else groups, bias=False)


GROUPED = [
    _G("dw-decoder", "dw 256@32 k4s2p1", 8, 256, 1, (32, 32), 4, 2, 1),
    _G("dw-decoder", "dw 128@64 k3s2p1op1", 8, 128, 1, (64, 64), 3, 2, 1, 1),
    _G("dw-decoder", "dw 64@128 k4s2p1", 4, 64, 1, (128, 128), 4, 2, 1),
    _G("dw-decoder", "dw 256@32 k2s2", 8, 256, 1, (32, 32), 2, 2),
    _G("dw-decoder", "mult2 128@32 k4s2p1", 8, 128, 2, (32, 32), 4, 2, 1),
    _G("dw-vocoder", "dw1d 512@256 k16s8p4", 8, 512, 1, (256,), 16, 8, 4),
    _G("dw-vocoder", "dw1d 256@2048 k4s2p1", 4, 256, 1, (2048,), 4, 2, 1),
    _G("dw-3d", "dw3d 64@16 k4s2p1", 2, 64, 1, (16, 16, 16), 4, 2, 1),
    _G("grouped", "g32 256-256@32 k4s2p1", 8, 256, 1, (32, 32), 4, 2, 1, groups=32),
]
SUITES = {"real": SUITE, "grouped": GROUPED}

# A quick subset (the README's main job): one or two layers per model.
QUICK = ["dcgan/512-256@4 k4s2p1", "dcgan/64-3@32 k4s2p1", "unet/256-128@64 k2s2",
         "pix2pix/512-128@32 k4s2p1", "fcn/21-21@16 k16s8", "fsrcnn/56-1@64 k9s3p4op2",
         "hifigan/128-64@2048 k4s2p1", "unet3d/256-128@16 k2s2", "decoder/64-64@64 k3s2p1op1"]


def select(names: list[str] | None = None, quick: bool = False,
           suite: str = "real") -> list[Layer]:
    layers = SUITES[suite]
    if names:
        return [l for l in layers if any(n in l.key for n in names)]
    if quick and suite == "real":
        return [l for l in layers if l.key in QUICK]
    return list(layers)
