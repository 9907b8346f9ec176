"""Ring (context-parallel) attention: each rank holds a shard of the sequence; the K/V shards travel
around the ring of ranks while every rank attends its queries to the shard it holds, and the
partial results merge by log-sum-exp.

    step s on rank r: hold the K/V shard of rank (r - s) mod W; send it on to rank r + 1 and receive
    the next from rank r - 1 (async, overlapped with this step's kernel); attend; merge.

The backward runs the same ring once more: K/V travel again, and with each shard travels its dK/dV
accumulator, which every rank adds its part to (it travels during the next step's kernel); after W
steps the accumulators come home. The
block kernels are fastattn's (fastattn/distributed/blocks.py); the transport is torch.distributed
point-to-point (NCCL on GPUs, gloo on CPUs).

Causal attention uses the zig-zag layout (layout.py): rank r holds chunks r and 2W - 1 - r of the
sequence, so at each step a rank does the same work. With c = S_local / 2, the K/V of rank src is,
from rank r's point of view:
    src == r: both chunks, causal (the diagonal);
    src <  r: its head chunk precedes both of r's chunks and its tail follows them: all queries x
              the first c keys, no mask;
    src >  r: both its chunks precede r's tail chunk and follow r's head chunk: the last c queries x
              all keys, no mask.
"""

from __future__ import annotations

import contextlib
import struct

import torch
import torch.distributed as dist

