"""fastattn: fused attention kernels (Triton, CUDA C++) as PyTorch autograd ops."""

from fastattn.api import (
    append_to_kvcache,
    attention,
    attention_varlen,
    attention_with_kvcache,
    available_backends,
    scaled_dot_product_attention,
)
from fastattn.flash_api import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from fastattn.integrations import torch_flash as _torch_flash
from fastattn.padding import pad_input, unpad_input

__version__ = "0.1.0"

# torch.nn.attention.activate_flash_attention_impl("fastattn") can now route PyTorch's own flash
# attention here (fastattn/integrations/torch_flash.py); FASTATTN_ACTIVATE_SDPA=1 activates it now.
_torch_flash.register()
_torch_flash.activate_if_asked()
__all__ = [
    "attention",
    "attention_varlen",
    "attention_with_kvcache",
    "append_to_kvcache",
    "available_backends",
    "scaled_dot_product_attention",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "pad_input",
    "unpad_input",
    "__version__",
]
