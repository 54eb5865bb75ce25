"""`TrainState`: the whole training state as one frozen record that is also a pytree.

A state holds data (params, buffers, optimizer state, step, seed, slots) and two static
fields that are not data: `model`, a parameter-free skeleton of the user's module (on the
meta device, so the weights are not held twice), and the pure `optimizer`. Several models
are dicts of them; their params, buffers and optimizer states are dicts nested by name.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import torch
from torch import nn
from torch.utils import _pytree as pytree

from ftrain.errors import ConfigError, DonatedStateError

Tensors = dict[str, torch.Tensor]

# Slot the loops keep the data position in ({"epoch": e, "batch": i}: i batches of epoch
# e consumed). A step asks a loop to stop by putting a reason string in STOP_SLOT.
LOOP_SLOT = "loop"
STOP_SLOT = "stop"

_DATA_FIELDS = ("params", "buffers", "opt_state", "slots")
_FIELDS = frozenset(("params", "buffers", "opt_state", "step", "seed", "slots", "model",
                     "optimizer"))


def _skeleton(module: nn.Module) -> nn.Module:
    """Copy `module` with every parameter and buffer replaced by a meta tensor.

    deepcopy's memo maps each tensor to its meta twin, so no weight is copied and tied
    parameters stay tied in the skeleton.
    """
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def _copy_tensors(module: nn.Module) -> tuple[Tensors, Tensors]:
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    return params, buffers


def _trainable(template: nn.Module, params: Tensors) -> Tensors:
    return {n: t for n, t in params.items() if template.get_parameter(n).requires_grad}



def clone_tree(tree: Any) -> Any:
    """A copy of a pytree with every tensor cloned (detached): a pure call's inputs."""
    return pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x,
                           tree)

