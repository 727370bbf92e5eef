"""Sinks: names are exact, and TensorBoard output is checked with TensorBoard's own reader."""

from __future__ import annotations

import io
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata

from checkpoint_stability.sinks import (
    ConsoleSink,
    Sink,
    TensorBoardSink,
    custom_scalars_layout,
    scalar_items,
)

TASKS = ["hellaswag", "arc_easy"]
VARIANTS = ["raw", "avg", "ens"]


def make_records(step: int, *, tasks=("mean", *TASKS), with_mtv_is: bool = True) -> list[dict]:
    """Distinct, step-dependent values so a mix-up of tags or steps cannot go unnoticed."""
    records = []
    for t_idx, task in enumerate(tasks):
        for v_idx, variant in enumerate(VARIANTS):
            base = step / 1000 + t_idx / 10 + v_idx / 100
            records.append(
                {
                    "step": step,
                    "task": task,
                    "variant": variant,
                    "window": 1 if variant == "raw" else 20,
                    "n_models": 1 if variant == "raw" else 5,
                    "score": base,
                    "mtv": base + 0.001 if with_mtv_is else None,
                    "is": base + 0.002 if with_mtv_is else None,
                    "time": 1.5,
                }
            )
    return records


def read_back(log_dir, **kwargs) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0}, **kwargs)
    acc.Reload()
    return acc


def read_layouts(acc: EventAccumulator) -> list[layout_pb2.Layout]:
    # torch's add_custom_scalars stores the serialised Layout proto as the single string of a
    # DT_STRING tensor under this tag; the custom_scalars plugin parses it the same way.
    tag = custom_scalar_metadata.CONFIG_SUMMARY_TAG
    assert tag in acc.PluginTagToContent(custom_scalar_metadata.PLUGIN_NAME)
    return [layout_pb2.Layout.FromString(ev.tensor_proto.string_val[0]) for ev in acc.Tensors(tag)]


def wait_for_next_second() -> None:
    # Event files are read in lexicographic filename order and the name starts with the
    # creation second; two writers in one second would then be ordered by a per-process
    # counter, which sorts wrongly past 9. A real resume is a new process, later in time.
    time.sleep(1.01 - time.time() % 1)


# --- scalar_items / layout ------------------------------------------------------------------


def test_scalar_items_exact_names_order_and_none_skipped():
    records = [
        {"step": 5, "task": "mean", "variant": "ens", "score": 0.3, "mtv": None, "is": 0.03},
        {"step": 5, "task": "mean", "variant": "raw", "score": 0.1, "mtv": None, "is": None},
        {"step": 5, "task": "mean", "variant": "avg", "score": 0.2, "mtv": 0.02, "is": None},
    ]
    items = scalar_items(records)
    assert list(items) == [
        "stability/mean/raw/score",
        "stability/mean/avg/score",
        "stability/mean/avg/mtv",
        "stability/mean/ens/score",
        "stability/mean/ens/is",
    ]
    assert items["stability/mean/avg/mtv"] == 0.02
    assert all(isinstance(v, float) for v in items.values())


def test_scalar_items_rejects_bad_variant_and_duplicates():
    with pytest.raises(ValueError, match="variant"):
        scalar_items([{"task": "mean", "variant": "median", "score": 1.0}])
    dup = {"task": "mean", "variant": "raw", "score": 1.0}
    with pytest.raises(ValueError, match="duplicate"):
        scalar_items([dup, dict(dup)])


def test_custom_scalars_layout_one_chart_per_task_and_metric_over_the_variant_runs():
    layout = custom_scalars_layout(TASKS)
    assert list(layout) == [
        "stability: mean",
        "stability: hellaswag",
        "stability: arc_easy",
        "stability: weight drift",
    ]
    # The drift chart draws both drift tags of the raw run; drift=False leaves it out.
    assert list(layout["stability: weight drift"].values()) == [["Multiline", ["^stability/drift/"]]]
    assert "stability: weight drift" not in custom_scalars_layout(TASKS, drift=False)
    assert list(layout["stability: arc_easy"]) == [
        "score (raw, avg, ens)",
        "MTV (raw, avg, ens)",
        "IS (raw, avg, ens)",
        "MTV / raw's (avg, ens)",
        "IS / raw's (avg, ens)",
    ]
    # A tag regex: the chart draws one line per run holding it (raw, avg, ens).
    assert layout["stability: arc_easy"]["IS (raw, avg, ens)"] == ["Multiline", ["^stability/arc_easy/is$"]]
    # One task: the mean equals it, so it gets no charts of its own.
    assert list(custom_scalars_layout(["hellaswag"], drift=False)) == ["stability: hellaswag"]
    assert list(custom_scalars_layout(["mean", "x"], drift=False)) == ["stability: x"]
    assert custom_scalars_layout(["a.b"])["stability: a.b"]["score (raw, avg, ens)"][1] == [
        "^stability/a\\.b/score$"
    ]
    with pytest.raises(ValueError, match="task_names"):
        custom_scalars_layout("hellaswag")


