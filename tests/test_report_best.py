"""The selected best model in the report: its section, its marker on the score plots, and the figures
around it (one task, the window sweep's colours, the flip captions).

Run directories are real: a StabilityMonitor trains the tiny classifier of ``tiny_training`` (and, for a
Hugging Face export, a tiny GPT-2). Expected values come from ``best.json`` and ``history.jsonl`` read
with ``json``, and from the export's weights read with ``safetensors``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from tiny_training import Net, classify_task, make_data, train

from checkpoint_stability import StabilityMonitor
from checkpoint_stability.reporting import plots
from checkpoint_stability.reporting.plots import VARIANT_COLORS, Curve, best_marker, plot_scores
from checkpoint_stability.reporting.report import write_report

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.colors import to_hex  # noqa: E402

SETTINGS = {"window": 3, "every_n_steps": 5, "console": False, "tensorboard": False, "report": False}


def make_run(dirpath: Path, tasks: int = 2, steps: int = 40, **settings) -> Path:
    x, y = make_data()
    names = ["cls", "cls2"][:tasks]
    monitor = StabilityMonitor(
        [classify_task(x, y, name) for name in names], dirpath=dirpath, **SETTINGS, **settings
    )
    train(steps, monitor)
    monitor.close()
    return dirpath


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def one_task(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("one"), tasks=1)


@pytest.fixture
def drawn(monkeypatch):
    """The figures plot_scores returned during a report, by task (the real drawing, kept for reading)."""
    figures: dict[str, object] = {}
    real = plots.plot_scores

    def recording(path, **kwargs):
        figures[kwargs["task"]] = real(path, **kwargs)
        return figures[kwargs["task"]]

    monkeypatch.setattr(plots, "plot_scores", recording)
    return figures


def read_json(path: Path):
    return json.loads(path.read_text())


def history(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in lines if "error" not in r]


def section(text: str, heading: str = "## Best model") -> str:
    body = text.split(heading + "\n", 1)[1]
    return body.split("\n## ", 1)[0]


def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("report", "lock.json"))
    return copy


def best_artists(figure) -> list:
    return [a for axes in figure.axes for a in axes.get_lines() if a.get_gid() == "best"]


# ---------------------------------------------------------------------------------------- the section


def test_the_best_model_section_says_what_best_json_says(two_tasks, drawn):
    text = write_report(two_tasks).read_text()
    best = read_json(two_tasks / "best.json")
    assert best["variant"] == "avg" and best["path"] is not None  # the defaults: select="avg"
    part = section(text)
    # Near the top: after the overview, before the stability table.
    assert text.index("## Best model") < text.index("## Stability")
    assert text.index("| task | kind |") < text.index("## Best model")
    assert f"- **Step**: {best['step']}\n" in part
    assert f"- **Variant**: {best['variant']} (" in part
    assert f"at steps {', '.join(str(s) for s in best['steps'])}\n" in part
    assert f"the {len(best['steps'])} snapshots averaged" in part
    assert f"the `{best['metric']}` score, higher is better (mode `{best['mode']}`" in part
    assert f"- **Score**: {best['score']:.4f}\n" in part
    assert set(best["scores"]) == {"cls", "cls2"}
    for task, score in best["scores"].items():
        assert f"| {task} | {score:.4f} |" in part
    assert f"| mean over tasks | {best['score']:.4f} |" in part
    assert f"- **Export**: `{best['path']}`" in part
    # A plain state-dict export: no config.json, so load_best and no from_pretrained.
    assert "from_pretrained" not in part and "no `config.json`" in part
    snippet = re.search(r"```python\n(.*?)```", part, re.S).group(1)
    assert f'load_best("{two_tasks.resolve()}", model)' in snippet
    # The snippet as printed loads the export's weights (read back with safetensors) into a fresh model.
    from safetensors.torch import load_file

    model = Net()
    exec(snippet, {"model": model})
    exported = load_file(two_tasks / best["path"] / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, exported[name]), name


def test_every_score_plot_marks_the_best_step_on_the_chosen_curve(two_tasks, drawn):
    write_report(two_tasks)
    best = read_json(two_tasks / "best.json")
    assert set(drawn) == {"cls", "cls2", "mean"}
    by_key = {(r["task"], r["variant"], r["window"], r["step"]): r["score"] for r in history(two_tasks)}
    for task, figure in drawn.items():
        artists = best_artists(figure)
        lines = [a for a in artists if a.get_linestyle() == "--"]
        stars = [a for a in artists if a.get_marker() == "*"]
        assert len(lines) == 1 and len(stars) == 1, task
        assert list(lines[0].get_xdata()) == [best["step"], best["step"]]
        assert list(stars[0].get_xdata()) == [best["step"]]
        expected = by_key[(task, best["variant"], best["window"], best["step"])]
        assert list(stars[0].get_ydata()) == [expected]
        assert stars[0].get_label().startswith(f"best: step {best['step']} ({best['variant']})")
        assert to_hex(stars[0].get_markerfacecolor()) == VARIANT_COLORS[best["variant"]]


def test_one_task_draws_no_mean_chart_and_says_why(one_task, two_tasks, drawn):
    path = write_report(one_task)
    names = {p.name for p in path.parent.iterdir()}
    assert "scores-cls.png" in names and "scores-mean.png" not in names
    assert set(drawn) == {"cls"}  # the task's plot carries the best marker instead
    assert best_artists(drawn["cls"])
    text = path.read_text()
    assert "| mean |" not in text
    assert "With one task, the mean over tasks is that task's score" in text
    best = read_json(one_task / "best.json")
    assert best["metric"] == "mean" and list(best["scores"]) == ["cls"]
    part = section(text)
    assert f"| cls | {best['scores']['cls']:.4f} |" in part
    # The mean over one task is that task's score, as the selection's number shows.
    assert best["score"] == pytest.approx(best["scores"]["cls"])
    assert "scores-mean.png" in {p.name for p in write_report(two_tasks).parent.iterdir()}


def test_without_selection_the_report_says_no_best_model(tmp_path, drawn):
    run = make_run(tmp_path / "run", steps=20, select=None)
    assert not (run / "best.json").exists()
    text = write_report(run).read_text()
    assert section(text).strip().startswith("No best model was selected:")
    assert "**Step**" not in text
    assert all(not best_artists(figure) for figure in drawn.values())
    assert "Dashed line and star" not in text


def test_an_analyze_run_directory_has_no_best_model(tmp_path):
    from safetensors.torch import save_file

    from checkpoint_stability.offline.analysis import analyze

    x, y = make_data()
    checkpoints = []
    for step in (10, 20, 30):
        torch.manual_seed(step)
        path = tmp_path / f"step-{step:08d}.safetensors"
        save_file(Net().state_dict(), str(path))
        checkpoints.append(path)
    task = classify_task(x, y, "cls")

    def factory():
        return Net().eval()

    analyze(checkpoints, [task], tmp_path / "analysis", windows=[1, 2], model_factory=factory, progress=False)
    text = (tmp_path / "analysis" / "report" / "report.md").read_text()
    assert "No best model was selected: an offline analysis (`analyze`)" in section(text)


@pytest.mark.parametrize(
    "damage",
    ["{not json", '{"step": "late"}', "path-to-nowhere"],
    ids=["not-json", "wrong-field", "missing-export"],
)
def test_a_damaged_best_json_is_a_one_line_note(two_tasks, tmp_path, damage, caplog, drawn):
    run = copy_run(two_tasks, tmp_path)
    if damage == "path-to-nowhere":
        best = read_json(run / "best.json")
        best["path"] = "exports/step-99999999-avg"
        damage = json.dumps(best)
    (run / "best.json").write_text(damage)
    text = write_report(run).read_text()
    part = section(text).strip()
    assert part.startswith("`best.json` cannot be used, so no best model is shown:")
    assert "\n" not in part  # one line
    assert "best.json" in caplog.text
    assert "## Stability" in text and all(not best_artists(f) for f in drawn.values())


def test_an_ensemble_best_has_no_export_and_its_star_is_on_the_ens_curve(two_tasks, tmp_path, drawn):
    """best.json as select="any" writes it when ens wins: path null (hand-edited here, since which
    variant wins a real run is not ours to choose)."""
    run = copy_run(two_tasks, tmp_path)
    records = [r for r in history(run) if r["variant"] == "ens" and r["task"] == "mean"]
    chosen = max(records, key=lambda r: r["score"])
    shutil.rmtree(run / "exports")
    best = {
        "path": None,
        "step": chosen["step"],
        "variant": "ens",
        "window": chosen["window"],
        "steps": [chosen["step"] - 10, chosen["step"] - 5, chosen["step"]],
        "score": chosen["score"],
        "select": "any",
        "metric": "mean",
        "mode": "max",
        "scores": {"cls": 0.5, "cls2": 0.25},
    }
    (run / "best.json").write_text(json.dumps(best))
    part = section(write_report(run).read_text())
    assert "- **Export**: none — an ensemble" in part and "load_best(" not in part
    assert "the 3 snapshots voted, at steps" in part
    assert "candidates avg, raw, ens" in part
    star = next(a for a in best_artists(drawn["mean"]) if a.get_marker() == "*")
    assert list(star.get_ydata()) == [chosen["score"]]
    assert to_hex(star.get_markerfacecolor()) == VARIANT_COLORS["ens"]


def test_a_hugging_face_export_gets_from_pretrained_and_token_ids_are_explained(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from tiny_lm import CORPUS, tiny_gpt2, tiny_tokenizer

    from checkpoint_stability import NextTokenTask

    tokenizer = tiny_tokenizer()
    sequences = [tokenizer(text)["input_ids"] for text in CORPUS[:4]]
    task = NextTokenTask("lm", sequences, max_tokens=48)
    model = tiny_gpt2(0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.tensor([sequences[0][:12], sequences[1][:12]])
    run = tmp_path / "run"
    with StabilityMonitor([task], dirpath=run, **{**SETTINGS, "every_n_steps": 2, "window": 2}) as monitor:
        for step in range(1, 9):
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(model, step)
    best = read_json(run / "best.json")
    export = run.resolve() / best["path"]
    assert (export / "config.json").is_file()
    text = write_report(run).read_text()
    part = section(text)
    assert f'AutoModelForCausalLM.from_pretrained("{export}")' in part
    assert f'load_best("{run.resolve()}", model)' in part
    snippets = re.findall(r"```python\n(.*?)```", part, re.S)
    namespace: dict = {}
    exec(snippets[1], namespace)
    stored = load_file(export / "model.safetensors")
    loaded = namespace["model"].state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in stored.items())
    flips = section(text, "## Which examples flip")
    assert "Example ids of task lm (kind `next_token`): `s{sequence}:t{position}`" in flips


# ---------------------------------------------------------------------------------------- the figures


def test_best_marker_finds_the_chosen_curve_or_only_the_step():
    raw = Curve("raw", 1, [5, 10, 15], [0.1, 0.2, 0.3])
    small = Curve("avg", 2, [5, 10, 15], [0.4, 0.5, 0.6])
    large = Curve("avg", 3, [5, 15], [0.7, 0.9])  # average_every > 1: no step 10
    curves = [raw, small, large]
    assert best_marker({"step": 15, "variant": "avg", "window": 3}, curves).score == 0.9
    assert best_marker({"step": 15, "variant": "avg", "window": 2}, curves).score == 0.6
    assert best_marker({"step": 10, "variant": "raw", "window": 1}, curves).score == 0.2
    # The chosen curve lacks the step, others have it: the line without a marker.
    lone = best_marker({"step": 10, "variant": "avg", "window": 3}, curves)
    assert lone is not None and lone.step == 10 and lone.score is None
    assert best_marker({"step": 20, "variant": "avg", "window": 3}, curves) is None
    assert best_marker(None, curves) is None


def test_with_several_windows_the_star_is_in_the_chosen_variants_panel(tmp_path):
    raw = Curve("raw", 1, [5, 10], [0.1, 0.2])
    others = [
        Curve("avg", 2, [5, 10], [0.3, 0.4]),
        Curve("avg", 3, [5, 10], [0.5, 0.6]),
        Curve("ens", 2, [5, 10], [0.2, 0.3]),
        Curve("ens", 3, [5, 10], [0.25, 0.35]),
    ]
    marker = best_marker({"step": 10, "variant": "ens", "window": 3}, [raw, *others])
    figure = plot_scores(
        tmp_path / "s.png", task="t", metric="accuracy", raw=raw, others=others, final_start=5,
        final_label="final 20%", best=marker,
    )  # fmt: skip
    panels = {axes.get_title(): axes for axes in figure.axes if axes.get_title()}
    for title, axes in panels.items():
        best = [a for a in axes.get_lines() if a.get_gid() == "best"]
        stars = [a for a in best if a.get_marker() == "*"]
        assert any(list(a.get_xdata()) == [10, 10] for a in best), title
        assert [list(s.get_ydata()) for s in stars] == ([[0.35]] if title.startswith("ens") else []), title


def test_the_window_sweep_uses_no_variant_colour_and_names_its_axes(tmp_path):
    sweeps = {
        f"t{k}": [{"n": n, "score": 0.5, "mtv": 0.1 / n, "is": 0.2 / n} for n in (1, 2, 5)] for k in range(9)
    }
    figure = plots.plot_window_sweep(tmp_path / "w.png", sweeps=sweeps, final_label="final 20%")
    variant_colours = {plots.RAW_COLOR, *VARIANT_COLORS.values()}
    for axes in figure.axes:
        for line in axes.get_lines():
            assert to_hex(line.get_color()) not in variant_colours, line.get_label()
    score_axes = figure.axes[0]
    assert "final 20%" in score_axes.get_ylabel() and score_axes.get_title() != "mean score"
    assert "last n snapshots" in figure.get_suptitle() and "final 20% of evaluations" in figure.get_suptitle()
    # Each of the first tasks has a hue of its own (and a marker, for print and colour blindness).
    colours = [to_hex(line.get_color()) for line in score_axes.get_lines()]
    assert len(set(colours[: len(plots.TASK_COLORS)])) == len(plots.TASK_COLORS)


def test_flip_figures_are_captioned_with_what_their_ids_are(two_tasks, drawn):
    text = write_report(two_tasks).read_text()
    flips = section(text, "## Which examples flip")
    for task in ("cls", "cls2"):
        figure = f"![Task {task}: per-example scores over the last evaluations](flips-{task}.png)"
        assert figure in flips  # the tiny classifier's answers do flip
        after = flips.split(figure, 1)[1].lstrip("\n").splitlines()[0]
        assert after.startswith(f"Example ids of task {task} (kind `multiple_choice`): the task's own")
