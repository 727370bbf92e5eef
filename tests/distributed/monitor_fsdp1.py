"""Run by tests/test_fsdp1.py under torchrun with two CPU processes (gloo): FSDP1
(``FullyShardedDataParallel(..., device_id=cpu)``) through the real ``StabilityMonitor``.

Every rank writes rank<R>.json with what tests/test_fsdp1.py checks against oracles of torch's own:

- ``inline``: 5 snapshots (window 3, a task evaluated raw and avg) of a model whose last unit's flat
  parameter (33 elements) does not split evenly, so rank 1's shard carries FSDP1's padding. Per step:
  the full weights gathered by torch (``get_model_state_dict``), this rank's flat shards as torch's own
  ``LOCAL_STATE_DICT`` gives them, and the gathers counted outside the task (FSDP1's
  ``FlatParamHandle.unshard`` and ``dist.all_gather_into_tensor``/``all_gather``). ``probe``: the same
  counters around one default ``state_dict()`` (which gathers), so a count of 0 means something.
- ``no_shard``: ``ShardingStrategy.NO_SHARD``, whose state dict clones the weights: the avg
  evaluation must still see the average (the full weights seen inside the task, per evaluation).
- ``resumed``: a second monitor on the same run directory resumed from step 3, two more snapshots.
- ``background``: a run with ``evaluation="background"`` and ``use_orig_params=True`` (alignment
  padding inside the flat parameter), left for a one-process evaluator in the test.
- ``adapters``: the Lightning and Hugging Face callbacks' hooks driven with the inner module, as the
  frameworks hand it, and the FSDP1 root where each framework keeps it (``trainer.strategy.model``,
  ``trainer.model_wrapped``); and both callbacks with an FSDP2 (``fully_shard``) model.
"""

import json
import sys
from collections import Counter
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy, StateDictType
from torch.distributed.fsdp._flat_param import FlatParamHandle
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from checkpoint_stability import FunctionTask, StabilityMonitor

GATHERS: Counter = Counter()
INSIDE_TASKS: Counter = Counter()
_in_task = [False]


def counted(owner, name: str) -> None:
    """Count every call of ``owner.name`` (and separately those made while a task evaluates)."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        (INSIDE_TASKS if _in_task[0] else GATHERS)[name] += 1
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


counted(FlatParamHandle, "unshard")
counted(dist, "all_gather_into_tensor")
counted(dist, "all_gather")


def build(use_orig_params: bool, strategy: ShardingStrategy = ShardingStrategy.FULL_SHARD) -> FSDP:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.BatchNorm1d(10), torch.nn.Linear(10, 3)
    )
    return FSDP(
        model,
        device_id=torch.device("cpu"),
        use_orig_params=use_orig_params,
        auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}),
        sharding_strategy=strategy,
    )


def full_state(model) -> dict:
    """Every state-dict entry gathered by torch (collective), as lists."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.tolist() for k, v in state.items()}


def local_shards(model) -> dict:
    """This rank's flat shards as torch's LOCAL_STATE_DICT gives them (unpadded), as lists."""
    with FSDP.state_dict_type(model, StateDictType.LOCAL_STATE_DICT):
        state = model.state_dict()
    out = {}
    for key, value in state.items():
        if hasattr(value, "local_shards"):
            shards = value.local_shards()
            out[key] = shards[0].tensor.tolist() if shards else []
    return out


def train_step(model, optimizer, x, y) -> None:
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def recording_task(x, y, seen: list[dict]) -> FunctionTask:
    """A task that appends the full weights each evaluation saw to ``seen``; the gathers it makes are
    counted apart (``INSIDE_TASKS``)."""

    def predict(m):
        _in_task[0] = True
        try:
            outputs = m(x).argmax(-1).tolist()  # a collective forward on every rank
            seen.append(full_state(m))
        finally:
            _in_task[0] = False
        return outputs

    return FunctionTask("cls", predict, targets=y.tolist())


