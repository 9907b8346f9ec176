"""Property-based: random shapes and flags through the Triton kernels match the reference."""

import torch
from conftest import DEVICE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastattn
from fastattn import testing


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 2), sq=st.integers(1, 140), sk=st.integers(1, 140), hkv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3]), d=st.sampled_from([16, 24, 40, 64, 72, 128]),
    causal=st.booleans(), half=st.booleans(), layout=st.sampled_from(["bshd", "bhsd"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_calls_match_reference(b, sq, sk, hkv, group, d, causal, half, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float16 if half else torch.float32
    q, k, v = testing.random_qkv(b, sq, sk, hkv * group, hkv, d, dtype=dtype, device=DEVICE, layout=layout,
                                 generator=gen)

    def fn(a, b_, c):
        return fastattn.attention(a, b_, c, causal=causal, return_lse=True, backend="triton")

    results = testing.check_against_reference(fn, q, k, v, causal=causal, generator=gen)
    assert all(r.ok for r in results), [str(r) for r in results]
