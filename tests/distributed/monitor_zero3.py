"""Run by tests/test_zero3.py under torchrun with two CPU processes (gloo): DeepSpeed ZeRO stage 3
(``DS_ACCELERATOR=cpu``) through the real ``StabilityMonitor``.

Every rank writes rank<R>.json with what tests/test_zero3.py checks against oracles of DeepSpeed's own:

- ``inline``: 5 snapshots (window 3, a task evaluated raw and avg) of a ``DeepSpeedEngine`` handed to the
  monitor. The model mixes what ZeRO-3 does to parameters: partitioned ones whose size splits evenly
  (``0.weight``, 42) or not (``3.weight``, 21: rank 1 holds 10 elements and one of padding), persistent
  ones (``stage3_param_persistence_threshold`` 7: the biases and the BatchNorm's affine parameters,
  gathered whole after every step and still partitioned), and BatchNorm buffers, never partitioned.
  Per step: the full weights gathered by DeepSpeed (``GatheredParameters``), this rank's partitions
  (``ds_tensor``, padding included), and the collectives counted outside the task: every call through
  DeepSpeed's communication backend (``deepspeed.comm.torch.TorchBackend``: the parameter gathers go
  there) and ``torch.distributed``'s all-gathers. ``probe``: the same counters around one forward pass
  (which gathers), so a count of 0 means something. ``seen``: the weights each evaluation's forward pass
  computed with (the gathered parameters, read inside the task). ``after``: a forward pass after each
  snapshot against one computed in plain torch from the gathered weights (the live weights are what
  training sees next, not a cached averaged copy).
- ``resumed``: a second monitor on the same run directory resumed from step 3, two more snapshots.
- ``background``: ``evaluation="background"`` snapshots left for a one-process evaluator in the test.
- ``adapters``: the Lightning and Hugging Face callbacks' hooks driven with the modules those frameworks
  hand callbacks under DeepSpeed (Lightning's ``DeepSpeedStrategy`` and the Trainer's DeepSpeed
  integration need a GPU or refuse a CPU here): Lightning's LightningModule inside the engine's wrapper,
  the Trainer's ``model`` (the engine's ``.module``) beside ``model_wrapped`` (the engine).
"""

import json
import os
import sys
from collections import Counter
from types import SimpleNamespace

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: no CUDA here

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.comm.torch import TorchBackend

from checkpoint_stability import FunctionTask, StabilityMonitor

COUNTS: Counter = Counter()
INSIDE_TASKS: Counter = Counter()
_in_task = [False]
BACKEND_CALLS = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_base",
    "all_gather_coalesced",
    "all_reduce",
    "all_reduce_coalesced",
    "broadcast",
    "reduce_scatter_tensor",
)


def counted(owner, name: str, label: str) -> None:
    """Count every call of ``owner.name`` (separately those made while a task evaluates)."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        (INSIDE_TASKS if _in_task[0] else COUNTS)[label] += 1
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


# Before deepspeed.init_distributed: DeepSpeed's backend binds torch's all_gather_into_tensor then.
for _name in BACKEND_CALLS:
    counted(TorchBackend, _name, f"deepspeed.{_name}")
counted(dist, "all_gather_into_tensor", "torch.all_gather_into_tensor")
counted(dist, "all_gather", "torch.all_gather")

WINDOW = 3


def ds_config(micro_batch: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "SGD", "params": {"lr": 0.2}},
        "zero_allow_untested_optimizer": True,  # a torch optimizer under ZeRO-3
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 7},
        "steps_per_print": 10**9,
    }


def build():
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 3)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config(16)
    )
    return engine


def full_state(module) -> dict:
    """Every state-dict entry, parameters gathered by DeepSpeed (collective), as lists."""
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        gathered = {name: p.detach().clone() for name, p in params.items()}
    out = {}
    for name, value in module.state_dict(keep_vars=True).items():
        out[name] = (gathered[name] if name in gathered else value.detach()).tolist()
    return out


def partitions(module) -> dict:
    """This rank's partitions as DeepSpeed holds them (padding included), as lists."""
    return {name: p.ds_tensor.tolist() for name, p in module.named_parameters()}