from fastattn import semantics
from fastattn.distributed import blocks
from fastattn.distributed.layout import group_info, padded_length, zigzag_block
from fastattn.distributed.varlen import host_lengths, step_plans
from fastattn.first_order import first_order
from fastattn.shape import AttentionShape
from fastattn.validation import (
    FLOAT_DTYPES,
    validate_flag,
    validate_key_padding_mask,
    validate_qkv,
    validate_scale,
    value_checks,
)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention over a sequence sharded across the ranks of `group`, as ``fastattn.attention``
    would compute it on the whole sequence on one device. Differentiable.

    Args:
        q: (B, Sq_local, Hq, D), this rank's queries; k, v: (B, Sk_local, Hkv, D), its keys and
            values (Hq % Hkv == 0: GQA/MQA; only Hkv heads travel). Every rank's shards have the
            same shapes (``fastattn.distributed.shard`` pads the sequence to make them so).
        group: the torch.distributed process group (None: the default group).
        causal: the sequence is sharded in the zig-zag layout (``shard``) and q, k, v are the same
            positions (self-attention, Sq_local == Sk_local, even). Without causal, any layout
            works, as long as k, v and key_padding_mask share theirs, and Sq may differ from Sk
            (cross-attention between two sharded sequences).
        scale: softmax scale, default 1/sqrt(D).
        key_padding_mask: (B, Sk_local) bool, True = real key: this rank's part of the whole mask
            (``shard(mask)``; it travels with K/V). Non-causal attention over a padded shard needs
            it, or the padding is attended to.
        return_lse: also return the log-sum-exp (B, Hq, Sq_local) float32 (float64 for float64 inputs).
        backend: the block kernels: "auto" (CUDA: "triton"; CPU: "torch", or "reference" with
            return_lse), "triton", "cuda", "torch" (CPU only) or "reference".

    Partial outputs merge in float32 (float64 for float64 inputs), their lse in float64 for fp32
    inputs too (as the kernels save it); dQ and the travelling dK/dV accumulators are float32, so
    the ring's gradients are no coarser than the kernels'.
    Returns out (B, Sq_local, Hq, D) [, lse].

    It is a collective, like all_reduce: every rank of the group calls it in the same order, and
    every rank runs its backward (a loss that depends on the output, as with DDP); a rank that does
    not leaves the others waiting until the process group's timeout, when they raise. Where value
    checks are on (CPU tensors, or FASTATTN_CHECK_VALUES=1), a bad argument on one rank alone raises
    on every rank: there with its own error, on the others naming that rank and its error.
    """
    ring = Ring(group)  # (no process group: raised here, with no peer to tell)
    device = _device_of(q, k, v)
    checked = value_checks(device)
    try:
        shape = validate_qkv(q, k, v)
        causal = validate_flag("causal", causal)
        return_lse = validate_flag("return_lse", return_lse)
        scale = validate_scale(scale, shape.head_dim)
        validate_key_padding_mask(key_padding_mask, shape, q)
        if causal and (shape.seqlen_q != shape.seqlen_k or shape.seqlen_q % 2):
            raise ValueError("causal ring attention is self-attention in the zig-zag layout: q and k must hold the "
                             f"same positions, an even number per rank (got Sq_local={shape.seqlen_q}, "
                             f"Sk_local={shape.seqlen_k}); shard the sequence with fastattn.distributed.shard")
        if shape.seqlen_q == 0 or shape.seqlen_k == 0:
            raise ValueError("ring_attention needs at least one query and one key per rank")
        block = blocks.choose(backend, q, k, v, shape, causal, scale, key_padding_mask, return_lse)
    except Exception as error:
        if checked:
            ring.share_failure(error, device)
        raise
    if checked:
        ring.check_same_shapes(q, k, key_padding_mask, causal, scale)
    out, lse = RingAttention.apply(q, k, v, key_padding_mask, causal, scale, block, ring, None)
    return (out, lse) if return_lse else out


def ring_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    group=None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Ring attention over packed documents (FlashAttention's varlen layout) sharded across ranks:
    each token attends only within its document, as ``fastattn.attention_varlen`` would compute it
    on the whole packed stream on one device. Differentiable.

    Args:
        q: (Tq_local, Hq, D), this rank's part of the packed queries, ``shard(q_packed, dim=0)``;
            k, v: (Tk_local, Hkv, D), likewise. Documents may cross shard (and rank) boundaries.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32/int64, the *whole* streams' cumulative document
            lengths, the same on every rank. Read on the host (a device sync for CUDA tensors: pass
            CPU tensors to avoid it); each step's plan is cached per distinct value.
        causal: self-attention (cu_seqlens_q == cu_seqlens_k), bottom-right within each document.
        backend: "auto" (CUDA: "triton"; CPU: "reference"), "triton" or "reference".

    Returns out (Tq_local, Hq, D) [, lse (Hq, Tq_local) float32, float64 for float64 inputs]; the
    padding rows ``shard`` adds at the stream's end attend only to each other.
    """
    ring = Ring(group)  # (no process group: raised here, with no peer to tell)
    rank, world = ring.rank, ring.world
    device = _device_of(q, k, v)
    checked = value_checks(device)
    try:  # as ring_attention's: a failure here reaches the other ranks through check_same_shapes' all_gather
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or x.dim() != 3:
                raise ValueError(f"{name} must be a (T_local, H, D) tensor, got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        q4, k4, v4 = q[None], k[None], v[None]  # (T, H, D) -> (1, T, H, D): the ring's padded layout
        shape = validate_qkv(q4, k4, v4)
        causal = validate_flag("causal", causal)
        return_lse = validate_flag("return_lse", return_lse)
        scale = validate_scale(scale, shape.head_dim)
        cu_q, cu_k = host_lengths(cu_seqlens_q, "cu_seqlens_q"), host_lengths(cu_seqlens_k, "cu_seqlens_k")
        if len(cu_q) != len(cu_k):
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must hold the same number of documents, got "
                             f"{len(cu_q) - 1} and {len(cu_k) - 1}")
        for name, cu, local in (("q", cu_q, shape.seqlen_q), ("k", cu_k, shape.seqlen_k)):
            if padded_length(cu[-1], world) != local * world:
                raise ValueError(f"{name} has {local} rows, but a shard of the {cu[-1]} packed tokens of "
                                 f"cu_seqlens_{name} over {world} ranks has {padded_length(cu[-1], world) // world} "
                                 "(fastattn.distributed.shard(x, dim=0))")
        if causal and cu_q != cu_k:
            raise ValueError("causal ring attention is self-attention: cu_seqlens_q and cu_seqlens_k must be equal")
        if shape.seqlen_q == 0 or shape.seqlen_k == 0:
            raise ValueError("ring_attention_varlen needs at least one query and one key per rank")
        # Each block launches one sequence per document, plus the padding's: the backend checks that count.
        per_block = AttentionShape(len(cu_q), shape.seqlen_q, shape.seqlen_k, shape.heads_q, shape.heads_kv,
                                   shape.head_dim)
        block = blocks.choose(backend, q4, k4, v4, per_block, causal, scale, None, return_lse, varlen=True)
    except Exception as error:
        if checked:
            ring.share_failure(error, device)
        raise
    if checked:
        ring.check_same_shapes(q4, k4, None, causal, scale, (cu_q, cu_k))
    plans = step_plans(cu_q, cu_k, causal, rank, world, q.device)
    out, lse = RingAttention.apply(q4, k4, v4, None, causal, scale, block, ring, plans)
    return (out[0], lse[0]) if return_lse else out[0]


