"""Test helpers: random inputs and docs/design.md's tolerance rule (the one tolerance helper).

A result passes when  max|out - ref64| <= factor * max|naive_lowprec - ref64| + 1e-5 * max(1, max|ref64|),
where ref64 is ``fastattn.reference`` in float64 and naive_lowprec is the same naive math done in
the input dtype. factor is 2 for outputs and lse, 3 for gradients.

The 1e-5 floor is relative to the magnitude of the reference once that exceeds 1 (normwise, not
elementwise): for outputs and lse their own magnitude, for gradients the largest of dq, dk, dv
(dbias, which is dS: that or its own, whichever is larger; dsinks: its own).
For fp32 the naive error is one noisy sample of rounding error, and it can be far below what any
other valid summation order gives: dV of an MQA head with one key sums hundreds of terms (|dV| ~
30; seen on an H100: 2.07e-5 against an absolute 1e-5-based tolerance of 1.86e-5), and with one
key dK is exactly 0 in exact arithmetic but FlashAttention's dS = P * (dP - delta) leaves rounding
noise of the size of dP, which the naive softmax backward happens to cancel exactly (seen on CPU:
1.05e-5 against 1.00e-5). For fp16/bf16 outputs the floor is one unit of the dtype's precision
(eps) instead of 1e-5: with two keys the naive fp16 result can be exact by luck while any other
valid rounding of P is an ulp off (seen: 7.5e-4 against 5.7e-4). For fp32 values of order 1 the
floor is docs/design.md's 1e-5 unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fastattn import reference

ABS_FLOOR = 1e-5
OUT_FACTOR = 2.0
GRAD_FACTOR = 3.0


def max_abs_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| in float64; matching infinities (an lse of -inf) count as 0, NaN as inf."""
    x, ref = x.detach().double(), ref.detach().double()
    same_inf = torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref))
    err = torch.where(same_inf, torch.zeros_like(x), (x - ref).abs())
    err = torch.nan_to_num(err, nan=float("inf"), posinf=float("inf"))
    return err.max().item() if err.numel() else 0.0


@dataclass
class Comparison:
    name: str
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance

    def __str__(self) -> str:
        return f"{self.name}: max err {self.error:.3e} (tol {self.tolerance:.3e}) {'ok' if self.ok else 'FAIL'}"


def magnitude(*refs: torch.Tensor) -> float:
    """max(1, largest finite |value|) over the given reference tensors: the floor's scale."""
    m = 1.0
    for r in refs:
        finite = r.detach().abs().nan_to_num(0.0, posinf=0.0, neginf=0.0)
        if finite.numel():
            m = max(m, finite.max().item())
    return m


def compare(name: str, out: torch.Tensor, naive_lowprec: torch.Tensor, ref64: torch.Tensor,
            factor: float, scale: float | None = None) -> Comparison:
    """The tolerance rule for one tensor; `scale` (default: ref64's own magnitude) scales the floor."""
    naive_err = max_abs_error(naive_lowprec, ref64)
    if naive_err == float("inf"):
        # The rule is undefined here (it would accept anything): make the input smaller instead.
        raise ValueError(f"{name}: the naive low-precision result is not finite; the tolerance rule needs it finite")
    scale = magnitude(ref64) if scale is None else scale
    # Floor: 1e-5, or one unit of the computation's precision (the naive result's dtype: the input
    # dtype, also for a float32 bias or sinks learned in an fp16 call), whichever is larger (rounding
    # to fp16/bf16 alone costs half a unit; the naive result may be exact by luck).
    floor = max(ABS_FLOOR, torch.finfo(naive_lowprec.dtype).eps)
    tol = factor * naive_err + floor * scale
    if torch.finfo(out.dtype).eps > torch.finfo(naive_lowprec.dtype).eps:
        # A result coarser than the computation (an fp16 bias learned in a float32 call gets an fp16
        # gradient, as autograd requires): plus what the exact answer loses in the result's dtype.
        tol += max_abs_error(ref64.to(out.dtype), ref64)
    return Comparison(name, max_abs_error(out, ref64), tol)


def random_qkv(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, *, dtype=torch.float32,
               device="cpu", layout="bshd", generator=None, requires_grad=False):
    """Fresh N(0, 1) q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D).

    layout "bhsd" allocates (B, H, S, D) storage and returns its (B, S, H, D) transpose (the
    non-contiguous view a model gets after splitting heads), exercising arbitrary strides.
    """
    def make(s, h):
        if layout == "bshd":
            x = torch.randn(batch, s, h, head_dim, generator=generator, dtype=torch.float32)
        elif layout == "bhsd":
            x = torch.randn(batch, h, s, head_dim, generator=generator, dtype=torch.float32).transpose(1, 2)
        else:
            raise ValueError(f"layout must be 'bshd' or 'bhsd', got {layout!r}")
        return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return make(seqlen_q, heads_q), make(seqlen_k, heads_kv), make(seqlen_k, heads_kv)


