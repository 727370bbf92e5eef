"""GenerationTask against independent computations: an unbatched greedy loop, Hugging Face generate, a
hand-scripted model, hand-counted votes and IS through the monitor, and two ranks under torchrun."""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tiny_lm import tiny_gpt2, tiny_tokenizer

from checkpoint_stability import StabilityMonitor
from checkpoint_stability.tasks import Task
from checkpoint_stability.tasks.generation import GenerationTask, default_normalize

os.environ["HF_HUB_OFFLINE"] = "1"

PROMPTS = [
    "The quick brown",
    "To be, or",
    "All the world's a",
    "Two plus two is",
    "The capital of France is",
    "Now is the winter of our",
    "Ten minus",
    "The capital of Italy",
    "merely",
    "glorious summer by this sun",
    "Three plus five",
    "the lazy",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine oversubscribe it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------- hand-built model

VOCAB = 256
EOS = 0


class Chars:
    """One token per character (Latin-1), id 0 is EOS and padding."""

    pad_token_id = EOS
    eos_token_id = EOS

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


class ScriptedLM(torch.nn.Module):
    """A causal LM that continues scripts: at position t of a row whose first t+1 tokens match a script,
    it predicts the script's token t+1; otherwise "~". Records the batch shape of every call."""

    def __init__(self, scripts):
        super().__init__()
        self.scripts = [list(s) for s in scripts]
        self.bias = torch.nn.Parameter(torch.zeros(VOCAB))
        self.shapes: list[tuple[int, int]] = []
        self.grad_enabled: list[bool] = []

    def forward(self, input_ids):
        self.shapes.append(tuple(input_ids.shape))
        self.grad_enabled.append(torch.is_grad_enabled())
        logits = torch.zeros(*input_ids.shape, VOCAB)
        for b, row in enumerate(input_ids.tolist()):
            for t in range(len(row)):
                token = next(
                    (s[t + 1] for s in self.scripts if len(s) > t + 1 and s[: t + 1] == row[: t + 1]),
                    ord("~"),
                )
                logits[b, t, token] = 1.0
        return logits + self.bias


def script(prompt: str, continuation: str, eos: bool = False) -> list[int]:
    return [ord(c) for c in prompt + continuation] + ([EOS] if eos else [])


def hand_char_f1(a: str, b: str) -> float:
    a = [c for c in a if not c.isspace()]
    b = [c for c in b if not c.isspace()]
    if not a and not b:
        return 1.0
    common = sum((Counter(a) & Counter(b)).values())
    return 2 * common / (len(a) + len(b)) if common else 0.0


def test_stop_strings_eos_max_new_tokens_and_finished_rows_leave_the_batch():
    model = ScriptedLM(
        [
            script("Q1?", " Paris\nLyon"),  # stops at the newline: 7 tokens
            script("Q2?", " Ok", eos=True),  # 3 tokens, then EOS (a 4th step)
            script("Q3?", " abcdefghijkl"),  # never stops: cut at max_new_tokens
            script("Q4?", "", eos=True),  # EOS straight away: empty output
        ]
    )
    examples = [{"prompt": f"Q{i}?", "answer": a} for i, a in enumerate(["PARIS", "ok", "abcdefg", "x"], 1)]
    task = GenerationTask("hand", examples, Chars(), max_new_tokens=8, normalize=None)
    model.train()
    result = task.evaluate(model)
    assert model.training, "evaluate must not change the train/eval mode"
    assert not any(model.grad_enabled)
    assert result.outputs == [" Paris", " Ok", " abcdefg", ""]
    # Prompts are 3 tokens; a row of width 3 + generated-so-far, rows leaving as they finish:
    # Q4 after step 1 (EOS), Q2 after step 4 (EOS), Q1 after step 7 (newline), Q3 after step 8 (max).
    assert [rows for rows, _ in model.shapes] == [4, 3, 3, 3, 2, 2, 2, 1]
    assert [width for _, width in model.shapes] == [3, 4, 5, 6, 7, 8, 9, 10]
    assert result.targets == ["PARIS", "ok", "abcdefg", "x"]
    assert result.correct == [0.0, 0.0, 0.0, 0.0]  # raw text: " Paris" != "PARIS", " Ok" != "ok"...

    normalised = GenerationTask("hand", examples, Chars(), max_new_tokens=8).evaluate(model)
    assert normalised.outputs == ["paris", "ok", "abcdefg", ""]
    assert normalised.targets == ["paris", "ok", "abcdefg", "x"]
    assert normalised.correct == [1.0, 1.0, 1.0, 0.0]
    assert normalised.example_ids == [0, 1, 2, 3]


def test_a_stop_string_across_tokens_and_the_earliest_stop_wins():
    model = ScriptedLM([script("Q1?", " Paris\nLyon")])
    examples = [{"prompt": "Q1?", "answer": "p"}]
    for stop in (("ar", "\n"), ("\n", "ar")):
        task = GenerationTask("stop", examples, Chars(), max_new_tokens=8, stop=stop, normalize=None)
        model.shapes.clear()
        # " Pa" then "r": the decoded " Par" contains "ar" (over two tokens); cut before it.
        assert task.evaluate(model).outputs == [" P"]
        assert len(model.shapes) == 4
    # No stop strings at all (None or ()): only EOS and max_new_tokens end a continuation.
    for stop in (None, ()):
        task = GenerationTask("stop", examples, Chars(), max_new_tokens=9, stop=stop, normalize=None)
        assert task.evaluate(model).outputs == [" Paris\nLy"]
    # A single string is one stop string, not a set of characters.
    task = GenerationTask("stop", examples, Chars(), max_new_tokens=9, stop="is\n", normalize=None)
    assert task.evaluate(model).outputs == [" Par"]


def test_normalisation_default_custom_and_raw():
    assert default_normalize("  Straße\tIS \n\n  Big\u00a0 ") == "strasse is big"
    assert default_normalize("") == ""
    text = "  Big \t CAT\u00a0 Straße \nrest"
    model = ScriptedLM([script("Q?", text)])
    examples = [{"prompt": "Q?", "answer": "big cat strasse"}]
    default = GenerationTask("norm", examples, Chars(), max_new_tokens=40).evaluate(model)
    assert default.outputs == ["big cat strasse"] and default.correct == [1.0]
    raw = GenerationTask("norm", examples, Chars(), max_new_tokens=40, normalize=None).evaluate(model)
    assert raw.outputs == ["  Big \t CAT\u00a0 Straße "] and raw.correct == [0.0]
    upper = GenerationTask("norm", examples, Chars(), max_new_tokens=40, normalize=str.upper).evaluate(model)
    assert upper.outputs == ["  BIG \t CAT\u00a0 STRASSE "]
    assert upper.targets == ["BIG CAT STRASSE"] and upper.correct == [0.0]
    # A few-shot prefix is put before every prompt (the scripted model only knows "Q?" at the start).
    prefixed = GenerationTask("norm", [{"prompt": "?", "answer": "x"}], Chars(), few_shot_prefix="Q")
    assert prefixed.evaluate(model).outputs == ["big cat strasse"]


def test_exact_match_and_char_f1_by_hand():
    model = ScriptedLM(
        [
            script("A?", " Paris\n"),
            script("B?", " rome\n"),
            script("C?", " Big  cat\n"),
            script("D?", " OK\n"),
        ]
    )
    examples = [
        {"prompt": "A?", "answer": "Paris"},
        {"prompt": "B?", "answer": "Roma"},
        {"prompt": "C?", "answer": ["bigcat", "dog"]},
        {"prompt": "D?", "answer": ["no", "K"]},
    ]
    exact = GenerationTask("em", examples, Chars()).evaluate(model)
    assert exact.outputs == ["paris", "rome", "big cat", "ok"]
    assert exact.targets == ["paris", "roma", ["bigcat", "dog"], ["no", "k"]]
    assert exact.correct == [1.0, 0.0, 0.0, 0.0]
    assert exact.score == 0.25

    f1_task = GenerationTask("f1", examples, Chars(), metric="char_f1")
    f1 = f1_task.evaluate(model)
    # rome/roma: overlap {r, o, m} = 3 of 4 + 4 -> 6/8. "big cat" vs "bigcat": whitespace ignored -> 1.
    # "ok" vs "no": overlap {o} -> 2/4; vs "k": overlap {k} -> 2/3; the best answer counts.
    assert f1.correct == pytest.approx([1.0, 0.75, 1.0, 2 / 3], abs=1e-15)
    assert f1.score == pytest.approx((1.0 + 0.75 + 1.0 + 2 / 3) / 4, abs=1e-15)
    # score() takes any outputs (as an ensemble produces), compared as given.
    assert f1_task.score(["", "roma", "dog", "kk"]) == pytest.approx([0.0, 1.0, 1.0, 2 / 3])
    assert GenerationTask("em", examples, Chars()).score(["paris", "roma", "dog", "k"]) == [1.0] * 4
    with pytest.raises(ValueError, match=r"'em'.*3 outputs for 4"):
        GenerationTask("em", examples, Chars()).score(["a", "b", "c"])
    assert isinstance(f1_task, Task) and f1_task.kind == "generation" and f1_task.metric == "char_f1"


class NoPad(Chars):
    pad_token_id = None


class NotLogits(torch.nn.Module):
    def forward(self, input_ids):
        return torch.zeros(input_ids.shape[0], VOCAB)


OK = [{"prompt": "a", "answer": "b"}, {"prompt": "c", "answer": "d"}]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"examples": []}, ValueError, "'bad'.*empty"),
        ({"examples": [OK[0], {"prompt": "x"}]}, ValueError, "'bad'.*example 1 has no 'answer'"),
        ({"examples": [{"answer": "x"}]}, ValueError, "'bad'.*example 0 has no 'prompt'"),
        ({"examples": [OK[0], ""]}, TypeError, "'bad'.*example 1 must be a mapping"),
        ({"examples": [OK[0], {"prompt": "", "answer": "x"}]}, ValueError, "'bad'.*example 1.*nothing"),
        ({"examples": [{"prompt": 3, "answer": "x"}]}, TypeError, "'bad'.*example 0's prompt"),
        ({"examples": [OK[0], {"prompt": "a", "answer": []}]}, TypeError, "'bad'.*example 1's answer"),
        ({"examples": [{"prompt": "a", "answer": 7}]}, TypeError, "'bad'.*example 0's answer"),
        ({"max_new_tokens": 0}, ValueError, "'bad'.*max_new_tokens"),
        ({"batch_size": 0}, ValueError, "'bad'.*batch_size"),
        ({"metric": "bleu"}, ValueError, "'bad'.*metric"),
        ({"tokenizer": NoPad()}, ValueError, "'bad'.*pad token"),
        ({"tokenizer": object()}, TypeError, "'bad'.*encode"),
        ({"stop": ("\n", "")}, ValueError, "'bad'.*stop"),
        ({"normalize": "lower"}, TypeError, "'bad'.*normalize"),
        ({"normalize": len}, TypeError, "'bad'.*example 0's answer"),
        ({"example_ids": ["a", "a"]}, ValueError, "'bad'.*unique"),
        ({"example_ids": ["a"]}, ValueError, "'bad'.*1 example_ids for 2"),
        ({"name": "mean"}, ValueError, "reserved"),
    ],
)
def test_bad_construction(kwargs, error, match):
    arguments = {"name": "bad", "examples": OK, "tokenizer": Chars(), **kwargs}
    with pytest.raises(error, match=match):
        GenerationTask(
            arguments.pop("name"), arguments.pop("examples"), arguments.pop("tokenizer"), **arguments
        )


