"""Time that `import ftrain` adds to `import torch` (and `import lightning`, for comparison).

Each measurement runs in a fresh interpreter: the child imports torch untimed, then times
`import <module>` with `time.perf_counter()` and prints the seconds. `import torch` alone
is timed the same way for reference. Runs of the different modules are interleaved (so a
slow spell of a shared machine hits all of them) and the medians are reported.

Run: `python benchmarks/import_time.py [--runs 7]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys

TARGET_S = 0.2  # design.md: `import ftrain` adds <= 0.2 s to `import torch`

# The child times one import; `torch` is imported first (untimed) unless it is the target.
CHILD = """
import time
{pre}
t = time.perf_counter()
import {module}
print(time.perf_counter() - t)
"""


def time_import(module: str) -> float:
    pre = "" if module == "torch" else "import torch"
    out = subprocess.run([sys.executable, "-c", CHILD.format(pre=pre, module=module)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"`import {module}` failed in a fresh interpreter:\n{out.stderr}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh interpreters per module")
    args = parser.parse_args()

    modules = ["torch", "ftrain"]
    if importlib.util.find_spec("lightning") is not None:
        modules.append("lightning")
    else:
        print("lightning is not installed: skipping it")
    times: dict[str, list[float]] = {m: [] for m in modules}
    time_import("ftrain")  # warm the OS file cache and .pyc files before timing
    for run in range(args.runs):
        for m in modules:
            times[m].append(time_import(m))
        print(f"run {run + 1}/{args.runs}: " +
              ", ".join(f"{m} {times[m][-1]:.3f} s" for m in modules), flush=True)

    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"\n== summary (median of {args.runs} fresh interpreters) ==")
    print(f"import torch                         {med['torch']:.3f} s")
    ok = med["ftrain"] <= TARGET_S
    print(f"import ftrain, added after torch     {med['ftrain']:.3f} s   target <= {TARGET_S} s"
          f"   {'PASS' if ok else 'FAIL'}")
    if "lightning" in med:
        print(f"import lightning, added after torch  {med['lightning']:.3f} s   (comparison)")


if __name__ == "__main__":
    main()
