"""Reading the stability TensorBoard runs back with TensorBoard's own event multiplexer, and what they
should hold according to ``history.jsonl`` (an oracle written here, independent of the sink)."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

VARIANT_RUNS = ("raw", "avg", "ens")


def read_runs(directory: Path, prefix: str = "") -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{run: {tag: [(step, value), ...]}}`` of every run under ``directory`` whose name starts with
    ``prefix`` (e.g. ``"stability/"`` when ``directory`` also holds the trainer's own run), as
    TensorBoard shows them (purged points dropped), the prefix removed from the run names."""
    multiplexer = EventMultiplexer(size_guidance={"scalars": 0, "tensors": 0})
    multiplexer.AddRunsFromDirectory(str(directory))
    multiplexer.Reload()
    runs: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for run, content in multiplexer.Runs().items():
        if not run.startswith(prefix):
            continue
        runs[run[len(prefix) :]] = {
            tag: [(event.step, event.value) for event in multiplexer.Scalars(run, tag)]
            for tag in content["scalars"]
        }
    return runs


def drift_lines(run_dir) -> list[dict]:
    """The run directory's ``drift.jsonl`` lines, read as any reader would."""
    from checkpoint_stability.history import History

    return History(run_dir, read_only=True).drift()


def expected_runs(
    records: list[dict], window: int, drift: list[dict] = ()
) -> dict[str, dict[str, dict[int, float]]]:
    """What the variant runs should hold, from the history's score records: the live series (raw over
    one snapshot, avg and ens over ``window``), ``stability/<task>/<metric>`` per variant run, and in
    the avg and ens runs ``<metric>_ratio`` = the variant's MTV or IS over raw's at the same step; and
    from ``drift.jsonl``'s lines, ``stability/drift/{previous,average}`` in the raw run."""
    live = [r for r in records if "score" in r and r["window"] == (1 if r["variant"] == "raw" else window)]
    runs: dict[str, dict[str, dict[int, float]]] = {}
    raw = {(r["task"], r["step"]): r for r in live if r["variant"] == "raw"}
    for record in live:
        tags = runs.setdefault(record["variant"], {})
        for metric in ("score", "mtv", "is"):
            if record[metric] is not None:
                tags.setdefault(f"stability/{record['task']}/{metric}", {})[record["step"]] = record[metric]
        base = raw.get((record["task"], record["step"]))
        if record["variant"] == "raw" or base is None:
            continue
        for metric in ("mtv", "is"):
            if record[metric] is not None and base[metric]:
                ratio = record[metric] / base[metric]
                tags.setdefault(f"stability/{record['task']}/{metric}_ratio", {})[record["step"]] = ratio
    for line in drift:
        for name in ("previous", "average"):
            if line[name] is not None:
                runs.setdefault("raw", {}).setdefault(f"stability/drift/{name}", {})[line["step"]] = line[
                    name
                ]
    return runs


def assert_runs_match(shown: dict, want: dict, *, rel: float = 1e-6) -> None:
    """Every variant run holds exactly the wanted tags, each point once, at the wanted steps and values
    (TensorBoard stores float32, hence ``rel``)."""
    for variant in want:
        assert set(shown[variant]) == set(want[variant]), variant
        for tag, points in want[variant].items():
            steps = [step for step, _ in shown[variant][tag]]
            assert len(steps) == len(set(steps)), f"{variant} {tag} holds a point twice: {steps}"
            got = dict(shown[variant][tag])
            assert sorted(got) == sorted(points), (variant, tag)
            for step, value in points.items():
                assert abs(got[step] - value) <= rel * max(1.0, abs(value)), (variant, tag, step)