def test_sinks_satisfy_protocol():
    assert isinstance(ConsoleSink(), Sink)
    assert isinstance(TensorBoardSink("unused", task_names=TASKS), Sink)


# --- TensorBoardSink ------------------------------------------------------------------------


def oracle_runs(records: list[dict]) -> dict[str, dict[str, float]]:
    """The per-variant-run scalars, written out here from the record fields."""
    runs: dict[str, dict[str, float]] = {}
    for r in records:
        tags = runs.setdefault(r["variant"], {})
        for metric in ("score", "mtv", "is"):
            if r[metric] is not None:
                tags[f"stability/{r['task']}/{metric}"] = r[metric]
        if r["variant"] != "raw":
            raw = next(x for x in records if (x["task"], x["variant"]) == (r["task"], "raw"))
            for metric in ("mtv", "is"):
                if r[metric] is not None and raw[metric]:
                    tags[f"stability/{r['task']}/{metric}_ratio"] = r[metric] / raw[metric]
    return runs


def test_tensorboard_one_run_per_variant_read_back_with_event_accumulators(tmp_path):
    log_dir = tmp_path / "tb"
    sink = TensorBoardSink(log_dir, task_names=TASKS)
    assert not log_dir.exists()  # lazy: constructing creates no files

    steps = [100, 200, 300]
    expected: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for step in steps:
        records = make_records(step)
        sink.write(step, records)
        for run, tags in oracle_runs(records).items():
            for tag, value in tags.items():
                expected.setdefault(run, {}).setdefault(tag, []).append((step, value))
    sink.close()

    assert sorted(p.name for p in log_dir.iterdir()) == ["avg", "ens", "raw"]
    for run in VARIANTS:
        acc = read_back(log_dir / run)
        assert set(acc.Tags()["scalars"]) == set(expected[run])
        for tag, points in expected[run].items():
            got = acc.Scalars(tag)
            assert [ev.step for ev in got] == [step for step, _ in points]
            for ev, (_, value) in zip(got, points, strict=True):
                assert ev.value == pytest.approx(value, rel=1e-6, abs=1e-7)  # stored as float32
    assert len(expected["raw"]) == 9 and len(expected["avg"]) == 15  # 3 tasks x (3 metrics + 2 ratios)

    (layout,) = read_layouts(read_back(log_dir / "raw"))  # written exactly once, into the raw run
    assert [c.title for c in layout.category] == list(custom_scalars_layout(TASKS))
    assert custom_scalar_metadata.CONFIG_SUMMARY_TAG not in read_back(log_dir / "avg").Tags()["tensors"]


def test_tensorboard_none_metrics_are_not_logged(tmp_path):
    sink = TensorBoardSink(tmp_path, task_names=[])
    sink.write(7, make_records(7, tasks=("mean",), with_mtv_is=False))
    sink.close()
    for run in VARIANTS:
        assert read_back(tmp_path / run).Tags()["scalars"] == ["stability/mean/score"]


def test_tensorboard_best_run_holds_the_best_at_each_change_and_best_json_as_text(tmp_path):
    sink = TensorBoardSink(tmp_path, task_names=TASKS)
    sink.write(10, make_records(10))
    first = {"step": 10, "variant": "avg", "steps": [5, 10], "score": 0.5, "scores": {"a": 0.5},
             "metric": "mean", "mode": "max", "path": "exports/step-00000010-avg"}  # fmt: skip
    sink.best_changed(10, first, tmp_path / "exports" / "step-00000010-avg")
    sink.write(20, make_records(20))
    second = dict(first, step=20, steps=[15, 20], score=0.625, path="exports/step-00000020-avg")
    sink.best_changed(20, second, tmp_path / "exports" / "step-00000020-avg")
    sink.close()
    acc = read_back(tmp_path / "best")
    assert [(ev.step, ev.value) for ev in acc.Scalars("stability/best/step")] == [(10, 10.0), (20, 20.0)]
    assert [(ev.step, ev.value) for ev in acc.Scalars("stability/best/score")] == [(10, 0.5), (20, 0.625)]
    texts = [ev.tensor_proto.string_val[0].decode() for ev in acc.Tensors("stability/best/text_summary")]
    assert len(texts) == 2
    assert "| steps averaged | 15, 20 |" in texts[1] and "| score (mean, max) | 0.625 |" in texts[1]
    assert f"| export | {tmp_path / 'exports' / 'step-00000020-avg'} |" in texts[1]


