"""Two torchrun agents (`--nnodes=2`, c10d rendezvous on localhost, one process each) as two
"nodes" (issue 16): with_fsdp and with_ddp train together as one process on the same global
batches, and a failing rank stops both agents promptly, the peer naming the failure."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import torchrun_env

SCRIPT = Path(__file__).parent / "scripts" / "multinode_train.py"
pytestmark = [pytest.mark.slow,  # real torchrun agents and processes
              pytest.mark.skipif(not torch.distributed.is_available(),
                                 reason="torch.distributed is not available")]




def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _two_agents(out: Path, layer: str, mode: str, timeout: float = 90
                ) -> dict[int, tuple[int, float, str]]:
    """Start two agents at once; {global rank of its process: (rc, exit time, stderr)},
    the exit time from `time.time()` (an upper bound: the agents are waited for in turn)."""
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
         "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
         f"--rdzv-id=ftrain-multinode-{port}", str(SCRIPT), str(out), layer, mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=torchrun_env(),
        start_new_session=True)  # a process group each: a hung agent goes with its worker
        for node in (0, 1)]
    results: dict[int, tuple[int, float, str]] = {}
    for node, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            _, err = p.communicate()
        # c10d may assign global ranks in either order: the script says which it got
        found = re.search(r"multinode: global rank (\d) of 2", err)
        assert found, f"agent {node} (rc {p.returncode}) did not start its process:\n{err}"
        results[int(found.group(1))] = (p.returncode, time.time(), err)
    assert sorted(results) == [0, 1], "both agents report the same global rank"
    return results


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """One process in this test's process, the whole global batch per step."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import multinode_train
    finally:
        sys.path.pop(0)
    trained = multinode_train.reference()
    start = multinode_train.setup(1)[0].params
    assert all(not torch.equal(trained[n], start[n]) for n in start)  # it trained
    return trained


def test_two_agents_train_together_as_one_process(tmp_path: Path,
                                                  reference: dict[str, torch.Tensor]) -> None:
    """with_fsdp across two agents; with_ddp's two-agent run is in tests/test_ddp.py
    (test_two_nodes_train_together); `multinode_train.py OUT ddp train` runs it here."""
    results = _two_agents(tmp_path, "fsdp", "train")
    for rc, _, err in results.values():
        assert rc == 0, err[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] == 6
    assert sorted(r0["params"]) == sorted(reference)
    for name, value in reference.items():
        torch.testing.assert_close(r0["params"][name], r1["params"][name], rtol=0, atol=0)
        torch.testing.assert_close(r0["params"][name], value, rtol=1e-5, atol=1e-5)


def test_a_failing_rank_stops_both_agents_promptly(tmp_path: Path) -> None:
    """Separate agents: neither kills the other's process, so ftrain's failure handling
    must. The layer's collective timeout is 30 s: both agents end within 15 s of the
    failure (timed from the failing rank's own clock reading, not from the start, which
    the machine's load stretches), so they did not wait for a timeout."""
    results = _two_agents(tmp_path, "fsdp", "fail", timeout=90)
    failed = re.search(r"multinode: failing at ([\d.]+)", results[1][2])
    assert failed, results[1][2][-3000:]
    for rc, ended, err in results.values():
        assert rc != 0 and ended - float(failed.group(1)) < 15, (rc, ended, err[-3000:])
    assert "ValueError: boom on rank 1 at step 3" in results[1][2]
    assert "PeerFailedError: rank 1 failed at step 3" in results[0][2], results[0][2][-3000:]
    assert not list(tmp_path.glob("rank*.pt"))
