"""ft.bind and ft.export: round trips on fresh random inputs, clear errors."""

from __future__ import annotations

import pytest
import torch
from helpers import Net, classify, make_batches
from torch import nn

import ftrain as ft


def trained_state() -> ft.TrainState:
    torch.manual_seed(0)
    state = ft.TrainState.create(Net(), ft.optim.adam(1e-2), seed=0)
    return ft.fit(ft.train_step(classify), state, make_batches(6), epochs=1, logger=False,
                  checkpoint=False, progress=False)  # BatchNorm statistics moved too


def fresh(n: int = 9) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(n))


def test_bind_gives_a_plain_eval_module_with_the_states_tensors():
    state = trained_state()
    module = ft.bind(state)
    assert isinstance(module, Net) and not module.training
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.params.items())
    assert torch.equal(module.bn.running_mean, state.buffers["bn.running_mean"])
    outs = ft.predict(state, [fresh()])
    torch.testing.assert_close(module(fresh()), outs[0], rtol=0, atol=0)


def test_bind_a_multi_model_state_by_name():
    state = ft.TrainState.create({"G": nn.Linear(2, 3), "D": nn.Linear(3, 1)})
    assert ft.bind(state, "D")(torch.randn(4, 3)).shape == (4, 1)
    with pytest.raises(ft.ConfigError, match="several models"):
        ft.bind(state)
    with pytest.raises(ft.ConfigError, match="model 'E' is not in this state"):
        ft.bind(state, "E")
    with pytest.raises(ft.ConfigError, match="holds one model"):
        ft.bind(ft.TrainState.create(nn.Linear(1, 1)), "G")


def test_torch_export_program_round_trip():
    state = trained_state()
    prog = ft.export.program(state, fresh(4))
    x = fresh(13)  # another batch size: the batch dimension is dynamic
    torch.testing.assert_close(prog.module()(x), ft.bind(state)(x))


def test_torchscript_round_trip_through_a_file(tmp_path):
    state = trained_state()
    ft.export.torchscript(state, fresh(4), tmp_path / "m.pt")
    loaded = torch.jit.load(tmp_path / "m.pt")
    x = fresh(11)
    torch.testing.assert_close(loaded(x), ft.bind(state)(x))


def test_onnx_round_trip_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    state = trained_state()
    path = ft.export.onnx(state, fresh(4), tmp_path / "m.onnx")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = fresh(17)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), ft.bind(state)(x), rtol=1e-4,
                               atol=1e-5)


def test_an_example_that_does_not_fit_is_a_clear_error(tmp_path):
    state = trained_state()
    bad = torch.randn(4, 5)
    for export in (lambda: ft.export.program(state, bad),
                   lambda: ft.export.torchscript(state, bad),
                   lambda: ft.export.onnx(state, bad, tmp_path / "x.onnx")):
        with pytest.raises(ft.ConfigError, match=r"example input \(torch.float32\[4, 5\]\) "
                                                 "does not fit the model Net"):
            export()
    assert not (tmp_path / "x.onnx").exists()


def test_a_donated_state_cannot_be_exported():
    state = ft.TrainState.create(nn.Linear(6, 3), ft.optim.sgd(0.1))
    ft.fit(ft.train_step(classify), state, make_batches(2), epochs=1, logger=False,
           checkpoint=False, progress=False)
    with pytest.raises(ft.DonatedStateError):
        ft.bind(state)


def test_onnx_writes_a_data_sidecar_by_default_and_one_file_on_request(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    state = trained_state()
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    ft.export.onnx(state, fresh(4), tmp_path / "two" / "m.onnx")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["m.onnx", "m.onnx.data"]
    path = ft.export.onnx(state, fresh(4), tmp_path / "one" / "m.onnx", single_file=True)
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["m.onnx"]
    # the single file alone, moved away from its folder, holds the weights
    moved = tmp_path / "elsewhere.onnx"
    (tmp_path / "one" / "m.onnx").rename(moved)
    session = ort.InferenceSession(str(moved), providers=["CPUExecutionProvider"])
    x = fresh(11)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), ft.bind(state)(x), rtol=1e-4,
                               atol=1e-5)
    assert path.endswith("m.onnx")


def test_onnx_single_file_refuses_weights_past_the_protobuf_limit(tmp_path, monkeypatch):
    state = trained_state()
    weights = sum(t.numel() * t.element_size()
                  for t in [*state.params.values(), *state.buffers.values()])
    monkeypatch.setattr(ft.export, "SINGLE_FILE_LIMIT", weights)  # as if it were 2 GB
    with pytest.raises(ft.ConfigError, match=r"limits to 2 GB.*single_file=False"):
        ft.export.onnx(state, fresh(4), tmp_path / "m.onnx", single_file=True)
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ft.ConfigError, match="single_file must be True or False, got 'yes'"):
        ft.export.onnx(state, fresh(4), tmp_path / "m.onnx", single_file="yes")
