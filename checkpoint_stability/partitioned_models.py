"""DeepSpeed ZeRO-3: partitioned parameters, which this library refuses rather than snapshot empty tensors.

Under ZeRO stage 3 every parameter is split across ranks outside the forward pass: the module's
``param.data`` is an empty tensor, this rank's piece lives in ``param.ds_tensor``, and DeepSpeed marks the
parameter with ``ds_id`` (its index), ``ds_status`` (``ZeroParamStatus.NOT_AVAILABLE`` while
partitioned), ``ds_numel`` and ``ds_shape`` (the full size and shape). ``model.state_dict()`` then holds
empty tensors (small parameters under ``stage3_param_persistence_threshold`` stay whole, marked
``ds_persist``). DeepSpeed's own test for such a parameter is ``hasattr(param, "ds_id")``
(``deepspeed.runtime.zero.utils.is_zero_param``); it is the one used here, so DeepSpeed is never
imported.

ZeRO stages 1 and 2 partition optimizer state and gradients only: the module keeps full parameters on
every rank, ``state_dict()`` is whole, and the run is handled like DDP (rank 0 snapshots). Checked with
deepspeed 0.19.8 on CPU (``DS_ACCELERATOR=cpu``, gloo, two ranks): no ``ds_*`` attributes at stages 1
and 2; at stage 3, ``ds_status=NOT_AVAILABLE`` and zero-element ``data`` after a step.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from checkpoint_stability.errors import CheckpointStabilityError

_WHAT_TO_USE = (
    "Use FSDP2 (torch.distributed.fsdp.fully_shard; Lightning's ModelParallelStrategy, the Hugging Face "
    "Trainer's fsdp with fsdp_version 2), FSDP1 (FullyShardedDataParallel; Lightning's FSDPStrategy), "
    "DeepSpeed ZeRO stage 1 or 2 (full parameters on every rank), or DDP"
)


class PartitionedModelError(CheckpointStabilityError, ValueError):
    """The model's parameters are partitioned by DeepSpeed ZeRO-3, which cannot be snapshotted here."""


def zero3_parameters(model: torch.nn.Module) -> list[str]:
    """Names of ``model``'s parameters that DeepSpeed ZeRO-3 partitions (they carry ``ds_id``)."""
    return [name for name, param in model.named_parameters() if hasattr(param, "ds_id")]


def is_zero3_engine(model: object) -> bool:
    """Whether ``model`` is a ``deepspeed.DeepSpeedEngine`` configured for ZeRO stage 3 (checked by name,
    without importing DeepSpeed)."""
    if not any(cls.__name__ == "DeepSpeedEngine" for cls in type(model).__mro__):
        return False
    stage = getattr(model, "zero_optimization_stage", None)
    try:
        return callable(stage) and int(stage()) == 3
    except (TypeError, ValueError):
        return False


def refuse_partitioned(model: torch.nn.Module) -> None:
    """Raise :class:`PartitionedModelError` when ``model`` is a ZeRO-3 engine or holds ZeRO-3 parameters.

    Called when training starts (the monitor's ``open(model=...)`` and its first sight of a model, and
    both callbacks' train-begin path), whatever ``on_error`` says: it is a configuration to change.
    """
    partitioned = zero3_parameters(model)
    if not partitioned and not is_zero3_engine(model):
        return
    shown = ", ".join(partitioned[:3]) + (" ..." if len(partitioned) > 3 else "")
    which = f" ({len(partitioned)} partitioned parameters: {shown})" if partitioned else ""
    raise PartitionedModelError(
        f"DeepSpeed ZeRO stage 3 is not supported{which}: it partitions every parameter across ranks, so "
        "model.state_dict() holds empty tensors and a snapshot would store nothing. " + _WHAT_TO_USE + "."
    )


def refuse_empty_partitions(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Never snapshot the empty tensors of partitioned parameters: raise :class:`PartitionedModelError`
    when an empty floating tensor of ``tensors`` belongs to a parameter whose ``ds_numel`` says it is not
    empty (or when every floating tensor is empty while some parameter reports a nonzero ``ds_numel``)."""
    sizes = {name: getattr(param, "ds_numel", None) for name, param in model.named_parameters()}
    floating = {name: t for name, t in tensors.items() if t.is_floating_point()}
    emptied = [name for name, t in floating.items() if t.numel() == 0 and (sizes.get(name) or 0) > 0]
    all_empty = bool(floating) and all(t.numel() == 0 for t in floating.values())
    if emptied or (all_empty and any((size or 0) > 0 for size in sizes.values())):
        shown = ", ".join((emptied or list(floating))[:3])
        raise PartitionedModelError(
            f"the state dict holds empty tensors ({shown}) of parameters DeepSpeed ZeRO-3 partitioned "
            "(their ds_numel is not 0): DeepSpeed ZeRO stage 3 is not supported. " + _WHAT_TO_USE + "."
        )
