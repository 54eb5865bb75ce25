"""Epoch metrics that are right (issue 15, part 1): torchmetrics objects in eval_step and
train_step, compared with scikit-learn on the concatenated predictions; fresh copies per
evaluation; no host sync per batch; batch-size inference."""

from __future__ import annotations

import collections
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CountHostReads, Net
from sklearn import metrics as skm
from torch.nn import functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

import ftrain as ft
from ftrain.data.batches import batch_size

C = 4
ROOT = Path(__file__).resolve().parent.parent


def data(sizes=(30, 7, 19, 25), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=g), torch.randint(0, C, (n,), generator=g))
            for n in sizes]


def model_state():
    torch.manual_seed(0)
    return ft.TrainState.create(Net(d_out=C), ft.optim.adam(1e-2), seed=0)


def scored(model_fn, batches):
    xs = torch.cat([b[0] for b in batches])
    ys = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        logits = model_fn(xs)
    return logits, ys


def classify(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), {"f1": (logits, y), "auroc": (logits.softmax(-1), y),
                                        "cm": (logits, y), "prec": (logits, y),
                                        "rec": (logits, y)}


def all_metrics():
    return {"f1": MulticlassF1Score(C, average="macro"), "auroc": MulticlassAUROC(C),
            "cm": MulticlassConfusionMatrix(C), "prec": MulticlassPrecision(C, average="macro"),
            "rec": MulticlassRecall(C, average="macro")}


def test_evaluate_matches_scikit_learn_on_the_concatenated_predictions():
    state, batches = model_state(), data()
    results = ft.evaluate(ft.eval_step(classify, metrics=all_metrics()), state, batches)
    module = ft.bind(state).eval()
    logits, ys = scored(module, batches)
    pred = logits.argmax(-1)
    assert results["f1"] == pytest.approx(skm.f1_score(ys, pred, average="macro"), abs=1e-6)
    assert results["prec"] == pytest.approx(
        skm.precision_score(ys, pred, average="macro", zero_division=0), abs=1e-6)
    assert results["rec"] == pytest.approx(skm.recall_score(ys, pred, average="macro"),
                                           abs=1e-6)
    assert results["auroc"] == pytest.approx(
        skm.roc_auc_score(ys, logits.softmax(-1), multi_class="ovr"), abs=1e-5)
    assert isinstance(results["cm"], torch.Tensor)  # not a number: returned as it is
    assert results["cm"].tolist() == skm.confusion_matrix(ys, pred, labels=range(C)).tolist()
    # the plain loss is still the batch-size-weighted mean
    assert results["loss"] == pytest.approx(F.cross_entropy(logits, ys).item(), rel=1e-5)
    # and a mean of per-batch F1 would have been wrong here (why this exists)
    per_batch = [skm.f1_score(y, module(x).argmax(-1), average="macro") for x, y in batches]
    assert abs(sum(per_batch) / len(per_batch) - results["f1"]) > 1e-3


def test_metric_collection_names_are_prefixed_with_the_metric_name():
    state, batches = model_state(), data()
    collection = MetricCollection({"f1": MulticlassF1Score(C, average="macro"),
                                   "f1w": MulticlassF1Score(C, average="weighted")})
    ev = ft.eval_step(lambda m, b: {"cls": (m(b[0]), b[1])}, metrics={"cls": collection})
    results = ft.evaluate(ev, state, batches)
    assert sorted(results) == ["cls_f1", "cls_f1w"]  # no plain metric: none averaged
    logits, ys = scored(ft.bind(state).eval(), batches)
    pred = logits.argmax(-1)
    assert results["cls_f1"] == pytest.approx(skm.f1_score(ys, pred, average="macro"), abs=1e-6)
    assert results["cls_f1w"] == pytest.approx(skm.f1_score(ys, pred, average="weighted"),
                                               abs=1e-6)


