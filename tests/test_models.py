"""The reference models: each backend matches the same model on "reference" (logits and every
parameter gradient, under docs/design.md's tolerance rule), cached generation gives exactly the tokens of
full recomputation, and padding never changes the result for real tokens."""

import copy

import pytest
import torch
from conftest import DEVICE

import fastattn
from fastattn.models import (
    Decoder,
    Encoder,
    EncoderDecoder,
    KVCache,
    ModelConfig,
    pad_left,
    pad_right,
    set_attn_backend,
)
from fastattn.testing import GRAD_FACTOR, OUT_FACTOR, compare

KERNEL_BACKENDS = [name for name in ("triton", "cuda") if name in fastattn.available_backends()]


def tiny(**kw):
    return ModelConfig.preset("tiny", **kw)


def run_encoder(model, batch):
    return model.mlm_logits(model(batch["tokens"], batch["mask"]))


def run_decoder(model, batch):
    return model(batch["tokens"], batch["mask"])


def run_encoder_decoder(model, batch):
    return model(batch["src"], batch["tgt"], batch["src_mask"], batch["tgt_mask"])


def padding_mask(lengths, seqlen, left=False):
    """(B, S) bool masks of the given real lengths, padded on the right (or left)."""
    pos = torch.arange(seqlen)[None]
    lengths = torch.tensor(lengths)[:, None]
    return pos >= seqlen - lengths if left else pos < lengths


def make_batch(kind, gen, vocab):
    tok = lambda b, s: torch.randint(1, vocab, (b, s), generator=gen)
    if kind == "encoder":  # right padding, one sequence without any
        return {"tokens": tok(3, 19), "mask": padding_mask([19, 11, 1], 19)}
    if kind == "decoder":  # left padding (batched prompts)
        return {"tokens": tok(3, 17), "mask": padding_mask([17, 9, 4], 17, left=True)}
    if kind == "decoder-right":  # right padding (training batches)
        return {"tokens": tok(3, 17), "mask": padding_mask([17, 9, 4], 17)}
    return {"src": tok(2, 21), "src_mask": padding_mask([21, 8], 21),  # Sq != Sk in cross-attention
            "tgt": tok(2, 13), "tgt_mask": padding_mask([13, 6], 13)}


MODELS = {"encoder": (Encoder, run_encoder), "decoder": (Decoder, run_decoder),
          "encoder-decoder": (EncoderDecoder, run_encoder_decoder)}


def to_device(batch):
    return {k: v.to(DEVICE) for k, v in batch.items()}


def logits_and_grads(model, run, batch, cotangent):
    model.zero_grad()
    logits = run(model, batch)
    logits.backward(cotangent.to(logits.dtype))
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def check_model_matches_reference(kind, backend, dtype, gen, **config):
    """Same weights, three runs: `backend` in dtype, "reference" in float64 (the oracle) and
    "reference" in dtype (the naive low-precision error the tolerance rule scales with)."""
    cls, run = MODELS[kind]
    cfg = tiny(**config)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    base = cls(cfg).to(DEVICE)
    batch = to_device(make_batch(kind, gen, cfg.vocab_size))
    models = {
        "test": set_attn_backend(copy.deepcopy(base).to(dtype), backend),
        "ref64": set_attn_backend(copy.deepcopy(base).double(), "reference"),
        "naive": set_attn_backend(copy.deepcopy(base).to(dtype), "reference"),
    }
    out_shape = run(base, batch).shape
    cotangent = torch.randn(out_shape, generator=gen).to(DEVICE)
    res = {name: logits_and_grads(m, run, batch, cotangent) for name, m in models.items()}
    failures = []
    c = compare("logits", res["test"][0], res["naive"][0], res["ref64"][0], OUT_FACTOR)
    failures += [] if c.ok else [str(c)]
    for name in res["ref64"][1]:
        c = compare(f"d {name}", res["test"][1][name], res["naive"][1][name], res["ref64"][1][name], GRAD_FACTOR)
        failures += [] if c.ok else [str(c)]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_model_matches_reference(kind, backend, gen):
    check_model_matches_reference(kind, backend, torch.float32, gen)


