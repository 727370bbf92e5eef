"""The demo's model, data and tasks (examples/pretrain_tiny_gpt.py), loaded from the example itself so the
benchmarks price exactly the settings a user sees in ``make demo``."""

from __future__ import annotations

import functools
import importlib.util

import torch

from benchmarks.harness import REPO


@functools.lru_cache(maxsize=1)
def demo_module():
    spec = importlib.util.spec_from_file_location(
        "pretrain_tiny_gpt", REPO / "examples" / "pretrain_tiny_gpt.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_setup():
    """(model, tasks, training ids, demo module): 3 layers, width 96; cloze 100 items, next_char 500."""
    demo = demo_module()
    from checkpoint_stability.datasets import plays_text, split_text

    text = plays_text(demo.MAX_CHARS)
    train_text, held_out_text = split_text(text, demo.HELD_OUT_FRACTION)
    tokenizer = demo.char_tokenizer(text)
    train_ids = torch.tensor(tokenizer.backend_tokenizer.encode(train_text).ids)
    held_out_ids = tokenizer.backend_tokenizer.encode(held_out_text).ids
    tasks = [demo.cloze_task(tokenizer), demo.next_char_task(held_out_ids, tokenizer.pad_token_id)]
    for task in tasks:
        task.show_progress = False
    torch.manual_seed(demo.SEED)
    model = demo.tiny_gpt2(tokenizer)
    return model, tasks, train_ids, demo


def demo_batches(train_ids: torch.Tensor, demo, seed: int = 0):
    """Random windows of the training text, batch 16 x context 128, as the demo's Trainer draws them."""
    generator = torch.Generator().manual_seed(seed)
    length = demo.CONTEXT_LENGTH
    while True:
        starts = torch.randint(0, len(train_ids) - length, (demo.BATCH_SIZE,), generator=generator)
        yield torch.stack([train_ids[s : s + length] for s in starts.tolist()])


def demo_optimizer(model, demo):
    return torch.optim.AdamW(model.parameters(), lr=demo.LEARNING_RATE, weight_decay=demo.WEIGHT_DECAY)
