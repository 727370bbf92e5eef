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


def test_custom_scalars_layout_one_chart_per_task():
    layout = custom_scalars_layout(TASKS)
    assert list(layout) == ["stability score", "stability IS", "stability MTV"]
    assert list(layout["stability score"]) == ["mean", *TASKS]
    assert layout["stability IS"]["arc_easy"] == [
        "Multiline",
        ["stability/arc_easy/raw/is", "stability/arc_easy/avg/is", "stability/arc_easy/ens/is"],
    ]
    assert layout["stability MTV"]["mean"][1] == [f"stability/mean/{v}/mtv" for v in VARIANTS]
    # "mean" is not repeated when listed explicitly.
    assert list(custom_scalars_layout(["mean", "x"])["stability score"]) == ["mean", "x"]
    with pytest.raises(ValueError, match="task_names"):
        custom_scalars_layout("hellaswag")


def test_sinks_satisfy_protocol():
    assert isinstance(ConsoleSink(), Sink)
    assert isinstance(TensorBoardSink("unused", task_names=TASKS), Sink)


# --- TensorBoardSink ------------------------------------------------------------------------


def test_tensorboard_roundtrip_with_event_accumulator(tmp_path):
    log_dir = tmp_path / "tb"
    sink = TensorBoardSink(log_dir, task_names=TASKS)
    assert not log_dir.exists()  # lazy: constructing creates no files

    steps = [100, 200, 300]
    expected: dict[str, list[tuple[int, float]]] = {}
    for step in steps:
        records = make_records(step)
        sink.write(step, records)
        for name, value in scalar_items(records).items():
            expected.setdefault(name, []).append((step, value))
    sink.close()

    acc = read_back(log_dir)
    names = {
        f"stability/{t}/{v}/{m}" for t in ["mean", *TASKS] for v in VARIANTS for m in ["score", "mtv", "is"]
    }
    assert set(acc.Tags()["scalars"]) == names == set(expected)
    for tag, points in expected.items():
        got = acc.Scalars(tag)
        assert [ev.step for ev in got] == [step for step, _ in points]
        for ev, (_, value) in zip(got, points, strict=True):
            assert ev.value == pytest.approx(value, rel=1e-6, abs=1e-7)  # stored as float32

    (layout,) = read_layouts(acc)  # written exactly once
    by_category = {c.title: c for c in layout.category}
    assert list(by_category) == ["stability score", "stability IS", "stability MTV"]
    for title, metric in [("stability score", "score"), ("stability IS", "is"), ("stability MTV", "mtv")]:
        charts = by_category[title].chart
        assert [c.title for c in charts] == ["mean", *TASKS]
        for chart in charts:
            assert list(chart.multiline.tag) == [f"stability/{chart.title}/{v}/{metric}" for v in VARIANTS]


def test_tensorboard_none_metrics_are_not_logged(tmp_path):
    sink = TensorBoardSink(tmp_path, task_names=[])
    sink.write(7, make_records(7, tasks=("mean",), with_mtv_is=False))
    sink.close()
    assert sorted(read_back(tmp_path).Tags()["scalars"]) == [
        f"stability/mean/{v}/score" for v in sorted(VARIANTS)
    ]


def test_tensorboard_purge_step_hides_abandoned_trajectory(tmp_path):
    tag = "stability/mean/raw/score"
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
    # (its default): every tag loses the points with step >= 21 read before that event.
    acc = read_back(tmp_path)
    got = [(ev.step, ev.value) for ev in acc.Scalars(tag)]
    old = scalar_items(make_records(10))[tag], scalar_items(make_records(20))[tag]
    assert [s for s, _ in got] == [10, 20, 30]
    assert got[0][1] == pytest.approx(old[0]) and got[1][1] == pytest.approx(old[1])
    assert got[2][1] == pytest.approx(scalar_items(new_records)[tag])
    # Tags only written before the resume lose their points past the purge step as well.
    assert [ev.step for ev in acc.Scalars("stability/hellaswag/ens/is")] == [10, 20, 30]

    # Without purging, the abandoned point is still there: it is a display-side mechanism.
    raw = read_back(tmp_path, purge_orphaned_data=False)
    assert [ev.step for ev in raw.Scalars(tag)] == [10, 20, 30, 30]


class FakeWriter:
    def __init__(self):
        self.scalars: list[tuple[str, float, int]] = []
        self.layouts: list[dict] = []
        self.flushes = 0
        self.closed = False

    def add_scalar(self, tag, value, global_step=None):
        self.scalars.append((tag, value, global_step))

    def add_custom_scalars(self, layout):
        self.layouts.append(layout)

    def flush(self):
        self.flushes += 1

    def close(self):
        self.closed = True


def test_tensorboard_uses_given_writer_and_does_not_close_it(tmp_path):
    writer = FakeWriter()
    sink = TensorBoardSink(None, task_names=TASKS, writer=writer)
    assert sink.writer is writer
    sink.write(1, make_records(1))
    sink.write(2, make_records(2))
    sink.close()
    sink.close()

    assert not writer.closed
    assert writer.layouts == [custom_scalars_layout(TASKS)]
    assert writer.flushes >= 2
    expected = [(n, v, s) for s in (1, 2) for n, v in scalar_items(make_records(s)).items()]
    assert writer.scalars == expected
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_bad_arguments():
    with pytest.raises(ValueError, match="log_dir"):
        TensorBoardSink(None, task_names=TASKS)
    with pytest.raises(ValueError, match="purge_step"):
        TensorBoardSink("x", task_names=TASKS, purge_step=-1)
    with pytest.raises(ValueError, match="purge_step"):
        TensorBoardSink(None, task_names=TASKS, purge_step=3, writer=FakeWriter())
    with pytest.raises(ValueError, match="writer"):
        TensorBoardSink(None, task_names=TASKS, writer=object())
    sink = TensorBoardSink(None, task_names=TASKS, writer=FakeWriter())
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
