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


_DATABASE_SERVERS = ("postgres", "mariadbd", "mysqld")


def cpu_by_process() -> dict[int, tuple[str, int, float]]:
    """Every process's (name, session id, CPU seconds used so far), from ``/proc`` (Linux; {} elsewhere)."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, int, float]] = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[pid] = (name, int(fields[3]), (int(fields[11]) + int(fields[12])) / tick)  # session, utime + stime
    return out


def cpu_split(
    before: dict[int, tuple[str, int, float]], after: dict[int, tuple[str, int, float]], session: int
) -> tuple[float, float]:
    """CPU seconds used between two snapshots by the adapter (the processes of ``session``: the server the bench
    started in a session of its own, and its workers) and by the database servers (PostgreSQL, MariaDB)."""
    adapter = database = 0.0
    for pid, (name, sid, used) in after.items():
        spent = used - before.get(pid, (name, sid, 0.0))[2]
        if sid == session:
            adapter += spent
        elif name in _DATABASE_SERVERS:
            database += spent
    return adapter, database


def context_switches(session: int) -> tuple[int, int]:
    """Voluntary and involuntary context switches so far of every thread of the processes in ``session``."""
    import os
    from pathlib import Path

    voluntary = involuntary = 0
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            if os.getsid(int(pid_dir.name)) != session:
                continue
            for status in pid_dir.glob("task/*/status"):
                for line in status.read_text(encoding="utf-8").splitlines():
                    if line.startswith("voluntary_ctxt_switches"):
                        voluntary += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        involuntary += int(line.split()[1])
        except (OSError, ValueError):  # the process or thread ended meanwhile
            continue
    return voluntary, involuntary