def test_tensorboard_purge_step_hides_abandoned_trajectory_in_every_run(tmp_path):
    sink = TensorBoardSink(tmp_path, task_names=TASKS)
    for step in (10, 20, 30):
        sink.write(step, make_records(step))
    sink.close()

    wait_for_next_second()
    # Resumed from the checkpoint of step 20: purge_step = 20 + 1.
    resumed = TensorBoardSink(tmp_path, task_names=TASKS, purge_step=21)
    new_records = make_records(30)
    for record in new_records:
        record["score"] += 0.5
    resumed.write(30, new_records)
    resumed.close()

    # EventAccumulator purges on the SessionLog.START event only with purge_orphaned_data=True
    # (its default): every tag of the run loses the points with step >= 21 read before that event.
    for run in VARIANTS:
        tag = "stability/mean/score"
        acc = read_back(tmp_path / run)
        got = [(ev.step, ev.value) for ev in acc.Scalars(tag)]
        old = [oracle_runs(make_records(s))[run][tag] for s in (10, 20)]
        assert [s for s, _ in got] == [10, 20, 30]
        assert got[0][1] == pytest.approx(old[0]) and got[1][1] == pytest.approx(old[1])
        assert got[2][1] == pytest.approx(oracle_runs(new_records)[run][tag])
        # Without purging, the abandoned point is still there: it is a display-side mechanism.
        raw = read_back(tmp_path / run, purge_orphaned_data=False)
        assert [ev.step for ev in raw.Scalars(tag)] == [10, 20, 30, 30]


class FakeLayoutWriter:
    def __init__(self):
        self.layouts: list[dict] = []

    def add_custom_scalars(self, layout):
        self.layouts.append(layout)


def test_tensorboard_layout_goes_to_a_given_writer_and_the_runs_to_log_dir(tmp_path):
    writer = FakeLayoutWriter()
    sink = TensorBoardSink(tmp_path / "stability", task_names=TASKS, layout_writer=writer)
    sink.write(1, make_records(1))
    sink.write(2, make_records(2))
    sink.close()
    sink.close()
    assert writer.layouts == [custom_scalars_layout(TASKS)]
    assert sorted(p.name for p in (tmp_path / "stability").iterdir()) == ["avg", "ens", "raw"]
    raw_run = read_back(tmp_path / "stability" / "raw")
    assert custom_scalar_metadata.CONFIG_SUMMARY_TAG not in raw_run.Tags()["tensors"]


def test_tensorboard_bad_arguments():
    with pytest.raises(ValueError, match="log_dir"):
        TensorBoardSink(None, task_names=TASKS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="purge_step"):
        TensorBoardSink("x", task_names=TASKS, purge_step=-1)
    with pytest.raises(ValueError, match="layout_writer"):
        TensorBoardSink("x", task_names=TASKS, layout_writer=object())
    sink = TensorBoardSink("x", task_names=TASKS)
    with pytest.raises(ValueError, match="step"):
        sink.write(5, make_records(6))


# --- ConsoleSink ----------------------------------------------------------------------------


def test_console_line_from_mean_records(capsys):
    records = [
        {"step": 500, "task": "mean", "variant": "raw", "window": 1, "n_models": 1, "score": 0.412,
         "mtv": 0.031, "is": 0.21, "time": 1.0},
        {"step": 500, "task": "mean", "variant": "avg", "window": 20, "n_models": 5, "score": 0.43,
         "mtv": 0.012, "is": 0.08, "time": 1.0},
        {"step": 500, "task": "mean", "variant": "ens", "window": 20, "n_models": 5, "score": 0.425,
         "mtv": 0.02, "is": 0.05, "time": 1.0},
        {"step": 500, "task": "hellaswag", "variant": "raw", "window": 1, "n_models": 1, "score": 0.9,
         "mtv": None, "is": None, "time": 1.0},
        {"step": 500, "task": "arc", "variant": "raw", "window": 1, "n_models": 1, "score": 0.1,
         "mtv": None, "is": None, "time": 1.0},
    ]  # fmt: skip
    sink = ConsoleSink()
    sink.write(500, records)
    sink.close()
    assert capsys.readouterr().out == (
        "[stability] step 500 (mean of 2 tasks) | score raw 0.412 avg 0.430 ens 0.425"
        " | IS raw 0.210 avg 0.080 ens 0.050 | MTV raw 0.031 avg 0.012 ens 0.020 (window 20, 5 models)\n"
    )


def test_console_single_task_missing_parts_and_na():
    stream = io.StringIO()
    records = [
        {"step": 3, "task": "hellaswag", "variant": "raw", "score": 0.5, "mtv": None, "is": None},
        {"step": 3, "task": "hellaswag", "variant": "avg", "window": 2, "n_models": 2, "score": 0.6,
         "mtv": None, "is": 0.1},
    ]  # fmt: skip
    ConsoleSink(stream).write(3, records)
    assert stream.getvalue() == (
        "[stability] step 3 (hellaswag) | score raw 0.500 avg 0.600 | IS raw n/a avg 0.100"
        " (window 2, 2 models)\n"
    )
