"""The demo's pretraining with evaluation off the training path: the Trainer only snapshots, and an
evaluator process beside it evaluates every snapshot as it arrives.

The model, data and tasks are those of ``examples/pretrain_tiny_gpt.py`` (``make demo``). Here the
callback is ``StabilityCallback(evaluation="background", ...)``: at each snapshot the training process
copies the weights into ``<out>/stability/buffer`` and goes on. This script starts the evaluator as a
second process first, with the one command a user would type beside a training job::

    checkpoint-stability follow runs/background_evaluation/stability \\
        --tasks background_evaluation:tasks --model background_evaluation:model

(``tasks`` and ``model`` below build the same tasks and an untrained GPT-2 of the same shape; the
evaluator copies each snapshot's weights into it). The evaluator writes the history, the best model
and its export, the report and TensorBoard runs exactly as inline evaluation would, a little later
(its lag is printed at the end), and stops once training has ended and every snapshot is evaluated.

Run it (3-4 minutes on 2 CPU cores)::

    python examples/background_evaluation.py [--steps 800] [--every 20] [--window 5]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in pretrain_tiny_gpt.py: see there

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from pretrain_tiny_gpt import (
    HELD_OUT_FRACTION,
    MAX_CHARS,
    SEED,
    TextWindows,
    char_tokenizer,
    cloze_task,
    next_char_task,
    split_text,
    tiny_gpt2,
)
from transformers import Trainer, TrainingArguments, set_seed

from checkpoint_stability import best_model_path, read_best
from checkpoint_stability.callbacks.transformers import StabilityCallback
from checkpoint_stability.datasets import plays_text

HERE = Path(__file__).resolve().parent


def _tokenizer():
    return char_tokenizer(plays_text(MAX_CHARS))


def tasks():
    """The demo's two tasks (for ``checkpoint-stability follow --tasks background_evaluation:tasks``)."""
    tokenizer = _tokenizer()
    _, held_out = split_text(plays_text(MAX_CHARS), HELD_OUT_FRACTION)
    return [
        cloze_task(tokenizer),
        next_char_task(tokenizer.backend_tokenizer.encode(held_out).ids, tokenizer.pad_token_id),
    ]


def model():
    """A GPT-2 of the trained shape (``--model background_evaluation:model``); its weights are replaced."""
    return tiny_gpt2(_tokenizer())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/background_evaluation"))
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    run_dir = args.out / "stability"

    # The evaluator first: it waits for the training side's run.json, then follows the snapshots.
    command = [
        sys.executable, "-m", "checkpoint_stability", "follow", str(run_dir),
        "--tasks", "background_evaluation:tasks", "--model", "background_evaluation:model", "--quiet",
    ]  # fmt: skip
    print("evaluator:", " ".join(command[2:]).replace("checkpoint_stability", "checkpoint-stability", 1))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}

    set_seed(SEED)
    torch.set_num_threads(2)
    text = plays_text(MAX_CHARS)
    train_text, _ = split_text(text, HELD_OUT_FRACTION)
    tokenizer = char_tokenizer(text)
    train_ids = torch.tensor(tokenizer.backend_tokenizer.encode(train_text).ids)
    stability = StabilityCallback(
        window=args.window, every_n_steps=args.every, horizon=10, holdout=0.5, evaluation="background"
    )
    trainer = Trainer(
        model=tiny_gpt2(tokenizer),
        args=TrainingArguments(
            output_dir=str(args.out),
            max_steps=args.steps,
            per_device_train_batch_size=16,
            learning_rate=2e-3,
            weight_decay=0.1,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=50,
            max_grad_norm=1.0,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=SEED,
            data_seed=SEED,
            dataloader_num_workers=0,
            disable_tqdm=True,
            logging_steps=100,
        ),
        train_dataset=TextWindows(train_ids),
        processing_class=tokenizer,
        callbacks=[stability],
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    evaluator = subprocess.Popen(command, env=env)
    started = time.time()
    trainer.train()
    print(f"training done: {args.steps} steps in {time.time() - started:.0f}s; waiting for the evaluator")
    evaluator.wait()
    best = read_best(run_dir)
    if best is not None:
        print(
            f"best model (chosen by the evaluator): step {best['step']}, {best['variant']} of steps "
            f"{best['steps'][0]}-{best['steps'][-1]}, exported to {best_model_path(run_dir)}"
        )
    print(f"report: {run_dir / 'report' / 'report.md'}")
    print(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")


if __name__ == "__main__":
    main()