@attrs.frozen(eq=False, slots=False)
class TrainState:
    """Params, buffers, optimizer state, step counter, seed and combinator slots.

    Build one with `TrainState.create`; change one with `replace` (a new
    record; assigning a field raises). `step` counts step calls (iterations) on the host.

    Examples:
        >>> import torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.sgd(0.1))
        >>> sorted(state.params), state.step
        (['bias', 'weight'], 0)
        >>> state.replace(step=5).step
        5
    """

    params: dict[str, Any]
    buffers: dict[str, Any]
    opt_state: dict[str, Any]
    step: int
    seed: int
    slots: dict[str, Any]
    model: Any = attrs.field(repr=False)
    optimizer: Any = attrs.field(repr=False)

    @classmethod
    def create(cls, model: nn.Module | Mapping[str, nn.Module], optimizer: Any = None,
               *, seed: int = 0) -> TrainState:
        """Copy `model`'s parameters and buffers into a new state and initialise `optimizer`.

        The user's module is never changed by training. Parameters with
        `requires_grad=False` stay frozen (no gradient, no optimizer state). Pass dicts
        (`{"G": g, "D": d}` and `{"G": adam(...), "D": adam(...)}`) to train several models.

        Examples:
            >>> import torch, ftrain as ft
            >>> nets = {"G": torch.nn.Linear(2, 2), "D": torch.nn.Linear(2, 1)}
            >>> opts = {"G": ft.optim.adam(1e-3), "D": ft.optim.adam(1e-3)}
            >>> state = ft.TrainState.create(nets, opts, seed=1)
            >>> sorted(state.params["D"])
            ['bias', 'weight']
        """
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"seed must be an int, got {type(seed).__name__}")
        if isinstance(model, Mapping):
            if optimizer is not None and not isinstance(optimizer, Mapping):
                raise ConfigError(
                    f"several models {sorted(model)} need a dict of optimizers keyed the same "
                    f"way (None for a model that is not trained), got {type(optimizer).__name__}")
            optimizers = dict(optimizer or {})
            unknown = sorted(set(optimizers) - set(model))
            if unknown:
                raise ConfigError(f"optimizers given for {unknown}, which are not among the "
                                  f"models {sorted(model)}")
            all_params: dict[str, Any] = {}
            all_buffers: dict[str, Any] = {}
            all_opt: dict[str, Any] = {}
            skeletons = {}
            for name, module in model.items():
                _check_module(module, name)
            _check_module(nn.ModuleDict(model), "models")  # all meta, or none
            for name, module in model.items():
                skeletons[name] = _skeleton(module)
                all_params[name], all_buffers[name] = _copy_tensors(module)
                opt = optimizers.get(name)
                all_opt[name] = (opt.init(_trainable(skeletons[name], all_params[name]))
                                 if opt is not None else {})
            return cls(params=all_params, buffers=all_buffers, opt_state=all_opt, step=0,
                       seed=seed, slots={}, model=skeletons,
                       optimizer={n: optimizers.get(n) for n in model})
        if isinstance(optimizer, Mapping):
            raise ConfigError("a dict of optimizers needs a dict of models with the same keys; "
                              f"got one {type(model).__name__}")
        _check_module(model, "model")
        skeleton = _skeleton(model)
        params, buffers = _copy_tensors(model)
        opt_state = optimizer.init(_trainable(skeleton, params)) if optimizer is not None else {}
        return cls(params=params, buffers=buffers, opt_state=opt_state, step=0, seed=seed,
                   slots={}, model=skeleton, optimizer=optimizer)

    # -- records are values ------------------------------------------------------------

    def replace(self, **changes: Any) -> TrainState:
        """Return a new state with the given fields changed.

        The tensors (and the params, buffers and optimizer-state dicts holding them) are
        shared, as a value's parts are; the `slots` dict is the new record's own.

        Examples:
            >>> import torch, ftrain as ft
            >>> s = ft.TrainState.create(torch.nn.Linear(2, 1))
            >>> s.replace(seed=3).seed, s.seed
            (3, 0)
        """
        new = object.__new__(TrainState)
        fields = new.__dict__
        fields.update(self.__dict__)
        # The slots dict is the container layers write into: each record gets its own, so
        # writing into one record's slots never changes another's (the values are shared:
        # a layer puts a new value under its name rather than changing the old one).
        fields["slots"] = dict(self.slots)
        for key, value in changes.items():
            if key not in _FIELDS or key.startswith("_"):
                raise ConfigError(f"TrainState has no field {key!r}; fields: "
                                  f"{sorted(f for f in _FIELDS if not f.startswith('_'))}")
            fields[key] = value
        if "optimizer" in changes and "opt_state" not in changes:
            _check_layout(new)
        if "step" in changes and (not isinstance(changes["step"], int)
                                  or isinstance(changes["step"], bool)):
            raise ConfigError(f"step must be an int, got {type(changes['step']).__name__}")
        return new

    def copy(self) -> TrainState:
        """A deep copy: new tensors, new dicts; the copy is independent of this state.

        Examples:
            >>> import torch, ftrain as ft
            >>> s = ft.TrainState.create(torch.nn.Linear(2, 1))
            >>> c = s.copy(); _ = c.params["bias"].add_(1)
            >>> bool((s.params["bias"] != c.params["bias"]).all())
            True
        """
        return pytree.tree_map(_copy_leaf, self)  # type: ignore[no-any-return]

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> TrainState:
        """Move every tensor (params, buffers, optimizer state, slots) to `device`.

        Only the device changes (dtypes stay, so the model skeleton still fits).

        Examples:
            >>> import torch, ftrain as ft
            >>> ft.TrainState.create(torch.nn.Linear(2, 1)).to("cpu").device.type
            'cpu'
        """
        if isinstance(device, torch.dtype) or not isinstance(device, (str, torch.device)):
            raise ConfigError(f"TrainState.to moves between devices; got {device!r}. To change "
                              "precision, build the model in that dtype before "
                              "TrainState.create, or use with_amp")
        target = torch.device(device)

        def move(x: Any) -> Any:
            return x.to(target, non_blocking=non_blocking) if isinstance(x, torch.Tensor) else x
        return pytree.tree_map(move, self)  # type: ignore[no-any-return]

    # -- changing the run mid-way (fine-tuning; ftrain.core.trainable) --------------------

    def freeze(self, patterns: str | Iterable[str]) -> TrainState:
        """A new state in which the parameters matching `patterns` do not train.

        Patterns are globs over parameter names (`"backbone.*"`; `"G.fc.*"` for model G of
        several); one that matches nothing is a ConfigError listing the names. Frozen
        parameters get no gradient and no update, and their optimizer state is dropped;
        the others keep theirs. Call it from an `ft.every` hook to freeze mid-run: the loop
        follows the new trainable set (its module, `with_ddp`'s wrapper, its prepared
        update). Checkpoints record the change, and `ft.load` redoes it on `like`.

        Examples:
            >>> import torch, ftrain as ft
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
            >>> state = ft.TrainState.create(net, ft.optim.adam(1e-3)).freeze("0.*")
            >>> sorted(state.opt_state["adam"]["exp_avg"])
            ['1.bias', '1.weight']
        """
        from ftrain.core import trainable
        return trainable.freeze(self, patterns)

    def unfreeze(self, patterns: str | Iterable[str], **settings: Any) -> TrainState:
        """A new state in which the parameters matching `patterns` train (again).

        They start with fresh optimizer state (as torch's `add_param_group`); the others
        keep theirs. `settings` (e.g. `lr=1e-4`) put them in a new parameter group ahead
        of the optimizer's other groups, with the optimizer's base settings for the rest;
        without settings they train under the groups the optimizer already has.

        Examples:
            >>> import torch, ftrain as ft
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
            >>> state = ft.TrainState.create(net, ft.optim.adam(1e-3)).freeze("0.*")
            >>> state = state.unfreeze("0.*", lr=1e-4)
            >>> sorted(state.opt_state["adam"]["exp_avg"])
            ['0.bias', '0.weight', '1.bias', '1.weight']
        """
        from ftrain.core import trainable
        return trainable.unfreeze(self, patterns, settings)

    def set_hparams(self, group: str | None = None, *, model: str | None = None,
                    **settings: Any) -> TrainState:
        """A new state whose optimizer uses `settings` (e.g. `lr=1e-4`) for one parameter
        group: `None` for the base settings, else the group's pattern as given
        (`groups={"*.bias": ...}` -> `"*.bias"`). Optimizer state is kept. `model=` names
        the model of a state of several.

        Examples:
            >>> import torch, ftrain as ft
            >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.sgd(0.1))
            >>> state.set_hparams(lr=0.01).optimizer.settings()["lr"]
            0.01
        """
        from ftrain.core import trainable
        return trainable.set_hparams(self, group, settings, model)

    def with_optimizer(self, optimizer: Any, *, keep_state: bool = True,
                       model: str | None = None) -> TrainState:
        """A new state trained by `optimizer` from now on (swap the optimizer mid-run).

        With `keep_state` (the default), what still fits carries over: the update count
        (schedules continue), and each transform's per-parameter state where the new
        optimizer has a transform of the same kind at the same place in its chain (adamw
        with other settings or groups keeps its moments; adamw -> sgd starts sgd fresh).
        `keep_state=False` starts everything fresh, the count included. Use this, not
        `replace(optimizer=...)`, which keeps the old optimizer state as it is.

        Examples:
            >>> import torch, ftrain as ft
            >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.adamw(1e-3))
            >>> sorted(state.with_optimizer(ft.optim.sgd(0.1, momentum=0.9)).opt_state)
            ['count', 'sgd']
        """
        from ftrain.core import trainable
        return trainable.with_optimizer(self, optimizer, keep_state, model)

    # -- views ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The device of the first parameter (or buffer); CPU for a tensor-free state."""
        for tree in (self.params, self.buffers):
            for leaf in pytree.tree_leaves(tree):
                if isinstance(leaf, torch.Tensor):
                    return leaf.device
        return torch.device("cpu")

    @property
    def epoch(self) -> int:
        """Epochs completed so far (the loops keep it in the `"loop"` slot)."""
        return int(self.slots.get(LOOP_SLOT, {}).get("epoch", 0))

    @property
    def frozen(self) -> list[str]:
        """The names of the parameters that do not train (sorted; see `freeze`).

        Examples:
            >>> import torch, ftrain as ft
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
            >>> ft.TrainState.create(net, ft.optim.sgd(0.1)).freeze("1.*").frozen
            ['1.bias', '1.weight']
        """
        from ftrain.core import trainable
        return trainable.frozen(self)

    @property
    def multi(self) -> bool:
        """True when the state holds several models (dicts keyed by model name)."""
        return isinstance(self.model, dict)


