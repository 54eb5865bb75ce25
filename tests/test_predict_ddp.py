"""`ft.predict` across processes, in memory: each rank predicts its share of whole
batches, every rank gets the list one process would (same batches, the data's order,
nothing repeated), with rank 0's model.

One torchrun launch (2 CPU processes, tests/scripts/ddp_predict.py) checks it inside a
with_ddp loop and after one, on a loader whose 13 samples do not divide by world * batch,
on nested outputs of several dtypes, on a rank without batches, on no data, with
limit_batches, with written files, and an output one rank cannot send (every rank
raises). In-process tests cover the one-process paths.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import Net, make_batches

import ftrain as ft
from ftrain.parallel.gather import _fill, _flatten, _pack, gather_outputs, rank0_buffers

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).parent / "scripts" / "ddp_predict.py"
Pair = collections.namedtuple("Pair", "a b")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("predict-ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(SCRIPT), str(out)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_every_rank_gets_the_one_process_outputs_in_order(ranks):
    for r, result in enumerate(ranks):
        for case, n in (("loader", 5), ("list_rich", 4), ("one_batch", 1), ("no_batch", 0),
                        ("limited", 3), ("in_loop", 5)):
            assert result[case], (r, case)  # equal: types, order, dtypes, devices, values
            assert result[case + "_len"] == n, (r, case)
        assert result["written"], r  # the folder read back equals the gathered list


@pytest.mark.slow
def test_each_rank_predicts_only_its_share(ranks):
    # 5 batches of 3, 3, 3, 3, 1 samples: batches 0, 2, 4 on rank 0, 1 and 3 on rank 1
    assert ranks[0]["in_loop_calls"] == [3, 3, 1]
    assert ranks[1]["in_loop_calls"] == [3, 3]


@pytest.mark.slow
def test_ranks_predict_with_rank_0s_buffers(ranks):
    # after with_ddp training the params agree, rank 1's BatchNorm statistics do not
    # (its last forward updated them from its own batch); the outputs above still equal
    # the prediction of rank 0's checkpoint on both ranks
    assert ranks[0]["params_equal"] and ranks[1]["params_equal"]
    assert ranks[0]["buffers_equal"] and not ranks[1]["buffers_equal"]


@pytest.mark.slow
def test_an_output_one_rank_cannot_send_fails_on_every_rank(ranks):
    for result in ranks:
        assert result["sparse"].startswith("ft.predict across ranks: rank 1: prediction "
                                           "batch 1: gathering outputs across ranks needs "
                                           "plain dense tensors, found a torch.sparse_coo")


# -- one process ---------------------------------------------------------------------------

def test_one_process_predicts_in_order_and_distributed_true_is_the_same():
    torch.manual_seed(0)
    state = ft.TrainState.create(Net())
    data = make_batches(3)
    plain = ft.predict(state, data)
    assert len(plain) == 3 and all(o.shape == (12, 3) for o in plain)
    again = ft.predict(state, data, distributed=True)  # a world of one: nothing to gather
    assert all(torch.equal(a, b) for a, b in zip(plain, again))
    assert rank0_buffers(state) is state  # no process group: nothing to agree on
    assert gather_outputs([(2, "c"), (0, "a"), (1, "b")], torch.device("cpu")) == \
        ["a", "b", "c"]


def test_outputs_travel_as_bytes_and_come_back_with_their_structure():
    # the packing a gather sends, unpacked as a peer would: every dtype, order and type
    t = torch.arange(6.0).reshape(2, 3)
    outputs = [(0, {"x": t.t(), "pair": Pair(t.bfloat16(), t > 2), "n": 2, "s": "id"}),
               (1, [torch.tensor(3 + 4j), torch.empty(0, 5), collections.OrderedDict(
                   b=torch.ones(1, dtype=torch.int8), a=None)]),
               (2, collections.defaultdict(list, {"k": (torch.zeros(3, dtype=torch.int64),)}))]
    entries, pairs, size = _flatten(outputs)
    assert size % 16 == 0 and all(h.offset % 16 == 0 for _, h in pairs)
    buf = _pack(pairs, size, torch.device("cpu"))

    def tensor(hole: Any) -> torch.Tensor:
        return buf[hole.offset:hole.offset + hole.nbytes].view(hole.dtype).reshape(hole.shape)
    rebuilt = [_fill(stripped, tensor) for _, stripped in entries]
    for (_, want), got in zip(outputs, rebuilt):
        assert type(got) is type(want)
    assert list(rebuilt[0]) == ["x", "pair", "n", "s"] and rebuilt[0]["s"] == "id"
    assert torch.equal(rebuilt[0]["x"], t.t()) and type(rebuilt[0]["pair"]) is Pair
    assert rebuilt[0]["pair"].a.dtype == torch.bfloat16
    assert torch.equal(rebuilt[0]["pair"].b, t > 2)
    assert rebuilt[1][0] == 3 + 4j and rebuilt[1][1].shape == (0, 5)
    assert list(rebuilt[1][2]) == ["b", "a"] and rebuilt[1][2]["a"] is None
    assert rebuilt[2].default_factory is list and rebuilt[2]["k"][0].dtype == torch.int64


def test_an_output_that_cannot_be_sent_names_the_batch():
    with pytest.raises(ft.ConfigError, match="prediction batch 4: gathering outputs across "
                                             "ranks needs plain dense tensors, found a "
                                             "torch.sparse_coo tensor"):
        _flatten([(4, {"x": torch.eye(2).to_sparse()})])
