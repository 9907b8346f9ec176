"""Generated tasks for the demo: nothing to download, endless fresh examples.

- Dates: "the fifth of march nineteen ninety eight" -> "1998-03-05" (encoder-decoder). The order
  of the parts changes between source and target, so the cross-attention has to learn where to
  look: its map is a readable alignment (year digits -> year words, and so on).
- Reverse / reverse-and-shift: "c a f > f a c" and "c a f > g b d" (decoder). The second task is
  the first plus a letter substitution, so a model pre-trained on reversing needs only a short
  fine-tune to learn it.
"""

from __future__ import annotations

import calendar
import random
from dataclasses import dataclass

import torch

from fastattn.models import pad_right

SPECIALS = ["<pad>", "<bos>", "<eos>"]
PAD, BOS, EOS = 0, 1, 2


@dataclass
class Vocab:
    words: list[str]

    def __post_init__(self):
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, words: list[str]) -> list[int]:
        return [self.index[w] for w in words]

    def decode(self, ids) -> list[str]:
        return [self.words[i] for i in ids if i not in (PAD, BOS, EOS)]


# ---------------------------------------------------------------- dates
UNITS = "one two three four five six seven eight nine".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
ORDINALS = ("first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth "
            "fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth").split()
MONTHS = [m.lower() for m in calendar.month_name[1:]]
DATE_VOCAB = Vocab(SPECIALS + list("0123456789-") + ["the", "of", "oh", "thirtieth"] + UNITS + TEENS + TENS
                   + ORDINALS + MONTHS)


def day_words(day: int) -> list[str]:
    """21 -> ["twenty", "first"]; 30 -> ["thirtieth"]."""
    if day <= 20:
        return [ORDINALS[day - 1]]
    if day == 30:
        return ["thirtieth"]
    return [TENS[day // 10 - 2], ORDINALS[day % 10 - 1]]


def two_digits(n: int) -> list[str]:
    """The spoken form of 1..99 inside a year: 5 -> ["oh", "five"], 42 -> ["forty", "two"]."""
    if n < 10:
        return ["oh", UNITS[n - 1]]
    if n < 20:
        return [TEENS[n - 10]]
    return [TENS[n // 10 - 2]] + ([UNITS[n % 10 - 1]] if n % 10 else [])


def year_words(year: int) -> list[str]:
    """1998 -> ["nineteen", "ninety", "eight"]; 2023 -> ["twenty", "twenty", "three"]."""
    return two_digits(year // 100) + two_digits(year % 100)


def random_date(rng: random.Random) -> tuple[list[str], str]:
    """A date in words (in one of two word orders) and its ISO form. Years 1901-2099 except 2000."""
    year = rng.choice([y for y in range(1901, 2100) if y % 100])
    month = rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    if rng.random() < 0.5:
        words = ["the"] + day_words(day) + ["of", MONTHS[month - 1]] + year_words(year)
    else:
        words = [MONTHS[month - 1], "the"] + day_words(day) + year_words(year)
    return words, f"{year:04d}-{month:02d}-{day:02d}"


def date_batch(rng: random.Random, n: int) -> dict[str, torch.Tensor]:
    """n examples -> src (n, S_src) right-padded with src_mask, and the target with BOS/EOS:
    tgt_in = BOS + ISO (decoder input), tgt_out = ISO + EOS (what each position must predict)."""
    pairs = [random_date(rng) for _ in range(n)]
    src = [DATE_VOCAB.encode(words) for words, _ in pairs]
    iso = [DATE_VOCAB.encode(list(date)) for _, date in pairs]
    src_t, src_mask = pad_right(src, PAD)
    tgt = torch.tensor([[BOS] + t + [EOS] for t in iso])  # every ISO date has 10 characters
    return {"src": src_t, "src_mask": src_mask, "tgt_in": tgt[:, :-1], "tgt_out": tgt[:, 1:]}


# ---------------------------------------------------------------- reverse / reverse-and-shift
LETTERS = list("abcdefghijklmnop")
SEQ_VOCAB = Vocab(SPECIALS + [">"] + LETTERS)
SEP = SEQ_VOCAB.index[">"]
TASKS = {
    "reverse": lambda xs: xs[::-1],
    "reverse-shift": lambda xs: [LETTERS[(LETTERS.index(x) + 1) % len(LETTERS)] for x in xs[::-1]],
}


def sequence_example(rng: random.Random, task: str, min_len: int = 3, max_len: int = 8) -> tuple[list[int], list[int]]:
    xs = [rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len))]
    prompt = SEQ_VOCAB.encode(xs + [">"])
    return prompt, SEQ_VOCAB.encode(TASKS[task](xs)) + [EOS]


def sequence_batch(rng: random.Random, task: str, n: int) -> dict[str, torch.Tensor]:
    """n examples "x1 .. xk > y1 .. yk <eos>" right-padded: tokens (n, S), mask, and the loss mask
    (True where the next token is part of the answer: the prompt itself is given, not learned)."""
    examples = [sequence_example(rng, task) for _ in range(n)]
    tokens, mask = pad_right([p + a for p, a in examples], PAD)
    answer = torch.zeros_like(mask)
    for i, (p, a) in enumerate(examples):
        answer[i, len(p) - 1:len(p) + len(a) - 1] = True  # position t predicts token t + 1
    return {"tokens": tokens, "mask": mask, "loss_mask": answer}
