"""First contact without Python: ``checkpoint-stability best``, ``best_model_path`` / ``load_best`` from
another process, and ``analyze --text`` on a plain-text file.

Oracles: best.json read back with ``json``; a fresh process scoring the loaded best model itself; next-token
predictions computed here by a plain loop over each checkpoint loaded with ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_lm import CORPUS, tiny_gpt2, tiny_tokenizer
from tiny_training import classify_task, make_data, train

import checkpoint_stability
from checkpoint_stability import StabilityMonitor, best_model_path
from checkpoint_stability.offline.cli import main

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
STEPS = [60, 90, 120]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models run several times faster on one thread than on two contended ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def monitored_run(run_dir: Path, **settings) -> StabilityMonitor:
    x, y = make_data(11)
    monitor = StabilityMonitor(
        [classify_task(x, y)],
        dirpath=run_dir,
        window=3,
        every_n_steps=5,
        console=False,
        tensorboard=False,
        report=False,
        **settings,
    )
    train(30, monitor)
    monitor.close()
    return monitor


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("run")
    monitored_run(path, min_snapshots=2)
    return path


# ------------------------------------------------------------------------------------------------ best


def test_best_prints_what_best_json_says(run_dir, capsys):
    best = json.loads((run_dir / "best.json").read_text())
    assert main(["best", str(run_dir)]) == 0
    out = capsys.readouterr().out
    # "key: value" lines; the evidence block below them is indented.
    lines = dict(line.split(":", 1) for line in out.strip().splitlines() if ":" in line and line[0] != " ")
    assert lines["step"].strip() == str(best["step"])
    assert lines["variant"].split()[0] == best["variant"] == "avg"
    assert lines["steps"].strip() == ", ".join(map(str, best["steps"]))
    assert float(lines["score"].split()[0]) == pytest.approx(best["score"], rel=1e-5)
    assert repr(best["metric"]) in lines["score"]
    assert lines["export"].strip() == str(run_dir / best["path"])
    assert (run_dir / best["path"] / "model.safetensors").is_file()


def test_best_json_is_best_json(run_dir, capsys):
    assert main(["best", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((run_dir / "best.json").read_text())


def test_best_model_path_is_the_export_best_json_names(run_dir, tmp_path):
    best = json.loads((run_dir / "best.json").read_text())
    assert checkpoint_stability.best_model_path is best_model_path
    assert "best_model_path" in checkpoint_stability.__all__
    assert best_model_path(run_dir) == run_dir / best["path"]
    assert best_model_path(str(run_dir)) == run_dir / best["path"]
    assert best_model_path(tmp_path) is None
    # An ensemble best is not one set of weights: no path.
    (tmp_path / "best.json").write_text(json.dumps({**best, "variant": "ens", "path": None}))
    assert best_model_path(tmp_path) is None


def test_a_run_without_a_best_exits_1(tmp_path, capsys):
    monitored_run(tmp_path, select=None)
    assert (tmp_path / "run.json").is_file() and not (tmp_path / "best.json").exists()
    assert main(["best", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "no best model" in captured.err and "best.json" in captured.err


@pytest.mark.parametrize(
    "damage",
    [
        lambda best: "{not json",
        lambda best: json.dumps({**best, "step": "forty"}),
        lambda best: json.dumps({**best, "path": "exports/step-00000001-avg"}),  # no such export
        lambda best: json.dumps([best]),
    ],
    ids=["not-json", "wrong-type", "missing-export", "not-an-object"],
)
def test_a_damaged_best_json_exits_2_naming_the_file(run_dir, tmp_path, capsys, damage):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    best = json.loads((copy / "best.json").read_text())
    (copy / "best.json").write_text(damage(best))
    assert main(["best", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(copy / "best.json") in err


def test_best_refuses_what_is_not_a_run_directory(run_dir, tmp_path, capsys):
    assert main(["best", str(tmp_path / "missing")]) == 2
    assert "no directory" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["best", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().err
    # A logger directory holding the run one level down: the message points at it.
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "stability").symlink_to(run_dir)
    assert main(["best", str(tmp_path / "logs")]) == 2
    err = capsys.readouterr().err
    assert "not a run directory" in err and str(tmp_path / "logs" / "stability") in err


def test_load_best_from_a_fresh_process_scores_what_best_json_records(tmp_path):
    """One process trains and writes the run; another, knowing only the directory, loads the best into
    a freshly initialised model and evaluates the same task itself."""
    run = tmp_path / "run"
    write = textwrap.dedent(
        f"""
        from tiny_training import classify_task, make_data, train
        from checkpoint_stability import StabilityMonitor
        x, y = make_data(11)
        monitor = StabilityMonitor([classify_task(x, y)], dirpath={str(run)!r}, window=3, every_n_steps=5,
                                   console=False, tensorboard=False, report=False, min_snapshots=2)
        train(30, monitor)
        monitor.close()
        """
    )
    read = textwrap.dedent(
        f"""
        import json, torch
        from tiny_training import Net, classify_task, make_data
        from checkpoint_stability import best_model_path, load_best
        torch.manual_seed(12345)  # another initialisation than training's
        model = Net()
        before = {{k: v.clone() for k, v in model.state_dict().items()}}
        best = load_best({str(run)!r}, model)
        changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        x, y = make_data(11)
        model.eval()
        with torch.no_grad():
            result = classify_task(x, y).evaluate(model)
        print(json.dumps({{"best": best, "score": result.score, "changed": changed,
                          "path": str(best_model_path({str(run)!r}))}}))
        """
    )
    for script in (write, read):
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=subprocess_env()
        )
        assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    best = json.loads((run / "best.json").read_text())
    assert seen["best"] == best and seen["changed"]
    assert seen["path"] == str(run / best["path"])
    assert seen["score"] == pytest.approx(best["score"], abs=1e-12)
    assert seen["score"] == pytest.approx(best["scores"]["cls"], abs=1e-12)
    # The console script reads the same run from yet another process.
    script = Path(sys.executable).parent / "checkpoint-stability"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "checkpoint_stability"]
    done = subprocess.run([*command, "best", str(run)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"step:     {best['step']}" in done.stdout and str(run / best["path"]) in done.stdout


# ------------------------------------------------------------------------------------------------ --text


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:
    """Three Trainer-style checkpoint directories (weights, config, tokenizer) of one short training run
    on the corpus, so the later ones predict some of the text and the scores are not all 0."""
    root = tmp_path_factory.mktemp("series")
    tokenizer = tiny_tokenizer()
    model = tiny_gpt2(0).train()
    ids = torch.tensor(tokenizer.encode("\n".join(CORPUS[:6])))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    paths = []
    for step in range(1, STEPS[-1] + 1):
        starts = torch.randint(0, len(ids) - 32, (8,), generator=generator)
        batch = torch.stack([ids[s : s + 32] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in STEPS:
            path = root / f"checkpoint-{step}"
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            paths.append(path)
    return paths


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    """About 40 kB of text: far more than the tokens kept, so only its start is read."""
    generator = torch.Generator().manual_seed(0)
    lines = [CORPUS[int(i)] for i in torch.randint(0, 6, (600,), generator=generator)]
    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def oracle_outputs(checkpoint: Path, text: str, block_size: int, max_tokens: int) -> tuple[list, list]:
    """Predicted and true next tokens over the first ``max_tokens`` predictions, by a plain loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(checkpoint).encode(text, add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    predicted, targets = [], []
    with torch.no_grad():
        for start in range(0, len(ids), block_size):
            block = ids[start : start + block_size]
            if len(block) < 2:
                continue
            logits = model(torch.tensor([block])).logits[0]
            for t in range(len(block) - 1):
                predicted.append(int(logits[t].argmax()))
                targets.append(block[t + 1])
            if len(targets) >= max_tokens:
                break
    return predicted[:max_tokens], targets[:max_tokens]


def test_analyze_text_scores_equal_a_plain_next_token_loop(series, heldout, tmp_path, capsys):
    out = tmp_path / "analysis"
    block, max_tokens = 40, 300
    args = ["analyze", *map(str, series), "-o", str(out), "--windows", "1,2", "--text", str(heldout)]
    args += ["--text-block-size", str(block), "--text-max-tokens", str(max_tokens), "--no-progress"]
    assert main([*args, "--no-report"]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    mine = [r for r in records if r.get("task") == "heldout"]
    text = heldout.read_text(encoding="utf-8")
    lines = [json.loads(line) for line in (out / "examples" / "heldout.jsonl").read_text().splitlines()]
    for step, checkpoint in zip(STEPS, series, strict=True):
        predicted, targets = oracle_outputs(checkpoint, text, block, max_tokens)
        assert len(targets) == max_tokens
        raw = next(r for r in mine if r["step"] == step and r["variant"] == "raw")
        assert raw["score"] == pytest.approx(
            sum(p == y for p, y in zip(predicted, targets, strict=True)) / max_tokens
        )
        line = next(x for x in lines if x["step"] == step and x["variant"] == "raw")
        assert line["outputs"] == predicted
    meta = json.loads((out / "examples" / "heldout.meta.json").read_text())
    assert meta["targets"] == targets and meta["kind"] == "next_token"
    raw_scores = [r["score"] for r in mine if r["variant"] == "raw"]
    assert min(raw_scores) > 0 and max(raw_scores) < 1 and len(set(raw_scores)) == 3  # not degenerate
    for variant in ("avg", "ens"):
        found = sorted(
            (r["step"], r["n_models"]) for r in mine if r["variant"] == variant and r["window"] == 2
        )
        assert found == [(60, 1), (90, 2), (120, 2)]
    # A rerun resumes: nothing is evaluated again.
    capsys.readouterr()
    assert main([*args, "--no-report"]) == 0
    assert "0 task evaluation(s) run" in capsys.readouterr().out
    # The same name over other examples would mix two tasks in one series: refused.
    changed = [*args[:-5], "--text-max-tokens", "200", "--no-progress", "--no-report"]
    assert main(changed) == 2
    assert "differs from the one recorded" in capsys.readouterr().err


def test_text_combines_with_tasks_and_takes_a_name(series, heldout, tmp_path, capsys, monkeypatch):
    (tmp_path / "more_tasks.py").write_text(
        "from tiny_lm import CORPUS, tiny_tokenizer\n"
        "from checkpoint_stability import NextTokenTask\n"
        "def build():\n"
        "    return [NextTokenTask('corpus', [tiny_tokenizer().encode(CORPUS[0])], max_tokens=5)]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    out = tmp_path / "analysis"
    second = tmp_path / "other.txt"
    second.write_text(CORPUS[1] + "\n" + CORPUS[2] + "\n")
    args = ["analyze", *map(str, series), "-o", str(out), "--windows", "1", "--tasks", "more_tasks:build"]
    args += ["--text", str(heldout), "--text-name", "wiki", "--text", str(second), "--text-name", "plays"]
    assert main([*args, "--text-max-tokens", "20", "--no-progress", "--no-report"]) == 0
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["tasks"] == ["corpus", "plays", "wiki"]
    sys.modules.pop("more_tasks", None)


def test_checkpoints_whose_tokenizers_disagree_are_refused(series, heldout, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Same vocabulary size, other merges: the text gets other token ids.
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([line[::-1] for line in CORPUS], trainer)
    other = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    odd = tmp_path / "checkpoint-400"
    shutil.copytree(series[-1], odd)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (odd / name).unlink(missing_ok=True)
    other.save_pretrained(odd)
    out = tmp_path / "analysis"
    args = ["analyze", *map(str, series), str(odd), "-o", str(out), "--windows", "1,2"]
    args += ["--text", str(heldout), "--text-max-tokens", "30", "--no-progress", "--no-report"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenize it differently" in err
    assert str(heldout) in err and str(odd) in err and "--tokenizer" in err
    assert not (out / "history.jsonl").exists()
    # --tokenizer says which one all checkpoints use.
    assert main([*args, "--tokenizer", str(series[0])]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, ["does not exist"]),
        (b"", ["is empty"]),
        (b"caf\xe9 au lait\n", ["not UTF-8"]),
        (b"x", ["1 token(s)"]),
    ],
    ids=["missing", "empty", "latin-1", "one-token"],
)
def test_unusable_text_files_exit_2_naming_the_file(series, tmp_path, capsys, content, words):
    path = tmp_path / "heldout.txt"
    if content is not None:
        path.write_bytes(content)
    args = ["analyze", *map(str, series), "-o", str(tmp_path / "out"), "--text", str(path), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err
    for word in words:
        assert word in err


def test_text_options_are_checked_against_the_model(series, heldout, tmp_path, capsys):
    base = ["analyze", *map(str, series), "-o", str(tmp_path / "out"), "--text", str(heldout)]
    assert main([*base, "--text-block-size", "257"]) == 2
    err = capsys.readouterr().err
    assert "--text-block-size 257" in err and "256" in err
    assert main([*base, "--text-block-size", "1"]) == 2
    assert main([*base, "--text-max-tokens", "0"]) == 2
    assert main([*base, "--text-name", "a", "--text-name", "b"]) == 2
    assert "one name per file" in capsys.readouterr().err
    assert main([*base, "--text-name", "mean"]) == 2
    assert "reserved" in capsys.readouterr().err
    # A bare weights file has no tokenizer beside it: --model-config's is used, or --tokenizer.
    bare = tmp_path / "step-100.safetensors"
    shutil.copyfile(series[0] / "model.safetensors", bare)
    config = tmp_path / "config"
    config.mkdir()
    shutil.copyfile(series[0] / "config.json", config / "config.json")
    args = ["analyze", str(bare), "-o", str(tmp_path / "bare"), "--model-config", str(config)]
    args += ["--text", str(heldout), "--text-max-tokens", "10", "--no-progress", "--no-report"]
    assert main(args) == 2
    assert "--tokenizer DIR" in capsys.readouterr().err
    assert main([*args, "--tokenizer", str(series[0])]) == 0, capsys.readouterr().err


def test_a_text_task_reads_on_until_it_has_the_tokens_and_matches_the_whole_text(tmp_path):
    """Only the start of a long file is read and tokenized, in growing pieces ending at line ends; the
    tokens kept are those of the whole text."""
    from checkpoint_stability.offline.analysis import text_task

    calls = []

    def word_tokenizer(text, **settings):  # one token per word: about 40 characters per token here
        calls.append(len(text))
        return {"input_ids": [sum(map(ord, word)) % 97 for word in text.split()]}

    generator = torch.Generator().manual_seed(0)
    words = ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (39,), generator=generator))]
    words += [w[::-1] for w in words] + [w[1:] + w[0] for w in words]
    lines = [
        " ".join(words[int(i)] for i in torch.randint(0, 3, (5,), generator=generator)) for _ in range(3000)
    ]
    path = tmp_path / "long.txt"
    path.write_text("\n".join(lines) + "\n")
    task = text_task(path, [("words", word_tokenizer)], block_size=10, max_tokens=900)
    read = list(calls)
    everything = word_tokenizer(path.read_text())["input_ids"]
    blocks = [everything[i : i + 10] for i in range(0, len(everything), 10)]
    assert task.targets == [token for block in blocks for token in block[1:]][:900]
    assert task.example_ids[:10] == [f"s0:t{t}" for t in range(9)] + ["s1:t0"]
    assert len(read) > 2 and read == sorted(read) and read[-1] < len(path.read_text()) / 4  # grew, stopped
