"""Run every benchmark script in this folder, each in its own process, and tabulate them.

`python benchmarks/run_all.py --quick` is the smoke run (each script's own quick flag:
`--quick`, `--runs 2` for import_time.py, which has none); without `--quick` the full
versions run. gpu.py runs only where CUDA is available (it is reported as skipped
otherwise). Each script runs as a subprocess with a timeout, in a temporary working folder
(nothing is written to the repository); its summary lines (from its last `== ... ==`
heading on, or its last lines where it has none) are printed unindented when it ends
(a grep for a line such as ddp.py's `ft / hand, 2 processes` finds it here too), then a table of
script, exit code and seconds. The exit status is 1 when any script failed (a non-zero exit
or a timeout), else 0. Targets are never judged here: each script's PASS/FAIL lines are
information, as timings on a shared machine are noisy. A script added to the folder later
runs with `--quick` in a quick run (the convention) until it is listed in SCRIPTS.

Run: `python benchmarks/run_all.py --quick [script ...]` (names with or without `.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SKIP = {"_common.py", "run_all.py"}  # helpers, not benchmarks
TAIL = 20  # lines shown of a script without a `== ... ==` heading


@dataclass(frozen=True)
class Script:
    """How one benchmark runs: its quick and full arguments and time limits (s)."""

    quick: tuple[str, ...] = ("--quick",)
    full: tuple[str, ...] = ()
    quick_timeout: float = 300.0
    full_timeout: float = 1800.0
    cuda: bool = False  # runs only where CUDA is available


SCRIPTS: dict[str, Script] = {
    "overhead.py": Script(),
    "compile.py": Script(),
    "population.py": Script(),
    "ddp.py": Script(),
    "fsdp.py": Script(),
    "checkpoint.py": Script(),
    "import_time.py": Script(quick=("--runs", "2")),  # no --quick: fewer interpreters
    "profile_step.py": Script(),
    "activation_checkpointing.py": Script(),
    "unroll.py": Script(),
    "dp.py": Script(),
    "rollback.py": Script(),
    # its own budget (8 minutes by default); --max-minutes bounds the quick run
    "gpu.py": Script(quick=("--rounds", "1", "--max-minutes", "3"), quick_timeout=240.0,
                     full_timeout=600.0, cuda=True),
}


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (asked in a child: this process stays light).

    Examples:
        >>> cuda_available() in (True, False)
        True
    """
    done = subprocess.run([sys.executable, "-c",
                           "import torch; print(torch.cuda.is_available())"],
                          capture_output=True, text=True, check=False, timeout=120)
    return done.stdout.strip().endswith("True")


def summary_lines(output: str) -> list[str]:
    """A script's summary: its output from the last `== ... ==` heading on, or its last
    TAIL lines.

    Examples:
        >>> summary_lines("warm-up\\n\\n== summary ==\\nft / hand 1.01x\\n")
        ['== summary ==', 'ft / hand 1.01x']
    """
    lines = output.rstrip().splitlines()
    heads = [i for i, line in enumerate(lines) if re.match(r"^== .* ==", line.strip())]
    return lines[heads[-1]:] if heads else lines[-TAIL:]


def run_one(name: str, args: list[str], timeout: float, workdir: str
            ) -> tuple[int | None, float, str, str]:
    """Run benchmarks/<name> with `args`: (exit code or None on timeout, seconds, stdout,
    stderr). On a timeout the script and every process below it are ended."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # partial output survives a timeout
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # launched under torchrun itself: the scripts launch their own
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(HERE / name), *args], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        stop_tree(proc)
        out, err = proc.communicate()
        code = None
    except BaseException:  # Ctrl-C: nothing left running behind us
        stop_tree(proc, grace=2.0)
        raise
    return code, time.monotonic() - start, out, err


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (read from /proc; none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_tree(proc: subprocess.Popen[str], grace: float = 10.0) -> None:
    """End a script and every process below it: SIGTERM first (torchrun then stops its
    workers, which run in sessions of their own), SIGKILL to what is left after `grace` s
    or once the script has gone (its orphans are no longer found below it)."""
    tree = [proc.pid, *descendants(proc.pid)]  # before anything ends and is reparented
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        if sig == signal.SIGTERM:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
            tree += [p for p in descendants(proc.pid) if p not in tree]
    proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="each script's smoke run (a few minutes in all)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per script (default: 300 quick, 1800 full)")
    parser.add_argument("scripts", nargs="*", help="only these (default: every script)")
    args = parser.parse_args()
    if args.timeout is not None and args.timeout <= 0:
        parser.error("--timeout must be > 0")

    found = sorted(p.name for p in HERE.glob("*.py") if p.name not in SKIP)
    chosen = found
    if args.scripts:
        wanted = [s if s.endswith(".py") else f"{s}.py" for s in args.scripts]
        unknown = [s for s in wanted if s not in found]
        if unknown:
            parser.error(f"no benchmark script {', '.join(unknown)} in {HERE} (there are: "
                         f"{', '.join(found)})")
        chosen = wanted
    has_cuda = cuda_available() if any(SCRIPTS.get(n, Script()).cuda for n in chosen) else False
    mode = "quick" if args.quick else "full"
    print(f"run_all: {len(chosen)} benchmark script(s), {mode} versions, python "
          f"{sys.executable}", flush=True)

    rows: list[tuple[str, str, float]] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ftrain-run-all-") as tmp:
        for name in chosen:
            spec = SCRIPTS.get(name)
            if spec is None:
                print(f"\n## {name}: not listed in run_all.SCRIPTS; run with "
                      f"{'--quick' if args.quick else 'no flags'}", flush=True)
                spec = Script()
            if spec.cuda and not has_cuda:
                print(f"\n## {name}: skipped (no CUDA device)", flush=True)
                rows.append((name, "skipped: no CUDA", 0.0))
                continue
            flags = list(spec.quick if args.quick else spec.full)
            if name == "gpu.py":  # its JSON summary goes to the scratch folder
                flags += ["--out", os.path.join(tmp, "gpu_results.json")]
            timeout = args.timeout or (spec.quick_timeout if args.quick else spec.full_timeout)
            print(f"\n## {name} {' '.join(flags)}".rstrip(), flush=True)
            workdir = os.path.join(tmp, name[:-3])
            os.makedirs(workdir)
            code, seconds, out, err = run_one(name, flags, timeout, workdir)
            for line in summary_lines(out):  # verbatim: grep '^ft / hand' still finds it
                print(line)
            if code != 0:  # why: the end of its error output
                why = f"timed out after {timeout:g} s" if code is None else f"exit code {code}"
                print(f"  -- {why}; its stderr ends:")
                for line in err.rstrip().splitlines()[-20:]:
                    print(f"  | {line}")
            sys.stdout.flush()
            rows.append((name, "timeout" if code is None else str(code), seconds))

    failed = [n for n, rc, _ in rows if rc != "0" and not rc.startswith("skipped")]
    print(f"\n== run_all ({mode}): {len(rows)} script(s) in {time.monotonic() - began:.0f} s ==")
    width = max(len(n) for n, _, _ in rows) if rows else 6
    print(f"{'script':<{width}}  {'rc':<16}  {'seconds':>8}")
    for name, rc, seconds in rows:
        print(f"{name:<{width}}  {rc:<16}  {seconds:8.1f}")
    print(f"failed: {', '.join(failed)}" if failed else "failed: none", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
