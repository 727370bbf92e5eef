"""Run by tests/test_transformers_distributed.py under torchrun: the Hugging Face StabilityCallback in DDP.

``python -m torch.distributed.run --standalone --nproc_per_node=2 transformers_ddp.py OUT`` trains a tiny
random GPT-2 with a real ``transformers.Trainer`` on two CPU processes (gloo), twice in the same
processes and process group:

- ``OUT/tasks``: explicit tasks (a ``NextTokenTask`` on an odd number of sentences, so one rank's share
  is padded, and a ``MultipleChoiceTask`` with ragged choice counts), ``report_to=["tensorboard"]``;
- ``OUT/default``: ``tasks=None``, so the callback builds a ``NextTokenTask`` from ``eval_dataset`` on
  every rank, with Trainer evaluations that pick the best step on ``stability/mean/avg/score``.

Each rank writes ``OUT/<mode>/rank<R>.json``: the records the callback returned at every snapshot, what
its monitor holds (history, buffer), the tasks it evaluated, how many model rows and forward passes each
evaluation cost on this rank, every file this rank created, renamed or removed in the run directories
(an audit hook), and a hash of its final weights. Rank 0 also saves the final weights to
``OUT/<mode>/final.safetensors`` for the single-process oracle.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import save_file
from tiny_lm import CORPUS, tiny_gpt2, tiny_tokenizer
from transformers import Trainer, TrainerCallback, TrainingArguments

from checkpoint_stability import MultipleChoiceTask, NextTokenTask
from checkpoint_stability.callbacks.transformers import StabilityCallback

BLOCK = 16
MAX_STEPS = 6
EVERY = 2
WINDOW = 2

WORDS = ["Paris", "Rome", "York", "the lazy dog.", "four", "players", "question."]
MC_EXAMPLES = [
    {"context": "The capital of France is", "choices": WORDS, "label": 0},
    {"context": "Two plus two is", "choices": WORDS[::-1], "label": 2},
    {"context": "To be, or not to be, that is the", "choices": WORDS[1:], "label": 5},
    {"context": "All the world's a stage", "choices": WORDS[:5], "label": 1},
    {"context": "Now is the winter", "choices": ["of"], "label": 0},
    {"context": "", "choices": ["The", "Ten"], "label": 1},
    {"context": "The quick brown fox", "choices": ["jumps"], "label": 0},
]
SENTENCES = CORPUS[:5]  # odd: the second rank's share is padded


def blocks(start: int, count: int) -> list[dict]:
    """Causal-LM rows of BLOCK tokens cut from the corpus (labels = input_ids, the HF convention)."""
    ids = tiny_tokenizer()(" ".join(CORPUS))["input_ids"]
    rows = []
    for i in range(start, start + count):
        chunk = torch.tensor(ids[i * BLOCK : (i + 1) * BLOCK])
        rows.append({"input_ids": chunk, "labels": chunk.clone()})
    return rows


def train_rows() -> list[dict]:
    return blocks(0, 48)


def eval_rows() -> list[dict]:
    return blocks(48, 7)  # odd, as above


def sentence_ids() -> list[list[int]]:
    tokenizer = tiny_tokenizer()
    return [tokenizer.encode(s, add_special_tokens=False) for s in SENTENCES]


def explicit_tasks() -> list:
    return [
        NextTokenTask("sentences", sentence_ids(), batch_size=2),
        MultipleChoiceTask(
            "mc", MC_EXAMPLES, tiny_tokenizer(), normalize="tokens", batch_size=4, show_progress=False
        ),
    ]


def tokenizer_digest() -> str:
    vocab = sorted(tiny_tokenizer().get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------- what a rank writes

WATCHED: list[str] = []
WRITES: list[list] = []


def _is_write(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return bool(isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))


def _audit(event: str, args: tuple) -> None:
    """Record every file this process creates, writes, renames or removes under the watched roots."""
    if event == "open":
        path, mode, flags = args
        if not _is_write(mode, flags):
            return
        paths = [path]
    elif event in ("os.rename", "os.replace"):
        paths = list(args[:2])
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.move", "shutil.copyfile"):
        paths = [args[0]] if event != "shutil.copyfile" else [args[1]]
    else:
        return
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)):
            text = os.fsdecode(path)
            if any(text.startswith(root) for root in WATCHED):
                WRITES.append([event, text])


class Probe(TrainerCallback):
    """Put after StabilityCallback: what every rank got back, and what each task evaluation cost here."""

    def __init__(self, stability: StabilityCallback):
        self.stability = stability
        self.snapshots: dict[str, list] = {}
        self.rows: dict[str, list[int]] = {}
        self.forwards: dict[str, list[int]] = {}
        self.tasks: list[dict] = []
        self.evaluations: dict[str, dict] = {}
        self.sinks: list[str] = []
        self._current: str | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # The monitor (and, with tasks=None, its default task) exists once StabilityCallback has begun.
        self.sinks = [type(sink).__name__ for sink in self.stability.monitor.sinks]
        for task in self.stability.monitor.tasks:
            task.evaluate = self._counted(task.name, task.evaluate)
            self.tasks.append(
                {
                    "name": task.name,
                    "kind": task.kind,
                    "type": type(task).__name__,
                    "count": len(task.example_ids),
                    "example_ids": list(task.example_ids),
                    "targets": list(getattr(task, "targets", getattr(task, "labels", []))),
                }
            )
        model.register_forward_pre_hook(self._count_rows, with_kwargs=True)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % EVERY == 0 and str(step) not in self.snapshots:
            self.snapshots[str(step)] = self.stability.latest_records

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # The Trainer logs its metrics before on_evaluate, so the stability keys are only seen here (and
        # by the best-model check that follows).
        seen = {k: v for k, v in (metrics or {}).items() if k.startswith("eval_stability/")}
        self.evaluations[str(state.global_step)] = seen

    def _counted(self, name, evaluate):
        @functools.wraps(evaluate)
        def counted(model):
            self._current = name
            self.rows.setdefault(name, []).append(0)
            self.forwards.setdefault(name, []).append(0)
            try:
                return evaluate(model)
            finally:
                self._current = None

        return counted

    def _count_rows(self, module, args, kwargs):
        if self._current is None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.rows[self._current][-1] += int(ids.shape[0])
        self.forwards[self._current][-1] += 1


def run(out: Path, mode: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    dirpath = out / "stability"
    output_dir = out / "hf"
    WATCHED[:] = [str(dirpath), str(output_dir / "runs" / "stability")]
    WRITES.clear()

    tasks = explicit_tasks() if mode == "tasks" else None
    stability = StabilityCallback(
        tasks, window=WINDOW, every_n_steps=EVERY, console=False, dirpath=str(dirpath)
    )
    probe = Probe(stability)
    settings = dict(
        output_dir=str(output_dir),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        use_cpu=True,
        ddp_backend="gloo",
        save_strategy="no",
        logging_steps=100,
        seed=0,
        data_seed=0,
        # Small enough that the predictions stay varied (larger rates collapse them onto the most frequent
        # token within a few steps), large enough that they change between snapshots.
        learning_rate=1e-3,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if mode == "tasks":
        settings.update(report_to=["tensorboard"])
    else:
        settings.update(
            report_to=[],
            eval_strategy="steps",
            eval_steps=EVERY,
            metric_for_best_model="stability/mean/avg/score",
        )
    trainer = Trainer(
        model=tiny_gpt2(0),  # the same initial weights on every rank
        args=TrainingArguments(**settings),
        train_dataset=train_rows(),
        eval_dataset=eval_rows(),
        callbacks=[stability, probe],
    )
    trainer.train()

    rank = dist.get_rank()
    monitor = stability.monitor
    if rank == 0:
        final = {k: v.detach().clone().contiguous() for k, v in trainer.model.state_dict().items()}
        save_file(final, str(out / "final.safetensors"))
    report = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "wrapped": type(trainer.model_wrapped).__name__,
        "global_step": trainer.state.global_step,
        "best_metric": trainer.state.best_metric,
        "snapshots": probe.snapshots,
        "latest_records": stability.latest_records,
        "history": monitor.history.records() if monitor.history is not None else None,
        "holds": {
            "history": monitor.history is not None,
            "buffer": monitor.buffer is not None,
            "selector": monitor.selector is not None,
            "sinks": probe.sinks,
        },
        "tasks": probe.tasks,
        "rows": probe.rows,
        "forwards": probe.forwards,
        "writes": WRITES,
        "evaluations": probe.evaluations,
        "weights": weights_digest(trainer.model),
        "tokenizer": tokenizer_digest(),
    }
    with open(out / f"rank{rank}.json", "w") as handle:
        json.dump(report, handle)
    dist.barrier()


def main(out: str) -> None:
    torch.set_num_threads(1)
    sys.addaudithook(_audit)
    for mode in ("tasks", "default"):
        run(Path(out).resolve() / mode, mode)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