def inline(out: str, x, y) -> dict:
    model = build(use_orig_params=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    seen: list[dict] = []
    task = recording_task(x, y, seen)
    monitor = StabilityMonitor([task], dirpath=f"{out}/run", window=3, every_n_steps=1, console=False)
    monitor.open(model=model)
    steps = []
    for step in range(1, 6):
        train_step(model, optimizer, x, y)
        entry = {"state": full_state(model), "local": local_shards(model)}
        GATHERS.clear()
        best_before = monitor.best and dict(monitor.best)
        monitor.on_snapshot(model, step)
        entry["gathers"] = dict(GATHERS)
        entry["exported"] = (
            monitor.best is not None and monitor.best != best_before and (monitor.best["step"] == step)
        )
        entry["restored"] = full_state(model) == entry["state"]
        steps.append(entry)
    GATHERS.clear()
    model.state_dict()  # FSDP1's default state dict: the counters must see its gathers
    probe = dict(GATHERS)
    average = {k: v.tolist() for k, v in monitor.average.mean().items()}
    monitor.close()
    units = sum(1 for m in model.modules() if isinstance(m, FSDP) and m._handle is not None)

    # Resume from step 3 with the same world size: the newer snapshots go, two new ones come.
    resumed = StabilityMonitor([task], dirpath=f"{out}/run", window=3, every_n_steps=1, console=False)
    resumed.open(resume_step=3, model=model)
    after = []
    for step in (4, 5):
        train_step(model, optimizer, x, y)
        after.append({"state": full_state(model), "local": local_shards(model)})
        resumed.on_snapshot(model, step)
    resumed_average = {k: v.tolist() for k, v in resumed.average.mean().items()}
    resumed.close()
    return {
        "steps": steps,
        "probe": probe,
        "units": units,
        "average": average,
        "seen": seen,
        "resumed": {"steps": after, "average": resumed_average},
    }


def no_shard(out: str, x, y) -> dict:
    """``NO_SHARD``: plain data parallelism through FSDP1, whose ``state_dict()`` clones. Window 2, four
    snapshots; the task records the full weights each evaluation saw (raw, then avg, per step)."""
    model = build(use_orig_params=False, strategy=ShardingStrategy.NO_SHARD)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    seen: list[dict] = []
    task = recording_task(x, y, seen)
    monitor = StabilityMonitor([task], dirpath=f"{out}/no-shard", window=2, every_n_steps=1, console=False)
    monitor.open(model=model)
    steps = []
    for step in range(1, 5):
        train_step(model, optimizer, x, y)
        state = full_state(model)
        monitor.on_snapshot(model, step)
        steps.append({"state": state, "restored": full_state(model) == state})
    monitor.close()
    return {"steps": steps, "seen": seen}


def background(out: str, x, y) -> dict:
    model = build(use_orig_params=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    monitor = StabilityMonitor(
        [],
        dirpath=f"{out}/bg",
        window=2,
        every_n_steps=1,
        console=False,
        evaluation="background",
        max_pending=20,
    )
    monitor.open(model=model)
    states = []
    for step in range(1, 4):
        train_step(model, optimizer, x, y)
        states.append(full_state(model))
        monitor.on_snapshot(model, step)
    monitor.close()
    return {"states": states}


class _Lit:
    """A LightningModule holding the model, as FSDPStrategy wraps one (built lazily: lightning import)."""

    @staticmethod
    def make():
        import lightning.pytorch as pl

        class Module(pl.LightningModule):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.net = torch.nn.Sequential(
                    torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)
                )

            def forward(self, x):
                return self.net(x)

        return Module()


def lightning_hooks(out: str, name: str, pl_module, wrapped, x, y) -> dict:
    """Drive the Lightning callback's hooks as Lightning would, with ``wrapped`` as trainer.strategy.model."""
    from checkpoint_stability.callbacks.lightning import StabilityCallback

    callback = StabilityCallback(
        [FunctionTask("cls", lambda m: m(x).argmax(-1).tolist(), targets=y.tolist())],
        dirpath=f"{out}/{name}",
        window=2,
        every_n_steps=1,
        console=False,
    )
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(model=wrapped),
        default_root_dir=out,
        loggers=[],
        is_global_zero=dist.get_rank() == 0,
        progress_bar_callback=None,
        ckpt_path=None,
        global_step=0,
        estimated_stepping_batches=3,
        callbacks=[callback],
    )
    callback.setup(trainer, pl_module, "fit")
    callback.on_fit_start(trainer, pl_module)
    callback.on_train_start(trainer, pl_module)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.2)
    states = []
    for step in (1, 2, 3):
        train_step(wrapped, optimizer, x, y)
        trainer.global_step = step
        states.append(full_state(wrapped))
        callback.on_train_batch_end(trainer, pl_module, None, None, step - 1)
    callback.on_train_end(trainer, pl_module)
    return {"states": states, "records": callback.latest_records}


