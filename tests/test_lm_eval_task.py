"""LmEvalTask against lm-eval's own results and against plain computations, offline, on local YAML tasks."""

from __future__ import annotations

import importlib
import json
import math
import random
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

DATA = Path(__file__).parent / "data" / "lm_eval"
SCRIPTS = Path(__file__).parent / "distributed"


class Bigram(torch.nn.Module):
    """A plain causal module (no Hugging Face in it): next-token logits from the current token alone."""

    def __init__(self, vocab: int, width: int = 16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.out = torch.nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(input_ids))

    @classmethod
    def seeded(cls, vocab: int, seed: int = 0) -> Bigram:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(vocab)

    def table(self) -> torch.Tensor:
        """log P(next | current) for every token, in float64."""
        with torch.no_grad():
            return self(torch.arange(self.embed.num_embeddings)[None])[0].double().log_softmax(-1)


def result_dict(result) -> dict:
    return {
        "outputs": result.outputs,
        "correct": result.correct,
        "targets": result.targets,
        "example_ids": result.example_ids,
        "choice_logprobs": result.choice_logprobs,
    }


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def _local_only(connect):
    def guarded(self, address, *args, **kwargs):
        if self.family == socket.AF_UNIX or (
            isinstance(address, tuple) and address[0] in ("127.0.0.1", "localhost", "::1")
        ):
            return connect(self, address, *args, **kwargs)
        raise AssertionError(f"network access attempted: {address!r}")

    return guarded


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """Offline setting, resolved task YAMLs, the tiny model and tokenizer, tasks, and the harness's oracle."""
    root = tmp_path_factory.mktemp("lm_eval")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HOME", str(root / "hf_home"))
        patch.setenv("HF_DATASETS_CACHE", str(root / "datasets"))
        patch.setattr(socket.socket, "connect", _local_only(socket.socket.connect))
        import datasets.config

        # datasets reads these at import time, which may have happened before this module ran.
        patch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", root / "datasets")
        # Tiny models run several times faster on one thread than on two contended ones.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield _setting_up(root, patch)
        finally:
            torch.set_num_threads(threads)


def _setting_up(root: Path, patch: pytest.MonkeyPatch) -> dict:
    include = root / "tasks"
    include.mkdir()
    for path in DATA.glob("*.yaml"):
        (include / path.name).write_text(path.read_text().replace("__DATA_DIR__", str(DATA.resolve())))

    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from tiny_lm import tiny_gpt2, tiny_tokenizer

    from checkpoint_stability.tasks.lm_eval import LmEvalTask

    tokenizer = tiny_tokenizer()
    model = tiny_gpt2(0, tokenizer)
    tasks = {
        "mc": LmEvalTask("mc", "cs_mc", tokenizer=tokenizer, include_path=include),
        "mc_norm": LmEvalTask(
            "mc_norm", "cs_mc", tokenizer=tokenizer, include_path=include, metric="acc_norm"
        ),
        "gen": LmEvalTask("gen", "cs_gen", tokenizer=tokenizer, include_path=include),
    }
    results = {key: task.evaluate(model) for key, task in tasks.items()}

    # The oracle: the harness run the usual way, on the same model (minus the environment report it
    # attaches to the results, which shells out to pip and git for seconds).
    patch.setattr(evaluator, "add_env_info", lambda results: None)
    patch.setattr(evaluator, "get_git_commit_hash", lambda: None)
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        oracle = evaluator.simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8),
            tasks=["cs_mc", "cs_gen"],
            task_manager=TaskManager(include_path=str(include), include_defaults=False),
            bootstrap_iters=0,
            log_samples=True,
        )
        oracle["rng_changed"] = [
            random.getstate() != saved[0],
            not np.array_equal(np.random.get_state()[1], saved[1][1]),
            not torch.equal(torch.get_rng_state(), saved[2]),
        ]
    finally:  # simple_evaluate re-seeded the global RNGs: do not pass that on to other tests
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
    return {
        "include": include,
        "root": root,
        "tokenizer": tokenizer,
        "model": model,
        "tasks": tasks,
        "results": results,
        "oracle": oracle,
    }


