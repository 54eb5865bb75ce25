"""torch.compile around the captured iteration, and the diagnosis when it cannot be.

`_Compiled` compiles one iteration variant (counting its graphs on the step and noting
whether any draws random numbers), with `_guard_filter` dropping the guards on what is
fixed per variant. `_reason` turns a dynamo failure into one line for the user;
`_NotCapturable` is what the step finds uncapturable before tracing. `_equivalent` and
`_same` decide when a new state's model template and optimizer may reuse a compiled
iteration.
"""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import torch

from ftrain.compiling import iteration as _iteration_module
from ftrain.compiling.iteration import _OWN_CLOSURE, Metrics


class _Counts(Protocol):
    """What `_Compiled` reports to: the step's count of graphs compiled."""

    compiles: int


class _Compiled:
    """One torch.compile'd iteration: counts its graphs on the step (`compiles`) and
    notes whether any of them draws random numbers (then each call is seeded)."""

    def __init__(self, owner: _Counts, key: Any = None) -> None:
        self.owner = owner
        self.key = key  # the owner's name for this variant
        self.graphs = 0
        self.random = False
        self.cpp_wrapper = False

    def compile(self, fn: Callable[..., Metrics], mode: str, fullgraph: bool,
                dynamic: bool | None, direct: bool = False, cpp_wrapper: bool = False
                ) -> Callable[..., Metrics]:
        """`fn` under torch.compile with ftrain's inductor options (`cpp_wrapper`: see
        `ftrain.compiling.options`); with `direct` (one whole graph, no CUDA graphs)
        steady-state calls skip torch.compile's frame hook (`ftrain.compiling.direct`)."""
        kwargs: dict[str, Any] = {"fullgraph": fullgraph, "dynamic": dynamic}
        params = inspect.signature(torch.compile).parameters
        if "isolate_recompiles" in params:
            kwargs["isolate_recompiles"] = True  # each variant's recompiles are its own
        if hasattr(torch.compiler, "skip_guard_on_globals_unsafe"):  # has guard_filter_fn
            kwargs["options"] = {"guard_filter_fn": _guard_filter}
        wrapper = getattr(torch, "_TorchCompileInductorWrapper", None)
        if wrapper is None:  # pragma: no cover - other torch versions: no count
            self.random = True
            return torch.compile(fn, mode=mode, **kwargs)  # type: ignore[no-any-return]
        owner = self

        class Counting(wrapper):  # type: ignore[misc, valid-type]
            def __call__(self, model_: Any, inputs_: Any, **kw: Any) -> Any:
                random = _draws_random(model_)
                result = super().__call__(model_, inputs_, **kw)
                owner.graphs += 1  # compiled graphs only (not a failed attempt)
                owner.owner.compiles += 1
                owner.random = owner.random or random
                return result

        from ftrain.compiling import direct as _direct
        from ftrain.compiling.options import inductor_options

        self.cpp_wrapper = cpp_wrapper
        backend = Counting(mode, inductor_options(cpp_wrapper), dynamic)
        compiled = torch.compile(fn, backend=backend, **kwargs)
        if direct and fullgraph and isinstance(fn, types.FunctionType) and \
                _direct.supported(compiled):
            return _direct.Direct(compiled, fn)
        return compiled  # type: ignore[no-any-return]


# Closure variables of `_iteration` (`_OWN_CLOSURE`: ftrain's own, immutable for a
# compiled variant) and the classes of ftrain's own objects among them, the globals of
# the module it is defined in and global names from torch (its pytree registry included)
# and ftrain: not guarded on each call (saves ~20 us per step on a tiny model). Guards on
# the inputs, on the loss function (and its closure and globals), on the user's model
# class and on torch's global state (grad mode, autocast, functorch, ...) stay.
_LIBRARY_GLOBALS = ("G['torch']", "G['__import_torch']", "G['__import_torch_dot_",
                    "G['__import_ftrain']", "G['__import_ftrain_dot_", "G['__builtins_dict",
                    "__import__('torch')")  # (a user's module `torch_utils` is not torch)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The traced function's own globals, as its module defines them: dynamo later adds names
# there (`__import_<module>` for each module whose globals the trace reads, the loss
# function's among them), and guards through those must stay.
_OWN_GLOBALS = frozenset(n for n in vars(_iteration_module) if not n.startswith("__"))


# `dict(type(X).__dict__)[...]`, `dict(type(X).__mro__[1].__dict__)[...]`: guards on the
# class of X (its methods' defaults, properties), X a closure variable.
_CLASS_OF = re.compile(r"dict\(type\(([A-Za-z_][A-Za-z0-9_]*)([^)]*)\)")


def _guard_filter(entries: list[Any]) -> list[bool]:
    keep = []
    for e in entries:
        name = str(e.name)
        if e.is_global or name.startswith("__import__('torch')"):
            quoted = name[3:].split("'", 1)[0] if name.startswith("G['") else ""
            keep.append(not (name.startswith(_LIBRARY_GLOBALS) or quoted in _OWN_GLOBALS))
            continue
        cls = _CLASS_OF.match(name)
        if cls is not None:  # ftrain's own classes (not a user's model class) are fixed
            keep.append(cls.group(1) not in _OWN_CLOSURE or "_modules" in cls.group(2))
            continue
        root = _NAME.match(name)
        keep.append(root is None or root.group(0) not in _OWN_CLOSURE)
    return keep


