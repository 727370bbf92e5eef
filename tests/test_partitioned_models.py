"""DeepSpeed ZeRO-3 set-ups that cannot be snapshotted are refused at train start; supported ones are read
partition by partition, and empty partitioned tensors are never snapshotted.

DeepSpeed is not a dependency of these tests (tests/test_zero3.py runs the real thing). The partitioned
model is a plain module whose parameters carry what ``deepspeed.runtime.zero.partition_parameters.Init.
_convert_to_deepspeed_param`` and a partitioning step leave on them (read in deepspeed 0.19.8, and
observed on CPU with ``DS_ACCELERATOR=cpu``, gloo, two ranks and ``stage3_param_persistence_threshold=0``):
``data`` an empty tensor, ``ds_id`` an int, ``ds_status`` ``ZeroParamStatus.NOT_AVAILABLE`` (an Enum, value
2), ``ds_numel`` and ``ds_shape`` the full size and shape, ``ds_tensor`` this rank's flat piece (padded
to ``ceil(numel / world)``), ``ds_persist`` False. ZeRO stages 1 and 2 leave no such attributes (observed
the same way) and keep full parameters: a plain module.
"""

from __future__ import annotations

import copy
import enum
from types import SimpleNamespace

import pytest
import torch

from checkpoint_stability import FunctionTask, StabilityMonitor
from checkpoint_stability.partitioned_models import (
    PartitionedModelError,
    is_zero3_engine,
    refuse_empty_partitions,
    refuse_partitioned,
)
from checkpoint_stability.state_dicts import assemble_shards, is_sharded, live_tensors, shard_layout


class ZeroParamStatus(enum.Enum):
    """deepspeed.runtime.zero.partition_parameters.ZeroParamStatus, as defined there."""

    AVAILABLE = 1
    NOT_AVAILABLE = 2
    INFLIGHT = 3