def _copy_leaf(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    return copy.deepcopy(x)


def _check_layout(state: TrainState) -> None:
    """`replace(optimizer=...)` keeps the optimizer state: refuse one the new optimizer
    cannot use (its transforms' keys differ), before a step fails on a missing key."""
    for name, _, opt, _, _, opt_state in parts(state):
        keys = getattr(opt, "keys", None)
        if opt is None or keys is None or not isinstance(opt_state, dict):
            continue
        have = sorted(k for k in opt_state if k != "count")
        if sorted(keys) != have:
            where = "" if name is None else f" (model {name!r})"
            raise ConfigError(
                f"replace(optimizer=...){where} keeps the optimizer state, laid out for "
                f"{have}, but the new optimizer needs {sorted(keys)}: use "
                "state.with_optimizer(new) (fresh state for new kinds, matching state kept), "
                "or state.set_hparams(lr=...) to change settings")


def check_real(state: TrainState, where: str) -> None:
    """Refuse a deferred state (a model built on the meta device: `TrainState.create`
    keeps only meta tensors then, all or none) where real tensors are needed."""
    first = next((t for t in pytree.tree_leaves((state.params, state.buffers))
                  if isinstance(t, torch.Tensor)), None)
    if first is not None and first.is_meta:
        raise ConfigError(f"{where} got a state whose tensors are on the meta device (the "
                          "model was built under torch.device('meta')): ft.with_fsdp makes "
                          "them real when a loop starts; otherwise build the model on a "
                          "real device")


def _check_module(module: Any, name: str) -> None:
    """A module, with real tensors or (a deferred state, for `with_fsdp`) only meta ones."""
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{name} must be a torch.nn.Module, got {type(module).__name__}")
    tensors = [*module.named_parameters(), *module.named_buffers()]
    meta = [n for n, t in tensors if t.is_meta]
    if meta and len(meta) < len(tensors):
        raise ConfigError(f"{name}.{meta[0]} is on the meta device and "
                          f"{name}.{next(n for n, t in tensors if not t.is_meta)} is not: "
                          "a state holds real tensors, or (for ft.with_fsdp to make real "
                          "at the start of a run) only meta ones")


# -- pytree: flatten to the data fields; step, seed and the static fields are context ----

def _flatten(s: TrainState) -> tuple[list[Any], Any]:
    return [s.params, s.buffers, s.opt_state, s.slots], (s.step, s.seed, s.model, s.optimizer)


def _flatten_with_keys(s: TrainState) -> tuple[list[tuple[Any, Any]], Any]:
    children, context = _flatten(s)
    return [(pytree.GetAttrKey(k), c) for k, c in zip(_DATA_FIELDS, children)], context


def _unflatten(children: Any, context: Any) -> TrainState:
    params, buffers, opt_state, slots = children
    step, seed, model, optimizer = context
    return TrainState(params=params, buffers=buffers, opt_state=opt_state, step=step, seed=seed,
                      slots=slots, model=model, optimizer=optimizer)


pytree.register_pytree_node(TrainState, _flatten, _unflatten,
                            serialized_type_name="ftrain.TrainState",
                            flatten_with_keys_fn=_flatten_with_keys)


# -- donation --------------------------------------------------------------------------

class _DonatedTrainState(TrainState):
    """What a state becomes once a loop has taken it over: every read raises."""

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("__") or name == "_donated_by":
            return object.__getattribute__(self, name)
        raise DonatedStateError(
            f"this TrainState was donated to {object.__getattribute__(self, '_donated_by')}, "
            "which updates its tensors in place; use the state the loop returned or yielded, "
            "or pass donate=False (or state.copy()) to keep this one")

    def __repr__(self) -> str:
        return f"TrainState(<donated to {object.__getattribute__(self, '_donated_by')}>)"


def donate(state: TrainState, to: str) -> None:
    """Mark `state` as taken over by `to`: reading any of its fields raises from now on."""
    if type(state) is TrainState:
        state.__dict__["_donated_by"] = to
        object.__setattr__(state, "__class__", _DonatedTrainState)


def is_donated(state: Any) -> bool:
    """True when `state` was donated to a loop and may no longer be read."""
    return type(state) is _DonatedTrainState


def model_part(state: TrainState, model: str | None, what: str
               ) -> tuple[nn.Module, Tensors, Tensors]:
    """(template, params, buffers) of the model `what` works on: the state's one model
    (`model` None), or the one named `model` of a multi-model state."""
    if not state.multi:
        if model is not None:
            raise ConfigError(f"this state holds one model; {what} takes no model= (got "
                              f"{model!r})")
        return state.model, state.params, state.buffers
    names = sorted(state.model)
    if model is None:
        raise ConfigError(f"this state holds several models {names}; name one with "
                          f"model=: {what}(state, model={names[0]!r})")
    if model not in state.model:
        raise ConfigError(f"model {model!r} is not in this state; models: {names}")
    return state.model[model], state.params[model], state.buffers[model]


def parts(state: TrainState) -> list[tuple[str | None, nn.Module, Any, Tensors, Tensors, Any]]:
    """(name, template, optimizer, params, buffers, opt_state) per model; name None if single."""
    if isinstance(state.model, dict):
        return [(n, state.model[n], state.optimizer[n], state.params[n], state.buffers[n],
                 state.opt_state[n]) for n in state.model]
    return [(None, state.model, state.optimizer, state.params, state.buffers, state.opt_state)]
