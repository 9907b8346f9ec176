"""The oracle itself: checked against independent formulations, in float64."""

import pytest
import torch

from fastattn import reference, semantics, testing


def test_matches_plain_softmax_formula(gen):
    q, k, v = testing.random_qkv(2, 7, 11, 3, 3, 8, dtype=torch.float64, generator=gen)
    out, lse = reference.attention(q, k, v, scale=0.4, return_lse=True)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.4
    expected = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, s.logsumexp(-1))


def test_causal_is_bottom_right(gen):
    q, k, v = testing.random_qkv(1, 3, 5, 1, 1, 4, dtype=torch.float64, generator=gen)
    vis = semantics.visible_keys(3, 5, causal=True)[0, 0]
    assert vis.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # Query i attends exactly to keys 0..i+2: same as running it alone on that prefix.
    out = reference.attention(q, k, v, causal=True)
    for i in range(3):
        alone = reference.attention(q[:, i:i + 1], k[:, :i + 3], v[:, :i + 3])
        torch.testing.assert_close(out[:, i:i + 1], alone)


def test_gqa_equals_repeated_kv_heads(gen):
    q, k, v = testing.random_qkv(1, 6, 6, 4, 2, 8, dtype=torch.float64, generator=gen)
    out = reference.attention(q, k, v, causal=True)
    rep = reference.attention(q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2), causal=True)
    torch.testing.assert_close(out, rep)


def test_rows_without_keys_are_zero_with_zero_grads(gen):
    q, k, v = testing.random_qkv(1, 6, 2, 2, 2, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    out, lse = reference.attention(q, k, v, causal=True, return_lse=True)
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert (out[:, :4] == 0).all() and (lse[..., :4] == float("-inf")).all()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert (q.grad[:, :4] == 0).all()


def test_gradcheck(gen):
    q, k, v = testing.random_qkv(1, 4, 5, 2, 1, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.tensor([[True, True, False, True, True]])
    assert torch.autograd.gradcheck(
        lambda a, b, c: reference.attention(a, b, c, causal=True, key_padding_mask=mask, return_lse=True),
        (q, k, v))


def test_tolerance_rule_catches_a_wrong_answer(gen):
    """The tolerance helper must fail a kernel that is off by one bad row."""
    q, k, v = testing.random_qkv(1, 16, 16, 1, 1, 8, dtype=torch.float16, generator=gen)

    def wrong(a, b, c):
        out, lse = reference.attention(a.float(), b.float(), c.float(), return_lse=True)
        out = out.clone()
        out[:, 3] += 0.05
        return out.to(a.dtype), lse

    results = testing.check_against_reference(wrong, q, k, v, grads=False)
    assert not results[0].ok and results[1].ok


def test_tolerance_rule_refuses_a_non_finite_naive_result():
    ref = torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="not finite"):
        testing.compare("out", ref.half(), torch.full((4,), float("inf"), dtype=torch.float16), ref, 2.0)


def test_tolerance_floor():
    ref = torch.full((3,), 40.0, dtype=torch.float64)
    naive = ref.float()  # exact
    # fp32: 1e-5 relative to the magnitude; fp16: one fp16 eps relative to it.
    assert testing.compare("x", naive + 3e-4, naive, ref, 2.0).ok
    assert not testing.compare("x", naive + 5e-4, naive, ref, 2.0).ok
    assert testing.compare("x", (ref + 0.03).half(), ref.half(), ref, 2.0).ok
    assert not testing.compare("x", (ref + 0.06).half(), ref.half(), ref, 2.0).ok
