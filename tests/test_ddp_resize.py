"""A run stopped mid-epoch under N processes continues that epoch under M: every sample of
the epoch is trained once across the resume, in the epoch's order dealt out by rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import RandomSampler

from ftrain.core import rng as _rng

SCRIPT = Path(__file__).parent / "scripts" / "ddp_resize.py"
pytestmark = [pytest.mark.slow,  # real torchrun processes
              pytest.mark.skipif(not torch.distributed.is_available(),
                                 reason="torch.distributed is not available")]


def _launch(out: Path, tag: str, world: int, *args: str, ok: bool = True) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, str(SCRIPT), str(out), tag, *args]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}", *cmd[1:]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert (done.returncode == 0) == ok, done.stderr[-3000:]
    return done.stdout + done.stderr


def _seen(out: Path, tag: str, rank: int) -> list[int]:
    text = (out / f"{tag}-rank{rank}.txt").read_text()
    return [int(i) for line in text.splitlines() for i in line.split()]


def _distributed_order(epoch: int = 0) -> list[int]:
    """DistributedSampler's permutation of the epoch, as with_ddp seeds it (seed 3)."""
    g = torch.Generator()
    g.manual_seed((_rng.mix(3, _rng.SHUFFLE) & 0x7FFFFFFF) + epoch)
    return torch.randperm(96, generator=g).tolist()


def _single_order(epoch: int = 0) -> list[int]:
    g = torch.Generator()
    g.manual_seed(_rng.mix(3, epoch, _rng.SHUFFLE))
    return list(RandomSampler(range(96), generator=g))


def test_two_ranks_then_one_process_trains_every_sample_once(tmp_path):
    _launch(tmp_path, "two", 2, "--max-steps", "5")  # 5 batches of 4 on each rank
    first = _seen(tmp_path, "two", 0) + _seen(tmp_path, "two", 1)
    assert len(first) == 40
    log = _launch(tmp_path, "one", 1, "--resume", str(tmp_path / "two" / "last.ckpt"))
    assert "40 samples of it are done" in log
    rest = _seen(tmp_path, "one", 0)
    assert sorted(first + rest) == list(range(96))  # each sample once
    assert rest == _distributed_order()[40:]  # in the epoch's order
    assert "ended at step 19, position {'epoch': 1, 'batch': 0, 'world': 1" in log
    # another batch size: what was trained is counted in the old one's samples
    _launch(tmp_path, "bigger", 1, "--resume", str(tmp_path / "two" / "last.ckpt"),
            "--batch", "8")
    assert sorted(first + _seen(tmp_path, "bigger", 0)) == list(range(96))
    # other data cannot hold what was trained: refused, not guessed
    log = _launch(tmp_path, "other", 1, "--resume", str(tmp_path / "two" / "last.ckpt"),
                  "--samples", "80", ok=False)
    assert "over other data (batches of 4 of 96 samples; now batches of 4 of 80" in log


def test_one_process_then_two_ranks_trains_every_sample_once(tmp_path):
    _launch(tmp_path, "one", 1, "--max-steps", "5")
    first = _seen(tmp_path, "one", 0)
    assert first == _single_order()[:20]
    _launch(tmp_path, "two", 2, "--resume", str(tmp_path / "one" / "last.ckpt"))
    ranks = [_seen(tmp_path, "two", r) for r in (0, 1)]
    rest = _single_order()[20:]
    assert ranks == [rest[0::2], rest[1::2]]  # dealt out by rank, as DistributedSampler
    assert sorted(first + ranks[0] + ranks[1]) == list(range(96))
