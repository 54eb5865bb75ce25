"""Sharded checkpoints (DCP folders): save on 2 ranks, load on 1 and 2 (and 1 -> 2),
consolidate and export, a SIGKILL during an async save, and the error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import torchrun_env
from torch import nn

import ftrain as ft
from ftrain.checkpointing import ckptdir, folders, index, sharded

SCRIPT = Path(__file__).parent / "scripts" / "dcp_ckpt.py"




def _torchrun(n: int, mode: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={n}", str(SCRIPT), mode, str(out)],
                          capture_output=True, text=True, timeout=120, env=torchrun_env())


def _state(width: int = 4) -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(nn.Linear(width, 2), ft.optim.adamw(1e-2), seed=1)


@pytest.mark.slow
def test_save_on_two_load_on_one_and_two(tmp_path: Path) -> None:
    """1 -> 2 and 2 -> 2 (in the 2-rank script: resharded into a sharded `like`, exact),
    2 -> 1 without a process group, consolidate + ONNX export; each rank's file holds
    only its half of every sharded tensor; top-k and last.ckpt as folders."""
    one = _torchrun(1, "save", tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(2, "save", tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    report = json.loads(two.stdout.strip().splitlines()[-1])
    assert report["run"] == ["0-2.ckpt", "checkpoints.json", "last.ckpt"]  # 0-1 deleted
    assert report["best"] == "0-2.ckpt"
    assert ckptdir.is_checkpoint_dir(str(tmp_path / "run2" / "last.ckpt"))
    # each rank wrote its own shards: about half of the single-process file each
    whole = os.path.getsize(tmp_path / "w1.ckpt" / "__0_0.distcp")
    for name in ("__0_0.distcp", "__1_0.distcp"):
        assert report["sizes"][name] < 0.62 * whole, (report["sizes"], whole)
    md = sharded._SafeReader(str(tmp_path / "w2.ckpt")).read_metadata()
    chunks = md.state_dict_metadata['["params", "0.weight"]'].chunks  # type: ignore[union-attr]
    assert [list(c.sizes) for c in chunks] == [[64, 128], [64, 128]]
    files = {info.relative_path for idx, info in md.storage_data.items()
             if idx.fqn == '["params", "0.weight"]'}
    assert files == {"__0_0.distcp", "__1_0.distcp"}
    done = subprocess.run([sys.executable, str(SCRIPT), "plain", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=torchrun_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "m.onnx").stat().st_size > 0
    onnxruntime = pytest.importorskip("onnxruntime")
    sess = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    assert sess.run(None, {sess.get_inputs()[0].name: torch.randn(2, 128).numpy()})[0] \
        .shape == (2, 4)


@pytest.mark.slow
def test_sigkill_during_async_save_keeps_the_previous(tmp_path: Path) -> None:
    done = _torchrun(2, "kill", tmp_path)
    assert done.returncode != 0
    assert not (tmp_path / "bad.ckpt").exists()  # never renamed into place
    # rank 0 either removed the unfinished folder itself (its wait failed) or was killed
    # by torchrun first, leaving it under a temporary name, which the clean-up removes
    assert index.latest_valid(str(tmp_path)) == str(tmp_path / "good.ckpt")
    state = ft.load(tmp_path / "good.ckpt", like=_big())
    assert state.step == 2
    folders.remove_stale_temporaries(str(tmp_path))  # its writers are dead: cleaned
    assert sorted(os.listdir(tmp_path)) == ["good.ckpt"]


def _big() -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(nn.Sequential(nn.Linear(128, 128), nn.ReLU(),
                                              nn.Linear(128, 4)), ft.optim.adamw(1e-2))


def test_one_process_folder_round_trip_and_errors(tmp_path: Path) -> None:
    """A folder written on one process (no process group) loads, consolidates; a missing
    metadata file, a foreign folder, a shape mismatch and an unsafe metadata pickle are
    CheckpointErrors naming what was expected and found; a user's folder is never
    replaced or deleted."""
    state = _state()
    path = sharded.save_dir(tmp_path / "a.ckpt", state, {"lr": 0.1})
    assert ft.load(path, like=_state()).seed == 1 and ft.load_hparams(path) == {"lr": 0.1}
    one = ft.consolidate(path, tmp_path / "one.ckpt")
    assert torch.equal(ft.load(one, like=_state()).params["weight"], state.params["weight"])
    with pytest.raises(ft.CheckpointError, match=r"torch.float32\[2, 4\] in the checkpoint, "
                                                 r"torch.float32\[2, 8\] in this state"):
        ft.load(path, like=_state(8))
    # async on one process: lands at wait(), a later save replaces it atomically
    sharded.save_dir(path, state.replace(step=5), async_save=True)
    sharded.wait()
    assert ft.load(path, like=_state()).step == 5
    # truncated: DCP's metadata missing
    os.unlink(os.path.join(path, ckptdir.DCP_META))
    with pytest.raises(ft.CheckpointError, match=r"metadata file '.metadata' is missing"):
        ft.load(path, like=_state())
    # foreign: a folder without ftrain.pt
    foreign = tmp_path / "foreign.ckpt"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ft.CheckpointError, match=r"not an ftrain sharded checkpoint: "
                                                 r"expected a folder with 'ftrain.pt'"):
        ft.load(foreign, like=_state())
    with pytest.raises(ft.CheckpointError, match="not an ftrain checkpoint"):
        sharded.save_dir(foreign, state)
    assert ckptdir.remove(str(foreign)) is False and (foreign / "notes.txt").exists()
    # a .metadata that asks to call something is refused, nothing is called
    bad = sharded.save_dir(tmp_path / "b.ckpt", state)

    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("echo pwned",))

    import pickle

    with open(os.path.join(bad, ckptdir.DCP_META), "wb") as f:
        pickle.dump(Boom(), f)
    with pytest.raises(ft.CheckpointError, match="cannot be read safely"):
        ft.load(bad, like=_state())
    with pytest.raises(ft.CheckpointError, match="expects a sharded checkpoint folder"):
        ft.consolidate(one, tmp_path / "x.ckpt")
