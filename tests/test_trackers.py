"""Experiment trackers (MLflow, W&B offline, DVCLive): values read back through each
tracker's own client or files, after a run and after a real SIGKILL + resume."""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import pathlib
import struct
import subprocess
import sys
import time

import pytest
import torch
from helpers import torchrun_env

import ftrain as ft
from ftrain.errors import CheckpointError, ConfigError

mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")
pytest.importorskip("dvclive")

SCRIPT = str(pathlib.Path(__file__).parent / "scripts" / "tracker_run.py")
STEPS = 18  # tracker_run.py: 3 epochs of 6 batches, logged every step, checkpoint every 4


def _env() -> dict[str, str]:
    env = dict(torchrun_env(), WANDB_SILENT="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    # a child must start its own W&B service, not share this process's (a killed child's
    # run would stay registered in it)
    for name in [n for n in env if n.startswith("WANDB_") and n != "WANDB_SILENT"]:
        env.pop(name)
    return env


def _run(root: str, tracker: str, kill_at: int | None = None) -> int:
    cmd = [sys.executable, SCRIPT, root, tracker]
    if kill_at is not None:
        cmd += ["--kill-at", str(kill_at)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    if done.returncode not in (0, -9):
        print(done.stderr[-4000:])  # shown when the test fails
    return done.returncode


def _fit_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g))
            for _ in range(5)]


def _fit(loggers: list, root: str, **kw) -> ft.TrainState:
    step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    torch.manual_seed(0)
    state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
    return ft.fit(ft.with_logging(step, loggers, every_n_steps=2), state, _fit_data(),
                  epochs=2, progress=False, root_dir=root, hparams={"lr": 0.1}, **kw)


# -- reading each tracker back through its own API or files --------------------------------

