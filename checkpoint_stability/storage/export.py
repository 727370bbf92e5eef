"""What an export directory holds, written and read back: a ``save_pretrained`` directory for a Hugging Face
model, else ``model.safetensors``."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from checkpoint_stability.state_dicts import CapturedState, tied_groups
from checkpoint_stability.storage.atomic_files import atomic_write_bytes
from checkpoint_stability.storage.json_files import DamagedJSONError, parse_json_object, read_json_object

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # save_pretrained's name once a model is split into shards


class ModelExporter:
    """Writes the weights of one selected model into an export directory.

    - The snapshotted module, or its submodule under ``prefix`` (``"model."`` for a LightningModule
      holding the model as ``self.model``), is what gets exported: the model a user ships, not its
      training wrapper.
    - When that module is a Hugging Face ``PreTrainedModel``, the directory is written by its own
      ``save_pretrained(state_dict=...)``: ``config.json``, ``generation_config.json`` and the weights
      as transformers names and ties them, so ``AutoModelForCausalLM.from_pretrained(path)`` loads it. A
      tokenizer (``processing_class``, else the ``tokenizer`` of a task that has ``save_pretrained``) is
      saved beside it.
    - Otherwise the directory holds ``model.safetensors``; tied tensors are stored once and their
      aliases kept in the file's metadata, so :func:`load_export` brings the ties back.

    ``module``: returns the snapshotted module (or None once it is gone); it is looked up at export time
    because the monitor only meets the model at its first snapshot.

    Example::

        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from checkpoint_stability.storage.export import ModelExporter, load_export
        >>> from checkpoint_stability.state_dicts import capture_state
        >>> model = torch.nn.Linear(2, 1)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     ModelExporter(lambda: model).write(Path(d), capture_state(model.state_dict()), {"step": "3"})
        ...     sorted(load_export(d))
        ['bias', 'weight']
    """

    def __init__(
        self,
        module: Callable[[], torch.nn.Module | None] = lambda: None,
        *,
        prefix: str = "",
        processing_class: Any = None,
        tasks: tuple = (),
    ):
        self.module = module
        self.prefix = prefix
        self.processing_class = processing_class
        self.tasks = tasks

    def write(self, directory: Path, weights: CapturedState, metadata: Mapping[str, str]) -> None:
        """Write ``weights`` (the snapshotted module's state, ties as aliases) into ``directory``."""
        tensors = weights.full()
        if self.prefix:
            tensors = {k[len(self.prefix) :]: v for k, v in tensors.items() if k.startswith(self.prefix)}
            if not tensors:
                raise ValueError(f"the snapshotted state has no entries under the prefix {self.prefix!r}")
        pretrained = self._pretrained()
        if pretrained is not None:
            # save_pretrained drops the tied duplicates it knows (lm_head.weight) and writes the config;
            # its "Writing model shards" bar would interrupt the training's output at every new best.
            with _quiet_transformers():
                pretrained.save_pretrained(str(directory), state_dict=tensors)
            tokenizer = self._tokenizer()
            if tokenizer is not None:
                tokenizer.save_pretrained(str(directory))
            return
        kept = weights
        if self.prefix:
            aliases = {a[len(self.prefix) :]: c[len(self.prefix) :] for a, c in weights.aliases.items()}
            aliases = {a: c for a, c in aliases.items() if a in tensors and c in tensors}
            kept = CapturedState({k: v for k, v in tensors.items() if k not in aliases}, aliases)
        data = safetensors_save(
            kept.tensors, metadata={**metadata, "format": "pt", "aliases": json.dumps(kept.aliases)}
        )
        atomic_write_bytes(directory / WEIGHTS_FILE, data, inside=directory)

    def _pretrained(self) -> Any:
        module = self.module()
        if module is None:
            return None
        if self.prefix:
            try:
                module = module.get_submodule(self.prefix.rstrip("."))
            except AttributeError:
                return None
        # Only when transformers is loaded already: a model that is not one cannot need it.
        transformers = sys.modules.get("transformers")
        pretrained = getattr(transformers, "PreTrainedModel", None)
        return module if pretrained is not None and isinstance(module, pretrained) else None

    def _tokenizer(self) -> Any:
        candidates = [self.processing_class, *(getattr(task, "tokenizer", None) for task in self.tasks)]
        return next((c for c in candidates if callable(getattr(c, "save_pretrained", None))), None)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def has_weights(directory: Path) -> bool:
    """Whether an export directory holds weights: ``model.safetensors`` or a sharded index."""
    return any((directory / name).is_file() and not (directory / name).is_symlink() for name in _WEIGHT_NAMES)


_WEIGHT_NAMES = (WEIGHTS_FILE, INDEX_FILE)


def load_export(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an export directory (or its ``model.safetensors``), ties stored as aliases restored.

    A ``save_pretrained`` export leaves out the tied duplicates transformers re-ties itself (e.g.
    ``lm_head.weight``); :func:`fit_state_to` fills them in from the model being loaded.
    """
    path = Path(path)
    if path.is_dir():
        index = path / INDEX_FILE
        if index.is_file():
            weight_map = read_json_object(index, str(index)).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise DamagedJSONError(f"{index}: 'weight_map' must map tensor names to file names")
            files = sorted(set(weight_map.values()))
            for name in files:
                if Path(name).name != name:
                    raise ValueError(f"{index} names {name!r}, not a file beside it")
            tensors: dict[str, torch.Tensor] = {}
            for name in files:
                tensors.update(_read_safetensors(path / name))
            return tensors
        path = path / WEIGHTS_FILE
    return _read_safetensors(path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        aliases = parse_json_object((handle.metadata() or {}).get("aliases", "{}"), f"the aliases of {path}")
    for alias, canonical in aliases.items():
        if not isinstance(canonical, str) or canonical not in tensors:
            raise DamagedJSONError(
                f"{path}: the alias {alias!r} names {canonical!r}, which the file does not hold"
            )
        tensors[alias] = tensors[canonical]
    return tensors


def export_target(model: torch.nn.Module, state: Mapping[str, torch.Tensor], prefix: str) -> torch.nn.Module:
    """The module an export loads into: ``model``, or its submodule under ``prefix`` when ``model`` is the
    wrapper that was trained and the export holds only the model inside it (the wrapper's own
    parameters are then left as they are)."""
    if not prefix or any(name.startswith(prefix) for name in state):
        return model
    try:
        return model.get_submodule(prefix.rstrip("."))
    except AttributeError:
        return model


def fit_state_to(state: dict[str, torch.Tensor], model: torch.nn.Module, prefix: str = "") -> dict:
    """``state`` renamed to ``model``'s state-dict names, with the model's tied entries filled in.

    An export is of the module under ``prefix`` inside the trained one (or of the whole of it, as
    older exports were); ``model`` is that module, or the wrapper holding it under ``prefix``. Of the
    three namings (as stored, prefix removed, prefix added) the one covering most of ``model``'s
    entries wins.
    """
    wanted = model.state_dict()
    namings = [state]
    if prefix:
        namings.append({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        namings.append({prefix + k: v for k, v in state.items()})
    fitted = dict(max(namings, key=lambda naming: len(wanted.keys() & naming.keys())))
    for alias, canonical in tied_groups(wanted).items():
        if alias not in fitted and canonical in fitted:
            fitted[alias] = fitted[canonical]
        elif canonical not in fitted and alias in fitted:
            fitted[canonical] = fitted[alias]
    return fitted