# ---------------------------------------------------------------------------------------------- import


def test_module_imports_without_lm_eval_and_construction_says_how_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    import checkpoint_stability.tasks as package

    monkeypatch.delitem(sys.modules, "checkpoint_stability.tasks.lm_eval", raising=False)
    monkeypatch.setattr(package, "lm_eval", getattr(package, "lm_eval", None), raising=False)
    module = importlib.import_module("checkpoint_stability.tasks.lm_eval")
    with pytest.raises(ImportError, match=r"pip install checkpoint-stability\[lm-eval\]"):
        module.LmEvalTask("t", "cs_mc")


def test_bad_settings_are_refused_at_construction(lm):
    from checkpoint_stability.tasks.lm_eval import LmEvalTask

    common = {"tokenizer": lm["tokenizer"], "include_path": lm["include"]}
    with pytest.raises(ValueError, match="no task 'cs_nope'"):
        LmEvalTask("t", "cs_nope", **common)
    with pytest.raises(ValueError, match="metric 'f1' is not one of"):
        LmEvalTask("t", "cs_mc", metric="f1", **common)
    with pytest.raises(ValueError, match="filter 'strict' is not one of"):
        LmEvalTask("t", "cs_gen", metric="exact_match,strict", **common)
    with pytest.raises(ValueError, match="batch_size"):
        LmEvalTask("t", "cs_mc", batch_size=0, **common)
    with pytest.raises(ValueError, match="task name"):
        LmEvalTask("mean", "cs_mc", **common)
    assert LmEvalTask("t", "cs_gen", metric="exact_match,none", **common).filter == "none"
    with pytest.raises(ValueError, match="needs tokenizer="):
        LmEvalTask("t", "cs_mc", include_path=lm["include"]).evaluate(Bigram.seeded(len(lm["tokenizer"])))


def test_few_shot_prompts_are_the_same_at_every_evaluation(lm, monkeypatch):
    from checkpoint_stability.tasks.lm_eval import LmEvalTask

    task = LmEvalTask("mc2", "cs_mc", tokenizer=lm["tokenizer"], include_path=lm["include"], num_fewshot=2)
    assert task.num_fewshot == 2
    model = lm["model"]
    first, second = task.evaluate(model), task.evaluate(model)
    assert first.choice_logprobs == second.choice_logprobs
    assert first.choice_logprobs != lm["results"]["mc"].choice_logprobs  # the shots are in the prompts
    # The trap: the harness's sampler draws on from one random.Random, so without re-seeding it before
    # each evaluation the next checkpoint would be asked with other examples.
    monkeypatch.setattr(task._harness, "set_fewshot_seed", lambda seed=None: None)
    assert task.evaluate(model).choice_logprobs != first.choice_logprobs


# ---------------------------------------------------------------------------------------------- oracles


@pytest.mark.parametrize(
    ("key", "harness", "metric"), [("mc", "cs_mc", "acc"), ("mc_norm", "cs_mc", "acc_norm")]
)
def test_multiple_choice_matches_the_harness_per_document_and_in_aggregate(lm, key, harness, metric):
    result, oracle = lm["results"][key], lm["oracle"]
    samples = sorted(oracle["samples"][harness], key=lambda s: s["doc_id"])
    docs = read_jsonl("mc.jsonl")
    assert result.example_ids == [s["doc_id"] for s in samples] == list(range(len(docs)))
    assert result.targets == [d["label"] for d in docs]
    assert result.correct == [float(s[metric]) for s in samples]
    assert result.score == pytest.approx(oracle["results"][harness][f"{metric},none"], abs=1e-12)
    for doc, sample, output, row, correct in zip(
        docs, samples, result.outputs, result.choice_logprobs, result.correct, strict=True
    ):
        lls = [ll for ll, _ in sample["filtered_resps"]]
        lengths = [len(c) if metric == "acc_norm" else 1 for c in doc["choices"]]
        # Our batches differ from the harness's (they are the same in any number of processes), and a
        # batch's padding changes float32 rounding: equal to rounding, and the same choices.
        assert row == pytest.approx([ll / n for ll, n in zip(lls, lengths, strict=True)], rel=1e-6, abs=1e-6)
        assert output == int(np.argmax(row))
        assert correct == float(output == doc["label"])
    assert lm["tasks"][key].score(result.outputs) == result.correct
    assert lm["tasks"][key].kind == "multiple_choice" and lm["tasks"][key].metric == metric


