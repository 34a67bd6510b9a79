"""triton_kstconv: kernel-segregated transposed convolution for PyTorch."""
