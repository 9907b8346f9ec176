"""What both kernel backends derive from a key-padding mask before launching: each row's range of
real keys, which lets the kernels skip key tiles made only of padding."""

from __future__ import annotations

import torch

from fastattn.kernels import configs
from fastattn.kernels.key_bounds import key_bounds_kernel
from fastattn.launchers import plans
from fastattn.launchers.device import on_device

BLOCK = 1024  # mask bytes a key_bounds program reads per step
_plans = plans.signature_cache()


def key_bounds(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, Sk) bool -> (B, 2) int32: [first real key, last real key + 1] per batch element ([Sk, 0],
    an empty range, if it has none). Key tiles outside it are skipped by the kernels: left and right
    padding are free; the mask itself handles padding inside the range.

    One kernel launch (kernels/key_bounds.py) through a cached launch plan: it runs once per masked
    forward, so it is on the hot path. CPU tensors without the Triton interpreter take
    key_bounds_torch."""
    b, sk = key_padding_mask.shape
    device = key_padding_mask.get_device()
    if device < 0 and not configs.interpreter_enabled():
        return key_bounds_torch(key_padding_mask)
    kpm = key_padding_mask if key_padding_mask.stride(-1) == 1 else key_padding_mask.contiguous()
    kpm = kpm.view(torch.uint8)
    bounds = torch.empty((b, 2), dtype=torch.int32, device=key_padding_mask.device)
    if b == 0:
        return bounds
    args = (kpm, bounds, kpm.stride(0), sk)
    grid = (b, 1, 1)
    key = (device, plans.specialization(args))  # the plan depends on nothing else
    plan = _plans.get(key)
    if plan is not None:
        plans.launch(device, ((plan, grid, args),))
        return bounds
    with on_device(device):
        plan = plans.build("key_bounds", key_bounds_kernel, [configs.PREPROCESS], lambda c: grid, args,
                           {"BLOCK": BLOCK}, seq_len=sk, outputs=(1,), device=key_padding_mask.device)
    if not plan.provisional:
        _plans[key] = plan
    return bounds


def key_bounds_torch(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """key_bounds in torch ops (several small ones): for CPU tensors outside the interpreter, and
    the kernel's test oracle."""
    b, sk = key_padding_mask.shape
    if sk == 0:
        return torch.zeros((b, 2), dtype=torch.int32, device=key_padding_mask.device)
    pos = torch.arange(sk, dtype=torch.int32, device=key_padding_mask.device)
    first = torch.where(key_padding_mask, pos, sk).amin(dim=1)
    last = torch.where(key_padding_mask, pos + 1, 0).amax(dim=1)
    return torch.stack([first, last], dim=1).to(torch.int32)  # contiguous: the kernels read it with unit strides
