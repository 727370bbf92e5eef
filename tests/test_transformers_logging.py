"""Where the Hugging Face adapter logs, with a real ``transformers.Trainer`` on a tiny random GPT-2.

Every value is read back with the destination's own reader (TensorBoard's ``EventAccumulator`` and
event-file loader, the offline W&B run log through :func:`test_wandb_sink.read_offline_run`) and compared
with ``history.jsonl`` parsed here, line by line; the steps are listed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util
from tensorboard_runs import assert_runs_match, drift_lines, expected_runs, read_runs
from tiny_lm import tiny_gpt2, token_blocks
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from checkpoint_stability import NextTokenTask
from checkpoint_stability.callbacks.transformers import StabilityCallback
from checkpoint_stability.sinks.base import scalar_items

VARIANTS = ("raw", "avg", "ens")
BLOCK = 16


def blocks(start: int, count: int) -> list[dict]:
    return token_blocks(start, count, BLOCK)


TRAIN = blocks(0, 48)
# The same examples in another order: a resumed run on it leaves the abandoned trajectory after step 4.
TRAIN_REORDERED = TRAIN[::-1]
EVAL = blocks(48, 8)
EVAL_A = blocks(48, 4)
EVAL_B = blocks(52, 4)
LAYOUT_TAG = "custom_scalars__config__"


def arguments(output_dir: Path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=6,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=100,
        seed=0,
        data_seed=0,
        # Large enough that scores, MTV and IS move from snapshot to snapshot in a few steps.
        learning_rate=0.1,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def train(
    output_dir: Path, callbacks=(), *, resume=None, train_dataset=TRAIN, eval_dataset=EVAL, **overrides
) -> Trainer:
    trainer = Trainer(
        model=tiny_gpt2(0),
        args=arguments(output_dir, **overrides),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def stability(**settings) -> StabilityCallback:
    return StabilityCallback(**{"window": 2, "every_n_steps": 2, "console": False, **settings})


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def history_file(run_dir: Path) -> list[dict]:
    """The records of ``history.jsonl`` (error lines skipped), parsed here rather than by the library."""
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "variant" in row and "error" not in row]


def expected_scalars(rows: list[dict]) -> dict[int, dict[str, float]]:
    """{step: {logged name: value}} of history rows."""
    return {
        step: scalar_items([r for r in rows if r["step"] == step])
        for step in sorted({r["step"] for r in rows})
    }


def accumulated(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events


def raw_events(log_dir: Path) -> list[tuple[str, event_pb2.Event]]:
    """Every event of every event file in ``log_dir``, in file order, with no purging applied."""
    out = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        out.extend((path.name, event) for event in event_file_loader.EventFileLoader(str(path)).Load())
    return out


def event_files(root: Path) -> list[Path]:
    return sorted(root.rglob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------------- W&B


def test_wandb_offline_run_gets_the_stability_keys_on_the_trainer_axis(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from test_wandb_sink import _records as wandb_records
    from test_wandb_sink import read_offline_run
    from wandb.proto import wandb_internal_pb2

    from checkpoint_stability.sinks.wandb import chart_key

    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_PROJECT", "stability-tests")
    monkeypatch.setenv("WANDB_SILENT", "true")
    output = tmp_path / "out"
    callback = stability()
    # wandb reads WANDB_DIR when its service starts, once per process: start a fresh one.
    wandb.teardown()
    try:
        # transformers' WandbCallback (report_to) starts the run in on_train_begin, before ours runs.
        train(output, [callback], report_to=["wandb"])
        assert wandb.run is not None, "the Trainer's WandbCallback should leave its run open"
    finally:
        wandb.finish()
        # finish() can return before the service has written the offline run log out (seen: a file of
        # only its 7-byte header); stopping the service waits for it.
        wandb.teardown()
    [log] = wandb_dir.rglob("offline-run-*/run-*.wandb")
    last = wandb_internal_pb2.Record.FromString(list(wandb_records(log))[-1])
    assert last.WhichOneof("record_type") == "exit", "the offline run log is incomplete"
    back = read_offline_run(wandb_dir)

    rows = history_file(output / "stability")
    want = expected_scalars(rows)
    assert sorted(want) == [2, 4, 6]
    assert {r["task"] for r in rows} == {"validation", "mean"}
    assert {r["variant"] for r in rows} == set(VARIANTS)
    # The oracle is the history file; the callback's in-memory history says the same.
    assert want == expected_scalars(callback.monitor.history.records())

    # One W&B row per snapshot, carrying the Trainer's step axis, with exactly that step's values.
    logged = [row for row in back.history if any(k in row for k in want[2])]
    assert [row["train/global_step"] for row in logged] == [2, 4, 6]
    for row in logged:
        step = row["train/global_step"]
        got = {k: v for k, v in row.items() if k.startswith("stability/") and not k.endswith("_table")}
        assert got.keys() == want[step].keys(), step
        assert got == pytest.approx(want[step], rel=1e-12), step
    # The Trainer's own rows are on the same axis (its end-of-training log, train/epoch, at step 6).
    assert [row["train/global_step"] for row in back.rows_with("train/epoch")] == [6]
    # MTV and IS need two evaluations: absent at step 2, there from step 4.
    assert "stability/validation/raw/mtv" not in logged[0] and "stability/validation/raw/is" in logged[1]

    # Every stability key is declared on the Trainer's axis, best value kept in the summary.
    summaries = {"score": ["max"], "mtv": ["min"], "is": ["min"]}
    for task in ("mean", "validation"):
        for variant in VARIANTS:
            for metric, summary in summaries.items():
                key = f"stability/{task}/{variant}/{metric}"
                assert back.metrics[key] == {"step_metric": "train/global_step", "summary": summary}, key
    for key in want[2]:
        if key.endswith("/score"):
            best = max(items[key] for items in want.values())
            assert back.summary[key] == {"max": pytest.approx(best)}, key

    # One raw/avg/ens line chart per task ("mean" first), logged at the first snapshot and at the end.
    for task in ("mean", "validation"):
        key = chart_key(task)
        assert [row["train/global_step"] for row in back.history if f"{key}_table" in row] == [2, 6], key
        tables = back.tables(key)
        assert len(tables) == 2
        assert tables[-1]["columns"] == ["step", "lineKey", "lineVal"]
        expected = [
            [r["step"], variant, r["score"]]
            for variant in VARIANTS
            for r in sorted(rows, key=lambda r: r["step"])
            if r["task"] == task and r["variant"] == variant
        ]
        assert tables[-1]["data"] == expected
        assert [row[0] for row in tables[0]["data"]] == [2, 2, 2]

    # report_to has no "tensorboard": no TensorBoard run anywhere, neither beside the Trainer's nor ours.
    assert event_files(tmp_path) == []
    assert not (output / "runs").exists()
    assert not (output / "stability" / "tensorboard").exists()


# ---------------------------------------------------------------------------------------- TensorBoard


class WeightsAt(TrainerCallback):
    """Copies of the model's weights at the given optimizer steps (after the optimizer step)."""

    def __init__(self, *steps: int):
        self.steps = steps
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def scalar_points(events: list[tuple[str, event_pb2.Event]], tag: str) -> list[tuple[str, int, float]]:
    return [
        (name, event.step, float(tensor_util.make_ndarray(value.tensor).item()))
        for name, event in events
        for value in event.summary.value
        if value.tag == tag
    ]


