"""Run by tests/test_lm_eval_task.py under torchrun with two CPU processes (gloo).

argv: the output directory and the directory of the resolved task YAMLs. Every rank evaluates the same
LmEvalTasks on the same tiny models and writes what it got, with its count of forward passes, to
rank<R>.json.
"""

import json
import os
import sys
from pathlib import Path


def main(out: str, include: str) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    os.environ["HF_DATASETS_CACHE"] = f"{out}/datasets-rank{rank}"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_lm_eval_task import Bigram, result_dict
    from tiny_lm import tiny_gpt2, tiny_tokenizer

    from checkpoint_stability.tasks.lm_eval import LmEvalTask

    tokenizer = tiny_tokenizer()
    models = {"hf": tiny_gpt2(0), "plain": Bigram.seeded(len(tokenizer))}
    tasks = {
        "mc": LmEvalTask("mc", "cs_mc", tokenizer=tokenizer, include_path=include),
        "gen": LmEvalTask("gen", "cs_gen", tokenizer=tokenizer, include_path=include),
    }
    got = {}
    calls: list[int] = []
    for model_name, model in models.items():
        hook = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
        for task_name, task in tasks.items():
            calls.clear()
            got[f"{model_name}/{task_name}"] = {**result_dict(task.evaluate(model)), "forwards": len(calls)}
        hook.remove()
    with open(f"{out}/rank{rank}.json", "w") as handle:
        json.dump(got, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