def test_each_evaluation_has_its_own_copy_and_the_users_metric_is_untouched():
    state, batches = model_state(), data()
    mine = MulticlassF1Score(C, average="macro")
    ev = ft.eval_step(lambda m, b: {"f1": (m(b[0]), b[1])}, metrics={"f1": mine})
    first = ft.evaluate(ev, state, batches)
    second = ft.evaluate(ev, state, batches)
    assert first == second  # the second did not continue the first's state
    half = ft.evaluate(ev, state, batches[:2])
    assert half["f1"] != first["f1"]
    assert mine._update_count == 0 and mine.tp.sum() == 0  # never updated
    # a direct call computes the metric on its one batch
    direct = ev(state, batches[0])
    assert float(direct["f1"]) == pytest.approx(ft.evaluate(ev, state, batches[:1])["f1"])


class CountingF1(MulticlassF1Score):
    """Counts the samples every copy sees (the class attribute is shared by the copies)."""

    seen: list[int] = []

    def update(self, preds, target):
        CountingF1.seen.append(int(target.shape[0]))
        super().update(preds, target)


def test_the_sanity_check_does_not_leak_into_validation():
    CountingF1.seen = []
    train, val = data((12, 12, 12)), data((40, 40, 40, 40, 40), seed=2)  # 200 samples
    ev = ft.eval_step(lambda m, b: {"f1": (m(b[0]), b[1])},
                      metrics={"f1": CountingF1(C, average="macro")})
    step = ft.with_validation(ft.train_step(lambda m, b: F.cross_entropy(m(b[0]), b[1])),
                              ev, val, sanity_steps=2)
    seen = []
    for state, metrics in ft.iterate(step, model_state(), train, epochs=1):
        if "val_f1" in metrics:
            seen = list(CountingF1.seen)
            value = float(metrics["val_f1"])
    assert seen == [40, 40] + [40] * 5  # the sanity check's 2 batches, then 200 samples
    module = ft.bind(state).eval()
    logits, ys = scored(module, val)
    assert value == pytest.approx(skm.f1_score(ys, logits.argmax(-1), average="macro"),
                                  abs=1e-6)


def test_a_validation_metric_can_be_monitored(tmp_path):
    ev = ft.eval_step(lambda m, b: {"f1": (m(b[0]), b[1])},
                      metrics={"f1": MulticlassF1Score(C, average="macro")})
    step = ft.with_validation(ft.train_step(lambda m, b: F.cross_entropy(m(b[0]), b[1])),
                              ev, data((20, 20), seed=3))
    step = ft.early_stop(step, monitor="val_f1", mode="max", patience=1)
    step = ft.with_checkpointing(step, str(tmp_path), monitor="val_f1", mode="max")
    state = ft.fit(step, model_state(), data((16, 16)), epochs=3, logger=False,
                   progress=False, checkpoint=False)
    assert state.slots["validation"]["checks"] >= 2
    assert isinstance(state.slots["validation"]["last"]["val_f1"], float)



def test_evaluation_with_torchmetrics_adds_no_host_sync_per_batch():
    state = model_state()
    # torchmetrics' own argument checks (validate_args=True, its default) read values
    # on the host; without them, the count must not grow with the number of batches
    metrics = {"f1": MulticlassF1Score(C, average="macro", validate_args=False),
               "cm": MulticlassConfusionMatrix(C, validate_args=False)}
    ev = ft.eval_step(classify_two, metrics=metrics)
    counts = []
    for n in (2, 12):
        with CountHostReads() as counter:
            ft.evaluate(ev, state, data((8,) * n))
        counts.append(counter.count)
    assert counts[0] == counts[1]
    assert counts[0] <= 3


def classify_two(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), {"f1": (logits, y), "cm": (logits, y)}