def test_choice_loglikelihoods_match_one_plain_forward_per_pair(lm):
    tokenizer, model = lm["tokenizer"], lm["model"]
    docs = read_jsonl("mc.jsonl")
    for index in (0, 1, 7, 19):
        doc = docs[index]
        context = f"Question: {doc['question']}\nAnswer:"
        expected = []
        for choice in doc["choices"]:
            context_ids = tokenizer.encode(context)
            whole = tokenizer.encode(context + " " + choice)
            assert whole[: len(context_ids)] == context_ids
            with torch.no_grad():
                logprobs = model(torch.tensor([whole[:-1]])).logits[0].double().log_softmax(-1)
            expected.append(
                math.fsum(logprobs[p - 1, whole[p]].item() for p in range(len(context_ids), len(whole)))
            )
        assert lm["results"]["mc"].choice_logprobs[index] == pytest.approx(expected, rel=1e-5, abs=1e-5)
        normalised = [e / len(c) for e, c in zip(expected, doc["choices"], strict=True)]
        assert lm["results"]["mc_norm"].choice_logprobs[index] == pytest.approx(
            normalised, rel=1e-5, abs=1e-5
        )


def test_generation_matches_the_harness_and_score_applies_the_metric_normalisation(lm):
    result, oracle, task = lm["results"]["gen"], lm["oracle"], lm["tasks"]["gen"]
    samples = sorted(oracle["samples"]["cs_gen"], key=lambda s: s["doc_id"])
    assert task.kind == "generation" and task.metric == "exact_match"
    assert result.outputs == [s["filtered_resps"][0] for s in samples]
    assert result.correct == [float(s["exact_match"]) for s in samples]
    assert result.score == pytest.approx(oracle["results"]["cs_gen"]["exact_match,none"], abs=1e-12)
    assert result.targets == [" " + d["answer"] for d in read_jsonl("gen.jsonl")]
    assert result.choice_logprobs is None
    assert task.score(result.outputs) == result.correct
    # The harness's metric settings (ignore_case, ignore_punctuation, strip spaces) apply to re-scoring.
    assert task.score(result.targets) == [1.0] * len(result.targets)
    rest = result.outputs[2:]
    assert task.score(["PARIS.", " rome! ", *rest])[:2] == [1.0, 1.0]
    assert task.score(["Rome", "Paris", *rest])[:2] == [0.0, 0.0]
    with pytest.raises(ValueError, match="outputs"):
        task.score(result.outputs[:-1])


# ---------------------------------------------------------------------------------------------- traps


def test_a_global_rng_states_survive_evaluate(lm):
    assert lm["oracle"]["rng_changed"] == [True, True, True]  # simple_evaluate re-seeds all three
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    before = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    lm["tasks"]["gen"].evaluate(lm["model"])
    after = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    assert before[0] == after[0]
    assert all(np.array_equal(a, b) for a, b in zip(before[1], after[1], strict=True))
    assert torch.equal(before[2], after[2])


def test_b_train_flags_weights_and_untied_head_survive_evaluate(lm):
    from lm_eval.models.huggingface import HFLM
    from tiny_lm import tiny_gpt2

    def untied_training_model():
        model = tiny_gpt2(1, lm["tokenizer"])
        with torch.no_grad():  # the config says tied, but this head has its own (different) weights
            model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight + 0.5)
        model.train()
        model.transformer.h[0].eval()  # a submodule kept in eval on purpose
        return model

    # The trap: HFLM itself puts the model in eval mode and re-ties the head.
    model = untied_training_model()
    HFLM(pretrained=model, tokenizer=lm["tokenizer"], batch_size=8)
    assert not model.training and model.lm_head.weight is model.transformer.wte.weight

    model = untied_training_model()
    flags = {name: module.training for name, module in model.named_modules()}
    state = {key: value.clone() for key, value in model.state_dict().items()}
    head = model.lm_head.weight
    lm["tasks"]["mc"].evaluate(model)
    assert {name: module.training for name, module in model.named_modules()} == flags
    assert model.lm_head.weight is head and head is not model.transformer.wte.weight
    assert "tie_weights" not in vars(model)
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    assert torch.is_grad_enabled()


