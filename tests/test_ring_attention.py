"""fastattn.distributed: ring attention on 2 and 4 CPU processes (gloo) against the single-device
float64 reference, the zig-zag layout helpers, a sharded decoder training step against one process,
and failures that raise instead of hanging. The workers live in ring_harness.py (spawned processes
import them from there); each test starts one set of processes and runs several cases in it."""

import time

import pytest
import torch
from conftest import HAS_CUDA, SEED
from ring_harness import (
    check_decoder_step,
    check_ring_cases,
    check_ring_edges,
    check_ring_fp32_large_logits,
    check_ring_varlen_cases,
    run_ranks,
)

from fastattn.distributed import ring_attention, zigzag_positions
from fastattn.distributed.layout import padded_length


def cases(backend, world_size, dtypes=(torch.float32,)):
    """Odd whole lengths (every shard padded), causal and not, without a key-padding mask, with a
    random one and with a sparse one (rows that see no key at all or none in a shard), GQA, and
    cross-attention with Sq != Sk; fresh inputs from the run's seed."""
    seed = SEED + 1000 * world_size + sum(map(ord, backend))
    out = []
    for dtype in dtypes:
        for causal in (False, True):
            for mask in (None, "random", "sparse"):
                out.append((2, 13, 13, 4, 2, 16, causal, mask, backend, dtype, seed + len(out)))
        out.append((1, 9, 21, 2, 1, 16, False, "random", backend, dtype, seed + len(out)))  # cross, MQA
        out.append((1, 4 * world_size + 1, 4 * world_size + 1, 2, 2, 8, True, None, backend, dtype, seed + len(out)))
    return out


# The processes hold CPU tensors: the Triton kernels run on them through the interpreter (machines
# without a GPU); on a GPU machine test_ring_blocks_on_one_gpu runs them on CUDA tensors instead.
TRITON_ON_CPU = pytest.param("triton", marks=pytest.mark.skipif(HAS_CUDA, reason="CPU processes: interpreter only"))