def test_bad_models_and_an_explicit_pad_token():
    task = GenerationTask("bad", OK, NoPad(), pad_token_id=0)
    with pytest.raises(TypeError, match=r"'bad'.*logits"):
        task.evaluate(NotLogits())
    assert task.evaluate(ScriptedLM([script("a", "b\n")])).outputs == ["b", "~" * 32]


# ---------------------------------------------------------------------------------- the tiny GPT-2


def reference_greedy(model, tokenizer, prompt, max_new_tokens, stop):
    """One prompt at a time, the whole sequence through the model at every step; no batching, no mask."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    new: list[int] = []
    ended = "max"
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            ended = "eos"
            break
        new.append(token)
        if any(s in tokenizer.decode(new) for s in stop):
            ended = "stop"
            break
    text = tokenizer.decode(new)
    positions = [text.find(s) for s in stop if s in text]
    return (text[: min(positions)] if positions else text), ended


@pytest.fixture(scope="module")
def gpt2():
    return tiny_tokenizer(), tiny_gpt2(0)


def test_batched_decoding_equals_an_unbatched_greedy_loop(gpt2):
    tokenizer, model = gpt2
    stop = ("s is", "rrr", " and")
    expected = [reference_greedy(model, tokenizer, p, 10, stop) for p in PROMPTS]
    endings = Counter(ended for _, ended in expected)
    print(f"\nreference endings over {len(PROMPTS)} prompts: {dict(endings)}")
    assert endings["stop"] >= 3 and endings["max"] >= 3  # both ways of ending are exercised
    examples = [{"prompt": p, "answer": "x"} for p in PROMPTS]
    for batch_size in (1, 2, 16):
        task = GenerationTask(
            "gpt", examples, tokenizer, max_new_tokens=10, stop=stop, normalize=None, batch_size=batch_size
        )
        assert task.evaluate(model).outputs == [text for text, _ in expected], batch_size
    normalised = GenerationTask("gpt", examples, tokenizer, max_new_tokens=10, stop=stop, batch_size=5)
    assert normalised.evaluate(model).outputs == [default_normalize(text) for text, _ in expected]


def test_decoding_equals_hugging_face_generate(gpt2):
    tokenizer, model = gpt2
    examples = [{"prompt": p, "answer": "x"} for p in PROMPTS]
    task = GenerationTask("hf", examples, tokenizer, max_new_tokens=12, stop=(), normalize=None, batch_size=4)
    outputs = task.evaluate(model).outputs
    lengths = []
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            generated = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=12,
                pad_token_id=tokenizer.pad_token_id,
            )[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in generated:
            generated = generated[: generated.index(tokenizer.eos_token_id)]
        lengths.append(len(generated))
        assert output == tokenizer.decode(generated), prompt
    print(f"\nHF generate agreed on {len(PROMPTS)} prompts, continuation lengths {lengths}")


def test_ensemble_votes_and_instability_through_the_monitor(gpt2, tmp_path):
    tokenizer, _ = gpt2
    model = tiny_gpt2(0)  # a copy of its own: its weights drift below
    answers = ["nnn", "rr`", "aaa", "is is is", "is is", "ur", "ususus", "yyy", "yy", "n", "eee", "yyy"]
    examples = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, answers, strict=True)]
    task = GenerationTask("gen", examples, tokenizer, max_new_tokens=3, metric="char_f1")
    monitor = StabilityMonitor(
        [task],
        dirpath=tmp_path,
        window=3,
        every_n_steps=1,
        console=False,
        tensorboard=False,
        similarity="char_f1",
    )
    noise = torch.Generator().manual_seed(1)
    records = []
    for step in range(1, 5):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.005 * torch.randn(parameter.shape, generator=noise))
        records += monitor.on_snapshot(model, step)
    monitor.close()

    raw = [line["outputs"] for line in monitor.history.outputs("gen", variant="raw")]
    ens = [line["outputs"] for line in monitor.history.outputs("gen", variant="ens")]
    avg = [line["outputs"] for line in monitor.history.outputs("gen", variant="avg")]
    assert len(raw) == len(ens) == len(avg) == 4
    cases = Counter()
    for t in range(4):
        window = raw[max(0, t - 2) : t + 1]
        for i in range(len(PROMPTS)):
            votes = Counter(w[i] for w in window)
            top = max(votes.values())
            tied = [o for o, c in votes.items() if c == top]
            expected = next(w[i] for w in reversed(window) if w[i] in tied)
            if len(tied) > 1:
                cases["tie"] += 1
            elif expected != window[-1][i]:
                cases["majority over the newest"] += 1
            assert ens[t][i] == expected, (t, i)
    print(f"\nvote cases over 4 steps x {len(PROMPTS)} examples: {dict(cases)}")
    assert cases["tie"] and cases["majority over the newest"]

    targets = [default_normalize(a) for a in answers]
    for variant, series in (("raw", raw), ("ens", ens), ("avg", avg)):
        lines = monitor.history.outputs("gen", variant=variant)
        mine = [r for r in records if r["task"] == "gen" and r["variant"] == variant]
        for t, (line, record) in enumerate(zip(lines, mine, strict=True)):
            correct = [hand_char_f1(o, y) for o, y in zip(line["outputs"], targets, strict=True)]
            assert line["correct"] == pytest.approx(correct, abs=1e-15)
            assert record["score"] == pytest.approx(sum(correct) / len(correct), abs=1e-12)
            if t == 0:
                assert record["is"] is None
                continue
            block = series[: t + 1]  # horizon 20 > 4 evaluations: the whole series so far
            per_example = [
                sum(1 - hand_char_f1(block[k][i], block[k + 1][i]) for k in range(t)) / t
                for i in range(len(PROMPTS))
            ]
            assert record["is"] == pytest.approx(sum(per_example) / len(PROMPTS), abs=1e-12)
    meta = monitor.history.meta("gen")
    assert meta["kind"] == "generation" and meta["metric"] == "char_f1" and meta["targets"] == targets


# ------------------------------------------------------------------------------- two ranks (gloo)


class CollectiveLM(ScriptedLM):
    """Joins a collective in every forward, as a sharded (FSDP) model gathers its weights: ranks running
    different numbers of forward passes would hang here (until the process group's timeout)."""

    def forward(self, input_ids):
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(torch.zeros(1))
        return super().forward(input_ids)


def collective_task_and_model():
    # 5 prompts on 2 ranks: rank 0 decodes 0, 1, 2 (2 is long), rank 1 decodes 3, 4 (short) and a
    # filler, so rank 1 runs dummy forwards while rank 0 finishes.
    continuations = [
        (" one\n", False),
        (" two\n", False),
        (" a long answer\n", False),
        ("!", True),
        ("", True),
    ]
    scripts = [script(f"P{i}:", text, eos) for i, (text, eos) in enumerate(continuations)]
    examples = [{"prompt": f"P{i}:", "answer": text.strip()} for i, (text, _) in enumerate(continuations)]
    task = GenerationTask("dist", examples, Chars(), max_new_tokens=16, batch_size=2)
    return task, CollectiveLM(scripts)


def rank_main(rank: int, out: Path) -> None:
    # A forked child must not enter OpenMP regions the parent's thread pool owned (as DataLoader workers).
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out}/store", rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    try:
        task, model = collective_task_and_model()
        result = task.evaluate(model)
        record = {"outputs": result.outputs, "correct": result.correct, "shapes": model.shapes}
        (out / f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def run_two_ranks(target, out: Path) -> None:
    """Two gloo ranks as forked processes: no interpreter start-up, no port (a file store)."""
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=target, args=(rank, out)) for rank in (0, 1)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert [p.exitcode for p in processes] == [0, 0], "a rank failed or hung; see its stderr"


def test_two_ranks_step_together_and_gather_in_order(tmp_path):
    run_two_ranks(rank_main, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    task, model = collective_task_and_model()
    single = task.evaluate(model)
    assert single.outputs == ["one", "two", "a long answer", "!", ""]
    for rank in ranks:
        assert rank["outputs"] == single.outputs and rank["correct"] == single.correct
    shapes = [[tuple(s) for s in rank["shapes"]] for rank in ranks]
    # The same number of forward passes on both ranks: batch 1 runs 5 steps (" one\n", " two\n") where
    # rank 1 needs 2 ("!" + EOS), batch 2 runs 15 (" a long answer\n") where rank 1 has only the filler.
    assert len(shapes[0]) == len(shapes[1]) == 20
    assert shapes[1].count((1, 1)) == 3 + 15 and (1, 1) not in shapes[0]
    print(f"\nforward passes per rank: {len(shapes[0])}, rank 1 dummies: {shapes[1].count((1, 1))}")
