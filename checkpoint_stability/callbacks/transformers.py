"""StabilityCallback for the Hugging Face ``transformers.Trainer``: events delegating to a monitor."""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from checkpoint_stability.callbacks.base import StabilityCallbackBase
from checkpoint_stability.fsdp1_shards import fsdp1_root_of
from checkpoint_stability.monitor import StabilityMonitor
from checkpoint_stability.records import MEAN_TASK, METRICS, scalar_name
from checkpoint_stability.sinks import Sink, TensorBoardSink
from checkpoint_stability.sinks.base import scalar_items
from checkpoint_stability.sinks.wandb import WandbSink
from checkpoint_stability.tasks.base import Task
from checkpoint_stability.tasks.from_dataloader import DEFAULT_TASK_NAME, default_task_from_dataloader

logger = logging.getLogger(__name__)

TENSORBOARD_RUN_NAME = "stability"
WANDB_STEP_METRIC = "train/global_step"  # the step axis transformers' WandbCallback defines


class StabilityCallback(StabilityCallbackBase, TrainerCallback, ExportableState):
    r"""Evaluate the model, its window average and its window ensemble side by side while a
    ``transformers.Trainer`` trains.

    Every ``every_n_steps`` optimizer steps (``state.global_step``, checked in ``on_step_end``, which runs
    after the optimizer step; with gradient accumulation only steps count) the model's ``state_dict`` is
    snapshotted into a rolling window and the tasks are run on the live model (``raw``), the window
    average (``avg``) and the window ensemble (``ens``). All the work is done by one
    :class:`~checkpoint_stability.StabilityMonitor`.

    Where things go:

    - Run directory: ``<args.output_dir>/stability`` unless ``dirpath=`` is given. Its path is saved in
      ``trainer_state.json`` of every checkpoint (``stateful_callbacks``), and ``trainer.train(
      resume_from_checkpoint=...)`` continues in the saved directory; what is newer than the restored
      step is dropped. ``restore_callback_states_from_checkpoint=True`` (not needed for any of this)
      makes transformers replace the callback by a copy rebuilt from its saved settings; that works with
      ``tasks=None``, and a callback given ``tasks`` refuses it with a ``ValueError``, as the copy has none.
    - If ``train()`` raises, the Trainer tells no callback: the snapshot being written is finished in the
      background, everything already recorded stays on disk, and the next ``train()`` (e.g. resuming
      from a checkpoint) closes the old run first.
    - ``report_to`` containing ``"tensorboard"``: TensorBoard runs of their own beside the Trainer's,
      ``stability/raw``, ``stability/avg``, ``stability/ens`` and ``stability/best`` under
      ``$TENSORBOARD_LOGGING_DIR`` if that variable is set, else under ``<output_dir>/runs``, with a
      custom-scalars layout. After a resume, points newer than the restored step are purged (from
      these runs only). ``<dirpath>/tensorboard`` is not written.
    - ``report_to`` containing ``"wandb"`` with an active ``wandb.run``: a
      :class:`~checkpoint_stability.sinks.wandb.WandbSink` on the step axis ``train/global_step``
      (the best model in the run summary, its export a model artifact at the end).

    Evaluation metrics: the latest snapshot's values join every evaluation's metrics as
    ``eval_stability/<task>/<variant>/<metric>`` in ``on_log`` (the Trainer logs before it calls
    ``on_evaluate``), so they are in the printed line, in ``trainer.state.log_history`` and in what
    ``evaluate()`` returns; the callback moves itself before the Trainer's progress printer in the
    callback list (``trainer.add_callback`` appends after it), the Trainer being found as for the
    default tasks.

    Best-model interplay: ``metric_for_best_model="stability/mean/avg/score"`` with
    ``load_best_model_at_end=True`` works. A stability name the callback does not log raises a
    ``ValueError`` at ``on_train_begin`` listing the closest valid names. ``eval_steps`` must be a
    multiple of ``every_n_steps`` (checked there too), so every evaluation follows a snapshot of its
    own step. Before the first snapshot (``eval_on_start``) the keys hold the worst value
    (``-inf``, or ``+inf`` when ``greater_is_better=False``), so such a checkpoint never beats a real one.
    The Trainer's best checkpoint holds raw weights; the window average is exported by the monitor:
    :attr:`best_model_path`, :meth:`load_best`.

    ``tasks=None`` builds a default task from the Trainer's evaluation data (``input_ids``/``labels``
    batches give a :class:`~checkpoint_stability.tasks.NextTokenTask` on the first ``default_task_size``
    predicted tokens, described on the console when built); without ``eval_dataset`` a ``ValueError``
    says to pass ``tasks``. If that task fails at its first evaluation, training stops with
    :class:`~checkpoint_stability.evaluation.DefaultTaskError` and a snippet that fixes it.

    A run that does not resume from a checkpoint refuses a run directory holding another run's results
    (:class:`~checkpoint_stability.ExistingRunError`) unless ``overwrite=True``.

    Args:
        tasks: what to evaluate; ``None`` for a default task from ``eval_dataset``; ``[]`` for none.
        \**settings: :class:`~checkpoint_stability.StabilityConfig` settings (``window``,
            ``every_n_steps``, ``dirpath``, ``on_error``, ...).
    """

    def __init__(self, tasks: Sequence[Task] | None = None, **settings):
        super().__init__(tasks, **settings)
        self._task_names: list[str] = []
        self._fsdp1_root: tuple[Any, Any] | None = None
        """(the model the Trainer hands callbacks, the FSDP1 root wrapping it), under FSDP1 only."""
        self.tensorboard_dir: Path | None = None
        """The TensorBoard run the stability scalars go to (None without ``"tensorboard"`` in report_to)."""

    # ------------------------------------------------------------------ public

    def state(self) -> dict:
        """What transformers saves in ``trainer_state.json`` (``ExportableState``): the monitor's state."""
        saved = self.monitor.state_dict() if self.monitor is not None else {}
        # "args" rebuild the callback if restore_callback_states_from_checkpoint=True; tasks cannot be
        # saved, so "given_tasks" lets that copy refuse to run without them.
        return {
            "args": self.config.to_json(),
            "attributes": {"stability_state": saved, "given_tasks": self.tasks is not None},
        }

    # ------------------------------------------------------------------ events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if getattr(self, "given_tasks", False) and self.tasks is None:
            # restore_callback_states_from_checkpoint=True rebuilt this callback from its saved settings,
            # and a task list cannot be saved in trainer_state.json.
            raise ValueError(
                "restore_callback_states_from_checkpoint=True replaced the StabilityCallback by a copy "
                "rebuilt from trainer_state.json, which cannot hold its tasks; leave that setting False "
                "(the run directory and the stability state are restored from the checkpoint anyway)"
            )
        if self._running:
            # A previous train() raised: the Trainer has no exception event, so its monitor is still
            # open. Close it (flushing the snapshot being written) before this run opens the directory.
            logger.warning("StabilityCallback: the previous train() did not finish; closing its run first")
            self._close()
        self._warn_if_no_snapshot(state)
        trainer = _running_trainer(self)
        if trainer is not None:
            _log_before_the_progress_bar(self, trainer)
        # Under FSDP1 the Trainer hands callbacks the model inside the root unit it wrapped; the monitor
        # needs the root (its flat parameter, and its forward pass that unshards it).
        self._fsdp1_root = None
        if model is not None and trainer is not None:
            root = fsdp1_root_of(
                model, [getattr(trainer, "model_wrapped", None), getattr(trainer, "model", None)]
            )
            self._fsdp1_root = (model, root) if root is not model else None
        tasks = self._tasks_here(lambda: self._default_tasks(args, trainer))
        self._task_names = [t.name for t in tasks]
        self._check_best_metric(args)
        resume_step = state.global_step if state.global_step > 0 else None
        self._sinks = self._destinations(args, resume_step) if state.is_world_process_zero else []
        config = self.config.replace(dirpath=self._configured_dirpath(args.output_dir), tensorboard=False)
        # The tokenizer the Trainer was given is saved beside each export (a save_pretrained directory).
        processing_class = kwargs.get("processing_class")
        self.monitor = StabilityMonitor(
            tasks,
            config,
            sinks=self._sinks,
            processing_class=processing_class,
            printer=_write_beside_the_bar,
            default_tasks=[] if self.tasks is not None else self._task_names,
        )
        self._latest_records = []
        opened = self._start(
            state.global_step,
            resume_step=resume_step,
            model=self._snapshotted(model),
            restored_state=_restored_state(state),
        )
        if opened and resume_step is not None and self.monitor.history is not None:
            self._latest_records = _records_at_last_step(self.monitor.history.records(), resume_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._snapshot(self._snapshotted(model), state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The Trainer logs an evaluation's metrics (appending them to state.log_history and printing
        # them) before it calls on_evaluate: the stability values join them here, in the dict the
        # printer and evaluate()'s caller see, and in the log_history entry made from it.
        if not logs or not any(str(key).startswith("eval_") for key in logs):
            return
        added = self._evaluation_items(args)
        logs.update(added)
        entry = state.log_history[-1] if state.log_history else None
        if isinstance(entry, dict) and entry.get("step") == state.global_step:
            entry.update(added)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics is not None:
            metrics.update(self._evaluation_items(args))  # when on_log did not see them

    def on_train_end(self, args, state, control, **kwargs):
        self._close()

    # ------------------------------------------------------------------ internals

    def _snapshotted(self, model: Any) -> Any:
        """The module the monitor snapshots: the FSDP1 root found at ``on_train_begin`` when ``model`` is
        the module inside it, else ``model``."""
        pair = self._fsdp1_root
        return pair[1] if pair is not None and pair[0] is model else model

    def _evaluation_items(self, args) -> dict[str, float]:
        """The latest snapshot's values as evaluation metrics (``eval_stability/...``); the key
        ``metric_for_best_model`` names holds the worst value until a snapshot has one."""
        items = scalar_items(self._latest_records) if self._latest_records else {}
        wanted = _stability_key(args.metric_for_best_model)
        if wanted is not None and wanted not in items:
            items[wanted] = -math.inf if args.greater_is_better in (None, True) else math.inf
        return {f"eval_{name}": value for name, value in items.items()}

    def _check_best_metric(self, args) -> None:
        wanted = _stability_key(args.metric_for_best_model)
        if wanted is None:
            return
        if self.config.evaluation == "background":
            raise ValueError(
                f"StabilityCallback: metric_for_best_model={args.metric_for_best_model!r} names a stability "
                "value, but with evaluation='background' those are computed by the evaluator process and "
                "arrive after the Trainer's evaluations: the Trainer cannot select on them. Let the "
                "evaluator select and export the best model (best.json), or use evaluation='inline'"
            )
        valid = self._stability_names()
        if wanted not in valid:
            close = difflib.get_close_matches(wanted, valid, n=3, cutoff=0.0)
            off = " (ens is off: ensemble=None)" if self.config.ensemble is None and "/ens/" in wanted else ""
            raise ValueError(
                f"StabilityCallback: metric_for_best_model={args.metric_for_best_model!r} names no value "
                f"this callback logs{off}; the closest are {', '.join(close)}. The names are "
                "stability/<task>/<variant>/<metric> with task one of "
                f"{', '.join([*self._task_names, MEAN_TASK])}, variant one of {', '.join(self._variants())} "
                f"and metric one of {', '.join(METRICS)}"
            )
        every = self.config.every_n_steps
        eval_steps = args.eval_steps
        strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
        if strategy != "steps" or eval_steps is None or eval_steps < 1 or int(eval_steps) % every:
            raise ValueError(
                f"StabilityCallback: metric_for_best_model={args.metric_for_best_model!r} is a stability "
                "value, so evaluations must fall on snapshot steps: use eval_strategy='steps' with "
                f"eval_steps a multiple of every_n_steps={every} (got eval_strategy={strategy!r}, "
                f"eval_steps={eval_steps!r})"
            )

    def _warn_if_no_snapshot(self, state) -> None:
        if not state.is_world_process_zero or not state.max_steps:
            return
        message = self.config.no_snapshot_message("StabilityCallback", state.global_step, state.max_steps)
        if message is not None:
            warnings.warn(message, stacklevel=2)

    def _variants(self) -> list[str]:
        variants = ["raw", "avg"]
        return variants if self.config.ensemble is None else [*variants, "ens"]

    def _stability_names(self) -> list[str]:
        """Every ``stability/...`` name an evaluation can carry (mtv and is once the series allows)."""
        return [
            scalar_name(task, variant, metric)
            for task in [*self._task_names, MEAN_TASK]
            for variant in self._variants()
            for metric in METRICS
        ]

    def _default_tasks(self, args, trainer) -> list[Task]:
        eval_dataset, data_collator = (
            (trainer.eval_dataset, trainer.data_collator) if trainer is not None else (None, None)
        )
        if eval_dataset is None:
            raise ValueError(
                "StabilityCallback(tasks=None) builds its task from the Trainer's eval_dataset, and this "
                "Trainer has none: pass eval_dataset= to the Trainer or tasks= to StabilityCallback"
            )
        # Several evaluation sets (a dict) give one task each, named by their keys.
        named = (
            eval_dataset.items() if isinstance(eval_dataset, dict) else [(DEFAULT_TASK_NAME, eval_dataset)]
        )
        tasks = []
        for name, dataset in named:
            # The Trainer's own eval loader is split across processes by accelerate; the task must see
            # every example on every rank (it splits its examples itself), so it gets a plain loader.
            loader = DataLoader(
                dataset,
                batch_size=args.per_device_eval_batch_size,
                collate_fn=_collate_model_inputs(data_collator),
            )
            source = "the Trainer's eval_dataset" + ("" if name == DEFAULT_TASK_NAME else f"[{name!r}]")
            try:
                tasks.append(
                    default_task_from_dataloader(
                        loader, name=str(name), max_examples=self.config.default_task_size, source=source
                    )
                )
            except ValueError as error:
                raise ValueError(f"StabilityCallback(tasks=None), eval_dataset {name!r}: {error}") from error
        return tasks

    def _destinations(self, args, resume_step: int | None) -> list[Sink]:
        report_to = args.report_to or []
        if isinstance(report_to, str):
            report_to = [report_to]
        sinks: list[Sink] = []
        if ("tensorboard" in report_to or "all" in report_to) and self.config.tensorboard:
            # The Trainer's TensorBoardCallback writes into $TENSORBOARD_LOGGING_DIR itself (with "~"
            # expanded): a run of our own inside it, so that our purge after a resume cannot hide the
            # points the resumed Trainer logs there.
            shared = os.environ.get("TENSORBOARD_LOGGING_DIR")
            parent = os.path.expanduser(shared) if shared else os.path.join(args.output_dir, "runs")
            log_dir = os.path.join(parent, TENSORBOARD_RUN_NAME)
            # A run from step 0 replaces the history, so an earlier run's points are hidden as well.
            purge = (resume_step or 0) + 1
            self.tensorboard_dir = Path(log_dir)
            sinks.append(TensorBoardSink(log_dir, task_names=self._task_names, purge_step=purge))
        if "wandb" in report_to or "all" in report_to:
            try:
                import wandb

                run = wandb.run
            except ImportError:
                run = None
            if run is not None:
                sinks.append(WandbSink(run, step_metric=WANDB_STEP_METRIC, task_names=self._task_names))
        return sinks


def _stability_key(metric: str | None) -> str | None:
    """The logged stability name a ``metric_for_best_model`` refers to, or None."""
    if not metric:
        return None
    name = metric[len("eval_") :] if metric.startswith("eval_") else metric
    return name if name.startswith("stability/") else None


def _restored_state(state) -> dict | None:
    saved = (getattr(state, "stateful_callbacks", None) or {}).get(StabilityCallback.__name__)
    if isinstance(saved, list):
        saved = saved[-1] if saved else None
    if not isinstance(saved, dict):
        return None
    restored = saved.get("attributes", {}).get("stability_state")
    return restored if isinstance(restored, dict) and "dirpath" in restored else None


def _records_at_last_step(records: list[dict], step: int) -> list[dict]:
    steps = [r["step"] for r in records if r["step"] <= step]
    if not steps:
        return []
    last = max(steps)
    return [r for r in records if r["step"] == last]


def _running_trainer(callback: StabilityCallback) -> Any:
    """The running ``transformers.Trainer`` whose callbacks include ``callback``, or None.

    Found by walking the call stack, because no public way hands it over (read in transformers 4.40,
    4.41, 4.46 and 5.25): an event gets ``args``, ``state``, ``control`` and the ``CallbackHandler``'s
    ``model``, ``processing_class`` (``tokenizer`` before 4.46), ``optimizer``, ``lr_scheduler``,
    ``train_dataloader`` and ``eval_dataloader``, and neither those objects nor the handler refer to the
    Trainer. Two things need it: the default tasks (its ``eval_dataset`` and ``data_collator``, whole, on
    every rank — ``eval_dataloader`` is None at ``on_train_begin`` unless an evaluation ran before, and
    then holds the last evaluated set only, split across ranks), and the order of the callbacks (see
    :func:`_log_before_the_progress_bar`). ``on_train_begin`` is called from a Trainer method, so the
    Trainer is the ``self`` of a frame below it."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer) and callback in candidate.callback_handler.callbacks:
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


def _log_before_the_progress_bar(callback: StabilityCallback, trainer: Any) -> None:
    """Move ``callback`` just before the Trainer's progress printer in its callback list.

    ``trainer.add_callback`` appends, after the ``ProgressCallback`` (or ``PrinterCallback``) the Trainer
    added itself; that one prints an evaluation's metrics in its ``on_log``, so a callback after it adds
    the stability values too late for the printed line. The reporting integrations (TensorBoard, W&B)
    stay before it, as with ``Trainer(callbacks=[...])``: they keep not seeing these keys, which the
    stability runs hold already."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    callbacks = trainer.callback_handler.callbacks
    printers = [i for i, c in enumerate(callbacks) if isinstance(c, (ProgressCallback, PrinterCallback))]
    mine = callbacks.index(callback)
    if printers and printers[0] < mine:
        callbacks.insert(printers[0], callbacks.pop(mine))


def _write_beside_the_bar(line: str) -> None:
    """Print ``line`` on its own line above the Trainer's tqdm progress bar (never glued onto it)."""
    from tqdm.auto import tqdm

    tqdm.write(line)


def _collate_model_inputs(collate: Any):
    """``collate`` on the token fields only: a ``datasets.Dataset`` row may carry text columns beside them,
    which the Trainer would drop for the model and which no collator can batch."""
    kept = ("input_ids", "attention_mask", "labels")

    def collate_model_inputs(rows: list) -> Any:
        return collate([{k: r[k] for k in kept if k in r} if isinstance(r, Mapping) else r for r in rows])

    return collate_model_inputs
