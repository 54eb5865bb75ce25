"""with_ddp under real torchrun processes (gloo on this CPU): equivalence with one
process, rank-0-only files, resume, failing ranks (one agent and two), two "nodes"."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import torchrun_env

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"
pytestmark = [pytest.mark.slow,  # real torchrun processes
              pytest.mark.skipif(not torch.distributed.is_available(),
                                 reason="torch.distributed is not available")]




def _torchrun(out: Path, mode: str, *args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", str(SCRIPT), str(out), mode, *args]


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=torchrun_env())


def _node_cmd(out: Path, mode: str, port: int, node: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
            f"--node_rank={node}", "--nproc_per_node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=ftrain-{port}", str(SCRIPT),
            str(out), mode, *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _two_nodes(out: Path, mode: str, *args: str, timeout: float = 120
               ) -> list[tuple[int, float, str]]:
    """Two torchrun agents on this machine, one process each: (rc, seconds, output)."""
    port = _free_port()
    start = time.monotonic()
    procs = [subprocess.Popen(_node_cmd(out, mode, port, n, *args), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=torchrun_env())
             for n in (0, 1)]
    results = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
        results.append((p.returncode, time.monotonic() - start, text))
    return results


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One process, batch 8, 8 steps: the reference."""
    out = tmp_path_factory.mktemp("single")
    done = _run([sys.executable, str(SCRIPT), str(out), "train", "8", "8"])
    assert done.returncode == 0, done.stderr
    return _load(out / "rank0.pt")


def test_two_ranks_with_batch_b_equal_one_process_with_batch_2b(tmp_path, single):
    done = _run(_torchrun(tmp_path, "train", "4", "8"))
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = _load(tmp_path / "rank0.pt"), _load(tmp_path / "rank1.pt")
    assert r0["step"] == r1["step"] == single["step"] == 8
    for name, value in single["params"].items():
        torch.testing.assert_close(r0["params"][name], value, rtol=1e-5, atol=1e-6)
        assert torch.equal(r0["params"][name], r1["params"][name])  # ranks in lockstep
    for name in r0["pure"]:  # direct calls all-reduce gradients too
        assert torch.equal(r0["pure"][name], r1["pure"][name])
        # also when the ranks used different parameters
        assert torch.equal(r0["branch"][name], r1["branch"][name])
        assert not torch.equal(r0["pure"][name], r0["params"][name])
    # the sharded evaluation counts every sample once: same as one process
    assert r0["val"] == r1["val"]
    assert r0["val"]["loss"] == pytest.approx(single["val"]["loss"], rel=1e-5)
    # files from rank 0 only: one log version, one set of checkpoints
    versions = list((tmp_path / "logs" / "ftrain_logs").iterdir())
    assert [v.name for v in versions] == ["version_0"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()
                  if p.name != ".ftrain.lock") == \
        ["0-8.ckpt", "checkpoints.json", "last.ckpt"]


def test_accumulation_and_float16_scaling_under_two_ranks(tmp_path):
    one = tmp_path / "one"
    single = _run([sys.executable, str(SCRIPT), str(one), "accum", "8", "6"])
    assert single.returncode == 0, single.stderr[-3000:]
    done = _run(_torchrun(tmp_path, "accum", "4", "6"))
    assert done.returncode == 0, done.stderr[-3000:]
    ref, r0 = _load(one / "rank0.pt"), _load(tmp_path / "rank0.pt")
    r1 = _load(tmp_path / "rank1.pt")
    for name, value in ref["params"].items():  # float16 autocast: close, not bitwise
        torch.testing.assert_close(r0["params"][name], value, rtol=1e-3, atol=1e-4)
        assert torch.equal(r0["params"][name], r1["params"][name])


def test_resume_under_two_ranks_continues_exactly(tmp_path):
    first = _run(_torchrun(tmp_path, "train", "4", "4"))
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _run(_torchrun(tmp_path, "resume", "4", "8"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    whole = tmp_path / "whole"
    ref = _run(_torchrun(whole, "train", "4", "8"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    a, b = _load(tmp_path / "rank1.pt"), _load(whole / "rank1.pt")
    assert a["step"] == b["step"] == 8
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name


def test_ranks_starting_at_different_steps_fail_together(tmp_path):
    done = _run(_torchrun(tmp_path, "mismatch", "4", "4"), timeout=90)
    assert done.returncode != 0
    assert "ranks disagree on the starting (step, epoch, batch)" in done.stderr


def test_a_failing_rank_brings_both_down_with_its_error(tmp_path):
    start = time.monotonic()
    done = _run(_torchrun(tmp_path, "fail", "4", "8"), timeout=90)
    assert time.monotonic() - start < 60
    assert done.returncode != 0
    assert "ValueError: boom on rank 1 at step 3" in done.stderr
    assert "PeerFailedError: rank 1 failed at step 3" in done.stderr  # rank 0 says why


def test_two_agents_a_rank_that_catches_its_error_still_brings_the_peer_down(tmp_path):
    """Separate torchrun agents (--nnodes=2): no agent kills the peer; ftrain must."""
    results = _two_nodes(tmp_path, "fail-caught", "4", "8", timeout=90)
    for rc, seconds, _ in results:
        assert rc != 0 and seconds < 60, (rc, seconds)
    text = "".join(t for _, _, t in results)
    assert "ValueError: boom on rank 1 at step 3" in text
    assert "staying alive" in text  # the failing program did catch it
    assert "rank 0: rank 1 failed at step 3" in text  # the peer names the cause


def test_two_nodes_train_together(tmp_path, single):
    results = _two_nodes(tmp_path, "train", "4", "8")
    for rc, _, text in results:
        assert rc == 0, text[-3000:]
    r0, r1 = _load(tmp_path / "rank0.pt"), _load(tmp_path / "rank1.pt")
    for name, value in single["params"].items():
        torch.testing.assert_close(r0["params"][name], value, rtol=1e-5, atol=1e-6)
        assert torch.equal(r0["params"][name], r1["params"][name])
