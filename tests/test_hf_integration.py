"""fastattn.integrations.transformers: tiny random Hugging Face models (built in code, no downloads)
run with attn_implementation="fastattn" (Triton kernels through the interpreter on CPU) and match
the same weights with "eager" under the tolerance rule (eager in float64 is the reference, eager in
float32 the naive run). Each test also checks that fastattn ran and how the mask reached it."""

import copy
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, SEED

import fastattn
from fastattn import reference, testing


def _import_transformers():
    # transformers imports the PyPI package `kernels`; the repository's own kernels/ (installed as
    # fastattn.kernels) shadows it when the repo root is on sys.path (python -m pytest from there).
    root = Path(fastattn.__file__).resolve().parents[1]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved
    return pytest.importorskip("transformers")


transformers = _import_transformers()
from fastattn.integrations import transformers as fhf  # noqa: E402

VOCAB = 64


def _eager64(module, query, key, value, attention_mask, **kwargs):
    """The model's own eager attention for the float64 reference, with masked logits at float32's
    lowest value: eager softmaxes in float32, where float64's lowest becomes -inf and a query that
    sees no key (left padding) turns into NaN that then spreads through the next layer's keys."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.clamp_min(torch.finfo(torch.float32).min)
    return eager(module, query, key, value, attention_mask, **kwargs)


transformers.AttentionInterface.register("eager64", _eager64)
transformers.masking_utils.AttentionMaskInterface.register("eager64", transformers.masking_utils.eager_mask)


@pytest.fixture(autouse=True)
def on_device():
    """Models and inputs are made on DEVICE: the Triton kernels on a GPU, the interpreter on a CPU."""
    with torch.device(DEVICE):
        yield


@pytest.fixture(autouse=True)
def registered():
    fhf.register(backend="triton")  # the kernels themselves, not "auto"'s SDPA on CPU
    fhf.reset_counts()
    yield
    fhf.register()  # back to "auto"


def build(model_cls, config, *, seed=0, init=None):
    """(fastattn float32, eager float32, eager float64) copies of one random model; `init(model)`
    changes the weights first (e.g. parameters a model initialises to zeros)."""
    torch.manual_seed(SEED + seed)  # fresh weights (and the inputs drawn after) per run; FASTATTN_TEST_SEED replays
    made = {}
    for impl in ("eager", "fastattn"):
        made[impl] = model_cls._from_config(copy.deepcopy(config), attn_implementation=impl).eval()
    if init is not None:
        with torch.no_grad():
            init(made["eager"])
    ref = model_cls._from_config(copy.deepcopy(config), attn_implementation="eager64").eval()
    for model in (made["fastattn"], ref):
        model.load_state_dict(made["eager"].state_dict())
    return made["fastattn"], made["eager"], ref.double()


def check(name, fast, naive, ref, keep=None):
    """The tolerance rule on outputs (rows `keep` only: padded queries are not compared, fastattn
    gives a query that sees no key 0 where eager averages the masked scores)."""
    if keep is not None:
        fast, naive, ref = fast[keep], naive[keep], ref[keep]
    result = testing.compare(name, fast, naive, ref, factor=2.0)
    assert result.ok, str(result)


def logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


def assert_ran(masks):
    """fastattn ran every attention call, each with the expected mask path(s)."""
    assert fhf.CALLS["fastattn"] > 0, fhf.CALLS
    fallbacks = [k for k in fhf.CALLS if k.startswith("fallback")]
    assert not fallbacks, f"unexpected fallback: {fhf.CALLS}"
    seen = {k.removeprefix("mask: ") for k in fhf.CALLS if k.startswith("mask: ")}
    assert seen == set(masks), fhf.CALLS


def padding_mask(batch, seq, pads, left):
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b, n in enumerate(pads):
        if n:
            mask[b, :n] = 0 if left else mask[b, :n]
            if not left:
                mask[b, seq - n:] = 0
    return mask


def run_all(models, **inputs):
    fast, naive, ref = models
    out_fast = logits(fast, **inputs)
    counts = dict(fhf.CALLS)
    out_naive, out_ref = logits(naive, **inputs), logits(ref, **inputs)
    assert dict(fhf.CALLS) == counts  # the eager copies never reach fastattn
    return out_fast, out_naive, out_ref


def test_gpt2_causal_with_right_padding():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    mask = padding_mask(2, 12, [0, 3], left=False)
    ids = torch.randint(0, VOCAB, (2, 12))
    outs = run_all(build(transformers.GPT2LMHeadModel, config), input_ids=ids, attention_mask=mask)
    check("gpt2 logits", *outs, keep=mask.bool())
    assert_ran({"key padding"})
    assert fhf.CALLS["fastattn"] == 2


def test_bert_padded_batch_is_key_padding():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    mask = padding_mask(3, 11, [0, 4, 10], left=False)
    ids = torch.randint(0, VOCAB, (3, 11))
    outs = run_all(build(transformers.BertForMaskedLM, config), input_ids=ids, attention_mask=mask)
    check("bert logits", *outs, keep=mask.bool())
    assert_ran({"key padding"})


def llama_config(**extra):
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)


def test_llama_gqa_left_padding():
    mask = padding_mask(2, 13, [0, 5], left=True)
    ids = torch.randint(0, VOCAB, (2, 13))
    outs = run_all(build(transformers.LlamaForCausalLM, llama_config()), input_ids=ids, attention_mask=mask)
    check("llama logits", *outs, keep=mask.bool())
    assert_ran({"key padding"})


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_llama_compiles_fullgraph_with_a_padded_batch():
    """torch.compile(fullgraph=True) of a padded Llama: the key-padding test reads the mask's values
    (a graph break in every layer), so under compile the mask runs as a bias; the logits match
    eager's on the real tokens."""
    mask = padding_mask(2, 10, [0, 3], left=True)
    ids = torch.randint(0, VOCAB, (2, 10))
    fast, naive, ref = build(transformers.LlamaForCausalLM, llama_config())
    torch._dynamo.reset()
    compiled = torch.compile(lambda i, a: fast(input_ids=i, attention_mask=a).logits, backend="aot_eager",
                             fullgraph=True)
    with torch.no_grad():
        out = compiled(ids, mask)
    check("compiled llama logits", out, logits(naive, input_ids=ids, attention_mask=mask),
          logits(ref, input_ids=ids, attention_mask=mask), keep=mask.bool())
    assert_ran({"bias"})


