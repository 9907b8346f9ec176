"""CPU model of the CUDA kernels' control flow, checked against the float64 reference.

test_cuda_fragments.py checks which element each lane's registers hold; this checks everything
above that, transcribed from csrc/attn_fwd.cuh and csrc/attn_bwd.cuh at tile granularity (numpy
float64, one CTA at a time, same tile sizes): the key range from kv_bounds and the causal bound, the
tile loops (tile_lo/tile_hi, the dK/dV kernel's qt_lo and its loop over the GQA group), the
`need_mask` shortcut (tiles that skip masking must need none), the masks (key tail, padding,
bottom-right causal, query tail), the online softmax with its guard for rows that have seen no key
yet, the epilogue (empty rows -> 0, lse -inf), lse_log2 (+inf for empty rows: P = 0 in the backward),
delta = rowsum(dO * O) - dlse, and the scale factors. If a change to a kernel's logic is mirrored
here, these tests say whether it is still right; they cannot see a transcription slip, a precision
problem, or a race, which only a GPU run can.
"""

import math

import numpy as np
import pytest
import torch

from fastattn import reference

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
INF = float("inf")


def _rows(x, start, n):
    """Rows start..start+n of x (S, D), zero-filled past the end (cp.async with src-size 0)."""
    out = np.zeros((n, x.shape[-1]))
    part = x[start:start + n]
    out[: part.shape[0]] = part
    return out


def _vec(x, start, n):
    out = np.zeros(n)
    part = x[start:start + n]
    out[: part.shape[0]] = part
    return out


def _key_range(bounds, b, sk):
    if bounds is None:
        return 0, sk
    return max(0, int(bounds[b, 0])), min(sk, int(bounds[b, 1]))


def _kpm_ok(kpm, b, cols):
    if kpm is None:
        return np.ones(cols.shape, bool)
    sk = kpm.shape[1]
    return np.where(cols < sk, kpm[b, np.clip(cols, 0, sk - 1)], False)


def _tiles(lo, hi, bn):
    tile_lo = lo // bn
    return tile_lo, ((hi + bn - 1) // bn if hi > lo else tile_lo)


def _lse_log2(lse):
    return np.where(lse == -INF, INF, lse * LOG2E)


def model_fwd(q, k, v, causal, scale, kpm=None, bounds=None, BM=64, BN=64):
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    out, lse = np.zeros_like(q), np.zeros((B, Hq, Sq))
    diag, sl2 = Sk - Sq, scale * LOG2E
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hkv)
            for m0 in range(0, Sq, BM):
                lo, hi = _key_range(bounds, b, Sk)
                if causal:
                    hi = min(hi, m0 + BM + diag)
                tile_lo, tile_hi = _tiles(lo, hi, BN)
                rows = m0 + np.arange(BM)
                Qt = _rows(q[b, :, h], m0, BM)
                row_max, row_sum, acc = np.full(BM, -INF), np.zeros(BM), np.zeros((BM, D))
                for j in range(tile_lo, tile_hi):
                    n0 = j * BN
                    Kt, Vt = _rows(k[b, :, hk], n0, BN), _rows(v[b, :, hk], n0, BN)
                    s = (Qt @ Kt.T) * sl2
                    need_mask = n0 + BN > hi or n0 < lo or kpm is not None or (causal and n0 + BN - 1 > m0 + diag)
                    if need_mask:
                        cols = n0 + np.arange(BN)
                        ok = (cols >= lo) & (cols < hi) & _kpm_ok(kpm, b, cols)
                        ok = ok[None, :] & ((cols[None, :] <= rows[:, None] + diag) if causal else True)
                        s = np.where(ok, s, -INF)
                    mx = np.maximum(row_max, s.max(axis=1))
                    m_use = np.where(mx == -INF, 0.0, mx)
                    alpha = np.exp2(row_max - m_use)
                    row_max = mx
                    p = np.exp2(s - m_use[:, None])
                    row_sum = row_sum * alpha + p.sum(axis=1)
                    acc = acc * alpha[:, None] + p @ Vt
                empty = ~(row_sum > 0)
                inv = np.where(empty, 0.0, 1.0 / np.where(empty, 1.0, row_sum))
                n = min(BM, Sq - m0)
                out[b, m0:m0 + n, h] = (acc * inv[:, None])[:n]
                with np.errstate(divide="ignore"):
                    l = np.where(empty, -INF, (row_max + np.log2(np.where(empty, 1.0, row_sum))) * LN2)
                lse[b, h, m0:m0 + n] = l[:n]
    return out, lse