@pytest.mark.parametrize("kind", ["decoder", "encoder-decoder"])
def test_model_matches_reference_gqa(kind, gen):
    check_model_matches_reference(kind, "triton", torch.float32, gen, n_heads=4, n_kv_heads=2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", list(MODELS))
def test_model_matches_reference_gpu(kind, dtype, backend, gen):
    status = fastattn.available_backends()[backend]
    if not status.available:
        pytest.skip(f"{backend}: {status.reason}")  # the backend's own tests report a failed build
    check_model_matches_reference(kind, backend, dtype, gen, n_heads=2, d_model=128)  # head dim 64


# ---------------------------------------------------------------- generation
def sharpened(model):
    """Freshly initialised tiny models mostly repeat their input token, whatever attention does;
    larger weights make every prediction depend on the context (as after training)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    return model.eval()


def decoder_and_prompts(gen, backend, **config):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = sharpened(Decoder(tiny(attn_backend=backend, **config)).to(DEVICE))
    prompts = [torch.randint(1, 32, (n,), generator=gen).tolist() for n in (5, 1, 9)]
    return model, *pad_left(prompts, device=DEVICE)


@pytest.mark.parametrize("page_size", [None, 4], ids=["contiguous", "paged"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_decoder_cached_generation_equals_recomputation(backend, page_size, gen):
    model, tokens, mask = decoder_and_prompts(gen, backend)
    cached = model.generate(tokens, mask, 7, page_size=page_size)
    full = model.generate(tokens, mask, 7, use_cache=False)
    assert cached.shape == (3, 7)
    assert torch.equal(cached, full)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "paged"])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_cuda_graph_generation_equals_eager(backend, page_size, gen):
    """A decode step captured once and replayed per token generates the eager tokens (decoder and
    encoder-decoder), and a graph run twice is as good as new."""
    model, tokens, mask = decoder_and_prompts(gen, backend)
    eager = model.generate(tokens, mask, 9, page_size=page_size)
    for _ in range(2):
        assert torch.equal(model.generate(tokens, mask, 9, page_size=page_size, cuda_graph=True), eager)
    for n in (2, 3):  # a cache with room for one or two steps past the prompt
        assert torch.equal(model.generate(tokens, mask, n, page_size=page_size, cuda_graph=True), eager[:, :n])
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    seq2seq = sharpened(EncoderDecoder(tiny(attn_backend=backend, n_heads=4, n_kv_heads=2)).to(DEVICE))
    src = torch.randint(3, 32, (3, 11), generator=gen).to(DEVICE)
    src_mask = padding_mask([11, 4, 7], 11).to(DEVICE)
    assert torch.equal(seq2seq.generate(src, src_mask, 6, bos_id=1, page_size=page_size, cuda_graph=True),
                       seq2seq.generate(src, src_mask, 6, bos_id=1, page_size=page_size))


@pytest.mark.parametrize("new_tokens", [2, 3])
def test_graph_capture_fits_a_cache_sized_for_the_tokens(new_tokens, gen, monkeypatch):
    """graphed_step's warm-ups and capture each write at the real next position: a cache sized for
    2 or 3 new tokens has room (they advanced it by 3 before its length was put back). CUDA's
    stream and graph objects are stand-ins here: this is the host-side bookkeeping."""
    import contextlib

    from fastattn.models import generation

    class Stream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())
    model, tokens, mask = decoder_and_prompts(gen, "reference")
    cache = model.new_cache(tokens.shape[0], tokens.shape[1] + new_tokens - 1)
    with torch.no_grad():
        first = model(tokens, mask, cache=cache)[torch.arange(tokens.shape[0]), generation.last_real(mask)]
        lengths, count = cache.seqlens.clone(), cache.length
        generation.graphed_step(lambda t: model(t, None, cache=cache)[:, -1], cache, first.argmax(-1)[:, None])
    # (The stand-in capture ran the step, which a real one only records: seqlens moved by that one.)
    assert cache.length == count and torch.equal(cache.seqlens, lengths + 1)


def test_paged_cache_leaves_the_global_rng_alone():
    """The page shuffle draws from a generator of its own: sampling without a generator (the global
    RNG) draws the same with page_size as without."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    KVCache(1, 2, 8, 1, 4, device="cpu", page_size=2)
    assert torch.equal(torch.rand(3), expected)


def test_decoder_sampling_cached_equals_recomputation(gen):
    model, tokens, mask = decoder_and_prompts(gen, "reference", n_heads=4, n_kv_heads=1)  # MQA cache
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    kw = dict(temperature=1.5, top_k=5)
    cached = model.generate(tokens, mask, 12, generator=torch.Generator().manual_seed(seed), **kw)
    full = model.generate(tokens, mask, 12, use_cache=False, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(cached, full)


def test_decoder_batched_prompts_match_single(gen):
    """Left padding changes nothing: each prompt alone generates what it generates in the batch."""
    model, tokens, mask = decoder_and_prompts(gen, "reference")
    batched = model.generate(tokens, mask, 6)
    for i in range(tokens.shape[0]):
        alone = tokens[i][mask[i]][None]
        assert torch.equal(model.generate(alone, None, 6)[0], batched[i])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_encoder_decoder_cached_generation_equals_recomputation(backend, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = sharpened(EncoderDecoder(tiny(attn_backend=backend, n_heads=4, n_kv_heads=2)).to(DEVICE))
    src = torch.randint(3, 32, (3, 11), generator=gen).to(DEVICE)
    src_mask = padding_mask([11, 4, 7], 11).to(DEVICE)
    cached = model.generate(src, src_mask, 6, bos_id=1)
    full = model.generate(src, src_mask, 6, bos_id=1, use_cache=False)
    assert torch.equal(cached, full)
    assert torch.equal(model.generate(src, src_mask, 6, bos_id=1, page_size=2), full)
    if backend != "reference":
        return  # below: padding invariance of generation (the interpreter is slow; kernels are checked above)
    for i in range(3):  # each source alone (no padding) translates to the same tokens
        alone = model.generate(src[i:i + 1, : int(src_mask[i].sum())], None, 6, bos_id=1)
        assert torch.equal(alone[0], cached[i])


def test_generation_stops_at_eos_and_pads(gen):
    """One row finishes early: pad_id after its eos, the others unchanged, cached == uncached."""
    model, tokens, mask = decoder_and_prompts(gen, "reference")
    free = model.generate(tokens, mask, 8)
    eos = int(free[0, 2])  # row 0 emits this token at step 2 (or earlier)
    first = int((free[0] == eos).nonzero()[0])
    out = model.generate(tokens, mask, 8, eos_id=eos, pad_id=0)
    assert out.shape[1] == 8 or (out == eos).any(dim=1).all()  # stops early only when every row is done
    assert out[0, first] == eos and (out[0, first + 1:] == 0).all()
    for i in range(out.shape[0]):
        hit = (free[i] == eos).nonzero()
        n = int(hit[0]) + 1 if len(hit) else out.shape[1]
        assert torch.equal(out[i, :n], free[i, :n])  # identical up to (and including) its eos
    assert torch.equal(out, model.generate(tokens, mask, 8, eos_id=eos, pad_id=0, use_cache=False))


def test_bad_cache_and_ids_are_refused_by_name(gen):
    """A cache for another batch size broadcast one prompt over its rows (learned positions); pad_id
    out of the vocabulary failed mid-generation naming tokens; MultiHeadAttention(32, 0) divided by zero."""
    from fastattn.models import MultiHeadAttention

    model, tokens, mask = decoder_and_prompts(gen, "reference")
    with torch.no_grad():
        for batch in (tokens.shape[0] - 1, tokens.shape[0] + 1):
            with pytest.raises(ValueError, match=f"cache holds {batch} sequences but tokens has {tokens.shape[0]}"):
                model(tokens, cache=model.new_cache(batch=batch, max_len=32))
    for bad in (-1, 32):
        with pytest.raises(ValueError, match="pad_id must be a token id in \\[0, vocab_size=32\\)"):
            tiny(pad_id=bad)
        with pytest.raises(ValueError, match="pad_id must be a token id"):
            model.generate(tokens, mask, 3, eos_id=2, pad_id=bad)
    with pytest.raises(ValueError, match="eos_id must be a token id"):
        model.generate(tokens, mask, 3, eos_id=99)
    for args, name in (((32, 0), "n_heads"), ((32, 4, 0), "n_kv_heads"), ((32, -4), "n_heads"), ((0, 4), "d_model")):
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
            MultiHeadAttention(*args)


def test_a_prefill_that_raised_leaves_no_padding_behind(gen):
    """A padded prefill that raised after the cache recorded its mask left it there: the next, unpadded
    prefill of the same empty cache took its lengths and key order from the old mask (logits off by 0.23)."""
    model, _, _ = decoder_and_prompts(gen, "reference")
    prompt = torch.randint(1, 32, (1, 4), generator=gen).to(DEVICE)
    with torch.no_grad():
        cache = model.new_cache(batch=1, max_len=8)
        set_attn_backend(model, "misspelt")
        with pytest.raises(ValueError, match="backend"):
            model(prompt, torch.tensor([[False, False, True, True]], device=DEVICE), cache=cache)
        set_attn_backend(model, "reference")
        model(prompt, cache=cache)
        assert cache.seqlens.tolist() == [4]
        fresh = model.new_cache(batch=1, max_len=8)
        model(prompt, cache=fresh)
        step = torch.tensor([[11]], device=DEVICE)
        torch.testing.assert_close(model(step, cache=cache), model(step, cache=fresh), rtol=0, atol=0)
    # An encoder-decoder: the layers the failed first call reached kept the old memory's cross keys/values.
    torch.manual_seed(0)
    model = sharpened(EncoderDecoder(tiny(attn_backend="reference", n_layers=2)).to(DEVICE))
    src_a, src_b = (torch.randint(1, 32, (1, 5), generator=gen).to(DEVICE) for _ in range(2))
    with torch.no_grad():
        new_cache = lambda: KVCache.for_config(model.config, model.config.decoder_layers, 1, 8, DEVICE)  # noqa: E731
        cache = new_cache()
        memory_a = model.encode(src_a)
        model.decoder.blocks[1].cross_attn.attn_backend = "misspelt"  # layer 0 stores its cross K/V, layer 1 raises
        with pytest.raises(ValueError, match="backend"):
            model.decode(prompt[:, :1], memory_a, cache=cache)
        set_attn_backend(model, "reference")
        memory_b = model.encode(src_b)
        got = model.decode(prompt[:, :1], memory_b, cache=cache)
        want = model.decode(prompt[:, :1], memory_b, cache=new_cache())
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_late_stop_returns_the_same_tokens(gen, monkeypatch):
    """On CUDA the loop learns that every row is done a step or more late (no host wait per token):
    the extra steps are cut, so the tokens are those of an immediate stop."""
    from fastattn.models import generation

    model, tokens, mask = decoder_and_prompts(gen, "reference")
    tokens, mask = tokens[:1], mask[:1]
    eos = int(model.generate(tokens, mask, 8)[0, 1])
    want = model.generate(tokens, mask, 8, eos_id=eos)
    assert want.shape[1] <= 2  # stopped early
    monkeypatch.setattr(generation.AllDone, "__call__", lambda self, done: False)  # never told in time
    assert torch.equal(model.generate(tokens, mask, 8, eos_id=eos), want)


def test_right_padded_prompts_generate_like_left_padded(gen):
    model, tokens, mask = decoder_and_prompts(gen, "reference")
    prompts = [t[m].tolist() for t, m in zip(tokens, mask)]
    right, right_mask = pad_right(prompts, device=DEVICE)
    assert torch.equal(model.generate(right, right_mask, 6), model.generate(tokens, mask, 6))


def cached_step_logits(step, tokens, mask, n_prompt):
    """Logits for every position, computed the cached way: the prompt at once, then one token per
    step. step(tokens, mask, cache_or_None) -> logits."""
    out = [step(tokens[:, :n_prompt], mask[:, :n_prompt], True)]
    for t in range(n_prompt, tokens.shape[1]):
        out.append(step(tokens[:, t:t + 1], None, True))
    return torch.cat(out, dim=1)


def check_cache_matches_full(kind, backend, dtype, gen, page_size=None):
    """Decoding with the KV cache computes the same logits as running the model on the whole
    sequence, under the tolerance rule (float64 full run on "reference" = the oracle)."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    cls = Decoder if kind == "decoder" else EncoderDecoder
    base = sharpened(cls(tiny(n_heads=4, n_kv_heads=2, d_model=64 if dtype == torch.float32 else 256)).to(DEVICE))
    b, s, n_prompt = 3, 12, 5
    tokens = torch.randint(1, 32, (b, s), generator=gen).to(DEVICE)
    mask = padding_mask([5, 3, 1], n_prompt, left=True)
    mask = torch.cat([mask, torch.ones(b, s - n_prompt, dtype=torch.bool)], dim=1).to(DEVICE)
    src = torch.randint(1, 32, (b, 9), generator=gen).to(DEVICE)
    src_mask = padding_mask([9, 4, 6], 9).to(DEVICE)

    def run(model, cached):
        if kind == "decoder":
            cache = model.new_cache(b, s, page_size=page_size) if cached else None
            fwd = lambda t, m, c: model(t, m, cache=cache if c else None)
        else:
            memory = model.encode(src, src_mask)
            cache = KVCache.for_config(model.config, model.config.decoder_layers, b, s, DEVICE,
                                       page_size=page_size) if cached else None
            fwd = lambda t, m, c: model.decode(t, memory, src_mask, m, cache=cache if c else None)
        with torch.no_grad():
            return cached_step_logits(fwd, tokens, mask, n_prompt) if cached else fwd(tokens, mask, False)

    out = run(set_attn_backend(copy.deepcopy(base).to(dtype), backend), cached=True)
    ref64 = run(set_attn_backend(copy.deepcopy(base).double(), "reference"), cached=False)
    naive = run(set_attn_backend(copy.deepcopy(base).to(dtype), "reference"), cached=False)
    real = mask  # padding positions' logits are meaningless
    c = compare("cached logits", out[real], naive[real], ref64[real], OUT_FACTOR)
    assert c.ok, str(c)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("kind", ["decoder", "encoder-decoder"])
def test_cache_matches_full_recomputation(kind, backend, gen):
    check_cache_matches_full(kind, backend, torch.float32, gen)


@pytest.mark.parametrize("kind", ["decoder", "encoder-decoder"])
def test_paged_cache_matches_full_recomputation(kind, gen):
    check_cache_matches_full(kind, "triton", torch.float32, gen, page_size=3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["decoder", "encoder-decoder"])
def test_cache_matches_full_recomputation_gpu(kind, dtype, backend, gen):
    status = fastattn.available_backends()[backend]
    if not status.available:
        pytest.skip(f"{backend}: {status.reason}")
    check_cache_matches_full(kind, backend, dtype, gen)  # head dim 64: 1 query over the cache
    check_cache_matches_full(kind, backend, dtype, gen, page_size=16)


# ---------------------------------------------------------------- padding invariance
@pytest.mark.parametrize("kind", list(MODELS) + ["decoder-right"])
def test_padding_does_not_change_real_tokens(kind, gen):
    """A sequence alone (float64 reference = the oracle) vs the same sequence padded in a batch
    (Triton kernels, fp32): equal on every real token under the tolerance rule."""
    cls, run = MODELS[kind.removesuffix("-right")]
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    base = cls(tiny()).to(DEVICE).eval()
    batch = to_device(make_batch(kind, gen, 32))
    padded = run(set_attn_backend(base, "triton"), batch)
    i = 1  # the padded element
    if kind == "encoder-decoder":
        s, t = int(batch["src_mask"][i].sum()), int(batch["tgt_mask"][i].sum())
        alone = {"src": batch["src"][i:i + 1, :s], "src_mask": None, "tgt": batch["tgt"][i:i + 1, :t], "tgt_mask": None}
        real = slice(0, t)
    else:
        m = batch["mask"][i]
        alone = {"tokens": batch["tokens"][i:i + 1][:, m], "mask": None}
        real = m.nonzero()[:, 0]
    ref64 = run(set_attn_backend(copy.deepcopy(base).double(), "reference"), alone)[0]
    naive = run(set_attn_backend(copy.deepcopy(base), "reference"), alone)[0]
    c = compare("logits of real tokens", padded[i, real], naive, ref64, OUT_FACTOR)
    assert c.ok, str(c)


# ---------------------------------------------------------------- pieces and errors
def test_cross_attention_map_rows_are_distributions(gen):
    model = EncoderDecoder(tiny(attn_backend="reference")).eval()
    src = torch.randint(3, 32, (2, 9), generator=gen)
    src_mask = padding_mask([9, 5], 9)
    tgt = torch.randint(3, 32, (2, 4), generator=gen)
    p = model.cross_attention_map(src, tgt, src_mask)
    assert p.shape == (2, 4, 9)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4))
    assert (p[1, :, 5:] == 0).all()  # padding gets no attention


def test_kv_cache_is_sized_by_kv_heads():
    model = Decoder(tiny(n_heads=4, n_kv_heads=1))
    cache = model.new_cache(batch=2, max_len=10)
    with pytest.raises(ValueError, match="torch.no_grad"):
        model(torch.ones(2, 6, dtype=torch.long), cache=cache)
    with torch.no_grad():
        model(torch.ones(2, 6, dtype=torch.long), cache=cache)
        assert isinstance(cache, KVCache) and cache.keys.shape == (2, 2, 10, 1, 8)  # (layers, B, max_len, Hkv, D)
        assert cache.length == 6 and cache.seqlens.tolist() == [6, 6]
        with pytest.raises(ValueError, match="KV cache holds 10 tokens"):
            model(torch.ones(2, 5, dtype=torch.long), cache=cache)
    paged = model.new_cache(batch=2, max_len=10, page_size=4)
    assert paged.block_table.shape == (2, 3) and sorted(paged.block_table.flatten().tolist()) == list(range(6))


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="d_model"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("huge")
    model = Decoder(tiny(attn_backend="reference"))
    with pytest.raises(ValueError, match="backend must be one of"):  # at the first forward, by the api
        Decoder(tiny(attn_backend="sdpa"))(torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len"):
        model.generate(torch.ones(1, 60, dtype=torch.long), None, 10)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.ones(1, 3, dtype=torch.long), None, 2, temperature=-1.0)
    ed = EncoderDecoder(tiny(attn_backend="reference"))
    with pytest.raises(ValueError, match="src_mask"):
        ed(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), torch.ones(2, 6))