@pytest.mark.parametrize("kernel", ["prefill", "decode"])
@pytest.mark.parametrize("compiled", [False, True])
def test_a_one_query_mask_is_key_padding_as_it_stands(compiled, kernel, monkeypatch):
    """One query's (B, 1, 1, Sk) boolean mask (a generate() step) reaches fastattn as its key-padding
    mask without an analysis, so also under torch.compile(fullgraph=True): here a static cache's
    step, the query at position 5 of 9 slots, in a window of 3 (keys 3-5 real, row 1 left-padded up
    to key 4). The window and causal flags are the mask's already: SDPA's answer on the 4-D mask.
    On the prefill kernel, and on the decode kernel (threshold 0; compiled: its op)."""
    from fastattn.launchers import decode as decode_launch

    routed = []
    if kernel == "decode":
        real = decode_launch.attend_full
        monkeypatch.setattr(decode_launch, "FEW_QUERIES_MIN_BYTES", 0)
        monkeypatch.setattr(decode_launch, "attend_full", lambda *a, **kw: routed.append(1) or real(*a, **kw))
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    mask = torch.zeros(2, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., 3:6] = True
    mask[1, ..., 4:6] = True
    call = lambda *xs: fhf.attention_forward(module, *xs, scaling=0.3, sliding_window=3)[0]
    if compiled:  # (the graph's ops are recorded: the op's kernel is not the spy)
        def recording(gm, example_inputs):
            routed.extend(1 for n in gm.graph.nodes if "triton_attn_few_queries" in str(n.target))
            return gm.forward

        torch._dynamo.reset()
        call = torch.compile(call, backend=recording, fullgraph=True)
    with torch.no_grad():
        out = call(q, k, v, mask)
    def sdpa(dtype):  # (B, H, 1, D) -> (B, 1, H, D)
        kv = (x.to(dtype).repeat_interleave(2, 1) for x in (k, v))
        return torch.nn.functional.scaled_dot_product_attention(q.to(dtype), *kv, mask, scale=0.3).transpose(1, 2)

    check("one-query mask", out, sdpa(torch.float32), sdpa(torch.float64))
    assert_ran({"key padding"})
    assert bool(routed) == (kernel == "decode")