def test_bad_metric_arguments_are_refused_with_names():
    with pytest.raises(ft.ConfigError, match="torchmetrics Metric"):
        ft.eval_step(classify, metrics={"f1": "f1"})
    with pytest.raises(ft.ConfigError, match="'loss' is taken"):
        ft.eval_step(classify, metrics={"loss": MulticlassF1Score(C)})
    with pytest.raises(ft.ConfigError, match="dict of name"):
        ft.eval_step(classify, metrics=[MulticlassF1Score(C)])
    state = model_state()
    missing = ft.eval_step(lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                           metrics={"f1": MulticlassF1Score(C)})
    with pytest.raises(ft.LossError, match=r"batch 0: with metrics= .* of \['f1'\], got a "
                                          "Tensor"):
        ft.evaluate(missing, state, data())
    unnamed = ft.eval_step(lambda m, b: {"acc": m(b[0]).sum()},
                           metrics={"f1": MulticlassF1Score(C)})
    with pytest.raises(ft.LossError, match=r"metrics= has \['f1'\].*no value"):
        ft.evaluate(unnamed, state, data())
    wrong = ft.eval_step(lambda m, b: {"f1": [m(b[0]), b[1]]},
                         metrics={"f1": MulticlassF1Score(C)})
    with pytest.raises(ft.LossError, match="arguments of that metric's update"):
        ft.evaluate(wrong, state, data())


# -- under torchrun: every sample once, all ranks equal -------------------------------------

SCRIPT = Path(__file__).parent / "scripts" / "ddp_metrics.py"


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_ranks_count_every_sample_once_and_agree(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(SCRIPT), str(tmp_path)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in ("fit", "plain", "padded", "lonely"):
        assert r0[key].keys() == r1[key].keys()
        for name in r0[key]:  # all ranks return the same values
            assert torch.equal(torch.as_tensor(r0[key][name]), torch.as_tensor(r1[key][name]))
    # the same model on all 203 samples in one process, scored by scikit-learn
    g = torch.Generator().manual_seed(1)
    x = torch.randn(203, 6, generator=g)
    y = torch.randint(0, C, (203,), generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, C))
    model.load_state_dict(r0["params"])
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(-1)
    f1 = skm.f1_score(y, pred, average="macro")
    for results in (r0["plain"], r0["padded"]):  # a padding DistributedSampler too
        assert results["f1"] == pytest.approx(f1, abs=1e-6)
        assert results["auroc"] == pytest.approx(
            skm.roc_auc_score(y, logits.softmax(-1), multi_class="ovr"), abs=1e-5)
        assert results["cm"].tolist() == skm.confusion_matrix(y, pred).tolist()
        assert int(results["cm"].sum()) == 203  # every sample exactly once
        assert results["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert r0["fit"]["val_f1"] == pytest.approx(f1, abs=1e-6)  # validation under with_ddp
    # one batch for two ranks: rank 1 had none, yet takes part in the sync
    few = r0["lonely"]
    assert few["f1"] == pytest.approx(skm.f1_score(y[:5], pred[:5], average="macro"), abs=1e-6)
    assert few["cm"].tolist() == skm.confusion_matrix(y[:5], pred[:5], labels=range(C)).tolist()
    assert few["loss"] == pytest.approx(F.cross_entropy(logits[:5], y[:5]).item(), rel=1e-5)
    # training epoch metrics: two ranks with batch 8 see what one process with batch 16 sees
    torch.manual_seed(0)
    one = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, C))
    core = ft.train_step(lambda m, b: (F.cross_entropy(m(b[0]), b[1]),
                                       {"f1": (m(b[0]), b[1])}),
                         metrics={"f1": MulticlassF1Score(C, average="macro")})
    train = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    for _, metrics in ft.iterate(core, ft.TrainState.create(one, ft.optim.adam(1e-2), seed=3),
                                 train, epochs=2):
        pass
    assert r0["fit"]["f1_epoch"] == pytest.approx(float(metrics["f1_epoch"]), abs=1e-6)


# -- training epoch metrics ------------------------------------------------------------------

def recording_loss(seen):
    def loss_fn(model, batch):
        x, y = batch
        logits = model(x)
        seen.append((logits.detach().argmax(-1), y))
        return F.cross_entropy(logits, y), {"f1": (logits, y)}
    return loss_fn


def train_metrics():
    return {"f1": MulticlassF1Score(C, average="macro")}


