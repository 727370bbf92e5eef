"""StabilityCallback inside real Lightning Trainers (CPU, tiny models); every number against an oracle."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from tensorboard_runs import assert_runs_match, drift_lines, expected_runs, read_runs
from tiny_training import CLASSES, FEATURES, classify_task, make_data
from torch.utils.data import DataLoader, TensorDataset

from checkpoint_stability import ClassificationTask, ExistingRunError, NextTokenTask, read_best
from checkpoint_stability.callbacks.lightning import StabilityCallback
from checkpoint_stability.sinks import custom_scalars_layout
from checkpoint_stability.tasks.from_dataloader import default_task_from_dataloader

VARIANTS = ("raw", "avg", "ens")
METRICS = ("score", "mtv", "is")
SCRIPTS = Path(__file__).parent / "distributed"


# ---------------------------------------------------------------------------------------- fixtures


class Classifier(LightningModule):
    """Dropout, BatchNorm and noisy inputs: training draws random numbers and updates buffers."""

    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(FEATURES, 16)
        self.drop = torch.nn.Dropout(0.3)
        self.norm = torch.nn.BatchNorm1d(16)
        self.out = torch.nn.Linear(16, CLASSES)
        self.after_steps: list[dict[str, torch.Tensor]] = []  # weights after each optimizer step

    def forward(self, x):
        return self.out(self.norm(self.drop(torch.relu(self.hidden(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x + 0.1 * torch.randn_like(x)), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.after_steps.append({k: v.detach().clone() for k, v in self.state_dict().items()})


def loaders(batch_size: int = 8):
    x, y = make_data(0)
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    return train, DataLoader(TensorDataset(x, y), batch_size=16)


def fit(root, callbacks=(), *, max_steps=12, logger=False, ckpt_path=None, model=None, data=None, **kwargs):
    seed_everything(0, verbose=False)
    model = model if model is not None else Classifier()
    trainer = Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        num_sanity_val_steps=0,
        **kwargs,
    )
    trainer.fit(model, *(data if data is not None else loaders()), ckpt_path=ckpt_path)
    return trainer, model


def history(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return [line for line in lines if "error" not in line]


def expected_scalars(records: list[dict], window: int) -> dict[str, dict[int, float]]:
    """{logged name: {step: value}} from history records, the contract's names built by hand."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        if r["window"] != (1 if r["variant"] == "raw" else window):
            continue
        for metric in METRICS:
            if r[metric] is not None:
                out.setdefault(f"stability/{r['task']}/{r['variant']}/{metric}", {})[r["step"]] = r[metric]
    return out


def accuracy(weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    model = Classifier()
    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).double().mean().item()


