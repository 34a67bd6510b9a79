"""triton_kstconv: kernel-segregated transposed convolution for PyTorch.

Split the weight once into one sub-kernel per output phase and compute each phase as a dense
stride-1 product over the real input: no inserted zero is multiplied or stored. Triton kernels on
GPU, a C++ engine on CPU, and a pure-PyTorch engine anywhere, behind one autograd-aware op.
"""
from .functional import conv_transpose1d, conv_transpose2d, conv_transpose3d, resolve_backend
from .geometry import ConvArgumentError
from .modules import ConvTranspose1d, ConvTranspose2d, ConvTranspose3d, convert
from .reference import conv_transpose_zero_insertion
from .weight_cache import clear as clear_weight_cache

__all__ = [
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "ConvTranspose1d",
    "ConvTranspose2d", "ConvTranspose3d", "convert", "conv_transpose_zero_insertion",
    "ConvArgumentError", "resolve_backend", "clear_weight_cache",
]
__version__ = "0.1.0"
