"""A checkpoint folder belongs to one run: bookkeeping read from files never deletes
anything outside it or anything it did not write, concurrent runs never share files, and
resume="auto" neither continues another run nor starts fresh over unreadable files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import Net, classify, make_batches

import ftrain as ft
from ftrain.checkpointing import folders as _folders
from ftrain.checkpointing.manager import latest_valid

QUIET = {"logger": False, "progress": False}


def fresh(seed: int = 0) -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(Net(), ft.optim.adam(1e-2), seed=seed)


def crafted(path, slot) -> str:
    """A plain-data checkpoint (weights_only accepts it) whose checkpointing slot is
    `slot`: what an attacker, or a copied file, can hand to a run."""
    state = fresh()
    saved = ft.save(path, state.replace(slots={"checkpointing": slot}))
    assert torch.load(saved, weights_only=True)["slots"]["checkpointing"] == slot
    return saved


def victim(tmp_path, name="victim.ckpt"):
    target = tmp_path / "elsewhere" / name
    target.parent.mkdir(exist_ok=True)
    target.write_text("precious")
    return target


# -- 1: bookkeeping from a file never deletes ---------------------------------------------

@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_a_crafted_slot_naming_an_outside_file_is_refused_and_deletes_nothing(tmp_path, how):
    target = victim(tmp_path)
    name = str(target) if how == "absolute" else "../elsewhere/victim.ckpt"
    slot = {"saved": [{"file": name, "score": None, "step": 0, "epoch": 0}], "best": None,
            "best_score": None, "last": None, "last_step": None, "monitor": None,
            "mode": "min"}
    path = crafted(tmp_path / "evil.ckpt", slot)
    step = ft.with_checkpointing(ft.train_step(classify), tmp_path / "ckpt")
    with pytest.raises(ft.CheckpointError, match=r"saved\[0\]\.file must be a bare"):
        ft.fit(step, fresh(), make_batches(2), epochs=2, resume=path, **QUIET)
    loaded = ft.load(path, like=fresh())  # the fine-tuning path: load, then fit
    with pytest.raises(ft.CheckpointError, match="bare"):
        ft.fit(step, loaded, make_batches(2), epochs=2, **QUIET)
    assert target.read_text() == "precious"


def test_bookkeeping_from_another_folder_is_not_trusted_to_delete(tmp_path, caplog):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    mine = folder / "keep.ckpt"  # a bare name, in the very folder the run writes to
    mine.write_text("not this run's")
    slot = {"saved": [{"file": "keep.ckpt", "score": None, "step": 0, "epoch": 0}],
            "best": "keep.ckpt", "best_score": None, "last": "last.ckpt", "last_step": 0,
            "monitor": None, "mode": "min", "dir": str(tmp_path / "other"),
            "run": "0" * 32}
    loaded = ft.load(crafted(tmp_path / "other.ckpt", slot), like=fresh())
    step = ft.with_checkpointing(ft.train_step(classify), folder, save_top_k=1)
    with caplog.at_level("WARNING", logger="ftrain"):
        final = ft.fit(step, loaded, make_batches(2), epochs=3, **QUIET)
    assert mine.read_text() == "not this run's"
    assert "none of the files it names will be deleted" in caplog.text
    assert [e["file"] for e in final.slots["checkpointing"]["saved"]] == ["2-6.ckpt"]
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["2-6.ckpt", "keep.ckpt",
                                                             "last.ckpt"]


def test_a_resumed_run_still_prunes_its_own_top_k(tmp_path):
    step = ft.with_checkpointing(ft.train_step(classify), tmp_path, save_top_k=1)
    ft.fit(step, fresh(), make_batches(2), epochs=2, **QUIET)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["1-4.ckpt", "last.ckpt"]
    ft.fit(step, fresh(), make_batches(2), epochs=4, resume="auto", **QUIET)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["3-8.ckpt", "last.ckpt"]


def test_index_names_outside_the_folder_are_refused(tmp_path):
    step = ft.with_checkpointing(ft.train_step(classify), tmp_path)
    ft.fit(step, fresh(), make_batches(2), epochs=1, **QUIET)
    index = json.loads((tmp_path / "checkpoints.json").read_text())
    outside = victim(tmp_path, "last.ckpt")
    ft.save(outside, fresh().replace(step=99))
    index["last"] = "../elsewhere/last.ckpt"
    (tmp_path / "checkpoints.json").write_text(json.dumps(index))
    with pytest.raises(ft.CheckpointError, match="last must be a bare"):
        ft.checkpoints(tmp_path)
    picked = latest_valid(str(tmp_path))  # falls back to the folder's own files
    assert os.path.dirname(picked) == str(tmp_path) and torch.load(
        picked, weights_only=True)["step"] == 2


@pytest.mark.parametrize("bad, field", [
    ({"saved": "x"}, "saved must be a list"),
    ({"saved": [{"file": "a.ckpt", "score": None, "step": -1, "epoch": 0}]}, "step must be"),
    ({"saved": [{"file": "a.ckpt", "score": "high", "step": 1, "epoch": 0}]}, "score must be"),
    ({"mode": "sideways"}, "mode must be"),
    ({"last": "other.ckpt"}, "last must be"),
    ({"run": "../.."}, "run must be"),
])
def test_a_checkpointing_slot_of_the_wrong_shape_is_a_checkpoint_error(tmp_path, bad, field):
    path = crafted(tmp_path / "bad.ckpt", bad)
    step = ft.with_checkpointing(ft.train_step(classify), tmp_path / "ckpt")
    with pytest.raises(ft.CheckpointError, match=field):
        ft.fit(step, fresh(), make_batches(2), epochs=1, resume=path, **QUIET)


# -- 3: runs never share a folder --------------------------------------------------------

def test_each_run_gets_its_own_folder_under_the_root(tmp_path):
    for seed in (0, 1):
        ft.fit(ft.train_step(classify), fresh(seed), make_batches(2), epochs=1,
               root_dir=str(tmp_path), **QUIET)
    runs = tmp_path / "checkpoints"
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]
    for run, seed in (("version_0", 0), ("version_1", 1)):
        assert torch.load(runs / run / "last.ckpt", weights_only=True)["seed"] == seed
    assert ft.checkpoints(runs).dirpath == str(runs / "version_1")  # the newest run


def _hold_lock(folder) -> subprocess.Popen[str]:
    code = ("import sys, time; from ftrain.checkpointing.folders import FolderLock; "
            "lock = FolderLock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_gets_an_error_naming_the_holder_and_its_temporaries_survive(
        tmp_path):
    folder = tmp_path / "ckpt"
    holder = _hold_lock(folder)
    try:
        live_tmp = folder / f".tmp-{_folders._host()}-{holder.pid}-abc.tmp"
        live_tmp.write_bytes(b"half a save")
        step = ft.with_checkpointing(ft.train_step(classify), folder)
        with pytest.raises(ft.CheckpointError, match=rf"in use by another run \(pid "
                                                     rf"{holder.pid} on "):
            ft.fit(step, fresh(), make_batches(2), epochs=1, **QUIET)
        assert live_tmp.read_bytes() == b"half a save"
    finally:
        holder.kill()
        holder.wait()
    # the holder died (the kernel dropped its lock): the folder is free, and the dead
    # writer's temporary is cleaned up; another host's is not ours to judge
    other_host = folder / ".tmp-otherhost-1-abc.tmp"
    other_host.write_bytes(b"x")
    ft.fit(step, fresh(), make_batches(2), epochs=1, **QUIET)
    assert not live_tmp.exists() and other_host.exists()
    assert (folder / "last.ckpt").exists()


@pytest.mark.slow
def test_concurrent_runs_in_one_root_write_apart(tmp_path):
    script = ("import sys, torch, ftrain as ft\n"
              "torch.manual_seed(0)\n"
              "s = ft.TrainState.create(torch.nn.Linear(4, 1), ft.optim.sgd(0.1),"
              " seed=int(sys.argv[2]))\n"
              "data = [torch.randn(8, 4) for _ in range(4)]\n"
              "step = ft.train_step(lambda m, b: m(b).pow(2).mean())\n"
              "ft.fit(step, s, data, epochs=30, root_dir=sys.argv[1], logger=False,"
              " progress=False)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(seed)])
             for seed in (10, 11, 12)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    runs = sorted((tmp_path / "checkpoints").iterdir())
    assert [r.name for r in runs] == ["version_0", "version_1", "version_2"]
    seeds = sorted(torch.load(r / "last.ckpt", weights_only=True)["seed"] for r in runs)
    assert seeds == [10, 11, 12]
    for run in runs:
        assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


def test_resume_auto_finds_this_runs_folder_among_other_experiments(tmp_path, caplog):
    """A sweep sharing one root: each run resumes its own folder, never another's."""
    root = str(tmp_path)
    for lr in (0.1, 0.2):
        ft.fit(ft.train_step(classify), fresh(), make_batches(2), epochs=1, root_dir=root,
               hparams={"lr": lr}, **QUIET)
    with caplog.at_level("WARNING", logger="ftrain"):
        state = ft.fit(ft.train_step(classify), fresh(), make_batches(2), epochs=2,
                       root_dir=root, hparams={"lr": 0.1}, resume="auto", **QUIET)
    assert state.step == 4  # continued lr=0.1's run, in its folder (version_0)
    assert "skipping" in caplog.text and "lr: 0.2 in the checkpoint, 0.1 now" in caplog.text
    runs = tmp_path / "checkpoints"
    assert torch.load(runs / "version_0" / "last.ckpt", weights_only=True)["step"] == 4
    assert torch.load(runs / "version_1" / "last.ckpt", weights_only=True)["step"] == 2
    # a new experiment (another seed) starts fresh in a folder of its own
    state = ft.fit(ft.train_step(classify), fresh(seed=5), make_batches(2), epochs=1,
                   root_dir=root, hparams={"lr": 0.1}, resume="auto", **QUIET)
    assert state.step == 2 and state.seed == 5
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1", "version_2"]


