"""The checkpoint-stability command line on tiny GPT-2 checkpoints, against independent oracles.

Oracles: float64 averages computed here from the files read back with safetensors' own reader; raw
scores from a fresh ``from_pretrained`` of each checkpoint; votes counted by hand; MTV and IS by hand.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_lm import tiny_gpt2, tiny_tokenizer

from checkpoint_stability.offline.cli import main

STEPS = [100, 200, 300, 400, 500]

TASKS_MODULE = '''
"""Tasks for the CLI tests: a multiple-choice task and a next-token task, counting their evaluations."""
from tiny_lm import CORPUS, tiny_tokenizer

from checkpoint_stability import MultipleChoiceTask, NextTokenTask

CALLS = []
FAIL_AT_CALL = None  # raise on this call number, to interrupt a run

EXAMPLES = [
    {"context": "The capital of France is", "choices": ["Paris", "Rome", "York"], "label": 0},
    {"context": "Two plus two is", "choices": ["four.", "five.", "seven.", "eight."], "label": 0},
    {"context": "To be, or not to be, that is the", "choices": ["question.", "stage"], "label": 0},
    {"context": "The quick brown fox jumps over the", "choices": ["lazy dog.", "sun", "fox"], "label": 0},
    {"context": "All the world's a", "choices": ["stage", "dog", "question", "sun"], "label": 0},
    {"context": "Now is the winter of our", "choices": ["discontent", "summer", "York"], "label": 0},
    {"context": "The capital of Italy is", "choices": ["Paris", "Rome", "London"], "label": 1},
    {"context": "Ten minus three is", "choices": ["eight.", "seven.", "four."], "label": 1},
]


class Counting:
    def __init__(self, inner):
        self.inner = inner
        self.name, self.kind, self.metric = inner.name, inner.kind, inner.metric

    def evaluate(self, model):
        CALLS.append(self.name)
        if FAIL_AT_CALL is not None and len(CALLS) == FAIL_AT_CALL:
            raise RuntimeError("interrupted on purpose")
        return self.inner.evaluate(model)

    def score(self, outputs):
        return self.inner.score(outputs)


def plain():
    tokenizer = tiny_tokenizer()
    return [
        # Per-token normalisation: summed log-probs of a random model mostly pick the shortest choice.
        MultipleChoiceTask("mc", EXAMPLES, tokenizer, normalize="tokens", show_progress=False),
        NextTokenTask("next", [tokenizer.encode(text) for text in CORPUS[:4]], max_tokens=48),
    ]


def build():
    return [Counting(task) for task in plain()]


def build_mc():
    return [Counting(plain()[0])]
'''


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models run several times faster on one thread than on two contended ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def series_model(seed: int):
    """A tiny GPT-2 near a shared random point: weights large enough for confident, varied predictions
    (the default init gives near-uniform ones), each checkpoint drifted differently from the others."""
    model = tiny_gpt2(0)
    shared, own = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                shape = parameter.shape
                parameter.copy_(
                    0.3 * torch.randn(shape, generator=shared) + 0.15 * torch.randn(shape, generator=own)
                )
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    """Five Trainer-style checkpoint directories (weights, config, tokenizer), different weights each."""
    root = tmp_path_factory.mktemp("series")
    tokenizer = tiny_tokenizer()
    paths = []
    for seed, step in enumerate(STEPS):
        path = root / f"checkpoint-{step}"
        series_model(seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


@pytest.fixture
def tasks_module(tmp_path, monkeypatch):
    """cli_tasks.py in the working directory, importable as --tasks cli_tasks:build; fresh per test."""
    (tmp_path / "cli_tasks.py").write_text(TASKS_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI adds the working directory
    monkeypatch.delitem(sys.modules, "cli_tasks", raising=False)
    yield lambda: sys.modules["cli_tasks"]
    sys.modules.pop("cli_tasks", None)


def reference_average(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The definition: float64 sum in series order, one division, rounded to the stored dtype;
    non-floating tensors from the last checkpoint."""
    out = {}
    for name, last in state_dicts[-1].items():
        if last.is_floating_point():
            total = sum(state[name].to(torch.float64) for state in state_dicts)
            out[name] = (total / len(state_dicts)).to(last.dtype)
        else:
            out[name] = last
    return out


