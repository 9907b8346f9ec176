"""The T5-style encoder-decoder (positions="relative"): the bucket function against hand-computed
values, the model on each backend against the same weights on "reference" (logits and every
parameter gradient, the relative-bias tables included, under docs/design.md's tolerance rule), a
short training run, one bias per stack and forward shared by all its layers, and cached generation
(the bias over the cache's positions) equal to recomputation."""

import copy
import random

import pytest
import torch
from conftest import DEVICE
from test_models import logits_and_grads, make_batch, padding_mask, run_encoder_decoder, to_device

from fastattn.demo import tasks
from fastattn.demo.train import date_loss
from fastattn.models import (
    Decoder,
    EncoderDecoder,
    ModelConfig,
    RelativePositionBias,
    pad_left,
    pad_right,
    relative_position_bucket,
    set_attn_backend,
)
from fastattn.testing import GRAD_FACTOR, OUT_FACTOR, compare


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: extra intra-op threads gain nothing and, on a CPU shared with other jobs, spin
    (seen: 0.1 s -> 7 s for a test on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def t5(**kw):
    return ModelConfig.preset("t5-tiny", **kw)


def t5_model(gen, cls=EncoderDecoder, **kw):
    """A fresh model whose bias tables are large enough (N(0, 1)) that positions change every score."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = cls(t5(**kw)).to(DEVICE)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RelativePositionBias):
                m.embed.weight.copy_(torch.randn(m.embed.weight.shape, generator=gen))
    return model


# ---------------------------------------------------------------- buckets
# (distance d = |key - query|; T5's defaults: 32 buckets, max_distance 128)
# Bidirectional: 16 buckets per direction, exact below 8, then 8 + floor(8 * log2(d / 8) / log2(128 / 8))
# = 8 + floor(2 * log2(d / 8)); keys after the query add 16.
BIDIRECTIONAL = {0: 0, 1: 1, 7: 7, 8: 8, 11: 8, 12: 9, 16: 10, 22: 10, 23: 11, 32: 12, 64: 14, 90: 14, 91: 15,
                 128: 15, 500: 15}
# Causal: 32 buckets for keys at or before the query, exact below 16, then
# 16 + floor(16 * log2(d / 16) / log2(128 / 16)) = 16 + floor(16 / 3 * log2(d / 16)); later keys: 0.
CAUSAL = {0: 0, 1: 1, 15: 15, 16: 16, 18: 16, 19: 17, 32: 21, 64: 26, 127: 31, 128: 31, 1000: 31}


def test_bucket_matches_hand_computed_values():
    d = torch.tensor(list(BIDIRECTIONAL))
    before = relative_position_bucket(-d, bidirectional=True)  # key d tokens before the query
    after = relative_position_bucket(d, bidirectional=True)
    assert before.tolist() == list(BIDIRECTIONAL.values())
    assert after.tolist() == [b + 16 if n else 0 for n, b in BIDIRECTIONAL.items()]  # distance 0 is "before"
    d = torch.tensor(list(CAUSAL))
    assert relative_position_bucket(-d, bidirectional=False).tolist() == list(CAUSAL.values())
    assert relative_position_bucket(d, bidirectional=False).tolist() == [0] * len(d)
    # t5-tiny's 8 buckets up to 16: bidirectional 4 per side, exact below 2, then 2 + floor(2 * log2(d / 2) / 3);
    # causal exact below 4, then 4 + floor(2 * log2(d / 4)).
    r = torch.arange(-20, 21)  # key - query
    small = lambda bidirectional: relative_position_bucket(r, bidirectional=bidirectional, num_buckets=8,
                                                           max_distance=16).tolist()
    assert small(True) == [3] * 15 + [2] * 4 + [1, 0, 5] + [6] * 4 + [7] * 15
    assert small(False) == [7] * 9 + [6] * 4 + [5] * 2 + [4] * 2 + [3, 2, 1, 0] + [0] * 20


def test_bad_bucket_sizes_are_refused():
    with pytest.raises(ValueError, match="num_buckets"):
        ModelConfig(positions="relative", num_buckets=3)
    with pytest.raises(ValueError, match="max_distance"):
        ModelConfig(positions="relative", num_buckets=32, max_distance=16)
    with pytest.raises(ValueError, match="positions"):
        ModelConfig(positions="rotary")


# ---------------------------------------------------------------- each backend vs "reference"
@pytest.mark.parametrize("backend, heads", [("triton", {}), ("triton", {"n_heads": 4, "n_kv_heads": 2}),
                                           ("torch", {})], ids=["triton", "triton-gqa", "torch"])
def test_t5_matches_reference(backend, heads, gen):
    """Same weights, three runs: `backend` in fp32, "reference" in float64 (the oracle) and in fp32
    (the naive error the tolerance rule scales with). Source and target are both padded."""
    base = t5_model(gen, **heads)
    batch = to_device(make_batch("encoder-decoder", gen, base.config.vocab_size))
    models = {
        "test": set_attn_backend(copy.deepcopy(base), backend),
        "ref64": set_attn_backend(copy.deepcopy(base).double(), "reference"),
        "naive": set_attn_backend(copy.deepcopy(base), "reference"),
    }
    cotangent = torch.randn(run_encoder_decoder(base, batch).shape, generator=gen).to(DEVICE)
    res = {name: logits_and_grads(m, run_encoder_decoder, batch, cotangent) for name, m in models.items()}
    results = [compare("logits", res["test"][0], res["naive"][0], res["ref64"][0], OUT_FACTOR)]
    for name, ref in res["ref64"][1].items():
        results.append(compare(f"d {name}", res["test"][1][name], res["naive"][1][name], ref, GRAD_FACTOR))
    assert {"encoder.relative_bias.embed.weight", "decoder.relative_bias.embed.weight"} <= set(res["ref64"][1])
    assert all(c.ok for c in results), "\n".join(map(str, results))


def test_padding_does_not_change_real_tokens(gen):
    """A right-padded source and target give each real token what the sequence alone gives:
    column distances between real tokens are unchanged by padding at the end."""
    model = set_attn_backend(t5_model(gen).double().eval(), "reference")
    batch = to_device(make_batch("encoder-decoder", gen, model.config.vocab_size))
    padded = run_encoder_decoder(model, batch)
    s, t = int(batch["src_mask"][1].sum()), int(batch["tgt_mask"][1].sum())
    alone = model(batch["src"][1:, :s], batch["tgt"][1:, :t])
    torch.testing.assert_close(padded[1:, :t], alone)


# ---------------------------------------------------------------- training
def test_training_lowers_the_loss():
    """Forty Adam steps on the demo's date task (words -> ISO date) with T5's relative bias and
    SDPA kernels: the loss falls far below its start (4.3 -> 2.2), and both bias tables learn."""
    torch.manual_seed(0)
    model = EncoderDecoder(t5(vocab_size=len(tasks.DATE_VOCAB), attn_backend="torch")).to(DEVICE)
    tables = {name: model.get_submodule(name).relative_bias.embed.weight.detach().clone()
              for name in ("encoder", "decoder")}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng, losses = random.Random(0), []
    for _ in range(40):
        loss = date_loss(model, tasks.date_batch(rng, 32))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses
    for name, before in tables.items():
        assert not torch.equal(model.get_submodule(name).relative_bias.embed.weight, before), name


# ---------------------------------------------------------------- one bias per stack and forward
def test_bias_is_computed_once_per_stack_and_shared(gen):
    model = t5_model(gen, attn_backend="reference", n_layers=3, n_decoder_layers=2)
    made = {"encoder": [], "decoder": []}  # each stack's bias module outputs
    given = {"encoder": [], "decoder": [], "cross": []}  # the bias each attention layer received
    for stack in ("encoder", "decoder"):
        s = model.get_submodule(stack)
        assert s.embed.positions is None  # no learned absolute positions
        s.relative_bias.register_forward_hook(lambda m, args, out, stack=stack: made[stack].append(out))
        for block in s.blocks:
            block.self_attn.register_forward_pre_hook(
                lambda m, args, kw, stack=stack: given[stack].append(kw.get("bias")), with_kwargs=True)
            if block.cross_attn is not None:
                block.cross_attn.register_forward_pre_hook(
                    lambda m, args, kw: given["cross"].append(kw.get("bias")), with_kwargs=True)
    batch = make_batch("encoder-decoder", gen, model.config.vocab_size)
    run_encoder_decoder(model, to_device(batch))
    lengths = {"encoder": batch["src"].shape[1], "decoder": batch["tgt"].shape[1]}
    for stack, n_layers in (("encoder", 3), ("decoder", 2)):
        assert len(made[stack]) == 1
        bias = made[stack][0]
        s = lengths[stack]
        assert bias.shape == (1, 2, s, s)
        assert len(given[stack]) == n_layers and all(b is bias for b in given[stack])
        table = model.get_submodule(stack).relative_bias
        bucket = relative_position_bucket(torch.tensor(3 - 7), bidirectional=table.bidirectional, num_buckets=8,
                                          max_distance=16)
        assert torch.equal(bias[0, :, 7, 3], table.embed.weight[bucket])  # query 7, key 3: distance -4
    assert model.encoder.relative_bias.bidirectional and not model.decoder.relative_bias.bidirectional
    assert given["cross"] == [None, None]  # cross-attention has no position bias


# ---------------------------------------------------------------- generation
def greedy_by_hand(model, src, src_mask, n, bos_id):
    """Greedy decoding written out: the whole target through the model at every step."""
    memory = model.encode(src, src_mask)
    tgt = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
    for _ in range(n):
        nxt = model.decode(tgt, memory, src_mask)[:, -1].argmax(-1)
        tgt = torch.cat([tgt, nxt[:, None]], dim=1)
    return tgt[:, 1:]


@pytest.mark.parametrize("backend,page_size", [("reference", None), ("reference", 4), ("triton", 4)])
def test_cached_generation_equals_recomputation(backend, page_size, gen):
    """Cached steps get the relative bias over the cache's positions (attention_with_kvcache's
    bias): the tokens equal recomputing the whole target every step, contiguous or paged."""
    model = t5_model(gen, attn_backend=backend).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)  # context-dependent predictions (see test_models.sharpened)
    src = torch.randint(3, 32, (3, 11), generator=gen).to(DEVICE)
    src_mask = padding_mask([11, 4, 7], 11).to(DEVICE)
    out = model.generate(src, src_mask, 5, bos_id=1, page_size=page_size)
    assert out.shape == (3, 5)
    with torch.no_grad():
        assert torch.equal(out, greedy_by_hand(model, src, src_mask, 5, bos_id=1))
    assert torch.equal(model.generate(src, src_mask, 5, bos_id=1, use_cache=False), out)


def test_relative_decoder_generates_alike_from_left_or_right_padding(gen):
    """A decoder with relative bias counts distances in columns: generation moves each prompt's
    padding to the front, so right-padded prompts, left-padded ones and each prompt alone agree."""
    model = t5_model(gen, Decoder, attn_backend="reference").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    prompts = [torch.randint(1, 32, (n,), generator=gen).tolist() for n in (5, 1, 9)]
    left = model.generate(*pad_left(prompts, device=DEVICE), 6)
    assert torch.equal(model.generate(*pad_right(prompts, device=DEVICE), 6), left)
    assert torch.equal(model.generate(*pad_right(prompts, device=DEVICE), 6, use_cache=False), left)
    for i, p in enumerate(prompts):
        assert torch.equal(model.generate(torch.tensor([p], device=DEVICE), None, 6)[0], left[i])
