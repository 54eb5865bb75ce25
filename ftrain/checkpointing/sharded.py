"""Sharded checkpoints: a state holding DTensors saved as one folder with DCP.

`ft.save` of a sharded state (FSDP2 parameters and optimizer state are DTensors) writes a
checkpoint *folder* with `torch.distributed.checkpoint`: every rank writes its own shards
(nothing is gathered onto one rank), rank 0 writes `ftrain.pt`, the rest of the state
(step, seed, slots, hparams, the nesting of every field) as an ordinary ftrain payload in
which each tensor is a marker `{"__dcp__": key}` naming its DCP entry. The folder is
written as a temporary sibling and renamed into place by rank 0 after every rank finished:
a finished checkpoint or none. With `async_save=True` DCP's `async_save` writes in a
thread; one save is in flight at most, and the rename happens when it is waited for.

Everything read back is untrusted: `ftrain.pt` goes through `file.read` (weights_only and
the payload check), DCP's `.metadata` (a pickle) is read with an allow-list of the classes
DCP writes, and only tensor entries are ever loaded (DCP unpickles byte entries freely).
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.tensor import DTensor

from ftrain import storage as _storage
from ftrain.checkpointing import ckptdir
from ftrain.checkpointing.atomic import atomic_write, fsync_dir
from ftrain.checkpointing.payload import payload
from ftrain.core.state import TrainState
from ftrain.errors import CheckpointError, ConfigError

__all__ = ["MARK", "fill", "is_sharded", "read_meta", "refuse_url", "save_dir", "wait"]

MARK = "__dcp__"
_TENSOR_FIELDS = ("params", "buffers", "opt_state", "slots", "hparams")
_STATE_FIELDS = ("params", "buffers", "opt_state")


def is_sharded(state: TrainState) -> bool:
    """Whether any tensor of `state` is a DTensor (sharded across ranks).

    Examples:
        >>> import torch, ftrain as ft
        >>> is_sharded(ft.TrainState.create(torch.nn.Linear(2, 1)))
        False
    """
    return ckptdir.holds_dtensor(state)


def refuse_url(path: str) -> None:
    """A ConfigError: sharded checkpoints are folders put in place by a rename, which an
    object store lacks, so they are not written to (or read from) a URL.

    Examples:
        >>> refuse_url("s3://bucket/run/last.ckpt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ftrain.errors.ConfigError: a sharded (DCP) checkpoint cannot be saved to or loaded ...
    """
    raise ConfigError(
        f"a sharded (DCP) checkpoint cannot be saved to or loaded from a URL ({path!r}): "
        "ftrain writes it as a folder that a rename puts in place whole, which object "
        "stores lack. Use a local or shared-filesystem folder for a sharded state "
        "(with_fsdp), or ft.consolidate it into one file and copy that to the URL")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _split(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(payload with each tensor replaced by a marker, {key: tensor}); a key is the JSON of
    the tensor's path, so no two collide whatever the names hold."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: list[Any]) -> Any:
        if isinstance(node, torch.Tensor):
            key = json.dumps(path)
            tensors[key] = node
            return {MARK: key}
        if isinstance(node, dict):
            return {k: walk(v, [*path, k]) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v, [*path, i]) for i, v in enumerate(node))
        return node

    skeleton = {k: (walk(v, [k]) if k in _TENSOR_FIELDS else v) for k, v in data.items()}
    return skeleton, tensors


class _Pending:
    def __init__(self, future: Future[Any], tmp: str, path: str, group: Any,
                 then: Callable[[], None] | None) -> None:
        self.future, self.tmp, self.path, self.group, self.then = future, tmp, path, group, then


_pending: _Pending | None = None
_async_group: Any = None


def _group_for_async() -> Any:
    """A gloo group of its own: DCP's writer thread runs collectives on it while training
    runs its own on the default group (one group from two threads would interleave)."""
    global _async_group
    if _async_group is None and _world()[1] > 1:
        _async_group = dist.new_group(backend="gloo")  # collective: every rank saves
    return _async_group


def save_dir(path: str | os.PathLike[str], state: TrainState,
             hparams: Mapping[str, Any] | None = None, *, async_save: bool = False,
             then: Callable[[], None] | None = None) -> str:
    """Write `state` as a checkpoint folder at `path` with DCP, collectively (every rank
    calls it). `then` runs on rank 0 once the folder is in place. With `async_save`, the
    write continues in a thread and completes at the next `save_dir` or `wait()`.

    Examples:
        >>> import os, tempfile, torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.adam(1e-3))
        >>> path = save_dir(os.path.join(tempfile.mkdtemp(), "a.ckpt"), state)
        >>> sorted(os.listdir(path))
        ['.metadata', '__0_0.distcp', 'ftrain.pt']
    """
    if _storage.is_url(os.fspath(path)):
        refuse_url(os.fspath(path))
    path = os.path.abspath(_storage.local_path(path))
    wait()  # one save in flight: the previous one finishes first
    data = payload(state, hparams)
    skeleton, tensors = _split(data)
    rank, world = _world()
    parent = os.path.dirname(path)
    made: list[Any] = [None, None]
    if rank == 0:
        try:
            if os.path.lexists(path) and os.path.isdir(path) and not \
                    ckptdir.is_checkpoint_dir(path):
                raise CheckpointError(f"{path!r} exists and is a folder that is not an "
                                      "ftrain checkpoint: it is not replaced (move it away)")
            tmp = ckptdir.make_temporary(parent)
            atomic_write(os.path.join(tmp, ckptdir.META), lambda f: torch.save(skeleton, f))
            made[0] = tmp
        except (OSError, CheckpointError) as err:
            made[1] = str(err)
    if world > 1:  # every rank writes into rank 0's temporary folder
        dist.broadcast_object_list(made, src=0)
    if made[1] is not None:
        raise CheckpointError(f"cannot save {path!r}: {made[1]}")
    tmp = made[0]
    group = _group_for_async() if async_save else None
    global _pending
    try:
        writer = FileSystemWriter(tmp)
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        if async_save:
            started: Any = dcp.async_save(tensors, storage_writer=writer, process_group=group,
                                     no_dist=world == 1)
            future = getattr(started, "upload_completion", started)
            _pending = _Pending(future, tmp, path, group, then)
            return path
        dcp.save(tensors, storage_writer=writer, no_dist=world == 1)
    except Exception as err:
        _discard(tmp)
        raise CheckpointError(f"cannot save {path!r} (DCP): {err}") from err
    _finish(tmp, path, group, then)
    return path


def _discard(tmp: str) -> None:
    if _world()[0] == 0:
        ckptdir.remove(tmp)


def _finish(tmp: str, path: str, group: Any, then: Callable[[], None] | None) -> None:
    rank, world = _world()
    if world > 1:
        dist.barrier(group=group)  # every rank's shards are written and synced
    if rank == 0:
        fsync_dir(tmp)
        ckptdir.replace(tmp, path)
        if then is not None:
            then()
    if world > 1:
        dist.barrier(group=group)  # in place before any rank reads it


def wait() -> None:
    """Finish the save in flight, if any (every rank calls it, at the same point).

    Examples:
        >>> wait()   # nothing in flight: returns at once
    """
    global _pending
    pending, _pending = _pending, None
    if pending is None:
        return
    try:
        pending.future.result()
    except Exception as err:
        _discard(pending.tmp)
        raise CheckpointError(f"the asynchronous save of {pending.path!r} failed: "
                              f"{err}") from err
    _finish(pending.tmp, pending.path, pending.group, pending.then)


def pending_path() -> str | None:
    """The target of the save in flight, or None."""
    return None if _pending is None else _pending.path


# -- reading -------------------------------------------------------------------------------

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: only the classes DCP writes may be named in it."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a class DCP metadata holds")


class _SafeReader(FileSystemReader):
    """torch's reader, with the metadata read through the allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = os.path.join(os.fspath(self.path), ckptdir.DCP_META)
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"it holds a {type(metadata).__name__}")
        return metadata


