"""Ranks agree under torchrun: a SIGTERM that reaches one rank stops every rank after the
same step (no deadlock, a checkpoint that resumes bitwise), and ranks with different
numbers of batches get an error naming them instead of a collective-mismatch abort."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import torchrun_env

SCRIPT = Path(__file__).parent / "scripts" / "ddp_lockstep.py"
pytestmark = [pytest.mark.slow,  # real torchrun processes
              pytest.mark.skipif(not torch.distributed.is_available(),
                                 reason="torch.distributed is not available")]


def _cmd(out: Path, mode: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node=2", str(SCRIPT), str(out), mode, *args]




def _steps(out: Path, rank: int) -> list[int]:
    path = out / f"steps{rank}"
    return [int(s) for s in path.read_text().split()] if path.exists() else []


def _run(out: Path, mode: str, *args: str, timeout: float = 120
         ) -> subprocess.CompletedProcess[str]:
    out.mkdir(exist_ok=True)
    return subprocess.run(_cmd(out, mode, *args), capture_output=True, text=True,
                          timeout=timeout, env=torchrun_env())


def test_sigterm_on_one_rank_stops_both_at_one_step_and_resumes_bitwise(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.Popen(_cmd(run, "preempt", "0.05"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=torchrun_env())
    deadline = time.monotonic() + 60
    while len(_steps(run, 1)) < 5 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    pid = int((run / "pid1").read_text())
    os.kill(pid, signal.SIGTERM)  # only rank 1 hears it: the ranks must still agree
    sent = time.monotonic()
    text, _ = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10, text
    assert "exited with code 143" in text or "exitcode  : 143" in text or \
        "143" in text, text
    stopped = [_steps(run, r)[-1] for r in (0, 1)]
    assert stopped[0] == stopped[1] < 30, (stopped, text)
    last = torch.load(run / "ckpt" / "last.ckpt", weights_only=True)
    assert last["step"] == stopped[0]
    assert not (run / "final0.pt").exists()

    resumed = _run(run, "resume")
    assert resumed.returncode == 0, resumed.stderr
    whole = _run(tmp_path / "whole", "train")
    assert whole.returncode == 0, whole.stderr
    for rank in (0, 1):
        a = torch.load(run / f"final{rank}.pt", weights_only=True)
        b = torch.load(tmp_path / "whole" / f"final{rank}.pt", weights_only=True)
        assert a["step"] == b["step"] == 30
        for name in b["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), name


@pytest.mark.parametrize("mode, expected", [
    ("uneven-sized", r"different numbers of batches in epoch 0 \(rank 0: 8, rank 1: 6\)"),
    ("uneven-iterable", r"ran out of batches at different steps in epoch 0: rank 1 after 5 "
                        r"batches, while rank 0 had more"),
    ("lying-length", r"the training data said 6 batches for this rank in epoch 0, but "
                     r"produced 4"),
])
def test_ranks_with_different_batch_counts_get_an_error_naming_them(tmp_path, mode,
                                                                    expected):
    start = time.monotonic()
    done = _run(tmp_path, mode, timeout=90)
    assert done.returncode != 0
    assert time.monotonic() - start < 60
    import re
    assert re.search(expected, done.stderr), done.stderr[-3000:]
    assert "EnforceNotMet" not in done.stderr
