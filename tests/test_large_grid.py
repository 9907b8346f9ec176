"""The large grid: long sequences on a GPU (`pytest -m slow`). Not part of the default run."""

import pytest
import torch
from conftest import DEVICE

import fastattn
from fastattn import testing

pytestmark = [pytest.mark.slow, pytest.mark.gpu]


# (B, Sq, Sk, Hq, Hkv, D)
@pytest.mark.parametrize("shape", [(2, 1024, 1024, 8, 2, 128), (1, 2048, 2048, 4, 4, 64), (1, 4096, 4096, 2, 1, 128),
                                   (4, 512, 4096, 8, 8, 128), (1, 3000, 1000, 4, 2, 96), (2, 1024, 1024, 4, 4, 256)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_long_sequences(shape, causal, dtype, gen):
    b, sq, sk, hq, hkv, d = shape
    q, k, v = testing.random_qkv(b, sq, sk, hq, hkv, d, dtype=dtype, device=DEVICE, generator=gen)

    def fn(a, b_, c):
        return fastattn.attention(a, b_, c, causal=causal, return_lse=True, backend="triton")

    results = testing.check_against_reference(fn, q, k, v, causal=causal, generator=gen)
    assert all(r.ok for r in results), [str(r) for r in results]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_long_padded_and_packed(dtype, gen):
    b, s, h, d = 4, 2048, 8, 128
    q, k, v = testing.random_qkv(b, s, s, h, h, d, dtype=dtype, device=DEVICE, generator=gen)
    mask = torch.arange(s, device=DEVICE)[None, :] < torch.tensor([2048, 1500, 700, 1], device=DEVICE)[:, None]

    def masked(a, b_, c):
        return fastattn.attention(a, b_, c, key_padding_mask=mask, return_lse=True, backend="triton")

    results = testing.check_against_reference(masked, q, k, v, key_padding_mask=mask, generator=gen)
    assert all(r.ok for r in results), [str(r) for r in results]
