"""Property-based fuzz of finished run directories: damage any JSON file the library reads, or plant a
link where it writes, then open, resume, report and analyze.

What must hold whatever the damage:
* no uncaught exception: the monitor (``on_error="warn"``) never raises; the command line exits 0 or 2
  with one line; the analysis API raises only its documented errors (``ValueError``, ``OSError``);
* nothing is written outside the run directory: every planted link points into ``outside/``, whose
  sentinel file must keep its bytes, and an audit hook on ``open``, renames, removals and truncations
  records any write that resolves there;
* no lock is left behind: no descriptor of this process still refers to the run's ``lock.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from tiny_training import classify_task, make_data, train

from checkpoint_stability import FunctionTask, StabilityMonitor
from checkpoint_stability.offline import cli as cli_module
from checkpoint_stability.offline.analysis import analyze

SENTINEL = b"sentinel: a file outside every run directory\n"
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "20")),
    deadline=None,
    derandomize=True,  # the same cases in CI as here; FUZZ_EXAMPLES=500 for a longer hunt
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

# ------------------------------------------------------------------------------------------ the audit hook

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_watch: dict[str, object] = {"outside": None, "writes": []}


def _resolved(path, follow: bool) -> str:
    """The real path ``path`` names; without ``follow`` a final symlink is the link itself (removing
    or renaming a link, or opening with O_NOFOLLOW, never reaches its target)."""
    path = os.fsdecode(path)
    if follow:
        return os.path.realpath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path) or "."), os.path.basename(path))


def _audit(event: str, args: tuple) -> None:
    outside = _watch["outside"]
    if outside is None:
        return
    paths: list = []
    follow = True
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        if writing:
            paths = [path]
            follow = not (isinstance(flags, int) and flags & getattr(os, "O_NOFOLLOW", 0))
    elif event in ("os.rename", "os.replace", "os.link", "os.symlink"):
        paths, follow = list(args[:2]), False
    elif event in ("os.remove", "os.rmdir", "shutil.rmtree"):
        paths, follow = [args[0]], False
    elif event in ("os.truncate", "os.mkdir", "os.chmod"):
        paths = [args[0]]
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)):
            real = _resolved(path, follow)
            if real == outside or real.startswith(outside + os.sep):
                _watch["writes"].append((event, os.fsdecode(path)))


_hook_installed = False


@contextlib.contextmanager
def watching(outside: Path):
    """Record every write that resolves into ``outside`` while the block runs."""
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_audit)  # cannot be removed: it does nothing while nothing is watched
        _hook_installed = True
    _watch["outside"], _watch["writes"] = os.path.realpath(outside), []
    try:
        yield _watch["writes"]
    finally:
        _watch["outside"] = None


def open_descriptors_to(path: Path) -> list[str]:
    target = os.path.realpath(path)
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                found.append(fd)
    return found


# --------------------------------------------------------------------------------------------- templates


def _tasks():
    x, y = make_data(3)
    return [
        classify_task(x, y, name="cls"),
        FunctionTask(
            "words",
            lambda m: [str(v) for v in m(x).argmax(-1).tolist()],
            targets=[str(v) for v in y.tolist()],
        ),
    ]


@pytest.fixture(scope="module")
def live_template(tmp_path_factory) -> Path:
    """A finished live run: buffer, history, examples, best export, run.json, lock.json, report."""
    run = tmp_path_factory.mktemp("live") / "run"
    monitor = StabilityMonitor(
        _tasks(), dirpath=run, window=3, every_n_steps=5, console=False, tensorboard=True
    )
    train(20, monitor)
    monitor.close()
    assert cli_module.main(["report", str(run)]) == 0
    return run


def _series_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 4))


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("series")
    paths = []
    for seed, step in enumerate((10, 20, 30)):
        torch.manual_seed(seed)
        path = root / f"step-{step:08d}.safetensors"
        save_file({k: v.contiguous() for k, v in _series_model().state_dict().items()}, path)
        paths.append(path)
    return paths


def _analyze(series, run, report=True):
    return analyze(
        series, _tasks(), run, windows=[1, 2], model_factory=_series_model, progress=False, report=report
    )


@pytest.fixture(scope="module")
def analysis_template(tmp_path_factory, series) -> Path:
    run = tmp_path_factory.mktemp("analysis") / "run"
    _analyze(series, run)
    return run


# ------------------------------------------------------------------------------------------------ damage

_ODD_VALUES = [
    None,
    True,
    -1,
    0,
    10**400,
    1e308,
    -1e308,
    "",
    "../../outside",
    "step-00000005.safetensors",
    [],
    {},
    [[[]]],
    "x" * 300,
]


def _json_files(run: Path) -> list[str]:
    names = []
    for path in sorted(run.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.suffix in (".json", ".jsonl"):
            names.append(str(path.relative_to(run)))
    return names


def _link_places(run: Path) -> list[str]:
    """Every path the library writes, repairs or deletes, and a few it creates."""
    places = {
        "history.jsonl",
        "best.json",
        "run.json",
        "lock.json",
        "analysis.json",
        "buffer",
        "buffer/manifest.json",
        "examples",
        "examples/cls.jsonl",
        "examples/cls.meta.json",
        "examples/words.jsonl",
        "examples/words.meta.json",
        "exports",
        "tensorboard",
        "report",
        "report/report.md",
    }
    for path in run.rglob("*"):
        relative = str(path.relative_to(run))
        if relative.startswith(("buffer/step-", "exports/step-", "report/")) and relative.count("/") == 1:
            places.add(relative)
    return sorted(places)


def _paths_into(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths_into(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:5]):
            yield from _paths_into(item, (*prefix, index))


def _replace_at(value, path, new):
    if not path:
        return new
    head, *rest = path
    value[head] = _replace_at(value[head], rest, new)
    return value


@st.composite
def json_damage(draw, text: str):
    """New text for a JSON document (or one JSONL line): damaged but often still parseable."""
    how = draw(st.sampled_from(["truncate", "deep", "top_level", "node", "length"]))
    if how == "truncate":
        return text[: draw(st.integers(0, max(0, len(text) - 1)))]
    if how == "deep":
        depth = draw(st.sampled_from([1000, 100_000]))
        return "[" * depth + "]" * depth
    if how == "top_level":
        return json.dumps(draw(st.sampled_from(_ODD_VALUES[:12])))
    value = json.loads(text)
    paths = list(_paths_into(value))
    path = draw(st.sampled_from(paths))
    if how == "length":
        target = value
        for part in path:
            target = target[part]
        if isinstance(target, list) and target:
            if draw(st.booleans()):
                target.pop()
            else:
                target.append(target[0])
            return json.dumps(value)
    return json.dumps(_replace_at(value, list(path), draw(st.sampled_from(_ODD_VALUES))))


@st.composite
def run_damage(draw, run: Path):
    """("json", relative path, line index or None, new text) or ("link", relative path, target kind)."""
    if draw(st.integers(0, 2)) == 0:
        return ("link", draw(st.sampled_from(_link_places(run))), draw(st.sampled_from(["file", "dir"])))
    name = draw(st.sampled_from(_json_files(run)))
    text = (run / name).read_text()
    if name.endswith(".jsonl"):
        lines = text.splitlines()
        index = draw(st.integers(0, len(lines) - 1))
        return ("json", name, index, draw(json_damage(lines[index])))
    if not text.strip():  # lock.json is empty once released
        return ("json", name, None, draw(st.sampled_from(["[" * 100_000, "{", "[]", '{"pid": "x"}'])))
    return ("json", name, None, draw(json_damage(text)))


def apply_damage(run: Path, outside: Path, damage: tuple) -> None:
    kind, name = damage[0], damage[1]
    path = run / name
    if kind == "json":
        _, _, index, new = damage
        if index is None:
            path.write_text(new)
        else:
            lines = path.read_text().splitlines()
            lines[index] = new.replace("\n", " ")
            path.write_text("\n".join(lines) + "\n")
        return
    target = outside / "sentinel.json" if damage[2] == "file" else outside / "folder"
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


def make_outside(base: Path) -> Path:
    outside = base / "outside"
    outside.mkdir()
    (outside / "sentinel.json").write_bytes(SENTINEL)
    (outside / "folder").mkdir()
    (outside / "folder" / "sentinel.json").write_bytes(SENTINEL)
    return outside


def outside_is_untouched(outside: Path) -> None:
    assert (outside / "sentinel.json").read_bytes() == SENTINEL
    assert sorted(p.name for p in outside.iterdir()) == ["folder", "sentinel.json"]
    assert [p.name for p in (outside / "folder").iterdir()] == ["sentinel.json"]
    assert (outside / "folder" / "sentinel.json").read_bytes() == SENTINEL


def cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli_module.main(argv)
    err = capsys.readouterr().err
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert (
            len([line for line in err.splitlines() if line.startswith("checkpoint-stability report: error")])
            <= 1
        )
    return code, err


@contextlib.contextmanager
def quietly():
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


# ------------------------------------------------------------------------------------------------- tests


@pytest.fixture
def live_damages(live_template):
    return run_damage(live_template)


@FUZZ
@given(data=st.data())
def test_a_damaged_live_run_directory_resumes_and_reports_without_harm(
    live_template, tmp_path_factory, capsys, data
):
    base = tmp_path_factory.mktemp("case")
    run = base / "run"
    shutil.copytree(live_template, run, symlinks=True)
    outside = make_outside(base)
    damage = data.draw(run_damage(run), label="damage")
    apply_damage(run, outside, damage)
    with watching(outside) as writes, quietly():
        monitor = StabilityMonitor(
            _tasks(), dirpath=run, window=3, every_n_steps=5, console=False, tensorboard=True
        )
        monitor.try_open(resume_step=15)  # on_error="warn": a directory it cannot use is reported, not raised
        model = train(10)
        monitor.on_snapshot(model, 20)
        monitor.on_snapshot(model, 25)
        monitor.close()
        cli(["report", str(run)], capsys)
    assert writes == [], writes
    outside_is_untouched(outside)
    assert open_descriptors_to(run / "lock.json") == []


@FUZZ
@given(data=st.data())
def test_a_damaged_analysis_directory_reanalyzes_and_reports_without_harm(
    analysis_template, series, tmp_path_factory, capsys, data
):
    base = tmp_path_factory.mktemp("case")
    run = base / "run"
    shutil.copytree(analysis_template, run, symlinks=True)
    outside = make_outside(base)
    damage = data.draw(run_damage(run), label="damage")
    apply_damage(run, outside, damage)
    with watching(outside) as writes, quietly():
        try:
            _analyze(series, run, report=False)
        except (ValueError, OSError) as error:  # documented: damaged settings, a refused link
            assert str(error)
        cli(["report", str(run)], capsys)
    assert writes == [], writes
    outside_is_untouched(outside)
    assert open_descriptors_to(run / "lock.json") == []