_RANDOM = re.compile(r"rand|dropout|bernoulli|normal|uniform|multinomial|poisson|"
                     r"exponential|cauchy|geometric|random|rrelu|seed", re.IGNORECASE)


def _draws_random(gm: Any) -> bool:
    """Whether a dynamo graph (or a subgraph of it) may draw from a random generator.

    Conservative: any op named like a random one, any op tagged nondeterministic_seeded,
    any custom (non-aten) operator and any opaque module call count as random.
    """
    for module in gm.modules():
        graph = getattr(module, "graph", None)
        if graph is None:
            continue
        for node in graph.nodes:
            if node.op == "call_module":
                sub = module.get_submodule(node.target)
                if not hasattr(sub, "graph"):
                    return True
            elif node.op == "call_method":
                if _RANDOM.search(str(node.target)):
                    return True
            elif node.op == "call_function":
                target = node.target
                if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
                    if target.namespace not in ("aten", "prims"):
                        return True
                    overload = target if isinstance(target, torch._ops.OpOverload) else \
                        getattr(target, "default", None)
                    if overload is not None and \
                            torch.Tag.nondeterministic_seeded in overload.tags:
                        return True
                name = getattr(target, "__qualname__", None) or getattr(
                    target, "__name__", None) or str(target)
                if _RANDOM.search(name):
                    return True
    return False


class _NotCapturable(Exception):
    """Something of the step that cannot go into a compiled graph, found before tracing."""


def _reason(err: BaseException) -> str:
    """The gist of a torch.compile failure: what could not be captured, and where."""
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines()]
    head = next((ln for ln in lines if ln), type(err).__name__)
    if head.endswith("raised:"):  # a backend's failure: its own message is on the next line
        head = next((ln for ln in lines[lines.index(head) + 1:] if ln), head)
    explanation = next((ln[len("Explanation:"):].strip() for ln in lines
                        if ln.startswith("Explanation:")), "")
    dependent = re.search(r"Could not guard on data-dependent expression (.+?)"
                          r"(?: \(unhinted|\.\s|$)", text)
    if dependent:
        head = ("Python control flow depends on a tensor's value (data-dependent "
                f"expression {dependent.group(1).strip()})")
    reason = head if not explanation or explanation in head else f"{head} ({explanation})"
    if head.startswith("ModuleNotFoundError"):
        reason += (" (torch.compile imports the module each traced function was defined in; "
                   "define the loss function in an importable module)")
    if "from user code:" in text:
        block = text.split("from user code:", 1)[1].splitlines()
        frames = []
        for i, ln in enumerate(block):
            if ln.strip().startswith("File "):
                code = block[i + 1].strip() if i + 1 < len(block) else ""
                frames.append((ln.strip(), "" if code.startswith("File ") else code))
        user = [f for f in frames if not _library_frame(f[0])]
        if user or frames:
            where, code = (user or frames)[-1]
            reason += f"; at {where}" + (f": {code}" if code else "")
    return reason


def _library_frame(frame: str) -> bool:
    path = frame.replace("\\", "/")
    return "/ftrain/" in path or "/torch/" in path


def _equivalent(a: Any, b: Any) -> bool:
    """Whether two model templates (or dicts of them) behave alike: same module types,
    attributes, parameter and buffer layout. Conservative: an attribute that is not a
    plain value (a tensor, an object, a hook) must be the same object."""
    if a is b:
        return True
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and list(a) == list(b) and \
            all(_equivalent(a[k], b[k]) for k in a)
    mods_a = list(a.named_modules(remove_duplicate=False))
    mods_b = list(b.named_modules(remove_duplicate=False))
    if [n for n, _ in mods_a] != [n for n, _ in mods_b] or \
            [n for n, _ in a.named_parameters()] != [n for n, _ in b.named_parameters()]:
        return False
    for (_, ma), (_, mb) in zip(mods_a, mods_b):
        if type(ma) is not type(mb) or ma.__dict__.keys() != mb.__dict__.keys():
            return False
        for key, va in ma.__dict__.items():
            vb = mb.__dict__[key]
            if key == "training":
                continue  # the compiled copy always trains
            if key == "_modules":
                if list(va) != list(vb):
                    return False
            elif key in ("_parameters", "_buffers"):
                if list(va) != list(vb) or any(not _same_tensor_layout(va[k], vb[k])
                                               for k in va):
                    return False
            elif not _same(va, vb):
                return False
    return True


def _same_tensor_layout(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    return bool(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                and a.requires_grad == b.requires_grad)


_PLAIN = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device)


def _same(a: Any, b: Any) -> bool:
    """Value equality for plain values, containers and attrs records (optimizers,
    schedules); identity for anything else."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, _PLAIN):
        return bool(a == b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (set, frozenset)):
        return all(isinstance(x, _PLAIN) for x in a) and a == b
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if attrs.has(type(a)):
        return all(_same(getattr(a, f.name), getattr(b, f.name))
                   for f in attrs.fields(type(a)) if not f.name.startswith("_"))
    return False

