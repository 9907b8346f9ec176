"""CPU model of the CUDA kernels' tensor-core index arithmetic (csrc/attn_common.cuh).

Nothing in csrc/ can run without a GPU, so this checks the part that is easiest to get wrong and
hardest to see: which element of which tile each lane's registers hold. The model has three parts:
- the hardware, written from the PTX ISA: ldmatrix.m8n8.x4 (with and without .trans) and the
  m16n8k16 A/B/C fragment layouts (mma_sync below rebuilds the 16x16 A, 16x8 B and 16x8 C from the
  registers with the ISA's maps, multiplies, and scatters the result back);
- the kernels' address formulas, read from csrc/attn_common.cuh itself (swz, a_frag_offset,
  bt_frag_offset, b_frag_offset: their C++ return expressions are valid Python) so that a change
  there is tested here;
- the kernels' loops for each product (fwd S = Q K^T and O += P V; bwd S^T = K Q^T, dV += P^T dO,
  dP^T = V dO^T, dK += dS^T Q, dP = dO V^T, dQ += dS K), transcribed from attn_fwd.cuh / attn_bwd.cuh.
Each product is checked against numpy's matmul, and the swizzle against bank conflicts.
"""

import re
from pathlib import Path

import numpy as np
import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _cxx_functions() -> dict:
    """Python versions of the address helpers and HeadDim, built from their C++ expressions
    (C++ integer `/` becomes `//`; the other operators mean the same for non-negative ints)."""
    src = (CSRC / "attn_common.cuh").read_text()
    fns = {}
    m = re.search(r"int swz\(int row, int chunk\) \{.*?return (.*?);", src, re.S)
    swz_expr = m.group(1)
    fns["swz"] = lambda P, row, chunk: eval(swz_expr, {}, dict(P=P, row=row, chunk=chunk))
    for name in ("a_frag_offset", "bt_frag_offset", "b_frag_offset"):
        m = re.search(name + r"\(int (\w+), int (\w+), int lane\) \{\s*return swz<P>\((.*)\);", src)
        assert m, name
        a0, a1, body = m.group(1), m.group(2), m.group(3)
        # split "row_expr, chunk_expr" at the top-level comma
        depth = 0
        for i, ch in enumerate(body):
            depth += ch == "("
            depth -= ch == ")"
            if ch == "," and depth == 0:
                row_e, chunk_e = body[:i], body[i + 1:]
                break

        def fn(P, x0, x1, lane, row_e=row_e, chunk_e=chunk_e, a0=a0, a1=a1):
            env = {a0: x0, a1: x1, "lane": lane}
            return fns["swz"](P, eval(row_e, {}, env), eval(chunk_e, {}, env))

        fns[name] = fn
    dk_e = re.search(r"int DK = (.*?);", src).group(1).replace("/", "//")
    p_e = re.search(r"int P = (.*?);", src).group(1).replace("/", "//")

    def head_dim(D):
        DK = eval(dk_e, {}, {"D": D})
        return DK, eval(p_e, {}, {"DK": DK})

    fns["head_dim"] = head_dim
    return fns


def _built_head_dims() -> list[int]:
    m = re.search(r"#define FASTATTN_HEAD_DIMS\(X\) (.*)", (CSRC / "attn_params.h").read_text())
    return [int(x) for x in re.findall(r"X\((\d+)\)", m.group(1))]


F = _cxx_functions()
LANES = np.arange(32)
G, T = LANES >> 2, LANES & 3  # groupID, threadID_in_group


# ---------------------------------------------------------------- the hardware (PTX ISA)
def a_coords():
    """(row, col) of A element [lane][reg][half] for m16n8k16 .f16/.bf16."""
    rows, cols = np.zeros((32, 4, 2), int), np.zeros((32, 4, 2), int)
    for reg in range(4):
        for h in range(2):
            i = 2 * reg + h
            rows[:, reg, h] = G + 8 * ((i >> 1) & 1)          # a0: g, a1: g+8, a2: g, a3: g+8
            cols[:, reg, h] = 2 * T + (i & 1) + 8 * (i >= 4)  # a2, a3: +8 columns
    return rows, cols


def b_coords():
    """(k, n) of B element [lane][reg][half]."""
    ks, ns = np.zeros((32, 2, 2), int), np.zeros((32, 2, 2), int)
    for reg in range(2):
        for h in range(2):
            ks[:, reg, h] = 2 * T + h + 8 * reg
            ns[:, reg, h] = G
    return ks, ns


def c_coords():
    """(row, col) of C element [lane][i]."""
    rows, cols = np.zeros((32, 4), int), np.zeros((32, 4), int)
    for i in range(4):
        rows[:, i] = G + 8 * (i >> 1)
        cols[:, i] = 2 * T + (i & 1)
    return rows, cols


