"""`with_fsdp` + sharded checkpoints end to end under real torchrun (issue 16): a run saving
every 3 steps mid-epoch, resumed (resume="auto") on 1, 2 and 4 processes, continues the
epoch exactly (every sample once) and numerically (float32 rounding of an uninterrupted
run with the same global batch); a SIGKILL during an async save keeps the previous
checkpoint, which resume="auto" picks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ftrain as ft

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_resume.py"
pytestmark = [pytest.mark.slow,  # real torchrun processes
              pytest.mark.skipif(not torch.distributed.is_available(),
                                 reason="torch.distributed is not available")]


def _launch(out: Path, tag: str, world: int, *args: str, ok: bool = True,
            folder: str | None = None) -> str:
    root = str(Path(ft.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, str(SCRIPT), str(out), tag, str(out / (folder or tag)), *args]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}", *cmd[1:]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    assert (done.returncode == 0) == ok, done.stderr[-3000:]
    return done.stdout + done.stderr


def _seen(out: Path, tag: str, world: int, steps: int | None = None) -> list[int]:
    """The sample ids trained by run `tag` (its first `steps` steps), all ranks."""
    ids = []
    for rank in range(world):
        lines = (out / f"{tag}-rank{rank}.txt").read_text().splitlines()[:steps]
        ids += [int(i) for line in lines for i in line.split()]
    return ids


def _from(out: Path, src: str, tag: str) -> None:
    """A run folder `tag` holding only run `src`'s checkpoint of step 6 (mid-epoch)."""
    (out / tag).mkdir()
    ckpt = out / src / "0-6.ckpt"
    (shutil.copytree if ckpt.is_dir() else shutil.copy)(ckpt, out / tag / "0-6.ckpt")


def _close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def _result(out: Path, tag: str) -> dict:
    return torch.load(out / f"{tag}.pt", weights_only=False)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 2-rank run (synchronous saves), shared by both tests."""
    out = tmp_path_factory.mktemp("fsdp_resume")
    _launch(out, "two", 2, "--sharded-again")
    return out


def test_resume_on_one_two_and_four_processes(two: Path) -> None:
    """2 ranks save sharded folders every 3 steps; from the step-6 folder (48 of 96
    samples done): 2 -> 1 (with_fsdp, and a plain step reading the folder whole), 2 -> 4
    (the last layer's 2 rows leave 2 ranks empty shards); 1 -> 2 from a one-process
    file. Each ends as the uninterrupted run of its epoch's order. The returned sharded
    state, and one loaded into its layout, bind again (each rank keeps its shards). The
    runs on 4 and on 2 build their model on the meta device: each rank reads only its
    shards of the folder (from the one-process file: its chunks)."""
    out = two
    two = _result(out, "two")
    assert two["sharded"] and two["step"] == 12
    assert sorted(p.name for p in (out / "two").iterdir() if p.is_dir()) == \
        ["0-12.ckpt", "0-3.ckpt", "0-6.ckpt", "0-9.ckpt", "last.ckpt"]  # DCP folders
    assert (out / "two" / "0-6.ckpt" / "__1_0.distcp").is_file()  # rank 1's own shards
    _close(two["again"], two["params"])  # bound again for 0 steps: unchanged
    assert two["more_step"] == 24 and not torch.equal(two["more"]["0.weight"],
                                                      two["params"]["0.weight"])
    first = _seen(out, "two", 2, steps=6)
    for tag, world, extra in (("to1", 1, ()), ("plain", 1, ("--plain",)),
                              ("to4", 4, ("--meta",))):
        _from(out, "two", tag)
        log = _launch(out, tag, world, *extra)
        assert f"begun under 2 process(es), on {world}: 48 samples of it are done" in log
        rest = _seen(out, tag, world)
        assert sorted(first + rest) == list(range(96)), tag  # every sample once
        got = _result(out, tag)
        assert got["step"] == 12 and got["loop"]["world"] == world
        _close(got["params"], two["params"])
    assert (out / "to4" / "0-9.ckpt").is_dir() and (out / "to1" / "0-9.ckpt").is_file()
    _launch(out, "one", 1)
    assert (out / "one" / "0-6.ckpt").is_file()  # one process: plain files
    _from(out, "one", "to2")
    log = _launch(out, "to2", 2, "--meta")
    assert "begun under 1 process(es), on 2: 48 samples of it are done" in log
    assert sorted(_seen(out, "one", 1, steps=6) + _seen(out, "to2", 2)) == list(range(96))
    _close(_result(out, "to2")["params"], _result(out, "one")["params"])
    assert (out / "to2" / "0-9.ckpt" / "__1_0.distcp").is_file()


def test_sigkill_during_async_save_resumes_from_the_previous(two: Path) -> None:
    """save_async=True: rank 1 SIGKILLs itself in step 7, the save of step 6 in flight
    (renamed into place only when waited for, at the next save). The folder keeps the
    step-3 checkpoint as last and nothing named for step 6; resume="auto" picks step 3
    and the run ends as the uninterrupted one (the killed run's steps 4-7 redone); the
    resumed run's model is built on the meta device."""
    out = two
    _launch(out, "killed", 2, "--async", "--kill-rank", "1", "--kill-call", "7", ok=False)
    names = sorted(p.name for p in (out / "killed").iterdir())
    assert "0-6.ckpt" not in names and "0-3.ckpt" in names and "last.ckpt" in names
    assert json.loads((out / "killed" / "checkpoints.json").read_text())["last_step"] == 3
    log = _launch(out, "resumed", 2, "--meta", folder="killed")  # resume="auto"
    assert "resuming from" in log and "last.ckpt at step 3" in log
    first = _seen(out, "killed", 2, steps=3)
    assert sorted(first + _seen(out, "resumed", 2)) == list(range(96))
    _close(_result(out, "resumed")["params"], _result(out, "two")["params"])


def test_two_models_predict_evaluate_and_compile_in_a_loop(tmp_path: Path) -> None:
    """A two-model state (AdamW and SGD with momentum: fused kernels on the local shards)
    trains on 2 ranks as on one process; inside the loop ft.predict of 3 and of 1
    batches and ft.evaluate of 1, 3 and 4 batches give one process's numbers: a rank
    with fewer batches runs discarded forwards on the shards (none: on rank 0's first
    batch), no rank gathers the full weights; ft.compile(fallback=False) names
    with_fsdp."""
    _launch(tmp_path, "one", 1, "--extras")
    _launch(tmp_path, "two", 2, "--extras")
    one, two = _result(tmp_path, "one"), _result(tmp_path, "two")
    assert two["sharded"] and not one["sharded"]
    for part in one["params"]:
        _close(two["params"][part], one["params"][part])
    for key in ("pred", "pred1"):
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
    for key in ("eval1", "eval3", "eval4"):
        assert two[key] == pytest.approx(one[key], rel=1e-5)
    assert two["gathered"] == 0  # unequal shares: padded forwards on the shards
    folder = tmp_path / "two-models.ckpt"  # saved sharded on 2 ranks, read on one
    assert (folder / "__1_0.distcp").is_file()
    torch.manual_seed(0)
    like = ft.TrainState.create({"enc": torch.nn.Linear(5, 16), "head": torch.nn.Linear(16, 2)},
                                {"enc": ft.optim.adamw(1e-2), "head": ft.optim.sgd(0.1, 0.9)})
    loaded = ft.load(folder, like=like)
    assert loaded.step == 12
    for part in one["params"]:
        _close(loaded.params[part], two["params"][part])
    assert one["compile"] == "ran"
    assert "with_fsdp across 2 processes" in two["compile"] and "with_ddp" not in \
        two["compile"]