def _metadata(path: str) -> Metadata:
    if not os.path.isfile(os.path.join(path, ckptdir.DCP_META)):
        raise CheckpointError(
            f"{path!r} is not a complete sharded checkpoint: DCP's metadata file "
            f"{ckptdir.DCP_META!r} is missing (an interrupted or foreign save?); found "
            f"{sorted(os.listdir(path))[:8]}")
    try:
        return _SafeReader(path).read_metadata()
    except Exception as err:
        raise CheckpointError(f"{path!r}: DCP's metadata {ckptdir.DCP_META!r} cannot be "
                              f"read safely: {err}") from err


def _markers(tree: Any, path: list[Any], out: dict[str, list[Any]]) -> None:
    if isinstance(tree, dict):
        if set(tree) == {MARK}:
            out[tree[MARK]] = path
            return
        for k, v in tree.items():
            _markers(v, [*path, k], out)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _markers(v, [*path, i], out)


def read_meta(path: str, read: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """The checked payload of a checkpoint folder, each tensor a marker; the DCP metadata
    must list every marker as a tensor (else the folder is truncated or foreign). `read`
    is `file.read` (passed in: file imports this module)."""
    path = os.fspath(path)
    if not ckptdir.is_checkpoint_dir(path):
        holds = sorted(os.listdir(path))[:8] if os.path.isdir(path) else "no folder"
        raise CheckpointError(f"{path!r} is not an ftrain sharded checkpoint: expected a "
                              f"folder with {ckptdir.META!r} and DCP's "
                              f"{ckptdir.DCP_META!r}, found {holds}")
    md = _metadata(path)
    data = read(os.path.join(path, ckptdir.META), map_location="cpu")
    found: dict[str, list[Any]] = {}
    for field in _TENSOR_FIELDS:
        _markers(data.get(field), [field], found)
    for key, where in found.items():
        entry = md.state_dict_metadata.get(key) if isinstance(key, str) else None
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{path!r}: {json.dumps(where)} names the tensor {key!r}, "
                                  "which DCP's metadata does not hold as a tensor (found "
                                  f"{type(entry).__name__}): a truncated or foreign folder")
    return data


