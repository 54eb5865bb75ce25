"""`ft.with_fsdp` against a hand-written FSDP2 loop on the same model, and the memory per
rank of parameters + optimizer state against `ft.with_ddp` (2 processes under torchrun;
gloo on the CPU, nccl on GPUs when every rank has one).

Model and data: an MLP 64-512-512-512-10 (ReLU, ~0.6 M parameters), cross-entropy,
AdamW lr 1e-3, batch 32 per rank, S synthetic samples (S = 6,400; 3,200 with `--quick`).

Variants (each in every round, order rotating between rounds):

- hand: `fully_shard` on each Linear, then on the model; `torch.optim.AdamW(fused=True)`
  over the DTensor parameters; a `DataLoader` over a `DistributedSampler`; zero_grad;
  forward; loss; backward; step,
- ft: `ft.fit(ft.with_fsdp(ft.train_step(loss_fn)), state, loader, epochs=k, logger=False,
  checkpoint=False, progress=False)` with `ft.optim.adamw` (fused kernel by default).
- ddp (memory only): `ft.with_ddp` on the same model, for the unsharded bytes per rank.

Method: the script launches itself with `python -m torch.distributed.run --standalone
--nproc_per_node=2` (a hidden flag selects worker mode; OMP_NUM_THREADS=1). Each worker
warms every variant up once, then runs R rounds; in a round each variant is timed for 1
epoch and for 3 epochs (a fresh model, optimizer and loader each call, between barriers),
and steps/s = (steps(3) - steps(1)) / (t(3) - t(1)), so start-up (sharding, lazy init)
cancels. ft / hand per round (paired), median and range; target >= 0.95x. Bytes per rank:
the local shards of params and optimizer state (exp_avg, exp_avg_sq, step) after a run,
for ft, hand and ddp; target ft / ddp about 1/world.

Caveat: on a 2-core machine the two workers share the cores with gloo's threads, so the
absolute numbers are small; the ratio is what the script is for.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

WORKER = "--worker"


def _model():  # type: ignore[no-untyped-def]
    import torch
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def _bytes(tensors) -> int:  # type: ignore[no-untyped-def]
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def worker(samples: int, rounds: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.utils import _pytree as pytree
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    import ftrain as ft

    torch.set_num_threads(1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = ft.local_device()
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(samples, 64, generator=g),
                         torch.randint(0, 10, (samples,), generator=g))
    batch = 32

    def loss_fn(m, b):  # type: ignore[no-untyped-def]
        x, y = b
        return torch.nn.functional.cross_entropy(m(x.to(device)), y.to(device))

    def hand(epochs: int) -> tuple[int, int]:
        from torch.distributed.fsdp import fully_shard
        model = _model().to(device)
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        sampler = DistributedSampler(data, world, rank, shuffle=True, seed=0)
        loader = DataLoader(data, batch_size=batch, sampler=sampler)
        steps = 0
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for b in loader:
                opt.zero_grad()
                loss_fn(model, b).backward()
                opt.step()
                steps += 1
        return steps, _bytes(list(model.parameters()) + [
            t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)])

    def ft_run(epochs: int, layer=ft.with_fsdp) -> tuple[int, int]:  # type: ignore
        state = ft.TrainState.create(_model().to(device), ft.optim.adamw(1e-3),
                                     seed=0)
        step = layer(ft.train_step(loss_fn))
        state = ft.fit(step, state, DataLoader(data, batch_size=batch, shuffle=True),
                       epochs=epochs, logger=False, checkpoint=False, progress=False)
        steps = state.step
        tensors = [t for t in pytree.tree_leaves((state.params, state.opt_state))
                   if isinstance(t, torch.Tensor)]
        return steps, _bytes(tensors)

    variants = {"hand": hand, "ft": ft_run}

    def timed(fn, epochs: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
        dist.barrier()
        t0 = time.perf_counter()
        steps, _ = fn(epochs)
        dist.barrier()
        return time.perf_counter() - t0, steps

    memory = {"hand": hand(1)[1], "ft": ft_run(1)[1],
              "ddp": ft_run(1, ft.with_ddp)[1]}
    results: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % 2:] + names[:r % 2]:
            t1, s1 = timed(variants[name], 1)
            t3, s3 = timed(variants[name], 3)
            results[name].append((s3 - s1) / (t3 - t1))
    if rank == 0:
        dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        with open(out, "w") as f:
            json.dump({"rates": results, "memory": memory, "world": world,
                       "device": f"{dev} ({backend})"}, f)
    dist.destroy_process_group()


def main() -> int:
    quick = "--quick" in sys.argv
    samples, rounds = (3200, 3) if quick else (6400, 5)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node=2", os.path.abspath(__file__), WORKER,
                               str(samples), str(rounds), out], env=env, timeout=1200)
        if done.returncode != 0:
            print("ft / hand, 2 processes: FAILED (a worker failed)", flush=True)
            return 1
        with open(out) as f:
            res = json.load(f)
    rates, mem, world = res["rates"], res["memory"], res["world"]
    ratios = [a / b for a, b in zip(rates["ft"], rates["hand"])]
    med = statistics.median(ratios)
    print("== fsdp.py summary ==")
    print(f"ft / hand, {world} processes (FSDP2): {med:.3f}x (rounds {min(ratios):.3f}-"
          f"{max(ratios):.3f}), target >= 0.95x: {'PASS' if med >= 0.95 else 'FAIL'}")
    print(f"device: {res['device']}; steps/s per rank, median of {len(ratios)} rounds: "
          f"hand {statistics.median(rates['hand']):.1f}, ft {statistics.median(rates['ft']):.1f}")
    share = mem["ft"] / mem["ddp"]
    print(f"params + optimizer state per rank: ft fsdp {mem['ft'] / 1e6:.2f} MB, hand fsdp "
          f"{mem['hand'] / 1e6:.2f} MB, ft ddp {mem['ddp'] / 1e6:.2f} MB; fsdp / ddp = "
          f"{share:.3f} (1/world = {1 / world:.3f}): "
          f"{'PASS' if share <= 1.1 / world else 'FAIL'}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == WORKER:
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(main())
