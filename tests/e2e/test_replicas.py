"""Three hosts that behave as one (issue 10.2): ``sched-adapter serve`` x3 on a shared state store.

Each replica is its own "host": its own working directory and settings, nothing on disk shared.
They share one legacy PostgreSQL database (over ODBC) and one state store: Redis in one round,
PostgreSQL in the other. The signing secret comes from the store (``signing_secret_from_state``),
so a proposed id from one replica is valid on every other.

* 100 clients race for 20 slots, each client through one of the three replicas: exactly 20
  bookings, one per slot, no overlap in the legacy table;
* a hold taken through one replica is respected by the others (and bookable by its holder there);
* an idempotent replay sent to another replica returns the stored answer;
* a replica killed (SIGKILL) in the middle of a storm loses no booking a client was told about.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dbutil
import httpx
import pytest
from e2e.test_booking_races import (  # the race helpers: Parameters, refs, checks of the legacy table
    RaceServer,
    assert_conflict,
    assert_won,
    find_body,
    parameters,
    practitioner,
    ref,
)
from serverutil import ProcessServers, free_port, process_log
from stateutil import drop_redis_keys, pg_state_url, redis_state_url

REPO = Path(__file__).resolve().parents[2]
MAPPING = REPO / "mappings" / "demo.yaml"
REPLICAS = 3
CLIENTS = 100
SLOTS = 20


class Cluster:
    def __init__(self, kind: str, target: str, state: str, procs: list[Any]) -> None:
        self.kind = kind
        self.state = state
        self.procs = procs
        self.bases = [p.base_url + "/fhir" for p in procs]
        self.legacy = RaceServer(dbutil.POSTGRESQL, target, procs[0].base_url, Path("/nonexistent"), procs[0])
        self.used: set[tuple[str | None, str]] = set()

    async def free_slots(self, n: int, days: tuple[int, int], via: int = 0) -> list[dict[str, Any]]:
        """``n`` proposals (through replica ``via``) no two of which overlap, none raced for before.

        No overlap across practitioners either: every proposal is for one patient (``find_body``'s
        Patient/7), and a patient cannot be booked twice at one time (issue 7.1)."""
        async with httpx.AsyncClient(timeout=60) as client:
            resp = await client.post(
                f"{self.bases[via]}/Appointment/$find", json=find_body(days, count=500), headers={"X-Client-Id": "f"}
            )
        assert resp.status_code == 200, resp.text
        found = [e["resource"] for e in resp.json()["entry"] if e["resource"]["resourceType"] == "Appointment"]
        taken: list[tuple[dt.datetime, dt.datetime]] = []
        out = []
        for appt in found:
            prac, start = practitioner(appt), dt.datetime.fromisoformat(appt["start"])
            end = dt.datetime.fromisoformat(appt["end"])
            if (prac, appt["start"]) in self.used or any(s < end and start < e for s, e in taken):
                continue
            taken.append((start, end))
            self.used.add((prac, appt["start"]))
            out.append(appt)
            if len(out) == n:
                return out
        raise AssertionError(f"only {len(out)} non-overlapping free slots on days {days}")


def _config(folder: Path, port: int, legacy_url: str, state: str) -> Path:
    path = folder / "replica.toml"
    path.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}
workers = 1
log_level = "warning"

[backend]
mapping = '{MAPPING}'
database_url = '{legacy_url}'
pool_size = 4
timeout_seconds = 20

[state]
url = '{state}'
path = "state.sqlite"

[security]
auth = "off"
signing_secret_from_state = true
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module", params=["redis", "postgresql"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    request.getfixturevalue("pg_admin_dsn")
    kind = request.param
    target = dbutil.seed_demo_database(dbutil.POSTGRESQL, f"replicas_{kind}")
    if kind == "redis":
        state = redis_state_url(request.getfixturevalue("redis_url"), "replicas")
    else:
        state = pg_state_url(dbutil.fresh_database(dbutil.POSTGRESQL, "replicas_state"))
    servers = ProcessServers()
    try:
        procs = []
        for i in range(REPLICAS):
            home = tmp_path_factory.mktemp(f"host{i}-{kind}")
            port = free_port()
            procs.append(
                servers.start(
                    [
                        sys.executable,
                        "-m",
                        "adapter.cli",
                        "serve",
                        "--config",
                        str(_config(home, port, f"odbc:{target}", state)),
                    ],
                    env={"PYTHONPATH": str(REPO)},
                    port=port,
                    cwd=str(home),
                    timeout=90,
                )
            )
        for p in procs:
            assert not (Path(p.argv[-1]).parent / "state.sqlite").exists(), "a replica used a host-local store"
        yield Cluster(kind, target, state, procs)
    finally:
        servers.stop_all()
        dbutil.drop_database(dbutil.POSTGRESQL, dbutil.database_name_from_dsn(target))
        if kind == "redis":
            drop_redis_keys(state)
        else:
            dbutil.drop_database(dbutil.POSTGRESQL, state.rsplit("/", 1)[1])


async def storm(
    cluster: Cluster, slots: list[dict[str, Any]], tag: str, alive: list[int], kill_after: int | None = None
) -> list[tuple[int, int, httpx.Response | BaseException]]:
    """CLIENTS bookings of ``slots`` (client i books slot i % n through replica i % len(alive)).

    With ``kill_after``: once that many answers are in, the last live replica is SIGKILLed.
    Returns (slot index, replica, response or the transport error) per client.
    """
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    done = 0
    killed = asyncio.Event()
    async with httpx.AsyncClient(timeout=90, limits=limits) as client:

        async def one(i: int) -> tuple[int, int, httpx.Response | BaseException]:
            nonlocal done
            slot, replica = i % len(slots), alive[i % len(alive)]
            try:
                resp: httpx.Response | BaseException = await client.post(
                    f"{cluster.bases[replica]}/Appointment/$book",
                    json=parameters(ref(slots[slot]["id"])),
                    headers={"X-Client-Id": f"{tag}-{i}"},
                )
            except httpx.TransportError as exc:
                resp = exc
            done += 1
            if kill_after is not None and done >= kill_after and not killed.is_set():
                killed.set()
                os.killpg(cluster.procs[alive[-1]].pid, signal.SIGKILL)
            return slot, replica, resp

        return list(await asyncio.gather(*(one(i) for i in range(CLIENTS))))


def assert_no_overlap_in_legacy_table(cluster: Cluster) -> None:
    rows = cluster.legacy.rows(
        "SELECT APPT_ID, TRIM(PROV_ID), APPT_DT, APPT_TM, DUR_MIN FROM APPT WHERE STATUS_CD IN ('S', 'A', 'D', 'N')"
    )
    spans: dict[str, list[tuple[dt.datetime, dt.datetime, str]]] = {}
    for appt_id, prac, day, hhmm, minutes in rows:
        d = dt.date(int(day) // 10000, int(day) // 100 % 100, int(day) % 100)
        start = dt.datetime.combine(d, dt.time(int(hhmm) // 100, int(hhmm) % 100))
        spans.setdefault(prac, []).append((start, start + dt.timedelta(minutes=int(minutes)), str(appt_id)))
    for prac, items in spans.items():
        items.sort()
        for (_s, e, a), (s2, _e2, b) in zip(items, items[1:], strict=False):
            assert s2 >= e, f"double booking: {prac} {a} and {b} overlap"


def test_issue10_2_hundred_clients_twenty_slots_three_replicas(cluster: Cluster) -> None:
    async def scenario() -> None:
        slots = await cluster.free_slots(SLOTS, (1, 6), via=1)
        results = await storm(cluster, slots, "race", alive=list(range(REPLICAS)))
        winners: dict[int, list[tuple[int, dict[str, Any]]]] = {}
        for slot, replica, resp in results:
            assert isinstance(resp, httpx.Response), resp
            if resp.status_code == 200:
                winners.setdefault(slot, []).append((replica, assert_won(resp, "booked")))
            else:
                assert_conflict(resp, hold=False)
        assert sorted(winners) == list(range(SLOTS)), {s: len(w) for s, w in winners.items()}
        assert all(len(w) == 1 for w in winners.values())
        assert len({replica for w in winners.values() for replica, _ in w}) >= 2, "one replica won everything"
        for slot, [(_, booked)] in winners.items():
            assert [row[0] for row in cluster.legacy.blocking_rows(slots[slot])] == [booked["id"]]
        assert_no_overlap_in_legacy_table(cluster)

    asyncio.run(scenario())
    for p in cluster.procs:
        assert p.poll() is None, process_log(p)


def test_issue10_2_a_hold_through_one_replica_is_respected_by_the_others(cluster: Cluster) -> None:
    async def scenario() -> None:
        [slot] = await cluster.free_slots(1, (7, 10), via=2)
        async with httpx.AsyncClient(timeout=60) as c:

            async def call(replica: int, op: str, who: str) -> httpx.Response:
                return await c.post(
                    f"{cluster.bases[replica]}/Appointment/${op}",
                    json=parameters(ref(slot["id"])),
                    headers={"X-Client-Id": who},
                )

            assert_won(await call(0, "hold", "holder"), "pending", token=slot["id"])
            assert_conflict(await call(1, "hold", "rival"), hold=True)
            assert_conflict(await call(2, "book", "rival"), hold=False)
            assert_conflict(await call(1, "book", "rival-2"), hold=False)
            found = await c.post(
                f"{cluster.bases[1]}/Appointment/$find",
                json=find_body((7, 10), practitioner_id=practitioner(slot), count=500),
                headers={"X-Client-Id": "rival"},
            )
            offered = [
                e["resource"]["start"] for e in found.json()["entry"] if e["resource"]["resourceType"] == "Appointment"
            ]
            assert slot["start"] not in offered  # a held slot is never offered, by any replica
            booked = assert_won(await call(2, "book", "holder"), "booked")  # its holder books it elsewhere
        assert [row[0] for row in cluster.legacy.blocking_rows(slot)] == [booked["id"]]

    asyncio.run(scenario())


def test_issue10_2_an_idempotent_replay_on_another_replica_returns_the_stored_answer(cluster: Cluster) -> None:
    async def scenario() -> None:
        [slot] = await cluster.free_slots(1, (11, 14), via=0)
        headers = {"X-Client-Id": "idem", "Idempotency-Key": f"replica-replay-{cluster.kind}"}
        body = parameters(ref(slot["id"]))
        async with httpx.AsyncClient(timeout=60) as c:
            first = await c.post(f"{cluster.bases[0]}/Appointment/$book", json=body, headers=headers)
            assert first.status_code == 200, first.text
            for replica in (1, 2):
                again = await c.post(f"{cluster.bases[replica]}/Appointment/$book", json=body, headers=headers)
                assert again.status_code == 200 and again.content == first.content
            metrics = (await c.get(cluster.procs[1].base_url + "/metrics")).text
        assert "sched_idempotent_replays_total 1.0" in metrics
        booked = assert_won(first, "booked")
        assert [row[0] for row in cluster.legacy.blocking_rows(slot)] == [booked["id"]]

    asyncio.run(scenario())


def test_issue10_2_a_search_cursor_from_one_replica_pages_on_another(cluster: Cluster) -> None:
    """Paging cursors are signed with the shared secret: replica 0's ``next`` link works on replica 2."""
    with httpx.Client(timeout=60) as c:
        first = c.get(f"{cluster.bases[0]}/Appointment", params={"patient": "1", "_count": "2"})
        assert first.status_code == 200, first.text
        nxt = next(lk["url"] for lk in first.json()["link"] if lk["relation"] == "next")
        assert nxt.startswith(cluster.bases[0])
        here = c.get(nxt)
        there = c.get(cluster.bases[2] + nxt[len(cluster.bases[0]) :])
        assert there.status_code == 200, there.text
        ids = [e["resource"]["id"] for e in there.json()["entry"] if e["search"]["mode"] == "match"]
        assert ids == [e["resource"]["id"] for e in here.json()["entry"] if e["search"]["mode"] == "match"]
        assert ids and not set(ids) & {e["resource"]["id"] for e in first.json()["entry"]}


