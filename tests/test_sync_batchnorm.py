"""`ft.with_ddp(step, sync_batchnorm=True)`: torch's SyncBatchNorm in the modules a step
runs, the state's names, tensors and template untouched.

On the CPU: the conversion itself (names and tensors kept, the same numbers when nothing
is synced, eval mode), a binding's modules converted in place of its own, checkpoints
loading both ways, one process training as without the option, and the refusal at init
of several CPU processes (real torchrun processes). On a GPU (a test with "cuda" in its
name, skipped without one): two processes on one device train BatchNorm statistics and
parameters as one process on the global batch.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import Net, classify, make_batches
from torch import nn

import ftrain as ft
from ftrain.core.bind import Binding
from ftrain.parallel import syncbn

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).parent / "scripts" / "ddp_syncbn.py"
OFF = {"logger": False, "checkpoint": False, "progress": False}


def script() -> Any:
    """The torchrun worker as a module (its model and data, for the checks here)."""
    spec = importlib.util.spec_from_file_location("ddp_syncbn", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch(tmp_path: Path, mode: str, timeout: int) -> list[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(SCRIPT), str(tmp_path), mode],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4, momentum=None)  # cumulative average: another path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)).relu()


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Block(), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 3))


# -- the conversion ----------------------------------------------------------------------

def test_conversion_keeps_names_tensors_and_numbers():
    net = conv_net()
    reference = copy.deepcopy(net)
    before = net.state_dict(keep_vars=True)
    synced = syncbn.convert(net)
    assert type(synced[0].norm) is nn.SyncBatchNorm and type(synced[1]) is nn.SyncBatchNorm
    after = synced.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(after[k] is v for k, v in before.items())  # the very same tensors
    assert synced[0].norm.momentum is None and synced[1].eps == reference[1].eps
    # no process group: SyncBatchNorm falls back to BatchNorm, bitwise
    x = torch.randn(5, 2, 4, 4)
    for _ in range(2):
        torch.testing.assert_close(synced(x), reference(x), rtol=0, atol=0)
    torch.testing.assert_close(synced.state_dict(), reference.state_dict(), rtol=0, atol=0)
    assert int(synced[1].num_batches_tracked) == 2
    synced.eval()
    reference.eval()
    torch.testing.assert_close(synced(x), reference(x), rtol=0, atol=0)


def test_a_batchnorm_root_is_replaced_and_other_modules_are_left_alone():
    root = nn.BatchNorm1d(3)
    new = syncbn.convert(root)
    assert type(new) is nn.SyncBatchNorm and type(root) is nn.BatchNorm1d
    assert new.running_mean is root.running_mean and new.weight is root.weight
    plain = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.InstanceNorm1d(2))
    assert syncbn.convert(plain) is plain and not syncbn.has_batchnorm(plain)
    assert [type(m) for m in plain] == [nn.Linear, nn.LayerNorm, nn.InstanceNorm1d]


def test_a_bindings_modules_are_converted_and_still_train_the_states_tensors():
    state = ft.TrainState.create(conv_net(), ft.optim.sgd(0.1))
    template = state.model
    binding = Binding(state.copy())
    mine = binding.buffers[None]
    running = mine["1.running_mean"]
    binding.convert_modules(syncbn.convert)
    module = binding.model_arg
    assert module is binding.modules[None] and type(module[1]) is nn.SyncBatchNorm
    assert module[1].running_mean is running  # the state's own tensor, in place
    assert {id(d) for d, _, _, _ in binding.buffer_slots} == {
        id(m._buffers) for m in module.modules() if m._buffers}
    binding.set_mode(False)
    assert not module[1].training and not module[0].norm.training
    binding.set_mode(True)
    module(torch.randn(6, 2, 4, 4) + 3)
    assert not torch.equal(mine["1.running_mean"], state.buffers["1.running_mean"])
    binding.end()
    # the template the state carries is untouched: plain BatchNorm
    assert state.model is template and type(template[1]) is nn.BatchNorm2d
    assert type(template[0].norm) is nn.BatchNorm2d


def test_a_conversion_that_changes_tensors_is_refused():
    binding = Binding(ft.TrainState.create(Net()))

    def renames(module: nn.Module) -> nn.Module:
        return nn.Sequential(module)  # every name gets a "0." prefix
    with pytest.raises(ft.ConfigError, match=r"keep its parameters' tensors under the "
                                             r"same names: expected \['bn.bias'"):
        binding.convert_modules(renames)
    binding.end()


def test_a_direct_call_on_one_process_runs_the_states_template():
    step = ft.with_ddp(ft.train_step(classify), sync_batchnorm=True)
    state = ft.TrainState.create(Net(), ft.optim.sgd(0.1))
    new, _ = step(state, make_batches(1)[0])
    plain, _ = ft.train_step(classify)(state, make_batches(1)[0])
    torch.testing.assert_close(new.buffers, plain.buffers, rtol=0, atol=0)
    assert step.phases.ddp.template_for(state) is state.model  # nothing to sync


# -- runs, checkpoints, options -------------------------------------------------------------

def test_one_process_trains_as_without_the_option_and_keeps_the_state_plain(net):
    state = ft.TrainState.create(net, ft.optim.adam(1e-2), seed=1)
    kept = state.copy()
    data = make_batches(4)
    synced = ft.fit(ft.with_ddp(ft.train_step(classify), sync_batchnorm=True), state, data,
                    epochs=2, donate=False, **OFF)
    plain = ft.fit(ft.train_step(classify), state, data, epochs=2, donate=False, **OFF)
    torch.testing.assert_close(synced.params, plain.params, rtol=0, atol=0)
    torch.testing.assert_close(synced.buffers, plain.buffers, rtol=0, atol=0)
    assert type(synced.model.bn) is nn.BatchNorm1d and synced.model is state.model
    torch.testing.assert_close(state.params, kept.params, rtol=0, atol=0)  # not donated
    torch.testing.assert_close(state.buffers, kept.buffers, rtol=0, atol=0)


def test_checkpoints_of_synced_and_plain_models_load_both_ways(tmp_path):
    plain = ft.fit(ft.train_step(classify), ft.TrainState.create(Net(), ft.optim.sgd(0.1)),
                   make_batches(2), epochs=1, **OFF)
    torch.manual_seed(1)
    converted = ft.TrainState.create(syncbn.convert(Net()), ft.optim.sgd(0.1))
    assert sorted(converted.params) == sorted(plain.params)
    assert sorted(converted.buffers) == sorted(plain.buffers)
    ft.save(tmp_path / "plain.ckpt", plain)
    into_synced = ft.load(tmp_path / "plain.ckpt", like=converted)
    torch.testing.assert_close(into_synced.params, plain.params, rtol=0, atol=0)
    torch.testing.assert_close(into_synced.buffers, plain.buffers, rtol=0, atol=0)
    ft.save(tmp_path / "synced.ckpt", into_synced)
    back = ft.load(tmp_path / "synced.ckpt",
                   like=ft.TrainState.create(Net(), ft.optim.sgd(0.1)))
    torch.testing.assert_close(back.params, plain.params, rtol=0, atol=0)
    torch.testing.assert_close(back.buffers, plain.buffers, rtol=0, atol=0)
    assert back.step == plain.step == 2


def test_a_bad_option_names_what_was_expected():
    with pytest.raises(ft.ConfigError, match="sync_batchnorm must be True or False, got "
                                             "'yes'"):
        ft.with_ddp(ft.train_step(classify), sync_batchnorm="yes")  # type: ignore[arg-type]
    step = ft.with_ddp(ft.train_step(classify), sync_batchnorm=True)
    assert "sync_batchnorm=True" in repr(step.phases.ddp)
    with pytest.raises(ft.ConfigError, match="needs the model on a CUDA device .*found cpu"):
        syncbn.check_device(torch.device("cpu"), 4)
    syncbn.check_device(torch.device("cuda"), 4)  # accepted: nothing is allocated


@pytest.mark.slow
def test_several_cpu_processes_are_refused_at_init_before_joining(tmp_path):
    for r, result in enumerate(launch(tmp_path, "cpu", timeout=180)):
        for key in ("error", "pure_error"):  # a loop's init, and a direct call
            assert result[key] is not None, (r, key)
            assert "with_ddp(sync_batchnorm=True) on 2 processes needs the model on a CUDA " \
                   "device" in result[key] and "found cpu" in result[key], (r, result[key])
        assert not result["joined_before_error"]  # refused before any collective
        assert result["unchanged"] and result["template"] == "BatchNorm1d"
        assert result["plain_steps"] == 2  # the same run without the option trains


# -- on a GPU -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sync_batchnorm_trains_as_one_process_on_the_global_batch(tmp_path):
    r0, r1 = launch(tmp_path, "cuda", timeout=300)
    for r, result in enumerate((r0, r1)):
        alone, own = result["alone"], result["own"]
        assert result["bound"] == "SyncBatchNorm", r  # the loop ran converted modules
        assert result["template"] == result["input_template"] == "BatchNorm1d", r
        assert result["input_unchanged"] and result["eval_equal"], r
        for how in ("loop", "pure", "manual"):  # DDP + SyncBatchNorm, direct, manual
            got = result[how]
            for name in ("1.running_mean", "1.running_var"):
                torch.testing.assert_close(got["buffers"][name], alone["buffers"][name],
                                           rtol=1e-4, atol=1e-5, msg=f"rank {r} {how} {name}")
            assert int(got["buffers"]["1.num_batches_tracked"]) == 1
            torch.testing.assert_close(got["params"], alone["params"], rtol=1e-4, atol=1e-5,
                                       msg=f"rank {r} {how} params")
        # without the option each rank keeps its own batch's statistics, which differ
        unsynced = result["unsynced"]["buffers"]["1.running_mean"]
        torch.testing.assert_close(unsynced, own["buffers"]["1.running_mean"],
                                   rtol=1e-4, atol=1e-5)
        assert not torch.allclose(unsynced, alone["buffers"]["1.running_mean"], atol=1e-2)
    torch.testing.assert_close(r0["loop"], r1["loop"], rtol=0, atol=0)
    # the synced run's checkpoint is a plain model's: it loads into a plain CPU state
    plain = ft.TrainState.create(script().build(), ft.optim.sgd(0.1))
    loaded = ft.load(tmp_path / "synced.ckpt", like=plain)
    torch.testing.assert_close({k: v.cpu() for k, v in loaded.params.items()},
                               r0["loop"]["params"], rtol=0, atol=0)
    torch.testing.assert_close({k: v.cpu() for k, v in loaded.buffers.items()},
                               r0["loop"]["buffers"], rtol=0, atol=0)