def assert_same_weights(stored: dict, aliases: dict, live: dict) -> None:
    """A safetensors file (tied tensors stored once, ``aliases`` naming the others) holds ``live``."""
    assert stored.keys() | aliases.keys() == live.keys()
    for key in live:
        assert torch.equal(stored[aliases.get(key, key)], live[key]), key


def test_resume_purges_the_abandoned_points_from_tensorboard(tmp_path):
    output = tmp_path / "out"
    log_dir = output / "runs" / "stability"
    common = dict(max_steps=8, save_strategy="steps", save_steps=4, report_to=["tensorboard"])
    # select="raw": the best export is the live model of one step, whose weights are captured here.
    first, first_weights = stability(select="raw"), WeightsAt(2, 4, 6)
    train(output, [first, first_weights, StopAt(6)], **common)
    abandoned = expected_scalars(history_file(output / "stability"))
    assert sorted(abandoned) == [2, 4, 6]
    assert [p.name for p in output.glob("checkpoint-*")] == ["checkpoint-4"]
    # The abandoned trajectory holds the best so far, so the resume has to drop it.
    assert json.loads((output / "stability" / "best.json").read_text())["step"] == 6

    second, weights = stability(select="raw"), WeightsAt(6, 8)
    trainer = train(
        output,
        [second, weights],
        resume=str(output / "checkpoint-4"),
        train_dataset=TRAIN_REORDERED,
        **common,
    )
    kept_weights = {2: first_weights.weights[2], 4: first_weights.weights[4], **weights.weights}
    rows = history_file(output / "stability")
    kept = expected_scalars(rows)
    assert sorted(kept) == [2, 4, 6, 8]
    # Steps up to the checkpoint are kept as they were; 6 is the resumed trajectory's, logged once.
    assert kept[2] == abandoned[2] and kept[4] == abandoned[4]
    keys = [(r["step"], r["task"], r["variant"], r["window"]) for r in rows]
    assert len(keys) == len(set(keys)) == 4 * 2 * len(VARIANTS)
    assert kept == expected_scalars(second.monitor.history.records())
    examples = [json.loads(line) for line in (output / "stability" / "examples" / "validation.jsonl").open()]
    example_keys = [(e["step"], e["variant"], e["window"]) for e in examples]
    assert len(example_keys) == len(set(example_keys)) and {s for s, _, _ in example_keys} == {2, 4, 6, 8}

    # On disk both trajectories are still there, in every variant's run: the abandoned step-6 points,
    # then a purge marker at 5 (the first run's marker at 1 hides points of any earlier run that
    # started over in this directory).
    changed = []
    for variant in VARIANTS:
        events = raw_events(log_dir / variant)
        files = sorted({name for name, _ in events})
        assert len(files) == 2
        starts = [(name, e.step) for name, e in events if e.session_log.status == event_pb2.SessionLog.START]
        assert starts == [(files[0], 1), (files[1], 5)]
        for name in kept[6]:
            _, task, of_variant, metric = name.split("/")
            if of_variant != variant:
                continue
            points = scalar_points(events, f"stability/{task}/{metric}")
            assert [(f, s) for f, s, _ in points if s == 6] == [(files[0], 6), (files[1], 6)], name
            old, new = (v for _, s, v in points if s == 6)
            assert old == pytest.approx(abandoned[6][name], rel=1e-6, abs=1e-7)
            if old != pytest.approx(new, rel=1e-6, abs=1e-7):
                changed.append(name)
    assert changed, "the resumed trajectory should differ from the abandoned one at step 6"

    # TensorBoard's reader applies the purge: one point per step in every run, the kept values.
    shown = read_runs(log_dir)
    assert_runs_match(shown, expected_runs(rows, window=2, drift=drift_lines(output / "stability")))
    best_steps = [step for step, _ in shown["best"]["stability/best/step"]]
    assert len(best_steps) == len(set(best_steps))  # the abandoned best at 6 was purged with it

    # The window on disk is the resumed trajectory's: steps 6 and 8, their weights, intact files.
    buffer = output / "stability" / "buffer"
    manifest = json.loads((buffer / "manifest.json").read_text())
    assert [s["step"] for s in manifest["snapshots"]] == [6, 8]
    assert sorted(p.name for p in buffer.glob("*.safetensors")) == [
        "step-00000006.safetensors",
        "step-00000008.safetensors",
    ]
    final = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    assert all(torch.equal(final[k], v) for k, v in kept_weights[8].items())
    for entry in manifest["snapshots"]:
        path = buffer / entry["file"]
        assert blake3.blake3(path.read_bytes()).hexdigest() == entry["blake3"]
        assert_same_weights(load_file(path), entry.get("aliases", {}), kept_weights[entry["step"]])

    # The best export is one of the kept trajectory: its score is that step's score in the history.
    best = json.loads((output / "stability" / "best.json").read_text())
    assert best["step"] in (2, 4, 6, 8)
    match = [
        r
        for r in rows
        if (r["step"], r["task"], r["variant"], r["window"])
        == (best["step"], "mean", best["variant"], best["window"])
    ]
    assert len(match) == 1 and best["score"] == match[0]["score"]
    assert [p.name for p in (output / "stability" / "exports").iterdir()] == [Path(best["path"]).name]
    # A Hugging Face model is exported as a save_pretrained directory: read it back with transformers.
    exported = AutoModelForCausalLM.from_pretrained(output / "stability" / best["path"]).state_dict()
    assert exported.keys() == kept_weights[best["step"]].keys()
    for key, tensor in exported.items():
        assert torch.equal(tensor, kept_weights[best["step"]][key]), key


