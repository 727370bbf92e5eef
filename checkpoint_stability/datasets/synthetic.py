"""Small evaluation sets that need no corpus: generated arithmetic, and a hand-written set of facts.

Where the data comes from: the arithmetic problems are generated here from a seed; the facts are
written out in this file (common knowledge: capitals, planets, chemical symbols...). Both are part of
this project and under its licence (Apache-2.0). Nothing is downloaded.

* :func:`arithmetic_examples` — ``{"prompt": "12 + 7 =", "answer": "19"}`` items for
  :class:`~checkpoint_stability.tasks.generation.GenerationTask`;
* :func:`arithmetic_choice_examples` — the same problems as multiple-choice items with near-miss
  distractors, ``{"context": "12 + 7 =", "choices": ["18", "19", ...], "label": 1}``;
* :func:`fact_examples` — about thirty multiple-choice facts.

Multiple-choice items are meant for
:class:`~checkpoint_stability.tasks.multiple_choice.MultipleChoiceTask` with its default
``target_delimiter=" "``: a choice is scored as the text after the context and a space.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from checkpoint_stability.validation import is_int, require_int

OPERATORS = ("+", "-", "*")
"""Operators the arithmetic sets can use; ``-`` problems never have a negative result."""

# Near misses, the mistakes a model that half-learnt the task makes: off by one, two, three, or ten.
_DISTRACTOR_OFFSETS = (-3, -2, -1, 1, 2, 3, -10, 10)
MAX_ARITHMETIC_CHOICES = 5
"""Every answer, 0 included, has at least four non-negative near misses: 1, 2, 3 and 10 away."""

# (context, right answer, three wrong answers of the same kind)
FACTS: tuple[tuple[str, str, tuple[str, str, str]], ...] = (
    ("The capital of France is", "Paris", ("Rome", "Madrid", "Berlin")),
    ("The capital of Japan is", "Tokyo", ("Beijing", "Seoul", "Bangkok")),
    ("The capital of Italy is", "Rome", ("Paris", "Vienna", "Athens")),
    ("The capital of Spain is", "Madrid", ("Lisbon", "Rome", "Barcelona")),
    ("The capital of Germany is", "Berlin", ("Vienna", "Prague", "Munich")),
    ("The capital of Egypt is", "Cairo", ("Nairobi", "Tunis", "Alexandria")),
    ("The capital of Canada is", "Ottawa", ("Toronto", "Vancouver", "Montreal")),
    ("The capital of Australia is", "Canberra", ("Sydney", "Melbourne", "Perth")),
    ("The capital of Russia is", "Moscow", ("Kyiv", "Minsk", "Saint Petersburg")),
    ("The capital of England is", "London", ("Dublin", "Edinburgh", "Manchester")),
    ("The largest planet in the Solar System is", "Jupiter", ("Mars", "Venus", "Mercury")),
    ("The planet closest to the Sun is", "Mercury", ("Venus", "Mars", "Jupiter")),
    ("The planet known as the Red Planet is", "Mars", ("Venus", "Saturn", "Neptune")),
    ("The chemical symbol for gold is", "Au", ("Ag", "Fe", "Pb")),
    ("The chemical symbol for iron is", "Fe", ("Ir", "Au", "Cu")),
    ("The chemical formula of water is", "H2O", ("CO2", "O2", "NaCl")),
    ("Water freezes at a temperature in degrees Celsius of", "0", ("100", "32", "10")),
    ("Water boils at sea level at a temperature in degrees Celsius of", "100", ("0", "50", "212")),
    ("The number of days in a week is", "seven", ("five", "six", "eight")),
    ("The number of sides of a triangle is", "three", ("four", "five", "six")),
    ("The number of legs of a spider is", "eight", ("six", "four", "ten")),
    ("The smallest prime number is", "2", ("1", "3", "0")),
    (
        "The play Hamlet was written by",
        "William Shakespeare",
        ("Charles Dickens", "Jane Austen", "John Milton"),
    ),
    ("The largest ocean on Earth is the", "Pacific", ("Atlantic", "Indian", "Arctic")),
    ("The tallest mountain on Earth is Mount", "Everest", ("Kilimanjaro", "Fuji", "Elbrus")),
    ("The first person to walk on the Moon was Neil", "Armstrong", ("Collins", "Glenn", "Young")),
    ("The largest animal on Earth is the", "blue whale", ("elephant", "giraffe", "hippopotamus")),
    ("The main language spoken in Brazil is", "Portuguese", ("Spanish", "French", "Italian")),
    ("The currency of Japan is the", "yen", ("euro", "dollar", "rupee")),
    ("Light travels about 300,000 kilometres in one", "second", ("hour", "minute", "day")),
    ("The opposite of hot is", "cold", ("warm", "wet", "loud")),
    (
        "The gas that plants take in from the air to make sugar is carbon",
        "dioxide",
        ("monoxide", "fiber", "copy"),
    ),
)


def arithmetic_examples(
    n: int = 100, seed: int = 0, max_operand: int = 20, *, operators: Sequence[str] = ("+",)
) -> list[dict]:
    """``n`` distinct arithmetic problems as generation items ``{"prompt": "a op b =", "answer": "c"}``.

    Operands are integers in ``[0, max_operand]``, drawn without repetition of a problem from
    ``random.Random(seed)``; ``operators`` are among ``"+"``, ``"-"`` (first operand >= second, so no
    negative results) and ``"*"``. The answer is the exact result in decimal.

    >>> arithmetic_examples(2, seed=1, max_operand=9)
    [{'prompt': '1 + 7 =', 'answer': '8'}, {'prompt': '7 + 2 =', 'answer': '9'}]
    """
    return [
        {"prompt": prompt, "answer": str(result)}
        for prompt, result in _problems(n, random.Random(seed), max_operand, operators)
    ]


def arithmetic_choice_examples(
    n: int = 100,
    n_choices: int = 4,
    seed: int = 0,
    max_operand: int = 20,
    *,
    operators: Sequence[str] = ("+",),
) -> list[dict]:
    """The problems of :func:`arithmetic_examples` (same ``n``, ``seed``, ``max_operand``, ``operators``) as
    multiple-choice items ``{"context": "a op b =", "choices": [...], "label": int}``.

    The wrong choices are distinct non-negative near misses of the result (off by 1, 2, 3 or 10), so a
    model has to get the number right, not just its size; the right one's position is drawn from the
    same generator. ``n_choices`` is 2 to 5.

    >>> arithmetic_choice_examples(2, n_choices=3, seed=1, max_operand=9)[1]
    {'context': '7 + 2 =', 'choices': ['9', '19', '10'], 'label': 0}
    """
    if not is_int(n_choices) or not 2 <= n_choices <= MAX_ARITHMETIC_CHOICES:
        raise ValueError(
            f"n_choices must be an integer from 2 to {MAX_ARITHMETIC_CHOICES}, got {n_choices!r}"
        )
    rng = random.Random(seed)
    items = []
    for prompt, result in _problems(
        n, rng, max_operand, operators
    ):  # drawn first: same as arithmetic_examples
        near = [result + offset for offset in _DISTRACTOR_OFFSETS if result + offset >= 0]
        choices = [result, *rng.sample(near, n_choices - 1)]
        rng.shuffle(choices)
        items.append(
            {"context": prompt, "choices": [str(c) for c in choices], "label": choices.index(result)}
        )
    return items


def fact_examples(seed: int = 0) -> list[dict]:
    """The hand-written facts of :data:`FACTS` as four-way multiple-choice items, in the order written.

    ``{"context": "The capital of France is", "choices": [...], "label": int}``; the order of the choices
    is shuffled with ``random.Random(seed)`` so that the right answer is not always first.

    >>> item = fact_examples()[0]
    >>> item["context"], item["choices"][item["label"]]
    ('The capital of France is', 'Paris')
    >>> len(fact_examples())
    32
    """
    rng = random.Random(seed)
    items = []
    for context, answer, wrong in FACTS:
        choices = [answer, *wrong]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return items


def _problems(
    n: int, rng: random.Random, max_operand: int, operators: Sequence[str]
) -> list[tuple[str, int]]:
    """``n`` distinct ``(prompt, result)`` problems, sampled without replacement from all of them."""
    n = require_int("n", n, 1)
    max_operand = require_int("max_operand", max_operand, 1)
    if isinstance(operators, str):
        operators = tuple(operators)
    operators = list(dict.fromkeys(operators))  # repeated operators would not make more problems
    if not operators or any(op not in OPERATORS for op in operators):
        raise ValueError(f"operators must be a non-empty selection of {OPERATORS}, got {operators!r}")
    size = max_operand + 1
    # Problems are numbered per operator: a*b: a * size + b; a-b with a >= b: the triangle a(a+1)/2 + b.
    counts = [size * (size + 1) // 2 if op == "-" else size * size for op in operators]
    total = sum(counts)
    if n > total:
        raise ValueError(
            f"there are only {total} distinct problems with operands up to {max_operand} and operators "
            f"{operators}, fewer than the {n} asked for; raise max_operand"
        )
    problems = []
    for number in rng.sample(range(total), n):
        which = 0
        while number >= counts[which]:
            number -= counts[which]
            which += 1
        op = operators[which]
        if op == "-":
            a = (math.isqrt(8 * number + 1) - 1) // 2
            b = number - a * (a + 1) // 2
        else:
            a, b = divmod(number, size)
        result = a + b if op == "+" else a - b if op == "-" else a * b
        problems.append((f"{a} {op} {b} =", result))
    return problems