def test_resume_auto_refuses_another_runs_checkpoint_in_a_named_folder(tmp_path):
    step = ft.with_checkpointing(ft.train_step(classify), tmp_path / "ckpt")
    ft.fit(step, fresh(seed=1), make_batches(2), epochs=1, **QUIET)
    with pytest.raises(ft.ConfigError, match="another run \\(seed 1 in the checkpoint, 2 now"):
        ft.fit(step, fresh(seed=2), make_batches(2), epochs=2, resume="auto", **QUIET)
    state = ft.fit(step, fresh(seed=2), make_batches(2), epochs=2, resume="auto",
                   resume_hparams="ignore", **QUIET)
    assert state.step == 4 and state.seed == 1


def test_continuing_an_older_checkpoint_of_a_run_never_overwrites_that_run(tmp_path):
    step = ft.with_checkpointing(ft.train_step(classify), save_top_k=-1)  # fit's folders
    ft.fit(step, fresh(), make_batches(2), epochs=3, root_dir=str(tmp_path), **QUIET)
    run = tmp_path / "checkpoints" / "version_0"
    assert sorted(p.name for p in run.glob("*.ckpt")) == ["0-2.ckpt", "1-4.ckpt", "2-6.ckpt",
                                                          "last.ckpt"]
    older = ft.load(run / "0-2.ckpt", like=fresh())  # the same run, two epochs back
    state = ft.fit(step, older, make_batches(2), epochs=2, root_dir=str(tmp_path), **QUIET)
    assert state.step == 4
    assert torch.load(run / "last.ckpt", weights_only=True)["step"] == 6  # untouched
    assert sorted(p.name for p in run.glob("*.ckpt")) == ["0-2.ckpt", "1-4.ckpt", "2-6.ckpt",
                                                          "last.ckpt"]
    branch = tmp_path / "checkpoints" / "version_1"  # the new branch has its own folder
    assert torch.load(branch / "last.ckpt", weights_only=True)["step"] == 4