class Ring:
    """Point-to-point exchange with this rank's neighbours in `group`: send to rank + 1, receive
    from rank - 1, asynchronously."""

    def __init__(self, group=None):
        self.group = group
        self.rank, self.world = group_info(group)
        to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next, self.prev = to_global((self.rank + 1) % self.world), to_global((self.rank - 1) % self.world)

    def exchange(self, tensors, tag: int = 0) -> Exchange:
        """Start sending `tensors` (contiguous) to the next rank and receiving tensors of the same
        shapes from the previous one."""
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group, tag) for r in received]
        return Exchange(dist.batch_isend_irecv(ops), tensors, received)

    def check_same_shapes(self, q, k, key_padding_mask, causal: bool, scale: float, documents: tuple = ()) -> None:
        """Every rank's shards have the same shapes (or the receive buffers would not fit), and every
        rank the same causal and scale (or the gathered output mixes two attentions) and, for packed
        documents, the same cu_seqlens (`documents`: both as tuples). One small all_gather, read on the
        host once; run where value checks are on: CPU tensors, or FASTATTN_CHECK_VALUES=1. A rank whose
        own checks failed joins it through share_failure instead: then every other rank raises here."""
        digest = hash(documents) & 0x7FFFFFFF  # ints hash the same in every process
        # The dtype too (its index in FLOAT_DTYPES): a receive buffer of another dtype would reinterpret
        # the bytes it gets. The scale as its float64 bits (exact, in an int64 row).
        dtype = FLOAT_DTYPES.index(q.dtype) if q.dtype in FLOAT_DTYPES else -1
        scale_bits = struct.unpack("<q", struct.pack("<d", scale))[0]
        rows = self._gather([*q.shape, *k.shape, key_padding_mask is not None, dtype, causal, scale_bits, digest],
                            None, q.device)
        failed = [r for r, row in enumerate(rows) if row[0]]
        if failed:
            who = f"rank {failed[0]} rejected its" if len(failed) == 1 else \
                f"ranks {', '.join(map(str, failed))} rejected their"
            said = "; ".join(f"rank {r}: {_decoded(rows[r][1 + _FIELDS:])}" for r in failed)
            raise ValueError(f"ring attention: {who} arguments, so rank {self.rank} raises too instead of waiting "
                             f"({said})")

        def described(x):  # a rank's fields: q shape, k shape (4 each), mask, dtype, causal, scale, digest
            name = FLOAT_DTYPES[x[9]] if 0 <= x[9] < len(FLOAT_DTYPES) else "other"
            scale_of = struct.unpack("<d", struct.pack("<q", x[11]))[0]
            return (f"q {tuple(x[:4])}, k {tuple(x[4:8])}, mask {bool(x[8])}, {name}, causal={bool(x[10])}, "
                    f"scale={scale_of!r}")

        mine = rows[self.rank][1:1 + _FIELDS]
        for r, row in enumerate(rows):
            theirs = row[1:1 + _FIELDS]
            if theirs[:-1] == mine[:-1] and theirs[-1] != mine[-1]:
                raise ValueError(f"ring_attention_varlen: rank {r}'s cu_seqlens differ from rank {self.rank}'s: every "
                                 "rank passes the whole streams' cu_seqlens")
            if theirs != mine:
                raise ValueError(f"ring_attention: rank {r}'s call ({described(theirs)}) differs from rank "
                                 f"{self.rank}'s ({described(mine)}): every rank needs the same shapes, dtype, causal "
                                 "and scale (fastattn.distributed.shard pads the shapes)")

    def share_failure(self, error: Exception, device: torch.device) -> None:
        """This rank's arguments failed its own checks with `error`: it joins check_same_shapes'
        all_gather with the error in place of its call's fields, so that every other rank raises there
        instead of waiting for this one in the ring's first transfer (no collective of its own). The
        caller then raises `error`. If the gather fails (the peers are not in it), `error` still goes
        first: that failure is dropped."""
        with contextlib.suppress(Exception):
            self._gather([0] * _FIELDS, error, device)

    def _gather(self, fields: list, error: Exception | None, device: torch.device) -> list[list[int]]:
        """Every rank's row [failed, *fields, *its error message's words] (int64; one all_gather),
        read on the host at once."""
        message = [0] * _MESSAGE_WORDS if error is None else _encoded(f"{type(error).__name__}: {error}")
        mine = torch.tensor([error is not None, *fields, *message], dtype=torch.int64, device=device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine, group=self.group)
        return torch.stack(every).tolist()


# check_same_shapes' row: q shape, k shape (4 each), mask, dtype, causal, scale bits, documents' digest;
# after them, a failing rank's error message as int64 words (192 bytes of UTF-8, the rest cut).
_FIELDS = 13
_MESSAGE_WORDS = 24


def _encoded(text: str) -> list[int]:
    raw, room = text.encode(), 8 * _MESSAGE_WORDS
    if len(raw) > room:
        raw = raw[:room - 3] + b"..."
    return list(struct.unpack(f"<{_MESSAGE_WORDS}q", raw.ljust(room, b"\0")))