def test_c_batch_size_goes_to_the_model_wrapper(lm):
    from checkpoint_stability.tasks.lm_eval import LmEvalTask

    task = LmEvalTask("mc3", "cs_mc", tokenizer=lm["tokenizer"], include_path=lm["include"], batch_size=3)
    batches = []
    hook = lm["model"].register_forward_pre_hook(
        lambda module, args, kwargs: batches.append((args[0] if args else kwargs["input_ids"]).shape[0]),
        with_kwargs=True,
    )
    try:
        result = task.evaluate(lm["model"])
    finally:
        hook.remove()
    assert max(batches) == 3
    assert result.outputs == lm["results"]["mc"].outputs
    for got, reference in zip(result.choice_logprobs, lm["results"]["mc"].choice_logprobs, strict=True):
        assert got == pytest.approx(reference, rel=1e-5, abs=1e-5)


def test_d_task_manager_is_restricted_and_built_once(lm, monkeypatch):
    import datasets
    import lm_eval.tasks

    from checkpoint_stability.tasks.lm_eval import LmEvalTask, restricted_task_manager

    built, loads = [], []
    original_manager, original_load = lm_eval.tasks.TaskManager, datasets.load_dataset

    class CountingTaskManager(original_manager):
        def __init__(self, *args, **kwargs):
            built.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", CountingTaskManager)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: loads.append(a) or original_load(*a, **k))
    task = LmEvalTask("mc_once", "cs_mc", tokenizer=lm["tokenizer"], include_path=lm["include"])
    assert len(built) == 1 and built[0]["include_defaults"] is False and len(loads) == 1
    assert task.task_manager.all_tasks == ["cs_gen", "cs_mc"]
    model = Bigram.seeded(len(lm["tokenizer"]))
    first, second = task.evaluate(model), task.evaluate(model)
    assert len(built) == 1 and len(loads) == 1
    assert first.outputs == second.outputs and first.choice_logprobs == second.choice_logprobs

    # A built-in task: only the directories that define it are indexed (no dataset is loaded here).
    manager = restricted_task_manager("hellaswag")
    assert "hellaswag" in manager.task_index and len(manager.all_tasks) < 50
    assert all(entry["include_defaults"] is False for entry in built[1:])


def test_e_bootstrap_is_off_and_samples_are_logged(lm, monkeypatch):
    import lm_eval.evaluator

    seen = []
    original = lm_eval.evaluator.evaluate

    def spy(**kwargs):
        seen.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(lm_eval.evaluator, "evaluate", spy)
    lm["tasks"]["mc"].evaluate(Bigram.seeded(len(lm["tokenizer"])))
    assert len(seen) == 1
    assert seen[0]["bootstrap_iters"] == 0 and seen[0]["log_samples"] is True


@pytest.mark.slow
def test_f_two_ranks_split_documents_and_match_one_process(lm):
    out = lm["root"] / "ddp"
    out.mkdir()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(SCRIPTS / "lm_eval_ddp.py"),
        str(out),
        str(lm["include"]),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    plain = Bigram.seeded(len(lm["tokenizer"]))
    single = {
        "hf/mc": result_dict(lm["results"]["mc"]),
        "hf/gen": result_dict(lm["results"]["gen"]),
        "plain/mc": result_dict(lm["tasks"]["mc"].evaluate(plain)),
        "plain/gen": result_dict(lm["tasks"]["gen"].evaluate(plain)),
    }
    for key, expected in single.items():
        for rank in ranks:
            got = {k: v for k, v in rank[key].items() if k != "forwards"}
            assert got == expected, key
    # Every rank ran its own share, with as many forward passes as the other rank.
    for key in ("hf/mc", "plain/mc", "plain/gen"):
        assert ranks[0][key]["forwards"] == ranks[1][key]["forwards"] > 0, key
    # 69 (context, choice) pairs in batches of 8 are 9 batches: 5 per rank, one of them a repeat.
    assert ranks[0]["hf/mc"]["forwards"] == ranks[0]["plain/mc"]["forwards"] == 5