def mlflow_history(root: str, key: str = "loss") -> tuple[list[str], dict[int, list[float]]]:
    """The experiment "kill"'s run ids and {step: [values]} of `key` over its runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient("sqlite:///" + os.path.join(root, "mlflow.db"))
    exp = client.get_experiment_by_name("kill")
    runs = client.search_runs([exp.experiment_id])
    out: dict[int, list[float]] = {}
    for run in runs:
        for m in client.get_metric_history(run.info.run_id, key):
            out.setdefault(m.step, []).append(m.value)
    return [r.info.run_id for r in runs], out


def dvclive_history(folder: str, key: str = "loss") -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    with open(os.path.join(folder, "plots", "metrics", f"{key}.tsv")) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            out.setdefault(int(row["step"]), []).append(float(row[key]))
    return out


def _wandb_records(path: str) -> list[bytes]:
    """The records of a W&B run file (`run-<id>.wandb`): a ":W&B" header, then LevelDB's
    log format (32 KiB blocks of chunks, each a 7-byte header: crc, length, kind)."""
    # W&B's service writes the file after `finish()` returns: wait until it has settled
    deadline, size = time.monotonic() + 20, -1
    while time.monotonic() < deadline and (size <= 7 or size != os.path.getsize(path)):
        size = os.path.getsize(path)
        time.sleep(0.2)
    data = pathlib.Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, out, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            out.append(pending)
            pending = b""
    return out


def wandb_segments(root: str) -> list[tuple[str, dict[int, dict]]]:
    """Each offline segment of the W&B runs under `root`, oldest first: (run id,
    {step: history row})."""
    from wandb.proto import wandb_internal_pb2 as pb2

    out = []
    for path in sorted(glob.glob(os.path.join(root, "wandb", "offline-run-*", "*.wandb"))):
        run_id, rows = "", {}
        for raw in _wandb_records(path):
            rec = pb2.Record()
            rec.ParseFromString(raw)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run_id = rec.run.run_id
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                       for i in rec.history.item}
                rows.setdefault(int(row["_step"]), {}).update(row)
        out.append((run_id, rows))
    return out


# -- a run, read back --------------------------------------------------------------------

def test_mlflow_logs_steps_params_and_the_final_checkpoint(tmp_path):
    ml = ft.loggers.MLflow("exp", save_dir=str(tmp_path), log_checkpoint=True)
    csv_logger = ft.loggers.CSV(str(tmp_path))
    _fit([ml, csv_logger], str(tmp_path))
    client = ml.client
    run = client.get_run(ml.run_id)
    with open(csv_logger.path) as f:
        rows = [r for r in csv.DictReader(f) if r["loss"]]
    history = client.get_metric_history(ml.run_id, "loss")
    assert [(m.step, m.value) for m in history] == \
        [(int(r["step"]), float(r["loss"])) for r in rows]  # same steps, same floats
    assert [m.step for m in client.get_metric_history(ml.run_id, "loss_epoch")] == [5, 10]
    assert run.data.params == {"lr": "0.1"}
    assert run.info.status == "FINISHED"
    final = run.data.tags["ftrain.checkpoint"]
    assert final.endswith(".ckpt") and os.path.exists(final)
    artifacts = [a.path for a in client.list_artifacts(ml.run_id, "checkpoints")]
    assert artifacts == [f"checkpoints/{os.path.basename(final)}"]


def test_dvclive_and_wandb_offline_log_every_logged_step(tmp_path):
    dv = ft.loggers.DVCLive(str(tmp_path / "dvclive"), save_dvc_exp=False)
    wb = ft.loggers.WandB("p", mode="offline", save_dir=str(tmp_path))
    csv_logger = ft.loggers.CSV(str(tmp_path))
    _fit([dv, wb, csv_logger], str(tmp_path))
    with open(csv_logger.path) as f:
        expected = {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}
    assert {s: v[0] for s, v in dvclive_history(str(tmp_path / "dvclive")).items()} == \
        expected
    params = (tmp_path / "dvclive" / "params.yaml").read_text()
    assert "lr: 0.1" in params and "ftrain.checkpoint:" in params
    [(run_id, rows)] = wandb_segments(str(tmp_path))
    assert run_id == wb.id
    assert {s: r["loss"] for s, r in rows.items() if "loss" in r} == expected
    assert rows[10]["loss_epoch"] == pytest.approx(rows[10]["loss_epoch"])


# -- SIGKILL + resume: the same tracker run, each step once ---------------------------------

def _losses(history: dict[int, list[float]]) -> dict[int, float]:
    assert all(len(v) == 1 for v in history.values()), history  # never twice
    return {s: v[0] for s, v in history.items()}


def test_mlflow_resume_after_sigkill_continues_the_run_without_duplicates(tmp_path):
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert _run(ref, "mlflow") == 0
    assert _run(killed, "mlflow", kill_at=11) == -9  # really killed, after step 10's log
    runs, partial = mlflow_history(killed)
    # the checkpoint is at step 8: every step up to it is stored (flushed before the save);
    # steps 9 and 10 were written by MLflow's background thread, and may die with it
    assert len(runs) == 1 and 8 <= max(partial) <= 10
    assert _run(killed, "mlflow") == 0
    runs_after, history = mlflow_history(killed)
    _, expected = mlflow_history(ref)
    assert runs_after == runs  # re-attached: one run
    assert sorted(history) == list(range(1, STEPS + 1))
    assert _losses(history) == _losses(expected)  # bitwise: the resume is exact


def test_dvclive_resume_after_sigkill_continues_the_folder_without_duplicates(tmp_path):
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert _run(ref, "dvclive") == 0
    assert _run(killed, "dvclive", kill_at=11) == -9
    assert max(dvclive_history(os.path.join(killed, "dvclive"))) == 10
    assert _run(killed, "dvclive") == 0
    history = dvclive_history(os.path.join(killed, "dvclive"))
    assert sorted(history) == list(range(1, STEPS + 1))
    assert _losses(history) == _losses(dvclive_history(os.path.join(ref, "dvclive")))


def test_wandb_offline_resume_after_sigkill_writes_a_segment_of_the_same_run(tmp_path):
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert _run(ref, "wandb") == 0
    assert _run(killed, "wandb", kill_at=11) == -9
    assert _run(killed, "wandb") == 0
    [(_, expected)] = wandb_segments(ref)
    (first_id, first), (second_id, second) = wandb_segments(killed)
    assert first_id == second_id  # the same W&B run, continued
    assert set(range(1, 9)) <= set(first)  # up to the checkpoint, before the kill
    # offline, W&B cannot say what the first segment holds: the resumed one starts after
    # the checkpoint's step (documented), with the values an uninterrupted run logs
    assert sorted(second) == list(range(9, STEPS + 1))
    for rows in (first, second):
        for s, row in rows.items():
            assert row["loss"] == expected[s]["loss"]


@pytest.mark.slow  # real torchrun processes
def test_trackers_log_from_rank_zero_only_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", SCRIPT, str(tmp_path), "mlflow", "--ddp"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    runs, history = mlflow_history(str(tmp_path))
    assert len(runs) == 1  # one run, not one per rank
    assert sorted(history) == list(range(1, 10))  # 3 epochs of 3 batches per rank
    assert all(len(v) == 1 for v in history.values())


# -- errors and edges --------------------------------------------------------------------

def test_dvclive_refuses_a_folder_holding_another_runs_metrics(tmp_path):
    folder = str(tmp_path / "dvclive")
    first = ft.loggers.DVCLive(folder, save_dvc_exp=False)
    first.attach(None, 0)
    first.log_metrics({"loss": 1.0}, 1)
    first.finalize()
    with pytest.raises(ConfigError, match="already holds a run's metrics"):
        ft.loggers.DVCLive(folder, save_dvc_exp=False).attach(None, 0)
    assert dvclive_history(folder) == {1: [1.0]}  # nothing deleted


def test_a_corrupt_tracker_record_in_a_checkpoint_is_refused(tmp_path):
    state = _fit([ft.loggers.MLflow("exp", save_dir=str(tmp_path))], str(tmp_path),
                 checkpoint=False)
    slot = state.slots["logging"]
    slot["trackers"]["MLflow:0"] = {"run_id": ["not", "a", "string"]}
    with pytest.raises(CheckpointError, match="tracker record 'MLflow:0'"):
        _fit_again(state, ft.loggers.MLflow("exp", save_dir=str(tmp_path)), tmp_path)


def _fit_again(state: ft.TrainState, logger: object, root) -> ft.TrainState:
    step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    return ft.fit(ft.with_logging(step, [logger], every_n_steps=2), state, _fit_data(),
                  epochs=3, progress=False, root_dir=str(root), checkpoint=False,
                  hparams={"lr": 0.1})


def test_mlflow_continues_the_run_named_in_the_state_and_a_missing_one_starts_anew(
        tmp_path, caplog):
    first = ft.loggers.MLflow("exp", save_dir=str(tmp_path))
    state = _fit([first], str(tmp_path), checkpoint=False)
    again = ft.loggers.MLflow("exp", save_dir=str(tmp_path))
    state = _fit_again(state, again, tmp_path)  # a third epoch, same run
    assert again.run_id == first.run_id
    steps = [m.step for m in again.client.get_metric_history(first.run_id, "loss")]
    assert steps == [2, 4, 6, 8, 10, 12, 14]
    elsewhere = ft.loggers.MLflow("exp", save_dir=str(tmp_path / "other"))
    with caplog.at_level(logging.WARNING, logger="ftrain"):
        state.slots["logging"]["trackers"]["MLflow:0"]["run_id"] = "f" * 32
        _fit_again(state, elsewhere, tmp_path)
    assert elsewhere.run_id != first.run_id and "is not in" in caplog.text


def test_mlflow_refuses_changed_hyperparameters_on_resume(tmp_path):
    logger = ft.loggers.MLflow("exp", save_dir=str(tmp_path))
    logger.attach(None, 0)
    logger.log_hparams({"lr": 0.1}, {})
    other = ft.loggers.MLflow("exp", save_dir=str(tmp_path), run_id=logger.run_id)
    with pytest.raises(ConfigError, match="refused this run's hyperparameters"):
        other.log_hparams({"lr": 0.5}, {})


def test_bad_tracker_arguments_are_named():
    with pytest.raises(ConfigError, match=r"mode=\) must be"):
        ft.loggers.WandB(mode="cloud")
    with pytest.raises(ConfigError, match=r"experiment=\) must be a non-empty name"):
        ft.loggers.MLflow("")


def test_import_ftrain_does_not_import_any_tracker():
    code = ("import sys, ftrain as ft; ft.loggers.MLflow; "
            "print([m for m in ('mlflow', 'wandb', 'dvclive') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