def mma_sync(d, a, b0, b1):
    """d[32, 4] += A @ B with A, B, C assembled from registers by the ISA's fragment maps."""
    ar, ac = a_coords()
    A = np.full((16, 16), np.nan)
    A[ar, ac] = a
    bk, bn = b_coords()
    B = np.full((16, 8), np.nan)
    B[bk, bn] = np.stack([b0, b1], axis=1)
    assert not np.isnan(A).any() and not np.isnan(B).any(), "fragment maps must cover A and B"
    cr, cc = c_coords()
    C = np.zeros((16, 8))
    C[cr, cc] = d
    C = C + A @ B
    d[:] = C[cr, cc]


def ldmatrix_x4(smem, addrs, trans=False):
    """regs[32, 4, 2]: lanes 8j..8j+7 give the row addresses of matrix j."""
    regs = np.zeros((32, 4, 2))
    for j in range(4):
        m = np.stack([smem[addrs[8 * j + r]: addrs[8 * j + r] + 8] for r in range(8)])  # M_j 8x8
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            if trans:
                regs[lane, j] = (m[2 * t, g], m[2 * t + 1, g])
            else:
                regs[lane, j] = (m[g, 2 * t], m[g, 2 * t + 1])
    return regs


# ---------------------------------------------------------------- the kernels
def load_tile(tile, D):
    """cp.async into the swizzled layout (load_tile): rows of pitch P, chunks D/8..DK/8 zero-filled,
    the rest of each row never written (NaN here, so a read of it would show)."""
    DK, P = F["head_dim"](D)
    rows = tile.shape[0]
    smem = np.full(rows * P, np.nan)
    for row in range(rows):
        for chunk in range(DK // 8):
            off = F["swz"](P, row, chunk)
            smem[off: off + 8] = tile[row, chunk * 8: chunk * 8 + 8] if chunk < D // 8 else 0.0
    return smem


def ld(smem, fn, D, x0, x1, trans=False):
    P = F["head_dim"](D)[1]
    addrs = [fn(P, x0, x1, lane) for lane in range(32)]
    return ldmatrix_x4(smem, addrs, trans)


def frags_to_matrix(acc):
    """Accumulators acc[nblocks][32, 4] (16 rows x 8*nblocks cols) -> the matrix they hold."""
    cr, cc = c_coords()
    out = np.zeros((16, 8 * len(acc)))
    for nb, d in enumerate(acc):
        out[cr, cc + 8 * nb] = d
    return out


def pack_a(acc, kk):
    """The kernels' P -> A conversion: n-blocks 2kk, 2kk+1 -> a0..a3."""
    a = np.zeros((32, 4, 2))
    a[:, 0] = acc[2 * kk][:, 0:2]
    a[:, 1] = acc[2 * kk][:, 2:4]
    a[:, 2] = acc[2 * kk + 1][:, 0:2]
    a[:, 3] = acc[2 * kk + 1][:, 2:4]
    return a


def a_times_mt(sA, row0, sM, n_rows_m, D):
    """acc = A[row0:row0+16] @ M^T over the (padded) head dim: A fragments via a_frag_offset, B via
    bt_frag_offset (the S = Q K^T loop; also S^T = K Q^T, dP = dO V^T, dP^T = V dO^T)."""
    acc = [np.zeros((32, 4)) for _ in range(n_rows_m // 8)]
    for kk in range(F["head_dim"](D)[0] // 16):
        a = ld(sA, F["a_frag_offset"], D, row0, kk)
        for np_ in range(n_rows_m // 16):
            b = ld(sM, F["bt_frag_offset"], D, np_ * 16, kk)
            mma_sync(acc[2 * np_], a, b[:, 0], b[:, 1])
            mma_sync(acc[2 * np_ + 1], a, b[:, 2], b[:, 3])
    return acc


def p_times_m(p_acc, sM, D):
    """out = P @ M with P from accumulators (pack_a) and M rows via ldmatrix.trans (b_frag_offset):
    the O += P V loop; also dV += P^T dO, dK += dS^T Q, dQ += dS K. Returns the D real columns and
    checks that the padding columns (D..DK) came out 0."""
    DK = F["head_dim"](D)[0]
    out = [np.zeros((32, 4)) for _ in range(DK // 8)]
    for kk in range(len(p_acc) // 2):
        a = pack_a(p_acc, kk)
        for np_ in range(DK // 16):
            b = ld(sM, F["b_frag_offset"], D, kk * 16, np_, trans=True)
            mma_sync(out[2 * np_], a, b[:, 0], b[:, 1])
            mma_sync(out[2 * np_ + 1], a, b[:, 2], b[:, 3])
    full = frags_to_matrix(out)
    assert not np.any(full[:, D:]), "padding columns must stay 0"
    return full[:, :D]


HEAD_DIMS = _built_head_dims()


def test_head_dims_parsed():
    assert 64 in HEAD_DIMS and 128 in HEAD_DIMS
    for D in HEAD_DIMS:
        DK, P = F["head_dim"](D)
        assert DK % 16 == 0 and DK - 16 < D <= DK and P % 64 == 0 and P >= DK


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("warp", [0, 3])
def test_forward_products(D, warp):
    rng = np.random.default_rng(D + warp)
    BM = BN = 64
    Q, K, V = rng.standard_normal((BM, D)), rng.standard_normal((BN, D)), rng.standard_normal((BN, D))
    sQ, sK, sV = load_tile(Q, D), load_tile(K, D), load_tile(V, D)
    s = a_times_mt(sQ, warp * 16, sK, BN, D)
    S = frags_to_matrix(s)
    np.testing.assert_allclose(S, Q[warp * 16: warp * 16 + 16] @ K.T, rtol=1e-12, atol=1e-12)
    O = p_times_m(s, sV, D)  # O += P V with P = S (any values do)
    np.testing.assert_allclose(O, S @ V, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_backward_dkdv_products(D):
    BM = 64 if D <= 64 else 32  # DkdvTile<D>::BM
    rng = np.random.default_rng(D)
    BN, warp = 64, 2
    K, V = rng.standard_normal((BN, D)), rng.standard_normal((BN, D))
    Q, dO = rng.standard_normal((BM, D)), rng.standard_normal((BM, D))
    sK, sV, sQ, sdO = load_tile(K, D), load_tile(V, D), load_tile(Q, D), load_tile(dO, D)
    keys = slice(warp * 16, warp * 16 + 16)
    st = a_times_mt(sK, warp * 16, sQ, BM, D)                    # S^T = K Q^T
    np.testing.assert_allclose(frags_to_matrix(st), K[keys] @ Q.T, rtol=1e-12, atol=1e-12)
    dv = p_times_m(st, sdO, D)                  # dV += P^T dO
    np.testing.assert_allclose(dv, (K[keys] @ Q.T) @ dO, rtol=1e-12, atol=1e-10)
    dpt = a_times_mt(sV, warp * 16, sdO, BM, D)                  # dP^T = V dO^T
    np.testing.assert_allclose(frags_to_matrix(dpt), V[keys] @ dO.T, rtol=1e-12, atol=1e-12)
    dk = p_times_m(dpt, sQ, D)                  # dK += dS^T Q
    np.testing.assert_allclose(dk, (V[keys] @ dO.T) @ Q, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_backward_dq_products(D):
    rng = np.random.default_rng(7 * D)
    BM = BN = 64
    warp = 1
    Q, dO = rng.standard_normal((BM, D)), rng.standard_normal((BM, D))
    K, V = rng.standard_normal((BN, D)), rng.standard_normal((BN, D))
    sQ, sdO, sK, sV = load_tile(Q, D), load_tile(dO, D), load_tile(K, D), load_tile(V, D)
    rows = slice(warp * 16, warp * 16 + 16)
    s = a_times_mt(sQ, warp * 16, sK, BN, D)
    dp = a_times_mt(sdO, warp * 16, sV, BN, D)                   # dP = dO V^T
    np.testing.assert_allclose(frags_to_matrix(dp), dO[rows] @ V.T, rtol=1e-12, atol=1e-12)
    ds = [a * b for a, b in zip(s, dp)]                          # elementwise, same layout
    dq = p_times_m(ds, sK, D)                   # dQ += dS K
    np.testing.assert_allclose(dq, (frags_to_matrix(s) * frags_to_matrix(dp)) @ K, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("P", [64, 128])
@pytest.mark.parametrize("fn", ["a_frag_offset", "bt_frag_offset", "b_frag_offset"])
def test_ldmatrix_phases_are_bank_conflict_free(P, fn):
    """Each 8-lane phase of an ldmatrix reads 8 rows of 16 bytes: with the swizzle they fall into
    8 distinct 16-byte bank groups (element offset * 2 bytes / 16, mod 8)."""
    for x0 in range(0, 64, 16):
        for x1 in range(P // 16):
            addrs = [F[fn](P, x0, x1, lane) for lane in range(32)]
            for j in range(4):
                groups = {(a * 2 // 16) % 8 for a in addrs[8 * j: 8 * j + 8]}
                assert len(groups) == 8, (fn, P, x0, x1, j)
            assert all(a % 8 == 0 for a in addrs), "ldmatrix rows must be 16-byte aligned"


def test_fragment_maps_are_bijections():
    for rows, cols, shape in (a_coords() + ((16, 16),), c_coords() + ((16, 8),)):
        cells = {(int(r), int(c)) for r, c in zip(rows.ravel(), cols.ravel())}
        assert len(cells) == shape[0] * shape[1] == rows.size
    ks, ns = b_coords()
    assert len({(int(k), int(n)) for k, n in zip(ks.ravel(), ns.ravel())}) == 16 * 8
