"""Save and load time of `ft.save` / `ft.load` against plain `torch.save` / `torch.load`.

State: an MLP of four `nn.Linear(5000, 5000)` layers (100.02M params, 400 MB fp32) with
`ft.optim.adam` state after one real step (exp_avg and exp_avg_sq: another 800 MB), so a
checkpoint file is ~1.2 GB. `--quick` uses four `Linear(1000, 1000)` (4.0M params, ~48 MB
file). If the disk (three files at once) or the free memory (about four copies of the
state) is too small for Adam, the state uses `ft.optim.sgd` without momentum (params only,
~400 MB files) and the output says so.

Variants, all writing the same tensors (the state's params and optimizer state) to a new
file in one temporary folder (`--dir`, default the system temp dir, on the same filesystem
as /tmp):

- save: `ft.save(path, state)`: atomic (temporary file in the folder, flush, fsync,
  rename, fsync of the folder);
- save: `torch.save({"params": ..., "opt_state": ...}, path)`: no fsync, so the data may
  still be in the page cache when it returns;
- save: the same `torch.save` into an open file, then `f.flush(); os.fsync(f.fileno())`:
  the like-for-like baseline for `ft.save`'s durability (ft adds a rename and a folder
  fsync on top);
- load: `ft.load(path, like=state)` (weights_only, strict checks of names, shapes and
  dtypes against `like`);
- load: `torch.load(path, weights_only=True)` of the plain file.

Each repeat runs every variant once, in an order that rotates between repeats (so a slow
spell of a shared machine hits all of them); a warm-up repeat is not counted. A variant's
previous file is deleted before it saves (untimed), so every save creates a new file, and
loaded states are dropped (untimed) before the next variant. Before each timed call,
`os.sync()` (untimed) writes out what earlier calls left dirty (the unsynced plain save's
1.2 GB, the deletion), so no call pays for the write-back of another. Reported: median seconds per
variant, and ratios ft/plain as the median of per-repeat ratios (paired), with their range.

Page cache: dropping the kernel's caches needs root, so it is not attempted. Every load
reads a file that was just written and is (on a machine with free memory) still in the
page cache: loads measure deserialisation and memory copies, not the disk. Saves without
fsync likewise end when the data is in the page cache; saves with fsync wait for the disk.

Run: `python benchmarks/checkpoint.py` (5 repeats, about 1-2 minutes) or `--quick` (small
state, 1 repeat, < 30 s).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ftrain as ft

TARGET = 1.2  # ft.save / ft.load time <= 1.2x the plain torch.save / torch.load


def make_model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(width, width))
        if i < layers - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def tensor_bytes(tree: Any) -> int:
    leaves = torch.utils._pytree.tree_leaves(tree)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def mem_available() -> int | None:
    """MemAvailable in bytes (Linux), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def build_state(width: int, layers: int, folder: str) -> tuple[ft.TrainState, str]:
    """A state with real optimizer state after one step; Adam if disk and memory allow."""
    params = layers * (width * width + width)
    adam_file = 3 * 4 * params  # params + exp_avg + exp_avg_sq, fp32
    # at once: the state, one loaded copy, and the pure step's copy while building
    need_mem = 4 * adam_file
    need_disk = 3 * adam_file + (1 << 30)  # ft's, plain and plain+fsync files, + 1 GiB
    free_disk = shutil.disk_usage(folder).free
    free_mem = mem_available()
    if free_disk < need_disk or (free_mem is not None and free_mem < need_mem):
        print(f"note: not enough room for Adam state (disk free {free_disk / 1e9:.1f} GB, "
              f"need {need_disk / 1e9:.1f}; memory available "
              f"{(free_mem or 0) / 1e9:.1f} GB, need {need_mem / 1e9:.1f}): using SGD "
              "without momentum (params only)")
        optimizer, name = ft.optim.sgd(1e-3), "SGD (no momentum state)"
    else:
        optimizer, name = ft.optim.adam(1e-3), "Adam"
    state = ft.TrainState.create(make_model(width, layers), optimizer)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, width, generator=g), torch.randn(8, width, generator=g))

    def loss_fn(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(model(b[0]), b[1])

    # one pure step: optimizer state holds real (non-zero) moments and step counts
    state, _ = ft.train_step(loss_fn)(state, batch)
    gc.collect()
    return state, name


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    width, layers = (1000, 4) if args.quick else (args.width, args.layers)
    repeats = 1 if args.quick else args.repeats
    parent = args.dir or tempfile.gettempdir()
    tmp = tempfile.mkdtemp(prefix="ftrain-ckpt-bench-", dir=parent)
    try:
        state, opt_name = build_state(width, layers, tmp)
        plain = {"params": state.params, "opt_state": state.opt_state}
        nbytes = tensor_bytes(plain)
        n_params = sum(p.numel() for p in state.params.values())
        print(f"torch {torch.__version__}, 1 thread; {layers} x Linear({width}, {width}): "
              f"{n_params / 1e6:.2f}M params, {opt_name}; tensors {nbytes / 1e9:.3f} GB; "
              f"folder {tmp} (free {shutil.disk_usage(tmp).free / 1e9:.0f} GB); "
              f"{repeats} repeat(s) after a warm-up", flush=True)

        ft_path = os.path.join(tmp, "ft.ckpt")
        plain_path = os.path.join(tmp, "plain.pt")
        fsync_path = os.path.join(tmp, "plain-fsync.pt")

        def fresh(path: str) -> None:
            if os.path.exists(path):
                os.unlink(path)

        def save_ft() -> None:
            ft.save(ft_path, state)

        def save_plain() -> None:
            torch.save(plain, plain_path)

        def save_plain_fsync() -> None:
            with open(fsync_path, "wb") as f:
                torch.save(plain, f)
                f.flush()
                os.fsync(f.fileno())

        def load_ft() -> Any:
            return ft.load(ft_path, like=state)

        def load_plain() -> Any:
            return torch.load(plain_path, weights_only=True)

        saves: dict[str, tuple[str, Callable[[], None]]] = {
            "ft.save": (ft_path, save_ft),
            "torch.save": (plain_path, save_plain),
            "torch.save+fsync": (fsync_path, save_plain_fsync),
        }
        loads: dict[str, Callable[[], Any]] = {"ft.load": load_ft, "torch.load": load_plain}
        names = list(saves) + list(loads)
        times: dict[str, list[float]] = {n: [] for n in names}

        def once(name: str) -> float:
            gc.collect()
            if name in saves:
                path, fn = saves[name]
                fresh(path)  # untimed: every save creates a new file
                os.sync()  # untimed: no write-back of earlier calls during this one
                start = time.perf_counter()
                fn()
                return time.perf_counter() - start
            os.sync()
            start = time.perf_counter()
            out = loads[name]()
            elapsed = time.perf_counter() - start
            del out  # untimed: free the loaded copy before the next variant
            return elapsed

        # warm-up (not counted): first-call costs, and the files the loads read
        for name in names:
            once(name)
        if ft.load(ft_path, like=state).params.keys() != state.params.keys():
            raise RuntimeError("ft.load returned other params")
        for r in range(repeats):
            # saves first, then loads (a load reads its variant's newest file), each group
            # in an order rotated per repeat
            k = r % len(saves)
            order = list(saves)[k:] + list(saves)[:k]
            order += list(loads)[r % 2:] + list(loads)[:r % 2]
            for name in order:
                times[name].append(once(name))
            print(f"repeat {r + 1}/{repeats} s: " +
                  ", ".join(f"{n} {times[n][-1]:.3f}" for n in names), flush=True)
        sizes = {n: os.path.getsize(p) for n, (p, _) in saves.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def ratio(a: str, b: str) -> tuple[float, float, float]:
        rs = [x / y for x, y in zip(times[a], times[b])]
        return statistics.median(rs), min(rs), max(rs)

    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"\n== summary ({n_params / 1e6:.1f}M params + {opt_name} state, "
          f"median of {repeats} repeat(s)) ==")
    for n in names:
        size = sizes.get(n)
        extra = f"   file {size / 1e9:.3f} GB, {size / med[n] / 1e9:.2f} GB/s" if size else ""
        print(f"  {n:<18} {med[n]:7.3f} s{extra}")
    print("  (loads read from the page cache: the files were just written)")

    def show(label: str, r: tuple[float, float, float], note: str) -> None:
        print(f"{label:<40} {r[0]:5.2f}x (repeats {r[1]:.2f}-{r[2]:.2f})   {note}")

    def verdict(r: tuple[float, float, float]) -> str:
        return f"target <= {TARGET}x   {'PASS' if r[0] <= TARGET else 'FAIL'}"

    like = ratio("ft.save", "torch.save+fsync")
    show("ft.save / torch.save+fsync", like, f"{verdict(like)}   (like-for-like: both fsync)")
    nofs = ratio("ft.save", "torch.save")
    show("ft.save / torch.save (no fsync)", nofs,
         f"{verdict(nofs)}   (ft durable, plain not)")
    show("torch.save+fsync / torch.save", ratio("torch.save+fsync", "torch.save"),
         "info: the cost of fsync alone")
    ld = ratio("ft.load", "torch.load")
    show("ft.load / torch.load(weights_only)", ld, verdict(ld))
    if args.quick:
        print("  (--quick: small state, one repeat: a smoke run, not a measurement)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 x Linear(1000, 1000), 1 repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    parser.add_argument("--width", type=int, default=5000, help="Linear width (default 5000)")
    parser.add_argument("--layers", type=int, default=4, help="Linear layers (default 4)")
    parser.add_argument("--dir", default=None,
                        help="parent folder of the temporary files (default: system temp dir)")
    args = parser.parse_args()
    if args.repeats < 1 or args.width < 1 or args.layers < 1:
        parser.error("--repeats, --width and --layers must be >= 1")
    run(args)


if __name__ == "__main__":
    main()
