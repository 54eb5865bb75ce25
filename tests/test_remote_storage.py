"""Checkpoints, resume and logs behind fsspec URLs (issue 18, remote storage).

`memory://` is fsspec's real in-process store (no mocks): each test gets its own bucket.
A SIGKILL cannot be tested on memory:// (it dies with the process), so one slow test
routes a real folder through fsspec as `local://<path>` and kills the writer mid-save.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import uuid

import fsspec
import pytest
import torch
from helpers import Net, classify, make_batches, make_dataset, tensors_equal
from torch.utils.data import DataLoader

import ftrain as ft
from ftrain import storage
from ftrain.checkpointing import folders, sharded
from ftrain.checkpointing.atomic import atomic_write
from ftrain.checkpointing.index import latest_valid

OFF = {"logger": False, "checkpoint": False, "progress": False}
SCRIPT = str(pathlib.Path(__file__).parent / "scripts" / "resumable.py")
MEM = fsspec.filesystem("memory")


@pytest.fixture
def bucket():
    name = f"t-{uuid.uuid4().hex[:12]}"
    yield f"memory://{name}"
    if MEM.exists(f"/{name}"):
        MEM.rm(f"/{name}", recursive=True)


def fresh(seed: int = 0, optimizer=None) -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(Net(), optimizer or ft.optim.adam(1e-2), seed=seed)


def put(url: str, data: bytes) -> None:
    with MEM.open(url, "wb") as f:
        f.write(data)


def names(url: str) -> list[str]:
    return sorted(storage.listdir(url))


# -- files ---------------------------------------------------------------------------------

def test_save_and_load_round_trip_through_a_url(bucket):
    state = ft.fit(ft.train_step(classify), fresh(), make_batches(3), max_steps=3, **OFF)
    path = ft.save(f"{bucket}/a.ckpt", state, {"lr": 0.01})
    assert path == f"{bucket}/a.ckpt" and names(bucket) == ["a.ckpt"]  # no temporary left
    loaded = ft.load(path, like=fresh())
    assert loaded.step == 3 and tensors_equal(loaded.params, state.params)
    assert tensors_equal(loaded.opt_state, state.opt_state)
    assert ft.load_hparams(path) == {"lr": 0.01}
    again = ft.save(path, state.replace(step=7))  # replaces the object whole
    assert ft.load(again, like=fresh()).step == 7 and names(bucket) == ["a.ckpt"]


def test_remote_files_are_untrusted_input_as_local_ones_are(bucket, tmp_path):
    data = storage.read_bytes(ft.save(f"{bucket}/a.ckpt", fresh()), 1 << 30)
    put(f"{bucket}/cut.ckpt", data[: len(data) // 2])
    with pytest.raises(ft.CheckpointError, match="truncated or not a checkpoint"):
        ft.load(f"{bucket}/cut.ckpt", like=fresh())
    put(f"{bucket}/text.ckpt", b"hello")
    with pytest.raises(ft.CheckpointError, match="not a checkpoint: text starting 'hello'"):
        ft.load(f"{bucket}/text.ckpt", like=fresh())
    with pytest.raises(ft.CheckpointError, match=f"no checkpoint file at '{bucket}/no.ckpt'"):
        ft.load(f"{bucket}/no.ckpt", like=fresh())
    with pytest.raises(ft.CheckpointError, match=r"is a folder, not a checkpoint file "
                                                 r"\(found \['a.ckpt', 'cut.ckpt'"):
        ft.load(bucket, like=fresh())
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    torch.save({"format": "ftrain.checkpoint", "version": 1, "params": Evil()}, buf)
    put(f"{bucket}/evil.ckpt", buf.getvalue())
    with pytest.raises(ft.CheckpointError, match=r"not a safe checkpoint.*posix.system"):
        ft.load(f"{bucket}/evil.ckpt", like=fresh())
    with pytest.raises(ft.CheckpointError, match="not a safe checkpoint"):
        ft.load_hparams(f"{bucket}/evil.ckpt")
    assert not marker.exists()


def test_a_failed_write_leaves_the_old_object_and_no_temporary(bucket):
    atomic_write(f"{bucket}/run/x.ckpt", lambda f: f.write(b"old"))

    def half(f):
        f.write(b"new, half wr")
        raise OSError(28, "No space left on device")

    with pytest.raises(ft.CheckpointError, match=r"x.ckpt' could not be written .*No space"):
        atomic_write(f"{bucket}/run/x.ckpt", half)
    assert storage.read_bytes(f"{bucket}/run/x.ckpt", 10) == b"old"
    assert names(f"{bucket}/run") == ["x.ckpt"]


def test_file_urls_are_local_paths_and_local_paths_never_import_fsspec(tmp_path):
    path = ft.save(f"file://{tmp_path}/a.ckpt", fresh())
    assert path == f"{tmp_path}/a.ckpt" and (tmp_path / "a.ckpt").is_file()
    code = (
        "import sys, torch, ftrain as ft\n"
        f"root = {str(tmp_path)!r}\n"
        "state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.sgd(0.1))\n"
        "ft.load(ft.save(root + '/b.ckpt', state), like=state)\n"
        "step = ft.train_step(lambda m, b: m(b).pow(2).mean())\n"
        "ft.fit(step, state, [torch.randn(4, 2)], epochs=2, root_dir=root, logger=False,\n"
        "       progress=False)\n"
        "ft.fit(step, ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.sgd(0.1)),\n"
        "       [torch.randn(4, 2)], epochs=3, root_dir=root, logger=False,\n"
        "       progress=False, resume='auto')\n"
        "print('fsspec' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False", out.stderr  # `import ftrain` included


# -- with_checkpointing, fit, resume -------------------------------------------------------

def test_fit_to_a_url_then_resume_auto_is_bitwise_exact(bucket):
    data = DataLoader(make_dataset(96), batch_size=8, shuffle=True)  # 12 batches / epoch
    schedule = ft.optim.schedules.warmup_cosine(1e-2, 4, 36)
    losses: dict[int, float] = {}

    def run(folder, resume=None, max_steps=None):
        def record(state, batch):
            state, metrics = core(state, batch)
            losses[state.step] = float(metrics["loss"])
            return state, metrics
        core = ft.train_step(classify)
        record.inner = core
        step = ft.with_checkpointing(record, folder, every_n_steps=5, every_n_epochs=None)
        return ft.fit(step, fresh(seed=4, optimizer=ft.optim.adamw(schedule)), data,
                      epochs=3, max_steps=max_steps, logger=False, progress=False,
                      resume=resume)

    straight = run(f"{bucket}/straight")
    reference = dict(losses)
    losses.clear()
    run(f"{bucket}/run", max_steps=17)  # stops mid-epoch 1; last.ckpt holds step 17
    losses.clear()
    assert ft.checkpoints(f"{bucket}/run").last == f"{bucket}/run/last.ckpt"
    final = run(f"{bucket}/run", resume="auto")
    assert min(losses) == 18 and all(losses[s] == reference[s] for s in losses)
    assert tensors_equal(final.params, straight.params)
    assert tensors_equal(final.opt_state, straight.opt_state)
    assert ".ftrain.lock" not in names(f"{bucket}/run")  # released at the end


def test_root_dir_url_gives_each_run_a_version_folder_and_resumes_its_own(bucket):
    def run(epochs, hparams, resume=None):
        return ft.fit(ft.train_step(classify), fresh(), make_batches(3), epochs=epochs,
                      root_dir=bucket, progress=False, hparams=hparams, resume=resume)

    run(2, {"lr": 0.01})
    run(1, {"lr": 0.5})  # another experiment sharing the root
    runs = f"{bucket}/checkpoints"
    assert names(runs) == ["version_0", "version_1"]
    assert names(f"{runs}/version_0") == [".ftrain.claim", "1-6.ckpt", "checkpoints.json",
                                          "last.ckpt"]
    resumed = run(3, {"lr": 0.01}, resume="auto")  # continues version_0, skips version_1
    straight = ft.fit(ft.train_step(classify), fresh(), make_batches(3), epochs=3, **OFF)
    assert resumed.step == 9 and tensors_equal(resumed.params, straight.params)
    assert names(runs) == ["version_0", "version_1"]
    assert ft.checkpoints(runs).dirpath == f"{runs}/version_1"  # the newest run's index
    assert names(f"{bucket}/ftrain_logs") == ["version_0", "version_1", "version_2"]


def test_top_k_deletes_only_its_own_files(bucket):
    folder = f"{bucket}/run"
    put(f"{folder}/mine.ckpt", b"a user's file that looks like a checkpoint")
    put(f"{folder}/notes.txt", b"notes")
    put(f"{bucket}/elsewhere/9-99.ckpt", b"not this folder's")
    # a restored slot naming files of another run: trusted for nothing
    state = fresh().replace(slots={"checkpointing": {
        "saved": [{"file": "mine.ckpt", "score": 0.0, "step": 1, "epoch": 0}],
        "best": "mine.ckpt", "dir": f"{bucket}/elsewhere", "run": "0" * 32}})
    step = ft.with_checkpointing(ft.with_logging(ft.train_step(classify), []), folder,
                                 monitor="loss_epoch", save_top_k=1)
    ft.fit(step, state, make_batches(3), epochs=3, logger=False, progress=False)
    kept = [n for n in names(folder) if n.endswith(".ckpt") and n not in ("mine.ckpt",
                                                                         "last.ckpt")]
    assert len(kept) == 1  # the best of three epochs; the other two were deleted
    assert {"mine.ckpt", "notes.txt", "last.ckpt", "checkpoints.json"} <= set(names(folder))
    assert names(f"{bucket}/elsewhere") == ["9-99.ckpt"]
    assert not any(n.startswith(".tmp-") for n in names(folder))
    index = ft.checkpoints(folder)
    assert index.best == f"{folder}/{kept[0]}" and len(index.saved) == 1


# -- the folder lock -----------------------------------------------------------------------

def _lock_of(host: str, pid: int) -> bytes:
    return json.dumps({"pid": pid, "host": host, "since": "2026-01-01 00:00:00",
                       "token": "t" * 32, "beat": time.time()}).encode()


def test_a_folder_locked_by_a_live_run_is_refused(bucket):
    folder = f"{bucket}/run"
    lock = folders.FolderLock.acquire(folder)
    assert lock.held and names(folder) == [".ftrain.lock"]
    with pytest.raises(ft.CheckpointError, match=rf"in use by another run \(pid {os.getpid()}"):
        folders.FolderLock.acquire(folder)
    step = ft.with_checkpointing(ft.train_step(classify), folder)
    with pytest.raises(ft.CheckpointError, match="in use by another run"):
        ft.fit(step, fresh(), make_batches(2), epochs=1, logger=False, progress=False)
    lock.release()
    assert names(folder) == []
    folders.FolderLock.acquire(folder).release()  # free again
    put(f"{folder}/.ftrain.lock", _lock_of("elsewhere", 1))  # another host, refreshed now
    with pytest.raises(ft.CheckpointError, match="pid 1 on elsewhere since 2026-01-01"):
        folders.FolderLock.acquire(folder)


def test_stale_locks_are_taken_over_and_release_spares_another_holder(bucket, monkeypatch):
    folder = f"{bucket}/run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    put(f"{folder}/.ftrain.lock", _lock_of(socket.gethostname(), int(dead.stdout)))
    lock = folders.FolderLock.acquire(folder)  # its holder died on this host: taken over
    assert json.loads(storage.read_bytes(f"{folder}/.ftrain.lock", 4096))["pid"] == os.getpid()
    put(f"{folder}/.ftrain.lock", _lock_of("elsewhere", 1))  # taken from us meanwhile
    lock.release()
    assert names(folder) == [".ftrain.lock"]  # not ours any more: left alone
    monkeypatch.setattr(folders, "STALE_AFTER", 0.05)
    time.sleep(0.1)  # not refreshed for longer than STALE_AFTER: a dead run's elsewhere
    folders.FolderLock.acquire(folder).release()
    assert names(folder) == []


def test_two_runs_taking_over_one_stale_lock_leave_one_holder(bucket, monkeypatch):
    """The other run removed our new lock and put its own while we settled: we do not
    hold the folder (its lock is fresh), so we refuse instead of both writing."""
    folder = f"{bucket}/run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    put(f"{folder}/.ftrain.lock", _lock_of(socket.gethostname(), int(dead.stdout)))

    def the_other_run_takes_it(seconds):  # during our pause after the takeover
        storage.remove(f"{folder}/.ftrain.lock")
        put(f"{folder}/.ftrain.lock", _lock_of("elsewhere", 7))

    monkeypatch.setattr(folders.time, "sleep", the_other_run_takes_it)
    with pytest.raises(ft.CheckpointError, match="pid 7 on elsewhere"):
        folders.FolderLock.acquire(folder)
    assert json.loads(storage.read_bytes(f"{folder}/.ftrain.lock", 4096))["pid"] == 7


def test_a_held_lock_is_refreshed_until_released(bucket, monkeypatch):
    monkeypatch.setattr(folders, "BEAT_EVERY", 0.02)
    path = f"{bucket}/run/.ftrain.lock"
    lock = folders.FolderLock.acquire(f"{bucket}/run")
    first = json.loads(storage.read_bytes(path, 4096))["beat"]
    deadline = time.monotonic() + 10
    while json.loads(storage.read_bytes(path, 4096))["beat"] == first:
        assert time.monotonic() < deadline, "the lock was never refreshed"
        time.sleep(0.01)
    lock.release()
    time.sleep(0.1)
    assert not storage.exists(path)  # released, and the beat thread stopped


# -- half-written objects ------------------------------------------------------------------

def test_half_written_objects_are_never_resumed_from(bucket, monkeypatch):
    folder = f"{bucket}/run"
    good = ft.save(f"{folder}/0-3.ckpt", fresh().replace(step=3))
    data = storage.read_bytes(good, 1 << 30)
    time.sleep(0.01)
    mine_dead = f".tmp-{folders._host()}-999999999-0a1b.tmp"
    other = ".tmp-elsewhere-12-0a1b.tmp"
    for name in (mine_dead, other):  # interrupted saves, newer than the good one
        put(f"{folder}/{name}", data[: len(data) // 3])
    assert latest_valid(folder) == good
    put(f"{folder}/1-6.ckpt", data[: len(data) // 2])  # cut short, newest: skipped
    assert latest_valid(folder) == good
    folders.remove_stale_temporaries(folder)  # a dead process of this host: removed
    assert names(folder) == [other, "0-3.ckpt", "1-6.ckpt"]
    monkeypatch.setattr(folders, "TMP_STALE_AFTER", 0.0)  # another host's, old enough
    folders.remove_stale_temporaries(folder)
    assert names(folder) == ["0-3.ckpt", "1-6.ckpt"]
    MEM.rm_file(good.removeprefix("memory://"))
    with pytest.raises(ft.CheckpointError, match=r"holds checkpoint files but none can be "
                                                 r"read(.|\n)*1-6.ckpt"):
        latest_valid(folder)  # never a fresh start over a checkpoint it cannot read


@pytest.mark.slow
def test_sigkill_during_saves_through_fsspec_never_leaves_a_bad_checkpoint(tmp_path):
    """`local://<path>` goes through fsspec's code path (temporary, then fs.mv) on a real
    disk, so a real SIGKILL can land inside a save."""
    out, root = tmp_path / "run.txt", f"local://{tmp_path}/run"
    folder = tmp_path / "run" / "checkpoints" / "version_0"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    last_step, interrupted = 0, 0
    for kill in range(8):
        if kill >= 3 and interrupted:
            break
        proc = subprocess.Popen([sys.executable, SCRIPT, root, str(out), "--big", "--epochs",
                                 "50"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (out.exists() and (lines := out.read_text().splitlines())
                   and int(lines[-1].split()[0]) >= last_step + 2):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.05 * kill)  # somewhere inside a ~16 MB save
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        interrupted += any(p.name.startswith(".tmp-") for p in folder.iterdir())
        for ckpt in folder.glob("*.ckpt"):  # every object that looks like one loads
            assert torch.load(ckpt, weights_only=True, mmap=True)["format"] == \
                "ftrain.checkpoint"
        picked = latest_valid(f"local://{folder}")
        assert picked is not None and ".tmp" not in picked
        assert ft.load_hparams(picked) == {}  # read back through fsspec
        step = torch.load(picked.removeprefix("local://"), weights_only=True, mmap=True)["step"]
        assert step >= max(last_step, 1)  # resumed from there; never went back
        last_step = step
    assert interrupted >= 1  # at least one kill really landed inside a save


# -- logs ----------------------------------------------------------------------------------

def test_csv_and_tensorboard_logs_to_a_url_read_back(bucket, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def run(save_dir):
        tb, table = ft.loggers.TensorBoard(save_dir), ft.loggers.CSV(save_dir, flush_every=1)
        step = ft.with_logging(ft.train_step(classify), [tb, table], every_n_steps=2)
        ft.fit(step, fresh(), make_batches(4), epochs=2, checkpoint=False, progress=False,
               hparams={"lr": 0.01})
        return tb, table

    tb, table = run(bucket)
    assert (tb.version, table.version) == (0, 1)
    assert tb.log_dir == f"{bucket}/ftrain_logs/version_0"
    events = EventAccumulator(tb.log_dir)  # TensorBoard's own reader, through fsspec
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [2, 4, 6, 8]
    assert [e.step for e in events.Scalars("loss_epoch")] == [4, 8]
    # appended row by row, the header widened once (loss_epoch): as a local file is
    _, local = run(str(tmp_path))
    with storage.open_text(table.path, "r") as f:
        remote_rows = f.read()
    with open(local.path, newline="") as f:
        assert remote_rows == f.read()
    assert [r["step"] for r in csv.DictReader(io.StringIO(remote_rows))] == \
        ["2", "4", "4", "6", "8", "8"]
    assert names(table.log_dir) == [".ftrain.claim", "hparams.json", "metrics.csv"]
    hp = json.loads(storage.read_bytes(f"{table.log_dir}/hparams.json", 1 << 20))
    assert hp["hparams"] == {"lr": 0.01}
    assert ft.loggers.CSV(bucket).version == 2  # the next free number


# -- what cannot work says so --------------------------------------------------------------

def test_bad_urls_and_missing_packages_are_config_errors(bucket, monkeypatch):
    with pytest.raises(ft.ConfigError, match=r"'nope://b/x.ckpt' is not a URL fsspec can "
                                             r"open.*Protocol not known: nope"):
        ft.save("nope://b/x.ckpt", fresh())
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(ft.ConfigError, match=r"'s3://b/run'.*needs s3fs.*pip install "
                                                 r"s3fs"):
            ft.fit(ft.train_step(classify), fresh(), make_batches(2), epochs=1,
                   checkpoint="s3://b/run", logger=False, progress=False)
    with pytest.raises(ft.ConfigError, match=r"capture_failures .* the URL"):
        ft.fit(ft.train_step(classify), fresh(), make_batches(2), epochs=1,
               root_dir=bucket, capture_failures=True, progress=False)
    with pytest.raises(ft.ConfigError, match=r"with_profiling\('torch'\) writes .* the URL"):
        ft.fit(ft.with_profiling(ft.train_step(classify), "torch"), fresh(), make_batches(2),
               epochs=1, root_dir=bucket, progress=False)
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "fsspec.core", None)
    with pytest.raises(ft.ConfigError, match=r"'memory://b/x.ckpt' is a URL.*fsspec.*"
                                             r"ftrain\[remote\]"):
        ft.load("memory://b/x.ckpt", like=fresh())


def test_sharded_checkpoints_and_urls_are_refused_naming_both(bucket, tmp_path):
    want = r"sharded \(DCP\) checkpoint cannot be saved to or loaded from a URL \('memory://"
    with pytest.raises(ft.ConfigError, match=want):
        sharded.save_dir(f"{bucket}/s.ckpt", fresh())
    put(f"{bucket}/s.ckpt/ftrain.pt", b"PK\x03\x04")  # a folder-shaped checkpoint there
    with pytest.raises(ft.ConfigError, match=want):
        ft.load(f"{bucket}/s.ckpt", like=fresh())
    with pytest.raises(ft.ConfigError, match=want):
        ft.consolidate(f"{bucket}/s.ckpt", tmp_path / "one.ckpt")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        state = fresh()
        state = state.replace(params={k: distribute_tensor(v, mesh, [Replicate()])
                                      for k, v in state.params.items()})
        with pytest.raises(ft.ConfigError, match=want):
            ft.save(f"{bucket}/d.ckpt", state)
    finally:
        dist.destroy_process_group()
    assert not storage.exists(f"{bucket}/d.ckpt")
