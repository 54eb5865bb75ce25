"""Run by tests/test_epoch_metrics.py under torchrun (2 ranks, gloo): torchmetrics
metrics in validation, in ft.evaluate and in the training step, on an uneven dataset.

usage: ddp_metrics.py OUT
"""

import sys

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler
from torchmetrics.classification import (
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

import ftrain as ft

C = 4


def main() -> None:
    out = sys.argv[1]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(203, 6, generator=g)  # 203 samples: uneven over 2 ranks
    y = torch.randint(0, C, (203,), generator=g)
    val = DataLoader(TensorDataset(x, y), batch_size=16)
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=8)

    def fn(m, b):
        logits = m(b[0])
        return F.cross_entropy(logits, b[1]), {"f1": (logits, b[1]),
                                               "auroc": (logits.softmax(-1), b[1]),
                                               "cm": (logits, b[1])}

    def metrics():
        return {"f1": MulticlassF1Score(C, average="macro"), "auroc": MulticlassAUROC(C),
                "cm": MulticlassConfusionMatrix(C)}

    def val_fn(m, b):
        logits = m(b[0])
        return F.cross_entropy(logits, b[1]), {"f1": (logits, b[1])}

    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, C))
    state = ft.TrainState.create(model, ft.optim.adam(1e-2), seed=3)
    core = ft.train_step(lambda m, b: (F.cross_entropy(m(b[0]), b[1]),
                                       {"f1": (m(b[0]), b[1])}),
                         metrics={"f1": MulticlassF1Score(C, average="macro")})
    step = ft.with_validation(ft.with_ddp(core), ft.eval_step(
        val_fn, metrics={"f1": MulticlassF1Score(C, average="macro")}), val)
    last: dict = {}
    for state, m in ft.iterate(step, state, train, epochs=2):
        if "val_f1" in m:
            last = {k: float(v) for k, v in m.items() if k in ("val_f1", "val_loss",
                                                                  "f1_epoch")}
    state = state.copy()
    rank = torch.distributed.get_rank()
    evaluator = ft.eval_step(fn, metrics=metrics())
    plain = ft.evaluate(evaluator, state, val, distributed=True)
    own = DataLoader(TensorDataset(x, y), batch_size=16,  # pads rank 1 with a repeat
                     sampler=DistributedSampler(TensorDataset(x, y), shuffle=False))
    padded = ft.evaluate(evaluator, state, own, distributed=True)
    # one batch for two ranks: rank 1 has none (its metric states stay empty)
    lonely = ft.evaluate(evaluator, state, [(x[:5], y[:5])], distributed=True)
    torch.save({"params": state.params, "fit": last, "plain": plain, "padded": padded,
                "lonely": lonely},
               f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    main()
