"""The evaluation progress bar: drawn on stderr when asked and worth it, silent otherwise."""

from __future__ import annotations

import functools
import time

import pytest
import torch

from checkpoint_stability.tasks import classification
from checkpoint_stability.tasks import progress as progress_module
from checkpoint_stability.tasks.classification import ClassificationTask
from checkpoint_stability.tasks.progress import progress


def run(total: int, **kwargs) -> object:
    with progress(total, "my task", **kwargs) as bar:
        for _ in range(total):
            bar.update(1)
    return bar


def test_a_bar_on_stderr_without_delay(capfd):
    bar = run(10, delay=0)
    out, err = capfd.readouterr()
    assert out == ""
    assert "my task" in err and "/10 " in err
    assert bar.n == 10 and not bar.shown  # closed on exit


@pytest.mark.parametrize(
    "kwargs",
    [
        {"enabled": False, "delay": 0},  # disabled
        {},  # the default delay: a fast loop ends before the bar would appear
        {"delay": 5.0},
    ],
)
def test_silent_when_disabled_or_fast(capfd, kwargs):
    bar = run(10, **kwargs)
    assert capfd.readouterr() == ("", "")
    assert bar.n == 10


def test_a_delayed_bar_appears_once_the_loop_is_slow(capfd):
    with progress(6, "slow task", delay=0.1) as bar:
        for _ in range(6):
            time.sleep(0.05)
            bar.update(1)
    err = capfd.readouterr().err
    assert "slow task" in err and "0/6" not in err  # first drawn after the delay, mid-loop


def test_silent_on_other_ranks_and_for_tiny_loops(capfd, monkeypatch):
    monkeypatch.setattr(progress_module, "rank_and_world", lambda: (1, 2))
    run(10, delay=0)
    assert capfd.readouterr() == ("", "")
    monkeypatch.setattr(progress_module, "rank_and_world", lambda: (0, 2))
    run(10, delay=0)
    assert "/10 " in capfd.readouterr().err
    run(progress_module.MIN_TOTAL - 1, delay=0)
    assert capfd.readouterr() == ("", "")


def test_the_bar_is_closed_when_the_loop_raises(capfd):
    with pytest.raises(RuntimeError), progress(10, "failing", delay=0) as bar:
        bar.update(3)
        raise RuntimeError("boom")
    assert not bar.shown and bar.n == 3


def test_bad_arguments():
    for total in (-1, 2.5, True):
        with pytest.raises(ValueError, match="total"):
            progress(total, "x")
    with pytest.raises(ValueError, match="delay"):
        progress(3, "x", delay=-1)


def test_a_task_shows_its_bar_only_when_asked(capfd, monkeypatch):
    # A tiny evaluation is over long before the default delay: take the delay away.
    monkeypatch.setattr(classification, "progress", functools.partial(progress, delay=0.0))
    data = (torch.randn(20, 3), torch.randint(0, 2, (20,)))
    model = torch.nn.Linear(3, 2)
    ClassificationTask("shown", data, batch_size=4).evaluate(model)
    assert "shown" in capfd.readouterr().err
    ClassificationTask("hidden", data, batch_size=4, show_progress=False).evaluate(model)
    assert capfd.readouterr() == ("", "")


def test_language_model_tasks_draw_their_bar_on_rank_zero(monkeypatch, capfd):
    import functools

    from tiny_lm import tiny_gpt2, tiny_tokenizer

    from checkpoint_stability.tasks import multiple_choice
    from checkpoint_stability.tasks.multiple_choice import MultipleChoiceTask

    monkeypatch.setattr(multiple_choice, "progress", functools.partial(multiple_choice.progress, delay=0))
    examples = [{"context": "The capital of France is", "choices": ["Paris", "Rome", "York"], "label": 0}] * 4
    task = MultipleChoiceTask("capitals", examples, tiny_tokenizer(), batch_size=2)
    task.evaluate(tiny_gpt2())
    assert "capitals" in capfd.readouterr().err
    task.show_progress = False
    task.evaluate(tiny_gpt2())
    assert "capitals" not in capfd.readouterr().err
