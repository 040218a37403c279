"""The benchmark scripts under bench/ still run: each once, tiny, as a subprocess (about 10 s in all).

Speed is not checked here (bench/README.md has the figures, measured with the full sizes); what is checked is
that each script measures and ends as its docstring says. `bench/book.py` had stopped measuring at all once
one patient's calendar was checked (its non-conflicting phase took every free time of its patient and left the
conflict storms none) and nothing in `make test` noticed. `bench/find.py` and `bench/readers.py` need wrk,
which is not installed at test time, so they are not run here.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bench(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, (
        f"bench/{script} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def test_bench_book_books_and_lets_exactly_one_client_win_each_contested_slot() -> None:
    # More bookings asked for than one patient's free time in the window holds: the storms must still get slots.
    # Three days, so that the window holds a working day whatever the weekday the suite runs on.
    out = _bench(
        "book.py",
        *("--clients", "2", "--duration", "1", "--max-bookings", "1000", "--days", "3"),
        *("--storm-clients", "4", "--storm-slots", "2", "--storms", "2"),
    )
    phase, storm = (line for line in out.splitlines() if "statuses" in line)
    assert re.search(r"statuses \{200: \d+\}", phase), phase  # every non-conflicting booking succeeded
    statuses = ast.literal_eval(re.search(r"statuses (\{[^}]*\})", storm).group(1))
    assert statuses == {200: 4, 409: 4}, storm  # 2 storms x 4 clients on 2 slots: one winner per slot
    assert "winners per slot [1]" in storm
    assert "double bookings 0" in out
    assert "RESULT: OK" in out


def test_bench_search_measures_the_first_page_next_page_and_accurate_total() -> None:
    out = _bench("search.py", "--rows", "20000", "--requests", "10", "--warmup", "2")
    for query in ("first page", "accurate", "next page"):
        assert any(line.split()[:1] == ["20k"] and query in line for line in out.splitlines()), out
    assert "target p50 <= 5 ms on 20,000 appointments" in out


def test_bench_hl7v2_measures_every_phase() -> None:
    out = _bench(
        "hl7v2.py",
        *("--seconds", "1", "--phase-seconds", "0.5", "--apply-messages", "200", "--book-seconds", "0.5"),
    )
    for phase in ("durable commit floor", "SIU applied", "sustained 1 s", "$book round trips via MLLP"):
        assert phase in out


def test_bench_search_rebuilds_its_cached_database_when_the_demo_schema_changes() -> None:
    # The cached database's indexes are what ITI-118 runs on: one built from an older schema must not be reused.
    args = ("--rows", "20000", "--requests", "2", "--warmup", "1")
    _bench("search.py", *args)  # builds the cache, or finds it current
    note = REPO / "var" / "bench" / "search-20000.json"
    meta = json.loads(note.read_text())
    assert len(meta["schema"]) == 16, meta
    note.write_text(json.dumps({**meta, "schema": "an older schema"}))
    assert "building var/bench/search-20000.sqlite" in _bench("search.py", *args)
    assert "building" not in _bench("search.py", *args)  # and the rebuilt one is reused
