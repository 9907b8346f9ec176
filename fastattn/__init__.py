"""fastattn: fused attention kernels (Triton, CUDA C++) as PyTorch autograd ops."""

from fastattn.api import (
    append_to_kvcache,
    attention,
    attention_varlen,
    attention_with_kvcache,
    available_backends,
    scaled_dot_product_attention,
)
from fastattn.padding import pad_input, unpad_input

__version__ = "0.1.0"
__all__ = [
    "attention",
    "attention_varlen",
    "attention_with_kvcache",
    "append_to_kvcache",
    "available_backends",
    "scaled_dot_product_attention",
    "pad_input",
    "unpad_input",
    "__version__",
]
