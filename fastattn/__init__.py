"""fastattn: fused attention kernels (Triton, CUDA C++) as PyTorch autograd ops."""

from fastattn.api import attention, available_backends

__version__ = "0.1.0"
__all__ = ["attention", "available_backends", "__version__"]
