"""State-dict copies: the CPU snapshot of a live module, and writing weights back into it.

Tied tensors (GPT-2's ``wte.weight`` and ``lm_head.weight`` are one tensor under two names) are kept
once, under the first name, with the other names recorded as aliases. safetensors refuses to save
shared storage, and averaging a tied tensor twice would be wasted work.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from checkpoint_stability.errors import CheckpointStabilityError
from checkpoint_stability.fsdp1_shards import (
    check_fsdp1_root,
    fsdp1_full_state,
    fsdp1_layout,
    fsdp1_live_tensors,
    fsdp1_parameter_names,
    fsdp1_whole_parameter_names,
    fsdp1_whole_tensors,
    is_fsdp1,
    is_fsdp1_sharded,
    reshard_fsdp1,
)
from checkpoint_stability.partitioned_models import is_zero3, refuse_empty_partitions
from checkpoint_stability.zero3_partitions import (
    release_gathered,
    zero3_full_state,
    zero3_layout,
    zero3_live_tensors,
    zero3_parameter_names,
)


@dataclass
class CapturedState(Mapping):
    """A detached copy of a state dict: each distinct tensor once, plus the names tied to it.

    ``tensors`` maps canonical names to contiguous CPU tensors that nothing else holds, so a writer
    thread can read them while training goes on. ``aliases`` maps every other name of a tied tensor to
    its canonical name. Iterating or indexing a ``CapturedState`` sees every name, aliases included.
    """

    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    ready: list = field(default_factory=list, repr=False)
    """CUDA events that mark the end of copies still in flight to the host (empty when the copy is done)."""
    file_image: memoryview | None = field(default=None, repr=False)
    """When the tensors were copied into the bytes of a safetensors file (``SnapshotBuffer`` does that on
    CPU), those bytes, ready to be written as they are."""

    def synchronize(self) -> None:
        """Wait until the tensors hold their values: only a copy from a GPU can still be in flight."""
        events, self.ready = self.ready, []
        for event in events:
            event.synchronize()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[self.aliases.get(name, name)]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors or name in self.aliases

    def __iter__(self) -> Iterator[str]:
        yield from self.tensors
        yield from self.aliases

    def __len__(self) -> int:
        return len(self.tensors) + len(self.aliases)

    def full(self) -> dict[str, torch.Tensor]:
        """Every name, aliases pointing at the very same tensor objects (the tie restored)."""
        out = dict(self.tensors)
        for alias, canonical in self.aliases.items():
            out[alias] = self.tensors[canonical]
        return out


# What kind of weights each model seen by live_tensors holds: "zero3", "fsdp1" (sharded), "fsdp1-whole"
# (FSDP1 with NO_SHARD) or "" (plain, DDP, FSDP2 / DTensor). Weakly keyed: a model that goes away
# leaves nothing behind.
_KINDS: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def _kind(model: torch.nn.Module) -> str:
    """``model``'s entry in ``_KINDS``, found on first sight: the checks walk every module or parameter, a
    visible part of a small model's pause at every snapshot; a model keeps its wrapping for as long as
    it is trained."""
    kind = _KINDS.get(model)
    if kind is None:
        if is_zero3(model):
            kind = "zero3"
        elif is_fsdp1(model):
            kind = "fsdp1" if is_fsdp1_sharded(model) else "fsdp1-whole"
        else:
            kind = ""
        _KINDS[model] = kind
    return kind


def live_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state-dict tensors, sharing storage with its parameters and buffers.

    Entries that are not tensors (``get_extra_state`` may return anything) are left out: they cannot
    be stored in safetensors, and nothing here writes them back.

    A sharded tensor (a DTensor, as FSDP2 and tensor parallelism make) contributes this rank's local
    shard: averaging is elementwise, so each rank can keep the average of its own shards and nothing is
    ever gathered on the per-snapshot path. An FSDP1 model contributes its units' local flat-parameter
    shards (:mod:`checkpoint_stability.fsdp1_shards`): its ``state_dict()`` would gather the full model.
    A DeepSpeed ZeRO-3 model contributes this rank's partitions (``ds_tensor``, without padding; see
    :mod:`checkpoint_stability.zero3_partitions`): its ``state_dict()`` holds empty tensors. An FSDP1
    model that shards nothing (``NO_SHARD``) contributes views of its flat parameters by the original
    names: its ``state_dict()`` clones them, and an average written into a clone never reaches the model.

    Raises :class:`~checkpoint_stability.partitioned_models.PartitionedModelError` for empty tensors of
    partitioned parameters found on any other path, rather than let them be snapshotted.
    """
    kind = _kind(model)
    if kind == "zero3":
        return zero3_live_tensors(model)
    if kind == "fsdp1":
        return fsdp1_live_tensors(model)
    if kind == "fsdp1-whole":
        return fsdp1_whole_tensors(model)
    state = model.state_dict(keep_vars=True)
    out = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            tensor = value.detach()
            out[name] = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    if any(t.numel() == 0 and t.is_floating_point() for t in out.values()):
        refuse_empty_partitions(model, out)  # cheap: only a state with an empty tensor is looked at
    return out


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s weights are split across ranks: a DTensor among its state-dict tensors (FSDP2,
    tensor parallelism), FSDP1 units with a sharding strategy, or DeepSpeed ZeRO-3 partitions. Refuses
    (``ValueError``) an FSDP1 module handed over without its root (see
    :func:`~checkpoint_stability.fsdp1_shards.check_fsdp1_root`).
    """
    if is_zero3(model):
        return True  # never state_dict() here either: its tensors are empty
    if is_fsdp1(model):
        # Never state_dict() here: FSDP1's gathers the whole model on every rank.
        check_fsdp1_root(model)
        return is_fsdp1_sharded(model)
    return any(hasattr(value, "to_local") for value in model.state_dict(keep_vars=True).values())


def shard_layout(model: torch.nn.Module) -> dict:
    """How this rank's local tensors make up the full ones: ``{"ranks", "rank", "tensors": {name:
    {"shape": global shape, "dim": the dimension split across ranks, or None for a full copy}}}``.

    Written into each rank's buffer manifest so that a process without the process group (a background
    evaluator) can put full tensors back together. Only what FSDP2 makes is described: a 1-D device mesh
    whose tensors are split along one dimension (``Shard(d)``, chunks in rank order as ``torch.chunk``
    cuts them) or replicated; anything else raises ``ValueError`` naming the tensor. An FSDP1 model's flat
    shards are described by :func:`~checkpoint_stability.fsdp1_shards.fsdp1_layout` (a ``"flat"`` spec), a
    ZeRO-3 model's partitions by :func:`~checkpoint_stability.zero3_partitions.zero3_layout` (the same form).
    """
    if is_zero3(model):
        return zero3_layout(model)
    if is_fsdp1(model) and is_fsdp1_sharded(model):
        return fsdp1_layout(model)
    ranks, rank = 1, 0
    tensors: dict[str, dict] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.Tensor):
            continue
        if not hasattr(value, "to_local"):
            tensors[name] = {"shape": list(value.shape), "dim": None}
            continue
        mesh, placements = value.device_mesh, value.placements  # type: ignore[attr-defined]  # a DTensor
        if mesh.ndim != 1 or len(placements) != 1:
            raise ValueError(
                f"{name!r} is spread over a {mesh.ndim}-D device mesh; only 1-D meshes are described"
            )
        placement = placements[0]
        if placement.is_shard():
            dim = placement.dim  # type: ignore[union-attr]  # a Shard placement has one
        elif placement.is_replicate():
            dim = None
        else:
            raise ValueError(f"{name!r} has placement {placement}; only Shard(d) and Replicate are described")
        ranks, rank = mesh.size(), mesh.get_local_rank()
        tensors[name] = {"shape": list(value.shape), "dim": dim}
    return {"ranks": ranks, "rank": rank, "tensors": tensors}


def assemble_shards(shards: Sequence[Mapping[str, torch.Tensor]], layout: Mapping) -> dict[str, torch.Tensor]:
    """Full tensors from the ranks' local tensors (``shards`` in rank order), as ``shard_layout`` says.

    A spec with ``"flat"`` (an FSDP1 flat parameter) is cut into the original tensors it holds, under
    their own names; its ``"tied"`` names are the very same tensor objects as the names they alias.

    >>> layout = {"tensors": {"w": {"shape": [3, 2], "dim": 0}, "b": {"shape": [2], "dim": None}}}
    >>> full = assemble_shards([{"w": torch.zeros(2, 2), "b": torch.ones(2)},
    ...                         {"w": torch.ones(1, 2), "b": torch.ones(2)}], layout)
    >>> full["w"].tolist(), full["b"].tolist()
    ([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]], [1.0, 1.0])
    """
    full = {}
    for name, spec in layout["tensors"].items():
        if spec["dim"] is None:
            full[name] = shards[0][name]
        else:
            full[name] = torch.cat([shard[name] for shard in shards], dim=int(spec["dim"]))
        if list(full[name].shape) != list(spec["shape"]):
            raise ValueError(
                f"{name!r}: the ranks' pieces make shape {list(full[name].shape)}, "
                f"the layout says {spec['shape']}"
            )
        if "flat" in spec:
            flat = full.pop(name)
            for original, shape, offset in spec["flat"]:
                numel = math.prod(shape)
                if offset + numel > flat.numel():
                    raise ValueError(
                        f"{name!r}: the layout puts {original!r} at {offset}..{offset + numel}, past the "
                        f"{flat.numel()} elements the ranks' pieces make"
                    )
                full[original] = flat[offset : offset + numel].view(shape).clone()
            for alias, original in spec.get("tied", {}).items():
                full[alias] = full[original]
    return full


def gather_full_state(model: torch.nn.Module, is_main: bool) -> CapturedState | None:
    """The full (unsharded) state dict on CPU, on rank 0 only. Collective: every rank must call it.

    FSDP1: :func:`~checkpoint_stability.fsdp1_shards.fsdp1_full_state` (``FULL_STATE_DICT``, ``rank0_only``,
    one all-gather per unit; torch's ``get_model_state_dict`` would ask for ``offload_to_cpu``, which fails
    on a CPU model), by the names of the unwrapped model. DeepSpeed ZeRO-3:
    :func:`~checkpoint_stability.zero3_partitions.zero3_full_state` (one module gathered at a time), by the
    names of the engine's module.
    """
    if is_zero3(model):
        zero3 = zero3_full_state(model, is_main)
        return capture_state(zero3) if is_main else None
    if is_fsdp1(model):
        reshard_fsdp1(model)  # a unit still holding gathered values would be exported with those
        fsdp1 = fsdp1_full_state(model)
        return capture_state(fsdp1) if is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return capture_state(full) if is_main else None  # type: ignore[arg-type]  # DTensor-free: full_state_dict


def free_gathered_weights(model: torch.nn.Module) -> None:
    """Free the full weights a sharded model keeps gathered after a forward pass without backward (FSDP1
    units, DeepSpeed ZeRO-3 parameters), so that the next forward pass gathers the shards as they are now:
    after an evaluation, before other shards (the average, the restored live ones) are written in and
    before training or an export reads the model. Local: no collective; nothing to do for other models."""
    reshard_fsdp1(model)
    if is_zero3(model):
        release_gathered(model)


def _storage_key(tensor: torch.Tensor) -> tuple:
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def tied_groups(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Map each name that is the very same view of an earlier name's storage to that earlier name."""
    first_by_key: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in tensors.items():
        if tensor.numel() == 0:
            continue
        key = _storage_key(tensor)
        if key in first_by_key:
            aliases[name] = first_by_key[key]
        else:
            first_by_key[key] = name
    return aliases