def read_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, single file or shards, with safetensors' own reader."""
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        assert torch.equal(actual[name], value), name


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------------ average


def test_average_of_model_directories_is_the_float64_mean_and_loads(checkpoints, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    inputs = checkpoints[:3]
    out = tmp_path / "avg"
    code, stdout, _ = run(["average", *inputs, "-o", out, "--no-progress"], capsys)
    assert code == 0 and str(out) in stdout
    assert_same_tensors(read_dir(out), reference_average([read_dir(p) for p in inputs]))
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        # save_pretrained dropped the tied lm_head; the average drops it too.
        assert "lm_head.weight" not in handle.keys()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (inputs[-1] / name).read_bytes()
    model = AutoModelForCausalLM.from_pretrained(out)
    wte = read_dir(out)["transformer.wte.weight"]
    assert torch.equal(model.state_dict()["lm_head.weight"], wte)  # re-tied on load


def test_average_of_sharded_checkpoints_keeps_the_shard_layout(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    inputs = []
    for seed in range(3):
        path = tmp_path / f"sharded-{seed}"
        tiny_gpt2(seed).save_pretrained(path, max_shard_size="50KB")
        inputs.append(path)
    index_in = json.loads((inputs[-1] / "model.safetensors.index.json").read_text())
    assert len(set(index_in["weight_map"].values())) > 1  # really sharded
    out = tmp_path / "avg"
    code, _, _ = run(["average", *inputs, "-o", out, "--no-progress"], capsys)
    assert code == 0
    index_out = json.loads((out / "model.safetensors.index.json").read_text())
    assert index_out["weight_map"] == index_in["weight_map"]
    assert index_out["metadata"] == index_in["metadata"]
    for shard in set(index_in["weight_map"].values()):
        with safe_open(str(out / shard), framework="pt") as a, safe_open(str(inputs[-1] / shard), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            assert a.metadata() == b.metadata()
    assert not (out / "model.safetensors").exists()
    assert_same_tensors(read_dir(out), reference_average([read_dir(p) for p in inputs]))
    AutoModelForCausalLM.from_pretrained(out)

    # The index itself is a valid argument; the output is then a directory of the same layout.
    out2 = tmp_path / "avg2"
    code, _, _ = run(
        ["average", *(p / "model.safetensors.index.json" for p in inputs), "-o", out2, "--no-progress"],
        capsys,
    )
    assert code == 0
    assert_same_tensors(read_dir(out2), read_dir(out))


def mixed_files(directory: Path, count: int = 3) -> list[Path]:
    """Bare safetensors files with every kind of tensor the average treats differently."""
    paths = []
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        tensors = {
            "w32": torch.randn(4, 3, generator=generator),
            "w16": torch.randn(5, generator=generator).half(),
            "wbf": torch.randn(2, 6, generator=generator).bfloat16(),
            "w64": torch.randn(3, generator=generator).double(),
            "scalar": torch.randn((), generator=generator),
            "count": torch.tensor([i * 10, 7]),
            "mask": torch.tensor([i % 2 == 0, True]),
        }
        path = directory / f"snap-{i}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt", "written_by": f"file {i}"})
        paths.append(path)
    return paths


def test_average_of_bare_files_mixes_dtypes_and_keeps_metadata(tmp_path, capsys):
    inputs = mixed_files(tmp_path)
    out = tmp_path / "avg.safetensors"
    code, _, _ = run(["average", *inputs, "-o", out, "--no-progress"], capsys)
    assert code == 0
    expected = reference_average([load_file(p) for p in inputs])
    assert_same_tensors(load_file(out), expected)
    assert torch.equal(expected["count"], torch.tensor([20, 7]))  # from the last checkpoint
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata.pop("checkpoint_stability_average"))["inputs"] == list(map(str, inputs))
    assert metadata == {"format": "pt", "written_by": "file 2"}

    code, _, err = run(["average", *inputs, "-o", out], capsys)
    assert code == 2 and "already exists" in err
    code, _, _ = run(["average", *inputs[:2], "-o", out, "--overwrite", "--no-progress"], capsys)
    assert code == 0
    assert_same_tensors(load_file(out), reference_average([load_file(p) for p in inputs[:2]]))