def test_train_step_metrics_are_computed_once_per_epoch_as_name_epoch(tmp_path):
    seen: list = []
    step = ft.train_step(recording_loss(seen), metrics=train_metrics())
    csv = ft.loggers.CSV(str(tmp_path))
    step = ft.with_logging(step, [csv], every_n_steps=2)
    batches = data((12, 12, 12, 5))
    epochs = []
    for _, metrics in ft.iterate(step, model_state(), batches, epochs=2):
        if "f1_epoch" in metrics:
            epochs.append(float(metrics["f1_epoch"]))
    assert len(epochs) == 2
    for e, value in enumerate(epochs):  # each epoch on its own (reset in between)
        part = seen[4 * e:4 * e + 4]
        pred, ys = torch.cat([p for p, _ in part]), torch.cat([t for _, t in part])
        assert value == pytest.approx(skm.f1_score(ys, pred, average="macro"), abs=1e-6)
    rows = open(csv.path).read().splitlines()
    assert "f1_epoch" in rows[0].split(",")


def test_a_direct_call_stays_pure_and_carries_the_metric_state():
    step = ft.train_step(recording_loss([]), metrics=train_metrics())
    state = model_state()
    batches = data((12, 12))
    one, _ = step(state, batches[0])
    assert "train_metrics" not in state.slots  # the input is untouched
    two, _ = step(one, batches[1])
    tp = one.slots["train_metrics"]["f1"]["tp"].clone()
    assert one.slots["train_metrics"]["f1"]["__updates__"] == 1
    assert two.slots["train_metrics"]["f1"]["__updates__"] == 2
    assert torch.equal(one.slots["train_metrics"]["f1"]["tp"], tp)  # not changed by two
    _, ends = ft.train_step(recording_loss([]), metrics=train_metrics()).epoch_end(two)
    assert sorted(ends) == ["f1_epoch"]


def test_a_run_resumed_mid_epoch_from_a_checkpoint_gives_the_same_epoch_metric(tmp_path):
    batches = data((12, 12, 12, 12, 12))

    def run(state, **kw):
        step = ft.train_step(recording_loss([]), metrics=train_metrics())
        last = {}
        for state, metrics in ft.iterate(step, state, batches, **kw):
            last = metrics
        return state, last

    _, whole = run(model_state(), epochs=1)
    part, _ = run(model_state(), max_steps=3)  # stops after batch 3 of 5
    ft.save(tmp_path / "mid.ckpt", part)
    resumed = ft.load(tmp_path / "mid.ckpt", like=model_state())
    assert resumed.slots["train_metrics"]["f1"]["__updates__"] == 3
    _, rest = run(resumed, epochs=1)
    assert float(rest["f1_epoch"]) == float(whole["f1_epoch"])  # bitwise


def test_a_checkpoint_of_other_metrics_is_refused_naming_the_field():
    step = ft.train_step(recording_loss([]), metrics=train_metrics())
    state = model_state()
    bad = state.replace(slots={"train_metrics": {"acc": {}}})
    with pytest.raises(ft.ConfigError, match=r"slot 'train_metrics': expected a dict with "
                       r"keys \['__partial__', '__world__', 'f1'\], found keys \['acc'\]"):
        for _ in ft.iterate(step, bad, data((12,)), epochs=1):
            pass
    good = ft.train_step(recording_loss([]), metrics=train_metrics()).init(state)
    entry = {**good.slots["train_metrics"]["f1"], "tp": torch.zeros(2)}
    bad = state.replace(slots={"train_metrics": {**good.slots["train_metrics"], "f1": entry}})
    with pytest.raises(ft.ConfigError, match=r"field f1.tp: expected a tensor of shape \(4,\) "
                                             r"and dtype torch.int64, found a tensor of shape"):
        for _ in ft.iterate(step, bad, data((12,)), epochs=1):
            pass