def forward_of(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The model in plain torch (BatchNorm in eval mode) from full weights."""
    w = {k: torch.tensor(v, dtype=torch.float64) for k, v in state.items()}
    h = torch.tanh(x.double() @ w["0.weight"].T + w["0.bias"])
    h = (h - w["2.running_mean"]) / torch.sqrt(w["2.running_var"] + 1e-5) * w["2.weight"] + w["2.bias"]
    return h @ w["3.weight"].T + w["3.bias"]


def train_step(engine, x, y) -> None:
    engine.train()
    loss = F.cross_entropy(engine(x), y)
    engine.backward(loss)
    engine.step()


def inline(out: str, x, y) -> dict:
    engine = build()
    module = engine.module
    seen: list[dict] = []

    def predict(m):
        _in_task[0] = True
        try:
            outputs = m(x).argmax(-1).tolist()  # a collective forward on every rank
            # ZeRO-3 keeps what the forward gathered: the weights it computed with.
            seen.append(
                {
                    name: p.data.tolist()
                    for name, p in module.named_parameters()
                    if p.ds_status.name == "AVAILABLE"
                }
            )
        finally:
            _in_task[0] = False
        return outputs

    task = FunctionTask("cls", predict, targets=y.tolist())
    monitor = StabilityMonitor([task], dirpath=f"{out}/run", window=WINDOW, every_n_steps=1, console=False)
    monitor.open(model=engine)
    steps = []
    for step in range(1, 6):
        train_step(engine, x, y)
        entry = {"state": full_state(module), "local": partitions(module)}
        COUNTS.clear()
        best_before = monitor.best and dict(monitor.best)
        monitor.on_snapshot(engine, step)
        entry["collectives"] = dict(COUNTS)
        entry["exported"] = (
            monitor.best is not None and monitor.best != best_before and monitor.best["step"] == step
        )
        entry["restored_local"] = partitions(module) == entry["local"]
        entry["restored"] = full_state(module) == entry["state"]
        # What training computes with next: the live weights, gathered afresh.
        engine.eval()
        with torch.no_grad():
            got = engine(x).double()
        entry["after"] = (got - forward_of(entry["state"], x)).abs().max().item()
        steps.append(entry)
    engine.empty_partition_cache()  # DeepSpeed's own release of what the last forward left gathered
    COUNTS.clear()
    engine.eval()
    with torch.no_grad():
        engine(x)  # a forward pass gathers: the counters must see it
    probe = dict(COUNTS)
    average = {k: v.tolist() for k, v in monitor.average.mean().items()}
    monitor.close()

    # Resume from step 3 with the same world size: the newer snapshots go, two new ones come.
    resumed = StabilityMonitor([task], dirpath=f"{out}/run", window=WINDOW, every_n_steps=1, console=False)
    resumed.open(resume_step=3, model=engine)
    after = []
    for step in (4, 5):
        train_step(engine, x, y)
        after.append({"state": full_state(module), "local": partitions(module)})
        resumed.on_snapshot(engine, step)
    resumed_average = {k: v.tolist() for k, v in resumed.average.mean().items()}
    resumed.close()
    return {
        "steps": steps,
        "probe": probe,
        "partitioned": sum(1 for p in module.parameters() if hasattr(p, "ds_id")),
        "average": average,
        "seen": seen,
        "resumed": {"steps": after, "average": resumed_average},
    }


def background(out: str, x, y) -> dict:
    engine = build()
    monitor = StabilityMonitor(
        [],
        dirpath=f"{out}/bg",
        window=2,
        every_n_steps=1,
        console=False,
        evaluation="background",
        max_pending=20,
    )
    monitor.open(model=engine)
    states = []
    for step in range(1, 4):
        train_step(engine, x, y)
        states.append(full_state(engine.module))
        monitor.on_snapshot(engine, step)
    monitor.close()
    return {"states": states}


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))


def lightning_hooks(out: str, x, y) -> dict:
    """Lightning's DeepSpeedStrategy: ``deepspeed.initialize`` on a wrapper holding the LightningModule
    (``_LightningModuleWrapperBase``, its ``_forward_module``), ``trainer.strategy.model`` the engine; the
    callback's hooks get the LightningModule, whose parameters are the partitioned ones."""
    import lightning.pytorch as pl

    from checkpoint_stability.callbacks.lightning import StabilityCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x)

    class Wrapper(torch.nn.Module):
        def __init__(self, forward_module):
            super().__init__()
            self._forward_module = forward_module

        def forward(self, x):
            return self._forward_module(x)

    pl_module = Module()
    wrapper = Wrapper(pl_module)
    engine, _, _, _ = deepspeed.initialize(
        model=wrapper, model_parameters=wrapper.parameters(), config=ds_config(16)
    )
    callback = StabilityCallback(
        [FunctionTask("cls", lambda m: m(x).argmax(-1).tolist(), targets=y.tolist())],
        dirpath=f"{out}/lightning_zero3",
        window=2,
        every_n_steps=1,
        console=False,
    )
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(model=engine),
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
    states = []
    for step in (1, 2, 3):
        train_step(engine, x, y)
        trainer.global_step = step
        states.append(full_state(pl_module))
        callback.on_train_batch_end(trainer, pl_module, None, None, step - 1)
    callback.on_train_end(trainer, pl_module)
    return {"states": states, "records": callback.latest_records}


