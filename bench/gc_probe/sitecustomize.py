"""Measure the garbage collector's time in a process (py-spy cannot see it).

    TRIOPROXY_GC_PROBE=/tmp/gc.txt PYTHONPATH=bench/gc_probe \
        .venv/bin/python bench/profile.py --sessions 16 --turns 60 --no-deflate

Every Python process started with this on its path that runs `trioproxy ... serve` appends one
line at exit: seconds spent collecting, and collections per generation. Divide by the events
the profile printed for the collector's cost per event; compare `TRIOPROXY_GC_GEN0=0`
(Python's defaults) with the default setting.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import time

_OUT = os.environ.get("TRIOPROXY_GC_PROBE")

if _OUT and "serve" in sys.argv:
    _spent = [0.0]
    _started = [0.0]
    _runs = [0, 0, 0]

    def _timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _started[0] = time.perf_counter()
        else:
            _spent[0] += time.perf_counter() - _started[0]
            _runs[info["generation"]] += 1

    def _report() -> None:
        gen0 = os.environ.get("TRIOPROXY_GC_GEN0", "default")
        with open(_OUT, "a") as out:
            out.write(f"gc_gen0={gen0} collecting {_spent[0]:.3f} s, collections {_runs}\n")

    gc.callbacks.append(_timed)
    atexit.register(_report)