def model_bwd(dout, q, k, v, out, lse, dlse, causal, scale, kpm=None, bounds=None):
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    G, diag, sl2 = Hq // Hkv, Sk - Sq, scale * LOG2E
    # 1. preprocess
    delta = np.einsum("bshd,bshd->bhs", dout, out) - (dlse if dlse is not None else 0.0)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    # 2. dK, dV: BN = 64 keys per CTA, BM queries per step (32 for D = 128)
    BN, BM = 64, (64 if D <= 64 else 32)
    for b in range(B):
        lo, hi = _key_range(bounds, b, Sk)
        for hk in range(Hkv):
            for n0 in range(0, Sk, BN):
                keys = n0 + np.arange(BN)
                key_ok = (keys >= lo) & (keys < hi) & _kpm_ok(kpm, b, keys)
                m_lo = max(0, n0 - diag) if causal else 0
                qt_lo, qt_hi = m_lo // BM, (Sq + BM - 1) // BM
                any_key = n0 < hi and n0 + BN > lo
                n_qt = qt_hi - qt_lo if (any_key and m_lo < Sq) else 0
                Kt, Vt = _rows(k[b, :, hk], n0, BN), _rows(v[b, :, hk], n0, BN)
                acc_dk, acc_dv = np.zeros((BN, D)), np.zeros((BN, D))
                for it in range(n_qt * G):
                    hq = hk * G + it // n_qt
                    m0 = (qt_lo + it % n_qt) * BM
                    Qt, dOt = _rows(q[b, :, hq], m0, BM), _rows(dout[b, :, hq], m0, BM)
                    lse_t, delta_t = _vec(lse[b, hq], m0, BM), _vec(delta[b, hq], m0, BM)
                    qs = m0 + np.arange(BM)
                    st = Kt @ Qt.T
                    ok = key_ok[:, None] & (qs < Sq)[None, :]
                    if causal:
                        ok &= keys[:, None] <= qs[None, :] + diag
                    with np.errstate(over="ignore"):
                        P = np.where(ok, np.exp2(st * sl2 - _lse_log2(lse_t)[None, :]), 0.0)
                    acc_dv += P @ dOt
                    dPt = Vt @ dOt.T
                    dSt = P * (dPt - delta_t[None, :])
                    acc_dk += dSt @ Qt
                n = min(BN, Sk - n0)
                dk[b, n0:n0 + n, hk] = (acc_dk * scale)[:n]
                dv[b, n0:n0 + n, hk] = acc_dv[:n]
    # 3. dQ: BM = BN = 64
    BM = BN = 64
    for b in range(B):
        for h in range(Hq):
            hk = h // G
            for m0 in range(0, Sq, BM):
                lo, hi = _key_range(bounds, b, Sk)
                if causal:
                    hi = min(hi, m0 + BM + diag)
                tile_lo, tile_hi = _tiles(lo, hi, BN)
                rows = m0 + np.arange(BM)
                valid = rows < Sq
                lse2 = np.where(valid, _lse_log2(_vec(lse[b, h], m0, BM)), INF)
                dl = np.where(valid, _vec(delta[b, h], m0, BM), 0.0)
                Qt, dOt = _rows(q[b, :, h], m0, BM), _rows(dout[b, :, h], m0, BM)
                acc = np.zeros((BM, D))
                for j in range(tile_lo, tile_hi):
                    n0 = j * BN
                    Kt, Vt = _rows(k[b, :, hk], n0, BN), _rows(v[b, :, hk], n0, BN)
                    s, dp = Qt @ Kt.T, dOt @ Vt.T
                    with np.errstate(over="ignore"):
                        P = np.exp2(s * sl2 - lse2[:, None])
                    need_mask = n0 + BN > hi or n0 < lo or kpm is not None or (causal and n0 + BN - 1 > m0 + diag)
                    if need_mask:
                        cols = n0 + np.arange(BN)
                        ok = ((cols >= lo) & (cols < hi) & _kpm_ok(kpm, b, cols))[None, :]
                        if causal:
                            ok = ok & (cols[None, :] <= rows[:, None] + diag)
                        P = np.where(ok, P, 0.0)
                    acc += (P * (dp - dl[:, None])) @ Kt
                n = min(BM, Sq - m0)
                dq[b, m0:m0 + n, h] = (acc * scale)[:n]
    return dq, dk, dv


def key_bounds(mask):
    from fastattn.launchers.cuda_attention import key_bounds as kb

    return kb(torch.from_numpy(mask)).numpy()


# (B, Sq, Sk, Hq, Hkv, D)
SHAPES = [
    (1, 1, 1, 1, 1, 64),
    (2, 17, 17, 2, 2, 64),
    (1, 97, 97, 4, 2, 64),
    (1, 1, 257, 2, 1, 128),
    (2, 17, 97, 2, 2, 128),
    (1, 257, 17, 2, 2, 64),
    (1, 97, 1, 3, 1, 128),
    (1, 130, 200, 4, 1, 128),
]


def _case(shape, seed, masked):
    b, sq, sk, hq, hkv, d = shape
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, s, h, d)) for s, h in ((sq, hq), (sk, hkv), (sk, hkv)))
    mask = None
    if masked:
        mask = rng.random((b, sk)) < 0.6
        mask[0, : sk // 2] = False  # left padding
        if b > 1:
            mask[1] = False         # no real key at all
    return q, k, v, mask


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_model_matches_reference(shape, causal, masked):
    q, k, v, mask = _case(shape, hash((shape, causal, masked)) % 2**32, masked)
    scale = 1.0 / math.sqrt(q.shape[-1])
    bounds = key_bounds(mask) if mask is not None else None
    out, lse = model_fwd(q, k, v, causal, scale, mask, bounds)

    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    tmask = torch.from_numpy(mask) if mask is not None else None
    ref, ref_lse = reference.attention(tq, tk, tv, causal=causal, scale=scale, key_padding_mask=tmask,
                                       return_lse=True)
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(lse, ref_lse.detach().numpy(), rtol=1e-9, atol=1e-9)  # -inf rows equal too

    rng = np.random.default_rng(1)
    dout = rng.standard_normal(out.shape)
    dlse = rng.standard_normal(lse.shape)
    torch.autograd.backward([ref, ref_lse], [torch.from_numpy(dout), torch.from_numpy(dlse)])
    grads = model_bwd(dout, q, k, v, out, lse, dlse, causal, scale, mask, bounds)
    for name, g, t in zip(("dq", "dk", "dv"), grads, (tq, tk, tv)):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-8, atol=1e-8, err_msg=name)