def test_a_fallback_compiles_fullgraph():
    """Attention dropout in training falls back to torch's SDPA with a one-time warning, which dynamo
    cannot trace: the fallback broke torch.compile(fullgraph=True) of a training model until an eager
    call had spent the warning (transformers' own "sdpa" compiles there)."""
    fast = build(transformers.LlamaForCausalLM, llama_config(attention_dropout=0.1))[0].train()
    torch._dynamo.reset()
    compiled = torch.compile(lambda i: fast(input_ids=i).logits, backend="aot_eager", fullgraph=True)
    assert compiled(torch.randint(0, VOCAB, (2, 10))).shape == (2, 10, VOCAB)
    assert fhf.CALLS["fallback: attention dropout > 0 (training): fastattn has no dropout"] > 0


def test_llama_without_mask_uses_the_causal_flag():
    ids = torch.randint(0, VOCAB, (1, 9))
    outs = run_all(build(transformers.LlamaForCausalLM, llama_config()), input_ids=ids)
    check("llama logits, no mask", *outs)
    assert_ran({"none"})


# The mask's finfo.min times log2(e) overflows to -inf inside the kernel (as intended: the key is hidden);
# numpy warns about it in the interpreter.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_llama_custom_4d_mask_runs_as_a_bias():
    """A 4-D float mask (here block-diagonal causal: two packed sequences) is not key padding, so it
    goes in as fastattn's additive bias."""
    ids = torch.randint(0, VOCAB, (1, 12))
    seq = torch.tensor([0] * 5 + [1] * 7)
    keep = (seq[:, None] == seq[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    mask = torch.zeros(1, 1, 12, 12).masked_fill(~keep, torch.finfo(torch.float32).min)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    outs = run_all(build(transformers.LlamaForCausalLM, llama_config()), input_ids=ids, attention_mask=mask,
                   position_ids=pos)
    check("llama logits, 4-D mask", *outs)
    assert_ran({"bias"})


def mistral_config():
    return transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      sliding_window=4)


@pytest.mark.parametrize("kernel", ["prefill", "decode"])
@pytest.mark.parametrize("model", ["llama", "mistral"])
def test_generate_with_cache(model, kernel, monkeypatch):
    """Greedy generation with a KV cache and left padding: prefill, then one query per step against
    the cache (Mistral: a window of 4 over 7 + 5 tokens, so the cache outgrows it). Every call has
    few queries (7, then 1): on the prefill kernel (these K/V are below the decode route's bytes),
    and on the decode kernel (threshold 0: as a real model's cache of >= 8 MiB), key padding and all."""
    from fastattn.launchers import decode as decode_launch

    routed, reads = [], []
    analyse = fhf.semantics.key_padding_of_pattern
    monkeypatch.setattr(fhf.semantics, "key_padding_of_pattern",
                        lambda m, *a: reads.append(m.shape[-2]) or analyse(m, *a))
    real = decode_launch.attend_full
    monkeypatch.setattr(decode_launch, "attend_full", lambda *a, **kw: routed.append(a[3]) or real(*a, **kw))
    if kernel == "decode":
        monkeypatch.setattr(decode_launch, "FEW_QUERIES_MIN_BYTES", 0)
    cls, config = {"llama": (transformers.LlamaForCausalLM, llama_config()),
                   "mistral": (transformers.MistralForCausalLM, mistral_config())}[model]
    mask = padding_mask(2, 7, [0, 3], left=True)
    ids = torch.randint(0, VOCAB, (2, 7))
    fast, naive, ref = build(cls, config)
    for m in (fast, naive, ref):
        m.generation_config.eos_token_id = None  # always 5 new tokens (random weights hit eos early)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        runs = [m.generate(**kwargs) for m in (fast, naive, ref)]
    assert torch.equal(runs[0].sequences, runs[2].sequences)
    for step, step_logits in enumerate(zip(*(r.logits for r in runs))):
        check(f"{model} generate step {step}", *step_logits)
    assert_ran({"key padding"})
    assert fhf.CALLS["fastattn"] == 2 * 5  # prefill + 4 cached decode steps, 2 layers each
    assert len(routed) == (2 * 5 if kernel == "decode" else 0) and all(m is not None for m in routed)
    assert reads == [7]  # the prompt's mask, once; each step's one-query mask is taken as it stands (no sync)


def test_auto_backend():
    """register() with backend "auto" (torch SDPA on CPU tensors, the Triton kernels on CUDA)."""
    fhf.register()
    mask = padding_mask(2, 9, [0, 4], left=True)
    ids = torch.randint(0, VOCAB, (2, 9))
    outs = run_all(build(transformers.LlamaForCausalLM, llama_config()), input_ids=ids, attention_mask=mask)
    check("llama logits, auto", *outs, keep=mask.bool())
    assert_ran({"key padding"})


def test_mistral_sliding_window_smaller_than_the_sequence():
    config = mistral_config()
    mask = padding_mask(2, 14, [0, 3], left=True)
    ids = torch.randint(0, VOCAB, (2, 14))
    outs = run_all(build(transformers.MistralForCausalLM, config), input_ids=ids, attention_mask=mask)
    check("mistral logits", *outs, keep=mask.bool())
    assert_ran({"key padding"})
    # Without padding the window alone shapes the mask (it cannot be skipped: 14 > 4 keys).
    fhf.reset_counts()
    outs = run_all(build(transformers.MistralForCausalLM, config), input_ids=ids)
    check("mistral logits, no padding", *outs)
    assert_ran({"key padding"})


def test_gemma2_softcap_and_sliding_window_layers():
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       max_position_embeddings=64, sliding_window=4, attn_logit_softcapping=2.0,
                                       query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"])
    mask = padding_mask(2, 12, [0, 2], left=True)
    ids = torch.randint(0, VOCAB, (2, 12))
    outs = run_all(build(transformers.Gemma2ForCausalLM, config), input_ids=ids, attention_mask=mask)
    check("gemma2 logits", *outs, keep=mask.bool())
    assert_ran({"key padding"})


def test_bart_encoder_decoder_cross_attention():
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=32)
    src_mask = padding_mask(2, 10, [0, 4], left=False)
    src = torch.randint(4, VOCAB, (2, 10))
    tgt = torch.randint(4, VOCAB, (2, 7))
    outs = run_all(build(transformers.BartForConditionalGeneration, config), input_ids=src, attention_mask=src_mask,
                   decoder_input_ids=tgt)
    check("bart logits", *outs)
    # 2 encoder self, 2 decoder self, 2 cross; the decoder's self-attention needs no mask (square, causal).
    assert fhf.CALLS["fastattn"] == 6
    assert_ran({"key padding", "none"})


