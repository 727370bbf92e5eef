"""StabilityCallback for ``lightning.pytorch``: hooks that translate and delegate to one StabilityMonitor."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from checkpoint_stability.callbacks.base import StabilityCallbackBase
from checkpoint_stability.fsdp1_shards import fsdp1_root_of
from checkpoint_stability.monitor import StabilityMonitor
from checkpoint_stability.sinks import Sink, TensorBoardSink
from checkpoint_stability.sinks.framework_loggers import FrameworkLoggersSink
from checkpoint_stability.sinks.wandb import WandbSink
from checkpoint_stability.tasks.base import Task
from checkpoint_stability.tasks.from_dataloader import default_task_from_dataloader


class StabilityCallback(StabilityCallbackBase, Callback):
    r"""Evaluate the model, its window average and its window ensemble side by side while Lightning trains.

    Every ``every_n_steps`` optimizer steps (``trainer.global_step``; with gradient accumulation only the
    batches that stepped count) the LightningModule's ``state_dict`` is snapshotted into a rolling
    window on disk and the tasks are run on the live model (``raw``), on the uniform average of the
    window (``avg``) and on the window's combined predictions (``ens``). Score, MTV and IS of each go to
    the Trainer's loggers at the snapshot's step, to ``history.jsonl``, and the best model under the
    ``select`` policy is exported. All the work is done by one
    :class:`~checkpoint_stability.StabilityMonitor`; this class only translates Lightning's hooks.

    Where things go:

    - Run directory: ``<trainer.default_root_dir>/stability`` unless ``dirpath=`` is given (not the
      logger's ``log_dir``, which moves to a new ``version_N`` on every run). It is saved in the
      callback's checkpoint state, and a run resumed with ``trainer.fit(ckpt_path=...)`` continues in the
      restored directory whatever its ``default_root_dir``; snapshots, history lines and a best model
      newer than the restored step belong to the abandoned trajectory and are dropped.
    - Loggers: beside a ``TensorBoardLogger``'s run, the scalars go to four runs of their own under its
      ``log_dir``, ``stability/{raw,avg,ens,best}`` (tags ``stability/<task>/{score,mtv,is}``), so the
      Time Series tab overlays raw, avg and ens on each card; the logger's writer holds the Custom
      Scalars layout (without such a logger, the runs go to ``<dirpath>/tensorboard``). A ``WandbLogger``
      gets them through a :class:`~checkpoint_stability.sinks.wandb.WandbSink` on its step axis
      ``trainer/global_step``, plus one line chart per task. Every other logger (CSV, MLflow, ...) gets
      ``log_metrics(..., step=snapshot step)``. Only global rank 0 logs.
    - After a resume, Lightning's ``TensorBoardLogger`` opens a new ``version_N`` directory by default:
      the abandoned trajectory's points stay in the previous version's run, and the resumed version
      starts at the restored step. To continue one TensorBoard run instead, give the logger the same
      ``version=`` and ``purge_step=<restored step + 1>`` (passed on to its ``SummaryWriter``), which
      hides the abandoned points. W&B keeps whatever was logged.

    Which model is best: ``best.json`` in the run directory names the export of the best model under
    ``select`` (by default the window average, ``avg``, chosen on the mean score over tasks). That
    averaged model is not one of Lightning's checkpoints: ``ModelCheckpoint`` keeps raw weights of
    single steps. Load it with :meth:`load_best`, or read ``best_model_path``.

    ``tasks=None`` evaluates a default task built from the Trainer's own validation data at
    ``on_fit_start``, on its first ``default_task_size`` examples, described on the console:
    ``(inputs, targets)`` token tensors of one shape (Lightning's demo ``WikiText2``) and bare
    ``input_ids`` tensors give next-token accuracy, ``input_ids`` / ``labels`` dict batches too,
    ``(inputs, labels)`` with one class per row a classification task (see
    :func:`checkpoint_stability.tasks.task_from_dataloader`); any other shape, or no validation data,
    stops ``fit`` with a ``ValueError`` holding a snippet that fixes it. A default task that fails at
    its first evaluation stops training with
    :class:`~checkpoint_stability.evaluation.DefaultTaskError`, whatever ``on_error`` says. A fit that
    does not resume from a checkpoint refuses a run directory holding another run's results
    (:class:`~checkpoint_stability.ExistingRunError`) unless ``overwrite=True``. ``tasks=[]``
    evaluates nothing: the window is buffered and averaged, and its final average is exported when
    training ends.

    Faults at run time (disk full, a task that raises, an unwritable directory) are logged once with
    their cause and recorded in the history, and training goes on; ``on_error="raise"`` makes them
    fatal. Under DDP every rank must have the callback; rank 0 writes, the evaluation examples are
    split across ranks, and every rank sees the same records.

    Example::

        >>> import tempfile, torch
        >>> from lightning.pytorch import LightningModule, Trainer
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from checkpoint_stability import ClassificationTask
        >>> from checkpoint_stability.callbacks.lightning import StabilityCallback
        >>> class Classifier(LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(4, 3)
        ...     def forward(self, x):
        ...         return self.net(x)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return torch.nn.functional.cross_entropy(self(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> with tempfile.TemporaryDirectory() as root:
        ...     stability = StabilityCallback(
        ...         [ClassificationTask("toy", (x, y), show_progress=False)],
        ...         window=3, every_n_steps=5, console=False,
        ...     )
        ...     trainer = Trainer(
        ...         max_steps=20, default_root_dir=root, callbacks=[stability], logger=False,
        ...         accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
        ...         enable_checkpointing=False,
        ...     )
        ...     trainer.fit(Classifier(), DataLoader(TensorDataset(x, y), batch_size=8))
        ...     sorted({r["step"] for r in stability.monitor.history.records()})
        ...     stability.best_model_path.parent.parent.name
        [5, 10, 15, 20]
        'stability'

    Args:
        tasks: what to evaluate (:class:`~checkpoint_stability.tasks.Task` objects); ``None`` for a
            default task from the validation data; ``[]`` for none.
        model_attribute: the attribute of the LightningModule holding the model the exports are of (for
            example ``"model"`` for a wrapped Hugging Face model); by default the one
            ``transformers.PreTrainedModel`` child, if there is exactly one, else the whole module. An
            export holds only that model: a ``save_pretrained`` directory for a Hugging Face model
            (``AutoModelForCausalLM.from_pretrained(callback.best_model_path)`` loads it), else
            ``model.safetensors``. :meth:`load_best` accepts that model as well as the whole
            LightningModule.
        \**settings: :class:`~checkpoint_stability.StabilityConfig` settings (``window``,
            ``every_n_steps``, ``dirpath``, ``on_error``, ...); a bad one raises ``ValueError`` here.
    """

    def __init__(
        self, tasks: Sequence[Task] | None = None, *, model_attribute: str | None = None, **settings
    ):
        super().__init__(tasks, **settings)
        if model_attribute is not None and (not isinstance(model_attribute, str) or not model_attribute):
            raise ValueError(f"model_attribute must be None or an attribute name, got {model_attribute!r}")
        self.model_attribute = model_attribute
        self._restored_state: dict | None = None  # from a checkpoint, applied when the fit opens
        self._export_prefix = ""

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            mine = [cb for cb in trainer.callbacks if isinstance(cb, StabilityCallback)]  # type: ignore[attr-defined]
            if len(mine) > 1:
                raise ValueError(
                    f"StabilityCallback was added {len(mine)} times to this Trainer; use one: each would "
                    "snapshot the same model into its own run directory, and their checkpoint states collide"
                )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        tasks = self._tasks_here(lambda: [self._default_task(trainer)])
        self._export_prefix = self._resolve_model_attribute(pl_module)
        writer, self._sinks = self._destinations(trainer, [t.name for t in tasks])
        config = self.config.replace(dirpath=self._configured_dirpath(trainer.default_root_dir))

        def print_beside_the_bar(line: str) -> None:
            # Lightning's progress bar prints above itself; without one, a plain print.
            bar = trainer.progress_bar_callback
            if bar is not None and callable(getattr(bar, "print", None)):
                bar.print(line)
            else:
                print(line, flush=True)

        self.monitor = StabilityMonitor(
            tasks,
            config,
            sinks=self._sinks,
            tensorboard_writer=writer,
            export_prefix=self._export_prefix,
            printer=print_beside_the_bar,
            default_tasks=[] if self.tasks is not None else [t.name for t in tasks],
        )
        self._latest_records = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The first hook where both the callback state (restored after on_fit_start under FSDP,
        # DeepSpeed and ModelParallelStrategy) and trainer.global_step (restored with the loops, after
        # on_fit_start under every strategy) are known.
        resumed = trainer.ckpt_path is not None or trainer.global_step > 0
        self._warn_if_no_snapshot(trainer)
        self._open(trainer, pl_module, resume_step=trainer.global_step if resumed else None)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Under gradient accumulation several batches end on one global_step; only the first of them
        # follows the optimizer step.
        self._snapshot(_snapshotted(trainer, pl_module), trainer.global_step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._abandon()

    def state_dict(self) -> dict[str, Any]:
        if self.monitor is not None:
            return self.monitor.state_dict()
        return dict(self._restored_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return  # saved before the monitor existed: nothing to restore
        if (
            not isinstance(state_dict, Mapping)
            or "dirpath" not in state_dict
            or not isinstance(state_dict["dirpath"], (str, type(None)))
        ):
            raise ValueError(
                "the checkpoint's StabilityCallback state is not one this version wrote (expected a dict "
                f"with 'dirpath'): {state_dict!r:.200}"
            )
        self._restored_state = dict(state_dict)

    # ------------------------------------------------------------------ internals

    def _require_monitor(self) -> StabilityMonitor:
        if self.monitor is None:
            raise RuntimeError("StabilityCallback.on_fit_start did not run before on_train_start")
        return self.monitor

    def _default_task(self, trainer: Trainer) -> Task:
        try:
            return default_task_from_dataloader(
                _validation_dataloader(trainer),
                max_examples=self.config.default_task_size,
                source="the Trainer's validation data",
            )
        except ValueError as error:
            raise ValueError(f"StabilityCallback(tasks=None): {error}") from error

    def _load_prefix(self, model: torch.nn.Module) -> str:
        """Loading without a run in this process: the wrapped model's prefix inside a LightningModule."""
        return self._resolve_model_attribute(model) if isinstance(model, LightningModule) else ""

    def _resolve_model_attribute(self, pl_module: LightningModule) -> str:
        """The state-dict prefix of the exported model's entries inside the LightningModule ('' = all)."""
        children = dict(pl_module.named_children())
        if self.model_attribute is not None:
            if self.model_attribute not in children:
                raise ValueError(
                    f"StabilityCallback(model_attribute={self.model_attribute!r}): the LightningModule has "
                    f"no submodule of that name; its submodules are {sorted(children)}"
                )
            return f"{self.model_attribute}."
        # Only when transformers is already loaded: a Lightning user without it must not pay its import.
        transformers = sys.modules.get("transformers")
        pretrained = getattr(transformers, "PreTrainedModel", None)
        if pretrained is not None:
            found = [name for name, child in children.items() if isinstance(child, pretrained)]
            if len(found) == 1:
                return f"{found[0]}."
        return ""

    def _destinations(self, trainer: Trainer, task_names: list[str]) -> tuple[Any, list[Sink]]:
        """(the TensorBoard writer for the monitor, the other sinks): exactly one path per logger."""
        if not trainer.is_global_zero:
            return None, []  # the monitor runs sinks on rank 0 only; loggers are rank-0 objects
        writer = None
        sinks: list[Sink] = []
        others: list[Any] = []
        for framework_logger in trainer.loggers:
            if isinstance(framework_logger, TensorBoardLogger):
                if not self.config.tensorboard:
                    continue
                if writer is None:
                    writer = framework_logger.experiment
                else:
                    experiment = framework_logger.experiment
                    sinks.append(
                        TensorBoardSink(
                            Path(experiment.get_logdir()) / "stability",
                            task_names=task_names,
                            layout_writer=experiment,
                        )
                    )
            elif isinstance(framework_logger, WandbLogger):
                synced = bool(getattr(framework_logger, "_wandb_init", {}).get("sync_tensorboard"))
                # WandbLogger's own step axis: "global_step" when it syncs TensorBoard, else its own key.
                step_metric = "global_step" if synced else "trainer/global_step"
                sinks.append(
                    WandbSink(framework_logger.experiment, step_metric=step_metric, task_names=task_names)
                )
            else:
                others.append(framework_logger)
        if others:
            sinks.insert(0, FrameworkLoggersSink(others))
        return writer, sinks

    def _warn_if_no_snapshot(self, trainer: Trainer) -> None:
        total = trainer.estimated_stepping_batches
        if not isinstance(total, (int, float)) or total < 0 or math.isinf(total):
            return  # unknown length (an iterable dataset without max_steps)
        message = self.config.no_snapshot_message("StabilityCallback", trainer.global_step, int(total))
        if message is not None:
            rank_zero_warn(message)

    def _open(self, trainer: Trainer, pl_module: LightningModule, resume_step: int | None) -> None:
        self._require_monitor()
        restored, self._restored_state = self._restored_state, None
        self._start(
            trainer.global_step,
            resume_step=resume_step,
            model=_snapshotted(trainer, pl_module),
            restored_state=restored,
        )


def _snapshotted(trainer: Trainer, pl_module: LightningModule) -> torch.nn.Module:
    """The module the monitor snapshots and evaluates: the LightningModule, or the FSDP1 root that
    Lightning's ``FSDPStrategy`` wraps around it (``trainer.strategy.model``). The root's own flat
    parameter holds the weights no inner unit wraps, and only a forward pass through the root unshards
    them."""
    return fsdp1_root_of(pl_module, [getattr(trainer.strategy, "model", None)])


def _validation_dataloader(trainer: Trainer):
    """The validation loader as the user wrote it: not the copy Lightning prepares, which under DDP
    carries a DistributedSampler (each rank would read different examples) and which is not set up yet at
    ``on_fit_start``."""
    source = getattr(getattr(trainer.fit_loop.epoch_loop, "val_loop", None), "_data_source", None)
    if source is not None:
        loaders = source.dataloader() if source.is_defined() else None
    else:
        loaders = trainer.val_dataloaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)) and not _is_tensor_pair(loaders):
        if len(loaders) > 1:
            raise ValueError(
                f"the Trainer has {len(loaders)} validation dataloaders; the default task is built from one: "
                "pass tasks=[...]"
            )
        loaders = loaders[0] if loaders else None
    if loaders is None:
        raise ValueError(
            "it builds its task from the Trainer's validation data, and this fit has none (no "
            "val_dataloaders, no validation_step / val_dataloader): pass tasks=[...], or tasks=[] to only "
            "buffer and average"
        )
    return loaders


def _is_tensor_pair(value: Sequence) -> bool:
    return len(value) == 2 and all(isinstance(item, torch.Tensor) for item in value)
