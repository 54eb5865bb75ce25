"""with_logging, loggers, progress bar, validation and profiling, read back for real."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
import warnings

import pytest
import torch
from helpers import CountHostReads, Net, classify, make_batches
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ftrain as ft


def fresh(seed: int = 0, lr: float = 1e-2) -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(Net(), ft.optim.adam(lr), seed=seed)


def events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_event_files_hold_step_and_epoch_values(tmp_path):
    logger = ft.loggers.TensorBoard(str(tmp_path))
    seen = []

    def record(state, batch):
        state, metrics = ft.train_step(classify)(state, batch)
        seen.append((state.step, float(metrics["loss"]), float(metrics["acc"]), len(batch[0])))
        return state, metrics

    step = ft.with_logging(record, logger, every_n_steps=2)
    ft.fit(step, fresh(), make_batches(5), epochs=2, checkpoint=False, progress=False,
           hparams={"lr": 0.01, "model": {"hidden": 16}})
    acc = events(logger.log_dir)
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "acc", "epoch", "loss_epoch", "acc_epoch"} <= tags
    logged = scalars(acc, "loss")
    assert [s for s, _ in logged] == [2, 4, 6, 8, 10]
    by_step = {s: loss for s, loss, _, _ in seen}
    assert all(v == pytest.approx(by_step[s], rel=1e-6) for s, v in logged)
    epoch_means = scalars(acc, "loss_epoch")
    assert [s for s, _ in epoch_means] == [5, 10]
    first = seen[:5]
    expected = sum(loss * n for _, loss, _, n in first) / sum(n for *_, n in first)
    assert epoch_means[0][1] == pytest.approx(expected, rel=1e-6)
    assert scalars(acc, "epoch")[-1] == (10, 1.0)
    # hparams: the HPARAMS tab's plugin data, with the final metrics
    from tensorboard.plugins.hparams import plugin_data_pb2
    content = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in content
    info = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    assert info.hparams["lr"].number_value == pytest.approx(0.01)
    assert info.hparams["model.hidden"].number_value == 16
    assert scalars(acc, "hparams/loss_epoch")[0][1] == pytest.approx(epoch_means[-1][1])


def test_tensorboard_experiment_is_a_summary_writer(tmp_path):
    logger = ft.loggers.TensorBoard(str(tmp_path), name="runs", version=7)
    logger.experiment.add_histogram("weights", torch.randn(100), 0)
    logger.experiment.add_text("note", "hello", 0)
    logger.finalize()
    assert logger.log_dir == os.path.join(str(tmp_path), "runs", "version_7")
    acc = events(logger.log_dir)
    assert "weights" in acc.Tags()["histograms"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_real_tensorboard_server_serves_the_scalars(tmp_path):
    logger = ft.loggers.TensorBoard(str(tmp_path))
    step = ft.with_logging(ft.train_step(classify), logger, every_n_steps=1)
    ft.fit(step, fresh(), make_batches(4), epochs=1, checkpoint=False, progress=False)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "ftrain_logs"),
         "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=version_0&tag=loss"
    try:
        deadline = time.monotonic() + 90
        data = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    data = json.loads(resp.read())
                if len(data) == 4:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert data is not None, "tensorboard did not answer"
        assert [row[1] for row in data] == [1, 2, 3, 4]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_csv_rows_match_metrics_and_versions_count_up(tmp_path):
    rows_seen = []

    def record(state, batch):
        state, metrics = ft.train_step(classify)(state, batch)
        rows_seen.append((state.step, float(metrics["loss"])))
        return state, metrics

    paths = []
    for _ in range(2):
        logger = ft.loggers.CSV(str(tmp_path))
        ft.fit(ft.with_logging(record, logger, every_n_steps=1), fresh(), make_batches(3),
               epochs=1, checkpoint=False, progress=False)
        paths.append(logger.path)
    assert paths[0].endswith(os.path.join("ftrain_logs", "version_0", "metrics.csv"))
    assert paths[1].endswith(os.path.join("ftrain_logs", "version_1", "metrics.csv"))
    with open(paths[0]) as f:
        rows = list(csv.DictReader(f))
    step_rows = [r for r in rows if r["loss"]]
    assert [int(r["step"]) for r in step_rows] == [1, 2, 3]
    for row, (s, loss) in zip(step_rows, rows_seen[:3]):
        assert int(row["step"]) == s and float(row["loss"]) == pytest.approx(loss, rel=1e-6)
    assert rows[-1]["loss_epoch"] and not rows[-1]["loss"]  # the epoch row, header widened



@pytest.mark.parametrize("every", [5, 10])
def test_logging_every_n_steps_makes_exactly_the_expected_host_reads(tmp_path, every):
    data = make_batches(10)
    step = ft.with_logging(ft.train_step(classify), ft.loggers.CSV(str(tmp_path)),
                           every_n_steps=every, progress=False)
    state = fresh()
    with CountHostReads() as counter:
        ft.fit(step, state, data, epochs=2, checkpoint=False, progress=False)
    steps = 20
    # one read per logging interval; two per epoch end (the non-finite check, then the
    # epoch's reduced metrics)
    assert counter.count == steps // every + 2 * 2


@pytest.mark.parametrize("steps", [3, 11])
def test_a_step_without_logging_reads_once_per_epoch_end_only(steps):
    with CountHostReads() as counter:
        for _ in ft.iterate(ft.train_step(classify), fresh(), make_batches(12), max_steps=steps):
            pass
    assert counter.count == 1  # the non-finite check where the epoch's batches end


def test_fit_logs_to_tensorboard_by_default_and_never_twice(tmp_path):
    ft.fit(ft.train_step(classify), fresh(), make_batches(3), epochs=1, checkpoint=False,
           progress=False, root_dir=str(tmp_path))
    assert os.listdir(tmp_path / "ftrain_logs") == ["version_0"]
    assert "loss_epoch" in events(str(tmp_path / "ftrain_logs" / "version_0")).Tags()["scalars"]
    csv_logger = ft.loggers.CSV(str(tmp_path / "csv"))
    mine = ft.with_logging(ft.train_step(classify), csv_logger, every_n_steps=1)
    ft.fit(mine, fresh(), make_batches(3), epochs=1, checkpoint=False, progress=False,
           root_dir=str(tmp_path))
    assert os.listdir(tmp_path / "ftrain_logs") == ["version_0"]  # no second layer added
    assert os.path.exists(csv_logger.path)
    ft.fit(ft.train_step(classify), fresh(), make_batches(3), epochs=1, checkpoint=False,
           progress=False, logger=False, root_dir=str(tmp_path / "none"))
    assert not os.path.exists(tmp_path / "none")


def test_several_loggers_get_the_same_values(tmp_path):
    a, b = ft.loggers.CSV(str(tmp_path / "a")), ft.loggers.CSV(str(tmp_path / "b"))
    ft.fit(ft.train_step(classify), fresh(), make_batches(4), epochs=1, checkpoint=False,
           progress=False, logger=[a, b])
    assert open(a.path).read() == open(b.path).read()


def test_any_object_with_the_three_methods_is_a_logger():
    class Memory:
        def __init__(self):
            self.metrics, self.hparams, self.done = [], None, False

        def log_metrics(self, metrics, step):
            self.metrics.append((step, dict(metrics)))

        def log_hparams(self, hparams, metrics):
            self.hparams = (hparams, metrics)

        def finalize(self):
            self.done = True

    mem = Memory()
    step = ft.with_logging(ft.train_step(classify), mem, every_n_steps=3, on_step=["loss"])
    ft.fit(step, fresh(), make_batches(6), epochs=1, checkpoint=False, progress=False,
           hparams={"lr": 0.01})
    assert [s for s, _ in mem.metrics] == [3, 6, 6]
    assert set(mem.metrics[0][1]) == {"loss", "epoch"}
    assert all(isinstance(v, float) for _, m in mem.metrics for v in m.values())
    assert mem.done and mem.hparams[0] == {"lr": 0.01} and "loss_epoch" in mem.hparams[1]
    with pytest.raises(ft.ConfigError, match="lacks"):
        ft.with_logging(ft.train_step(classify), object())


def test_reductions_and_torchmetrics(tmp_path):
    from torchmetrics import MaxMetric

    values = iter([1.0, 5.0, 3.0, 2.0])

    def step(state, batch):
        v = next(values)
        return state.replace(step=state.step + 1), {"x": torch.tensor(v), "y": torch.tensor(v),
                                                    "z": torch.tensor(v), "w": torch.tensor(v)}

    mem = ft.loggers.CSV(str(tmp_path))
    logged = ft.with_logging(step, mem, every_n_steps=None,
                             reduce={"x": "max", "y": "sum", "z": MaxMetric(), "w": "last"})
    ft.fit(logged, fresh(), make_batches(4), epochs=1, checkpoint=False, progress=False)
    row = list(csv.DictReader(open(mem.path)))[-1]
    assert float(row["x_epoch"]) == 5.0 and float(row["y_epoch"]) == 11.0
    assert float(row["z_epoch"]) == 5.0 and float(row["w_epoch"]) == 2.0
    with pytest.raises(ft.ConfigError, match="must be one of"):
        ft.with_logging(step, [], reduce={"x": "median"})


def test_bad_metrics_from_a_step_are_clear_errors():
    def bad_name(state, batch):
        return state.replace(step=state.step + 1), {1: torch.tensor(1.0)}

    def bad_value(state, batch):
        return state.replace(step=state.step + 1), {"v": torch.ones(3)}

    for step, message in ((bad_name, "metric names must be strings"),
                          (bad_value, r"'v' must be a 0-d tensor, got a tensor of shape \(3,\)")):
        with pytest.raises(ft.LossError, match=message):
            ft.fit(ft.with_logging(step, []), fresh(), make_batches(2), epochs=1,
                   checkpoint=False, progress=False)


def test_nan_loss_is_raised_at_the_logging_interval_naming_its_step(tmp_path):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss, m = classify(model, batch)
        return (loss * float("nan") if calls["n"] == 3 else loss), m

    step = ft.with_logging(ft.train_step(loss_fn), [], every_n_steps=4)
    seen = []
    with pytest.raises(ft.NonFiniteLossError, match="at step 2 "):
        for state, _ in ft.iterate(step, fresh(), make_batches(10), epochs=1):
            seen.append(state.step)
    assert seen == [1, 2, 3]  # raised at step 4, the first logging step after it


def test_lr_and_grad_norm_are_logged_at_the_interval_only(tmp_path):
    schedule = ft.optim.schedules.linear(0.0, 1e-2, steps=10)
    torch.manual_seed(0)
    state = ft.TrainState.create(Net(), ft.optim.adam(schedule))
    mem = ft.loggers.CSV(str(tmp_path))
    seen_norms = []

    def spy(state, batch):
        state, metrics = step_core(state, batch)
        seen_norms.append("grad_norm" in metrics)
        return state, metrics

    step_core = ft.train_step(classify)
    spy.inner = step_core  # type: ignore[attr-defined]
    step = ft.with_logging(spy, mem, every_n_steps=3, log_lr=True, log_grad_norm=True)
    ft.fit(step, state, make_batches(6), epochs=1, checkpoint=False, progress=False)
    assert seen_norms == [False, False, True, False, False, True]
    rows = [r for r in csv.DictReader(open(mem.path)) if r["lr"]]
    assert [(int(r["step"]), float(r["lr"])) for r in rows] == [
        (3, pytest.approx(1e-2 * 3 / 10)), (6, pytest.approx(1e-2 * 6 / 10))]
    assert all(float(r["grad_norm"]) > 0 for r in rows)


def test_progress_bar_shows_epoch_step_and_smoothed_loss():
    out = io.StringIO()
    step = ft.with_logging(ft.train_step(classify), [], progress="always")
    step.prog_bar = frozenset({"loss"})
    ft.fit(step, fresh(), make_batches(4), epochs=2, checkpoint=False)
    # the bar writes to stderr; run again capturing through the bar's file
    from ftrain.layers.logging.progress import ProgressBar
    bar = ProgressBar(["loss"], always=True, refresh_secs=0.0, file=out)
    bar.start_epoch(0, 3)
    for i in range(3):
        bar.update(i + 1, {"loss": torch.tensor(0.5 + i)})
    bar.close()
    text = out.getvalue()
    assert "epoch 0" in text and "3/3" in text and "loss=" in text and "step=3" in text
    quiet = ProgressBar(["loss"], file=io.StringIO())  # not a terminal: no bar
    assert not quiet.enabled


def test_progress_bar_in_fit_writes_to_stderr(capsys):
    ft.fit(ft.train_step(classify), fresh(), make_batches(4), epochs=1, logger=False,
           checkpoint=False, progress="always")
    err = capsys.readouterr().err
    assert "epoch 0" in err and "4/4" in err and "loss=" in err


def test_ftrain_adds_no_root_handler_and_no_warning_filter(tmp_path):
    root_handlers = list(logging.getLogger().handlers)
    filters = list(warnings.filters)
    ft.fit(ft.with_validation(ft.train_step(classify), ft.eval_step(classify),
                              make_batches(2)),
           fresh(), make_batches(3), epochs=1, checkpoint=False, progress=False,
           root_dir=str(tmp_path))
    assert logging.getLogger().handlers == root_handlers
    assert warnings.filters == filters


# -- validation -------------------------------------------------------------------------

def test_validation_each_epoch_logged_and_counted(tmp_path):
    evaluated = []

    def metric(model, batch):
        evaluated.append(len(batch[0]))
        return classify(model, batch)

    mem = ft.loggers.CSV(str(tmp_path))
    step = ft.with_logging(
        ft.with_validation(ft.train_step(classify), ft.eval_step(metric),
                           make_batches(3, seed=1)), mem, every_n_steps=None)
    keys = []
    for state, metrics in ft.iterate(step, fresh(), make_batches(4), epochs=2):
        keys.append(sorted(metrics))
    assert len(evaluated) == 2 + 3 * 2  # sanity check (2 batches) + two full validations
    assert state.slots["validation"]["checks"] == 2
    assert "val_loss" in keys[3] and "val_acc" in keys[3] and "val_loss" not in keys[0]
    rows = [r for r in csv.DictReader(open(mem.path)) if r.get("val_loss")]
    assert [int(r["step"]) for r in rows] == [4, 8]
    direct = ft.evaluate(ft.eval_step(classify), state, make_batches(3, seed=1))
    assert float(rows[-1]["val_loss"]) == pytest.approx(direct["loss"], rel=1e-6)


def test_validation_every_n_steps_several_sets_and_limits():
    sets = {"a": make_batches(3, seed=1), "b": make_batches(5, seed=2)}
    counted = {"n": 0}

    def metric(model, batch):
        counted["n"] += 1
        return classify(model, batch)

    step = ft.with_validation(ft.train_step(classify), ft.eval_step(metric), sets,
                              every_n_epochs=None, every_n_steps=3, sanity_steps=0,
                              limit_val_batches=2)
    results = {s.step: m for s, m in ft.iterate(step, fresh(), make_batches(6), epochs=1)}
    assert sorted(k for k in results[3] if k.startswith("val_")) == [
        "val_a_acc", "val_a_loss", "val_b_acc", "val_b_loss"]
    assert "val_a_loss" not in results[2]
    assert counted["n"] == 2 * (2 + 2)  # two checks, two sets, two batches each


def test_sanity_check_catches_evaluation_bugs_before_training():
    trained = {"n": 0}

    def train_loss(model, batch):
        trained["n"] += 1
        return classify(model, batch)

    def broken(model, batch):
        return {"bad": model(batch[0][:, :2])}

    step = ft.with_validation(ft.train_step(train_loss), ft.eval_step(broken), make_batches(2))
    with pytest.raises(ft.StepError, match="evaluation batch 0 failed"):
        ft.fit(step, fresh(), make_batches(4), epochs=1, logger=False, progress=False,
               checkpoint=False)
    assert trained["n"] == 0


def test_fast_dev_run_runs_one_batch_of_each(tmp_path):
    counted = {"val": 0}

    def metric(model, batch):
        counted["val"] += 1
        return classify(model, batch)

    step = ft.with_validation(ft.train_step(classify), ft.eval_step(metric), make_batches(5),
                              sanity_steps=0)
    state = ft.fit(step, fresh(), make_batches(5), epochs=3, fast_dev_run=True,
                   root_dir=str(tmp_path), progress=False)
    assert state.step == 1 and counted["val"] == 1
    assert not os.path.exists(tmp_path / "ftrain_logs")  # fast_dev_run writes no logs


def test_two_layers_claiming_one_slot_is_an_error():
    step = ft.with_logging(ft.train_step(classify), [])
    with pytest.raises(ft.ConfigError, match="two combinators claim the slot 'logging'"):
        ft.with_logging(step, [])
    assert ft.with_logging(step, [], name="logging2").slot_name == "logging2"


# -- profiling ----------------------------------------------------------------------------

def test_simple_profile_reports_every_phase():
    out = io.StringIO()
    step = ft.with_profiling(ft.with_logging(ft.train_step(classify), [], every_n_steps=2),
                             "simple", file=out)
    ft.fit(step, fresh(), make_batches(6), epochs=1, checkpoint=False, progress=False)
    report = out.getvalue()
    for phase in ("data", "forward", "backward", "optimizer", "logging"):
        assert phase in report, report
    line = next(r for r in report.splitlines() if r.startswith("forward"))
    assert int(line.split()[1]) == 6  # six forward passes timed


def test_advanced_profile_writes_a_cprofile_report(tmp_path):
    path = tmp_path / "profile.txt"
    step = ft.with_profiling(ft.train_step(classify), "advanced", filename=str(path))
    ft.fit(step, fresh(), make_batches(3), epochs=1, logger=False, progress=False,
           checkpoint=False)
    text = path.read_text()
    assert "cumulative" in text and "_bound" in text


def test_torch_profile_writes_a_trace_tensorboard_can_open(tmp_path):
    step = ft.with_profiling(ft.train_step(classify), "torch", dirpath=str(tmp_path / "tr"))
    ft.fit(step, fresh(), make_batches(6), epochs=1, logger=False, progress=False,
           checkpoint=False)
    traces = [f for f in os.listdir(tmp_path / "tr") if f.endswith(".pt.trace.json")]
    assert traces
    with open(tmp_path / "tr" / traces[0]) as f:
        trace = json.load(f)
    assert any("aten::addmm" in e.get("name", "") for e in trace["traceEvents"])


def test_csv_logger_holds_only_unwritten_rows_and_widens_its_header(tmp_path):
    logger = ft.loggers.CSV(str(tmp_path), flush_every=10)
    for i in range(1, 36):
        metrics = {"loss": float(i)}
        if i >= 25:
            metrics["val_loss"] = float(-i)  # a column that appears late
        logger.log_metrics(metrics, step=i)
        assert len(logger.rows) < 10
    logger.finalize()
    with open(logger.path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 36))
    assert rows[0]["val_loss"] == "" and float(rows[-1]["val_loss"]) == -35.0
