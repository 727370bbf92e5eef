"""DeepSpeed ZeRO-3's partitions: what a rank of a ZeRO stage 3 model snapshots without gathering.

Under ZeRO-3 every parameter is split across the ranks of the data-parallel group. Between forward
passes ``param.data`` is empty; this rank's piece is ``param.ds_tensor``, a flat 1-D tensor of
``ceil(ds_numel / world)`` elements: deepspeed's ``Init._partition_param`` (deepspeed 0.19) flattens the
parameter, pads it to a multiple of the world size and gives rank ``r`` the elements
``[r * size, (r + 1) * size)``. The padding is allocated with ``torch.empty`` and never written, so it
holds whatever the allocator left there (denormals, and possibly NaN): a snapshot therefore stores
only this rank's *valid* elements (``ds_tensor[:valid]``, a view of it), and the ranks' pieces side by
side are exactly the flattened parameter. Parameters under ``stage3_param_persistence_threshold``
(``ds_persist``) keep a full copy in ``data`` too, refreshed from the partitions after every optimizer
step; the partition is still the truth that every gather reads, so they are handled like the others.
Buffers are never partitioned: whole on every rank.

Averaging is elementwise, so the average of the partitions is the partition of the average. For the
``avg`` evaluation the average is written into ``ds_tensor`` in place; the next forward pass all-gathers
it. One trap (seen with deepspeed 0.19 on CPU): after a forward pass without backward, ZeRO-3 leaves
the gathered parameters allocated (``ds_status`` ``AVAILABLE``), and the next forward uses them without
gathering, i.e. with the old values. :func:`release_gathered` frees them (locally: no collective) before
new partitions are written in and before training reads the model again.

The export gathers once (:func:`zero3_full_state`, ``deepspeed.zero.GatheredParameters`` one module at a
time, copied to the CPU on rank 0): the only place DeepSpeed is imported. Everything else reads the
attributes deepspeed puts on its parameters (``ds_id``, ``ds_tensor``, ``ds_numel``, ``ds_shape``,
``ds_status``, ``ds_process_group``, ``partition``), checked with deepspeed 0.19.8
(tests/test_zero3.py; with 0.19.0 its check that the gathered live weights come back bit for bit
after a snapshot fails, cause not found yet).

What cannot be supported this way (NVMe offload, ZeRO++ hpZ, MiCS, quantized partitions) is refused at
train start by :func:`~checkpoint_stability.partitioned_models.refuse_partitioned`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from checkpoint_stability.partitioned_models import partition_group


def zero3_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module a ``DeepSpeedEngine`` trains (its ``.module``: the user's model, whose names the snapshots
    and exports use), else ``model`` itself."""
    if any(cls.__name__ == "DeepSpeedEngine" for cls in type(model).__mro__):
        inner = getattr(model, "module", None)
        if isinstance(inner, torch.nn.Module):
            return inner
    return model


def _world() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _status(param: Any) -> str:
    """``ds_status`` by name (``AVAILABLE``, ``NOT_AVAILABLE``, ``INFLIGHT``), without importing its Enum."""
    status = getattr(param, "ds_status", None)
    return str(getattr(status, "name", status))


def _valid_partition(param: Any) -> torch.Tensor:
    """This rank's elements of ``param`` (its partition without the padding), sharing ``ds_tensor``'s
    storage: writing into it writes the partition the next forward pass gathers."""
    partition = param.ds_tensor.detach()
    size = partition.numel()
    _, rank = partition_group(param)
    valid = max(0, min(size, int(param.ds_numel) - rank * size))
    return partition.narrow(0, 0, valid)


def _entries(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor | torch.nn.Parameter]]:
    """The state-dict entries of the engine's module (tied names included), by their names there.

    ``state_dict(keep_vars=True)`` hands out the parameter objects themselves, whose partition
    attributes are read here; it reads no tensor data, so it gathers nothing.
    """
    for name, value in zero3_module(model).state_dict(keep_vars=True).items():
        if isinstance(value, torch.Tensor):
            yield name, value


