"""Token-by-token generation shared by the decoder and the encoder-decoder: sampling (greedy,
temperature, top-k), the decoding loop, and left-padding of prompts of different lengths."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> tokens (B, S_max) and mask (B, S_max), True = real token.

    Left padding makes every prompt end at the last column, so new tokens append in lockstep right
    after each prompt. Right padding works too: generation continues each prompt after its last real
    token (the cache leaves the pads out; recomputing moves them to the front).
    """
    return _pad(prompts, pad_id, device, left=True)


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of different lengths -> tokens (B, S_max) padded at the end, and the mask."""
    return _pad(seqs, pad_id, device, left=False)


def _pad(seqs, pad_id, device, left):
    if not seqs or any(len(x) == 0 for x in seqs):
        raise ValueError("expected a non-empty list of non-empty token lists")
    s = max(len(x) for x in seqs)
    tokens = torch.full((len(seqs), s), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), s, dtype=torch.bool)
    for i, x in enumerate(seqs):
        cols = slice(s - len(x), s) if left else slice(0, len(x))
        tokens[i, cols] = torch.as_tensor(list(x), dtype=torch.long)
        mask[i, cols] = True
    return tokens.to(device), mask.to(device)


def last_real(mask: torch.Tensor) -> torch.Tensor:
    """(B, S) bool -> (B,) index of each row's last True (where the next token is predicted)."""
    return mask.shape[1] - 1 - mask.flip(-1).int().argmax(-1)


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,). temperature 0 is greedy (argmax); otherwise sample from
    softmax(logits / temperature), restricted to the top_k most likely tokens when top_k is set."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        # A CPU generator drives sampling on any device: same seed, same tokens everywhere.
        return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def decode_loop(logits: torch.Tensor, next_logits: Callable[[torch.Tensor], torch.Tensor], max_new_tokens: int, *,
                temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None, pad_id: int = 0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick tokens one at a time.

    logits: (B, V), the prediction for the first new token. next_logits(tokens (B, 1)) feeds the
    chosen tokens to the model and returns the prediction for the following one. A sequence that
    has produced eos_id is finished: it gets pad_id from then on, and the loop stops early once every
    sequence is finished. Returns the new tokens (B, n), n <= max_new_tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab = logits.shape[-1]
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id if eos_id is not None else None)):
        if value is not None and not 0 <= value < vocab:  # (pad_id is fed back to the model after eos_id)
            raise ValueError(f"{name} must be a token id in [0, vocab_size={vocab}), got {value}")
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    chosen, all_done, finished = [], AllDone(logits.device), []
    for i in range(max_new_tokens):
        tok = sample(logits, temperature=temperature, top_k=top_k, generator=generator)
        if eos_id is not None:
            tok = tok.masked_fill(done, pad_id)
            done |= tok == eos_id
            finished.append(done.all())  # (on the device: read once, at the end)
        chosen.append(tok)
        if i + 1 == max_new_tokens or (eos_id is not None and all_done(done)):
            break
        logits = next_logits(tok[:, None])
    if finished:  # the steps up to the first at which every sequence was done (one read per call)
        n = int((torch.stack(finished).cumsum(0) == 0).sum()) + 1
        chosen = chosen[:n]
    return torch.stack(chosen, dim=1)


