"""A state's weights as safetensors files, in the layout Hugging Face uses, and back.

`save_safetensors` writes the params and persistent buffers of a state's model (names as
in its `state_dict`) to `model.safetensors`, or, past `max_shard_size`, to
`model-00001-of-0000N.safetensors` shards plus `model.safetensors.index.json`
(`{"metadata": {"total_size": bytes}, "weight_map": {name: file}}`), so `safetensors`
and `transformers`' `from_pretrained` (which also reads the `config.json` written for a
Hugging Face model) load them. Each file is written atomically; the index comes last.
`load_safetensors` reads such files into a state, strictly: every tensor of the model
present, with its shape and dtype, nothing unknown. The files are untrusted input:
safetensors holds no code, and the index's file names must be plain names in the folder.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

from ftrain.checkpointing.atomic import atomic_write
from ftrain.core.state import TrainState, model_part
from ftrain.errors import CheckpointError, ConfigError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
MAX_INDEX_BYTES = 64 << 20  # an index larger than this is not one


def shard_size(value: int | str) -> int:
    """Bytes from an int or a string as Hugging Face writes them ("5GB" = 5e9, "2GiB").

    Examples:
        >>> shard_size("5GB"), shard_size("2MiB"), shard_size(1000)
        (5000000000, 2097152, 1000)
    """
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", str(value).upper()) \
        if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"max_shard_size must be a number of bytes > 0 or a size like "
                          f"'5GB' or '500MiB', got {value!r}")
    size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size <= 0:
        raise ConfigError(f"max_shard_size must be > 0, got {value!r}")
    return size


def _model_of(state: TrainState, model: str | None, what: str
              ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    if not isinstance(state, TrainState):
        raise ConfigError(f"{what} expects a TrainState, got {type(state).__name__}")
    return model_part(state, model, what)


def _named(template: Any, params: dict[str, Any], buffers: dict[str, Any]
           ) -> dict[str, torch.Tensor]:
    """The model's tensors under their state_dict names, in state_dict order; a name
    tied to another tensor (shared weights) appears once, as the state holds it."""
    keys = list(template.state_dict(keep_vars=True))
    tensors = {**params, **buffers}
    return {k: tensors[k] for k in keys if k in tensors}


def save_safetensors(state: TrainState, folder: str | os.PathLike[str], *,
                     max_shard_size: int | str = "5GB", model: str | None = None,
                     overwrite: bool = False) -> list[str]:
    """Write the weights of `state`'s model to `folder` as safetensors; return the paths.

    See `ft.export.safetensors`.
    """
    from safetensors.torch import save

    template, params, buffers = _model_of(state, model, "ft.export.safetensors")
    limit = shard_size(max_shard_size)
    named = _named(template, params, buffers)
    if any(getattr(t, "device", None) is not None and t.device.type == "meta"
           for t in named.values()):
        raise ConfigError("this state is deferred (built on the meta device): train it "
                          "under with_fsdp first, or consolidate a sharded checkpoint")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    ours = [f for f in os.listdir(folder) if f in (SINGLE, INDEX) or _SHARD.fullmatch(f)]
    if ours and not overwrite:
        raise ConfigError(f"{folder!r} already holds exported weights ({sorted(ours)[:3]}); "
                          "give an empty folder, or overwrite=True to replace them")
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, t in named.items():
        full = t.full_tensor() if hasattr(t, "full_tensor") else t  # with_fsdp: gathered
        nbytes = full.numel() * full.element_size()
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append({})
            sizes.append(0)
        # a copy on the CPU: safetensors refuses tensors sharing storage (views, ties)
        shards[-1][name] = full.detach().to("cpu", copy=True).contiguous()
        sizes[-1] += nbytes
    n = len(shards)
    files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                     for i in range(n)]
    written = []
    for file, tensors in zip(files, shards):
        path = os.path.join(folder, file)
        atomic_write(path, _writer(save(tensors, metadata={"format": "pt"})))  # one shard
        # in memory at a time
        written.append(path)
    if n > 1:
        index = {"metadata": {"total_size": sum(sizes)},
                 "weight_map": {name: file for file, tensors in zip(files, shards)
                                for name in tensors}}
        path = os.path.join(folder, INDEX)
        atomic_write(path, lambda f: f.write(json.dumps(index, indent=2).encode()))
        written.append(path)
    config = getattr(template, "config", None)
    if config is not None and callable(getattr(config, "save_pretrained", None)):
        config.save_pretrained(folder)  # a Hugging Face model: from_pretrained reads it
        written.append(os.path.join(folder, "config.json"))
    for stale in ours:  # an earlier export's files this one did not replace
        if os.path.join(folder, stale) not in written:
            os.remove(os.path.join(folder, stale))
    return written


def _writer(data: bytes) -> Any:
    return lambda f: f.write(data)


def _files(path: str) -> list[str]:
    """The safetensors files `path` names: a file, or a folder with one or an index."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is neither a safetensors file nor a folder")
    single, index = os.path.join(path, SINGLE), os.path.join(path, INDEX)
    if os.path.isfile(single):
        return [single]
    if not os.path.isfile(index):
        raise CheckpointError(f"{path!r} holds neither {SINGLE} nor {INDEX}")
    if os.path.getsize(index) > MAX_INDEX_BYTES:
        raise CheckpointError(f"{index!r} is over {MAX_INDEX_BYTES} bytes: not an index")
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{index!r} is not a JSON index: {err}") from err
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index!r}: weight_map must map tensor names to file names")
    names = sorted(set(weight_map.values()))
    bad = [v for v in names if os.path.basename(v) != v or v in ("", ".", "..")]
    if bad:
        raise CheckpointError(f"{index!r} names files outside its folder: {bad[:3]}")
    return [os.path.join(path, v) for v in names]