def stability_runs(root: Path) -> list[Path]:
    """The folders under ``root`` holding the stability variant runs (``raw``, ``avg``, ``ens``, ...)."""
    return sorted(
        {
            folder.parent
            for folder in {path.parent for path in event_files(root)}
            if any(t.startswith("stability/") for t in accumulated(folder).Tags()["scalars"])
        }
    )


@pytest.mark.parametrize("spelling", ["absolute", "home"])
def test_tensorboard_logging_dir_from_the_environment(tmp_path, monkeypatch, spelling):
    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    log_dir = home / "tb"
    # transformers expands "~" in the variable (os.path.expanduser): the stability run must follow it.
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(log_dir) if spelling == "absolute" else "~/tb")
    output = tmp_path / "out"
    callback = stability()
    train(output, [callback], max_steps=4, report_to=["tensorboard"], logging_steps=1)

    want = expected_scalars(history_file(output / "stability"))
    assert sorted(want) == [2, 4]
    # The Trainer's own TensorBoardCallback honours the variable too: its loss curve is there.
    assert [e.step for e in accumulated(log_dir).Scalars("train/loss")] == [1, 2, 3, 4]
    # The stability run is a run of its own inside it.
    [run] = stability_runs(tmp_path)
    assert run == log_dir / "stability"
    assert_runs_match(
        read_runs(run),
        expected_runs(history_file(output / "stability"), window=2, drift=drift_lines(output / "stability")),
    )
    # Nothing under the default places, nor in a literal "~" folder.
    assert not (output / "runs").exists()
    assert not (output / "stability" / "tensorboard").exists()
    assert list(elsewhere.iterdir()) == []
    assert all(log_dir in path.parents for path in event_files(tmp_path))

    # The custom-scalars layout, in the raw run: one task, so no "mean" charts; one chart per metric
    # whose tag regex each variant run holds.
    [layout_event] = accumulated(run / "raw").Tensors(LAYOUT_TAG)
    layout = layout_pb2.Layout.FromString(layout_event.tensor_proto.string_val[0])
    got = {
        category.title: {chart.title: list(chart.multiline.tag) for chart in category.chart}
        for category in layout.category
    }
    assert list(got) == ["stability: validation", "stability: weight drift"]
    assert got["stability: validation"]["score (raw, avg, ens)"] == ["^stability/validation/score$"]
    assert got["stability: validation"]["IS / raw's (avg, ens)"] == ["^stability/validation/is_ratio$"]


