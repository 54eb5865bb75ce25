"""Trained by tests/test_ddp.py under torchrun (or as one process).

usage: ddp_train.py OUT MODE [BATCH] [MAX_STEPS]
MODE: train | accum | fail | fail-caught | resume | mismatch
"""

import sys
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import ftrain as ft


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    max_steps = int(sys.argv[4]) if len(sys.argv) > 4 else 6
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=g)
    y = (x.sum(1) > 0).long()
    data = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


    def loss_fn(m, b):
        xb, yb = b
        if mode.startswith("fail") and torch.distributed.get_rank() == 1 and FAIL_AT[0] == 3:
            raise ValueError("boom on rank 1 at step 3")
        FAIL_AT[0] += 1
        loss = torch.nn.functional.cross_entropy(m(xb), yb)
        return loss, {"acc": (m(xb).argmax(1) == yb).float().mean()}


    FAIL_AT = [0]
    state = ft.TrainState.create(model, ft.optim.adam(1e-2), seed=3)
    if mode == "mismatch" and torch.distributed.is_torchelastic_launched() and \
            int(__import__("os").environ["RANK"]) == 1:
        state = state.replace(step=5)  # as if rank 1 had loaded another checkpoint
    step = ft.with_ddp(ft.train_step(loss_fn))
    if mode == "accum":  # float16 scaling and 2 micro-batches: DDP syncs the last only
        step = ft.with_accumulation(ft.with_amp(step, torch.float16), 2)
    step = ft.with_validation(step, ft.eval_step(loss_fn if mode == "x" else
                                                 lambda m, b: torch.nn.functional.cross_entropy(
                                                     m(b[0]), b[1])), data)
    step = ft.with_logging(step, [ft.loggers.CSV(out + "/logs")], every_n_steps=2)
    step = ft.with_checkpointing(step, out + "/ckpt", every_n_steps=2)
    try:
        state = ft.fit(step, state, data, max_steps=max_steps, progress=False,
                       resume="auto" if mode == "resume" else None)
    except ft.StepError as err:
        if mode != "fail-caught":
            raise
        print(f"caught: {err}; staying alive", flush=True)
        time.sleep(30)
        sys.exit(3)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    final = ft.evaluate(ft.eval_step(lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])),
                        state, data, distributed=torch.distributed.is_initialized())
    # a direct (pure) call under with_ddp all-reduces gradients explicitly: ranks with
    # different batches still end with the same params
    pure = ft.with_ddp(ft.train_step(lambda m, b: torch.nn.functional.cross_entropy(
        m(b[0]), b[1])))
    mine = (x[rank::2][:8], y[rank::2][:8])
    after, _ = pure(state, mine)

    def branch(m, b):  # rank 1 leaves the last layer unused: no gradient for it there
        h = m[0](b[0])
        out = m[2](torch.tanh(h)) if rank == 0 else h[:, :2]
        return torch.nn.functional.cross_entropy(out, b[1])
    branched, _ = ft.with_ddp(ft.train_step(branch))(state, mine)
    torch.save({"params": state.params, "step": state.step, "val": final,
                "pure": after.params, "branch": branched.params},
               f"{out}/rank{rank}.pt")
    print(f"rank {rank} done at step {state.step}", flush=True)


if __name__ == "__main__":
    main()
