"""The Hugging Face StabilityCallback under torchrun: a real ``transformers.Trainer`` on two CPU processes.

The script (``distributed/transformers_ddp.py``) trains twice in one launch: with explicit tasks, and with
``tasks=None`` (the default task from ``eval_dataset``). The oracles here are independent of the
library's distributed path: next-token argmaxes computed by hand and a multiple-choice task evaluated in
this single process, on weights read back with safetensors' own reader (the buffer's snapshots and the
final weights rank 0 saved), and the window average recomputed in float64 from the snapshot files.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import tiny_gpt2, tiny_tokenizer

from checkpoint_stability import MultipleChoiceTask

SCRIPT = Path(__file__).parent / "distributed" / "transformers_ddp.py"
MODES = ("tasks", "default")
STEPS = [2, 4, 6]


def _script_module():
    """The script's task and data definitions (importing it runs nothing)."""
    spec = importlib.util.spec_from_file_location("transformers_ddp_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ddp = _script_module()


def torchrun(script: Path, out: Path, nproc: int = 2) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(script),
        str(out),
    ]
    # The timeout is also the proof that no rank is left waiting in a collective.
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Both Trainer runs in one launch: importing torch and transformers twice is the slow part."""
    out = tmp_path_factory.mktemp("transformers_ddp")
    torchrun(SCRIPT, out)
    return out


def ranks(runs: Path, mode: str) -> list[dict]:
    return [json.loads((runs / mode / f"rank{r}.json").read_text()) for r in (0, 1)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def scores_of(records: list[dict]) -> list[dict]:
    return [r for r in records if "error" not in r]


def load_into_fresh_model(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = tiny_gpt2(0)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A snapshot keeps a tied tensor once (GPT-2's lm_head.weight is transformer.wte.weight).
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    return model.eval()


def next_token_outputs(model: torch.nn.Module, sequences: list[list[int]]) -> list[int]:
    """Hand oracle: the argmax token at every position but the last, one sequence at a time."""
    outputs = []
    with torch.no_grad():
        for ids in sequences:
            logits = model(input_ids=torch.tensor([ids])).logits
            outputs.extend(logits[0, :-1].argmax(-1).tolist())
    return outputs


def next_token_targets(sequences: list[list[int]]) -> list[int]:
    return [token for ids in sequences for token in ids[1:]]


def task_sequences(mode: str) -> dict[str, list[list[int]]]:
    """The next-token tasks of each run, as token id sequences (labels = input_ids in the eval rows)."""
    if mode == "tasks":
        return {"sentences": ddp.sentence_ids()}
    return {"validation": [row["input_ids"].tolist() for row in ddp.eval_rows()]}


def mc_task() -> MultipleChoiceTask:
    return MultipleChoiceTask(
        "mc", ddp.MC_EXAMPLES, tiny_tokenizer(), normalize="tokens", batch_size=4, show_progress=False
    )


def oracle(model: torch.nn.Module, mode: str) -> dict[str, dict]:
    """Per task: outputs, correct and score of ``model``, evaluated in this one process."""
    results = {}
    for name, sequences in task_sequences(mode).items():
        outputs = next_token_outputs(model, sequences)
        correct = [float(o == t) for o, t in zip(outputs, next_token_targets(sequences), strict=True)]
        results[name] = {"outputs": outputs, "correct": correct, "score": sum(correct) / len(correct)}
    if mode == "tasks":
        result = mc_task().evaluate(model)
        results["mc"] = {
            "outputs": result.outputs,
            "correct": result.correct,
            "score": result.score,
            "choice_logprobs": result.choice_logprobs,
        }
    return results


def line_at(run_dir: Path, task: str, step: int, variant: str) -> dict:
    window = 1 if variant == "raw" else ddp.WINDOW
    lines = [
        line
        for line in read_jsonl(run_dir / "examples" / f"{task}.jsonl")
        if (line["step"], line["variant"], line["window"]) == (step, variant, window)
    ]
    assert len(lines) == 1
    return lines[0]


def record_at(records: list[dict], task: str, step: int, variant: str) -> dict:
    found = [r for r in records if (r["step"], r["task"], r["variant"]) == (step, task, variant)]
    assert len(found) == 1
    return found[0]


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("mode", MODES)
def test_every_rank_agrees(runs, mode):
    first, second = ranks(runs, mode)
    assert first["world_size"] == second["world_size"] == 2
    assert first["wrapped"] == second["wrapped"] == "DistributedDataParallel"
    assert first["global_step"] == second["global_step"] == ddp.MAX_STEPS
    # The records returned at every snapshot, and the final weights, are the same on both ranks.
    assert sorted(first["snapshots"], key=int) == [str(s) for s in STEPS]
    assert first["snapshots"] == second["snapshots"]
    assert first["latest_records"] == second["latest_records"] == first["snapshots"]["6"]
    assert first["weights"] == second["weights"]
    assert first["tokenizer"] == second["tokenizer"] == ddp.tokenizer_digest()
    # What every rank returned is what rank 0 wrote to the history, step by step.
    history = read_jsonl(runs / mode / "stability" / "history.jsonl")
    assert not [h for h in history if "error" in h]
    assert first["history"] == history
    for step in STEPS:
        assert first["snapshots"][str(step)] == [h for h in history if h["step"] == step]
        variants = {(r["task"], r["variant"], r["window"]) for r in first["snapshots"][str(step)]}
        names = [t["name"] for t in first["tasks"]]
        assert variants == {
            (task, variant, 1 if variant == "raw" else ddp.WINDOW)
            for task in [*names, "mean"]
            for variant in ("raw", "avg", "ens")
        }
    # Every evaluation ran the same number of forward passes on both ranks (else gloo would hang).
    assert first["forwards"] == second["forwards"]
    for counts in first["forwards"].values():
        assert len(counts) == 2 * len(STEPS)  # raw and avg at every snapshot; ens needs none
    if mode == "default":
        # The Trainer's evaluations saw the same stability values on both ranks, the latest snapshot's,
        # and picked its best on them.
        assert first["evaluations"] == second["evaluations"]
        assert sorted(first["evaluations"], key=int) == [str(s) for s in STEPS]
        for step, seen in first["evaluations"].items():
            mean_avg = record_at(history, "mean", int(step), "avg")["score"]
            assert seen["eval_stability/mean/avg/score"] == mean_avg
        best = max(record_at(history, "mean", s, "avg")["score"] for s in STEPS)
        assert first["best_metric"] == second["best_metric"] == best


@pytest.mark.parametrize("mode", MODES)
def test_only_rank_zero_writes(runs, mode):
    first, second = ranks(runs, mode)
    run_dir = runs / mode / "stability"
    # Rank 1 holds no history, buffer, selector or sink, and created, renamed or removed no file there.
    # Rank 0's sinks: the callback's TensorBoard run (console=False; the monitor's own is off) and the
    # report written when the run ends.
    sinks = [*(["TensorBoardSink"] if mode == "tasks" else []), "ReportSink"]
    assert first["holds"] == {"history": True, "buffer": True, "selector": True, "sinks": sinks}
    assert second["holds"] == {"history": False, "buffer": False, "selector": False, "sinks": []}
    assert second["history"] is None
    assert second["writes"] == []
    # Every file in the run directory is one rank 0 wrote (or in a directory it renamed into place).
    written = {path for _, path in first["writes"]}
    on_disk = sorted(p for p in run_dir.rglob("*") if p.is_file())
    assert on_disk
    for path in on_disk:
        assert any(str(p) in written for p in (path, *path.parents) if p != run_dir and run_dir in p.parents)
    # One full-weights window (no per-rank buffers), one line per (step, task, variant, window).
    buffer = run_dir / "buffer"
    assert sorted(p.name for p in buffer.iterdir()) == [
        "manifest.json",
        "step-00000004.safetensors",
        "step-00000006.safetensors",
    ]
    manifest = json.loads((buffer / "manifest.json").read_text())
    assert [s["step"] for s in manifest["snapshots"]] == [4, 6]
    history = scores_of(read_jsonl(run_dir / "history.jsonl"))
    keys = [(h["step"], h["task"], h["variant"], h["window"]) for h in history]
    assert len(keys) == len(set(keys))
    for task in first["tasks"]:
        lines = read_jsonl(run_dir / "examples" / f"{task['name']}.jsonl")
        assert len(lines) == 3 * len(STEPS)
    assert json.loads((run_dir / "run.json").read_text()) == {"world_size": 2, "sharded": False}
    best = json.loads((run_dir / "best.json").read_text())
    assert sorted(p.name for p in (run_dir / "exports").iterdir()) == [Path(best["path"]).name]
    assert not (run_dir / "tensorboard").exists()
    if mode == "tasks":
        # report_to=["tensorboard"]: one TensorBoard run beside the Trainer's, written by rank 0 alone.
        board = runs / mode / "hf" / "runs" / "stability"
        # One event file per variant run (and the best run), each written by rank 0.
        assert sorted(p.name for p in board.iterdir()) == ["avg", "best", "ens", "raw"]
        for run in board.iterdir():
            events = list(run.iterdir())
            assert len(events) == 1 and events[0].name.startswith("events.out.tfevents")
            assert str(events[0]) in written


@pytest.mark.parametrize("mode", MODES)
def test_evaluation_is_split_across_ranks_and_gathered_whole(runs, mode):
    first, second = ranks(runs, mode)
    run_dir = runs / mode / "stability"
    assert first["tasks"] == second["tasks"]
    sequences = task_sequences(mode)
    for task in first["tasks"]:
        name = task["name"]
        meta = json.loads((run_dir / "examples" / f"{name}.meta.json").read_text())
        # Every rank holds the whole task (with tasks=None too: built from every eval row, not a shard).
        assert task["count"] == len(task["example_ids"]) == len(meta["example_ids"])
        assert task["example_ids"] == meta["example_ids"]
        if name in sequences:
            expected = next_token_targets(sequences[name])
            assert task["type"] == "NextTokenTask"
            assert task["targets"] == meta["targets"] == expected
            # Each rank ran only its padded half of the sequences per evaluation.
            half = math.ceil(len(sequences[name]) / 2)
            assert first["rows"][name] == second["rows"][name] == [half] * (2 * len(STEPS))
        else:
            assert name == "mc"
            assert task["count"] == len(ddp.MC_EXAMPLES)
            assert meta["targets"] == [e["label"] for e in ddp.MC_EXAMPLES]
        # Gathered: every per-example line covers all the task's examples.
        for line in read_jsonl(run_dir / "examples" / f"{name}.jsonl"):
            assert len(line["outputs"]) == len(line["correct"]) == task["count"]
    if mode == "tasks":
        # The ragged multiple-choice requests, one model row per (example, choice) in one process: each
        # rank ran only a part of them (rank 1's shorter share padded up to rank 0's number of passes).
        alone = sum(len(example["choices"]) for example in ddp.MC_EXAMPLES)
        assert all(0 < rows < alone for rows in first["rows"]["mc"] + second["rows"]["mc"])
        assert first["rows"]["mc"][0] + second["rows"]["mc"][0] >= alone


@pytest.mark.parametrize("mode", MODES)
def test_raw_avg_and_ens_equal_single_process_oracles(runs, mode):
    first, _ = ranks(runs, mode)
    run_dir = runs / mode / "stability"
    history = scores_of(read_jsonl(run_dir / "history.jsonl"))
    last = STEPS[-1]

    # The newest snapshot is the final model, which is the same on both ranks.
    final = load_file(str(runs / mode / "final.safetensors"))
    snapshots = {s: load_file(str(run_dir / "buffer" / f"step-{s:08d}.safetensors")) for s in (4, 6)}
    for key, tensor in snapshots[last].items():
        assert torch.equal(tensor, final[key])
    model = load_into_fresh_model(final)
    assert ddp.weights_digest(model) == first["weights"]

    # raw at the last step: the final weights evaluated in this process.
    raw = oracle(model, mode)
    # avg at the last step: the float64 mean of the window's snapshot files, in the live dtype.
    window = [snapshots[s] for s in (4, 6)]
    averaged = {
        key: (sum(w[key].double() for w in window) / len(window)).to(tensor.dtype)
        for key, tensor in snapshots[last].items()
    }
    avg = oracle(load_into_fresh_model(averaged), mode)

    for name in raw:
        for variant, expected in (("raw", raw[name]), ("avg", avg[name])):
            line = line_at(run_dir, name, last, variant)
            assert line["outputs"] == expected["outputs"]
            assert line["correct"] == expected["correct"]
            record = record_at(history, name, last, variant)
            assert record["score"] == pytest.approx(expected["score"], abs=1e-12)
            assert record["n_models"] == (1 if variant == "raw" else 2)
            assert record_at(first["latest_records"], name, last, variant) == record
            if "choice_logprobs" in expected:
                for got, want in zip(line["choice_logprobs"], expected["choice_logprobs"], strict=True):
                    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-5)
        # ens at the last step: a vote counted by hand over the window's raw outputs (steps 4 and 6);
        # a split vote goes to the higher summed log-probability where the task has them, else to step 6.
        older, newer = line_at(run_dir, name, 4, "raw"), line_at(run_dir, name, last, "raw")
        votes = []
        for i, (a, b) in enumerate(zip(older["outputs"], newer["outputs"], strict=True)):
            if a == b or "choice_logprobs" not in newer:
                votes.append(b)
                continue
            summed = [
                x + y for x, y in zip(older["choice_logprobs"][i], newer["choice_logprobs"][i], strict=True)
            ]
            votes.append(a if summed[a] > summed[b] else b)
        assert line_at(run_dir, name, last, "ens")["outputs"] == votes
    # The oracles are not vacuous: the averaged model predicts differently from the raw one somewhere.
    assert any(raw[name]["outputs"] != avg[name]["outputs"] for name in raw)