def test_a_lock_file_that_links_elsewhere_is_never_written(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / ".ftrain.lock").symlink_to(target)
    step = ft.with_checkpointing(ft.train_step(classify), folder)
    with pytest.raises(ft.CheckpointError, match="lock file"):
        ft.fit(step, fresh(), make_batches(2), epochs=1, **QUIET)
    assert target.read_text() == "keep me"
    (folder / ".ftrain.lock").unlink()
    os.link(target, folder / ".ftrain.lock")  # a hard link: a second name of that file
    with pytest.raises(ft.CheckpointError, match="not a plain file of its own"):
        ft.fit(step, fresh(), make_batches(2), epochs=1, **QUIET)
    assert target.read_text() == "keep me"


def test_a_forked_child_does_not_keep_the_folder_locked(tmp_path):
    lock = _folders.FolderLock.acquire(str(tmp_path))
    pid = os.fork()
    if pid == 0:  # the child (a DataLoader worker would be one) lives on for a while
        time.sleep(3)
        os._exit(0)
    try:
        time.sleep(0.5)  # the child is up (it dropped its copy of the lock at the fork)
        lock.release()
        _folders.FolderLock.acquire(str(tmp_path)).release()  # free, the child still alive
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_resume_auto_continues_the_newest_run_in_its_folder(tmp_path):
    for epochs in (1, 2):
        ft.fit(ft.train_step(classify), fresh(), make_batches(2), epochs=epochs,
               root_dir=str(tmp_path), **QUIET)  # two runs: version_0 and version_1
    state = ft.fit(ft.train_step(classify), fresh(), make_batches(2), epochs=3,
                   root_dir=str(tmp_path), resume="auto", **QUIET)
    assert state.step == 6
    runs = tmp_path / "checkpoints"
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]
    assert torch.load(runs / "version_1" / "last.ckpt", weights_only=True)["step"] == 6
    assert torch.load(runs / "version_0" / "last.ckpt", weights_only=True)["step"] == 2


