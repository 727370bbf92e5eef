"""WandbSink with a real offline W&B run, read back from the run's own files.

An offline run keeps everything it logged in ``run-<id>.wandb``: a LevelDB-style log of W&B's own
protobuf ``Record`` messages (history rows, summary updates, ``define_metric`` records), and the chart
tables under ``files/media/table/``. wandb ships no reader for it in this version, so
:func:`read_offline_run` walks the log format (7-byte header, 32 KiB blocks, records split into
FULL/FIRST/MIDDLE/LAST chunks) and parses the records with wandb's protobuf classes.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

from checkpoint_stability.sinks.wandb import WandbSink, chart_key  # noqa: E402

VARIANTS = ("raw", "avg", "ens")
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What an offline run recorded: history rows (dicts), define_metric records, the final summary,
    the config (nested as W&B nests it: chart specs sit under ``_wandb.visualize``) and the logged
    artifacts (their ``ArtifactRecord`` messages)."""

    directory: Path
    history: list[dict] = field(default_factory=list)
    metrics: dict[str, dict] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    artifacts: list = field(default_factory=list)

    def rows_with(self, key: str) -> list[dict]:
        return [row for row in self.history if key in row]

    def tables(self, key: str) -> list[dict]:
        """The chart tables logged under ``key``, oldest first (their file names count up)."""
        folder = self.directory / "files" / "media" / "table" / Path(key).parent
        stem = Path(key).name + "_table_"
        files = sorted(
            folder.glob(f"{stem}*.table.json"), key=lambda p: int(p.name[len(stem) :].split("_")[0])
        )
        return [json.loads(path.read_text()) for path in files]


def _set_nested(target: dict, keys: list[str], value) -> None:
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = value


def _items(items) -> dict:
    out: dict = {}
    for item in items:
        keys = list(item.nested_key) or [item.key]
        _set_nested(out, keys, json.loads(item.value_json))
    return out


def _flatten(value: dict, prefix: str = "") -> dict:
    """W&B nests keys on '/': put ``stability/a/raw/score`` back together (leaves only)."""
    out = {}
    for key, inner in value.items():
        name = f"{prefix}{key}"
        if isinstance(inner, dict) and not ({"max", "min", "_type"} & set(inner)):
            out.update(_flatten(inner, f"{name}/"))
        else:
            out[name] = inner
    return out


def _records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run log"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < 7:
            position += left  # a block's tail too short for a header is padding
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def _is_exit(raw: bytes) -> bool:
    try:
        return wandb_internal_pb2.Record.FromString(raw).WhichOneof("record_type") == "exit"
    except Exception:  # a record still being written
        return False


def read_offline_run(root: Path) -> OfflineRun:
    """The one offline run under ``root`` (a ``dir=`` given to ``wandb.init``), after it finished."""
    found = sorted(Path(root).rglob("offline-run-*/run-*.wandb"))
    assert len(found) == 1, found
    # finish() can return before W&B's writer has written the log out: wait for its closing record.
    deadline = time.monotonic() + 60
    while True:
        records = list(_records(found[0]))
        if records and _is_exit(records[-1]):
            break
        assert time.monotonic() < deadline, f"{found[0]} has no exit record after 60 s"
        time.sleep(0.1)
    run = OfflineRun(found[0].parent)
    for raw in records:
        record = wandb_internal_pb2.Record.FromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append(_flatten(_items(record.history.item)))
        elif kind == "metric":
            metric = record.metric
            run.metrics[metric.name or metric.glob_name] = {
                "step_metric": metric.step_metric,
                "summary": sorted(
                    name
                    for name in ("min", "max", "mean", "last", "best", "none")
                    if getattr(metric.summary, name)
                ),
            }
        elif kind == "summary":
            for item in record.summary.update:
                _set_nested(run.summary, list(item.nested_key) or [item.key], json.loads(item.value_json))
        elif kind == "config":
            for item in record.config.update:
                _set_nested(run.config, list(item.nested_key) or [item.key], json.loads(item.value_json))
        elif kind == "artifact":
            run.artifacts.append(record.artifact)
    run.summary = _flatten(run.summary)
    return run


def offline_run(tmp_path: Path, monkeypatch, **init):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    # Logged artifacts are staged (copied) under the data directory until a sync: keep them in the test's.
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    return wandb.init(mode="offline", dir=str(tmp_path), project="stability-tests", **init)


def records_at(step: int, tasks=("mean", "a"), with_mtv_is=True) -> list[dict]:
    """Distinct values per (task, variant, step), so a mix-up cannot go unnoticed."""
    out = []
    for t, task in enumerate(tasks):
        for v, variant in enumerate(VARIANTS):
            score = round(0.3 + step / 100 + t / 10 + v / 1000, 6)
            out.append(
                {
                    "step": step,
                    "task": task,
                    "variant": variant,
                    "window": 1 if variant == "raw" else 3,
                    "n_models": 1,
                    "score": score,
                    "mtv": (round(1 / step, 6) + v / 1000) if with_mtv_is else None,
                    "is": (round(2 / step, 6) + t / 100) if with_mtv_is else None,
                    "time": 0.0,
                }
            )
    return out