def check_against_reference(fn, q, k, v, *, causal=False, scale=None, key_padding_mask=None,
                            grads=True, lse=True, lse_grad=False, generator=None, ref_fn=None,
                            mods=None) -> list[Comparison]:
    """Run ``fn(q, k, v, **mods) -> (out, lse)`` and compare out, lse and (optionally) dq/dk/dv with
    the float64 reference under the tolerance rule. Inputs are fresh leaves; q/k/v are not modified.
    With lse_grad the gradients also flow from a random cotangent on lse (d lse / d s = P).
    ref_fn(q, k, v, **mods) -> (out, lse) replaces the naive reference (e.g. its packed-sequence
    form); it is run in float64 and in the input dtype like the default.
    mods: score modifiers (keyword arguments of fastattn.reference.attention). Its "bias" and
    "sinks" are differentiable inputs like q, k, v: fresh leaves per run (in the run's dtype for the
    references, their own dtype for fn), with their gradients compared as "dbias" and "dsinks"."""
    mods = dict(mods or {})
    kw = dict(causal=causal, scale=scale, key_padding_mask=key_padding_mask, return_lse=True)
    learned = [name for name in ("bias", "sinks") if mods.get(name) is not None]

    def run(f, dtype, own_dtype=False):
        xs = [x.detach().to(dtype).requires_grad_(grads) for x in (q, k, v)]
        m = dict(mods)
        for name in learned:
            m[name] = mods[name].detach().to(mods[name].dtype if own_dtype else dtype).requires_grad_(grads)
        o, l = f(*xs, **m)
        return xs + [m[name] for name in learned], o, l

    xs, out, out_lse = run(fn, q.dtype, own_dtype=True)
    if ref_fn is None:
        ref_fn = lambda a, b, c, **m: reference.attention(a, b, c, **kw, **m)
    x64, ref, ref_lse = run(ref_fn, torch.float64)
    xlp, naive, naive_lse = run(ref_fn, q.dtype)
    results = [compare("out", out, naive, ref, OUT_FACTOR)]
    if lse:
        results.append(compare("lse", out_lse, naive_lse, ref_lse, OUT_FACTOR))
    if grads:
        dout = torch.randn(out.shape, generator=generator, dtype=torch.float32).to(out)
        dlse = torch.randn(ref_lse.shape, generator=generator, dtype=torch.float32).to(out.device)
        for o, l in ((out, out_lse), (ref, ref_lse), (naive, naive_lse)):
            if lse_grad:
                torch.autograd.backward([o, l], [dout.to(o.dtype), dlse.to(l.dtype)])
            else:
                o.backward(dout.to(o.dtype))
        grad_scale = magnitude(*(x.grad for x in x64[:3]))  # dq, dk, dv are coupled through dS
        names = ("dq", "dk", "dv", *("d" + name for name in learned))
        for name, a, b_, c in zip(names, xs, x64, xlp):
            # dbias is dS itself (summed over broadcast dims): dS = P * (dP - delta) rounds at dP's size
            # even where it cancels to ~0 (one key: the module docstring's dK case), so it takes dq/dk/dv's
            # scale when that is larger; dsinks, a sum over rows of P(sink) * delta, its own scale.
            scale_ = (grad_scale if name in ("dq", "dk", "dv")
                      else max(grad_scale, magnitude(b_.grad)) if name == "dbias" else magnitude(b_.grad))
            results.append(compare(name, a.grad, c.grad, b_.grad, GRAD_FACTOR, scale_))
    return results


def random_kv_cache(lens, capacity, hkv, d, *, dtype=torch.float32, page_size=0, device="cpu", generator=None,
                    spare_pages=3):
    """A random KV cache for len(lens) sequences of `capacity` positions: (k_cache, v_cache,
    block_table or None, cache_seqlens int32). Paged (page_size > 0): pages in a random order, with
    spare pages no sequence uses."""
    b = len(lens)
    if page_size:
        max_pages = -(-capacity // page_size)
        n_pages = b * max_pages + spare_pages
        shape = (n_pages, page_size, hkv, d)
        table = torch.randperm(n_pages, generator=generator)[:b * max_pages].view(b, max_pages).int().to(device)
    else:
        shape, table = (b, capacity, hkv, d), None
    k_cache = torch.randn(shape, generator=generator).to(device, dtype)
    v_cache = torch.randn(shape, generator=generator).to(device, dtype)
    return k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32, device=device)


