"""Data that keeps its own position (torchdata's StatefulDataLoader, streams with
state_dict): saved in the loop slot, restored by load_state_dict, nothing read twice; data
without a state gets a warning when its position cannot be restored."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import tensors_equal, torchrun_env
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import ftrain as ft

StatefulDataLoader = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader
pytestmark = pytest.mark.filterwarnings("ignore:.*set_vital")  # torchdata 0.11, torch 2.13

OFF = {"logger": False, "checkpoint": False, "progress": False}
SCRIPTS = pathlib.Path(__file__).parent / "scripts"
G = torch.Generator().manual_seed(5)
X = torch.randn(40, 4, generator=G)
Y = torch.randint(0, 3, (40,), generator=G)


class Stream(IterableDataset):
    """40 samples a pass, each pass in its own order (seeded by the pass number), with
    its position as its state; counts the samples it reads."""

    def __init__(self, stateful: bool = True) -> None:
        self.pos, self.passes, self.reads = 0, 0, 0
        if not stateful:  # an IterableDataset without state_dict
            self.state_dict = self.load_state_dict = None  # type: ignore[assignment]

    def __iter__(self):
        order = torch.randperm(40, generator=torch.Generator().manual_seed(self.passes))
        while self.pos < 40:
            i = int(order[self.pos])
            self.pos += 1
            self.reads += 1
            yield X[i], Y[i], i
        self.pos, self.passes = 0, self.passes + 1

    def state_dict(self) -> dict:
        return {"pos": self.pos, "passes": self.passes}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.passes = state["pos"], state["passes"]


def fresh() -> ft.TrainState:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return ft.TrainState.create(model, ft.optim.adam(1e-2), seed=2)


def recording(fail_at: int | None = None):
    """A step that records the sample ids it trains on, by step (and may fail once)."""
    seen: dict[int, list[int]] = {}
    core = ft.train_step(lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))

    def step(state, batch):
        if fail_at is not None and state.step == fail_at and not seen.get(-1):
            seen[-1] = [1]
            raise RuntimeError("boom")
        state, metrics = core(state, batch)
        seen[state.step] = batch[2].tolist()
        return state, metrics

    step.inner = core  # type: ignore[attr-defined]
    return step, seen


def stream_loader(**kw) -> StatefulDataLoader:
    return StatefulDataLoader(Stream(), batch_size=8, **kw)  # 5 batches a pass


def reference(epochs: int = 2):
    step, seen = recording()
    final = ft.fit(step, fresh(), stream_loader(), epochs=epochs, **OFF)
    return final, seen


# -- exact resume from the data's own state -------------------------------------------------

@pytest.mark.parametrize("stop_at", [3, 5, 7])
def test_a_stream_resumes_from_its_saved_state_reading_nothing_twice(tmp_path, stop_at):
    final_ref, seen_ref = reference()
    step, seen = recording()
    saving = ft.with_checkpointing(step, tmp_path, every_n_steps=1, every_n_epochs=None)
    ft.fit(saving, fresh(), stream_loader(), max_steps=stop_at, **OFF)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["slots"]["loop"]
    assert len(saved["data"]) == 1  # one process: one state
    assert saved["data"][0]["dataset_state"] == {3: {"pos": 24, "passes": 0},
                                                 5: {"pos": 40, "passes": 0},
                                                 7: {"pos": 16, "passes": 1}}[stop_at]

    # as a new process would: a new loader, the state from the file
    loader = stream_loader()
    state = ft.load(tmp_path / "last.ckpt", like=fresh())
    step2, seen2 = recording()
    final = ft.fit(step2, state, loader, epochs=2, **OFF)
    assert {**seen, **seen2} == seen_ref
    assert tensors_equal(final.params, final_ref.params)
    assert loader.dataset.reads == (10 - stop_at) * 8  # nothing read twice


def test_a_shuffled_stateful_loader_with_workers_resumes_exactly(tmp_path):
    data = TensorDataset(X, Y, torch.arange(40))

    def loader():
        torch.manual_seed(7)  # its sampler draws its seed from the global RNG when built
        return StatefulDataLoader(data, batch_size=8, shuffle=True, num_workers=2)

    step, seen_ref = recording()
    final_ref = ft.fit(step, fresh(), loader(), epochs=2, **OFF)
    assert seen_ref[1] != seen_ref[6]  # each epoch its own order (the loader's own)

    step, seen = recording()
    saving = ft.with_checkpointing(step, tmp_path, every_n_steps=3, every_n_epochs=None,
                                   save_top_k=-1)
    ft.fit(saving, fresh(), loader(), max_steps=7, **OFF)  # saved at 6, stopped at 7
    state = ft.load(tmp_path / "1-6.ckpt", like=fresh())
    assert state.step == 6
    step2, seen2 = recording()
    final = ft.fit(step2, state, loader(), epochs=2, **OFF)
    assert {**seen, **seen2} == seen_ref and sorted(seen2) == [7, 8, 9, 10]
    assert tensors_equal(final.params, final_ref.params)


def test_sigterm_saves_the_position_the_loader_had_before_it_read_ahead(tmp_path):
    final_ref, seen_ref = reference()
    step, seen = recording()

    def stepping(state, batch):
        state, metrics = step(state, batch)
        if state.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # held until this step's boundary
        return state, metrics

    stepping.inner = step.inner  # type: ignore[attr-defined]
    saving = ft.with_checkpointing(stepping, tmp_path, every_n_epochs=None)
    with pytest.raises(SystemExit):
        ft.fit(saving, fresh(), stream_loader(), epochs=2, **OFF)
    state = ft.load(tmp_path / "last.ckpt", like=fresh())
    assert state.step == 6
    step2, seen2 = recording()
    final = ft.fit(step2, state, stream_loader(), epochs=2, **OFF)
    assert {**{k: v for k, v in seen.items() if k <= 6}, **seen2} == seen_ref
    assert tensors_equal(final.params, final_ref.params)


def test_the_saved_position_is_dropped_when_the_loop_moves_on():
    step, _ = recording()
    state = ft.fit(step, fresh(), stream_loader(), max_steps=3, **OFF)
    assert state.slots["loop"]["data"][0]["dataset_state"]["pos"] == 24  # the end's
    for state, _ in ft.iterate(step, state, stream_loader(), epochs=1):
        assert "data" not in state.slots["loop"]  # not this position's any more
        break


# -- the same data object continued in this process -------------------------------------

def test_break_and_an_error_continue_on_the_same_loader_reading_nothing_twice(caplog):
    final_ref, seen_ref = reference()
    loader = stream_loader()
    step, seen = recording(fail_at=6)
    state = fresh()
    for state, _ in ft.iterate(step, state, loader, epochs=2):
        if state.step == 3:
            break  # the loader had read batch 4 already
    with caplog.at_level(logging.WARNING, logger="ftrain"):
        with pytest.raises(ft.StepError, match="boom") as failed:
            ft.fit(step, state, loader, epochs=2, **OFF)
        final = ft.fit(step, failed.value.state, loader, epochs=2, **OFF)
    assert not caplog.records  # nothing to warn about: the live loader went on
    del seen[-1]
    assert seen == seen_ref
    assert tensors_equal(final.params, final_ref.params)
    assert loader.dataset.reads == 80


# -- data that cannot restore its position: warned, never silent ------------------------

def test_an_iterable_dataset_without_state_is_read_again_with_a_warning(tmp_path, caplog):
    plain = DataLoader(Stream(stateful=False), batch_size=8)
    step, _ = recording()
    path = ft.save(tmp_path / "a.ckpt", ft.fit(step, fresh(), plain, max_steps=2, **OFF))
    other = DataLoader(Stream(stateful=False), batch_size=8)
    with caplog.at_level(logging.WARNING, logger="ftrain"):
        state = ft.fit(step, ft.load(path, like=fresh()), other, max_steps=3, **OFF)
    assert "position cannot be restored" in caplog.text and "read again" in caplog.text
    assert state.step == 3 and other.dataset.reads == 24  # two batches read and dropped


def test_a_generator_is_read_on_with_a_warning(tmp_path, caplog):
    def batches():
        for i in range(5):
            yield X[8 * i:8 * i + 8], Y[8 * i:8 * i + 8], torch.arange(8 * i, 8 * i + 8)

    step, seen = recording()
    path = ft.save(tmp_path / "a.ckpt", ft.fit(step, fresh(), batches(), max_steps=2, **OFF))
    with caplog.at_level(logging.WARNING, logger="ftrain"):
        ft.fit(step, ft.load(path, like=fresh()), batches(), max_steps=3, **OFF)
    assert "one-shot iterator" in caplog.text and "cannot restore" in caplog.text
    assert seen[3] == list(range(8))  # read on from where the new generator was


def test_a_checkpoint_without_the_data_state_loads_and_warns(tmp_path, caplog):
    step, _ = recording()
    state = ft.fit(step, fresh(), stream_loader(), max_steps=2, **OFF)
    state.slots["loop"].pop("data")  # as ftrain wrote it before it saved data states
    path = ft.save(tmp_path / "old.ckpt", state)
    loader = stream_loader()
    with caplog.at_level(logging.WARNING, logger="ftrain"):
        state = ft.fit(step, ft.load(path, like=fresh()), loader, max_steps=4, **OFF)
    assert "holds no saved state of this data" in caplog.text
    assert state.step == 4 and loader.dataset.reads == 32  # 2 re-read, then 2 trained


def test_a_saved_state_this_data_cannot_take_is_ignored_with_a_warning(caplog):
    step, _ = recording()
    state = ft.fit(step, fresh(), stream_loader(), max_steps=5, **OFF)  # an epoch's end
    assert "data" in state.slots["loop"]
    with caplog.at_level(logging.WARNING, logger="ftrain"):
        state = ft.fit(step, state, [(X[:8], Y[:8], torch.arange(8))], max_steps=6, **OFF)
    assert "has no state_dict/load_state_dict to take it: ignored" in caplog.text
    assert "data" not in state.slots["loop"]


def test_an_epoch_cut_by_limit_train_batches_starts_over_with_a_warning(tmp_path, caplog):
    step, _ = recording()
    state = ft.fit(step, fresh(), stream_loader(), epochs=1, limit_train_batches=2, **OFF)
    assert state.slots["loop"] == {"epoch": 1, "batch": 0, "world": 1}  # nothing to save
    path = ft.save(tmp_path / "a.ckpt", state)
    with caplog.at_level(logging.WARNING, logger="ftrain"):
        ft.fit(step, ft.load(path, like=fresh()), stream_loader(), epochs=2,
               limit_train_batches=2, **OFF)
    assert "start of epoch 1" in caplog.text and "starts over" in caplog.text


# -- errors ----------------------------------------------------------------------------------

def test_per_rank_states_from_another_world_size_are_refused():
    step, _ = recording()
    state = ft.fit(step, fresh(), stream_loader(), max_steps=2, **OFF)
    loop = state.slots["loop"]
    loop["data"], loop["world"] = loop["data"] * 2, 2  # as two ranks would have saved it
    with pytest.raises(ft.DataError, match=r"positions of 2 per-process .* this run has 1"):
        ft.fit(step, state, stream_loader(), max_steps=4, **OFF)


def test_a_malformed_saved_state_and_one_the_loader_rejects_are_errors():
    step, _ = recording()
    state = ft.fit(step, fresh(), stream_loader(), max_steps=2, **OFF)
    bad = state.replace(slots={**state.slots, "loop": {**state.slots["loop"], "data": "x"}})
    with pytest.raises(ft.CheckpointError, match="data must be a non-empty list of per-proc"):
        ft.fit(step, bad, stream_loader(), max_steps=4, **OFF)
    wrong = state.replace(slots={**state.slots, "loop": {**state.slots["loop"],
                                                         "data": [{"unknown": 1}]}})
    with pytest.raises(ft.DataError, match="does not fit this data"):
        ft.fit(step, wrong, stream_loader(), max_steps=4, **OFF)


def test_a_state_dict_that_is_not_a_dict_is_an_error():
    class Odd(Stream):
        def state_dict(self):  # type: ignore[override]
            return [self.pos]

    step, _ = recording()
    with pytest.raises(ft.DataError, match=r"state_dict\(\) must return a dict .* got list"):
        ft.fit(step, fresh(), DataLoader(Odd(), batch_size=8), max_steps=2, **OFF)


# -- real processes: SIGKILL mid-epoch, then resume ---------------------------------------

def _launch(root, out, *extra):
    return subprocess.Popen([sys.executable, str(SCRIPTS / "stateful_run.py"), str(root),
                             str(out), *extra], env=torchrun_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _steps(out) -> dict[int, str]:
    lines = out.read_text().splitlines() if out.exists() else []
    return {int(p[0]): " ".join(p[1:]) for p in (line.split() for line in lines)
            if len(p) == 3}  # a re-run step overwrites


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_exact_and_reads_the_stream_once(tmp_path):
    ref_out = tmp_path / "ref.txt"
    ref = _launch(tmp_path / "ref", ref_out)
    assert ref.wait(timeout=120) == 0, ref.stdout.read().decode()
    reference = _steps(ref_out)
    assert sorted(reference) == list(range(1, 19))  # 3 passes of 6 batches

    out = tmp_path / "run.txt"
    proc = _launch(tmp_path / "run", out, "--sleep", "0.05")
    deadline = time.monotonic() + 60
    while max(_steps(out), default=0) < 9:  # inside the second pass
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc = _launch(tmp_path / "run", out)
    assert proc.wait(timeout=120) == 0, proc.stdout.read().decode()
    assert _steps(out) == reference  # losses and sample ids, step by step
    final = torch.load(str(out) + ".final.pt", weights_only=True)
    assert tensors_equal(final, torch.load(str(ref_out) + ".final.pt", weights_only=True))
    first, reads = map(int, pathlib.Path(str(out) + ".reads").read_text().split())
    assert 6 < first < 12 and reads == (18 - first) * 8  # mid-pass; it read on only


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_ranks_save_and_restore_each_ranks_own_loader_state(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(SCRIPTS / "ddp_stateful.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=180, env=torchrun_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for kind in ("stream", "sampler"):
            got = result[kind]
            assert got["same"] and got["params"], (rank, kind, got)  # exact, per rank
            assert got["states"] == 2 and got["resumed_at"] == 8  # every rank's, in order
        assert result["stream"]["ranks"] == [0, 1]