def test_g_plain_module_through_the_template_lm(lm):
    tokenizer, task = lm["tokenizer"], lm["tasks"]["mc"]
    model = Bigram.seeded(len(tokenizer))
    table = model.table()
    result = task.evaluate(model)
    docs = read_jsonl("mc.jsonl")
    for doc, output, row, correct in zip(
        docs, result.outputs, result.choice_logprobs, result.correct, strict=True
    ):
        context = tokenizer.encode(f"Question: {doc['question']}\nAnswer:")
        expected = []
        for choice in doc["choices"]:
            whole = tokenizer.encode(f"Question: {doc['question']}\nAnswer: {choice}")
            expected.append(
                math.fsum(table[whole[p - 1], whole[p]].item() for p in range(len(context), len(whole)))
            )
        assert row == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert output == int(np.argmax(expected))
        assert correct == float(output == doc["label"])

    # Greedy generation, by hand: the next token is the argmax after the current one.
    generated = lm["tasks"]["gen"].evaluate(model)
    eos = tokenizer.eos_token_id
    for doc, output in zip(read_jsonl("gen.jsonl"), generated.outputs, strict=True):
        tokens = tokenizer.encode(doc["prompt"])
        new: list[int] = []
        while len(new) < 6:
            new.append(int(table[(tokens + new)[-1]].argmax()))
            text = tokenizer.decode(new)
            if new[-1] == eos or "\n" in text or "." in text:
                break
        text = tokenizer.decode(new).split("\n")[0].split(".")[0].split(tokenizer.eos_token)[0]
        assert output == text


def test_inside_the_monitor_ensemble_and_instability_follow_the_raw_outputs(lm, tmp_path):
    from tiny_lm import tiny_gpt2

    from checkpoint_stability import StabilityMonitor

    task = lm["tasks"]["mc"]
    model = tiny_gpt2(2, lm["tokenizer"])
    monitor = StabilityMonitor(
        [task], dirpath=tmp_path, window=3, every_n_steps=1, console=False, tensorboard=False
    )
    generator = torch.Generator().manual_seed(5)
    records = []
    for step in (1, 2, 3):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
        records.extend(monitor.on_snapshot(model, step))
    monitor.close()

    raw = monitor.history.outputs("mc", variant="raw")
    ens = monitor.history.outputs("mc", variant="ens")
    assert [line["step"] for line in raw] == [line["step"] for line in ens] == [1, 2, 3]
    targets = task.targets
    for index, line in enumerate(ens):
        window = raw[: index + 1]
        voted = []
        for example in range(len(targets)):
            counts = Counter(w["outputs"][example] for w in window)
            top = max(counts.values())
            tied = [c for c in counts if counts[c] == top]
            sums = {c: sum(w["choice_logprobs"][example][c] for w in window) for c in tied}
            best = max(sums.values())
            voted.append(
                next(
                    w["outputs"][example] for w in reversed(window) if sums.get(w["outputs"][example]) == best
                )
            )
        assert line["outputs"] == voted
        assert line["correct"] == [float(v == t) for v, t in zip(voted, targets, strict=True)]

    def instability(lines):
        m, n = len(lines), len(targets)
        flips = sum(
            lines[t]["outputs"][i] != lines[t + 1]["outputs"][i] for t in range(m - 1) for i in range(n)
        )
        return flips / ((m - 1) * n)

    final = {r["variant"]: r for r in records if r["step"] == 3 and r["task"] == "mc"}
    assert set(final) == {"raw", "avg", "ens"}
    assert final["raw"]["is"] == pytest.approx(instability(raw))
    assert final["ens"]["is"] == pytest.approx(instability(ens))
    assert final["raw"]["score"] == pytest.approx(sum(raw[-1]["correct"]) / len(targets))
    assert final["ens"]["score"] == pytest.approx(sum(ens[-1]["correct"]) / len(targets))
    assert instability(raw) > 0  # the perturbations flipped some answers, so the comparison means something