def fill_cache_rows(cache: torch.Tensor, block_table: torch.Tensor | None, b: int, start: int, value: float) -> None:
    """Set sequence b's positions from `start` to its capacity to `value`, in place (garbage past
    its length, as a cache from torch.empty holds)."""
    if block_table is None:
        cache[b, start:] = value
        return
    page = cache.shape[1]
    for j in range(start, block_table.shape[1] * page):
        cache[int(block_table[b, j // page]), j % page] = value


def cached_rows(cache: torch.Tensor, block_table: torch.Tensor | None, b: int, n: int) -> torch.Tensor:
    """Sequence b's first n positions (n, Hkv, D) of a contiguous (B, S, Hkv, D) or paged (pages,
    page_size, Hkv, D) KV cache, read position by position (independent of fastattn.cache_layouts)."""
    if block_table is None:
        return cache[b, :n]
    page = cache.shape[1]
    rows = [cache[int(block_table[b, j // page]), j % page] for j in range(n)]
    return torch.stack(rows) if rows else cache[0, :0]


def check_kvcache_against_reference(fn, q, k_cache, v_cache, k, v, cache_seqlens, block_table=None, *,
                                    causal=True, scale=None, mods=None) -> list[Comparison]:
    """Run ``fn() -> (out, lse or None)``, a call of attention_with_kvcache that appends k/v (or
    None) to the cache, and compare with ``fastattn.reference`` on each sequence's own keys: what it
    held before the call, then k/v (bottom-right causal over exactly them), in float64 and in q's
    dtype (the tolerance rule). mods: the call's score modifiers as reference keyword arguments,
    with bias (B or 1, Hq or 1, Sq or 1, capacity or 1) and alibi_slopes (Hq,) or (B, Hq): each
    sequence gets its own row and, of the bias, its first keys."""
    mods = dict(mods or {})

    def sequence_mods(b, n_keys):
        m = dict(mods)
        if m.get("bias") is not None:
            bias = m["bias"].reshape((1,) * (4 - m["bias"].dim()) + tuple(m["bias"].shape))
            bias = bias[b:b + 1] if bias.shape[0] > 1 else bias
            m["bias"] = bias[..., :n_keys] if bias.shape[3] > 1 else bias
        if m.get("alibi_slopes") is not None and m["alibi_slopes"].dim() == 2:
            m["alibi_slopes"] = m["alibi_slopes"][b:b + 1]
        return m

    keys, values = [], []
    for b, n in enumerate(cache_seqlens.tolist()):
        kb, vb = cached_rows(k_cache, block_table, b, n), cached_rows(v_cache, block_table, b, n)
        if k is not None:
            kb, vb = torch.cat([kb, k[b]]), torch.cat([vb, v[b]])
        keys.append(kb)
        values.append(vb)
    out, out_lse = fn()

    def per_sequence(dtype):
        results = [reference.attention(q[b:b + 1].to(dtype), keys[b][None].to(dtype), values[b][None].to(dtype),
                                       causal=causal, scale=scale, return_lse=True,
                                       **sequence_mods(b, keys[b].shape[0])) for b in range(q.shape[0])]
        return torch.cat([o for o, _ in results]), torch.cat([l_ for _, l_ in results])

    (ref, ref_lse), (naive, naive_lse) = per_sequence(torch.float64), per_sequence(q.dtype)
    results = [compare("out", out, naive, ref, OUT_FACTOR)]
    if out_lse is not None:
        results.append(compare("lse", out_lse, naive_lse, ref_lse, OUT_FACTOR))
    return results


@contextlib.contextmanager
def ordered_fp32_dot():
    """In the Triton interpreter, an fp32 ``tl.dot`` rounded as a GPU rounds it: each output element
    is one chain acc = fma(a[k], b[k], acc) over k = 0..K-1 from the accumulator passed in (Triton's
    fp32 "ieee" dot on NVIDIA lowers to such an FMA chain), instead of numpy's blocked matmul, whose
    rounding depends on the tile's shape and orientation. Then a score the backward recomputes is
    bit-identical to the forward's, as on a GPU (docs/design.md, "Precision of the backward").
    Other dtypes keep the interpreter's dot."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    numpy_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype != np.float32 or b.data.dtype != np.float32:
            return numpy_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        x, y = a.data.astype(np.float64), b.data.astype(np.float64)  # exact products, one rounding per step
        acc = np.broadcast_to(d.data, (x.shape[0], y.shape[1])).astype(np.float32)
        for kk in range(x.shape[1]):
            acc = (np.outer(x[:, kk], y[kk]) + acc).astype(np.float32)
        return interpreter.TensorHandle(acc.astype(d.data.dtype), d.dtype.scalar)

    builder.create_dot = create_dot
    try:
        yield
    finally:
        builder.create_dot = numpy_dot
