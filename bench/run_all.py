"""`make bench`: run every bench/bench_*.py's `run(out_dir)` and write bench/results/*.json.

Each bench takes its ratios within one run (this machine is shared and noisy). A failing bench is reported
and the others still run; the exit code says whether all succeeded. `python -m bench.run_all [name ...]`.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path

from bench.common import RESULTS


def discover() -> list[str]:
    return sorted(p.stem for p in Path(__file__).resolve().parent.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or discover()
    failed = []
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        t0 = time.time()
        print(f"== {name}", flush=True)
        try:
            result = module.run(RESULTS)
            print(f"   done in {time.time() - t0:.0f} s: {result}", flush=True)
        except Exception:  # report and go on with the others
            traceback.print_exc()
            failed.append(name)
    print(f"results in {RESULTS}" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
