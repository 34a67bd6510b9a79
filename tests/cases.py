"""The differential test matrix: named transposed-convolution configurations (small shapes)."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    nd: int
    N: int
    c_in: int
    c_out: int
    size: tuple
    kernel: tuple
    stride: tuple
    padding: tuple = None
    output_padding: tuple = None
    dilation: tuple = None
    groups: int = 1
    bias: bool = True

    def __post_init__(self):
        z = (0,) * self.nd
        for f, v in (("padding", z), ("output_padding", z), ("dilation", (1,) * self.nd)):
            if getattr(self, f) is None:
                object.__setattr__(self, f, v)

    @property
    def conv(self):
        return dict(stride=self.stride, padding=self.padding, output_padding=self.output_padding,
                    groups=self.groups, dilation=self.dilation)

    def __str__(self):
        return self.name


def _c(name, nd, N, ci, co, size, k, s, p=0, op=0, d=1, g=1, bias=True):
    t = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd  # noqa: E731
    return Case(name, nd, N, ci, co, t(size), t(k), t(s), t(p), t(op), t(d), g, bias)


CASES = [
    # 2D: the decoder staples
    _c("dcgan_k4s2p1", 2, 2, 6, 5, 4, 4, 2, 1),
    _c("unet_k2s2", 2, 2, 6, 4, 5, 2, 2),
    _c("autoenc_k3s2p1op1", 2, 2, 5, 6, 5, 3, 2, 1, 1),
    _c("stride1_k3p1", 2, 2, 4, 5, 6, 3, 1, 1),
    _c("stride1_1x1_input", 2, 3, 5, 4, 1, 4, 1),
    _c("1x1_input_groups2_k3s2", 2, 3, 4, 6, 1, 3, 2, 0, 0, 1, 2),
    _c("k1_s1", 2, 2, 3, 4, 5, 1, 1),
    _c("k1_s3_no_tap_phases", 2, 2, 3, 4, 4, 1, 3),
    _c("k2_s3_empty_phase", 2, 1, 3, 3, 4, 2, 3, 0, 2),
    _c("k5s3p2op1", 2, 2, 4, 3, 4, 5, 3, 2, 1),
    _c("k7s4p3op3", 2, 1, 3, 2, 3, 7, 4, 3, 3),
    _c("k3s2_dil2", 2, 2, 4, 3, 5, 3, 2, 1, 1, 2),
    _c("k3s2_dil2_gcd_empty", 2, 1, 3, 3, 4, 3, 2, 0, 0, 2),  # gcd(s, d) = 2: odd phases empty
    _c("k3s3_dil3_op2", 2, 1, 3, 2, 3, 3, 3, 1, 2, 3),
    _c("k4s2_dil3_op2", 2, 1, 3, 2, 4, 4, 2, 2, 2, 3),
    _c("anisotropic", 2, 2, 4, 3, (3, 6), (2, 5), (2, 3), (0, 2), (1, 1), (1, 2)),
    _c("big_padding", 2, 1, 3, 2, 6, 5, 2, 4, 1),
    _c("groups2", 2, 2, 4, 6, 4, 3, 2, 1, 1, 1, 2),
    _c("groups3_k4s2", 2, 2, 6, 3, 4, 4, 2, 1, 0, 1, 3),
    _c("depthwise", 2, 2, 4, 4, 5, 4, 2, 1, 0, 1, 4),
    _c("depthwise_mult2", 2, 1, 3, 6, 4, 3, 2, 1, 1, 1, 3),
    _c("no_bias", 2, 2, 4, 3, 4, 4, 2, 1, bias=False),
    _c("wide_channels", 2, 1, 40, 36, 3, 4, 2, 1),
    # 1D: vocoders and friends
    _c("1d_hifigan_k16s8p4", 1, 2, 5, 4, 6, 16, 8, 4),
    _c("1d_k4s2p1", 1, 2, 6, 4, 9, 4, 2, 1),
    _c("1d_k3s1", 1, 2, 3, 2, 7, 3, 1, 1),
    _c("1d_k5s4_dil2_op1", 1, 1, 3, 4, 5, 5, 4, 2, 1, 2),
    _c("1d_depthwise", 1, 2, 4, 4, 8, 4, 2, 1, 0, 1, 4),
    # 3D: medical decoders
    _c("3d_unet_k2s2", 3, 1, 4, 3, 3, 2, 2),
    _c("3d_k3s2p1op1", 3, 1, 3, 2, 3, 3, 2, 1, 1),
    _c("3d_anisotropic", 3, 2, 2, 3, (2, 3, 2), (1, 3, 2), (1, 2, 2), (0, 1, 0), (0, 1, 1)),
    _c("3d_groups", 3, 1, 4, 4, 2, 3, 2, 1, 0, 1, 2),
]

# A handful that every backend and dtype runs (the interpreter is slow).
CORE = ["dcgan_k4s2p1", "unet_k2s2", "autoenc_k3s2p1op1", "k2_s3_empty_phase", "k3s2_dil2",
        "groups2", "1d_hifigan_k16s8p4", "3d_k3s2p1op1"]

# Grouped layers for the C++ direct strategy (the C++ tests only): several channels a group
# (up to 16; blocks of 4 destination channels: 5 = 4 + 1, 6 = 4 + 2, 3), and depthwise geometries whose
# phases read far into the zero padding, have no taps or no positions, in 1D, 2D and 3D.
GROUPED_BLOCKS = [
    _c("groups2_c12_c10", 2, 2, 12, 10, 5, 4, 2, 1, 0, 1, 2),
    _c("groups4_c12_c12_k3s2", 2, 1, 12, 12, 4, 3, 2, 1, 1, 1, 4),
    _c("groups2_c32_c24", 2, 1, 32, 24, 4, 4, 2, 1, 0, 1, 2),   # 16 / 12 channels a group
    _c("depthwise_k3s2_dil2_gcd_empty", 2, 2, 3, 3, 5, 3, 2, 1, 1, 2, 3),
    _c("depthwise_k1s3_no_tap_phases", 2, 1, 4, 4, 4, 1, 3, 0, 2, 1, 4),
    _c("depthwise_big_padding_anisotropic", 2, 1, 2, 4, (3, 7), (5, 3), (2, 3), (4, 1), (1, 2),
       (1, 2), 2),
    _c("1d_depthwise_k16s8p4", 1, 2, 3, 3, 9, 16, 8, 4, 0, 1, 3),
    _c("3d_depthwise_k4s2p1", 3, 1, 3, 3, (3, 4, 2), 4, 2, 1, 0, 1, 3),
]

BY_NAME = {c.name: c for c in CASES + GROUPED_BLOCKS}