def test_the_lock_is_released_when_fit_ends_or_fails(tmp_path):
    step = ft.with_checkpointing(ft.train_step(classify), tmp_path)
    ft.fit(step, fresh(), make_batches(2), epochs=1, **QUIET)
    _folders.FolderLock.acquire(str(tmp_path)).release()
    with pytest.raises(ft.DataError):
        ft.fit(step, fresh(), [], epochs=1, **QUIET)
    _folders.FolderLock.acquire(str(tmp_path)).release()


# -- 4: resume="auto" never starts fresh over unreadable checkpoints -----------------------

def test_resume_auto_over_only_unreadable_checkpoints_is_an_error_and_overwrites_nothing(
        tmp_path):
    step = ft.with_checkpointing(ft.train_step(classify), tmp_path, save_top_k=-1)
    ft.fit(step, fresh(), make_batches(2), epochs=2, **QUIET)
    files = sorted(tmp_path.glob("*.ckpt"))
    contents = {path: path.read_bytes() for path in files}
    for i, path in enumerate(files):
        path.unlink()  # last.ckpt is a hard link of another file: break the link
        if i % 2:
            path.write_bytes(contents[path][: len(contents[path]) // 2])  # truncated
        else:  # a newer format this ftrain cannot read
            payload = torch.load(io.BytesIO(contents[path]), weights_only=True)
            torch.save({**payload, "version": 99}, path)
    before = {p.name: p.read_bytes() for p in files}
    with pytest.raises(ft.CheckpointError, match="none can be read") as info:
        ft.fit(step, fresh(), make_batches(2), epochs=4, resume="auto", **QUIET)
    for path in files:
        assert path.name in str(info.value)
    assert "truncated" in str(info.value) and "version 99" in str(info.value)
    assert {p.name: p.read_bytes() for p in sorted(tmp_path.glob("*.ckpt"))} == before


def test_resume_auto_falls_back_to_an_older_readable_checkpoint(tmp_path):
    step = ft.with_checkpointing(ft.train_step(classify), tmp_path, save_top_k=-1)
    ft.fit(step, fresh(), make_batches(2), epochs=2, **QUIET)
    for name in ("last.ckpt", "1-4.ckpt"):
        (tmp_path / name).unlink()
        (tmp_path / name).write_bytes(b"\x00" * 100)
    state = ft.fit(step, fresh(), make_batches(2), epochs=3, resume="auto", **QUIET)
    assert state.step == 6  # continued from 0-2.ckpt, not from scratch


def test_folder_helpers_refuse_names_with_folder_parts():
    for bad in ("/etc/passwd.ckpt", "../a.ckpt", "a/b.ckpt", "..", "", "x.pt",
                ".tmp-h-1-a.ckpt", "a\x00.ckpt", 5, None):
        with pytest.raises(ft.CheckpointError):
            _folders.bare_name(bad, "file", "test")
    assert _folders.bare_name("0-12.ckpt", "file", "test") == "0-12.ckpt"
