"""Calling a compiled iteration without torch.compile's per-call frame machinery.

A `torch.compile`'d function runs through dynamo's frame-evaluation hook: per call it
saves and restores dynamo's thread state, patches its config (`dynamic=False` does),
looks the code object's cache up, evaluates the guards of the entries there, then runs
the entry's transformed bytecode (which calls the compiled graph). On a tiny model that
machinery costs about as much as the graph itself (tens of microseconds a step).

`Direct` keeps what makes a call correct, dynamo's own guards evaluated by dynamo's own
guard manager on this call's arguments, and skips the rest: when one of the cache
entries this compiled function owns (its `isolate_recompiles` region) passes its guards,
its transformed bytecode is called as a plain function. Every other call (the first,
one no entry's guards accept, under a stance other than "default", while dynamo traces)
goes through the torch.compile'd function as before, which compiles or picks an entry.
The entries are read again whenever the code object's count of cache entries changes
(`torch._dynamo.reset()`, a new entry) and after every call through the hook.

Only for `fullgraph=True` (a graph break's resume functions run under the hook) and
without CUDA graphs (their trees track steps through the hook's calls).
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("ftrain")


def supported(compiled: Callable[..., Any]) -> bool:
    """Whether this torch exposes what `Direct` needs for this torch.compile'd function."""
    from torch._C._dynamo import eval_frame

    return hasattr(eval_frame, "_get_cache_entries_for_region") and \
        getattr(compiled, "_isolate_recompiles_id", -1) >= 0 and \
        hasattr(torch._dynamo.eval_frame, "_stance")


class Direct:
    """A torch.compile'd function (`compiled`, of the Python function `fn`) called through
    its cache entries' guards and transformed bytecode, skipping the frame hook.

    Results are the compiled function's own: the same graphs run, chosen by the same
    guards. `fn` takes plain positional parameters and never rebinds its closure
    variables (their values are read once). `direct_calls` counts the calls that skipped
    the hook.

    Examples:
        >>> import torch
        >>> from ftrain.compiling.direct import Direct, supported
        >>> def fn(x):
        ...     return x * 2
        >>> compiled = torch.compile(fn, backend="eager", fullgraph=True,
        ...                          isolate_recompiles=True)  # doctest: +SKIP
        >>> call = Direct(compiled, fn) if supported(compiled) else compiled  # doctest: +SKIP
        >>> call(torch.ones(2)), call(torch.ones(2))[0]  # doctest: +SKIP
        (tensor([2., 2.]), tensor(2.))
    """

    def __init__(self, compiled: Callable[..., Any], fn: types.FunctionType) -> None:
        from torch._C._dynamo import eval_frame

        self.compiled = compiled
        self.fn = fn
        self.code = fn.__code__
        self.region = int(compiled._isolate_recompiles_id)  # type: ignore[attr-defined]
        self.names = self.code.co_varnames[:self.code.co_argcount]
        # the closure's values, read once: `fn` must not rebind its closure variables
        # (ftrain's iteration never does; its closure is fixed per compiled variant)
        self.closure = {name: cell.cell_contents
                        for name, cell in zip(self.code.co_freevars, fn.__closure__ or ())}
        self.entries = eval_frame._get_cache_entries_for_region
        self.total = eval_frame._get_total_cache_entry_count
        self.eval_frame = torch._dynamo.eval_frame  # its `_stance`, read per call
        self.is_compiling = torch.compiler.is_compiling
        # this region's entries as (guard check, bytecode), in dynamo's order, and the
        # code object's entry count they were read at (a reset or a new entry changes it)
        self.cached: list[tuple[Callable[[dict[str, Any]], bool], Callable[..., Any]]] = []
        self.cached_at = -1
        self.runs: dict[Any, Callable[..., Any]] = {}  # cache entry -> its bytecode
        # plain positional parameters only: the guards read them by name
        self.enabled = not (fn.__defaults__ or fn.__kwdefaults__ or self.code.co_flags
                            & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS))
        self.direct_calls = 0

    def __call__(self, *args: Any) -> Any:
        plain = self.enabled and self.eval_frame._stance.stance == "default" and \
            not self.is_compiling()
        if plain:
            total = self.total(self.code)
            if total != self.cached_at:
                self._read_entries(total)
            if self.cached:
                f_locals = self._locals(args)
                for check, run in self.cached:
                    if check(f_locals):  # all of dynamo's guards
                        self.direct_calls += 1
                        return run(*args)
        result = self.compiled(*args)
        if plain:
            self._verify(args)
            self.cached_at = -1  # the hook may have compiled or reordered entries
        return result

    def _read_entries(self, total: int) -> None:
        entries = self.entries(self.code, self.region)
        self.runs = {e: self.runs.get(e) or self._bytecode(e) for e in entries}
        self.cached = [(_check(e), self.runs[e]) for e in entries]
        self.cached_at = total

    def _locals(self, args: tuple[Any, ...]) -> dict[str, Any]:
        """The frame's locals as dynamo's guards read them: arguments and closure."""
        f_locals = self.closure.copy()
        f_locals.update(zip(self.names, args))
        return f_locals

    def _bytecode(self, entry: Any) -> Callable[..., Any]:
        """The entry's transformed bytecode as a function over the original's globals
        and closure (what the hook runs in the original's frame)."""
        fn = self.fn
        return types.FunctionType(entry.code, fn.__globals__, fn.__name__, None,
                                  fn.__closure__)

    def _verify(self, args: tuple[Any, ...]) -> None:
        """After a call through the hook, the entry it ran (the most recent) must accept
        the same arguments here; if not, this torch's guard check differs from the hook's
        and every later call goes through the hook."""
        entries = self.entries(self.code, self.region)
        if not entries:  # nothing compiled (dynamo disabled): nothing to call directly
            return
        entry = entries[0]
        if entry.code.co_freevars != self.code.co_freevars or \
                not _check(entry)(self._locals(args)):
            self.enabled = False
            self.runs.clear()
            self.cached = []
            log.debug("ft.compile: calling the compiled iteration through torch.compile's "
                      "frame hook (its cache entries cannot be checked directly here)")


def _check(entry: Any) -> Callable[[dict[str, Any]], bool]:
    """A cache entry's guard check over a dict of the frame's locals (the C++ root
    manager's, skipping the Python wrapper's frame where this torch has one)."""
    manager = entry.guard_manager
    root = getattr(manager, "root", None)
    return root.check if root is not None and hasattr(root, "check") else manager.check