@pytest.mark.parametrize("backend", [TRITON_ON_CPU, "torch", "reference"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_ring_matches_single_device(world_size, backend):
    dtypes = (torch.float32, torch.float16) if backend == "triton" and world_size == 2 else (torch.float32,)
    run_ranks(check_ring_cases, world_size, cases(backend, world_size, dtypes))


@pytest.mark.parametrize("backend", [TRITON_ON_CPU, "torch", "reference"])
def test_ring_edges_as_attention(backend):
    run_ranks(check_ring_edges, 2, backend)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's GPU-rounded fp32 dot (CPU processes)")
def test_ring_fp32_gradients_as_accurate_as_one_device():
    run_ranks(check_ring_fp32_large_logits, 2, SEED + 3000)


def varlen_cases(backend, world_size):
    """Packed documents crossing shard boundaries, an empty one, one document longer than a shard,
    the stream's padding (lengths not divisible by 2 x world_size), causal and not, GQA, and
    cross-attention with different documents on both sides."""
    seed = SEED + 2000 * world_size + sum(map(ord, backend))
    docs = [5, 0, 11, 3, 9]  # 28 tokens
    return [(docs, None, 4, 2, 16, True, backend, seed), (docs, None, 4, 2, 16, False, backend, seed + 1),
            ([3, 7, 1], [9, 2, 6], 2, 1, 16, False, backend, seed + 2), ([27], None, 2, 2, 8, True, backend, seed + 3)]


@pytest.mark.parametrize("backend", [TRITON_ON_CPU, "reference"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_ring_varlen_matches_single_device(world_size, backend):
    cases = varlen_cases(backend, world_size)
    if backend == "triton" and world_size == 4:
        cases = cases[::2]  # the interpreter is slow: causal documents and cross-attention
    run_ranks(check_ring_varlen_cases, world_size, cases)


@pytest.mark.parametrize("backend,config", [
    pytest.param("triton", {}, marks=pytest.mark.skipif(HAS_CUDA, reason="CPU processes: interpreter only")),
    ("torch", {"n_heads": 4, "n_kv_heads": 2})])
def test_sharded_decoder_step_matches_one_process(backend, config):
    run_ranks(check_decoder_step, 2, backend, SEED, config)


def test_sharded_models_refuse_what_they_cannot_run():
    from fastattn.models import Decoder, Encoder, EncoderDecoder, ModelConfig, set_context_parallel

    cfg = ModelConfig.preset("tiny", attn_backend="reference")
    tokens = torch.randint(1, cfg.vocab_size, (2, 8))
    decoder, encoder = set_context_parallel(Decoder(cfg)), set_context_parallel(Encoder(cfg))
    with pytest.raises(ValueError, match="needs them: pass fastattn.distributed.shard_positions"):
        decoder(tokens)
    with pytest.raises(ValueError, match="without a KV cache"):
        decoder(tokens, cache=decoder.new_cache(2, 16), positions=torch.arange(8))
    with pytest.raises(ValueError, match="positions must be < max_len"):
        decoder(tokens, positions=torch.arange(8) + cfg.max_len - 4)
    with pytest.raises(ValueError, match="encoder needs attention_mask=shard"):
        encoder(tokens, positions=torch.arange(8))
    with pytest.raises(ValueError, match="not computed"):
        encoder.body.blocks[0].self_attn.probabilities(torch.randn(2, 8, cfg.d_model))
    with pytest.raises(ValueError, match="cross-attention is not sharded"):
        set_context_parallel(EncoderDecoder(cfg))
    with pytest.raises(ValueError, match="go with a sequence-sharded model"):
        set_context_parallel(decoder, enabled=False)(tokens, positions=torch.arange(8))


def test_zigzag_layout_balances_causal_work():
    for seqlen in (1, 7, 16, 33):
        for world in (1, 2, 3, 4):
            parts = [zigzag_positions(seqlen, world, r) for r in range(world)]
            padded = padded_length(seqlen, world)
            assert torch.equal(torch.cat(parts).sort().values, torch.arange(padded))  # a partition
            # (query, key) pairs under the causal mask per rank at each ring step (rank r then holds rank
            # (r - step)'s keys): equal, so no rank waits for another at any step.
            for step in range(world):
                work = {int((parts[r][:, None] >= parts[(r - step) % world][None]).sum()) for r in range(world)}
                assert len(work) == 1, (seqlen, world, step, work)


def check_layout(rank, world_size):
    from fastattn.distributed import shard, shard_positions, unshard

    x = torch.randn(2, 11, 3, generator=torch.Generator().manual_seed(7), requires_grad=True)
    local = shard(x)
    assert local.shape == (2, padded_length(11, world_size) // world_size, 3)
    pos = shard_positions(11)
    real = pos < 11
    assert torch.equal(local[:, real], x[:, pos[real]]) and not local[:, ~real].any()
    assert shard(torch.ones(2, 11, dtype=torch.bool))[:, ~real].logical_not().all()  # padding is False
    whole = unshard(local * 2, 11)
    assert torch.equal(whole, x * 2)
    # Replicated conventions: unshard keeps this rank's part of the gradient, shard all-gathers it.
    whole.backward(torch.ones_like(whole))
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


@pytest.mark.parametrize("world_size", [2, 3])
def test_shard_unshard_round_trip(world_size):
    run_ranks(check_layout, world_size)


def check_errors(rank, world_size):
    from fastattn.distributed import ring_attention

    q = torch.randn(1, 4, 2, 8)

    def raises(match, **kw):
        with pytest.raises(ValueError, match=match):
            ring_attention(kw.pop("q", q), kw.pop("k", q), kw.pop("v", q), **kw)

    raises("causal ring attention is self-attention", k=q[:, :2], v=q[:, :2], causal=True)
    raises("an even number per rank", q=q[:, :3], k=q[:, :3], v=q[:, :3], causal=True)
    raises("return_lse", backend="torch", return_lse=True)
    raises("backend must be one of", backend="flash")
    raises("key_padding_mask", key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    raises("at least one query", q=q[:, :0], k=q[:, :0], v=q[:, :0])
    from fastattn.distributed import ring_attention_varlen

    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    p = torch.randn(4, 2, 8)  # 8 tokens over 2 ranks
    with pytest.raises(ValueError, match="q has 4 rows, but a shard of the 11 packed tokens"):
        ring_attention_varlen(p, p, p, torch.tensor([0, 3, 11]), torch.tensor([0, 3, 11]))
    with pytest.raises(ValueError, match="must be equal"):
        ring_attention_varlen(p, p, p, cu, torch.tensor([0, 4, 8], dtype=torch.int32), causal=True)
    with pytest.raises(ValueError, match="same number of documents"):
        ring_attention_varlen(p, p, p, cu, torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        ring_attention_varlen(p, p, p, torch.tensor([0, 5, 3, 8], dtype=torch.int32), cu)
    with pytest.raises(ValueError, match="does not run ring attention over packed documents"):
        ring_attention_varlen(p, p, p, cu, cu, backend="torch")
    # Same shapes, different documents on different ranks: caught (CPU value checks), not a wrong answer.
    mine = torch.tensor([0, 3 + rank, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=f"rank {1 - rank}'s cu_seqlens differ from rank {rank}'s"):
        ring_attention_varlen(p, p, p, mine, mine)
    # Shards of different shapes on different ranks: caught before any transfer (CPU value checks).
    k = q[:, :2 + rank]
    raises(f"rank {1 - rank}'s call .* differs from rank {rank}'s", k=k, v=k)
    # Same shapes, another dtype: the receive buffers would reinterpret the bytes (a wrong answer).
    x = q.to(torch.float16 if rank == 0 else torch.bfloat16)
    raises(f"rank {1 - rank}'s call .*{'bfloat16' if rank == 0 else 'float16'}.* differs from rank {rank}'s",
           q=x, k=x, v=x, backend="reference")
    # Same shapes, another causal or scale: each rank would merge blocks of a different attention.
    raises(f"rank {1 - rank}'s call .*causal={rank != 0}.* differs", q=q[:, :2], k=q[:, :2], v=q[:, :2],
           causal=rank == 0, backend="reference")
    raises(f"rank {1 - rank}'s call .*scale={0.5 if rank == 0 else 0.25}\\) differs", scale=0.25 if rank == 0 else 0.5,
           backend="reference")
    with pytest.raises(ValueError, match="causal=.* differs"):
        ring_attention_varlen(p, p, p, cu, cu, causal=rank == 0)
    # No query heads: an empty output (the CPU op behind backend "torch" divided by zero: SIGFPE).
    h0 = torch.randn(1, 4, 0, 8, requires_grad=True)
    out = ring_attention(h0, q, q, backend="torch")
    assert out.shape == h0.shape
    out.sum().backward()
    assert h0.grad.shape == h0.shape
    # The ring's backward is first order: a gradient penalty (the gradient of out.sum(), a constant
    # cotangent, differentiated again) raises instead of silently dropping the second-order term.
    qg = q.clone().requires_grad_()
    (dq,) = torch.autograd.grad(ring_attention(qg, q, q, backend="reference").sum(), qg, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dq.square().sum().backward()


def test_errors_name_the_problem():
    run_ranks(check_errors, 2)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        ring_attention(*(torch.randn(1, 4, 2, 8),) * 3)


def one_rank_rejects(rank, world_size):
    """Only rank 1's arguments are bad, one at a time (each check that can fail before the ring's first
    transfer: q/k/v, a flag, the scale, the mask, the backend, cu_seqlens); rank 0's are good. Every rank
    raises within seconds (the group's timeout is 10 s): rank 1 its own error, rank 0 one naming rank 1
    and that error. Then a good call on both: they are still in step (one all_gather each per call)."""
    from fastattn.distributed import ring_attention, ring_attention_varlen

    q = torch.randn(1, 4, 2, 8)
    p = torch.randn(4, 2, 8)  # 8 packed tokens over 2 ranks
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    bad = rank == 1
    cases = [  # (rank 1's error type, what its message says, the call)
        (ValueError, "k must have 4 dims", lambda: ring_attention(q, q[0] if bad else q, q)),
        (TypeError, "causal must be", lambda: ring_attention(q, q, q, causal="yes" if bad else False)),
        (TypeError, "scale must be a float", lambda: ring_attention(q, q, q, scale="0.5" if bad else None)),
        (ValueError, "key_padding_mask", lambda: ring_attention(
            q, q, q, key_padding_mask=torch.ones(1, 5 if bad else 4, dtype=torch.bool), backend="reference")),
        (ValueError, "backend must be one of", lambda: ring_attention(
            q, q, q, backend="flash" if bad else "reference")),
        (ValueError, "non-decreasing", lambda: ring_attention_varlen(
            p, p, p, torch.tensor([0, 5, 3, 8], dtype=torch.int32) if bad else cu, cu, backend="reference")),
    ]
    for kind, says, call in cases:
        start = time.monotonic()
        if bad:
            with pytest.raises(kind, match=says):
                call()
        else:
            with pytest.raises(ValueError, match=f"rank 1 rejected its arguments, .*rank 1: {kind.__name__}: .*{says}"):
                call()
        took = time.monotonic() - start
        assert took < 5, f"rank {rank} raised after {took:.1f} s ({says})"
    out = ring_attention(q, q, q, backend="reference")
    assert out.shape == q.shape


def test_an_argument_error_on_one_rank_raises_on_every_rank():
    run_ranks(one_rank_rejects, 2, group_timeout=10, timeout=120)


def stalled_peer(rank, world_size):
    """Rank 1 never joins the ring; rank 0's ring_attention must raise (the group's timeout)."""
    if rank == 1:
        time.sleep(60)
        return
    q = torch.randn(1, 4, 2, 8)
    start = time.monotonic()
    try:
        ring_attention(q, q, q, backend="reference")
    except Exception as e:  # gloo raises a RuntimeError (DistBackendError) naming the timeout
        raise RuntimeError(f"rank 0 raised after {time.monotonic() - start:.0f} s: {e}") from e
    raise AssertionError("ring_attention returned without its peer")


def test_a_stalled_rank_raises_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(Exception, match="rank 0 raised after"):
        run_ranks(stalled_peer, 2, group_timeout=3)
    assert time.monotonic() - start < 45


def hangs(rank, world_size):
    time.sleep(600)


def test_harness_kills_ranks_past_its_deadline():
    with pytest.raises(TimeoutError):
        run_ranks(hangs, 2, timeout=5)


def single_gpu(rank, world_size):
    from fastattn.testing import check_against_reference, random_qkv

    gen = torch.Generator().manual_seed(SEED)
    for dtype in (torch.float16, torch.bfloat16):
        for causal in (False, True):
            q, k, v = random_qkv(2, 256, 256, 8, 2, 128, dtype=dtype, device="cuda", generator=gen)
            results = check_against_reference(
                lambda a, b, c: ring_attention(a, b, c, causal=causal, return_lse=True, backend="triton"),
                q, k, v, causal=causal, lse_grad=True, generator=gen)
            assert all(r.ok for r in results), results


@pytest.mark.gpu
def test_ring_blocks_on_one_gpu():
    """The ring's block path on CUDA tensors (one rank, so no transfers): the Triton kernels given
    the merged out/lse, fp16 and bf16."""
    assert HAS_CUDA
    run_ranks(single_gpu, 1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_torch_block_with_a_nonpositive_scale(causal, scale, gen):
    """The ring's CPU block (aten's CPU flash op) on a diagonal block with scale <= 0: the op applies
    is_causal as -inf before scaling (a negative scale made it +inf, 0 made NaN), so the block then
    passes the causal mask as a bias. Forward and backward against the reference, with a padded key."""
    from fastattn import reference, testing
    from fastattn.backends import sdpa_backend

    block = sdpa_backend.ring_block()
    q, k, v = testing.random_qkv(1, 6, 6, 4, 2, 16, generator=gen)
    mask = torch.tensor([[True] * 5 + [False]])
    dout = torch.randn(q.shape, generator=gen)
    out, lse = block.forward(q, k, v, mask, causal, scale)
    dq, dk, dv = block.backward(dout, None, q, k, v, out, lse, mask, causal, scale)

    def naive(dtype):
        xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        o, l_ = reference.attention(*xs, causal=causal, scale=scale, key_padding_mask=mask, return_lse=True)
        return (o, l_, *torch.autograd.grad(o, xs, dout.to(dtype)))

    ref, low = naive(torch.float64), naive(torch.float32)
    for name, got, r, n in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), ref, low):
        c = testing.compare(name, got, n, r, testing.OUT_FACTOR if name in ("out", "lse") else testing.GRAD_FACTOR)
        assert c.ok, str(c)