def _decoded(words: list[int]) -> str:
    return struct.pack(f"<{len(words)}q", *words).rstrip(b"\0").decode(errors="ignore")


def _device_of(*xs) -> torch.device:
    """The first tensor argument's device (CPU without one): where this rank's checks run."""
    return next((x.device for x in xs if isinstance(x, torch.Tensor)), torch.device("cpu"))


class Exchange:
    """Sends and receives in flight; wait() returns the received tensors. It holds the sent tensors
    until then, so their memory is not reused while they travel."""

    def __init__(self, works, sent, received):
        self._works, self._sent, self._received = works, sent, received

    def wait(self) -> list[torch.Tensor]:
        for w in self._works:
            w.wait()
        # Drop the finished works and what they hold: a transport's work object that outlives its
        # process group (e.g. until interpreter exit) can abort the process when destroyed.
        self._works, self._sent = (), None
        return self._received


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The merged lse's dtype: float64 for fp32 inputs too, as the kernels save theirs (a float32 one,
    rounded at every merge, raised the ring's fp32 dK error at large logits to ~2x a single device's;
    docs/design.md, "Precision of the backward"). fp16/bf16: float32, their rounding dwarfs it."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


class RingAttention(torch.autograd.Function):
    """(q, k, v) -> (out, lse) over the ring; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, causal, scale, block, ring, plans):
        k, v = k.contiguous(), v.contiguous()
        # Masks travel as uint8 (not every transport sends bool).
        mask = None if key_padding_mask is None else key_padding_mask.contiguous().view(torch.uint8)
        acc, lse_acc = _accumulation_dtype(q.dtype), _lse_dtype(q.dtype)
        half = q.shape[1] // 2
        travelling = [k, v] if mask is None else [k, v, mask]
        out = lse = None
        for step in range(ring.world):
            pending = ring.exchange(travelling) if step + 1 < ring.world else None
            kb, vb, *mb = travelling
            mb = mb[0].view(torch.bool) if mb else None
            rows, keys, block_causal = zigzag_block(causal, ring.rank, (ring.rank - step) % ring.world, half)
            layout = plans[step] if plans is not None else None if mb is None else mb[:, keys]
            o, l = block.forward(q[:, rows], kb[:, keys], vb[:, keys], layout, block_causal, scale)
            if out is None:  # step 0 covers every query row
                out, lse = o.to(acc), l.to(lse_acc).contiguous()
            else:
                semantics.merge_state(out[:, rows], lse[:, :, rows], o, l)
            if pending is not None:
                travelling = pending.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, mask, out, lse)  # the backward takes the merged lse at full width
        ctx.causal, ctx.scale, ctx.block, ctx.ring, ctx.plans = causal, scale, block, ring, plans
        ctx.set_materialize_grads(False)
        return out, lse.to(acc)  # callers get float32 (float64 for float64 inputs)

    @staticmethod
    @first_order  # built from the blocks' kernel gradients: not differentiable again
    def backward(ctx, dout, dlse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        ring, block, causal, scale = ctx.ring, ctx.block, ctx.causal, ctx.scale
        if dout is None:  # only lse was used
            dout = torch.zeros_like(out)
        dout = dout.contiguous()
        acc = _accumulation_dtype(q.dtype)
        half = q.shape[1] // 2
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk, dv = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (k, v))  # travel with their K/V
        travelling = [k, v] if mask is None else [k, v, mask]
        grads_in = None
        for step in range(ring.world):
            pending = ring.exchange(travelling) if step + 1 < ring.world else None
            kb, vb, *mb = travelling
            mb = mb[0].view(torch.bool) if mb else None
            rows, keys, block_causal = zigzag_block(causal, ring.rank, (ring.rank - step) % ring.world, half)
            layout = ctx.plans[step] if ctx.plans is not None else None if mb is None else mb[:, keys]
            grads = block.backward(
                dout[:, rows], None if dlse is None else dlse[:, :, rows].contiguous(), q[:, rows], kb[:, keys],
                vb[:, keys], out[:, rows], lse[:, :, rows].contiguous(), layout, block_causal, scale)
            dq[:, rows] += grads[0]
            if grads_in is not None:  # the accumulators of the K/V shard held, which travelled during the kernel
                dk, dv = grads_in.wait()
            dk[:, keys] += grads[1]
            dv[:, keys] += grads[2]
            if ring.world > 1:  # the last step's send brings each accumulator home
                grads_in = ring.exchange([dk, dv], tag=1)
            if pending is not None:
                travelling = pending.wait()
        if grads_in is not None:
            dk, dv = grads_in.wait()
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None
