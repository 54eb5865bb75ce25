"""Run by tests/test_fit_extras.py and tests/test_predict_writer.py under torchrun.

usage: ddp_extras.py OUT MODE
MODE max_time: with_ddp training whose ranks are given different max_time budgets (rank 0
  0.6 s, rank 1 60 s): both must stop after the same step, with a checkpoint. Writes
  OUT/rank<r>.json: {"step", "reason"}.
MODE predict: ft.predict(write_to=OUT/preds..., distributed=True) of a map-style loader
  (7 batches) and of a list of batches (5); rank 0 reads them back and compares them with
  a one-process prediction; then in memory (gathered on every rank). Writes
  OUT/rank<r>.json: {"batches": this rank's count, ...}.
"""

import json
import os
import sys
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import ftrain as ft


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 5, generator=g)
    y = (x.sum(1) > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    state = ft.TrainState.create(model, ft.optim.adam(1e-2), seed=3)
    rank = int(os.environ.get("RANK", "0"))
    result: dict = {}
    if mode == "max_time":
        def loss_fn(m, b):
            time.sleep(0.02)
            return torch.nn.functional.cross_entropy(m(b[0]), b[1])

        data = DataLoader(TensorDataset(x, y), batch_size=2)  # 13 steps per epoch per rank
        step = ft.with_ddp(ft.train_step(loss_fn))
        state = ft.fit(step, state, data, epochs=100, progress=False, logger=False,
                       root_dir=out, max_time=0.6 if rank == 0 else 60, summary=False)
        last = os.path.join(out, "checkpoints", "version_0", "last.ckpt")
        saved = torch.load(last, weights_only=True)["step"] if os.path.exists(last) else None
        result = {"step": state.step, "reason": ft.stop_reason(state), "saved": saved}
    elif mode == "predict":
        loader = DataLoader(TensorDataset(x, y), batch_size=8)  # 7 batches, the last of 2
        batches = [x[i:i + 11] for i in range(0, 50, 11)]  # 5 batches
        for name, data in (("loader", loader), ("list", batches)):
            folder = ft.predict(state, data, write_to=os.path.join(out, name),
                                distributed=True, batches_per_file=2)
            mine = sorted(f for f in os.listdir(folder) if f.startswith(f"predictions-r{rank:03d}"))
            result[name] = len(mine)
            if rank == 0:
                got = ft.read_predictions(folder)
                want = ft.predict(state, data)  # one process, all batches
                result[name + "_equal"] = len(got) == len(want) and all(
                    torch.equal(a, b) for a, b in zip(got, want))
        gathered = ft.predict(state, batches, distributed=True)  # in memory: gathered
        result["gathered_equal"] = len(gathered) == 5 and all(
            torch.equal(a, b) for a, b in zip(gathered, ft.predict(state, batches)))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
