"""How fast this machine runs Python right now, printed beside every bench's figures.

VMs of the same kind differed by 3-4x from one session to the next (2026-11-30: the HTTP floor's unloaded p50
0.12 ms on one, 0.48 ms on another). Ratios measured in one run compare across machines; absolute times do not,
unless one knows how fast the machine was. This is that yardstick: pure-interpreter work, no I/O.
"""

from __future__ import annotations

import statistics
import time


def python_speed_ms(repeats: int = 3) -> float:
    """Median wall time of ``sum(range(10**7))`` in this process, in ms (~100 ms on a quick 2024 core)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sum(range(10**7))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