def _at(tree: Any, path: list[Any]) -> Any:
    for k in path:
        try:
            tree = tree[k]
        except (KeyError, IndexError, TypeError):
            return None
    return tree


class _Shards:
    """Where a meta-device state (a model built on the meta device, for `with_fsdp`) is
    read on several processes: parameters and the optimizer state shaped like them, as
    FSDP lays them out (`Shard(0)`), so each rank reads only its part."""

    def __init__(self, shapes: dict[str, torch.Size], world: int) -> None:
        self.shapes, self.world = shapes, world

    def wants(self, where: list[Any], shape: torch.Size) -> bool:
        if len(shape) == 0 or where[0] == "buffers":
            return False
        return where[0] == "params" or self.shapes.get(str(where[-1])) == shape

    def empty(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Any:
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor import empty as dempty

        from ftrain.parallel.fsdp import mesh_for
        return dempty(shape, dtype=dtype, device_mesh=mesh_for(device.type, self.world),
                      placements=[Shard(0)])


def _shard_maker(found: dict[str, list[Any]], md: Metadata, like: TrainState | None
                 ) -> _Shards | None:
    world = _world()[1]
    if like is None or world <= 1:
        return None
    shapes = {}
    for key, where in found.items():
        saved = md.state_dict_metadata[key]
        if where[0] == "params" and isinstance(saved, TensorStorageMetadata):
            shapes[str(where[-1])] = torch.Size(saved.size)
    return _Shards(shapes, world)


def fill(path: str, data: dict[str, Any], like: TrainState | None, map_location: Any = None
         ) -> dict[str, Any]:
    """`data` (from `read_meta`) with its markers replaced by tensors read from the folder:
    into `like`'s layout where `like` has a tensor of the saved shape and dtype (a DTensor
    reshards to this world's mesh; a plain tensor gets the whole value), a plain tensor for
    slots and hparams; a tensor `like` lacks or has in another shape becomes an unread
    placeholder of the saved shape, for the strict comparison to name. Without `like`,
    every tensor is read whole onto `map_location`."""
    md = _metadata(path)
    live = None if like is None else {"params": like.params, "buffers": like.buffers,
                                      "opt_state": like.opt_state}
    found: dict[str, list[Any]] = {}
    for field in _TENSOR_FIELDS:
        _markers(data.get(field), [field], found)
    device = torch.device(map_location) if isinstance(map_location, (str, torch.device)) \
        else like.device if like is not None else torch.device("cpu")
    if device.type == "meta":  # a meta-device model's state (with_fsdp makes it real)
        from ftrain.parallel.dist import local_device
        device = local_device()
    shard = _shard_maker(found, md, like)
    targets: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    for key, where in found.items():
        saved = md.state_dict_metadata[key]
        assert isinstance(saved, TensorStorageMetadata)
        shape, dtype = torch.Size(saved.size), saved.properties.dtype
        if live is None:
            targets[key] = torch.empty(shape, dtype=dtype, device=device)
            continue
        ref = _at(live, where) if where[0] in _STATE_FIELDS else None
        if isinstance(ref, torch.Tensor) and ref.shape == shape and ref.dtype == dtype:
            if isinstance(ref, DTensor):
                targets[key] = torch.empty_like(ref)
            elif ref.is_meta and shard is not None and shard.wants(where, shape):
                targets[key] = shard.empty(shape, dtype, device)  # this rank's part only
            else:  # a meta `like` (a model built on the meta device): this device
                targets[key] = torch.empty(shape, dtype=dtype, device=device if (
                    map_location or ref.is_meta) else ref.device)
        elif where[0] in _STATE_FIELDS:
            values[key] = torch.empty(shape, dtype=dtype, device="meta")  # never read
        else:
            targets[key] = torch.empty(shape, dtype=dtype, device=device)
    try:
        with warnings.catch_warnings():  # DCP warns that one process reads alone: intended
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(targets, storage_reader=_SafeReader(path), no_dist=_world()[1] == 1)
    except (Exception, CheckpointException) as err:  # DCP's is a BaseException
        raise CheckpointError(f"{path!r}: reading the shards failed (truncated or damaged "
                              f"files?): {err}") from err
    values.update(targets)

    def put(tree: Any) -> Any:
        if isinstance(tree, dict):
            if set(tree) == {MARK}:
                return values[tree[MARK]]
            return {k: put(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(put(v) for v in tree)
        return tree

    return {k: (put(v) if k in _TENSOR_FIELDS else v) for k, v in data.items()}
