"""MultipleChoiceTask in two CPU processes (gloo), launched by torchrun: ``multiple_choice_ddp.py OUT``.

The examples are ragged on purpose: rank 0's share has many more choices (so more batches) than rank
1's, and the example count is odd (rank 1's share is padded). Each rank writes rank<R>.json with the
single-process result (computed before the process group exists), the distributed result, and how
many forward passes it ran; they must agree, and the forward counts must be equal across ranks.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_lm import tiny_gpt2, tiny_tokenizer

from checkpoint_stability.tasks.multiple_choice import MultipleChoiceTask

WORDS = ["Paris", "Rome", "York", "the lazy dog.", "four", "players", "question."]
EXAMPLES = [
    {"context": "The capital of France is", "choices": WORDS, "label": 0},
    {"context": "Two plus two is", "choices": WORDS[::-1], "label": 2},
    {"context": "To be, or not to be, that is the ", "choices": WORDS[1:], "label": 5},
    {"context": "All the world's a stage", "choices": WORDS[:5], "label": 1},
    {"context": "Now is the winter", "choices": ["of"], "label": 0},
    {"context": "", "choices": ["The", "Ten"], "label": 1},
    {"context": "The quick brown fox", "choices": ["jumps"], "label": 0},
]


def main(out: str) -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_gpt2(0, tokenizer)  # the same weights on every rank
    task = MultipleChoiceTask("mc", EXAMPLES, tokenizer, normalize="tokens", batch_size=2)
    alone = task.evaluate(model)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    forwards = []
    handle = model.register_forward_hook(lambda *_: forwards.append(1))
    together = task.evaluate(model)
    handle.remove()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(
            {
                "alone": {"outputs": alone.outputs, "choice_logprobs": alone.choice_logprobs},
                "together": {"outputs": together.outputs, "choice_logprobs": together.choice_logprobs},
                "example_ids": together.example_ids,
                "forwards": len(forwards),
            },
            f,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
