"""Training and evaluation loops of the demo (small models, CPU-friendly)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastattn.demo import tasks
from fastattn.models import Decoder, EncoderDecoder, pad_left


@dataclass
class Progress:
    """Prints one line every `every` steps: step, loss, accuracy when measured, elapsed time."""

    name: str
    total: int
    every: int = 50
    start: float = field(default_factory=time.perf_counter)

    def __call__(self, step: int, loss: float, acc: float | None = None) -> None:
        if step % self.every and step != self.total and acc is None:
            return
        acc_s = f"  validation exact match {acc:6.1%}" if acc is not None else ""
        print(f"  [{self.name}] step {step:4d}/{self.total}  loss {loss:.3f}{acc_s}  "
              f"({time.perf_counter() - self.start:.1f}s)", flush=True)


def on_device_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions where mask is True. logits (B, S, V), targets (B, S)."""
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")  # (B * S,)
    mask = mask.flatten().float()
    return (losses * mask).sum() / mask.sum()


# ---------------------------------------------------------------- dates (encoder-decoder)
def date_loss(model: EncoderDecoder, batch) -> torch.Tensor:
    batch = on_device_of(model, batch)
    logits = model(batch["src"], batch["tgt_in"], batch["src_mask"])  # (B, 11, V)
    return F.cross_entropy(logits.flatten(0, 1), batch["tgt_out"].flatten())


@torch.no_grad()
def date_accuracy(model: EncoderDecoder, batch) -> float:
    """Exact match of the whole ISO date, generated token by token with the KV cache."""
    batch = on_device_of(model, batch)
    model.eval()
    out = model.generate(batch["src"], batch["src_mask"], batch["tgt_out"].shape[1], bos_id=tasks.BOS,
                         eos_id=tasks.EOS, pad_id=tasks.PAD)
    model.train()
    if out.shape != batch["tgt_out"].shape:
        return 0.0  # stopped early everywhere: eos before the date was complete
    return (out == batch["tgt_out"]).all(dim=1).float().mean().item()


def train_dates(model: EncoderDecoder, steps: int, *, target: float = 1.0, batch_size: int = 64, lr: float = 2e-3,
                seed: int = 0, eval_every: int = 50) -> tuple[int, float]:
    """Train on fresh random dates until the exact match on 500 validation dates reaches `target`
    (or for `steps` steps). Returns (steps taken, exact match on 500 other, unseen test dates)."""
    rng = random.Random(seed)
    validation, test = tasks.date_batch(random.Random(seed + 1), 500), tasks.date_batch(random.Random(seed + 2), 500)
    opt = optimizer(model, lr)
    sched = warmup_then_decay(opt, steps)
    log = Progress("dates", steps)
    for step in range(1, steps + 1):
        loss = date_loss(model, tasks.date_batch(rng, batch_size))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            acc = date_accuracy(model, validation)
            log(step, loss.item(), acc)
            if acc >= target:
                break
        else:
            log(step, loss.item())
    return step, date_accuracy(model, test)


# ---------------------------------------------------------------- sequences (decoder)
def sequence_loss(model: Decoder, batch) -> torch.Tensor:
    batch = on_device_of(model, batch)
    logits = model(batch["tokens"], batch["mask"])  # (B, S, V)
    targets = batch["tokens"].roll(-1, dims=1)  # position t predicts token t + 1
    return masked_cross_entropy(logits, targets, batch["loss_mask"])


@torch.no_grad()
def sequence_accuracy(model: Decoder, task: str, examples: list[tuple[list[int], list[int]]]) -> float:
    """Exact match of the answers, generated from left-padded prompts of different lengths with
    the KV cache."""
    model.eval()
    prompts, answers = zip(*examples)
    tokens, mask = pad_left(prompts, pad_id=tasks.PAD, device=model.lm_bias.device)
    width = max(len(a) for a in answers)
    out = model.generate(tokens, mask, width, eos_id=tasks.EOS, pad_id=tasks.PAD).tolist()
    model.train()
    return sum(o[:len(a)] == a for o, a in zip(out, answers)) / len(answers)


def train_sequences(model: Decoder, task: str, max_steps: int, *, target: float | None = None, batch_size: int = 64,
                    lr: float = 2e-3, seed: int = 0, eval_every: int = 25) -> tuple[int, float]:
    """Train on `task` until the exact match on 256 validation examples reaches `target` (or
    max_steps). Returns (steps taken, that accuracy)."""
    rng, eval_rng = random.Random(seed), random.Random(seed + 1)
    held_out = [tasks.sequence_example(eval_rng, task) for _ in range(256)]
    opt = optimizer(model, lr)
    sched = warmup_then_decay(opt, max_steps)
    log = Progress(task, max_steps, every=eval_every)
    acc = 0.0
    for step in range(1, max_steps + 1):
        loss = sequence_loss(model, tasks.sequence_batch(rng, task, batch_size))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == max_steps:
            acc = sequence_accuracy(model, task, held_out)
            log(step, loss.item(), acc)
            if target is not None and acc >= target:
                return step, acc
    return max_steps, acc


def warmup_then_decay(opt: torch.optim.Optimizer, steps: int, warmup: int = 30) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then linear decay to 10% of the peak learning rate."""
    def factor(s: int) -> float:
        return min((s + 1) / warmup, 1.0 - 0.9 * max(0, s - warmup) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
