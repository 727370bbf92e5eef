"""The import graph runs one way: adapters -> core -> storage / tasks / sinks; reporting and offline
tools sit above the core, which never imports them. Read from the source with ``ast``, so a new import
that breaks the layering fails here, naming the module and the import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "checkpoint_stability"

# Modules every layer may use: no state of their own, nothing below them but torch.
LEAVES = {
    "errors",
    "records",
    "metrics",
    "state_dicts",
    "runtime",
    "isolation",
    "validation",
    "exact_sums",
    "holdout",
    "bootstrap",
    "diagnostics",
    "_version",
    # What a sharded or partitioned model's tensors are (FSDP1 flat shards, DeepSpeed ZeRO-3 partitions):
    # read by state_dicts, the monitor and the callbacks alike; nothing below them but torch.
    "fsdp1_shards",
    "partitioned_models",
    "zero3_partitions",
}
CORE = {
    "config",
    "buffer",
    "averaging",
    "window",
    "ensemble",
    "history",
    "monitor",
    "selection",
    "faults",
    "run_directory",
    "live_series",
    "best_export",
    "evaluation",
    "publishing",
    "run_summary",
    "evidence",
    "followed_buffer",
    "evaluator_state",
    "evaluator",
}


def _imports() -> dict[str, list[tuple[str, bool]]]:
    """Module (relative dotted name) -> [(imported module, at the top level of the file)]."""
    found: dict[str, list[tuple[str, bool]]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        entries = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            entries.extend((module, id(node) in top_level) for module in modules)
        found[name] = entries
    return found


IMPORTS = _imports()


def _ours(module: str) -> str | None:
    if module == "checkpoint_stability":
        return ""
    if module.startswith("checkpoint_stability."):
        return module.removeprefix("checkpoint_stability.")
    return None


def _layer(name: str) -> str:
    head = name.split(".")[0]
    if head in ("storage", "tasks", "sinks", "reporting", "offline", "callbacks", "datasets"):
        return head
    if name in LEAVES:
        return "leaf"
    if name in CORE:
        return "core"
    return "top"


ALLOWED = {
    "leaf": {"leaf"},
    "storage": {"storage", "leaf"},
    "tasks": {"tasks", "leaf"},
    "sinks": {"sinks", "leaf"},
    "core": {"core", "leaf", "storage", "tasks", "sinks"},
    "reporting": {"reporting", "core", "leaf", "storage", "tasks"},
    "offline": {"offline", "reporting", "core", "leaf", "storage", "tasks"},
    "callbacks": {"callbacks", "core", "leaf", "storage", "tasks", "sinks"},
    "datasets": {"datasets", "leaf"},
}


@pytest.mark.parametrize("name", sorted(n for n in IMPORTS if _layer(n) in ALLOWED))
def test_each_module_imports_only_the_layers_below_it(name):
    layer = _layer(name)
    wrong = []
    for module, top_level in IMPORTS[name]:
        ours = _ours(module)
        if ours is None or ours == "" or ours.startswith("_moved"):
            continue
        target = _layer(ours)
        # One documented exception: the report sink's end-of-run hook imports the reporting layer when
        # it runs (inside the function), so the live core never loads it.
        lazy_report = name == "sinks.report" and ours.startswith("reporting") and not top_level
        if target not in ALLOWED[layer] and not lazy_report:
            wrong.append(f"{module} ({target})")
    assert not wrong, f"{name} ({layer}) imports {', '.join(wrong)}"


@pytest.mark.parametrize("name", sorted(n for n in IMPORTS if _layer(n) != "callbacks"))
def test_no_module_outside_the_adapters_imports_a_training_framework_at_import_time(name):
    frameworks = [
        module
        for module, top_level in IMPORTS[name]
        if top_level and module.split(".")[0] in ("lightning", "pytorch_lightning", "transformers")
    ]
    assert not frameworks, f"{name} imports {frameworks} when it is imported"
