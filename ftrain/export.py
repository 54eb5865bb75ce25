"""From a trained state to a deployable model: `bind`, and `export.program / onnx /
torchscript`.

`ft.bind(state)` builds a plain `nn.Module` from the state's template carrying the state's
params and buffers (sharing their storage), in eval mode, for ordinary PyTorch use. The
exporters trace that module on an example input, after checking that the input fits.
The ONNX exporter validates its file: it loads it in onnxruntime and compares the outputs
with the PyTorch model's before returning.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ftrain.core.bind import install
from ftrain.core.state import TrainState, model_part
from ftrain.errors import ConfigError, FTrainError

# ONNX files are protobufs, which cannot exceed 2 GB; leave room for the graph itself.
SINGLE_FILE_LIMIT = 2**31 - 2**24


class ExportError(FTrainError):
    """An export failed, or its result disagrees with the PyTorch model."""


def bind(state: TrainState, model: str | None = None) -> nn.Module:
    """A plain `nn.Module` (eval mode) carrying `state`'s params and buffers.

    The module is a new copy of the state's template; its tensors share storage with the
    state (no copy: `state.copy()` first to keep them apart). For a multi-model state
    name the model: `ft.bind(state, "G")`.

    Examples:
        >>> import torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 2))
        >>> module = ft.bind(state)
        >>> module.training, module(torch.randn(4, 3)).shape
        (False, torch.Size([4, 2]))
    """
    if not isinstance(state, TrainState):
        raise ConfigError(f"bind expects a TrainState, got {type(state).__name__}")
    template, params, buffers = model_part(state, model, "ft.bind")
    module = copy.deepcopy(template)  # a meta skeleton: nothing is copied but structure
    install(module, params, buffers, model)
    return module.eval()


def _args(example: Any) -> tuple[Any, ...]:
    return tuple(example) if isinstance(example, tuple) else (example,)


def _describe(args: tuple[Any, ...]) -> str:
    return ", ".join(f"{a.dtype}{list(a.shape)}" if isinstance(a, torch.Tensor)
                     else type(a).__name__ for a in args)


def _checked(state: TrainState, example: Any, model: str | None
             ) -> tuple[nn.Module, tuple[Any, ...], Any]:
    """The bound module, the example as call arguments, and the module's output on it;
    an example that does not fit the model is a ConfigError naming both."""
    module = bind(state, model)
    args = _args(example)
    try:
        with torch.no_grad():
            out = module(*args)
    except Exception as err:
        raise ConfigError(f"the example input ({_describe(args)}) does not fit the model "
                          f"{type(module).__name__}: {type(err).__name__}: {err}") from err
    return module, args, out


def program(state: TrainState, example: Any, *, model: str | None = None,
            dynamic_batch: bool = True, strict: bool = False) -> torch.export.ExportedProgram:
    """A `torch.export` program of the state's model, traced on `example` (a tensor or a
    tuple of arguments); with `dynamic_batch` the first dimension of each tensor input may
    vary.

    Examples:
        >>> import torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 2))
        >>> prog = ft.export.program(state, torch.randn(4, 3))
        >>> prog.module()(torch.randn(7, 3)).shape
        torch.Size([7, 2])
    """
    module, args, _ = _checked(state, example, model)
    shapes = _dynamic_batch(args) if dynamic_batch else None
    try:
        return torch.export.export(module, args, dynamic_shapes=shapes, strict=strict)
    except Exception as err:
        raise ExportError(f"torch.export could not capture {type(module).__name__}: "
                          f"{type(err).__name__}: {err}") from err


def _dynamic_batch(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    batch = torch.export.Dim("batch")
    shapes = tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None
                   for a in args)
    return shapes if any(s is not None for s in shapes) else None


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    from torch.utils import _pytree as pytree
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def onnx(state: TrainState, example: Any, path: str | os.PathLike[str], *,
         model: str | None = None, dynamic_batch: bool = True, opset: int | None = None,
         rtol: float = 1e-4, atol: float = 1e-5,
         input_names: Sequence[str] | None = None, single_file: bool = False) -> str:
    """Write the state's model as ONNX to `path`, validated in onnxruntime; the path.

    The weights go into a sidecar `<path>.data` next to the file (torch's exporter's
    default, needed past ONNX's 2 GB protobuf limit): ship both files together. With
    `single_file=True` they go inside the one `.onnx` file (small models: under 2 GB of
    weights; a larger model is refused before exporting).
    The file is loaded in onnxruntime and its outputs on `example` compared with the
    PyTorch model's (`rtol`, `atol`); a mismatch is an ExportError and leaves no file.
    Needs the `export` extra (onnx, onnxscript, onnxruntime).

    Examples:
        >>> import os, tempfile, torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 2))
        >>> folder = tempfile.mkdtemp()
        >>> path = ft.export.onnx(state, torch.randn(4, 3), folder + "/m.onnx",
        ...                       single_file=True)
        >>> os.listdir(folder)
        ['m.onnx']
    """
    if not isinstance(single_file, bool):
        raise ConfigError(f"single_file must be True or False, got {single_file!r}")
    module, args, expected = _checked(state, example, model)
    if single_file:
        size = sum(t.numel() * t.element_size()
                   for t in (*module.parameters(), *module.buffers()))
        if size >= SINGLE_FILE_LIMIT:
            raise ConfigError(f"single_file=True keeps the weights inside the .onnx file, "
                              f"which ONNX (protobuf) limits to 2 GB; this model's weights "
                              f"are {size / 2**30:.2f} GiB: export with single_file=False "
                              f"(weights in a .onnx.data file beside it)")
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if len(tensors) != len(args):
        raise ConfigError(f"onnx export takes tensor inputs only, got ({_describe(args)})")
    names = list(input_names) if input_names is not None else \
        [f"input_{i}" for i in range(len(args))]
    path = os.fspath(path)
    try:
        torch.onnx.export(module, args, path, dynamo=True, input_names=names,
                          dynamic_shapes=_dynamic_batch(args) if dynamic_batch else None,
                          opset_version=opset, verbose=False,
                          external_data=not single_file)
    except ImportError as err:
        raise ConfigError("ONNX export needs the export extra: pip install "
                          "'ftrain[export]' (onnx, onnxscript, onnxruntime)") from err
    except Exception as err:
        raise ExportError(f"ONNX export of {type(module).__name__} failed: "
                          f"{type(err).__name__}: {err}") from err
    try:
        check_onnx(path, args, _flat_outputs(expected), rtol=rtol, atol=atol)
    except BaseException:
        for leftover in (path, path + ".data"):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise
    return path


def check_onnx(path: str, args: Sequence[torch.Tensor], expected: Sequence[torch.Tensor],
               *, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Run the ONNX file in onnxruntime on `args` and compare with `expected` outputs."""
    try:
        import numpy as np
        import onnxruntime
    except ImportError as err:
        raise ConfigError("validating ONNX needs onnxruntime: pip install "
                          "'ftrain[export]'") from err
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
    got = session.run(None, feeds)
    if len(got) != len(expected):
        raise ExportError(f"the ONNX model returns {len(got)} outputs, PyTorch "
                          f"{len(expected)}")
    for i, (g, e) in enumerate(zip(got, expected)):
        want = e.detach().cpu().numpy()
        if g.shape != want.shape or not np.allclose(g, want, rtol=rtol, atol=atol):
            worst = float(np.abs(g - want).max()) if g.shape == want.shape else float("nan")
            raise ExportError(f"ONNX output {i} differs from PyTorch's (shape {g.shape} vs "
                              f"{want.shape}, max abs difference {worst})")


