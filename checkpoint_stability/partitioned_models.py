"""DeepSpeed ZeRO-3: telling a partitioned model apart, and refusing the set-ups that cannot be snapshotted.

Under ZeRO stage 3 every parameter is split across ranks outside the forward pass: the module's
``param.data`` is an empty tensor, this rank's piece lives in ``param.ds_tensor``, and DeepSpeed marks the
parameter with ``ds_id`` (its index), ``ds_status`` (``ZeroParamStatus.NOT_AVAILABLE`` while
partitioned), ``ds_numel`` and ``ds_shape`` (the full size and shape). ``model.state_dict()`` then holds
empty tensors. DeepSpeed's own test for such a parameter is ``hasattr(param, "ds_id")``
(``deepspeed.runtime.zero.utils.is_zero_param``); it is the one used here, so DeepSpeed is never
imported. How the partitions are snapshotted, averaged and gathered is
:mod:`checkpoint_stability.zero3_partitions`.

Refused at train start (:func:`refuse_partitioned`), with what to change: parameters offloaded to NVMe
(the partition lives on disk, ``ds_tensor`` is a placeholder), ZeRO++ hierarchical partitioning (hpZ:
forward passes gather a secondary copy, not the partition a snapshot holds), partitioning over a group
smaller than the world (MiCS: ``buffer/rank-R/`` assumes one partition per rank of the world), and
quantized non-trainable weights (the partition is not in the parameter's dtype).

ZeRO stages 1 and 2 partition optimizer state and gradients only: the module keeps full parameters on
every rank, ``state_dict()`` is whole, and the run is handled like DDP (rank 0 snapshots). Checked with
deepspeed 0.19.8 on CPU (``DS_ACCELERATOR=cpu``, gloo, two ranks): no ``ds_*`` attributes at
stages 1 and 2; at stage 3, ``ds_status=NOT_AVAILABLE`` and zero-element ``data`` after a step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from checkpoint_stability.errors import CheckpointStabilityError

_WHAT_TO_USE = (
    "Use ZeRO-3 without it (parameters on the device or offloaded to the CPU, zero_hpz_partition_size 1, no "
    "mics_shard_size), FSDP2 (torch.distributed.fsdp.fully_shard; Lightning's ModelParallelStrategy, the "
    "Hugging Face Trainer's fsdp with fsdp_version 2), FSDP1 (FullyShardedDataParallel; Lightning's "
    "FSDPStrategy), DeepSpeed ZeRO stage 1 or 2 (full parameters on every rank), or DDP"
)


class PartitionedModelError(CheckpointStabilityError, ValueError):
    """A DeepSpeed ZeRO-3 set-up whose partitions cannot be snapshotted (NVMe offload, ZeRO++ hpZ, MiCS,
    quantized weights), or empty partitioned tensors about to be snapshotted as they are. Raised when
    training starts, whatever ``on_error`` says: it is a configuration to change."""


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


def is_zero3(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a ZeRO-3 engine or holds ZeRO-3 partitioned parameters."""
    return is_zero3_engine(model) or any(hasattr(param, "ds_id") for param in model.parameters())


def partition_group(param: Any) -> tuple[int, int]:
    """(size, this rank's index) of the process group ``param`` is partitioned over; (1, 0) without
    torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        group = getattr(param, "ds_process_group", None)
        return torch.distributed.get_world_size(group=group), torch.distributed.get_rank(group=group)
    return 1, 0


def refuse_partitioned(model: torch.nn.Module) -> None:
    """Raise :class:`PartitionedModelError` for a ZeRO-3 set-up whose partitions cannot be snapshotted,
    naming the parameter and the setting to change; a plain model, ZeRO-1/2 and supported ZeRO-3 pass.

    Called when training starts (the monitor's ``open(model=...)`` and its first sight of a model, and
    both callbacks' train-begin path), whatever ``on_error`` says. Local: no collective.
    """
    if not is_zero3(model):
        return
    partitioned = [(name, p) for name, p in model.named_parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        raise PartitionedModelError(
            "this DeepSpeed engine runs ZeRO stage 3 but its module's parameters carry no partition "
            "(ds_id, ds_tensor): hand the monitor the engine, or its .module, after deepspeed.initialize"
        )
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    for name, param in partitioned:
        where = f"DeepSpeed ZeRO stage 3 parameter {name!r}"
        partition = getattr(param, "ds_tensor", None)
        if partition is None:
            raise PartitionedModelError(f"{where} has no partition (ds_tensor is None). {_WHAT_TO_USE}.")
        location = getattr(partition, "final_location", None)
        if str(getattr(location, "value", location)) == "nvme":
            raise PartitionedModelError(
                f"{where} is offloaded to NVMe (offload_param.device='nvme'): its partition lives on disk, "
                f"not in memory, and cannot be snapshotted without gathering. {_WHAT_TO_USE}."
            )
        groups = getattr(param, "ds_secondary_tensor_num_of_groups", 1) or 1
        if getattr(param, "ds_secondary_tensor", None) is not None or int(groups) > 1:
            raise PartitionedModelError(
                f"{where} uses ZeRO++ hierarchical partitioning (hpZ, zero_hpz_partition_size > 1): forward "
                f"passes gather its secondary copy, not the partition a snapshot holds. {_WHAT_TO_USE}."
            )
        size, _ = partition_group(param)
        if size != world:
            raise PartitionedModelError(
                f"{where} is partitioned over {size} of {world} ranks (MiCS, mics_shard_size): only "
                f"partitioning over every rank is supported. {_WHAT_TO_USE}."
            )
        if partition.dtype != param.dtype or hasattr(partition, "ds_quant_scale"):
            raise PartitionedModelError(
                f"{where} keeps its partition quantized ({partition.dtype}, the parameter is {param.dtype}; "
                f"zero_quantized_nontrainable_weights): not supported. {_WHAT_TO_USE}."
            )


def refuse_empty_partitions(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Never snapshot the empty tensors of partitioned parameters: raise :class:`PartitionedModelError`
    when an empty floating tensor of ``tensors`` belongs to a parameter whose ``ds_numel`` says it is not
    empty (or when every floating tensor is empty while some parameter reports a nonzero ``ds_numel``).
    A ZeRO-3 model's partitions are read from ``ds_tensor`` instead; this guards every other path."""
    sizes = {name: getattr(param, "ds_numel", None) for name, param in model.named_parameters()}
    floating = {name: t for name, t in tensors.items() if t.is_floating_point()}
    emptied = [name for name, t in floating.items() if t.numel() == 0 and (sizes.get(name) or 0) > 0]
    all_empty = bool(floating) and all(t.numel() == 0 for t in floating.values())
    if emptied or (all_empty and any((size or 0) > 0 for size in sizes.values())):
        shown = ", ".join((emptied or list(floating))[:3])
        raise PartitionedModelError(
            f"the state dict holds empty tensors ({shown}) of parameters DeepSpeed ZeRO-3 partitioned "
            "(their ds_numel is not 0); their partitions (ds_tensor) are what can be snapshotted. Hand the "
            "monitor the DeepSpeed engine or its .module. " + _WHAT_TO_USE + "."
        )