def test_gpt_oss_sinks_and_sliding_window():
    config = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                       num_experts_per_tok=2, max_position_embeddings=64, sliding_window=4,
                                       layer_types=["sliding_attention", "full_attention"])
    config._experts_implementation = "eager"  # the grouped-mm experts refuse float64

    def random_sinks(model):  # gpt-oss starts them at 0
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_()

    mask = padding_mask(2, 11, [0, 3], left=True)
    ids = torch.randint(0, VOCAB, (2, 11))
    outs = run_all(build(transformers.GptOssForCausalLM, config, init=random_sinks), input_ids=ids,
                   attention_mask=mask)
    check("gpt-oss logits", *outs, keep=mask.bool())
    assert_ran({"key padding"})


def test_t5_position_bias_runs_as_a_bias():
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16)
    mask = padding_mask(2, 9, [0, 3], left=False)
    outs = run_all(build(transformers.T5ForConditionalGeneration, config), input_ids=torch.randint(1, VOCAB, (2, 9)),
                   attention_mask=mask, decoder_input_ids=torch.randint(1, VOCAB, (2, 5)))
    check("t5 logits", *outs)
    assert fhf.CALLS["fastattn"] == 6  # encoder self, decoder self and cross, 2 layers each
    assert_ran({"bias"})


def test_dropout_in_training_falls_back_to_sdpa_with_a_warning():
    config = llama_config(attention_dropout=0.5)
    fast, naive, _ = build(transformers.LlamaForCausalLM, config)
    fast.train()
    ids = torch.randint(0, VOCAB, (1, 6))
    with pytest.warns(UserWarning, match="dropout > 0.*torch SDPA"):
        fast(input_ids=ids)
    assert fhf.CALLS["fastattn"] == 0
    assert fhf.CALLS["fallback: attention dropout > 0 (training): fastattn has no dropout"] == 2


def test_output_attentions_falls_back_to_eager_with_a_warning():
    fast, naive, _ = build(transformers.LlamaForCausalLM, llama_config())
    ids = torch.randint(0, VOCAB, (1, 6))
    with pytest.warns(UserWarning, match="output_attentions"), torch.no_grad():
        got = fast(input_ids=ids, output_attentions=True)
    with torch.no_grad():
        want = naive(input_ids=ids, output_attentions=True)
    assert fhf.CALLS["fastattn"] == 0
    assert any(k.startswith("fallback: output_attentions") for k in fhf.CALLS)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.attentions[0], want.attentions[0])


