"""Run by tests/test_predict_ddp.py under torchrun (2 processes, gloo on the CPU).

usage: ddp_predict.py OUT

Trains a BatchNorm + dropout model under with_ddp, then predicts in memory across the
ranks and compares every result with the one-process prediction of rank 0's state (its
checkpoint, loaded: after with_ddp the ranks' params are equal, their BatchNorm
statistics are not). Writes OUT/rank<r>.json: {case: value}; a case that
compares is True when the gathered outputs equal the one-process ones exactly (types,
dict order, dtypes, shapes, devices, values).
"""

from __future__ import annotations

import collections
import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

import ftrain as ft

Pair = collections.namedtuple("Pair", "logits label")
OFF = {"logger": False, "checkpoint": False, "progress": False}


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested outputs, tensors bitwise with dtype, shape and device."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device) and \
            torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def rich(model: Any, batch: Any) -> Any:
    """Outputs of every kind the gather handles: nested containers, several dtypes
    (bfloat16, int64, bool), a non-contiguous view, 0-d and empty tensors, and plain
    Python values that travel with the structure."""
    x = batch[0]
    logits = model(x)
    return {"pair": Pair(logits, logits.argmax(-1)),
            "extras": (logits.bfloat16(), logits > 0, logits.t(), logits.sum(),
                       torch.empty(0, 3)),
            "n": int(x.shape[0]), "tag": "batch", "none": None}


def main() -> None:
    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(13, 5, generator=g), torch.randint(0, 3, (13,), generator=g)
    dataset = TensorDataset(x, y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))

    def loss_fn(m: Any, b: Any) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    step = ft.with_ddp(ft.train_step(loss_fn))
    # 12 samples: 3 steps of 2 per rank (BatchNorm cannot train on a batch of one)
    train = DataLoader(TensorDataset(x[:12], y[:12]), batch_size=2, shuffle=True)
    # 13 samples in batches of 3: 5 batches (the last of 1), 3 on rank 0 and 2 on rank 1;
    # 13 is not a multiple of world * batch = 6
    loader = DataLoader(dataset, batch_size=3)
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 13, 4)]  # 4 batches: 4, 4, 4, 1
    result: dict[str, Any] = {}
    calls: list[int] = []

    def counted(m: Any, b: Any) -> Any:
        calls.append(int(b[0].shape[0]))
        return m(b[0])

    # inside the with_ddp loop: sharded by the run (distributed=None), gathered
    start = ft.TrainState.create(model, ft.optim.adam(1e-2), seed=1)
    for running, _ in ft.iterate(step, start.copy(), train, epochs=1):
        if running.step == 3:
            inside = ft.predict(running, loader, counted)
            result["in_loop_calls"] = list(calls)
            alone = [ft.predict(running, loader, distributed=False)]  # this rank's model
            dist.broadcast_object_list(alone, src=0)  # rank 0's: what it checkpoints
            result["in_loop"] = same(inside, alone[0])
            result["in_loop_len"] = len(inside)
            break
    trained = ft.fit(step, start, train, epochs=2, **OFF)
    # the one-process reference: rank 0's checkpoint, loaded by a process of its own
    path = os.path.join(out, "trained.ckpt")
    if rank == 0:
        ft.save(path, trained)
    dist.barrier()
    state = ft.load(path, like=trained)
    result["params_equal"] = all(torch.equal(trained.params[k], v)
                                 for k, v in state.params.items())
    # each rank's BatchNorm statistics follow its own last batch: rank 1's differ
    result["buffers_equal"] = all(torch.equal(trained.buffers[k], v)
                                  for k, v in state.buffers.items())

    def compare(name: str, data: Any, fn: Any = None, **kw: Any) -> None:
        gathered = ft.predict(trained, data, fn, distributed=True, **kw)
        alone = ft.predict(state, data, fn, **kw)  # one process, rank 0's model
        result[name] = same(gathered, alone)
        result[name + "_len"] = len(gathered)

    compare("loader", loader)
    compare("list_rich", batches, rich)
    compare("one_batch", batches[:1], rich)  # rank 1 has no batch at all
    compare("no_batch", [])
    compare("limited", loader, limit_batches=3)
    # outputs only one rank cannot send: every rank raises, naming that rank
    def sparse_on_rank_1(m: Any, b: Any) -> Any:
        out = m(b[0])
        return out.to_sparse() if rank == 1 else out
    try:
        ft.predict(trained, loader, sparse_on_rank_1, distributed=True)
        result["sparse"] = "no error"
    except ft.ConfigError as err:
        result["sparse"] = str(err)
    # the same data written to a folder by each rank, then gathered in memory: equal
    folder = ft.predict(trained, loader, write_to=os.path.join(out, "preds"),
                        distributed=True)
    result["written"] = same(ft.read_predictions(folder), ft.predict(state, loader))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
