"""The demo's generated tasks and a very short run of the whole demo (plumbing, not accuracy)."""

import calendar
import json
import random

import pytest
import torch

from fastattn.demo import tasks
from fastattn.demo.run import run, unmet_goals


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
    assert unmet_goals(run("auto", tmp_path)) == []


def _summary(dates=0.995, finetune=(50, 0.95), scratch=(450, 0.95)):
    return {"dates": {"exact_match": dates, "goal": 0.99, "steps": 350},
            "transfer": {"target": 0.9, "finetune": {"steps": finetune[0], "exact_match": finetune[1]},
                         "scratch": {"steps": scratch[0], "exact_match": scratch[1]}}}


def test_demo_exit_status_checks_both_parts(monkeypatch, tmp_path):
    """`python -m fastattn demo` fails when either part misses the README's claim (it once checked the
    dates alone, so a broken decoder path passed the main job); --quick is a smoke run."""
    import fastattn.demo.run as demo
    from fastattn.__main__ import main

    assert unmet_goals(_summary()) == []
    assert "dates" in unmet_goals(_summary(dates=0.5))[0]
    assert "reached" in unmet_goals(_summary(finetune=(800, 0.3)))[0]
    assert "a third" in unmet_goals(_summary(finetune=(200, 0.95)))[0]
    for summary, status in ((_summary(), 0), (_summary(finetune=(800, 0.3)), 1)):
        monkeypatch.setattr(demo, "run", lambda *a, s=summary, **k: s)
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # no re-run of the process for the interpreter
        assert main(["demo", "--out", str(tmp_path)]) == status
        assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0


def test_command_line_refuses_bad_arguments_by_name(capsys):
    from fastattn.__main__ import main

    bad = [["demo", "--backend", "bogus"], ["demo", "--backend", "cuda"], ["check", "--device", "tpu"],
           ["check", "--device", "nonsense:x"]]
    if not torch.cuda.is_available():
        bad.append(["demo", "--device", "cuda"])
    for argv in bad:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and argv[1] in capsys.readouterr().err, argv  # the flag, named


def test_main_called_from_python_returns(monkeypatch):
    """Without a GPU the command line starts over with the Triton interpreter on; called from Python
    (main(argv)) that is a child process whose status main returns, not os.execv replacing the caller."""
    import os
    import subprocess

    from fastattn.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("main(argv) replaced the calling process"))
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 7)
    assert main(["check"]) == 7
    (cmd, env), = calls
    assert cmd[-2:] == ["fastattn", "check"] and env["TRITON_INTERPRET"] == "1"
    assert "TRITON_INTERPRET" not in os.environ  # the caller's environment is left as it was