def test_t5_output_attentions_falls_back_to_eager_with_the_position_bias():
    """The eager fallback gets T5's position bias: logits and attention weights as eager's."""
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16)

    def strong_bias(model):  # relative positions that matter (T5 initialises the table small)
        for stack in (model.encoder, model.decoder):
            table = stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight
            table.copy_(torch.arange(table.numel(), dtype=table.dtype).view(table.shape) % 5 * 2.0)

    fast, naive, _ = build(transformers.T5ForConditionalGeneration, config, init=strong_bias)
    inputs = dict(input_ids=torch.randint(1, VOCAB, (2, 9)), attention_mask=padding_mask(2, 9, [0, 3], left=False),
                  decoder_input_ids=torch.randint(1, VOCAB, (2, 5)), output_attentions=True)
    with pytest.warns(UserWarning, match="output_attentions"), torch.no_grad():
        got = fast(**inputs)
    with torch.no_grad():
        want = naive(**inputs)
    torch.testing.assert_close(got.logits, want.logits)
    for a, b in zip(got.encoder_attentions + got.decoder_attentions, want.encoder_attentions + want.decoder_attentions):
        torch.testing.assert_close(a, b)


def test_a_mask_edited_in_place_is_read_again():
    """The mask analysis is cached per mask tensor within a forward; a user's 4-D mask edited in place
    between forwards (same tensor) is analysed again: here causal, then with key 2 hidden."""
    fast, naive, ref = build(transformers.LlamaForCausalLM, llama_config())
    ids = torch.randint(0, VOCAB, (1, 8))
    mask = torch.ones(8, 8, dtype=torch.bool).tril()[None, None].clone()  # fastattn reads it as key padding

    def additive():  # eager's form of the same mask
        return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)

    for what in ("causal", "key 2 hidden"):
        if what == "key 2 hidden":
            mask[..., 2] = False  # no query sees key 2 now (query 2 sees keys 0 and 1)
        got = logits(fast, input_ids=ids, attention_mask=mask)
        check(what, got, logits(naive, input_ids=ids, attention_mask=additive()),
              logits(ref, input_ids=ids, attention_mask=additive()))
    assert_ran({"key padding"})


def test_masks_under_inference_mode_are_read_once_per_forward(monkeypatch):
    """Under torch.inference_mode (generate(); transformers builds its masks there) a mask has no
    version counter: its analysis (a host sync) serves the later layers of one forward, and the next
    forward reads it again, so an inference-mode mask edited in place between forwards is seen."""
    reads = []
    analyse = fhf.semantics.key_padding_of_pattern
    monkeypatch.setattr(fhf.semantics, "key_padding_of_pattern", lambda *a: reads.append(1) or analyse(*a))
    fast, naive, ref = build(transformers.LlamaForCausalLM, llama_config())  # two layers
    ids = torch.randint(0, VOCAB, (2, 9))
    pad = padding_mask(2, 9, [0, 3], left=True)
    with torch.inference_mode():
        got = fast(input_ids=ids, attention_mask=pad).logits
        mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, None].clone()  # an inference tensor
        fast(input_ids=ids, attention_mask=mask)
        mask[..., 2] = False  # edited in place: no version counter records it
        edited = fast(input_ids=ids, attention_mask=mask).logits
    assert len(reads) == 3  # once per forward, not per layer
    keep = pad.bool()
    check("inference mode, left padding", got, logits(naive, input_ids=ids, attention_mask=pad),
          logits(ref, input_ids=ids, attention_mask=pad), keep=keep)
    additive = torch.zeros(mask.shape).masked_fill(~mask.clone(), torch.finfo(torch.float32).min)
    check("inference mode, edited mask", edited, logits(naive, input_ids=ids, attention_mask=additive),
          logits(ref, input_ids=ids, attention_mask=additive))


def test_each_registered_name_keeps_its_backend(monkeypatch):
    """register() under two names with two backends: each name's calls run on its own backend (a later
    register() does not change an earlier name's); a direct attention_forward call takes the last's."""
    seen = []
    monkeypatch.setattr(fhf.fastattn, "attention", lambda *a, **k: seen.append(k["backend"]) or a[0])
    fhf.register("fastattn_ref", backend="reference")
    fhf.register("fastattn_torch", backend="torch")
    q = torch.zeros(1, 2, 3, 8)
    module = torch.nn.Module()
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # what models call

    for name in ("fastattn_ref", "fastattn_torch"):
        ALL_ATTENTION_FUNCTIONS[name](module, q, q, q, None)
    fhf.attention_forward(module, q, q, q, None)
    assert seen == ["reference", "torch", "torch"]


