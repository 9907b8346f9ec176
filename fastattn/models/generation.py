"""Token-by-token generation shared by the decoder and the encoder-decoder: sampling (greedy,
temperature, top-k), the decoding loop, and left-padding of prompts of different lengths."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> tokens (B, S_max) and mask (B, S_max), True = real token.

    Prompts are padded on the left so that every prompt ends at the last column: the next token of
    every sequence is then predicted from the same position, and new tokens append in lockstep.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    s = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), s), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), s, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, s - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, s - len(p):] = True
    return tokens.to(device), mask.to(device)


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
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    chosen = []
    for i in range(max_new_tokens):
        tok = sample(logits, temperature=temperature, top_k=top_k, generator=generator)
        if eos_id is not None:
            tok = tok.masked_fill(done, pad_id)
            done |= tok == eos_id
        chosen.append(tok)
        if i + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
            break
        logits = next_logits(tok[:, None])
    return torch.stack(chosen, dim=1)


def check_room(needed: int, max_len: int, what: str) -> None:
    if needed > max_len:
        raise ValueError(f"{what} needs {needed} positions but the model's max_len is {max_len}")
