"""Item 8: the incremental window average after 1,000 snapshots against a float64 reference.

A ~1M-parameter GPT-2's weights take a random walk (each snapshot moves every weight by N(0, 1e-3)),
pushed through the real path: ``SnapshotBuffer`` files and a float32 ``WindowAverage`` (window 20,
exact re-sum every 20 updates). The reference is the float64 mean of the last 20 snapshots, kept in
memory. The same walk through an average that never re-sums shows the drift the re-sum prevents.
"""

from __future__ import annotations

import tempfile
from collections import deque
from pathlib import Path

import torch

from benchmarks.harness import Figure, gpt2, parameter_count
from checkpoint_stability.averaging import WindowAverage
from checkpoint_stability.buffer import SnapshotBuffer
from checkpoint_stability.state_dicts import CapturedState, capture_state, live_tensors


def relative_error(mean: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    worst = max((mean[n].double() - reference[n]).abs().max().item() for n in reference)
    largest = max(t.abs().max().item() for t in reference.values())
    return worst / largest


def run(quick: bool, workdir: Path) -> tuple[list[Figure], dict[str, int]]:
    snapshots, window = (100, 20) if quick else (1000, 20)
    model = gpt2("1M")
    live = live_tensors(model)
    generator = torch.Generator().manual_seed(0)
    average = WindowAverage(torch.float32, exact_sum_every=window)
    drifting = WindowAverage(torch.float32, exact_sum_every=None)
    kept: deque[CapturedState] = deque(maxlen=window + 1)
    with tempfile.TemporaryDirectory(dir=workdir) as directory:
        buffer = SnapshotBuffer(Path(directory), window, listener=average.update)
        for step in range(1, snapshots + 1):
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 1e-3)
            buffer.push(step, live)
            copy = capture_state(live)
            kept.append(copy)
            evicted = [lambda old=kept[0]: old] if len(kept) > window else []
            drifting.update(copy, evicted=evicted)
        buffer.close()
        window_states = list(kept)[-window:]
        reference = {
            name: sum(state.tensors[name].double() for state in window_states) / window
            for name, tensor in window_states[-1].tensors.items()
            if tensor.is_floating_point()
        }
        error = relative_error(average.captured().tensors, reference)
        drift = relative_error(drifting.captured().tensors, reference)
    return [
        Figure(
            "8",
            f"max abs(average - float64 reference) / max abs(weight), {snapshots} snapshots, window {window}",
            error,
            unit="",
            target="<= 1e-6",
            met=error <= 1e-6,
            note=f"without the periodic exact re-sum: {drift:.2g}",
        )
    ], {"1M": parameter_count(model)}