def test_register_rejects_bad_names_and_backends():
    with pytest.raises(ValueError, match="name"):
        fhf.register("sdpa")
    with pytest.raises(ValueError, match="backend"):
        fhf.register(backend="nope")


def test_import_without_transformers_says_how_to_install():
    code = ("import sys; sys.modules['transformers'] = None; import fastattn\n"
            "try:\n    import fastattn.integrations.transformers\n"
            "except ImportError as e:\n    print(e)")
    root = Path(fastattn.__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True).stdout
    assert "pip install fastattn[hf]" in out


@pytest.mark.parametrize("causal", [True, False])
def test_masks_from_transformers_mask_functions(causal):
    """attention_forward on the boolean masks transformers builds (sdpa_mask) for a sliding window
    with padding, causal (w keys including the query's own) and bidirectional (|q - kv| <= w): the
    key-padding path with fastattn's window, checked against the float64 reference with that mask."""
    mu = transformers.masking_utils
    w, b, sq, sk = 3, 2, 9, 9
    pad = torch.ones(b, sk, dtype=torch.bool)
    pad[1, 6:] = False
    function = (mu.sliding_window_causal_mask_function if causal else mu.sliding_window_bidirectional_mask_function)(w)
    mask = mu.sdpa_mask(batch_size=b, q_length=sq, kv_length=sk, mask_function=function, attention_mask=pad,
                        allow_is_causal_skip=False).to(DEVICE)  # made on sdpa_mask's device= (default "cpu")
    module = torch.nn.Module()
    module.is_causal = causal
    q, k, v = testing.random_qkv(b, sq, sk, 4, 2, 16, device=DEVICE)
    heads = lambda x: x.transpose(1, 2)  # transformers' (B, H, S, D)
    out, weights = fhf.attention_forward(module, heads(q), heads(k), heads(v), mask, scaling=0.4, sliding_window=w)
    assert weights is None and out.shape == q.shape
    bias = lambda dtype: torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    ref = lambda dtype: reference.attention(q.to(dtype), k.to(dtype), v.to(dtype), scale=0.4, bias=bias(dtype))
    keep = mask.any(-1)[:, 0]  # queries that see a key (the rest: 0 from fastattn)
    check("attention_forward", out, ref(torch.float32), ref(torch.float64), keep=keep)
    assert_ran({"key padding"})


def test_llama_training_gradients():
    """Training without attention dropout stays on fastattn; the loss's gradients match eager's
    (3x, the rule for gradients)."""
    mask = padding_mask(2, 10, [0, 3], left=True)
    ids = torch.randint(0, VOCAB, (2, 10))
    models = build(transformers.LlamaForCausalLM, llama_config())
    weights = torch.randn(int(mask.sum()), VOCAB)  # a loss of the real positions' logits only (padding differs)
    grads = []
    for model in models:
        model.train()
        logits = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        (logits * weights.to(logits.dtype)).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.1.self_attn.v_proj.weight", "model.embed_tokens.weight"):
        result = testing.compare(name, *(g[name] for g in grads), factor=3.0)
        assert result.ok, str(result)
    assert_ran({"key padding"})


@pytest.fixture
def fastattn_as_transformers_flash(monkeypatch):
    """transformers' own flash-attention path (integrations/flash_attention.py) on fastattn's
    FlashAttention-compatible functions: what it does with a FlashAttention package, which it looks
    for by name (here "fastattn_fa", registered like "flash_attention_2"; a name with "flash" in it is remapped
    for gpt-oss by transformers)."""
    import functools

    mfau = transformers.modeling_flash_attention_utils
    funcs = tuple(functools.partial(f, backend="triton") for f in
                  (fastattn.flash_attn_func, fastattn.flash_attn_varlen_func, fastattn.flash_attn_with_kvcache))
    monkeypatch.setattr(mfau, "_lazy_imports", lambda *a, **kw: (*funcs, mfau._pad_input, mfau._unpad_input))
    monkeypatch.setattr(mfau, "_loaded_implementation", None)
    hf_flash = transformers.integrations.flash_attention.flash_attention_forward
    transformers.AttentionInterface.register("fastattn_fa", hf_flash)
    mu = transformers.masking_utils
    mu.AttentionMaskInterface.register("fastattn_fa", mu.flash_attention_mask)
    return "fastattn_fa"


