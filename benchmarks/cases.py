"""The benchmark cases: shapes, their FLOP and byte counts, and the named grids.

FlashAttention's standard grid: 16k tokens per batch (batch = 16384 // seqlen), hidden 2048
(heads = 2048 // head_dim), head dim 64/128/256, seq len 512..16k, causal and not, fp16 and bf16.
Beside it: cross-attention (Sq != Sk), GQA, padded batches (a key-padding mask) and decoding.

FLOPs come from fastattn.flops (the one formula). Bytes are the least traffic a fused kernel must
move (each input read once, each output written once): the x axis of the roofline chart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from fastattn.flops import MODES, attention_flops
from fastattn.shape import AttentionShape

TOKENS = 16384
HIDDEN = 2048
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128, 256)
DTYPES = ("bfloat16", "float16")

# Decoding (1 query over a long KV cache) is a different measurement: bytes/s of the split-KV decode
# kernel over a KV cache, against SDPA and the prefill kernel, in benchmarks/decode.py. This grid
# lists the cases and the report points there.
DECODE_SKIP_REASON = ("decoding is benchmarked by benchmarks/decode.py (fastattn.attention_with_kvcache over a KV "
                      "cache, in GB/s)")


@dataclass(frozen=True, kw_only=True)
class Case(AttentionShape):
    """A benchmark case: an attention shape (fastattn's one shape record) plus what the case is."""

    kind: str  # "self" (the standard grid), "cross", "gqa", "padded", "decode"
    causal: bool
    dtype: str  # a torch dtype name: "bfloat16", "float16", "float32"
    fill: float = 1.0  # padded: the shortest batch element's fraction of real keys

    @property
    def label(self) -> str:
        heads = f"H{self.heads_q}" if self.heads_q == self.heads_kv else f"H{self.heads_q}/{self.heads_kv}"
        seq = f"S{self.seqlen_q}" if self.seqlen_q == self.seqlen_k else f"Sq{self.seqlen_q} Sk{self.seqlen_k}"
        pad = f" real{self.fill:.0%}-100%" if self.kind == "padded" else ""
        return (f"{self.kind} B{self.batch} {seq} {heads} D{self.head_dim} "
                f"{'causal' if self.causal else 'full'} {self.dtype}{pad}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def key_lengths(self) -> list[int] | None:
        """Padded batches: real keys per batch element, from fill * Sk (element 0, the one the
        correctness gate checks) up to Sk, evenly spaced. None for unpadded cases."""
        if self.kind != "padded":
            return None
        lo = max(1, round(self.fill * self.seqlen_k))
        if self.batch == 1:
            return [lo]
        return [lo + (self.seqlen_k - lo) * i // (self.batch - 1) for i in range(self.batch)]

    def flops(self, mode: str) -> float:
        """Useful FLOPs: keys a query cannot see (above the causal diagonal, padding) do not count."""
        lengths = self.key_lengths()
        if lengths is None:
            return attention_flops(self.batch, self.heads_q, self.seqlen_q, self.seqlen_k, self.head_dim,
                                   causal=self.causal, mode=mode)
        # Padding at the end of each sequence: a query of element b sees the first lengths[b] keys
        # (causal still aligned to all Sk key positions).
        return sum(attention_flops(1, self.heads_q, self.seqlen_q, self.seqlen_k, self.head_dim, causal=self.causal,
                                   mode=mode, real_keys=n) for n in lengths)

    def bytes(self, mode: str) -> float:
        """Least memory traffic: fwd reads q, k, v and writes o; bwd reads q, k, v, o, dO and writes
        dq, dk, dv (the fp32 lse/delta rows are left out: under 1% at D >= 64)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        q = self.batch * self.seqlen_q * self.heads_q * self.head_dim
        kv = self.batch * self.seqlen_k * self.heads_kv * self.head_dim
        size = self.torch_dtype.itemsize
        fwd = (2 * q + 2 * kv) * size  # q, k, v in; o out
        bwd = (4 * q + 4 * kv) * size  # q, k, v, o, dO in; dq, dk, dv out
        return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]

    def scores_bytes(self) -> int:
        """Size of the (B, Hq, Sq, Sk) fp32 score matrix a non-fused implementation materialises."""
        return self.batch * self.heads_q * self.seqlen_q * self.seqlen_k * 4

    def as_dict(self) -> dict:
        return {**asdict(self), "label": self.label}


def standard(dtypes=DTYPES, head_dims=HEAD_DIMS, seqlens=SEQLENS, causals=(False, True)) -> list[Case]:
    """FlashAttention's grid: 16k tokens per batch, hidden 2048."""
    return [Case(TOKENS // s, s, s, HIDDEN // d, HIDDEN // d, d, kind="self", causal=c, dtype=dt)
            for dt in dtypes for d in head_dims for c in causals for s in seqlens]


def extra(dtype="bfloat16") -> dict[str, Case]:
    """Cross-attention (B=8 x 512 queries over 4k keys, as in the earlier H100 runs), GQA at 16k
    tokens per batch (D=64 and 128) and a padded batch of 16k token slots (D=128)."""
    return {
        # encoder-decoder: 512 queries over 4k keys; the causal one is chunked prefill (bottom-right)
        "cross": Case(8, 512, 4096, 16, 16, 128, kind="cross", causal=False, dtype=dtype),
        "cross_causal": Case(8, 512, 4096, 16, 16, 128, kind="cross", causal=True, dtype=dtype),
        # 4 and 8 query heads per KV head
        "gqa4": Case(4, 4096, 4096, 32, 8, 64, kind="gqa", causal=True, dtype=dtype),
        "gqa8": Case(4, 4096, 4096, 16, 2, 128, kind="gqa", causal=True, dtype=dtype),
        # an encoder batch, 50..100% real tokens
        "padded": Case(8, 2048, 2048, 16, 16, 128, kind="padded", causal=False, dtype=dtype, fill=0.5),
    }


def decode(dtype="bfloat16") -> list[Case]:
    return [Case(b, 1, 8192, 16, 16, 128, kind="decode", causal=False, dtype=dtype) for b in (1, 8, 64)]


def quick_gpu() -> list[Case]:
    """tools/gpu_check.sh's subset: the README's D=128 bf16 rows, one D=64 row and one of each extra kind.
    The two 16k-token D=128 cases (the Hopper bar's) come first: gpu_check's bench stage is short and
    a run that hits its budget loses the cases at the end."""
    return (standard(dtypes=("bfloat16",), head_dims=(128,), seqlens=(16384,))
            + standard(dtypes=("bfloat16",), head_dims=(128,), seqlens=(1024, 4096))
            + standard(dtypes=("bfloat16",), head_dims=(64,), seqlens=(4096,), causals=(True,))
            + [extra()[name] for name in ("cross", "gqa4", "padded")] + decode()[:1])


def full_gpu() -> list[Case]:
    """Everything, most wanted first: a run that hits its time budget loses the least important
    cases (D=128 and 64 in bf16, then the extra kinds, then D=256, then fp16)."""
    bf16, fp16 = DTYPES
    return (standard(dtypes=(bf16,), head_dims=(128, 64)) + list(extra(bf16).values()) + decode(bf16)
            + standard(dtypes=(bf16,), head_dims=(256,)) + standard(dtypes=(fp16,)))


def cpu_quick() -> list[Case]:
    """Tiny shapes for a machine without a GPU (the Triton kernels run in the interpreter). fp16: the
    interpreter cannot run bf16 dots, and the bf16 row shows that reported as a skip."""
    return [
        Case(2, 128, 128, 2, 2, 64, kind="self", causal=False, dtype="float16"),
        Case(2, 128, 128, 2, 2, 64, kind="self", causal=True, dtype="float16"),
        Case(2, 128, 128, 2, 2, 64, kind="self", causal=True, dtype="bfloat16"),
        Case(2, 64, 256, 2, 2, 64, kind="cross", causal=False, dtype="float16"),
        Case(1, 128, 128, 4, 1, 64, kind="gqa", causal=True, dtype="float16"),
        Case(3, 128, 128, 2, 2, 64, kind="padded", causal=False, dtype="float16", fill=0.5),
        Case(2, 1, 256, 2, 2, 64, kind="decode", causal=False, dtype="float16"),
    ]


GRIDS = {"quick": quick_gpu, "full": full_gpu, "cpu": cpu_quick}


def make_inputs(case: Case, device, generator: torch.Generator | None = None):
    """Fresh N(0, 1) q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) and the key-padding mask (B, Sk) (True =
    real key) or None. Random, never zeros (some kernels are faster on zeros); drawn on the device
    (16k tokens x 2048 x 3 on the CPU would cost a second per case). `generator` is on `device`."""
    def randn(s, h):
        return torch.randn(case.batch, s, h, case.head_dim, device=device, generator=generator).to(case.torch_dtype)

    q = randn(case.seqlen_q, case.heads_q)
    k, v = randn(case.seqlen_k, case.heads_kv), randn(case.seqlen_k, case.heads_kv)
    lengths = case.key_lengths()
    mask = None
    if lengths is not None:
        mask = torch.arange(case.seqlen_k, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    return q, k, v, mask