def test_issue10_2_killing_a_replica_mid_storm_loses_no_acknowledged_booking(cluster: Cluster) -> None:
    """Runs last in the module: replica 2 is SIGKILLed after 30 answers of a 100-client storm."""

    async def scenario() -> None:
        slots = await cluster.free_slots(SLOTS, (15, 20), via=0)
        results = await storm(cluster, slots, "kill", alive=list(range(REPLICAS)), kill_after=30)
        assert cluster.procs[2].wait(10) is not None
        acknowledged: dict[int, list[dict[str, Any]]] = {}
        for slot, replica, resp in results:
            if isinstance(resp, BaseException):
                assert replica == 2, f"replica {replica} failed: {resp!r}"
                continue
            if resp.status_code == 200:
                acknowledged.setdefault(slot, []).append(assert_won(resp, "booked"))
            elif resp.status_code != 409:
                assert resp.status_code == 503, resp.text  # the store lost a peer mid-call: retryable
        assert all(len(a) == 1 for a in acknowledged.values()), acknowledged
        assert len(acknowledged) >= SLOTS // 2, "the storm mostly failed"
        for slot, [booked] in acknowledged.items():
            # The acknowledged booking is in the legacy table, and it is the only one there.
            assert [row[0] for row in cluster.legacy.blocking_rows(slots[slot])] == [booked["id"]]
        assert_no_overlap_in_legacy_table(cluster)
        # The survivors keep serving: every slot nobody was told about can still be settled.
        async with httpx.AsyncClient(timeout=60) as c:
            for slot in range(SLOTS):
                if slot in acknowledged:
                    continue
                resp = await c.post(
                    f"{cluster.bases[slot % 2]}/Appointment/$book",
                    json=parameters(ref(slots[slot]["id"])),
                    headers={"X-Client-Id": f"after-{slot}"},
                )
                assert resp.status_code in (200, 409), resp.text
        assert_no_overlap_in_legacy_table(cluster)

    asyncio.run(scenario())
