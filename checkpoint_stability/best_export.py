"""BestExport: step 8 of a snapshot — pick a candidate under the ``select`` policy, gather its weights
(once, collectively, when they are sharded), and commit it as the run's best export."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from checkpoint_stability.config import StabilityConfig
from checkpoint_stability.faults import FaultPolicy
from checkpoint_stability.records import MEAN_TASK
from checkpoint_stability.runtime import Runtime
from checkpoint_stability.selection import BestModelSelector
from checkpoint_stability.state_dicts import CapturedState, capture_state, gather_full_state, live_tensors
from checkpoint_stability.window import SnapshotWindow

logger = logging.getLogger(__name__)


class BestExport:
    """What the monitor does with a snapshot's records to keep its best model exported.

    Rank 0 decides (the selector holds ``best.json``); with sharded weights the decision is broadcast
    and every rank joins the one gather of the full model. A snapshot kept out of the window for NaN
    or infinite weights is never exported. A failure on any rank is one ``export`` fault; the previous
    best stays.

    Example::

        export = BestExport(config, window, faults)
        export.consider(selector, runtime, sharded=False, step=500, records=records, model=model,
                        live=live, ensemble_steps=[300, 400, 500])
    """

    def __init__(self, config: StabilityConfig, window: SnapshotWindow, faults: FaultPolicy):
        self.config = config
        self.window = window
        self.faults = faults

    def consider(
        self,
        selector: BestModelSelector | None,
        runtime: Runtime,
        *,
        sharded: bool,
        step: int,
        records: list[dict],
        model: torch.nn.Module,
        live: dict[str, torch.Tensor],
        ensemble_steps: Sequence[int],
    ) -> None:
        """Export this snapshot's candidate if it beats the best so far. Collective with sharded weights."""
        chosen = None
        if runtime.is_main and selector is not None and self.config.select is not None and records:
            self.window.wait()
            chosen = selector.candidate(records, snapshots_in_window=len(self.window.steps))
            if chosen is not None and step in self.window.non_finite_steps:
                chosen = None  # raw weights with NaN/inf in them are not a model to ship
        if sharded:
            chosen = runtime.broadcast_object(chosen)
        if chosen is None:
            return
        variant = chosen["variant"]
        weights, ok = self._gather(runtime, sharded, variant, model, live, step)
        if not ok or not runtime.is_main or selector is None:
            return
        if variant == "ens":
            steps = list(ensemble_steps)
        else:
            steps = self.window.steps if variant == "avg" else [step]
        scores = {
            r["task"]: r["score"] for r in records if r["variant"] == variant and r["task"] != MEAN_TASK
        }
        try:
            selector.commit(chosen, scores, steps, weights)
        except Exception as caught:
            self.faults.report("export", caught, step=step, variant=variant)

    def final_average(
        self,
        selector: BestModelSelector | None,
        runtime: Runtime,
        *,
        sharded: bool,
        model: torch.nn.Module | None,
        step: int,
    ) -> None:
        """A run without tasks has nothing to select on: its final window average is its model."""
        if self.config.select is None or self.window.average.count == 0:
            return
        if sharded and model is None:
            logger.warning("the sharded model is gone before close(); the final average is not exported")
            return
        live = live_tensors(model) if sharded and model is not None else None
        weights, ok = self._gather(runtime, sharded, "avg", model, live, step)
        if not ok or not runtime.is_main or weights is None or selector is None:
            return
        record = {"step": step, "variant": "avg", "window": self.config.window, "score": None}
        try:
            selector.commit(record, {}, self.window.steps, weights)
        except Exception as caught:
            self.faults.report("export", caught, step=step)

    def _gather(
        self,
        runtime: Runtime,
        sharded: bool,
        variant: str,
        model: torch.nn.Module | None,
        live: dict[str, torch.Tensor] | None,
        step: int,
    ) -> tuple[CapturedState | None, bool]:
        """The weights of ``variant``, whole on rank 0 (an ensemble has none); collective with sharded
        weights. ``(None, False)`` after a failure on any rank, reported as an export fault."""
        weights, error = None, None
        try:
            if variant == "avg":
                weights = self.window.averaged_state(model, live, runtime, sharded, step)
            elif variant == "raw" and sharded and model is not None:
                weights = gather_full_state(model, runtime.is_main)
            elif variant == "raw" and live is not None:
                weights = capture_state(live)
        except Exception as caught:
            error = caught
        if sharded and runtime.any_rank(error is not None):
            error = error or RuntimeError("gathering the model for export failed on another rank")
        if error is not None:
            self.faults.report("export", error, step=step, variant=variant)
            return None, False
        return weights, True