def transformers_hooks(out: str, x, y) -> dict:
    """The Trainer's DeepSpeed integration: ``model_wrapped`` is the engine, ``model`` (what callbacks
    get) its ``.module``; the callback finds the Trainer on the call stack."""
    from transformers import Trainer

    from checkpoint_stability.callbacks.transformers import StabilityCallback

    inner = mlp()
    engine, _, _, _ = deepspeed.initialize(
        model=inner, model_parameters=inner.parameters(), config=ds_config(16)
    )
    callback = StabilityCallback(
        [FunctionTask("cls", lambda m: m(x).argmax(-1).tolist(), targets=y.tolist())],
        dirpath=f"{out}/transformers_zero3",
        window=2,
        every_n_steps=1,
        console=False,
    )
    trainer = Trainer.__new__(Trainer)  # only what the callback reads of a running Trainer
    trainer.callback_handler = SimpleNamespace(callbacks=[callback])
    trainer.model_wrapped, trainer.model = engine, inner
    args = SimpleNamespace(
        output_dir=out, metric_for_best_model=None, report_to=[], per_device_eval_batch_size=8
    )
    state = SimpleNamespace(
        global_step=0, max_steps=3, is_world_process_zero=dist.get_rank() == 0, stateful_callbacks={}
    )
    states = []

    def run(self):  # ``self`` is the Trainer, as in the frames the callback walks
        callback.on_train_begin(args, state, None, model=inner)
        for step in (1, 2, 3):
            train_step(engine, x, y)
            state.global_step = step
            states.append(full_state(inner))
            callback.on_step_end(args, state, None, model=inner)
        callback.on_train_end(args, state, None, model=inner)

    run(trainer)
    return {"states": states, "records": callback.latest_records}


def refusals(out: str) -> dict:
    """A set-up that cannot be snapshotted is refused at open, naming what to change: hpZ's secondary
    partitions, marked on a real engine's parameter as deepspeed's ``_partition_param_sec`` leaves them."""
    engine = build()
    param = engine.module[0].weight
    param.ds_secondary_tensor = param.ds_tensor.clone()
    monitor = StabilityMonitor([], dirpath=f"{out}/refused", window=2, every_n_steps=1, console=False)
    try:
        monitor.open(model=engine)
        return {"hpz": None}
    except ValueError as error:
        return {"hpz": f"{type(error).__name__}: {error}"}
    finally:
        param.ds_secondary_tensor = None


def main(out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    result = {
        "x": x.tolist(),
        "y": y.tolist(),
        "inline": inline(out, x, y),
        "background": background(out, x, y),
        "adapters": {
            "lightning_zero3": lightning_hooks(out, x, y),
            "transformers_zero3": transformers_hooks(out, x, y),
        },
        "refusals": refusals(out),
    }
    with open(f"{out}/rank{rank}.json", "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
