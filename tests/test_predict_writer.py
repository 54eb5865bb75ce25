"""`ft.predict(..., write_to=folder)` and `ft.read_predictions`: predictions written as
they come, sharded by whole batches across processes, read back in order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import Net, make_batches, make_dataset
from torch.utils.data import DataLoader

import ftrain as ft
from ftrain.loops.predict_writer import shard_batches

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).parent / "scripts" / "ddp_extras.py"


def state() -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(Net())


def parts(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("predictions-"))


def test_written_predictions_read_back_equal_the_in_memory_ones(tmp_path):
    s = state()
    loader = DataLoader(make_dataset(50), batch_size=8)  # 7 batches, the last of 2
    folder = ft.predict(s, loader, write_to=tmp_path / "p", batches_per_file=3)
    assert folder == str(tmp_path / "p")
    assert parts(folder) == [f"predictions-r000-{i:06d}.pt" for i in range(3)]  # 3 + 3 + 1
    got, want = ft.read_predictions(folder), ft.predict(s, loader)
    assert len(got) == len(want) == 7
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    for name in parts(folder):  # plain data: loads without unpickling any code
        data = torch.load(os.path.join(folder, name), weights_only=True)
        assert data["format"] == "ftrain.predictions"


def test_predictions_are_on_disk_while_later_batches_are_predicted(tmp_path):
    folder = tmp_path / "p"
    on_disk = []

    def fn(model, batch):
        on_disk.append(len(parts(folder)) if folder.exists() else 0)
        return {"logits": model(batch[0]), "n": batch[0].shape[0], "tag": ("x", 1)}

    ft.predict(state(), make_batches(5), fn, write_to=folder)
    assert on_disk == [0, 1, 2, 3, 4]  # batch k's predecessors were written already
    got = ft.read_predictions(folder)
    assert [g["n"] for g in got] == [12] * 5 and got[0]["tag"] == ("x", 1)
    limited = ft.predict(state(), make_batches(5), write_to=tmp_path / "l", limit_batches=2)
    assert len(ft.read_predictions(limited)) == 2


def test_batches_are_dealt_out_whole_each_to_exactly_one_rank():
    loader = DataLoader(make_dataset(50), batch_size=8)  # 7 batches
    whole = [b[0] for b in loader]
    for data, n in ((loader, 7), (make_batches(5), 5)):
        for limit in (None, 4):
            seen = {}
            for rank in range(3):
                for index, batch in shard_batches(data, rank, 3, limit):
                    assert index % 3 == rank and index not in seen
                    seen[index] = batch
            assert sorted(seen) == list(range(n if limit is None else limit))
            if data is loader:  # the same batches one process gets
                assert all(torch.equal(seen[i][0], whole[i]) for i in seen)


def test_a_loader_already_sharded_by_its_own_sampler_is_refused():
    dataset = make_dataset(20)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=0)
    with pytest.raises(ft.ConfigError, match="without a DistributedSampler"):
        next(shard_batches(DataLoader(dataset, batch_size=4, sampler=sampler), 0, 2))


class Opaque:
    pass


def test_bad_outputs_folders_and_options_are_clear_errors(tmp_path):
    s = state()
    with pytest.raises(ft.ConfigError, match="prediction batch 0: predictions written to a "
                                             "folder must be plain data.*got Opaque"):
        ft.predict(s, make_batches(2), lambda m, b: Opaque(), write_to=tmp_path / "a")
    ft.predict(s, make_batches(2), write_to=tmp_path / "b")
    with pytest.raises(ft.ConfigError, match="already holds predictions of rank 0"):
        ft.predict(s, make_batches(2), write_to=tmp_path / "b")
    with pytest.raises(ft.ConfigError, match="batches_per_file must be an int >= 1, got 0"):
        ft.predict(s, make_batches(2), write_to=tmp_path / "c", batches_per_file=0)
    with pytest.raises(ft.DataError, match="predict data must be a DataLoader.*got int"):
        ft.predict(s, 3, write_to=tmp_path / "d")


def test_read_predictions_refuses_incomplete_mixed_or_unsafe_folders(tmp_path):
    s = state()
    with pytest.raises(ft.CheckpointError, match="no predictions folder"):
        ft.read_predictions(tmp_path / "nothing")
    folder = Path(ft.predict(s, make_batches(4), write_to=tmp_path / "p"))
    (folder / "done-r000.json").rename(tmp_path / "done.json")  # as if still writing
    with pytest.raises(ft.CheckpointError, match="no finished predictions"):
        ft.read_predictions(folder)
    (tmp_path / "done.json").rename(folder / "done-r000.json")
    (folder / "predictions-r000-000002.pt").unlink()
    with pytest.raises(ft.CheckpointError, match=r"found parts \[0, 1, 3\]"):
        ft.read_predictions(folder)
    torch.save({"x": 1}, folder / "predictions-r000-000002.pt")
    with pytest.raises(ft.CheckpointError, match="not a predictions file of rank 0"):
        ft.read_predictions(folder)
    torch.save(Opaque(), folder / "predictions-r000-000002.pt")  # would run code to load
    with pytest.raises(ft.CheckpointError, match="cannot read predictions file .* safely"):
        ft.read_predictions(folder)
    # a rank of another run left in the folder
    other = Path(ft.predict(s, make_batches(2), write_to=tmp_path / "q"))
    (other / "done-r001.json").write_text(json.dumps(
        {"format": "ftrain.predictions", "rank": 1, "world": 2, "files": 0, "batches": 0}))
    with pytest.raises(ft.CheckpointError, match="world sizes \\[1, 2\\]"):
        ft.read_predictions(other)



def test_read_predictions_never_sizes_anything_by_numbers_in_the_files(tmp_path):
    # untrusted sizes: a huge world or file count, a huge or foreign batch index, a marker
    # naming another rank; each is refused before anything is built from it
    s = state()
    marker = {"format": "ftrain.predictions", "rank": 0, "world": 10**12, "files": 1,
              "batches": 1}
    folder = Path(ft.predict(s, make_batches(1), write_to=tmp_path / "a"))
    (folder / "done-r000.json").write_text(json.dumps(marker))
    with pytest.raises(ft.CheckpointError, match="expected every rank of 1000000000000"):
        ft.read_predictions(folder)
    (folder / "done-r000.json").write_text(json.dumps({**marker, "world": 1, "files": 10**12}))
    with pytest.raises(ft.CheckpointError, match="wrote 1000000000000 files"):
        ft.read_predictions(folder)
    (folder / "done-r000.json").write_text(json.dumps({**marker, "world": 1, "rank": 3}))
    with pytest.raises(ft.CheckpointError, match="says rank 3"):
        ft.read_predictions(folder)
    # a part whose batch index is far out: "lacks batches", not a range up to it
    folder = Path(ft.predict(s, make_batches(2), write_to=tmp_path / "b"))
    part = folder / "predictions-r000-000001.pt"
    data = torch.load(part, weights_only=True)
    data["indices"] = [10**12]
    torch.save(data, part)
    with pytest.raises(ft.CheckpointError, match=r"lacks batches \[1\]"):
        ft.read_predictions(folder)


def test_distributed_on_one_process_predicts_in_memory():
    # one process asked for a distributed prediction has a world of one: in memory
    assert len(ft.predict(state(), make_batches(2), distributed=True)) == 2


@pytest.mark.slow
def test_under_torchrun_every_batch_is_written_once_and_read_back_in_order(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(SCRIPT), str(tmp_path), "predict"],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # 7 loader batches: rank 0 has 4 (2 files of 2), rank 1 has 3 (2 files); 5 list
    # batches: 3 and 2
    assert (r0["loader"], r1["loader"], r0["list"], r1["list"]) == (2, 2, 2, 1)
    assert r0["loader_equal"] and r0["list_equal"]  # equal to one process's, in order
    assert r0["gathered_equal"] and r1["gathered_equal"]  # without a folder: gathered