def test_gpt_oss_sinks_reach_fastattn_through_transformers_flash_path(fastattn_as_transformers_flash):
    """transformers passes gpt-oss's sinks to a flash function as s_aux or learnable_sink, whichever
    its signature has; fastattn's flash_attn_* take both (without, transformers drops the sinks)."""
    config = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                       num_experts_per_tok=2, max_position_embeddings=64, sliding_window=4,
                                       layer_types=["sliding_attention", "full_attention"])
    config._experts_implementation = "eager"
    torch.manual_seed(SEED)
    eager = transformers.GptOssForCausalLM._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in eager.model.layers:
            layer.self_attn.sinks.normal_()
    models = {}
    for impl in (fastattn_as_transformers_flash, "eager64"):
        models[impl] = transformers.GptOssForCausalLM._from_config(copy.deepcopy(config), attn_implementation=impl)
        models[impl].load_state_dict(eager.state_dict())
        models[impl].eval()
    ids = torch.randint(0, VOCAB, (2, 11))
    fast = logits(models[fastattn_as_transformers_flash], input_ids=ids)
    check("gpt-oss logits (transformers' flash path)", fast, logits(eager, input_ids=ids),
          logits(models["eager64"].double(), input_ids=ids))
    no_sinks = eager.state_dict()
    for name in [n for n in no_sinks if n.endswith("sinks")]:
        no_sinks[name] = torch.full_like(no_sinks[name], -1e4)
    models[fastattn_as_transformers_flash].load_state_dict(no_sinks)
    assert (logits(models[fastattn_as_transformers_flash], input_ids=ids) - fast).abs().max() > 1e-3  # sinks count


def test_an_encoder_that_does_not_say_it_is_bidirectional_runs_eager():
    """Splinter's attention has no is_causal and its model no SDPA support; without padding
    transformers passes no mask, where SDPA's default (causal) was a silent wrong guess. Such calls
    run the model's eager function, warned and counted, and match eager."""
    config = transformers.SplinterConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=32)
    fast, naive, ref = build(transformers.SplinterModel, config)
    ids = torch.randint(1, VOCAB, (2, 9))
    with pytest.warns(UserWarning, match="does not say whether it is causal"), torch.no_grad():
        got = fast(input_ids=ids).last_hidden_state
    with torch.no_grad():
        check("splinter, no mask", got, naive(input_ids=ids).last_hidden_state,
              ref(input_ids=ids).last_hidden_state)
    assert fhf.CALLS["fastattn"] == 0 and sum(v for k, v in fhf.CALLS.items() if k.startswith("fallback")) == 2


def test_a_trainer_step_runs_fastattn():
    """transformers' Trainer passes num_items_in_batch through the model to every attention call: a
    known argument, so the step stays on fastattn (an allowlist without it sent it to eager)."""
    fast, _, _ = build(transformers.LlamaForCausalLM, llama_config())
    fast.train()
    ids = torch.randint(0, VOCAB, (2, 7))
    fast(input_ids=ids, labels=ids, attention_mask=padding_mask(2, 7, [0, 2], left=True),
         num_items_in_batch=torch.tensor(12)).loss.backward()
    assert_ran({"key padding"})


def test_an_argument_fastattn_does_not_know_runs_eager():
    """transformers passes model-specific arguments through **kwargs (Inkling 2's per-query sinks):
    one fastattn does not know, with a value, falls back to the model's eager function instead of
    being ignored; known ones (positions, flags) and None values do not."""
    fast, naive, _ = build(transformers.LlamaForCausalLM, llama_config())
    attn = fast.model.layers[0].self_attn
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    fhf.attention_forward(attn, q, k, v, None, scaling=0.3, position_ids=torch.arange(5)[None], use_cache=True,
                          sinks=None)
    assert fhf.CALLS["fastattn"] == 1
    with pytest.warns(UserWarning, match="passes sinks, which fastattn does not run"):
        fhf.attention_forward(attn, q, k, v, None, scaling=0.3, sinks=torch.zeros(1, 4, 5, 1))
    assert fhf.CALLS["fastattn"] == 1 and any("passes sinks" in k for k in fhf.CALLS)


