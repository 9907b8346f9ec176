"""fastattn.semantics: each convention and translation, tested once against a direct construction."""

import pytest
import torch

from fastattn import reference, semantics


@pytest.mark.parametrize("sq,sk", [(5, 5), (3, 7), (7, 3), (1, 4)])
def test_top_left_causal_is_sdpa_is_causal(sq, sk):
    """The pieces, each in fastattn's bottom-right convention, see exactly torch's top-left keys."""
    want = torch.ones(sq, sk, dtype=torch.bool).tril()  # SDPA's is_causal: query i sees keys j <= i
    got = torch.zeros(sq, sk, dtype=torch.bool)
    for rows, keys, causal in semantics.top_left_causal(sq, sk):
        n = rows.stop - rows.start
        got[rows, :keys] = semantics.visible_keys(n, keys, causal=causal)[0, 0]
    assert torch.equal(got, want)


def test_visible_keys_combines_causal_window_and_padding():
    rel = semantics.relative_positions(4, 6)
    assert rel[0].tolist() == [-2, -1, 0, 1, 2, 3]  # ends aligned: query 0 sits at key 2
    kpm = torch.tensor([[True, True, False, True, True, True]])
    vis = semantics.visible_keys(4, 6, causal=True, key_padding_mask=kpm, window=(1, -1))[0, 0]
    assert torch.equal(vis, (rel <= 0) & (rel >= -1) & kpm[0])
    assert semantics.keyless_rows(torch.tensor([[True, False], [False, False]])).flatten().tolist() == [False, True]


def test_bool_to_bias_and_key_padding_by_shape():
    m = torch.tensor([True, False])
    assert semantics.bool_to_bias(m, torch.float32).tolist() == [0.0, float("-inf")]
    kpm = torch.rand(3, 5) > 0.5
    assert torch.equal(semantics.key_padding_from_mask(kpm[:, None, None, :], 3, 5), kpm)
    assert semantics.key_padding_from_mask(kpm[0], 3, 5).shape == (3, 5)  # (Sk,) broadcasts over the batch
    assert semantics.key_padding_from_mask(torch.ones(3, 1, 2, 5, dtype=torch.bool), 3, 5) is None  # per query
    assert semantics.key_padding_from_mask(torch.zeros(3, 1, 1, 5), 3, 5) is None  # a float mask


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, (2, 0)), (False, (1, 1))])
def test_key_padding_of_pattern_finds_exactly_padding_plus_the_pattern(causal, window):
    kpm = torch.tensor([[True, True, True, False, True], [False, True, True, True, True]])
    mask = semantics.visible_keys(5, 5, causal=causal, key_padding_mask=kpm, window=window).expand(2, 3, 5, 5)
    assert torch.equal(semantics.key_padding_of_pattern(mask, causal, window), kpm)
    other = mask.clone()
    other[0, 0, 4, 4] = ~other[0, 0, 4, 4]  # one entry that neither padding nor the pattern explains
    assert semantics.key_padding_of_pattern(other, causal, window) is None


def test_modifier_bias_is_what_the_reference_adds():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 3, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(1, 3, 4, 4, generator=gen, dtype=torch.float64)
    slopes = torch.rand(2, 3, generator=gen, dtype=torch.float64)
    window = (1, 0)
    dense = semantics.modifier_bias(bias, slopes, window, semantics.relative_positions(4, 4), torch.float64)
    want = reference.attention(q, k, v, bias=bias, alibi_slopes=slopes, window=window)
    torch.testing.assert_close(reference.attention(q, k, v, bias=dense), want)


def test_merge_state_is_the_softmax_over_the_union_of_keys():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 5, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    kpm = torch.tensor([[True, True, False, False, False]])  # the second half has no key for any row
    full, full_lse = reference.attention(q, k, v, key_padding_mask=kpm, return_lse=True)
    out, lse = reference.attention(q, k[:, :2], v[:, :2], return_lse=True)
    empty, empty_lse = reference.attention(q, k[:, 2:], v[:, 2:], key_padding_mask=kpm[:, 2:], return_lse=True)
    out, lse = out.clone(), lse.clone()
    semantics.merge_state(out, lse, empty, empty_lse)
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(lse, full_lse)
    none, none_lse = torch.zeros_like(out), torch.full_like(lse, float("-inf"))  # nothing seen yet on both sides
    semantics.merge_state(none, none_lse, empty, empty_lse)
    assert (none == 0).all() and (none_lse == float("-inf")).all()