class AllDone:
    """Whether every sequence has finished, without the host waiting for the GPU each token: on CUDA
    done.all() is copied to pinned host memory and read once the copy has landed (a step or two
    late: finished rows only get pad_id meanwhile, and decode_loop cuts the extra steps at the end);
    on the CPU it is read at once. A host that waits each token cannot queue the next step (or the
    next CUDA-graph replay) while the GPU runs this one."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.flag = torch.zeros((), dtype=torch.bool, pin_memory=True) if self.cuda else None
        self.landed = None  # a CUDA event after the flag's copy, while one is in flight

    def __call__(self, done: torch.Tensor) -> bool:
        if not self.cuda:
            return bool(done.all())
        if self.landed is not None:
            if not self.landed.query():
                return False
            if bool(self.flag):
                return True
        self.flag.copy_(done.all(), non_blocking=True)
        self.landed = torch.cuda.Event()
        self.landed.record()
        return False


@torch.no_grad()
def generate(forward: Callable, tokens: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int, *,
             cache=None, cuda_graph: bool = False, **sampling) -> torch.Tensor:
    """The generation loop of both generating models; returns the new tokens (B, n).

    forward(tokens (B, S), mask (B, S) or None, cache) -> logits (B, S, vocab): the model run on
    tokens that continue the cached ones (all of them when cache is None).
    tokens, mask: the prompt and its padding (None = no padding). The first new token is predicted
    at each row's last real token.
    With a cache, each step runs the model on the one new token against the cached keys/values;
    cuda_graph=True captures that step once in a CUDA graph and replays it per token (CUDA only: a
    decode step is host-bound at small batch). Without a cache, it recomputes the whole sequence
    every step: the slow way, kept to check the cache.
    sampling: temperature, top_k, eos_id, pad_id, generator (see ``decode_loop``).
    """
    if cuda_graph and (cache is None or not tokens.is_cuda):
        raise ValueError("cuda_graph=True needs a KV cache (use_cache=True) and CUDA tensors")
    if cache is None and mask is not None:
        # Padding to the front of each prompt (a stable sort of "is real"), so that new tokens follow
        # their prompt directly: relative position bias counts distances in columns.
        order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # (B, S)
        tokens, mask = tokens.gather(1, order), mask.gather(1, order)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    last = tokens.shape[1] - 1 if mask is None else last_real(mask)
    first = forward(tokens, mask, cache)[rows, last]
    if cache is not None:
        step = lambda t: forward(t, None, cache)[:, -1]  # noqa: E731
        if cuda_graph and max_new_tokens > 1:
            step = graphed_step(step, cache, first.argmax(-1)[:, None])
        return decode_loop(first, step, max_new_tokens, **sampling)

    seq, seq_mask = tokens, torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask

    def recompute(t: torch.Tensor) -> torch.Tensor:
        nonlocal seq, seq_mask
        seq = torch.cat([seq, t], dim=1)
        seq_mask = torch.cat([seq_mask, torch.ones_like(t, dtype=torch.bool)], dim=1)
        return forward(seq, seq_mask, None)[:, -1]

    return decode_loop(first, recompute, max_new_tokens, **sampling)


def graphed_step(step: Callable[[torch.Tensor], torch.Tensor], cache, example: torch.Tensor):
    """`step` (tokens (B, n) -> logits) captured once in a CUDA graph: the returned function copies
    its tokens into the graph's input, replays it and returns the graph's output (valid until the
    next call).

    The step must touch only tensors of fixed shape and address (the KV cache's buffers and
    lengths, the weights), as the cache's decode steps do. Warm-up calls (they build the kernels'
    launch plans, which must not be built during capture) advance the cache; its lengths are put
    back after each of them, so that each writes at the real next position (a cache sized for two
    new tokens has room for one step past the prompt, not three), which the real steps overwrite."""
    static_in = example.clone()
    lengths, count = cache.seqlens.clone(), cache.length
    side = torch.cuda.Stream(device=example.device)
    side.wait_stream(torch.cuda.current_stream(example.device))
    with torch.cuda.stream(side):
        for _ in range(2):
            step(static_in)
            cache.seqlens.copy_(lengths)
            cache.length = count
    torch.cuda.current_stream(example.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(static_in)
    cache.length = count  # the capture ran the step's host code once, and nothing on the device

    def replay(tokens: torch.Tensor) -> torch.Tensor:
        static_in.copy_(tokens)
        graph.replay()
        cache.replayed(tokens.shape[1])
        return static_out

    return replay


def empty_continuation(max_new_tokens, batch: int, device) -> torch.Tensor | None:
    """Check max_new_tokens (an int >= 0); for 0 the (B, 0) continuation to return, else None."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    return torch.zeros((batch, 0), dtype=torch.long, device=device) if max_new_tokens == 0 else None


def check_room(needed: int, max_len: int, what: str) -> None:
    if needed > max_len:
        raise ValueError(f"{what} needs {needed} positions but the model's max_len is {max_len}")
