"""ft.export.safetensors / load_safetensors (issue 18, part 4): sharded weights and an
index in Hugging Face's layout, read back by the safetensors library and by
transformers' from_pretrained, and Hugging Face's own files read into a state."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import tensors_equal
from torch import nn

import ftrain as ft

safetensors_torch = pytest.importorskip("safetensors.torch")


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))


def trained() -> ft.TrainState:
    state = ft.TrainState.create(net(), ft.optim.adam(1e-2))
    step = ft.train_step(lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(3)]
    return ft.fit(step, state, data, epochs=1, logger=False, checkpoint=False,
                  progress=False)


def test_sharded_files_and_index_hold_every_tensor(tmp_path):
    state = trained()
    paths = ft.export.safetensors(state, tmp_path, max_shard_size=600)
    names = sorted(os.path.basename(p) for p in paths)
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in names
    assert all(n.startswith("model-") and n.endswith(f"-of-{len(shards):05d}.safetensors")
               for n in shards)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    read = {}
    for shard in shards:  # the safetensors library itself reads each shard
        part = safetensors_torch.load_file(tmp_path / shard)
        assert all(index["weight_map"][k] == shard for k in part)
        read.update(part)
    expected = {**state.params, **{k: v for k, v in state.buffers.items()}}
    assert sorted(read) == sorted(expected)  # num_batches_tracked included
    assert all(torch.equal(read[k], expected[k]) for k in read)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in read.values())
    back = ft.export.load_safetensors(ft.TrainState.create(net(), ft.optim.adam(1e-2)),
                                      tmp_path)
    assert tensors_equal(back.params, state.params)
    assert tensors_equal(back.buffers, state.buffers)


def test_an_earlier_export_is_refused_or_replaced_whole(tmp_path):
    state = trained()
    ft.export.safetensors(state, tmp_path, max_shard_size=600)
    with pytest.raises(ft.ConfigError, match="already holds exported weights"):
        ft.export.safetensors(state, tmp_path)
    ft.export.safetensors(state, tmp_path, overwrite=True)  # one file now: shards go
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_bad_files_and_arguments_are_refused_naming_the_problem(tmp_path):
    state = trained()
    ft.export.safetensors(state, tmp_path / "a")
    other = ft.TrainState.create(nn.Linear(6, 3))
    with pytest.raises(ft.CheckpointError, match="which this model does not have"):
        ft.export.load_safetensors(other, tmp_path / "a")
    bigger = ft.TrainState.create(nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32),
                                                nn.ReLU(), nn.Linear(32, 4)))
    with pytest.raises(ft.CheckpointError, match=r"'3.weight': the file holds"):
        ft.export.load_safetensors(bigger, tmp_path / "a")
    partial = {k: v for k, v in safetensors_torch.load_file(
        tmp_path / "a" / "model.safetensors").items() if k != "3.bias"}
    safetensors_torch.save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(ft.CheckpointError, match=r"lacks 1 tensor.*3\.bias"):
        ft.export.load_safetensors(state, tmp_path / "partial.safetensors")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"0.weight": "../a/model.safetensors"}}))
    with pytest.raises(ft.CheckpointError, match="outside its folder"):
        ft.export.load_safetensors(state, tmp_path / "b")
    (tmp_path / "c.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ft.CheckpointError, match="could not be read as safetensors"):
        ft.export.load_safetensors(state, tmp_path / "c.safetensors")
    with pytest.raises(ft.ConfigError, match="max_shard_size"):
        ft.export.safetensors(state, tmp_path / "d", max_shard_size="lots")
    pair = ft.TrainState.create({"G": nn.Linear(2, 2), "D": nn.Linear(2, 1)})
    with pytest.raises(ft.ConfigError, match="name one with model="):
        ft.export.safetensors(pair, tmp_path / "e")
    assert len(ft.export.safetensors(pair, tmp_path / "e", model="D")) == 1


transformers = pytest.importorskip("transformers")


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32)
    return transformers.BertModel(config).eval()


@pytest.mark.parametrize("shard", ["5GB", "20KB"])
def test_hugging_face_from_pretrained_loads_the_export(tmp_path, shard):
    model = tiny_bert()
    state = ft.TrainState.create(model)
    # change every weight, so a model that ignored the files would differ
    state = state.replace(params={k: v + 0.01 * torch.randn_like(v)
                                  for k, v in state.params.items()})
    ft.export.safetensors(state, tmp_path, max_shard_size=shard)
    assert (tmp_path / "config.json").exists()
    loaded = transformers.BertModel.from_pretrained(tmp_path).eval()
    got = dict(loaded.named_parameters())
    assert all(torch.equal(got[k], v) for k, v in state.params.items())
    ids = torch.randint(0, 50, (2, 7))
    expected = ft.bind(state)(ids).last_hidden_state
    assert torch.allclose(loaded(ids).last_hidden_state, expected, atol=1e-6)


def test_hugging_face_save_pretrained_files_load_into_a_state(tmp_path):
    source = tiny_bert()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01)
    source.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded, with an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    state = ft.export.load_safetensors(ft.TrainState.create(tiny_bert()), tmp_path)
    assert all(torch.equal(state.params[k], v) for k, v in source.named_parameters())
