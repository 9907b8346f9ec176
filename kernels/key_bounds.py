"""The real-key range of each row of a key-padding mask, for the attention kernels to skip
all-padding key tiles: one program per batch element scans its (Sk,) row of bytes."""

import triton
import triton.language as tl


@triton.jit
def key_bounds_kernel(KPM, BOUNDS, stride_kpm_b, Sk, BLOCK: tl.constexpr):
    """BOUNDS[b] = [first real key, last real key + 1] of row b of KPM (B, Sk) (nonzero = real);
    [Sk, 0], an empty range, for a row without real keys."""
    b = tl.program_id(0).to(tl.int64)
    row = KPM + b * stride_kpm_b
    first = Sk
    last = Sk * 0
    for start in range(0, Sk, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        real = tl.load(row + cols, mask=cols < Sk, other=0) != 0
        first = tl.minimum(first, tl.min(tl.where(real, cols, Sk), 0))
        last = tl.maximum(last, tl.max(tl.where(real, cols + 1, 0), 0))
    tl.store(BOUNDS + 2 * b, first)
    tl.store(BOUNDS + 2 * b + 1, last)
