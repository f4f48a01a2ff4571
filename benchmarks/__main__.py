"""Run every benchmark: `python -m benchmarks [NAME ...]` (names without the `bench_` prefix).

Set LOCA_BENCH_QUICK=1 for a seconds-long smoke run of each. `python -m benchmarks gpu [--device …] [--tiny]`
is the GPU check (benchmarks/gpu.py): run by name only, never among "every benchmark", since it needs a GPU.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))


def main(argv: list[str]) -> int:
    if argv[:1] == ["gpu"]:  # the GPU check takes its own options
        from benchmarks import gpu

        return gpu.main(argv[1:])
    names = argv or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {available()} (and the GPU check: gpu)", file=sys.stderr)
        return 2
    for name in names:
        print(f"\n=== benchmark: {name} ===", flush=True)
        t0 = time.perf_counter()
        importlib.import_module(f"benchmarks.bench_{name}").main()
        print(f"=== {name} done in {time.perf_counter() - t0:.1f} s ===", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