def capture_state(
    tensors: Mapping[str, torch.Tensor],
    storage_dtype: torch.dtype | None = None,
    staging: PinnedStaging | None = None,
) -> CapturedState:
    """Copy state-dict tensors to contiguous CPU tensors; floating ones cast to ``storage_dtype``.

    This is the only work a snapshot does on the training thread. On CPU it is one ``clone`` per
    tensor (``.to("cpu")`` of a CPU tensor would copy nothing and let training overwrite the snapshot).
    With ``staging`` and CUDA tensors, the copy goes to ``staging``'s pinned buffers on a side stream and
    this returns before it ends: call ``synchronize()`` on the result before reading it on the CPU.
    """
    if staging is not None and any(t.device.type == "cuda" for t in tensors.values()):
        return staging.capture(tensors, storage_dtype)
    aliases = tied_groups(tensors)
    copies: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name in aliases:
            continue
        check_dense(name, tensor)
        copies[name] = tensor.detach().to(
            device="cpu",
            dtype=stored_dtype(tensor, storage_dtype),
            copy=True,
            memory_format=torch.contiguous_format,
        )
    return CapturedState(copies, aliases)


class PinnedStaging:
    """Pinned host buffers, reused from one snapshot to the next, and a side stream per GPU to fill them.

    A copy from pageable memory makes the CPU thread wait for the transfer; into pinned memory on a side
    stream it is queued and the training thread goes on. The training stream is then made to wait (on
    the GPU, not on the CPU) for the copy before its next kernel, because the next optimizer step must
    not overwrite weights that are still being read. Reading the copy on the CPU waits for its event
    (``CapturedState.synchronize``), which the snapshot writer thread does.

    The buffers are reused, so a captured state is valid until the next capture: ``SnapshotBuffer``
    waits for the previous write before capturing again, and nothing else keeps a captured state (the
    window average copies what it keeps).

    Not measured on these CPU-only machines (see benchmarks/RESULTS.md).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def capture(
        self, tensors: Mapping[str, torch.Tensor], storage_dtype: torch.dtype | None
    ) -> CapturedState:
        aliases = tied_groups(tensors)
        copies: dict[str, torch.Tensor] = {}
        streams: dict[torch.device, torch.cuda.Stream] = {}
        for name, tensor in tensors.items():
            if name in aliases:
                continue
            check_dense(name, tensor)
            dtype = stored_dtype(tensor, storage_dtype) or tensor.dtype
            source = tensor.detach()
            if source.device.type != "cuda":
                copies[name] = source.to("cpu", dtype=dtype, copy=True, memory_format=torch.contiguous_format)
                continue
            stream = streams.get(source.device)
            if stream is None:
                stream = self._streams.get(source.device)
                if stream is None:
                    stream = self._streams[source.device] = torch.cuda.Stream(source.device)
                # Start after the work already queued on the training stream (the step that made these).
                stream.wait_stream(torch.cuda.current_stream(source.device))
                streams[source.device] = stream
            target = self._buffer(name, tuple(source.shape), dtype)
            with torch.cuda.stream(stream):
                target.copy_(source, non_blocking=True)
            # The allocator must not hand this memory to another tensor while the side stream reads it.
            source.record_stream(stream)
            copies[name] = target
        events = []
        for device, stream in streams.items():
            event = torch.cuda.Event()
            event.record(stream)
            torch.cuda.current_stream(device).wait_event(event)
            events.append(event)
        return CapturedState(copies, aliases, events)

    def _buffer(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or tuple(buffer.shape) != shape or buffer.dtype != dtype:
            buffer = self._buffers[name] = torch.empty(shape, dtype=dtype, pin_memory=True)
        return buffer


def check_dense(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_sparse or tensor.device.type == "meta":
        raise ValueError(
            f"state-dict entry {name!r} is a {'sparse' if tensor.is_sparse else 'meta'} tensor; "
            "only dense, materialised tensors can be snapshotted"
        )


def stored_dtype(tensor: torch.Tensor, storage_dtype: torch.dtype | None) -> torch.dtype | None:
    return storage_dtype if (storage_dtype is not None and tensor.is_floating_point()) else None


class CopiedStateDictError(CheckpointStabilityError, ValueError):
    """The model's ``state_dict()`` hands out copies of some of its parameters, so weights written into
    them (the window average for the avg evaluation, a snapshot in the background evaluator) would never
    reach the model, and its evaluation would silently be the raw model's."""