def load_safetensors(state: TrainState, path: str | os.PathLike[str], *,
                     model: str | None = None) -> TrainState:
    """A new state whose model weights are read from safetensors at `path`.

    See `ft.export.load_safetensors`.
    """
    from safetensors import safe_open

    template, params, buffers = _model_of(state, model, "ft.export.load_safetensors")
    wanted = _named(template, params, buffers)
    aliases = set(template.state_dict(keep_vars=True)) - set(wanted)  # tied names
    found: dict[str, torch.Tensor] = {}
    for file in _files(os.fspath(path)):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    if key in found:
                        raise CheckpointError(f"{file!r}: tensor {key!r} appears twice")
                    if key in wanted:
                        found[key] = f.get_tensor(key)
                    elif key not in aliases:
                        raise CheckpointError(
                            f"{file!r} holds {key!r}, which this model does not have "
                            f"(its tensors: {sorted(wanted)[:8]}...)")
        except CheckpointError:
            raise
        except Exception as err:  # a truncated or foreign file: safetensors' own error
            raise CheckpointError(f"{file!r} could not be read as safetensors: {err}") \
                from err
    missing = [k for k in wanted if k not in found]
    if missing:
        raise CheckpointError(f"{os.fspath(path)!r} lacks {len(missing)} tensor(s) of this "
                              f"model: {missing[:8]}")
    for key, like in wanted.items():  # the model's order: the first mismatch named
        t = found[key]
        if tuple(t.shape) != tuple(like.shape) or t.dtype != like.dtype:
            raise CheckpointError(f"{key!r}: the file holds {t.dtype} {tuple(t.shape)}, the "
                                  f"model has {like.dtype} {tuple(like.shape)}")
    device = state.device
    new_params = {k: found[k].to(device) if k in found else v for k, v in params.items()}
    new_buffers = {k: found[k].to(device) if k in found else v for k, v in buffers.items()}
    for k, p in params.items():  # keep each tensor's trainability as the state had it
        new_params[k].requires_grad_(p.requires_grad)
    if state.multi:
        return state.replace(params={**state.params, model: new_params},
                             buffers={**state.buffers, model: new_buffers})
    return state.replace(params=new_params, buffers=new_buffers)