# A window with Sq > Sk only: elsewhere transformers skips the mask only where the window is moot.
@pytest.mark.parametrize("sq,sk,window", [(6, 4, None), (6, 4, 3), (4, 6, None), (1, 5, None), (5, 5, None)])
def test_no_mask_is_sdpas_top_left_causal(sq, sk, window):
    """No mask and is_causal: SDPA's meaning (query i sees keys j <= i, one query every key), also
    for Sq > Sk (Mllama's cross-attention without its mask), where fastattn's own causal is bottom-right."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    q, k, v = torch.randn(2, 4, sq, 16), torch.randn(2, 4, sk, 16), torch.randn(2, 4, sk, 16)
    kw = dict(is_causal=True, sliding_window=window)
    got = fhf.attention_forward(module, q, k, v, None, **kw)[0]
    naive = sdpa_attention_forward(module, q, k, v, None, **kw)[0]
    want = sdpa_attention_forward(module, q.double(), k.double(), v.double(), None, **kw)[0]
    check(f"Sq={sq} Sk={sk}, no mask", got, naive, want)


def test_masks_do_not_outlive_their_forward():
    """The per-forward mask analysis holds no mask after the forward (it held the last 8: at B=8,
    S=8k, 512 MiB each)."""
    import gc
    import weakref

    fast, _, _ = build(transformers.LlamaForCausalLM, llama_config())
    masks = []
    spy = fhf._key_padding

    def record(mask, *a, **kw):
        masks.append(weakref.ref(mask))
        return spy(mask, *a, **kw)

    fhf._key_padding, saved = record, fhf._key_padding
    try:
        with torch.no_grad():
            for _ in range(3):
                fast(input_ids=torch.randint(0, VOCAB, (2, 7)), attention_mask=padding_mask(2, 7, [0, 2], left=True))
    finally:
        fhf._key_padding = saved
    gc.collect()
    assert masks and all(m() is None for m in masks)


def test_a_key_padding_mask_reaches_fastattn_as_analysed(monkeypatch):
    """A padded batch's key-padding mask, (B, Sk) from the layers' shared 4-D mask, is passed to every
    layer as the one tensor the analysis made (no view per call: ~2 us of host time each with the
    launcher's work on it); a 4-D mask with a batch dim of 1 is still broadcast over the batch."""
    seen = []
    real = fhf.fastattn.attention
    monkeypatch.setattr(fhf.fastattn, "attention",
                        lambda *a, **kw: seen.append(kw["key_padding_mask"]) or real(*a, **kw))
    fast, naive, ref = build(transformers.LlamaForCausalLM, llama_config())  # two layers
    ids = torch.randint(0, VOCAB, (2, 7))
    pad = padding_mask(2, 7, [0, 2], left=True)
    got = logits(fast, input_ids=ids, attention_mask=pad)
    assert len(seen) == 2 and seen[0] is seen[1] and seen[0].shape == (2, 7)
    check("left padding", got, logits(naive, input_ids=ids, attention_mask=pad),
          logits(ref, input_ids=ids, attention_mask=pad), keep=pad.bool())
    module = torch.nn.Module()
    module.is_causal = False
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    shared = torch.tensor([True] * 4 + [False] * 2)[None, None, None].expand(1, 1, 5, 6)
    out = fhf.attention_forward(module, q, k, v, shared, scaling=0.3)[0]
    assert seen[-1].shape == (2, 6)
    def ref(dtype):
        return reference.attention(*(x.to(dtype).transpose(1, 2) for x in (q, k, v)), scale=0.3,
                                   key_padding_mask=shared[0, 0, :1].expand(2, 6))

    check("shared mask", out, ref(torch.float32), ref(torch.float64))
    assert_ran({"key padding"})


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_an_input_whose_head_dim_is_strided(backend):
    """transformers' (B, H, S, D) tensors reach fastattn as (B, S, H, D) views; a value whose head dim
    is not contiguous (every other element of a wider tensor) gives the output and gradients of its
    contiguous copy (the launchers copy such a tensor themselves, inside the autograd Function)."""
    module = torch.nn.Module()
    module.is_causal = True
    q, k, wide = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 32)
    results = []
    for strided in (True, False):
        qi, ki = q.clone().requires_grad_(), k.clone().requires_grad_()
        vi = (wide.clone() if strided else wide[..., ::2].contiguous()).requires_grad_()
        value = vi[..., ::2] if strided else vi
        assert value.stride(-1) == (2 if strided else 1)
        out = fhf.attention_forward(module, qi, ki, value, None, scaling=0.3, backend=backend)[0]
        out.square().sum().backward()
        if strided:
            assert (vi.grad[..., 1::2] == 0).all()
        results.append((out, qi.grad, ki.grad, vi.grad[..., ::2] if strided else vi.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert_ran({"none"})