# Per model seen by check_writable: the parameters its live tensors miss (checked once; a model keeps
# its wrapping, and so what its state dict hands out, for as long as it is trained).
_UNREACHABLE: weakref.WeakKeyDictionary[torch.nn.Module, list[str]] = weakref.WeakKeyDictionary()


def unreachable_parameters(model: torch.nn.Module, live: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of ``model``'s parameters whose storage no tensor of ``live`` shares (empty parameters,
    such as ZeRO-3's outside a forward pass, aside)."""
    storages = {_storage_pointer(tensor) for tensor in live.values() if tensor.numel()}
    missing = []
    for name, parameter in model.named_parameters():
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        pointer = _storage_pointer(local) if local.numel() else None
        if pointer is not None and pointer not in storages:
            missing.append(name)
    return missing


def _storage_pointer(tensor: torch.Tensor) -> int | None:
    """Where ``tensor``'s storage starts; None for a wrapper subclass without one (nothing to compare)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def check_writable(model: torch.nn.Module, live: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`CopiedStateDictError` unless weights written into ``live`` (what
    :func:`live_tensors` gave for ``model``) reach every parameter of ``model``.
    Checked once per model."""
    if _kind(model) not in ("", "fsdp1-whole"):
        # Sharded FSDP1 and ZeRO-3 hand out flat shards and partitions on purpose: their parameters are
        # gathered from them by the next forward pass (see reshard_fsdp1, release_gathered).
        return
    missing = _UNREACHABLE.get(model)
    if missing is None:
        missing = _UNREACHABLE[model] = unreachable_parameters(model, live)
    if missing:
        shown = ", ".join(repr(name) for name in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise CopiedStateDictError(
            f"the model's state_dict() returns copies of {len(missing)} of its parameters ({shown}), not "
            "the parameters themselves, so averaged or buffered weights written into them would never "
            "reach the model. Hand over the module whose state_dict() shares its parameters' storage "
            "(the unwrapped model, or for FSDP1 its root unit), or remove the state-dict hook that copies"
        )


@torch.no_grad()
def write_into(targets: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor]) -> None:
    """Copy ``source`` into the live tensors ``targets`` in place (casting dtype and device).

    Every target name must be in the source; it is checked before anything is written, so a
    mismatch leaves the model untouched.
    """
    missing = [name for name in targets if name not in source]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise KeyError(f"snapshot has no tensor for {len(missing)} model entries: {shown}")
    for name, target in targets.items():
        value = source[name]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"shape mismatch for {name!r}: model has {tuple(target.shape)}, "
                f"snapshot has {tuple(value.shape)}"
            )
    for name, target in targets.items():
        copy_into_tensor(name, target, source[name])