def test_train_metrics_with_a_collection_and_accumulation():
    collection = MetricCollection({"f1": MulticlassF1Score(C, average="macro"),
                                   "prec": MulticlassPrecision(C, average="macro")})
    seen: list = []

    def loss_fn(model, batch):
        x, y = batch
        logits = model(x)
        seen.append((logits.detach().argmax(-1), y))
        return F.cross_entropy(logits, y), {"cls": (logits, y)}
    step = ft.with_accumulation(ft.train_step(loss_fn, metrics={"cls": collection}), 2)
    for _, metrics in ft.iterate(step, model_state(), data((12, 12)), epochs=1):
        pass
    pred, ys = torch.cat([p for p, _ in seen]), torch.cat([t for _, t in seen])
    assert len(seen) == 4  # micro-batches, each an update
    assert float(metrics["cls_f1_epoch"]) == pytest.approx(
        skm.f1_score(ys, pred, average="macro"), abs=1e-6)
    assert float(metrics["cls_prec_epoch"]) == pytest.approx(
        skm.precision_score(ys, pred, average="macro", zero_division=0), abs=1e-6)


def test_a_non_scalar_training_metric_is_refused_at_the_epoch_end():
    step = ft.train_step(lambda m, b: (F.cross_entropy(m(b[0]), b[1]), {"cm": (m(b[0]), b[1])}),
                         metrics={"cm": MulticlassConfusionMatrix(C)})
    with pytest.raises(ft.ConfigError, match="'cm' computed a tensor of shape .4, 4."):
        for _ in ft.iterate(step, model_state(), data((12,)), epochs=1):
            pass


def test_a_confusion_matrix_in_validation_is_refused_at_the_sanity_check():
    ev = ft.eval_step(lambda m, b: {"cm": (m(b[0]), b[1])},
                      metrics={"cm": MulticlassConfusionMatrix(C)})
    step = ft.with_validation(ft.train_step(lambda m, b: F.cross_entropy(m(b[0]), b[1])),
                              ev, data((8, 8)))
    with pytest.raises(ft.ConfigError, match=r"'cm' computed a tensor of shape \(4, 4\), "
                                             "not a number"):
        for _ in ft.iterate(step, model_state(), data((8,)), epochs=1):
            pass


# -- batch sizes -------------------------------------------------------------------------------

Pair = collections.namedtuple("Pair", "x y")


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    source: str = "here"


class Opaque:
    def __init__(self, x, y):
        self.x, self.y = x, y


def test_batch_size_is_inferred_from_structures():
    x, y = torch.zeros(5, 6), torch.zeros(5)
    assert batch_size(Pair(x, y)) == 5
    assert batch_size(Batch(x, y)) == 5
    assert batch_size({"inputs": {"x": x, "scale": torch.tensor(2.0)}, "y": [y], "id": "a"}) == 5
    assert batch_size(["a", "b", "c"]) == 3  # plain values: counted
    with pytest.raises(ft.DataError, match=r"leading dimensions differ \(\.x: 5, \.y: 4\)"):
        batch_size(Pair(x, torch.zeros(4)))
    with pytest.raises(ft.DataError, match="batch size of a Opaque.*batch_size="):
        batch_size(Opaque(x, y))
    with pytest.raises(ft.DataError, match="no tensor with a leading dimension"):
        batch_size(torch.tensor(1.0))


def weighted(model, batch):
    x, y = (batch.x, batch.y) if not isinstance(batch, dict) else (batch["x"], batch["y"])
    return F.cross_entropy(model(x), y.long())


def test_evaluate_weights_structured_batches_and_refuses_what_it_cannot_size():
    state = model_state()
    pairs = data((30, 7, 19))
    expected = ft.evaluate(ft.eval_step(lambda m, b: F.cross_entropy(m(b[0]), b[1])), state,
                           pairs)["loss"]
    for wrap in (lambda x, y: Pair(x, y), lambda x, y: Batch(x, y),
                 lambda x, y: {"x": x, "y": y}):
        batches = [wrap(x, y) for x, y in pairs]
        got = ft.evaluate(ft.eval_step(weighted), state, batches)["loss"]
        assert got == pytest.approx(expected, rel=1e-6)  # weighted by 30, 7, 19
    opaque = [Opaque(x, y) for x, y in pairs]
    with pytest.raises(ft.DataError, match="batch 0: cannot tell the batch size of a Opaque"):
        ft.evaluate(ft.eval_step(weighted), state, opaque)
    size = lambda b: int(b.x.shape[0])  # noqa: E731
    assert ft.evaluate(ft.eval_step(weighted), state, opaque, batch_size=size)["loss"] == \
        pytest.approx(expected, rel=1e-6)
    # the evaluator can carry it, so with_validation uses it too
    assert ft.evaluate(ft.eval_step(weighted, batch_size=size), state, opaque)["loss"] == \
        pytest.approx(expected, rel=1e-6)
    # only stateful metrics: no average, no size needed
    f1 = ft.eval_step(lambda m, b: {"f1": (m(b.x), b.y)},
                      metrics={"f1": MulticlassF1Score(C, average="macro")})
    assert ft.evaluate(f1, state, opaque)["f1"] == \
        ft.evaluate(f1, state, [Pair(x, y) for x, y in pairs])["f1"]
    with pytest.raises(ft.ConfigError, match="batch_size must be a function"):
        ft.eval_step(weighted, batch_size=4)


