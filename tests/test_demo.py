"""The demo's generated tasks and a very short run of the whole demo (plumbing, not accuracy)."""

import calendar
import json
import random

import pytest
import torch

from fastattn.demo import tasks
from fastattn.demo.run import run


def spoken_value(words):
    """Inverse of the spoken forms of the date task: a second, independent reading."""
    values = {w: i + 1 for i, w in enumerate(tasks.UNITS)} | {w: i + 10 for i, w in enumerate(tasks.TEENS)}
    values |= {w: 10 * (i + 2) for i, w in enumerate(tasks.TENS)} | {"oh": 0}
    ordinals = {w: i + 1 for i, w in enumerate(tasks.ORDINALS)} | {"thirtieth": 30}
    return sum(values.get(w, 0) + ordinals.get(w, 0) for w in words)


def test_spoken_numbers_read_back():
    for year in range(1901, 2100):
        if year % 100:
            words = tasks.year_words(year)
            assert 100 * spoken_value(words[:1]) + spoken_value(words[1:]) == year, words
    for day in range(1, 32):
        assert spoken_value(tasks.day_words(day)) == day


def test_dates_are_valid():
    rng = random.Random(0)
    for _ in range(300):
        words, iso = tasks.random_date(rng)
        y, m, d = map(int, iso.split("-"))
        assert 1 <= d <= calendar.monthrange(y, m)[1] and tasks.MONTHS[m - 1] in words
        assert words[-len(tasks.year_words(y)):] == tasks.year_words(y)
        assert tasks.DATE_VOCAB.decode(tasks.DATE_VOCAB.encode(words)) == words


def test_date_batch_shapes_and_masks():
    b = tasks.date_batch(random.Random(1), 8)
    assert b["tgt_in"].shape == b["tgt_out"].shape == (8, 11)
    assert (b["tgt_in"][:, 0] == tasks.BOS).all() and (b["tgt_out"][:, -1] == tasks.EOS).all()
    assert torch.equal(b["src_mask"], b["src"] != tasks.PAD)
    assert not b["src_mask"].all()  # different lengths: some padding (fixed seed)


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_sequence_batch_loss_mask_covers_the_answer(task):
    b = tasks.sequence_batch(random.Random(2), task, 16)
    for tok, lm in zip(b["tokens"].tolist(), b["loss_mask"].tolist()):
        sep = tok.index(tasks.SEP)
        n = sep  # as many answer tokens as prompt letters, then eos
        predicted = [tok[t + 1] for t, on in enumerate(lm) if on]
        assert len(predicted) == n + 1 and predicted[-1] == tasks.EOS
        letters = tasks.SEQ_VOCAB.decode(tok[:sep])
        assert tasks.SEQ_VOCAB.decode(predicted) == tasks.TASKS[task](letters)


def test_demo_runs_end_to_end(tmp_path):
    summary = run("auto", tmp_path, scale=0.004)  # a few steps of each part: plumbing only
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["dates"]["steps"] >= 1 and len(saved["dates"]["examples"]) == 5
    assert set(saved["transfer"]) == {"target", "pretrain", "finetune", "scratch"}
    assert summary["backend"] == "auto"


@pytest.mark.slow
def test_demo_reaches_its_stated_results(tmp_path):
    """The full demo (about a minute on 2 CPU cores): the translator reaches its accuracy goal and
    fine-tuning the pre-trained decoder needs fewer steps than training from scratch."""
    s = run("auto", tmp_path)
    assert s["dates"]["exact_match"] >= s["dates"]["goal"]
    t = s["transfer"]
    assert t["finetune"]["exact_match"] >= t["target"]
    assert t["finetune"]["steps"] * 3 <= t["scratch"]["steps"]