def transformers_hooks(out: str, name: str, model, wrapped, x, y) -> dict:
    """Drive the Hugging Face callback's hooks as the Trainer would: ``model`` is what its callback
    handler holds, ``wrapped`` its ``model_wrapped``; the callback finds the Trainer on the call stack."""
    from transformers import Trainer

    from checkpoint_stability.callbacks.transformers import StabilityCallback

    callback = StabilityCallback(
        [FunctionTask("cls", lambda m: m(x).argmax(-1).tolist(), targets=y.tolist())],
        dirpath=f"{out}/{name}",
        window=2,
        every_n_steps=1,
        console=False,
    )
    trainer = Trainer.__new__(Trainer)  # only what the callback reads of a running Trainer
    trainer.callback_handler = SimpleNamespace(callbacks=[callback])
    trainer.model_wrapped, trainer.model = wrapped, wrapped
    args = SimpleNamespace(
        output_dir=out, metric_for_best_model=None, report_to=[], per_device_eval_batch_size=8
    )
    state = SimpleNamespace(
        global_step=0, max_steps=3, is_world_process_zero=dist.get_rank() == 0, stateful_callbacks={}
    )
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.2)
    states = []

    def run(self):  # ``self`` is the Trainer, as in the frames the callback walks
        callback.on_train_begin(args, state, None, model=model)
        for step in (1, 2, 3):
            train_step(wrapped, optimizer, x, y)
            state.global_step = step
            states.append(full_state(wrapped))
            callback.on_step_end(args, state, None, model=model)
        callback.on_train_end(args, state, None, model=model)

    run(trainer)
    return {"states": states, "records": callback.latest_records}


def fsdp2(module):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def adapters(out: str, x, y) -> dict:
    policy = ModuleWrapPolicy({torch.nn.Linear})
    results = {}
    # Lightning's FSDPStrategy wraps the LightningModule: pl_module is inside trainer.strategy.model.
    pl_module = _Lit.make()
    root = FSDP(pl_module, device_id=torch.device("cpu"), auto_wrap_policy=policy)
    results["lightning_fsdp1"] = lightning_hooks(out, "lightning_fsdp1", pl_module, root, x, y)
    # ModelParallelStrategy (FSDP2): the LightningModule itself is sharded in place.
    pl_module = fsdp2(_Lit.make())
    results["lightning_fsdp2"] = lightning_hooks(out, "lightning_fsdp2", pl_module, pl_module, x, y)
    # The Hugging Face Trainer (accelerate, fsdp_version 1) wraps the model; callbacks get the inner one.
    inner = _Lit.make().net
    root = FSDP(inner, device_id=torch.device("cpu"), auto_wrap_policy=policy, use_orig_params=True)
    results["transformers_fsdp1"] = transformers_hooks(out, "transformers_fsdp1", inner, root, x, y)
    inner = fsdp2(_Lit.make().net)
    results["transformers_fsdp2"] = transformers_hooks(out, "transformers_fsdp2", inner, inner, x, y)
    # Handed the inner module with no root to be found, the monitor refuses rather than miss weights.
    inner = _Lit.make().net
    root = FSDP(inner, device_id=torch.device("cpu"), auto_wrap_policy=policy)
    optimizer = torch.optim.SGD(root.parameters(), lr=0.2)
    train_step(root, optimizer, x, y)  # lazy initialisation: the root is known from here on
    monitor = StabilityMonitor([], dirpath=f"{out}/rootless", window=2, every_n_steps=1, console=False)
    try:
        monitor.on_snapshot(inner, 1)
        results["rootless"] = None
    except ValueError as error:
        results["rootless"] = f"{type(error).__name__}: {error}"
    return results


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    result = {
        "x": x.tolist(),
        "y": y.tolist(),
        "inline": inline(out, x, y),
        "no_shard": no_shard(out, x, y),
        "background": background(out, x, y),
        "adapters": adapters(out, x, y),
    }
    with open(f"{out}/rank{rank}.json", "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