def zero3_live_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's partitions (the valid elements of each ``ds_tensor``, 1-D) under the parameters' own
    names, then buffers and parameters ZeRO-3 does not manage, whole. Every tensor shares storage with
    the live model; tied names share one partition. No collective."""
    out: dict[str, torch.Tensor] = {}
    for name, value in _entries(model):
        out[name] = _valid_partition(value) if hasattr(value, "ds_id") else value.detach()
    return out


def zero3_parameter_names(model: torch.nn.Module) -> set[str]:
    """Which names of :func:`zero3_live_tensors` are parameters (what training updates)."""
    return {name for name, value in _entries(model) if isinstance(value, torch.nn.Parameter)}


def zero3_layout(model: torch.nn.Module) -> dict:
    """How this rank's tensors make up the full ones, in ``shard_layout``'s form: a partition's spec is
    ``{"shape": [ds_numel], "dim": 0, "flat": [[name, ds_shape, 0]], "tied": {alias: name}}`` (the ranks'
    valid elements side by side are the flattened parameter); whole tensors ``{"shape", "dim": None}``."""
    world, rank = _world()
    tensors: dict[str, dict] = {}
    first: dict[int, str] = {}
    for name, value in _entries(model):
        if not hasattr(value, "ds_id"):
            tensors[name] = {"shape": list(value.shape), "dim": None}
            continue
        if id(value) in first:  # a tied name: one partition, stored once under the first name
            tensors[first[id(value)]]["tied"][name] = first[id(value)]
            continue
        first[id(value)] = name
        param: Any = value  # deepspeed's attributes are not in torch's types
        shape = [int(size) for size in param.ds_shape]
        tensors[name] = {"shape": [int(param.ds_numel)], "dim": 0, "flat": [[name, shape, 0]], "tied": {}}
    return {"ranks": world, "rank": rank, "tensors": tensors}


@torch.no_grad()
def release_gathered(model: torch.nn.Module) -> None:
    """Free every gathered (``AVAILABLE``) ZeRO-3 parameter of ``model``, persistent ones included, so that
    the next forward pass all-gathers the partitions as they are now. Local: no collective.

    What deepspeed's own ``release_and_reset_all`` does per parameter, without needing the engine: a
    partitioned parameter frees its gathered data when re-partitioned unchanged. Raises ``RuntimeError``
    for a parameter still being gathered (inside a forward pass).
    """
    for name, param in model.named_parameters():
        if not hasattr(param, "ds_id"):
            continue
        status = _status(param)
        if status == "NOT_AVAILABLE":
            continue
        if status == "INFLIGHT":
            raise RuntimeError(
                f"the DeepSpeed ZeRO-3 parameter {name!r} is being gathered (inside a forward pass); "
                "snapshot after the optimizer step"
            )
        active = getattr(param, "ds_active_sub_modules", None)
        if active is not None:
            active.clear()  # no forward pass is running here: nothing uses the gathered copy
        param.partition()  # type: ignore[attr-defined]  # deepspeed's method on its parameters


def zero3_full_state(model: torch.nn.Module, is_main: bool) -> dict[str, torch.Tensor]:
    """The whole state dict on the CPU, by the module's names, on rank 0 (empty elsewhere). Collective.

    Gathers one module's parameters at a time (``deepspeed.zero.GatheredParameters`` with no modifier:
    nothing is written back), so at most one module's full weights exist beside the partitions; tied
    names are the very same tensor object. Gathered copies left by an evaluation are released first, so
    the partitions as they are now are what is gathered.
    """
    import deepspeed

    module = zero3_module(model)
    release_gathered(module)
    copies: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        params = [p for p in sub.parameters(recurse=False) if hasattr(p, "ds_id") and id(p) not in copies]
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for param in params:
                copies[id(param)] = param.detach().to("cpu", copy=True) if is_main else param.new_empty(0)
    if not is_main:
        return {}
    out: dict[str, torch.Tensor] = {}
    for name, value in _entries(model):
        out[name] = copies[id(value)] if hasattr(value, "ds_id") else value.detach().to("cpu", copy=True)
    return out
