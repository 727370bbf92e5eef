"""Run evaluations without leaving a trace on training: RNG streams, train/eval modes and grad mode."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def preserved_rng(*, cuda: bool = True) -> Iterator[None]:
    """On exit, put python's, numpy's and torch's CPU random generators back as they were, and with
    ``cuda`` every CUDA device's too (when CUDA is available).

    ``cuda=False`` is for code that draws on the CPU only (iterating a ``DataLoader``, whose iterator
    draws its base seed from torch's CPU generator, and datasets that draw from any of the three): it
    saves touching, and perhaps initialising, CUDA.
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if cuda and torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def isolated_evaluation(model: torch.nn.Module) -> Iterator[None]:
    """Evaluate inside this block; on exit everything training can observe is as it was.

    Saves and restores the python, numpy and torch (CPU and every CUDA device) random states, the
    train/eval flag of every submodule (some are kept in eval on purpose, so a blanket ``train()``
    would be wrong), and the grad mode. Inside, the model is in eval mode under ``torch.no_grad()``.
    Weights are the caller's business (see ``StabilityMonitor``), since only it knows what it changed.
    """
    modes = [(module, module.training) for module in model.modules()]
    grad_enabled = torch.is_grad_enabled()
    with preserved_rng():
        try:
            model.eval()
            with torch.no_grad():
                yield
        finally:
            for module, training in modes:
                module.training = training
            torch.set_grad_enabled(grad_enabled)
