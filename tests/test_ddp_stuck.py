"""A rank that stalls outside any collective (sleeping in its loss or its validation loss)
under real torchrun processes (gloo on this CPU): the healthy rank's collective times out
after `with_ddp(timeout=...)`, and its error names the stuck rank, its step and its stack."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import torchrun_env

SCRIPT = Path(__file__).parent / "scripts" / "ddp_stuck.py"
pytestmark = [pytest.mark.slow,  # real torchrun processes
              pytest.mark.skipif(not torch.distributed.is_available(),
                                 reason="torch.distributed is not available")]
TIMEOUT_S = 6


def _stall(tmp_path: Path, mode: str) -> tuple[float, str, str, str]:
    """Two ranks, rank 1 stalls at step 3: (seconds, all output, rank 0's, rank 1's)."""
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", f"--log-dir={logs}", "--tee=3", str(SCRIPT), mode,
           str(TIMEOUT_S)]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=torchrun_env())
    seconds = time.monotonic() - start
    assert done.returncode != 0, done.stderr[-3000:]
    ranks = []
    for rank in (0, 1):  # <log-dir>/<run id>/attempt_0/<local rank>/stderr.log
        found = sorted(logs.rglob(f"attempt_0/{rank}/stderr.log"))
        assert found, sorted(str(p) for p in logs.rglob("*"))
        ranks.append(found[0].read_text())
    return seconds, done.stdout + done.stderr, ranks[0], ranks[1]


def test_a_rank_stuck_in_its_loss_is_named_with_its_step_and_stack(tmp_path):
    """DDP's gradient all-reduce times out on rank 0 while rank 1 sleeps in its loss."""
    seconds, out, healthy, stuck = _stall(tmp_path, "loss")
    assert seconds < 60, seconds  # not the 60 s sleep, nor the 300 s default timeout
    assert "rank 1 stalls in loss at step 3" in out
    assert "rank 1 done" not in out
    # rank 0 raises an ftrain error naming rank 1, its step and where it sleeps
    assert ("CollectiveTimeoutError: rank 1 of 2 did not reach the collective rank 0 "
            f"waited in at step 3 (timed out after {TIMEOUT_S}s): it was at step 3 in "
            "stall_here (ddp_stuck.py, line") in healthy
    assert "stack of rank 1 (most recent call last):" in healthy
    assert ", in loss_fn\n" in healthy and "time.sleep(SLEEP_S)" in healthy
    assert "Timed out" in healthy  # the collective's own error stays visible
    assert "rank 0 of 2 failed at step 3" in healthy
    # rank 1 is brought down by its watchdog, and its own log shows its stack
    assert "rank 1: rank 0 failed at step 3: CollectiveTimeoutError: rank 1 of 2" in stuck
    assert "this rank was blocked and exits now; it was at step 3 in stall_here" in stuck
    assert ", in loss_fn\n" in stuck


def test_a_rank_stuck_in_validation_is_named_by_ftrains_own_collective(tmp_path):
    """ftrain's evaluation all-gather honours the timeout too (not DDP's all-reduce)."""
    seconds, out, healthy, stuck = _stall(tmp_path, "eval")
    assert seconds < 60, seconds
    assert "rank 1 stalls in eval at step 3" in out
    assert "all_gather" in healthy  # rank 0 waited in ftrain's evaluation reduction
    assert ("CollectiveTimeoutError: rank 1 of 2 did not reach the collective rank 0 "
            f"waited in at step 3 (timed out after {TIMEOUT_S}s): it was at step 3 in "
            "stall_here") in healthy
    assert ", in eval_fn\n" in healthy
    assert "this rank was blocked and exits now; it was at step 3 in stall_here" in stuck
