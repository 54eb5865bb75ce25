"""The inductor options `ft.compile` compiles with, and the on-disk caches it relies on.

A compiled step's first call in a new process costs: importing torch._dynamo and
torch._inductor (~2.5 s here), dynamo tracing the iteration (~1 s, a tiny MLP), then inductor.
Inductor's work is cached on disk under `cache_dir()` (`TORCHINDUCTOR_CACHE_DIR`, else
`/tmp/torchinductor_<user>`): the AOTAutograd cache and the FX graph cache map a graph
(and the options below) to its generated code, compiled C++ kernels included, so a later
process loads them instead of generating and compiling (tens of seconds on a CPU).

Two per-process costs remain on such a warm start, and the options remove them:

- `cpp_cache_precompile_headers=False`: with precompiled headers, loading a cached CPU
  kernel still preprocesses inductor's C++ prelude to hash it (0.3-1 s a process); a
  cold compile takes 0-3 s longer without them (of ~16 s here).
- `cpp.vec_isa_ok=True`, only where an earlier process's probe found every SIMD ISA
  the CPU reports buildable and loadable: inductor otherwise compiles a test program and
  loads it in a child Python in every process (~0.5-1 s). The probe's result is kept
  in `cache_dir()/ftrain/` under a key of the torch version, CPU flags and compiler.

The options are part of inductor's cache keys, so they are the same in every process. As
options given to torch.compile, they take precedence over `torch._inductor.config`.
`size_asserts=False`: dynamo's guards already check every input's size and stride.
`cpp_wrapper=True` on the CPU (`CompiledStep` decides per variant): the graph's wrapper
(allocations, kernel and GEMM calls) is C++ instead of Python: ~6% less time per step on a
tiny model and a cold compile of ~16 s instead of ~31 s here (one C++ file instead of one
per kernel), the same kernels and numbers. Not with float16 loss scaling (inductor's C++
wrapper cannot call the unscale kernel), nor on CUDA (a CUDA graph replays the whole
step); a graph it fails to compile is compiled again without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from typing import Any

import torch

log = logging.getLogger("ftrain")

_VEC_ISA: bool | None = None  # this process's answer, once found


def cache_dir() -> str:
    """Where inductor (and ftrain's probe record) keep compiled code across processes.

    `TORCHINDUCTOR_CACHE_DIR` moves it (set before the first compile).

    Examples:
        >>> from ftrain.compiling.options import cache_dir
        >>> isinstance(cache_dir(), str)
        True
    """
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    return str(inductor_cache_dir())


def inductor_options(cpp_wrapper: bool = False) -> dict[str, Any]:
    """The inductor options of the graphs `ft.compile` compiles (see the module doc),
    with or without inductor's C++ wrapper.

    Examples:
        >>> from ftrain.compiling.options import inductor_options
        >>> inductor_options(cpp_wrapper=True)["cpp_wrapper"]
        True
    """
    options: dict[str, Any] = {"size_asserts": False, "cpp_cache_precompile_headers": False,
                               "cpp_wrapper": cpp_wrapper}
    if vec_isa_ok():
        options["cpp.vec_isa_ok"] = True
    return options


def vec_isa_ok() -> bool:
    """Whether inductor may skip its per-process SIMD probe: True once a probe (here or
    in an earlier process, same torch, CPU flags and compiler) accepted every ISA this
    CPU reports. x86-64 Linux only (elsewhere inductor does not probe this way).

    Examples:
        >>> from ftrain.compiling.options import vec_isa_ok
        >>> vec_isa_ok() in (True, False)  # the first call may probe (~1 s)
        True
    """
    global _VEC_ISA
    if _VEC_ISA is None:
        try:
            _VEC_ISA = _probe_once()
        except Exception as err:  # a torch without these internals: inductor probes
            log.debug("ft.compile: no SIMD probe record (%s)", err)
            _VEC_ISA = False
    return _VEC_ISA


def _probe_once() -> bool:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    from torch._inductor import cpu_vec_isa
    from torch._inductor.cpp_builder import get_cpp_compiler

    flags = cpu_vec_isa.x86_isa_checker()
    # the ISAs inductor would probe: those whose flags the CPU reports
    wanted = [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list
              if all(flag in flags for flag in str(isa).split())]
    if not wanted:
        return False
    compiler = shutil.which(get_cpp_compiler()) or get_cpp_compiler()
    stamp = os.stat(compiler).st_mtime_ns if os.path.exists(compiler) else 0
    key = hashlib.sha256(json.dumps([torch.__version__, flags, compiler, stamp,
                                     sys.executable]).encode()).hexdigest()[:24]
    path = os.path.join(cache_dir(), "ftrain", f"vec_isa_{key}.json")
    try:
        with open(path) as f:
            return bool(json.load(f)["ok"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    # inductor's own probe (compile and load a test program per ISA; cached in-process)
    ok = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()] == wanted
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False,
                                         suffix=".tmp") as out:
            json.dump({"ok": ok, "isa": wanted, "torch": torch.__version__,
                       "compiler": compiler}, out)
        os.replace(out.name, path)  # atomic: concurrent processes write the same answer
    except OSError as err:  # a read-only cache: probe again next time
        log.debug("ft.compile: cannot record the SIMD probe at %s (%s)", path, err)
    return ok
