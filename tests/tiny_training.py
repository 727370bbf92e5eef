"""A tiny classifier, its data and training loop, shared by the monitor and selection tests."""

from __future__ import annotations

import random

import numpy as np
import torch

from checkpoint_stability import FunctionTask, StabilityMonitor

FEATURES, CLASSES, EXAMPLES = 6, 4, 40


def make_data(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(EXAMPLES, FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (EXAMPLES,), generator=generator)
    return x, y


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(FEATURES, 16)
        self.drop = torch.nn.Dropout(0.3)
        self.norm = torch.nn.BatchNorm1d(16)
        self.out = torch.nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.out(self.norm(self.drop(torch.relu(self.hidden(x)))))


def classify_task(x, y, name="cls", seen=None):
    """Multiple-choice-like task: outputs and log-probs over the classes; consumes RNG on purpose."""

    def predict(model):
        torch.randn(3)  # an evaluation that draws random numbers must not shift training's RNG
        random.random()
        np.random.rand()
        logprobs = torch.log_softmax(model(x), dim=-1)
        if seen is not None:
            seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"choice_logprobs": logprobs.tolist()}

    return FunctionTask(name, predict, targets=y.tolist(), kind="multiple_choice")


def train(steps: int, monitor: StabilityMonitor | None = None, seed: int = 0):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    x, y = make_data()
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    model.train()
    for step in range(1, steps + 1):
        noise = torch.randn_like(x) * 0.1  # training consumes the global RNG every step
        loss = torch.nn.functional.cross_entropy(model(x + noise), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if monitor is not None:
            monitor.step(model, step)
    return model