def copy_into_tensor(name: str, target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` for any live tensor, including one made by ``expand()``.

    An expanded buffer (stride 0) holds one element for many positions; torch refuses to write into it.
    Its values are equal along the expanded dimensions, so writing the first slice of each writes them
    all. Raises ``ValueError`` naming the tensor for any other layout torch cannot write into.
    """
    for dim, stride in enumerate(target.stride()):
        if stride == 0 and target.shape[dim] > 1:
            target = target.narrow(dim, 0, 1)
            value = value.narrow(dim, 0, 1) if value.shape[dim] > 1 else value
    try:
        target.copy_(value)
    except RuntimeError as error:
        raise ValueError(
            f"cannot write into the model's {name!r} (shape {tuple(target.shape)}, strides "
            f"{tuple(target.stride())}): {error}"
        ) from error


def is_plain_layout(tensor: torch.Tensor) -> bool:
    """Contiguous with no stride-0 dimension: safe to use as an ``out=`` target."""
    return tensor.is_contiguous() and all(
        s != 0 or n <= 1 for s, n in zip(tensor.stride(), tensor.shape, strict=True)
    )


def parameter_names(model: torch.nn.Module) -> set[str]:
    """State-dict names that are parameters (what training updates), as opposed to buffers (for FSDP1,
    the names of :func:`live_tensors`, flat shards included; for ZeRO-3, the partitioned parameters)."""
    kind = _kind(model)
    if kind == "zero3":
        return zero3_parameter_names(model)
    if kind == "fsdp1":
        return fsdp1_parameter_names(model)
    if kind == "fsdp1-whole":
        return fsdp1_whole_parameter_names(model)
    return {
        name
        for name, value in model.state_dict(keep_vars=True).items()
        if isinstance(value, torch.nn.Parameter)
    }


def non_finite_counts(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """How many NaN or infinite elements each floating tensor holds (only tensors holding some)."""
    counts = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            count = tensor.numel() - int(torch.isfinite(tensor).sum())
            if count:
                counts[name] = count
    return counts


def non_finite_names(tensors: Mapping[str, torch.Tensor]) -> set[str]:
    """Names of the floating tensors holding a NaN or an infinity."""
    return set(non_finite_counts(tensors))
