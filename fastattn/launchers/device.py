"""Where a launch goes: the tensors' CUDA device and its current stream, found without the
Python-level torch.cuda helpers (a few microseconds each on the hot path)."""

from __future__ import annotations

import torch


def stream_of(x: torch.Tensor) -> int | None:
    """The raw current stream of x's CUDA device (None for a CPU tensor: the Triton interpreter)."""
    return torch._C._cuda_getCurrentRawStream(x.device.index) if x.is_cuda else None


class on_device:
    """Context manager: make CUDA device `index` (a tensor's get_device(); -1 = CPU, a no-op) the
    current one while launching, if it is not already: kernels launch on the current device."""

    __slots__ = ("index", "prev")

    def __init__(self, index: int):
        self.index, self.prev = index, None

    def __enter__(self):
        if self.index >= 0:
            current = torch._C._cuda_getDevice()
            if current != self.index:
                self.prev = current
                torch.cuda.set_device(self.index)

    def __exit__(self, *exc):
        if self.prev is not None:
            torch.cuda.set_device(self.prev)
