"""FSDP1's local shards: what a rank of a ``FullyShardedDataParallel`` model snapshots without gathering.

FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``, what Lightning's ``FSDPStrategy`` and the
Hugging Face Trainer's ``fsdp`` with version 1 give) flattens the parameters of each wrapped unit into
one ``FlatParameter`` and keeps a 1-D chunk of it per rank. Its state-dict APIs do not snapshot that
chunk cheaply (torch 2.13, ``torch/distributed/fsdp/_state_dict_utils.py``, counted on two gloo ranks):

- the default ``FULL_STATE_DICT`` unshards (all-gathers) every unit on every rank;
- ``SHARDED_STATE_DICT`` enters the same unshard context, all-gathers every unit, then re-chunks each
  original parameter along dim 0 — one all-gather per unit, the full model's worth of traffic;
- ``LOCAL_STATE_DICT`` hands out the flat shards but wraps each in a ``ShardedTensor``, whose
  construction all-gathers metadata (one ``all_gather_object`` per unit).

So a snapshot here reads the flat shards directly from each unit's ``FlatParamHandle``: no collective
at all. Each unit's shard is named ``<unit path>._flat_param`` (``_flat_param`` for the root unit),
the names ``LOCAL_STATE_DICT`` uses; buffers (FSDP1 never shards them) and parameters FSDP does not
manage keep their ordinary names and are whole on every rank. Averaging is elementwise, so the average
of the shards is the shard of the average; writing it back into the flat shards is what the next
forward all-gathers (and, with ``use_orig_params=True``, the original parameters are views of them).

:func:`fsdp1_layout` describes how the ranks' shards make up the original tensors (the padded flat
vector cut by ``torch.chunk``, then split per parameter, alignment padding skipped), so a background
evaluator in one process can put full, originally named tensors together
(:func:`checkpoint_stability.state_dicts.assemble_shards`).

Only internals of ``torch.distributed.fsdp`` that have been stable since torch 2.1 are read:
``FullyShardedDataParallel._handle``, ``FlatParameter._fqns/_shapes/_numels_with_padding/
_is_padding_mask/_shared_param_infos/_unpadded_unsharded_size/_local_shard``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from checkpoint_stability.errors import CheckpointStabilityError

FLAT_PARAMETER = "_flat_param"
"""The name FSDP1 gives a unit's flat parameter (and ``LOCAL_STATE_DICT`` its shard)."""
_WRAPPED = "_fsdp_wrapped_module."


class UnsupportedShardingError(CheckpointStabilityError, ValueError):
    """An FSDP1 set-up whose shards cannot be snapshotted: a hybrid strategy, or a module handed over
    without its root unit. Raised when training starts, whatever ``on_error`` says."""


def _fsdp_class() -> type[torch.nn.Module] | None:
    """``FullyShardedDataParallel``, or None where torch.distributed is not built in."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def clean_name(name: str) -> str:
    """A module or tensor path without FSDP1's wrapper components: the name the unwrapped model uses."""
    return name.replace(_WRAPPED, "")


def _units(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The FSDP1 units inside ``model`` (itself included) that hold a flat parameter, by module path."""
    fsdp = _fsdp_class()
    if fsdp is None:
        return []
    units: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, fsdp) and getattr(module, "_handle", None) is not None:
            units.append((name, module))
    return units


def _handle_of(unit: torch.nn.Module) -> Any:
    """An FSDP1 unit's ``FlatParamHandle`` (typed loosely: torch's private class)."""
    return getattr(unit, "_handle", None)


def is_fsdp1(model: torch.nn.Module) -> bool:
    """Whether ``model`` is, or holds, an FSDP1 unit (sharded or not)."""
    fsdp = _fsdp_class()
    return fsdp is not None and any(isinstance(module, fsdp) for module in model.modules())


def is_fsdp1_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds FSDP1 units whose flat parameters are split across ranks.

    ``NO_SHARD`` keeps the whole flat parameter on every rank: that is plain data parallelism, and the
    full-weights path (rank 0 snapshots) applies. Hybrid strategies, which shard within a group of ranks
    and replicate across groups, are refused: ``buffer/rank-R/`` assumes one shard per rank of the world.
    """
    sharded = False
    for name, unit in _units(model):
        handle = _handle_of(unit)
        if not handle.uses_sharded_strategy:
            continue
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        group = getattr(unit, "process_group").size()  # noqa: B009  # an FSDP1 unit's attribute
        if group != world:
            raise UnsupportedShardingError(
                f"the FSDP1 unit {clean_name(name) or '(root)'!r} shards over {group} of {world} ranks "
                f"({handle._sharding_strategy.name}); only strategies that shard over every rank "
                "(FULL_SHARD, SHARD_GRAD_OP) or none (NO_SHARD) are supported"
            )
        sharded = True
    return sharded