def zero3_partitioned(model: torch.nn.Module, rank: int = 0, world: int = 2) -> torch.nn.Module:
    """``model`` with its parameters partitioned the way ZeRO-3 leaves them between forward passes (the
    padding of a partition that runs past the parameter holds NaN: deepspeed never writes it)."""
    for index, param in enumerate(model.parameters()):
        full = param.data.reshape(-1)
        piece = -(-full.numel() // world)
        param.ds_id = index
        param.ds_shape = param.shape
        param.ds_numel = param.numel()
        param.ds_tensor = torch.full((piece,), float("nan"), dtype=param.dtype)
        mine = full[rank * piece : (rank + 1) * piece]
        param.ds_tensor[: mine.numel()] = mine
        param.ds_persist = False
        param.ds_status = ZeroParamStatus.NOT_AVAILABLE
        param.data = torch.empty(0, dtype=param.dtype)
    return model


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


def task() -> FunctionTask:
    x = torch.randn(8, 4)
    return FunctionTask("cls", lambda m: m(x).argmax(-1).tolist(), targets=[0] * 8)


def offloaded_to_nvme(model: torch.nn.Module) -> torch.nn.Module:
    """A partitioned ``model`` whose first parameter deepspeed offloaded to NVMe (``final_location``)."""
    first = next(iter(model.parameters()))
    first.ds_tensor.final_location = NVME
    return model


class OffloadDeviceEnum(str, enum.Enum):
    """deepspeed.runtime.zero.offload_config.OffloadDeviceEnum, as defined there."""

    none = "none"
    cpu = "cpu"
    nvme = "nvme"


NVME = OffloadDeviceEnum.nvme


def test_a_supported_zero3_model_is_read_partition_by_partition_without_padding():
    """One process (no process group, so every piece is read as rank 0's): the live tensors are views of
    each ``ds_tensor``, and the layout puts two ranks' pieces back together into the parameters."""
    plain = mlp()
    full = {name: p.detach().clone() for name, p in plain.named_parameters()}
    rank1 = zero3_partitioned(copy.deepcopy(plain), rank=1)
    model = zero3_partitioned(plain)
    refuse_partitioned(model)  # supported: nothing raised
    assert is_sharded(model)
    live = live_tensors(model)
    for name, param in model.named_parameters():
        assert live[name].data_ptr() == param.ds_tensor.data_ptr()
        assert live[name].numel() == min(param.ds_tensor.numel(), param.ds_numel)
    layout = shard_layout(model)
    assert layout["tensors"]["0.weight"] == {
        "shape": [24],
        "dim": 0,
        "flat": [["0.weight", [6, 4], 0]],
        "tied": {},
    }
    # Rank 1's valid elements: what is left of the parameter after rank 0's piece (no NaN padding).
    second = {name: p.ds_tensor[: p.ds_numel - p.ds_tensor.numel()] for name, p in rank1.named_parameters()}
    whole = assemble_shards([live, second], layout)
    assert sorted(whole) == sorted(full)
    assert all(torch.equal(whole[name], full[name]) for name in full)


@pytest.mark.parametrize(
    ("mark", "match"),
    [
        (lambda p: setattr(p.ds_tensor, "final_location", NVME), "offloaded to NVMe"),
        (lambda p: setattr(p, "ds_secondary_tensor", p.ds_tensor.clone()), "hpZ"),
        (lambda p: setattr(p, "ds_secondary_tensor_num_of_groups", 2), "zero_hpz_partition_size"),
        (lambda p: setattr(p, "ds_tensor", p.ds_tensor.to(torch.int8)), "quantized"),
        (lambda p: setattr(p, "ds_tensor", None), "no partition"),
    ],
    ids=["nvme", "hpz-secondary", "hpz-groups", "quantized", "no-partition"],
)
def test_zero3_set_ups_that_cannot_be_snapshotted_are_refused_when_the_monitor_opens(tmp_path, mark, match):
    model = zero3_partitioned(mlp())
    mark(next(iter(model.parameters())))
    monitor = StabilityMonitor([task()], dirpath=tmp_path / "run", console=False)
    with pytest.raises(PartitionedModelError, match=match) as caught:
        monitor.open(model=model)
    message = str(caught.value)
    assert "'0.weight'" in message
    for instead in ("fully_shard", "FullyShardedDataParallel", "ZeRO stage 1 or 2", "DDP"):
        assert instead in message
    assert not (tmp_path / "run" / "buffer").exists()


@pytest.mark.parametrize("on_error", ["warn", "raise"])
def test_an_unsupported_zero3_model_is_refused_at_its_first_snapshot_whatever_on_error_says(
    tmp_path, on_error
):
    model = offloaded_to_nvme(zero3_partitioned(mlp()))
    monitor = StabilityMonitor([task()], dirpath=tmp_path / "run", console=False, on_error=on_error)
    with pytest.raises(PartitionedModelError, match="NVMe"):
        monitor.on_snapshot(model, 1)
    assert not list((tmp_path / "run").glob("buffer/**/*.safetensors"))


def test_empty_partitioned_tensors_are_never_snapshotted():
    """Partitioned parameters are read from ``ds_tensor``; any other path that meets their empty
    ``data`` refuses rather than store nothing."""
    model = zero3_partitioned(mlp())
    assert all(t.numel() == 0 for t in model.state_dict().values())  # what state_dict() would store
    assert all(t.numel() > 0 for t in live_tensors(model).values())
    with pytest.raises(PartitionedModelError, match="ds_numel"):
        refuse_empty_partitions(model, {name: torch.empty(0) for name, _ in model.named_parameters()})
    # A genuinely empty tensor of a plain module is not mistaken for a partition.
    plain = torch.nn.Linear(2, 3)
    plain.register_buffer("unused", torch.empty(0))
    assert list(live_tensors(plain)) == ["weight", "bias", "unused"]


def test_zero_stage_1_and_2_modules_and_other_stages_of_the_engine_pass(tmp_path):
    """ZeRO-1/2 partition optimizer state and gradients only: the module is whole on every rank."""
    model = mlp()
    refuse_partitioned(model)  # no ds_* attributes, full data

    class DeepSpeedEngine(torch.nn.Module):  # the name DeepSpeed's engine has; not imported
        def __init__(self, module: torch.nn.Module, stage: int):
            super().__init__()
            self.module, self.stage = module, stage

        def zero_optimization_stage(self) -> int:
            return self.stage

    assert not is_zero3_engine(DeepSpeedEngine(model, 2))
    refuse_partitioned(DeepSpeedEngine(model, 2))
    assert is_zero3_engine(DeepSpeedEngine(model, 3))
    # A stage 3 engine whose module carries no partitions yet cannot be read; one that does can.
    with pytest.raises(PartitionedModelError, match="carry no partition"):
        refuse_partitioned(DeepSpeedEngine(mlp(), 3))
    refuse_partitioned(DeepSpeedEngine(zero3_partitioned(mlp()), 3))
    with StabilityMonitor([task()], dirpath=tmp_path / "run", window=2, console=False) as monitor:
        assert monitor.on_snapshot(model, 1)


def test_the_lightning_callback_refuses_unsupported_zero3_when_training_starts(tmp_path):
    pytest.importorskip("lightning")
    import lightning.pytorch as pl

    from checkpoint_stability.callbacks.lightning import StabilityCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = offloaded_to_nvme(zero3_partitioned(mlp()))

    pl_module = Module()
    callback = StabilityCallback([task()], dirpath=tmp_path / "run", every_n_steps=5, console=False)
    # What the callback reads of a Trainer under DeepSpeedStrategy(stage=3) (which needs a GPU here).
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(model=pl_module),
        default_root_dir=str(tmp_path),
        loggers=[],
        is_global_zero=True,
        progress_bar_callback=None,
        ckpt_path=None,
        global_step=0,
        estimated_stepping_batches=10,
        callbacks=[callback],
    )
    callback.on_fit_start(trainer, pl_module)
    with pytest.raises(PartitionedModelError, match="NVMe"):
        callback.on_train_start(trainer, pl_module)


def test_the_transformers_callback_refuses_unsupported_zero3_at_train_begin(tmp_path):
    pytest.importorskip("transformers")
    from checkpoint_stability.callbacks.transformers import StabilityCallback

    callback = StabilityCallback([task()], dirpath=tmp_path / "run", every_n_steps=5, console=False)
    args = SimpleNamespace(output_dir=str(tmp_path), metric_for_best_model=None, report_to=[])
    state = SimpleNamespace(global_step=0, max_steps=10, is_world_process_zero=True, stateful_callbacks={})
    with pytest.raises(PartitionedModelError, match="NVMe"):
        callback.on_train_begin(args, state, None, model=offloaded_to_nvme(zero3_partitioned(mlp())))
