"""WandbSink and the selected best model: summary fields, step-axis scalars, the final export as a
model artifact. A real offline W&B run, read back from its own files (see test_wandb_sink.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")

from test_wandb_sink import offline_run, read_offline_run, records_at  # noqa: E402

from checkpoint_stability.sinks.wandb import WandbSink  # noqa: E402

BEST_FIELDS = ("step", "variant", "steps", "score", "path")


def best_at(step: int, variant: str, score: float | None = 0.5) -> dict:
    """A best.json as the selection writes it (checkpoint_stability/selection.py)."""
    path = None if variant == "ens" else f"exports/step-{step:08d}-{variant}"
    return {
        "path": path,
        "step": step,
        "variant": variant,
        "window": 1 if variant == "raw" else 3,
        "steps": [step] if variant == "raw" else [step - 10, step - 5, step],
        "score": score,
        "select": "best",
        "metric": "score",
        "mode": "max",
        "scores": {"mean": score, "a": score},
    }


def export_dir(run_dir: Path, best: dict) -> Path:
    """An exported model directory with distinct bytes per best (a save_pretrained-like layout)."""
    directory = run_dir / best["path"]
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(os.urandom(4096) + str(best["step"]).encode())
    (directory / "config.json").write_text(json.dumps({"step": best["step"]}))
    return directory


def model_artifacts(back) -> list:
    return [artifact for artifact in back.artifacts if artifact.type == "model"]


def test_each_best_sets_the_summary_and_is_logged_on_the_step_axis(tmp_path, monkeypatch):
    run = offline_run(tmp_path, monkeypatch)
    sink = WandbSink(run, task_names=["a"])
    bests = {10: best_at(10, "raw", 0.41), 20: best_at(20, "avg", 0.52), 30: best_at(30, "ens", 0.6)}
    for step in (10, 20, 30, 40):
        sink.write(step, records_at(step))
        if step in bests:
            export = None if bests[step]["path"] is None else export_dir(tmp_path / "run", bests[step])
            sink.best_changed(step, bests[step], export)
    sink.close()
    run.finish()
    back = read_offline_run(tmp_path)

    for field in BEST_FIELDS:
        assert back.summary[f"stability/best/{field}"] == bests[30][field], field
    for key, field in (("stability/best/step", "step"), ("stability/best/score", "score")):
        assert back.metrics[key] == {"step_metric": "trainer/global_step", "summary": ["last"]}, key
        logged = [(row["trainer/global_step"], row[key]) for row in back.rows_with(key)]
        assert logged == [(step, best[field]) for step, best in bests.items()], key


def test_a_resumed_best_without_a_score_sets_the_summary_and_logs_only_its_step(tmp_path, monkeypatch):
    run = offline_run(tmp_path, monkeypatch)
    sink = WandbSink(run)
    best = best_at(15, "raw", score=None)  # a run without tasks exports its latest model
    sink.best_changed(15, best, export_dir(tmp_path / "run", best))  # before any write: a resume
    sink.close()
    run.finish()
    back = read_offline_run(tmp_path)

    assert {f: back.summary[f"stability/best/{f}"] for f in BEST_FIELDS} == {f: best[f] for f in BEST_FIELDS}
    assert [row["trainer/global_step"] for row in back.rows_with("stability/best/step")] == [15]
    assert back.rows_with("stability/best/score") == []


def test_the_final_best_export_is_logged_once_as_a_model_artifact(tmp_path, monkeypatch):
    run = offline_run(tmp_path, monkeypatch)
    sink = WandbSink(run, task_names=["a"])
    first, final = best_at(10, "raw", 0.41), best_at(20, "avg", 0.52)
    sink.write(10, records_at(10))
    sink.best_changed(10, first, export_dir(tmp_path / "run", first))
    sink.write(20, records_at(20))
    export = export_dir(tmp_path / "run", final)
    shutil.rmtree(tmp_path / "run" / first["path"])  # the selection drops a superseded export
    sink.best_changed(20, final, export)
    sink.run_ended()
    sink.close()
    run.finish()
    back = read_offline_run(tmp_path)

    # Only the final best: an intermediate one may be multi-GB and is superseded anyway.
    [artifact] = model_artifacts(back)
    assert artifact.name == f"{run.id}-stability-best"
    assert set(artifact.aliases) == {"best", "step-20", "latest"}
    assert json.loads(artifact.metadata) == final
    expected = {path.name: path.read_bytes() for path in export.iterdir()}
    contents = {entry.path: entry for entry in artifact.manifest.contents}
    assert set(contents) == set(expected)
    for name, data in expected.items():
        entry = contents[name]
        assert entry.size == len(data)
        assert base64.b64decode(entry.digest) == hashlib.md5(data).digest()
        # An offline run keeps its own copy of each file, for the later `wandb sync`.
        assert Path(entry.local_path).read_bytes() == data


def test_an_ensemble_best_or_a_vanished_export_logs_no_artifact(tmp_path, monkeypatch, caplog):
    run = offline_run(tmp_path / "first", monkeypatch)
    sink = WandbSink(run)
    raw = best_at(10, "raw")
    sink.best_changed(10, raw, export_dir(tmp_path / "first" / "run", raw))
    sink.best_changed(20, best_at(20, "ens"), None)  # an ensemble has no weights to upload
    assert sink.run_ended() is None
    sink.close()
    run.finish()
    assert model_artifacts(read_offline_run(tmp_path / "first")) == []

    run = offline_run(tmp_path / "second", monkeypatch)
    sink = WandbSink(run)
    avg = best_at(30, "avg")
    export = export_dir(tmp_path / "second" / "run", avg)
    sink.best_changed(30, avg, export)
    shutil.rmtree(export)
    assert sink.run_ended() is None
    assert "no longer exists" in caplog.text
    sink.close()
    run.finish()
    assert model_artifacts(read_offline_run(tmp_path / "second")) == []


def test_the_artifact_name_keeps_only_the_characters_wandb_allows(tmp_path, monkeypatch):
    run = offline_run(tmp_path, monkeypatch, name="lr 3e-4/ablation #2")
    sink = WandbSink(run)
    best = best_at(10, "raw")
    sink.best_changed(10, best, export_dir(tmp_path / "run", best))
    sink.run_ended()
    sink.close()
    run.finish()
    [artifact] = model_artifacts(read_offline_run(tmp_path))
    assert artifact.name == "lr-3e-4-ablation-2-stability-best"