def check_fsdp1_root(model: torch.nn.Module) -> None:
    """Refuse a module whose FSDP1 root is outside it: its root unit's flat parameter (the parameters no
    inner unit wraps) would be missing from the snapshots, and a forward pass through it would skip the
    root's unsharding. Raises :class:`UnsupportedShardingError` saying which module to hand over instead.
    (Before FSDP1's lazy initialisation, at the first forward pass, which unit is the root is not known
    yet; the check is made again at the first snapshot.)"""
    fsdp = _fsdp_class()
    # Every FSDP1 instance counts here, a root without parameters of its own (no flat parameter) too.
    units = [module for module in model.modules() if fsdp is not None and isinstance(module, fsdp)]
    if units and all(getattr(unit, "_is_root", None) is False for unit in units):
        raise UnsupportedShardingError(
            "this module holds FSDP1 (FullyShardedDataParallel) units but not their root: the root wraps "
            "it from outside. Hand the monitor the root FullyShardedDataParallel module (Lightning: "
            "trainer.strategy.model; Hugging Face: trainer.model_wrapped); the callbacks do that themselves"
        )


def fsdp1_root_of(module: torch.nn.Module, candidates: Sequence[object]) -> torch.nn.Module:
    """The FSDP1 root among ``candidates`` that wraps ``module`` (through ``.module``), else ``module``.

    A framework wraps the module it trains in FSDP1 and hands callbacks the inner one; the snapshot and
    the evaluation need the wrapper. Example: ``fsdp1_root_of(pl_module, [trainer.strategy.model])``.
    """
    fsdp = _fsdp_class()
    if fsdp is None:
        return module
    for candidate in candidates:
        if not isinstance(candidate, fsdp) or candidate is module:
            continue
        inner: object = candidate
        for _ in range(8):  # FSDP1 unit -> wrapped module (an activation-checkpoint wrapper may sit between)
            inner = getattr(inner, "module", None)
            if inner is module:
                return candidate
            if not isinstance(inner, torch.nn.Module):
                break
    return module


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module an FSDP1 root wraps (the user's model, e.g. a ``PreTrainedModel``), else ``model``."""
    fsdp = _fsdp_class()
    if fsdp is not None and isinstance(model, fsdp):
        inner = model.module
        return inner if isinstance(inner, torch.nn.Module) else model
    return model


def fsdp1_full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict, by the unwrapped model's names, on rank 0 (empty elsewhere): FSDP1's
    ``FULL_STATE_DICT`` with ``rank0_only``, one all-gather per unit. Collective.

    ``offload_to_cpu`` is asked for only when the weights are not on the CPU already: with torch 2.13 it
    fails on a CPU model ("setStorage ... out of bounds for storage of size 0" while unflattening).
    """
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

    on_cpu = all(param.device.type == "cpu" for param in model.parameters())
    config = FullStateDictConfig(offload_to_cpu=not on_cpu, rank0_only=True)
    with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        state = model.state_dict()
    return {clean_name(name): value for name, value in state.items() if isinstance(value, torch.Tensor)}


def _flat_shard(name: str, unit: torch.nn.Module) -> torch.Tensor:
    """This rank's shard of ``unit``'s flat parameter (its padded 1-D chunk), sharing its storage."""
    flat = _handle_of(unit).flat_param
    local = getattr(flat, "_local_shard", None)
    # Inside forward, or summon_full_params, the flat parameter points at the gathered full vector; its
    # own shard is what training updates and what the next forward gathers.
    if local is not None and flat.data_ptr() != local.data_ptr():
        raise RuntimeError(
            f"the FSDP1 unit {clean_name(name) or '(root)'!r} holds its unsharded parameters now (inside a "
            "forward pass or summon_full_params); snapshot after the optimizer step"
        )
    return flat.detach()


def reshard_fsdp1(model: torch.nn.Module) -> None:
    """Put every FSDP1 unit of ``model`` back on its local shard, freeing the gathered parameters.

    FSDP1 keeps the gathered parameters of some units allocated after a forward pass without backward:
    the root's always (its backward would gather them again at once), every unit's under
    ``SHARD_GRAD_OP``. The flat parameter points at the shard again, but the next forward finds the
    gathered copy allocated, skips the all-gather and computes with the old values (seen on torch 2.13:
    an avg evaluation computed with the raw root unit). So after an evaluation — before the averaged
    shards are written in, and before training or an export reads the model — those copies are freed,
    and the next forward gathers the shards as they are. Local only: no collective.
    """
    from torch.distributed.fsdp._runtime_utils import _reshard

    for _, unit in _units(model):
        handle = _handle_of(unit)
        if handle.uses_sharded_strategy and not handle.needs_unshard():
            _reshard(unit, handle, True)


def _managed_ids(units: Sequence[tuple[str, torch.nn.Module]]) -> set[int]:
    """The ids of the parameters FSDP1 manages (flat ones and, with ``use_orig_params``, their views)."""
    ids = set()
    for _, unit in units:
        flat = _handle_of(unit).flat_param
        ids.add(id(flat))
        for group in (getattr(flat, "_params", None), getattr(flat, "_shared_params", None)):
            ids.update(id(p) for p in group or ())
    return ids


def _entries(
    model: torch.nn.Module, *, parameters: bool, buffers: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters FSDP1 does not manage and persistent buffers, by their unwrapped names."""
    managed = _managed_ids(_units(model))
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        prefix = clean_name(f"{module_name}.") if module_name else ""
        if parameters:
            for name, param in module._parameters.items():
                if param is None or id(param) in managed or id(param) in seen:
                    continue
                if type(param).__name__ == "FlatParameter":
                    continue
                seen.add(id(param))
                yield f"{prefix}{name}", param
        if buffers:
            for name, buffer in module._buffers.items():
                if buffer is None or name in module._non_persistent_buffers_set:
                    continue
                yield f"{prefix}{name}", buffer


def fsdp1_live_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's flat shards (``<unit>._flat_param``), then the unmanaged parameters and the buffers,
    whole; every tensor shares storage with the live model. No collective."""
    out = {}
    for name, unit in _units(model):
        unit_prefix = clean_name(f"{name}.") if name else ""
        out[f"{unit_prefix}{FLAT_PARAMETER}"] = _flat_shard(name, unit)
    for name, tensor in _entries(model, parameters=True, buffers=True):
        out[name] = tensor.detach()
    return out


def fsdp1_parameter_names(model: torch.nn.Module) -> set[str]:
    """Which names of :func:`fsdp1_live_tensors` are parameters (what training updates)."""
    names = {(clean_name(f"{name}.") if name else "") + FLAT_PARAMETER for name, _ in _units(model)}
    names.update(name for name, _ in _entries(model, parameters=True, buffers=False))
    return names


def _originals(unit_prefix: str, flat: Any) -> Iterator[tuple[str, tuple[int, ...], int]]:
    """The original parameters in a unit's (unsharded, padded) flat parameter: name, shape, offset."""
    offset, originals = 0, iter(zip(flat._fqns, flat._shapes, strict=True))
    for numel, padding in zip(flat._numels_with_padding, flat._is_padding_mask, strict=True):
        if not padding:
            fqn, shape = next(originals)
            yield unit_prefix + clean_name(fqn), tuple(shape), offset
        offset += int(numel)


def _tied(unit_prefix: str, flat: Any) -> dict[str, str]:
    """A unit's tied parameters: each alias's name, mapped to the name of the parameter it shares."""
    tied = {}
    for info in getattr(flat, "_shared_param_infos", None) or ():
        alias = f"{info.module_name}.{info.param_name}" if info.module_name else info.param_name
        primary = (
            f"{info.prim_module_name}.{info.prim_param_name}"
            if info.prim_module_name
            else info.prim_param_name
        )
        tied[unit_prefix + clean_name(alias)] = unit_prefix + clean_name(primary)
    return tied


def fsdp1_whole_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """For an FSDP1 model that shards nothing (``NO_SHARD``): every original parameter, by the unwrapped
    model's name, as a view of its unit's flat parameter; then the unmanaged parameters and the buffers.

    The names and values of ``FULL_STATE_DICT``, but sharing storage with the model. That state dict
    clones under ``NO_SHARD`` (torch 2.13), so an average written into its tensors would never reach
    the model: the avg evaluation would evaluate the raw weights. No collective.
    """
    out: dict[str, torch.Tensor] = {}
    for name, unit in _units(model):
        unit_prefix = clean_name(f"{name}.") if name else ""
        flat = _handle_of(unit).flat_param
        data = flat.detach()
        originals = list(_originals(unit_prefix, flat))
        # A parameter that was not contiguous keeps its strides inside the flat parameter.
        strides = getattr(flat, "_strides", None) or [None] * len(originals)
        contiguous = getattr(flat, "_contiguities", None) or [True] * len(originals)
        for (original, shape, offset), stride, plain in zip(originals, strides, contiguous, strict=True):
            piece = data[offset : offset + math.prod(shape)]
            out[original] = piece.view(shape) if plain else piece.as_strided(shape, stride)
        for alias, primary in _tied(unit_prefix, flat).items():
            out[alias] = out[primary]
    for name, tensor in _entries(model, parameters=True, buffers=True):
        out[name] = tensor.detach()
    return out


def fsdp1_whole_parameter_names(model: torch.nn.Module) -> set[str]:
    """Which names of :func:`fsdp1_whole_tensors` are parameters (what training updates)."""
    names: set[str] = set()
    for name, unit in _units(model):
        unit_prefix = clean_name(f"{name}.") if name else ""
        flat = _handle_of(unit).flat_param
        names.update(original for original, _, _ in _originals(unit_prefix, flat))
        names.update(_tied(unit_prefix, flat))
    names.update(name for name, _ in _entries(model, parameters=True, buffers=False))
    return names


def fsdp1_layout(model: torch.nn.Module) -> dict:
    """How this rank's tensors make up the full, originally named ones, in ``shard_layout``'s form.

    A flat shard's spec: ``{"shape": [ranks x shard numel], "dim": 0, "flat": [[name, shape, offset],
    ...], "tied": {alias: name}}``: the ranks' shards side by side are the padded flat vector, and each
    original parameter is ``numel(shape)`` elements from ``offset`` in it. Whole tensors: ``{"shape",
    "dim": None}``.
    """
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    tensors: dict[str, dict] = {}
    for name, unit in _units(model):
        unit_prefix = clean_name(f"{name}.") if name else ""
        flat = _handle_of(unit).flat_param
        tensors[f"{unit_prefix}{FLAT_PARAMETER}"] = {
            "shape": [int(flat.numel()) * world],
            "dim": 0,
            "flat": [[piece, list(shape), offset] for piece, shape, offset in _originals(unit_prefix, flat)],
            "tied": _tied(unit_prefix, flat),
        }
    for name, tensor in _entries(model, parameters=True, buffers=True):
        tensors[name] = {"shape": list(tensor.shape), "dim": None}
    return {"ranks": world, "rank": rank, "tensors": tensors}
