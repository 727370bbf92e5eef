"""A model whose ``state_dict()`` hands out copies of its parameters: weights written into those copies
never reach the model, so an avg evaluation would silently evaluate the raw weights (as FSDP1's
``NO_SHARD`` did before its snapshots took views of the flat parameters). Such a model is reported, not
evaluated wrongly: inline, avg is left out with an error line naming the cause; the background
evaluator refuses the model."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoint_stability import FunctionTask, StabilityMonitor
from checkpoint_stability.evaluator import BackgroundEvaluator, ModelMismatchError
from checkpoint_stability.state_dicts import live_tensors, unreachable_parameters


class CopyingStateDict(torch.nn.Module):
    """A linear model whose state dict holds clones (as a state-dict hook that copies would make)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)
        self._register_state_dict_hook(self._copies)

    @staticmethod
    def _copies(module, state, prefix, local_metadata):
        for key in list(state):
            state[key] = state[key].detach().clone()
        return state

    def forward(self, x):
        return self.layer(x)


X = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))


def task() -> FunctionTask:
    return FunctionTask("cls", lambda m: m(X).argmax(-1).tolist(), targets=[0, 1] * 4)


def train(model: torch.nn.Module, monitor: StabilityMonitor, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(1, steps + 1):
        loss = model(X).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.on_snapshot(model, step)


def test_copies_are_found_and_views_are_not():
    plain = torch.nn.Linear(3, 2)
    assert unreachable_parameters(plain, live_tensors(plain)) == []
    tied = torch.nn.Sequential(torch.nn.Embedding(4, 3), torch.nn.Linear(3, 4, bias=False))
    tied[1].weight = tied[0].weight
    assert unreachable_parameters(tied, live_tensors(tied)) == []
    copying = CopyingStateDict()
    assert unreachable_parameters(copying, live_tensors(copying)) == ["layer.weight", "layer.bias"]


def test_inline_avg_is_left_out_with_the_cause_instead_of_evaluating_the_raw_weights(tmp_path):
    model = CopyingStateDict()
    monitor = StabilityMonitor([task()], dirpath=tmp_path, window=2, every_n_steps=1, console=False)
    monitor.open(model=model)
    train(model, monitor, steps=3)
    monitor.close()
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    variants = {line.get("variant") for line in lines if "score" in line}
    assert "raw" in variants and "avg" not in variants
    errors = [line for line in lines if line.get("phase") == "average"]
    assert len(errors) == 3
    assert "returns copies of 2 of its parameters ('layer.weight', 'layer.bias')" in errors[0]["error"]


def test_the_background_evaluator_refuses_a_model_whose_state_dict_copies(tmp_path):
    trained = torch.nn.Linear(3, 2)
    monitor = StabilityMonitor([], dirpath=tmp_path, evaluation="background", window=2, every_n_steps=1)
    monitor.open(model=trained)
    train(trained, monitor, steps=2)
    monitor.close()
    evaluator = BackgroundEvaluator(tmp_path, [task()], copying_linear(), console=False)
    with pytest.raises(ModelMismatchError, match="cannot take the snapshots in: the model's state_dict"):
        evaluator.run(timeout=30)


def copying_linear() -> torch.nn.Module:
    """A model with the trained ``Linear``'s names ("weight", "bias") whose state dict copies."""
    model = torch.nn.Linear(3, 2)
    model._register_state_dict_hook(CopyingStateDict._copies)
    return model