def test_resume_in_a_shared_tensorboard_logging_dir_keeps_the_trainers_own_points(tmp_path, monkeypatch):
    """With $TENSORBOARD_LOGGING_DIR the Trainer's TensorBoardCallback writes there too. The purge that
    hides the abandoned stability points must not hide the points the resumed Trainer logs itself."""
    log_dir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(log_dir))
    output = tmp_path / "out"
    common = dict(
        max_steps=8, save_strategy="steps", save_steps=4, report_to=["tensorboard"], logging_steps=1
    )
    train(output, [stability(), StopAt(6)], **common)
    resumed = train(
        output, [stability()], resume=str(output / "checkpoint-4"), train_dataset=TRAIN_REORDERED, **common
    )
    resumed_loss = {e["step"]: e["loss"] for e in resumed.state.log_history if "loss" in e and e["step"] > 4}
    assert sorted(resumed_loss) == [5, 6, 7, 8]

    # The stability run (wherever under $TENSORBOARD_LOGGING_DIR) shows the kept trajectory only.
    [run] = stability_runs(log_dir)
    assert_runs_match(
        read_runs(run),
        expected_runs(history_file(output / "stability"), window=2, drift=drift_lines(output / "stability")),
    )

    # The Trainer's own loss curve still shows what the resumed run logged at steps 5 to 8.
    shown = [(e.step, e.value) for e in accumulated(log_dir).Scalars("train/loss")]
    for step, loss in resumed_loss.items():
        assert any(s == step and v == pytest.approx(loss, rel=1e-6) for s, v in shown), (step, shown)


# ------------------------------------------------------------------------------- several eval datasets