def buffer_files(run_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    manifest = json.loads((run_dir / "buffer" / "manifest.json").read_text())
    out = {}
    for entry in manifest["snapshots"]:
        with safe_open(str(run_dir / "buffer" / entry["file"]), framework="pt") as handle:
            out[entry["step"]] = {key: handle.get_tensor(key) for key in handle.keys()}
    return out


def float64_mean(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        k: sum(s[k].double() for s in states) / len(states)
        for k in states[0]
        if states[0][k].is_floating_point()
    }


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def read_tensorboard(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def wait_for_next_second() -> None:
    # Event files sort by their creation second, then a per-process counter that sorts wrongly past 9;
    # a real resume is a new process, later in time.
    time.sleep(1.01 - time.time() % 1)


# --------------------------------------------------------------------------- training is untouched


@pytest.mark.parametrize("accumulate", [1, 2])
def test_training_is_bit_identical_and_snapshots_land_on_optimizer_steps(tmp_path, accumulate):
    _, plain = fit(tmp_path / "plain", accumulate_grad_batches=accumulate)
    x, y = make_data(1)
    seen: list[dict] = []
    callback = StabilityCallback(
        [classify_task(x, y, seen=seen)], window=3, every_n_steps=3, console=False, tensorboard=False
    )
    trainer, watched = fit(tmp_path / "watched", [callback], accumulate_grad_batches=accumulate)

    assert trainer.global_step == 12 and len(watched.after_steps) == 12
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    run_dir = tmp_path / "watched" / "stability"
    raw = [r for r in history(run_dir) if r["task"] == "cls" and r["variant"] == "raw"]
    # Once per optimizer step multiple of 3, however many batches ended on that step.
    assert [r["step"] for r in raw] == [3, 6, 9, 12]
    # raw, avg, raw, avg, ...: raw saw the weights right after the step's optimizer step, bit for bit.
    for k, record in enumerate(raw):
        after = watched.after_steps[record["step"] - 1]
        assert all(torch.equal(seen[2 * k][name], after[name]) for name in after), record["step"]
        assert record["score"] == pytest.approx(accuracy(after, x, y), abs=1e-12)
    stored = buffer_files(run_dir)
    assert sorted(stored) == [6, 9, 12]
    for step, tensors in stored.items():
        assert all(torch.equal(tensors[n], watched.after_steps[step - 1][n]) for n in tensors)


# --------------------------------------------------------------------------------------- loggers


def test_tensorboard_and_csv_loggers_get_every_key_at_the_snapshot_steps(tmp_path):
    tb = TensorBoardLogger(tmp_path / "logs", name="tb")
    csv_logger = CSVLogger(tmp_path / "logs", name="csv")
    x, y = make_data(1)
    tasks = [classify_task(x, y, "a"), classify_task(x[:20], y[:20], "b")]
    callback = StabilityCallback(tasks, window=2, every_n_steps=4, console=False)
    fit(tmp_path, [callback], logger=[tb, csv_logger])

    run_dir = tmp_path / "stability"
    expected = expected_scalars(history(run_dir), window=2)
    names = {f"stability/{t}/{v}/{m}" for t in ("a", "b", "mean") for v in VARIANTS for m in METRICS}
    assert set(expected) == names
    for name, by_step in expected.items():
        # mtv and is need two evaluations of the series
        assert sorted(by_step) == ([8, 12] if name.endswith(("/mtv", "/is")) else [4, 8, 12]), name

    # Exactly one TensorBoard destination: the variant runs beside the logger's own run, and the
    # custom-scalars layout in the logger's writer.
    assert not (run_dir / "tensorboard").exists()
    runs = read_runs(Path(tb.log_dir), prefix="stability/")
    assert sorted(runs) == ["avg", "best", "ens", "raw"]
    assert_runs_match(runs, expected_runs(history(run_dir), window=2, drift=drift_lines(run_dir)))
    best = json.loads((run_dir / "best.json").read_text())
    assert runs["best"]["stability/best/step"][-1] == (best["step"], pytest.approx(best["step"]))
    acc = read_tensorboard(Path(tb.log_dir))
    tag = custom_scalar_metadata.CONFIG_SUMMARY_TAG
    layouts = [layout_pb2.Layout.FromString(e.tensor_proto.string_val[0]) for e in acc.Tensors(tag)]
    assert len(layouts) == 1
    charts = {
        (category.title, chart.title): list(chart.multiline.tag)
        for category in layouts[0].category
        for chart in category.chart
    }
    assert charts == {
        (category, title): tags
        for category, by_title in custom_scalars_layout(["a", "b"]).items()
        for title, (_, tags) in by_title.items()
    }
    assert not [t for t in acc.Tags()["scalars"] if t.startswith("stability/")]  # not in the logger's run

    # CSV: the same values at the same steps.
    rows = read_csv(Path(csv_logger.log_dir) / "metrics.csv")
    for name, by_step in expected.items():
        logged = {int(row["step"]): float(row[name]) for row in rows if row.get(name)}
        assert logged == pytest.approx(by_step, abs=1e-9), name


def test_wandb_logger_gets_the_scalars_once_on_its_step_axis_and_one_chart_per_task(tmp_path, monkeypatch):
    from test_wandb_sink import read_offline_run

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb_logger = WandbLogger(save_dir=str(tmp_path), mode="offline", project="stability-tests")
    csv_logger = CSVLogger(tmp_path / "logs", name="csv")
    x, y = make_data(1)
    callback = StabilityCallback([classify_task(x, y)], window=2, every_n_steps=4, console=False)
    fit(tmp_path, [callback], logger=[wandb_logger, csv_logger])
    wandb_logger.experiment.finish()

    back = read_offline_run(tmp_path)
    expected = expected_scalars(history(tmp_path / "stability"), window=2)
    for name, by_step in expected.items():
        summary = "max" if name.endswith("/score") else "min"
        assert back.metrics[name] == {"step_metric": "trainer/global_step", "summary": [summary]}, name
        # One path to W&B: every snapshot step once (the framework sink leaves the WandbLogger alone).
        rows = [(row["trainer/global_step"], row[name]) for row in back.rows_with(name)]
        assert rows == [(s, pytest.approx(v, abs=1e-12)) for s, v in sorted(by_step.items())], name
        best = (max if summary == "max" else min)(by_step.values())
        assert back.summary[name] == {summary: pytest.approx(best, abs=1e-12)}
    for task in ("mean", "cls"):
        final = back.tables(f"stability/{task}/chart")[-1]
        assert final["data"] == [
            [step, variant, pytest.approx(expected[f"stability/{task}/{variant}/score"][step], abs=1e-12)]
            for variant in VARIANTS
            for step in (4, 8, 12)
        ]
    # The chosen checkpoint: the summary's best fields and one model artifact, both best.json's.
    best = json.loads((tmp_path / "stability" / "best.json").read_text())
    assert back.summary["stability/best/step"] == best["step"]
    assert back.summary["stability/best/variant"] == best["variant"]
    assert back.summary["stability/best/steps"] == best["steps"]
    [artifact] = [a for a in back.artifacts if a.type == "model"]
    assert json.loads(artifact.metadata) == best
    assert {"best", f"step-{best['step']}"} <= set(artifact.aliases)
    # The CSV logger still gets them, through log_metrics.
    rows = read_csv(Path(csv_logger.log_dir) / "metrics.csv")
    assert sorted(int(r["step"]) for r in rows if r.get("stability/mean/raw/score")) == [4, 8, 12]


# ---------------------------------------------------------------------------------------- resume


class CrashAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class OnDiskAtTrainStart(Callback):
    """Placed after the StabilityCallback: what the run directory holds once it has opened."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_train_start(self, trainer, pl_module):
        self.history_steps = sorted({r["step"] for r in history(self.run_dir)})
        self.buffer_steps = sorted(buffer_files(self.run_dir))


def test_resume_drops_the_abandoned_trajectory_and_continues_in_the_restored_directory(tmp_path):
    x, y = make_data(1)

    def callback(seen=None):
        return StabilityCallback([classify_task(x, y, seen=seen)], window=3, every_n_steps=2, console=False)

    reference = tmp_path / "reference"
    fit(reference, [callback()], max_steps=16)

    # Checkpoints every 4 steps; the crash comes after step 10, whose snapshot is newer than step 8's.
    first = tmp_path / "first"
    ckpts = tmp_path / "ckpts"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(
            first,
            [callback(), ModelCheckpoint(ckpts, every_n_train_steps=4, save_top_k=-1), CrashAt(10)],
            max_steps=16,
        )
    run_dir = first / "stability"
    assert sorted({r["step"] for r in history(run_dir)}) == [2, 4, 6, 8, 10]
    assert sorted(buffer_files(run_dir)) == [6, 8, 10]
    crashed_at = time.time()
    wait_for_next_second()

    # A new Trainer with another default_root_dir: the directory saved in the checkpoint wins.
    seen: list[dict] = []
    resumed = callback(seen)
    at_start = OnDiskAtTrainStart(run_dir)
    (checkpoint,) = ckpts.glob("*step=8.ckpt")
    same_checkpointing = ModelCheckpoint(ckpts, every_n_train_steps=4, save_top_k=-1)
    trainer, _ = fit(
        tmp_path / "second", [resumed, at_start, same_checkpointing], max_steps=16, ckpt_path=str(checkpoint)
    )
    assert trainer.global_step == 16
    assert resumed.monitor.dirpath == run_dir
    assert not (tmp_path / "second" / "stability").exists()
    # Dropped when the run directory opened, before the first new snapshot. (Step 4 left the window,
    # and the disk, at step 10: the window refills with the resumed run's snapshots.)
    assert at_start.history_steps == [2, 4, 6, 8] and at_start.buffer_steps == [6, 8]

    records = history(run_dir)
    steps = [r["step"] for r in records if r["task"] == "cls" and r["variant"] == "raw"]
    assert steps == [
        r["step"] for r in history(reference / "stability") if r["task"] == "cls" and r["variant"] == "raw"
    ]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16]
    # No (step, task, variant, window) twice; step 10 is the resumed run's, not the abandoned one.
    assert max(Counter((r["step"], r["task"], r["variant"], r["window"]) for r in records).values()) == 1
    assert all(r["time"] > crashed_at for r in records if r["step"] > 8)
    assert all(r["time"] < crashed_at for r in records if r["step"] <= 8)
    lines = [json.loads(line) for line in (run_dir / "examples" / "cls.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["variant"] == "raw"] == steps

    # Buffer, manifest and files on disk agree; the avg evaluation at 16 saw their float64 mean.
    stored = buffer_files(run_dir)
    assert sorted(stored) == [12, 14, 16]
    assert sorted(p.name for p in (run_dir / "buffer").glob("*.safetensors")) == [
        f"step-{s:08d}.safetensors" for s in (12, 14, 16)
    ]
    # The resumed run's raw snapshots are the buffered files, bit for bit (seen: raw, avg, raw, avg...).
    raw_seen = dict(zip((10, 12, 14, 16), seen[0::2], strict=True))
    for step in (12, 14, 16):
        assert all(torch.equal(stored[step][k], raw_seen[step][k]) for k in stored[step])
    oracle = float64_mean([stored[s] for s in (12, 14, 16)])
    for name, value in oracle.items():
        torch.testing.assert_close(seen[-1][name].double(), value, rtol=0, atol=1e-6)
    last_avg = [r for r in records if r["task"] == "cls" and r["variant"] == "avg"][-1]
    assert last_avg["step"] == 16 and last_avg["n_models"] == 3
    best = json.loads((run_dir / "best.json").read_text())
    assert best["step"] <= 16 and set(best["steps"]) <= set(steps)

    # The monitor's own TensorBoard runs (no logger here) purged the abandoned step 10: every run
    # holds each step once, with the resumed trajectory's values.
    assert_runs_match(
        read_runs(run_dir / "tensorboard"),
        expected_runs(history(run_dir), window=3, drift=drift_lines(run_dir)),
    )


# ------------------------------------------------------------------------------- the default task


def test_default_task_from_inputs_labels_validation_batches(tmp_path):
    callback = StabilityCallback(window=2, every_n_steps=4, console=False, tensorboard=False)
    _, model = fit(tmp_path, [callback], max_steps=8)
    (task,) = callback.monitor.tasks
    assert isinstance(task, ClassificationTask) and task.name == "validation"
    x, y = make_data(0)  # the validation loader's data
    raw = [r for r in history(tmp_path / "stability") if r["task"] == "validation" and r["variant"] == "raw"]
    assert [r["step"] for r in raw] == [4, 8]
    for record in raw:
        assert record["score"] == pytest.approx(
            accuracy(model.after_steps[record["step"] - 1], x, y), abs=1e-12
        )


VOCAB, LENGTH = 11, 9


class TinyLM(LightningModule):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.head = torch.nn.Linear(16, VOCAB)
        self.after_steps: list[dict[str, torch.Tensor]] = []

    def forward(self, input_ids):
        return self.head(torch.tanh(self.embed(input_ids)))

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"])[:, :-1]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1)
        )

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.after_steps.append({k: v.detach().clone() for k, v in self.state_dict().items()})


def lm_batches(count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(count):
        start, stride = torch.randint(0, VOCAB, (2,), generator=generator).tolist()
        ids = (start + (stride % 3 + 1) * torch.arange(LENGTH)) % VOCAB
        labels = ids.clone()
        labels[:2] = -100  # the first targets are not examples
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def test_default_task_from_causal_lm_dict_batches(tmp_path):
    val = lm_batches(6)
    data = (DataLoader(lm_batches(32), batch_size=4, shuffle=True), DataLoader(val, batch_size=4))
    callback = StabilityCallback(window=2, every_n_steps=3, console=False, tensorboard=False)
    _, model = fit(tmp_path, [callback], max_steps=6, model=TinyLM(), data=data)
    (task,) = callback.monitor.tasks
    assert isinstance(task, NextTokenTask) and task.name == "validation"
    # Every position t with a label at t + 1 is an example: 6 rows x (LENGTH - 2) targets.
    assert len(task.targets) == 6 * (LENGTH - 2)
    raw = [r for r in history(tmp_path / "stability") if r["variant"] == "raw" and r["task"] == "validation"]
    assert [r["step"] for r in raw] == [3, 6]
    for record in raw:
        oracle_model = TinyLM()
        oracle_model.load_state_dict(model.after_steps[record["step"] - 1])
        hits = []
        for row in val:
            predicted = oracle_model(row["input_ids"][None])[0].argmax(-1)
            hits += [float(predicted[t] == row["labels"][t + 1]) for t in range(1, LENGTH - 1)]
        assert record["score"] == pytest.approx(sum(hits) / len(hits), abs=1e-12)


@pytest.mark.parametrize(
    ("batches", "match"),
    [
        ([(torch.zeros(2, 3), torch.zeros(2), torch.zeros(2))], "tuple of 3"),
        ([{"pixels": torch.zeros(2, 3)}], "without 'input_ids'"),
        (
            [{"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, dtype=torch.long)}],
            "sequence",
        ),
        ([(torch.zeros(2, 3), torch.tensor([0.5, 1.5]))], "integer class ids"),
        ([], "no batches"),
    ],
)
def test_unsupported_validation_batches_say_to_pass_tasks(batches, match):
    with pytest.raises(ValueError, match=match) as caught:
        default_task_from_dataloader(batches)
    assert "tasks=" in str(caught.value)


def test_no_validation_data_stops_fit_at_start_with_a_clear_error(tmp_path):
    model = Classifier()
    with pytest.raises(ValueError, match=r"tasks=None.*validation data.*pass tasks="):
        fit(tmp_path, [StabilityCallback(console=False)], model=model, data=(loaders()[0],))
    assert model.after_steps == []  # before any training step


def test_default_task_reading_leaves_training_untouched(tmp_path):
    # A shuffling validation loader draws from torch's generator; building the task must not shift it.
    train, _ = loaders()
    x, y = make_data(0)
    shuffled = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    _, plain = fit(tmp_path / "plain", data=(train, shuffled), max_steps=6)
    callback = StabilityCallback(every_n_steps=3, console=False, tensorboard=False)
    _, watched = fit(tmp_path / "watched", [callback], data=(loaders()[0], shuffled), max_steps=6)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, watched.state_dict()[name]), name


# ------------------------------------------------------------------------- no tasks, export, load


def test_no_tasks_buffers_averages_and_exports_the_final_average(tmp_path):
    callback = StabilityCallback([], window=3, every_n_steps=2, console=False)
    _, model = fit(tmp_path, [callback], max_steps=10)
    run_dir = tmp_path / "stability"
    assert history(run_dir) == [] if (run_dir / "history.jsonl").exists() else True
    stored = buffer_files(run_dir)
    assert sorted(stored) == [6, 8, 10]
    assert callback.best["steps"] == [6, 8, 10] and callback.best["variant"] == "avg"
    assert callback.best_model_path == run_dir / "exports" / "step-00000010-avg"
    fresh = Classifier()
    callback.load_best(fresh)
    oracle = float64_mean([model.after_steps[s - 1] for s in (6, 8, 10)])
    for name, value in oracle.items():
        torch.testing.assert_close(fresh.state_dict()[name].double(), value, rtol=0, atol=1e-6)
    # Non-floating entries (BatchNorm's batch counter) come from the newest snapshot.
    assert fresh.norm.num_batches_tracked == model.after_steps[9]["norm.num_batches_tracked"]


class Wrapper(LightningModule):
    """A LightningModule around the model that matters (as with a wrapped Hugging Face model)."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Linear(FEATURES, CLASSES)
        self.head_bias = torch.nn.Parameter(torch.zeros(CLASSES))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.model(x) + self.head_bias, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_load_best_into_the_lightning_module_or_the_named_submodule(tmp_path):
    callback = StabilityCallback([], window=2, every_n_steps=3, model_attribute="model", console=False)
    _, trained = fit(tmp_path, [callback], max_steps=6, model=Wrapper(), data=(loaders()[0],))
    whole, inner = Wrapper(), torch.nn.Linear(FEATURES, CLASSES)
    assert callback.load_best(whole)["steps"] == [3, 6]
    callback.load_best(inner)
    assert torch.equal(inner.weight, whole.model.weight) and torch.equal(inner.bias, whole.model.bias)
    assert not torch.equal(whole.model.weight, trained.model.weight)  # an average, not the last weights
    with pytest.raises(ValueError, match=r"model_attribute='nope'.*submodules are \['model'\]"):
        fit(
            tmp_path / "bad",
            [StabilityCallback([], model_attribute="nope")],
            model=Wrapper(),
            data=(loaders()[0],),
        )


class WrappedGPT2(LightningModule):
    """A LightningModule around a Hugging Face causal LM, found without model_attribute."""

    def __init__(self):
        super().__init__()
        from tiny_lm import tiny_gpt2

        self.lm = tiny_gpt2(0).train()

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.lm(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_a_wrapped_hugging_face_model_is_exported_with_save_pretrained(tmp_path):
    from tiny_lm import CORPUS, tiny_gpt2, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    ids = torch.tensor(tiny_tokenizer()(" ".join(CORPUS))["input_ids"][: 16 * 12]).view(12, 16)
    callback = StabilityCallback([], window=2, every_n_steps=2, console=False)
    _, trained = fit(
        tmp_path, [callback], max_steps=4, model=WrappedGPT2(), data=(DataLoader(TensorDataset(ids), 4),)
    )
    path = callback.best_model_path
    assert {"config.json", "model.safetensors"} <= {p.name for p in path.iterdir()}
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        assert not any(name.startswith("lm.") for name in handle.keys())  # the model, not the wrapper
    # load_best gives a bare model and the wrapper the same (averaged) weights.
    bare, whole = tiny_gpt2(1), WrappedGPT2()
    callback.load_best(bare)
    callback.load_best(whole)
    for name, value in reloaded.state_dict().items():
        assert torch.equal(bare.state_dict()[name], value) and torch.equal(whole.lm.state_dict()[name], value)
    assert not torch.equal(reloaded.transformer.wte.weight, trained.lm.transformer.wte.weight)


# ------------------------------------------------------------------------------------- bad input


def test_bad_settings_raise_at_construction():
    with pytest.raises(ValueError, match="window"):
        StabilityCallback([], window=0)
    with pytest.raises(TypeError, match=r"'windw'.*window"):
        StabilityCallback([], windw=3)
    x, y = make_data(1)
    with pytest.raises(ValueError, match="select_metric"):
        StabilityCallback([classify_task(x, y)], select_metric="nope")
    with pytest.raises(ValueError, match="model_attribute"):
        StabilityCallback([], model_attribute="")


def test_the_callback_twice_is_refused(tmp_path):
    # Lightning itself refuses two stateful callbacks with one state key, at construction.
    with pytest.raises(RuntimeError, match="more than one stateful callback"):
        Trainer(callbacks=[StabilityCallback([]), StabilityCallback([])], logger=False)
    # Added behind Lightning's back, the callback says so when fit sets up.
    trainer = Trainer(callbacks=[StabilityCallback([])], logger=False, max_steps=2, enable_progress_bar=False)
    trainer.callbacks.append(StabilityCallback([]))
    with pytest.raises(ValueError, match="added 2 times"):
        trainer.fit(Classifier(), loaders()[0])


def test_every_n_steps_beyond_the_run_warns_at_start(tmp_path):
    with pytest.warns(UserWarning, match=r"every_n_steps=50.*ends at optimizer step 12.*no snapshot"):
        fit(tmp_path, [StabilityCallback([], every_n_steps=50, console=False)])


def test_unwritable_directory_warns_at_start_and_training_goes_on(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    callback = StabilityCallback([], every_n_steps=4, dirpath=blocker / "run", console=False)
    with pytest.warns(UserWarning, match=r"cannot use the run directory .*a-file/run.*NotADirectoryError"):
        trainer, _ = fit(tmp_path, [callback])
    assert trainer.global_step == 12
    strict = StabilityCallback([], every_n_steps=4, dirpath=blocker / "run", on_error="raise", console=False)
    model = Classifier()
    with pytest.raises(RuntimeError, match=r"cannot use the run directory.*on_error='raise'"):
        fit(tmp_path, [strict], model=model)
    assert model.after_steps == []


def test_a_fresh_fit_into_a_used_directory_is_refused_and_the_old_files_stay_byte_identical(tmp_path):
    fit(tmp_path, [StabilityCallback([], every_n_steps=3, console=False)], max_steps=6)
    run = tmp_path / "stability"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "lock.json"}
    assert any(p.parent.name == "exports" or "exports" in p.parts for p in before)
    steps = []

    class Steps(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            steps.append(trainer.global_step)

    with pytest.raises(ExistingRunError, match=r"holds another run's results .*overwrite=True"):
        fit(tmp_path, [StabilityCallback([], every_n_steps=3, console=False), Steps()], max_steps=6)
    assert steps == []  # stopped before the first training step
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "lock.json"}
    assert after == before

    # overwrite=True replaces the earlier run: one export, of the new run's final window.
    fit(tmp_path, [StabilityCallback([], every_n_steps=3, console=False, overwrite=True)], max_steps=9)
    assert read_best(run)["step"] == 9
    assert [p.name for p in (run / "exports").iterdir()] == ["step-00000009-avg"]


def test_checkpoint_state_is_checked():
    callback = StabilityCallback([])
    callback.load_state_dict({})  # written before the monitor existed: nothing to restore
    assert callback.state_dict() == {}
    for bad in ({"dirpath": 3}, {"last_step": 4}, ["dirpath"]):
        with pytest.raises(ValueError, match="not one this version wrote"):
            callback.load_state_dict(bad)


# ----------------------------------------------------------------------------- import and DDP


def test_importing_the_package_does_not_import_lightning():
    code = "import sys, checkpoint_stability; assert 'lightning' not in sys.modules, 'lightning imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    # (This module imported the callback from checkpoint_stability.callbacks.lightning at the top.)
    assert StabilityCallback.__module__ == "checkpoint_stability.callbacks.lightning"


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """Both DDP runs (on_error "warn", then "raise") in one launch: importing Lightning is the slow part.

    Lightning's DDP launcher re-executes sys.argv for rank 1, so the script runs outside pytest; the
    subprocess timeout is the proof that no rank is left waiting.
    """
    out = tmp_path_factory.mktemp("ddp")
    command = [sys.executable, str(SCRIPTS / "lightning_ddp.py"), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    if done.returncode != 0:
        pytest.fail(
            f"the DDP script failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        )
    return out


def test_ddp_rank_zero_writes_every_rank_agrees_and_a_failing_task_is_skipped(ddp_runs):
    out = ddp_runs / "warn"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert "error" not in ranks[0] and "error" not in ranks[1]
    assert ranks[0]["records"] == ranks[1]["records"]
    assert sorted(ranks[0]["records"], key=int) == ["2", "4", "6"]
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["global_step"] == 6
    run_dir = out / "run"
    records = history(run_dir)
    got = {(r["step"], r["task"], r["variant"]): r["score"] for r in records}
    for step, step_records in ranks[0]["records"].items():
        assert {(r["step"], r["task"], r["variant"]): r["score"] for r in step_records} == {
            k: v for k, v in got.items() if k[0] == int(step)
        }
    # The raw score is the accuracy of the full evaluation set, gathered from both ranks' halves.
    for step, accuracy_oracle in ranks[0]["raw_oracle"].items():
        assert got[(int(step), "cls", "raw")] == pytest.approx(accuracy_oracle, abs=1e-12)
    errors = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    errors = [e for e in errors if "error" in e]
    assert {e["task"] for e in errors} == {"flaky"} and len(errors) == 6  # raw and avg at 3 snapshots
    assert sorted(p.name for p in (run_dir / "buffer").glob("*.safetensors")) == [
        "step-00000004.safetensors",
        "step-00000006.safetensors",
    ]
    csv_rows = read_csv(next(out.rglob("metrics.csv")))
    assert sorted(int(r["step"]) for r in csv_rows if r.get("stability/cls/raw/score")) == [2, 4, 6]


def test_ddp_on_error_raise_stops_every_rank_without_a_hang(ddp_runs):
    ranks = [json.loads((ddp_runs / "raise" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert "rank 1 broke" in ranks[1]["error"]
    assert "flaky" in ranks[0]["error"] and "another rank" in ranks[0]["error"]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 2


def test_a_run_killed_with_sigkill_resumes_cleanly_from_its_last_checkpoint(tmp_path):
    script = Path(__file__).parent / "scripts" / "lightning_killed.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, timeout=300)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    run_dir = tmp_path / "first" / "stability"
    assert max(r["step"] for r in history(run_dir)) == 10  # the abandoned trajectory reached step 10

    x, y = make_data(1)
    resumed = StabilityCallback([classify_task(x, y)], window=3, every_n_steps=2, console=False)
    (checkpoint,) = (tmp_path / "ckpts").glob("*step=8.ckpt")
    trainer, _ = fit(tmp_path / "second", [resumed], max_steps=16, ckpt_path=str(checkpoint))
    assert trainer.global_step == 16 and resumed.monitor.dirpath == run_dir

    records = history(run_dir)
    assert max(Counter((r["step"], r["task"], r["variant"], r["window"]) for r in records).values()) == 1
    assert sorted({r["step"] for r in records}) == [2, 4, 6, 8, 10, 12, 14, 16]
    manifest = json.loads((run_dir / "buffer" / "manifest.json").read_text())
    stored = buffer_files(run_dir)
    assert [e["step"] for e in manifest["snapshots"]] == sorted(stored) == [12, 14, 16]
    assert sorted(p.name for p in (run_dir / "buffer").iterdir()) == sorted(
        ["manifest.json", *(f"step-{s:08d}.safetensors" for s in (12, 14, 16))]
    )
    # The average the monitor holds is the float64 mean of what the buffer holds.
    oracle = float64_mean([stored[s] for s in (12, 14, 16)])
    averaged = resumed.monitor.average.mean()
    assert set(oracle) <= set(averaged)
    for name, value in oracle.items():
        torch.testing.assert_close(averaged[name].double(), value.double(), rtol=0, atol=1e-6)


def test_the_best_run_beside_the_logger_changes_exactly_when_best_json_does(tmp_path):
    seen: dict[int, dict] = {}

    class BestPointers(Callback):  # after the stability callback in the list: it sees each snapshot's pointer
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            path = tmp_path / "stability" / "best.json"
            if path.exists():
                seen[trainer.global_step] = json.loads(path.read_text())

    tb = TensorBoardLogger(tmp_path / "logs", name="tb")
    x, y = make_data(3)
    callback = StabilityCallback([classify_task(x, y)], window=2, every_n_steps=2, console=False)
    fit(tmp_path, [callback, BestPointers()], logger=tb, max_steps=24)
    steps = sorted(seen)

    # best.json's evidence is rewritten at every snapshot; the model changes with its identity.
    def model(pointer):
        return pointer["step"], pointer["variant"], pointer["path"]

    changes = [s for i, s in enumerate(steps) if i == 0 or model(seen[s]) != model(seen[steps[i - 1]])]
    assert len(changes) >= 2 and len(steps) > len(changes)
    runs = read_runs(Path(tb.log_dir), prefix="stability/")
    assert [s for s, _ in runs["best"]["stability/best/step"]] == changes
    assert [v for _, v in runs["best"]["stability/best/step"]] == [seen[s]["step"] for s in changes]
    assert_runs_match(
        runs,
        expected_runs(history(tmp_path / "stability"), window=2, drift=drift_lines(tmp_path / "stability")),
    )