def test_logging_takes_batch_size_for_batches_it_cannot_size(tmp_path):
    opaque = [Opaque(x, y) for x, y in data((12, 4))]
    core = ft.train_step(weighted)
    with pytest.raises(ft.DataError, match="cannot tell the batch size of a Opaque"):
        ft.fit(ft.with_logging(core, [ft.loggers.CSV(str(tmp_path))]), model_state(), opaque,
               epochs=1, progress=False, checkpoint=False)
    csv = ft.loggers.CSV(str(tmp_path / "b"))
    seen = []

    def size(b):
        seen.append(int(b.x.shape[0]))
        return seen[-1]
    ft.fit(ft.with_logging(core, [csv], batch_size=size), model_state(), opaque, epochs=1,
           progress=False, checkpoint=False)
    assert seen == [12, 4]


def test_a_mid_epoch_checkpoint_of_a_data_parallel_run_refuses_that_epochs_metrics(caplog):
    # under with_ddp a checkpoint holds rank 0's metric states only: the resumed epoch's
    # value would miss the other ranks' batches, so it is not reported (a warning says
    # why); the next whole epoch is reported again, exactly
    step = ft.train_step(recording_loss([]), metrics=train_metrics())
    part = None
    for part, _ in ft.iterate(step, model_state(), data((12, 12, 12)), max_steps=2):
        pass
    slot = dict(part.slots["train_metrics"], __world__=2)  # as if saved by rank 0 of 2
    resumed = part.replace(slots={**part.slots, "train_metrics": slot})
    seen: list = []
    step = ft.train_step(recording_loss(seen), metrics=train_metrics())
    ends = []
    with caplog.at_level("WARNING", logger="ftrain"):
        for state, metrics in ft.iterate(step, resumed, data((12, 12, 12)), epochs=2):
            if state.slots["loop"]["batch"] == 0:  # an epoch's last step
                ends.append(dict(metrics))
    assert "are not reported for this epoch" in caplog.text
    assert len(ends) == 2
    assert "f1_epoch" not in ends[0]  # refused, not partial
    pred = torch.cat([p for p, _ in seen[1:]])  # the second epoch's three batches
    ys = torch.cat([y for _, y in seen[1:]])
    assert float(ends[1]["f1_epoch"]) == pytest.approx(
        skm.f1_score(ys, pred, average="macro"), abs=1e-6)


def test_compile_and_vmap_refuse_metrics_they_cannot_compute():
    from torchmetrics.classification import MulticlassF1Score

    f1 = MulticlassF1Score(3, average="macro")

    def loss(model, batch):
        logits = model(batch[0])
        return torch.nn.functional.cross_entropy(logits, batch[1]), {"f1": (logits, batch[1])}

    step = ft.train_step(loss, metrics={"f1": f1})
    with pytest.raises(ft.ConfigError, match="ft.compile does not support"):
        ft.compile(step)
    with pytest.raises(ft.ConfigError, match="ft.vmap does not support train_step"):
        ft.vmap(step)
    with pytest.raises(ft.ConfigError, match="ft.vmap does not support eval_step"):
        ft.vmap(ft.eval_step(loss, metrics={"f1": f1}))
    ft.compile(ft.train_step(lambda m, b: m(b[0]).sum()))  # without metrics: still fine