def test_scalars_on_the_step_axis_with_max_and_min_summaries(tmp_path, monkeypatch):
    run = offline_run(tmp_path, monkeypatch)
    sink = WandbSink(run, task_names=["a"], chart_every=1)
    steps = [10, 20, 30]
    written = {step: records_at(step, with_mtv_is=step > 10) for step in steps}
    for step in steps:
        sink.write(step, written[step])
    sink.close()
    run.finish()
    back = read_offline_run(tmp_path)

    for task in ("mean", "a"):
        for variant in VARIANTS:
            for metric, summary in (("score", ["max"]), ("mtv", ["min"]), ("is", ["min"])):
                key = f"stability/{task}/{variant}/{metric}"
                assert back.metrics[key] == {"step_metric": "trainer/global_step", "summary": summary}, key
                expected = [
                    (step, r[metric])
                    for step in steps
                    for r in written[step]
                    if r["task"] == task and r["variant"] == variant and r[metric] is not None
                ]
                assert [(row["trainer/global_step"], row[key]) for row in back.rows_with(key)] == expected
                best = (max if metric == "score" else min)(value for _, value in expected)
                assert back.summary[key] == {summary[0]: pytest.approx(best)}, key


def test_one_line_series_chart_per_task_with_raw_avg_ens(tmp_path, monkeypatch):
    run = offline_run(tmp_path, monkeypatch)
    sink = WandbSink(run, task_names=["a"], chart_every=2)
    for step in (5, 10, 15, 20):
        sink.write(step, records_at(step))
    sink.close()
    run.finish()
    back = read_offline_run(tmp_path)

    for task in ("mean", "a"):
        key = chart_key(task)
        # Logged at the first write, every second write after, and by close() for the last point.
        charted_at = [row["trainer/global_step"] for row in back.history if f"{key}_table" in row]
        assert charted_at == [5, 15, 20]
        tables = back.tables(key)
        assert len(tables) == 3
        final = tables[-1]
        assert final["columns"] == ["step", "lineKey", "lineVal"]
        expected = [
            [step, r["variant"], r["score"]]
            for variant in VARIANTS
            for step in (5, 10, 15, 20)
            for r in records_at(step)
            if r["task"] == task and r["variant"] == variant
        ]
        assert final["data"] == expected
        assert [row[0] for row in tables[0]["data"]] == [5, 5, 5]


def test_each_chart_is_a_lineseries_spec_coloured_by_variant(tmp_path, monkeypatch):
    run = offline_run(tmp_path, monkeypatch)
    sink = WandbSink(run, step_metric="custom/step", task_names=["a", "b"])
    for step in (5, 10):
        sink.write(step, records_at(step, tasks=("mean", "a", "b")))
    sink.close()
    run.finish()
    back = read_offline_run(tmp_path)

    # W&B keeps a logged chart's spec in the config, under _wandb.visualize.<key>: the preset's id and
    # which table column feeds each of its fields. The lineseries preset draws one line, in its own
    # colour and legend entry, per distinct value of its lineKey field.
    specs = back.config["_wandb"]["visualize"]
    assert set(specs) == {chart_key(task) for task in ("mean", "a", "b")}
    for task in ("mean", "a", "b"):
        key = chart_key(task)
        config = specs[key]["panel_config"]
        assert specs[key]["panel_type"] == "Vega2"
        assert config["panelDefId"] == "wandb/lineseries/v0"
        assert config["fieldSettings"] == {"step": "step", "lineKey": "lineKey", "lineVal": "lineVal"}
        assert config["stringSettings"]["xname"] == "custom/step"
        query = config["userQuery"]["queryFields"][0]["fields"][-1]
        assert query["args"] == [{"name": "tableKey", "value": f"{key}_table"}]
        table = back.tables(key)[-1]
        assert table["columns"] == ["step", "lineKey", "lineVal"]
        assert list(dict.fromkeys(row[1] for row in table["data"])) == list(VARIANTS)


def test_preloaded_history_continues_and_a_resumed_step_replaces_the_abandoned_point(tmp_path, monkeypatch):
    run = offline_run(tmp_path, monkeypatch)
    sink = WandbSink(run, step_metric="custom/step", task_names=["a"])
    earlier = [r for step in (5, 10, 15) for r in records_at(step)]
    sink.preload(earlier)
    resumed = records_at(15)
    for r in resumed:
        r["score"] = 0.0  # the resumed trajectory's step 15, unlike the abandoned one
    sink.write(15, resumed)
    sink.close()
    run.finish()
    back = read_offline_run(tmp_path)

    assert back.metrics["stability/a/raw/score"]["step_metric"] == "custom/step"
    rows = [(row[0], row[1], row[2]) for row in back.tables(chart_key("a"))[-1]["data"]]
    assert [r for r in rows if r[1] == "raw"] == [
        (5, "raw", records_at(5)[3]["score"]),
        (10, "raw", records_at(10)[3]["score"]),
        (15, "raw", 0.0),
    ]
    # Preloading logs nothing: only the one write reached the run.
    assert [row["custom/step"] for row in back.rows_with("stability/a/raw/score")] == [15]


def test_bad_arguments_and_writes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="step_metric"):
        WandbSink(step_metric="")
    with pytest.raises(ValueError, match="chart_every"):
        WandbSink(chart_every=0)
    with pytest.raises(ValueError, match="wandb run"):
        WandbSink(run=object())
    sink = WandbSink(run=None)
    with pytest.raises(ValueError, match="step 7"):
        sink.write(8, records_at(7))
    if wandb.run is None:
        with pytest.raises(RuntimeError, match=r"wandb\.init"):
            sink.write(8, records_at(8))