def test_console_script_averages_in_a_subprocess(tmp_path):
    inputs = mixed_files(tmp_path, count=2)
    out = tmp_path / "avg.safetensors"
    script = Path(sys.executable).parent / "checkpoint-stability"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "checkpoint_stability"]
    done = subprocess.run(
        [*command, "average", *map(str, inputs), "-o", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert_same_tensors(load_file(out), reference_average([load_file(p) for p in inputs]))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda t: t.update(w32=torch.zeros(4, 4)), ["'w32'", "shape", "(4, 3)", "(4, 4)"]),
        (lambda t: t.update(w16=t["w16"].float()), ["'w16'", "dtype", "F16", "F32"]),
        (lambda t: t.update(extra=torch.zeros(1)), ["'extra'"]),
        (lambda t: t.pop("mask"), ["'mask'"]),
    ],
    ids=["shape", "dtype", "extra-key", "missing-key"],
)
def test_mismatched_checkpoints_exit_2_naming_the_tensor(tmp_path, capsys, change, words):
    good = mixed_files(tmp_path, count=2)
    tensors = load_file(good[1])
    change(tensors)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    code, _, err = run(["average", *good, bad, "-o", tmp_path / "out.safetensors"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for word in [*words, str(good[0]), str(bad)]:
        assert word in err
    assert not (tmp_path / "out.safetensors").exists()


def test_pickle_and_missing_checkpoints_are_refused(tmp_path, checkpoints, capsys):
    trainer_dir = tmp_path / "checkpoint-7"
    trainer_dir.mkdir()
    (trainer_dir / "pytorch_model.bin").write_bytes(b"never unpickled")
    (trainer_dir / "config.json").write_text("{}")
    for argument in (trainer_dir, trainer_dir / "pytorch_model.bin"):
        code, _, err = run(["average", checkpoints[0], argument, "-o", tmp_path / "out"], capsys)
        assert (
            code == 2 and "only safetensors checkpoints are supported" in err and "pytorch_model.bin" in err
        )
    code, _, err = run(["average", tmp_path / "nowhere", "-o", tmp_path / "out"], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run(["average", *checkpoints[:2], "-o", checkpoints[1]], capsys)
    assert code == 2 and "one of the input checkpoints" in err


# ------------------------------------------------------------------------------------------------ analyze


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def outputs_lines(run_dir: Path, task: str) -> dict[tuple, dict]:
    lines = [json.loads(line) for line in (run_dir / "examples" / f"{task}.jsonl").read_text().splitlines()]
    keyed = {(line["step"], line["variant"], line["window"]): line for line in lines}
    assert len(keyed) == len(lines)  # one line per (step, variant, window)
    return keyed


def hand_vote(window: list, targets: list) -> tuple[list, list[float]]:
    """Majority per example; a tie to the highest summed log-prob (when there are any), then to the
    newest checkpoint's output. ``window``: (outputs, choice_logprobs or None) per checkpoint."""
    combined = []
    for i in range(len(targets)):
        votes = Counter(outputs[i] for outputs, _ in window)
        top = max(votes.values())
        tied = [output for output, count in votes.items() if count == top]
        if len(tied) > 1 and all(logprobs is not None for _, logprobs in window):
            sums = {c: math.fsum(logprobs[i][c] for _, logprobs in window) for c in tied}
            tied = [c for c in tied if sums[c] == max(sums.values())]
        if len(tied) > 1:
            tied = [next(outputs[i] for outputs, _ in reversed(window) if outputs[i] in tied)]
        combined.append(tied[0])
    return combined, [float(o == t) for o, t in zip(combined, targets, strict=True)]


def hand_mtv(scores: list[float]) -> float:
    return sum(abs(b - a) for a, b in itertools.pairwise(scores)) / (len(scores) - 1)


def hand_is(rows: list[list]) -> float:
    n, m = len(rows[0]), len(rows)
    return sum(sum(rows[t][i] != rows[t + 1][i] for t in range(m - 1)) / (m - 1) for i in range(n)) / n


def evaluate(task, model):
    from checkpoint_stability.isolation import isolated_evaluation

    with isolated_evaluation(model):
        return task.evaluate(model)


def analyze_argv(checkpoints, run_dir, windows="1,2,3", tasks="cli_tasks:build", *extra):
    # Given out of order on purpose: the series is sorted by the steps in the directory names.
    return ["analyze", *reversed(checkpoints), "-o", run_dir, "--windows", windows, "--tasks", tasks, *extra]


def test_analyze_against_direct_evaluation_averages_and_hand_votes(
    checkpoints, tmp_path, tasks_module, capsys
):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    argv = analyze_argv(checkpoints, run_dir, "1,2,3", "cli_tasks:build", "--horizon", "3", "--no-report")
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    module = tasks_module()
    # Raw: 5 checkpoints; avg: one per distinct number of averaged checkpoints (2 at step 200, 2 and 3
    # later; an average of one checkpoint is the checkpoint itself): 7. Per task.
    assert Counter(module.CALLS) == {"mc": 12, "next": 12}
    assert "24 task evaluation(s) run" in stdout

    records = history(run_dir)
    keys = [(r["step"], r["task"], r["variant"], r["window"]) for r in records]
    assert len(keys) == len(set(keys))
    pairs = [("raw", 1), ("avg", 2), ("ens", 2), ("avg", 3), ("ens", 3)]
    assert set(keys) == {(s, t, v, w) for s in STEPS for t in ("mc", "next", "mean") for v, w in pairs}
    by_key = {key: r for key, r in zip(keys, records, strict=True)}
    for (step, _, variant, window), record in by_key.items():
        k = STEPS.index(step) + 1
        assert record["n_models"] == (1 if variant == "raw" else min(window, k))

    states = [read_dir(p) for p in checkpoints]
    oracle_model = AutoModelForCausalLM.from_pretrained(checkpoints[0])
    for task in module.plain():
        lines = outputs_lines(run_dir, task.name)
        raw = {}
        for step, path in zip(STEPS, checkpoints, strict=True):
            raw[step] = evaluate(task, AutoModelForCausalLM.from_pretrained(path))
            assert by_key[(step, task.name, "raw", 1)]["score"] == raw[step].score
            assert lines[(step, "raw", 1)]["outputs"] == raw[step].outputs
        for k, step in enumerate(STEPS, start=1):
            for window in (2, 3):
                n = min(window, k)
                oracle_model.load_state_dict(reference_average(states[k - n : k]), strict=False)
                expected = evaluate(task, oracle_model)
                assert by_key[(step, task.name, "avg", window)]["score"] == expected.score
                assert lines[(step, "avg", window)]["outputs"] == expected.outputs
                window_results = [(raw[s].outputs, raw[s].choice_logprobs) for s in STEPS[k - n : k]]
                outputs, correct = hand_vote(window_results, raw[step].targets)
                assert lines[(step, "ens", window)]["outputs"] == outputs
                assert by_key[(step, task.name, "ens", window)]["score"] == pytest.approx(
                    sum(correct) / len(correct), abs=1e-12
                )
        # Live MTV and IS over the trailing horizon (3) of each series, the record's own included.
        for variant, window in pairs:
            scores = [by_key[(s, task.name, variant, window)]["score"] for s in STEPS]
            rows = [lines[(s, variant, window)]["outputs"] for s in STEPS]
            for k, step in enumerate(STEPS, start=1):
                record = by_key[(step, task.name, variant, window)]
                if k == 1:
                    assert record["mtv"] is None and record["is"] is None
                    continue
                trailing = slice(max(0, k - 3), k)
                assert record["mtv"] == pytest.approx(hand_mtv(scores[trailing]), abs=1e-12)
                assert record["is"] == pytest.approx(hand_is(rows[trailing]), abs=1e-12)
    for step in STEPS:
        for variant, window in pairs:
            mean = by_key[(step, "mean", variant, window)]
            parts = [by_key[(step, t, variant, window)] for t in ("mc", "next")]
            assert mean["score"] == pytest.approx(sum(p["score"] for p in parts) / 2, abs=1e-12)
            if step > STEPS[0]:
                assert mean["is"] == pytest.approx(sum(p["is"] for p in parts) / 2, abs=1e-12)

    # A rerun evaluates nothing and writes nothing.
    before = (run_dir / "history.jsonl").read_bytes()
    module.CALLS.clear()
    code, stdout, _ = run(argv, capsys)
    assert code == 0 and module.CALLS == [] and "0 task evaluation(s) run, 24 already" in stdout
    assert (run_dir / "history.jsonl").read_bytes() == before

    # A new window: only the averages of 4 checkpoints are new (steps 400 and 500); the rest is reused.
    argv4 = analyze_argv(checkpoints, run_dir, "1,2,3,4", "cli_tasks:build", "--horizon", "3", "--no-report")
    code, _, _ = run(argv4, capsys)
    assert code == 0 and Counter(module.CALLS) == {"mc": 2, "next": 2}
    records = history(run_dir)
    assert len(records) == len(by_key) + len(STEPS) * 3 * 2
    new = {(r["step"], r["task"], r["variant"]): r for r in records if r["window"] == 4}
    for step in STEPS[:3]:  # a window of 4 holds the same checkpoints as a window of 3 there
        for task in ("mc", "next"):
            assert new[(step, task, "avg")]["score"] == by_key[(step, task, "avg", 3)]["score"]
            assert new[(step, task, "avg")]["n_models"] == STEPS.index(step) + 1


def test_an_interrupted_analysis_resumes_without_repeating_work(checkpoints, tmp_path, tasks_module, capsys):
    run_dir = tmp_path / "run"
    argv = analyze_argv(checkpoints[:4], run_dir, "1,3", "cli_tasks:build_mc", "--no-progress", "--no-report")
    # An uninterrupted run of the same analysis, for comparison.
    clean_dir = tmp_path / "clean"
    assert (
        run(analyze_argv(checkpoints[:4], clean_dir, "1,3", "cli_tasks:build_mc", "--no-report"), capsys)[0]
        == 0
    )
    module = tasks_module()
    total = len(module.CALLS)
    assert total == 4 + 3  # raw at 4 steps; averages of 2 (step 200) and of 3 (steps 300 and 400)
    module.CALLS.clear()
    module.FAIL_AT_CALL = 4
    with pytest.raises(RuntimeError, match="interrupted on purpose"):
        main([str(a) for a in argv])
    module.FAIL_AT_CALL = None
    assert run(argv, capsys)[0] == 0
    # Steps 100 and 200 were stored before the failure (call 4: raw at step 300); only the failed call
    # is repeated.
    assert len(module.CALLS) == total + 1

    def essentials(directory):
        return sorted(
            (r["step"], r["task"], r["variant"], r["window"], r["n_models"], r["score"], r["mtv"], r["is"])
            for r in history(directory)
        )

    assert essentials(run_dir) == essentials(clean_dir)
    assert outputs_lines(run_dir, "mc") == outputs_lines(clean_dir, "mc")


def test_analyze_bare_files_with_a_model_config(checkpoints, tmp_path, tasks_module, capsys):
    run_dir = tmp_path / "run"
    files = [p / "model.safetensors" for p in checkpoints[:3]]
    base = ["analyze", *files, "-o", run_dir, "--windows", "1,2", "--tasks", "cli_tasks:build_mc"]
    code, _, err = run(base, capsys)
    assert code == 2 and "--model-config" in err
    code, _, err = run([*base, "--model-config", checkpoints[0], "--no-report"], capsys)
    assert code == 0, err
    records = {(r["step"], r["task"], r["variant"], r["window"]): r["score"] for r in history(run_dir)}
    assert {step for step, *_ in records} == set(STEPS[:3])  # steps from the parent directories' names

    dir_run = tmp_path / "dir-run"
    code, _, _ = run(
        [
            "analyze",
            *checkpoints[:3],
            "-o",
            dir_run,
            "--windows",
            "1,2",
            "--tasks",
            "cli_tasks:build_mc",
            "--no-report",
        ],
        capsys,
    )
    assert code == 0
    assert records == {
        (r["step"], r["task"], r["variant"], r["window"]): r["score"] for r in history(dir_run)
    }


def test_analyze_refuses_what_it_cannot_do(checkpoints, tmp_path, tasks_module, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run(["analyze", *checkpoints[:2], "-o", run_dir], capsys)
    assert code == 2 and "no tasks" in err
    code, _, err = run(
        ["analyze", *checkpoints[:2], "-o", run_dir, "--tasks", "no_such_module:build"], capsys
    )
    assert code == 2 and "cannot import 'no_such_module'" in err
    code, _, err = run(["analyze", *checkpoints[:2], "-o", run_dir, "--tasks", "cli_tasks:nothing"], capsys)
    assert code == 2 and "no function 'nothing'" in err
    code, _, err = run(
        ["analyze", *checkpoints[:2], "-o", run_dir, "--tasks", "cli_tasks", "--no-report"], capsys
    )
    assert code == 2 and "MODULE:FUNCTION" in err
    code, _, err = run(analyze_argv(checkpoints, run_dir, "1,0"), capsys)
    assert code == 2 and "--windows" in err

    first = ["analyze", *checkpoints[1:3], "-o", run_dir, "--windows", "1,2", "--tasks", "cli_tasks:build_mc"]
    assert run([*first, "--no-report"], capsys)[0] == 0
    other = ["analyze", *checkpoints[0:2], "-o", run_dir, "--windows", "1,2", "--tasks", "cli_tasks:build_mc"]
    code, _, err = run([*other, "--no-report"], capsys)
    assert code == 2 and "another series" in err and "checkpoint-100" in err

    # A directory another run holds (a live training run, or another analysis) is refused.
    from checkpoint_stability.storage.run_lock import RunLock

    held = RunLock(run_dir)
    try:
        code, _, err = run([*first, "--no-report"], capsys)
    finally:
        held.release()
    assert code == 2 and "in use by another run" in err

    small = tmp_path / "checkpoint-600"
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tiny_tokenizer()), n_positions=256, n_embd=16, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(small)
    code, _, err = run(
        ["analyze", *checkpoints[:2], small, "-o", tmp_path / "r2", "--tasks", "cli_tasks:build"], capsys
    )
    assert code == 2 and "'transformer.h.0.attn.c_attn.bias'" in err and "shape" in err


def test_help_of_every_command(capsys):
    assert main(["--help"]) == 0
    assert "average" in capsys.readouterr().out
    for command, words in {
        "report": ["RUN_DIR"],
        "average": ["float64", "--overwrite", "pickle"],
        "analyze": [
            "--windows",
            "--tasks",
            "--lm-eval",
            "--include-path",
            "--model-config",
            "checkpoint-<N>",
        ],
    }.items():
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        for word in words:
            assert word in out, (command, word)
    assert main(["average"]) == 2  # argparse's own usage error


def test_report_command(checkpoints, tmp_path, tasks_module, capsys):
    pytest.importorskip("checkpoint_stability.reporting.report")
    run_dir = tmp_path / "run"
    argv = ["analyze", *checkpoints[:3], "-o", run_dir, "--windows", "1,2", "--tasks", "cli_tasks:build_mc"]
    assert run(argv, capsys)[0] == 0
    assert (run_dir / "report").is_dir()
    shutil.rmtree(run_dir / "report")
    code, stdout, err = run(["report", run_dir], capsys)
    assert code == 0, err
    assert (run_dir / "report").is_dir() and "report" in stdout
    code, _, err = run(["report", tmp_path / "nowhere"], capsys)
    assert code == 2


def test_analyze_with_lm_eval_tasks(checkpoints, tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    import datasets.config

    from checkpoint_stability.tasks.lm_eval import LmEvalTask

    # Offline, with the datasets cache in the test's own directory; the YAMLs name their data by path.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    data = Path(__file__).parent / "data" / "lm_eval"
    include = tmp_path / "lm_eval_tasks"
    include.mkdir()
    (include / "cs_mc.yaml").write_text((data / "cs_mc.yaml").read_text().replace("__DATA_DIR__", str(data)))
    run_dir = tmp_path / "run"
    argv = ["analyze", *checkpoints[:2], "-o", run_dir, "--windows", "1,2", "--lm-eval", "cs_mc"]
    code, _, err = run(
        [*argv, "--include-path", include, "--limit", "4", "--no-report", "--no-progress"], capsys
    )
    assert code == 0, err
    records = {(r["step"], r["task"], r["variant"], r["window"]): r for r in history(run_dir)}
    pairs = [("raw", 1), ("avg", 2), ("ens", 2)]
    assert set(records) == {(s, t, v, w) for s in STEPS[:2] for t in ("cs_mc", "mean") for v, w in pairs}
    # The tokenizer came from the first checkpoint; the raw scores are the task's own on each checkpoint.
    from transformers import AutoModelForCausalLM

    task = LmEvalTask("cs_mc", "cs_mc", tokenizer=tiny_tokenizer(), include_path=include, limit=4)
    for step, path in zip(STEPS[:2], checkpoints[:2], strict=True):
        expected = evaluate(task, AutoModelForCausalLM.from_pretrained(path))
        assert records[(step, "cs_mc", "raw", 1)]["score"] == expected.score
        assert outputs_lines(run_dir, "cs_mc")[(step, "raw", 1)]["outputs"] == expected.outputs
    # Other documents are another task: the stored results are not reused for it.
    code, _, err = run([*argv, "--include-path", include, "--no-report"], capsys)
    assert code == 2 and "task 'cs_mc' differs" in err and "example_ids" in err
    empty = tmp_path / "no_tasks_here"
    empty.mkdir()
    code, _, err = run([*argv, "--include-path", empty, "--no-report"], capsys)
    assert code == 2 and "lm-eval knows no task 'cs_mc'" in err


def test_analyze_with_a_holdout_writes_both_halves_as_a_live_run_does(
    checkpoints, tmp_path, tasks_module, capsys
):
    import hashlib

    run_dir = tmp_path / "held"
    argv = analyze_argv(checkpoints[:3], run_dir, "1,2", "cli_tasks:build", "--holdout", "0.5", "--no-report")
    code, _, err = run(argv, capsys)
    assert code == 0, err
    records = history(run_dir)
    assert records and all("selection_score" in r and "confirmation_score" in r for r in records)
    for task in ("mc", "next"):
        meta = json.loads((run_dir / "examples" / f"{task}.meta.json").read_text())
        # DESIGN.md's rule, written out here: sha256("<task>/<id>")[:8] / 2**32 < 0.5 is held out.
        held = {
            i
            for i, example_id in enumerate(meta["example_ids"])
            if int(hashlib.sha256(f"{task}/{json.dumps(example_id)}".encode()).hexdigest()[:8], 16) / 2**32
            < 0.5
        }
        lines = outputs_lines(run_dir, task)
        for record in (r for r in records if r["task"] == task):
            correct = lines[(record["step"], record["variant"], record["window"])]["correct"]
            kept = [c for i, c in enumerate(correct) if i not in held]
            confirmed = [c for i, c in enumerate(correct) if i in held]
            assert record["selection_score"] == pytest.approx(math.fsum(kept) / len(kept), abs=1e-12)
            assert record["confirmation_score"] == pytest.approx(
                math.fsum(confirmed) / len(confirmed), abs=1e-12
            )
    # The same directory with another holdout would mix halves: refused, naming the setting.
    code, _, err = run(
        analyze_argv(checkpoints[:3], run_dir, "1,2", "cli_tasks:build", "--no-report"), capsys
    )
    assert code != 0 and "holdout=0.5" in err
    code, _, err = run(
        analyze_argv(checkpoints[:3], tmp_path / "bad", "1,2", "cli_tasks:build", "--holdout", "1.5"), capsys
    )
    assert code == 2 and "--holdout must be a number strictly between 0 and 1" in err