def torchscript(state: TrainState, example: Any, path: str | os.PathLike[str] | None = None,
                *, model: str | None = None) -> torch.jit.ScriptModule:
    """A TorchScript module of the state's model, traced on `example`; saved if `path`.

    Examples:
        >>> import torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 2))
        >>> scripted = ft.export.torchscript(state, torch.randn(4, 3))
        >>> scripted(torch.randn(5, 3)).shape
        torch.Size([5, 2])
    """
    module, args, _ = _checked(state, example, model)
    try:
        with torch.no_grad():
            traced = torch.jit.trace(module, args, check_trace=True)
    except Exception as err:
        raise ExportError(f"TorchScript tracing of {type(module).__name__} failed: "
                          f"{type(err).__name__}: {err}") from err
    if path is not None:
        torch.jit.save(traced, os.fspath(path))
    return traced


def safetensors(state: TrainState, folder: str | os.PathLike[str], *,
                max_shard_size: int | str = "5GB", model: str | None = None,
                overwrite: bool = False) -> list[str]:
    """Write the weights of `state`'s model to `folder` as safetensors, in Hugging Face's
    layout; return the paths written.

    Params and persistent buffers go under their `state_dict` names (a tied weight once)
    into `model.safetensors`, or, when they exceed `max_shard_size` (bytes, or "5GB",
    "500MiB"), into `model-00001-of-0000N.safetensors` shards with
    `model.safetensors.index.json`. A Hugging Face model's `config.json` is written too,
    so `AutoModel.from_pretrained(folder)` loads the result. Files are written
    atomically; a folder holding an earlier export is refused unless `overwrite=True`
    (its files this export does not replace are removed). Needs the `safetensors`
    package (`pip install 'ftrain[safetensors]'`). `model=` names one model of a
    multi-model state. `load_safetensors` reads the files back into a state.

    Examples:
        >>> import tempfile, torch, ftrain as ft
        >>> from safetensors.torch import load_file
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 2))
        >>> folder = tempfile.mkdtemp()
        >>> [p.rsplit("/", 1)[1] for p in ft.export.safetensors(state, folder)]
        ['model.safetensors']
        >>> sorted(load_file(f"{folder}/model.safetensors"))
        ['bias', 'weight']
    """
    from ftrain.weights import save_safetensors
    return save_safetensors(state, folder, max_shard_size=max_shard_size, model=model,
                            overwrite=overwrite)


def load_safetensors(state: TrainState, path: str | os.PathLike[str], *,
                     model: str | None = None) -> TrainState:
    """A new state whose model weights are read from safetensors: a file, or a folder
    holding `model.safetensors` or a sharded `model.safetensors.index.json` (as
    `ft.export.safetensors` or Hugging Face's `save_pretrained` write them).

    Strict, as `ft.load`: every param and persistent buffer of the model must be there
    with its shape and dtype, and a tensor the model does not have is an error (a tied
    weight's second name is accepted); all are `CheckpointError`s naming the tensor. The
    optimizer state and slots are kept. The index is untrusted: its file names must be
    plain names in the folder.

    Examples:
        >>> import tempfile, torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 2))
        >>> folder = tempfile.mkdtemp()
        >>> _ = ft.export.safetensors(state, folder)
        >>> other = ft.TrainState.create(torch.nn.Linear(3, 2))
        >>> back = ft.export.load_safetensors(other, folder)
        >>> torch.equal(back.params["weight"], state.params["weight"])
        True
    """
    from ftrain.weights import load_safetensors as load
    return load(state, path, model=model)