class EvaluationMetrics(TrainerCallback):
    """The metrics every evaluation ended with (after the callbacks before this one added theirs)."""

    def __init__(self):
        self.seen: list[tuple[int, dict]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.seen.append((state.global_step, dict(metrics)))


def test_one_task_per_eval_dataset_and_best_model_on_their_mean(tmp_path):
    output = tmp_path / "out"
    callback, captured = stability(), EvaluationMetrics()
    trainer = train(
        output,
        [callback, captured],
        eval_dataset={"a": EVAL_A, "b": EVAL_B},
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="stability/mean/avg/score",
    )
    assert [t.name for t in callback.monitor.tasks] == ["a", "b"]
    assert all(isinstance(t, NextTokenTask) for t in callback.monitor.tasks)

    rows = history_file(output / "stability")
    want = expected_scalars(rows)
    assert sorted(want) == [2, 4, 6]
    assert {r["task"] for r in rows} == {"a", "b", "mean"}
    for step, items in want.items():
        for variant in VARIANTS:
            a, b = (items[f"stability/{t}/{variant}/score"] for t in ("a", "b"))
            assert items[f"stability/mean/{variant}/score"] == pytest.approx((a + b) / 2), (step, variant)

    # Each dataset is evaluated on its own (eval_a_*, eval_b_*); both see the snapshot of their step.
    assert [step for step, _ in captured.seen] == [2, 2, 4, 4, 6, 6]
    for (step, metrics), dataset in zip(captured.seen, "ababab", strict=True):
        assert f"eval_{dataset}_loss" in metrics
        stability_metrics = {
            k[len("eval_") :]: v for k, v in metrics.items() if k.startswith("eval_stability/")
        }
        assert stability_metrics == pytest.approx(want[step]), step
        for name in ("a/raw/score", "b/raw/score", "mean/avg/score", "a/ens/score", "b/avg/score"):
            assert f"eval_stability/{name}" in metrics

    mean_avg = {step: items["stability/mean/avg/score"] for step, items in want.items()}
    best_step = max(mean_avg, key=lambda step: (mean_avg[step], -step))  # the Trainer keeps the first best
    assert trainer.state.best_metric == pytest.approx(max(mean_avg.values()))
    assert Path(trainer.state.best_model_checkpoint).name == f"checkpoint-{best_step}"


def test_a_run_starting_over_in_the_same_directory_hides_the_earlier_runs_points(tmp_path):
    # No checkpoint to resume from: with overwrite=True the second run replaces the history, and its
    # TensorBoard run must not show the first run's points beside its own.
    train(tmp_path, [stability()], report_to=["tensorboard"], max_steps=4)
    second = stability(overwrite=True)
    train(tmp_path, [second], report_to=["tensorboard"], max_steps=4, learning_rate=0.05)
    rows = history_file(tmp_path / "stability")
    assert sorted({r["step"] for r in rows}) == [2, 4]
    assert len(event_files(tmp_path / "runs" / "stability" / "raw")) == 2
    assert_runs_match(
        read_runs(tmp_path / "runs" / "stability"),
        expected_runs(rows, window=2, drift=drift_lines(tmp_path / "stability")),
    )


class BestPointers(TrainerCallback):
    """best.json as it is after each optimizer step (this callback runs after the stability one)."""

    def __init__(self, run: Path):
        self.run, self.seen = run, {}

    def on_step_end(self, args, state, control, **kwargs):
        path = self.run / "best.json"
        if path.exists():
            self.seen[state.global_step] = json.loads(path.read_text())


def test_the_best_run_changes_exactly_when_best_json_does(tmp_path):
    output = tmp_path / "out"
    pointers = BestPointers(output / "stability")
    train(output, [stability(), pointers], max_steps=12, report_to=["tensorboard"])
    steps = sorted(pointers.seen)

    # best.json's evidence is rewritten at every snapshot; the model changes with its identity.
    def model(pointer):
        return pointer["step"], pointer["variant"], pointer["path"]

    seen = pointers.seen
    changes = [s for i, s in enumerate(steps) if i == 0 or model(seen[s]) != model(seen[steps[i - 1]])]
    assert len(changes) >= 2 and len(steps) > len(changes)  # it changed, and at some snapshots it did not
    runs = read_runs(output / "runs" / "stability")
    assert [s for s, _ in runs["best"]["stability/best/step"]] == changes
    assert [v for _, v in runs["best"]["stability/best/step"]] == [pointers.seen[s]["step"] for s in changes]
    assert [v for _, v in runs["best"]["stability/best/score"]] == pytest.approx(
        [pointers.seen[s]["score"] for s in changes], rel=1e-6
    )
    assert_runs_match(
        runs,
        expected_runs(history_file(output / "stability"), window=2, drift=drift_lines(output / "stability")),
    )
