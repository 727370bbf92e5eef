"""What every benchmark shares: interleaved timing, the GPT-2-shaped models, result rows, memory probes.

Timings are ratios of two things measured alternately in the same process (A, B, A, B, ...), each the
median of its repeats after a warm-up, so that a neighbour's load on the shared cores hits both sides
alike instead of skewing one of them.
"""

from __future__ import annotations

import gc
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# name -> (GPT2Config keywords, what the issue asks of it). Vocabularies are cut below GPT-2's 50257 for the
# small models, or the embedding alone would be most of their parameters.
MODEL_SIZES = {
    "124M": dict(),  # GPT2Config() itself: 12 layers, width 768, vocabulary 50257, context 1024
    # GPT-2 medium, large and XL (full vocabulary and context), for the scale benchmark (benchmarks/scale.py).
    "355M": dict(n_embd=1024, n_layer=24, n_head=16),
    "774M": dict(n_embd=1280, n_layer=36, n_head=20),
    "1.5B": dict(n_embd=1600, n_layer=48, n_head=25),
    "1B": dict(n_embd=1536, n_layer=32, n_head=16),  # 985M, GPT-2-shaped: benchmarks/gpu_check.py's model
    "50M": dict(n_embd=512, n_layer=8, n_head=8),
    "10M": dict(
        vocab_size=8192, n_positions=256, n_embd=320, n_layer=6, n_head=5, bos_token_id=0, eos_token_id=0
    ),
    "1M": dict(
        vocab_size=1024, n_positions=128, n_embd=128, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0
    ),
}


@dataclass
class Figure:
    """One measured figure, with its target (None when the issue asks only to report it)."""

    item: str
    name: str
    value: float
    unit: str = "x"
    target: str | None = None
    met: bool | None = None
    note: str = ""

    def shown(self) -> str:
        if self.unit == "x":
            return f"{self.value:.3g}"
        if self.unit == "%":
            return f"{self.value:.2f}%"
        if self.unit == "s":
            return f"{self.value:.3g} s"
        if self.unit == "":
            return f"{self.value:.3g}"
        if self.unit == "MB":
            return f"{self.value:.0f} MB"
        return f"{self.value:.3g} {self.unit}"


def gpt2(size: str, seed: int = 0):
    """A randomly initialised ``GPT2LMHeadModel`` of one of ``MODEL_SIZES`` (nothing downloaded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(**MODEL_SIZES[size], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"
    return model


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def distinct_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with tied entries kept once (GPT-2's lm_head is wte): what a snapshot must copy."""
    seen, out = set(), {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in distinct_tensors(state).values())


def bare_clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The floor of a CPU snapshot: one ``clone()`` per distinct tensor and nothing else."""
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    before_each: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Median seconds of each candidate, measured alternately; ``before_each`` runs untimed before each call.

    Garbage from the previous call is collected before timing the next, so one candidate's frees do not
    land in the other's time.
    """
    samples = interleaved_samples(candidates, repeats, warmup, before_each)
    return {name: statistics.median(values) for name, values in samples.items()}


def interleaved_samples(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    before_each: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Every timed sample of ``interleaved`` (seconds, round by round), for the spread of a ratio."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for round_ in range(warmup + repeats):
        for name, fn in candidates.items():
            if before_each is not None:
                before_each()
            gc.collect()
            elapsed = timed(fn)
            if round_ >= warmup:
                samples[name].append(elapsed)
    return samples


def ratio_spread(numerators: list[float], denominators: list[float]) -> str:
    """The interquartile range of the round-by-round ratios, e.g. ``"rounds: 0.91-1.08"``."""
    ratios = sorted(a / b for a, b in zip(numerators, denominators, strict=True))
    if len(ratios) < 4:
        return f"rounds: {ratios[0]:.2f}-{ratios[-1]:.2f}"
    low, _, high = statistics.quantiles(ratios, n=4)
    return f"middle half of rounds: {low:.2f}-{high:.2f}"


def perturb(model: torch.nn.Module, scale: float = 1e-3) -> None:
    """A cheap stand-in for an optimizer step between snapshots: every parameter moves a little."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale)


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kb("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Make VmHWM start again from the current resident size (Linux >= 4.0), so a phase's peak is its own."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_child(module: str, *args: str, timeout: float = 600) -> str:
    """Run ``python -m benchmarks.<module> <args>`` in a fresh process (its peak memory is its own) and
    return the last line it printed."""
    completed = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"benchmarks.{module} {args} failed:\n{completed.stderr[-3000:]}")
    return completed.stdout.strip().splitlines()[-1]
