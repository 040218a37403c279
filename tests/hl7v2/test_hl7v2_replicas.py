"""Issue 10: the HL7v2 backend on two hosts sharing one PostgreSQL or Redis ``state.url``.

Two full adapters (each its own data directory, FHIR server, MLLP listener on its own port and applier) in front of
one legacy scheduler simulator, whose SIU feed goes to replica A: in one process, and as two ``sched-adapter serve``
processes one of which is killed. The SIU inbox, its de-duplication and the appointment mirror live in the shared
state store, so what reaches either listener is visible through both. Each test runs on PostgreSQL (a fresh
database) and on Redis (a key prefix of its own, db 13, see ``tests/stateutil.py``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from backendutil import Hl7Env, SimulatorThread
from hl7v2util import DEMO_MAPPING, siu
from serverutil import ProcessServers, free_port, process_log
from stateutil import drop_redis_keys, pg_state_url, redis_state_url

from adapter.hl7v2.store import WAITING, open_siu_store
from adapter.mllp import MLLPClient


@pytest.fixture(params=["postgresql", "redis"])
def state_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "postgresql":
        yield pg_state_url(request.getfixturevalue("fresh_db")("postgresql", "hl7rep"))
        return
    url = redis_state_url(request.getfixturevalue("redis_url"), request.node.name)
    yield url
    drop_redis_keys(url)


@pytest.fixture
def replicas(tmp_path: Path, state_url: str) -> Iterator[tuple[Hl7Env, Hl7Env]]:
    shared = {
        "state": {"url": state_url},
        # One signing secret for both: an id proposed by one replica is valid on the other.
        "security": {"signing_secret_from_state": True},
    }
    a = Hl7Env(tmp_path / "a", **shared)
    try:
        b = Hl7Env(tmp_path / "b", sim=a.sim, **shared)
    except BaseException:
        a.close()
        raise
    try:
        yield a, b
    finally:
        b.close()
        a.close()


def send(port: int, message: bytes) -> str:
    """One SIU to an adapter's MLLP listener; MSA-1 of its ACK."""

    async def main() -> str:
        client = MLLPClient("127.0.0.1", port, timeout=10, retries=0)
        try:
            return (await client.send(message)).ack.code
        finally:
            await client.close()

    return asyncio.run(main())


def test_issue10_siu_to_one_replica_is_searchable_on_the_other_and_a_resend_there_is_deduplicated(
    replicas: tuple[Hl7Env, Hl7Env],
) -> None:
    a, b = replicas
    message = siu("REPL-1", "S12", filler="LEG-77", placer="LEG-77", start="20300110090000+0100")
    assert send(a.mllp_port, message) == "AA"
    b.wait_for(lambda: [x["id"] for x in b.search("patient=Patient/PAT1")] == ["LEG-77"], "B to see A's SIU")
    store = b.siu_store()
    try:
        stored = store.count_messages()
        assert stored == 1
        # The sender did not get (or trust) A's ACK and resends through the load balancer, which picks B.
        assert send(b.mllp_port, message) == "AA"
        assert store.count_messages() == stored
        assert store.count_messages(WAITING) == 0
    finally:
        store.close()
    assert [x["id"] for x in b.search("patient=Patient/PAT1")] == ["LEG-77"]
    assert [x["id"] for x in a.search("patient=Patient/PAT1")] == ["LEG-77"]
    # A later change sent to B wins on both.
    cancel = siu("REPL-2", "S15", filler="LEG-77", placer="LEG-77", status="Cancelled", msg_time="20260105110000+0100")
    assert send(b.mllp_port, cancel) == "AA"
    a.wait_for(lambda: a.read("LEG-77").json()["status"] == "cancelled", "A to see B's cancellation")
    for replica in (a, b):  # nothing of the feed is kept on a host
        assert replica.settings.hl7v2.inbox is not None and not replica.settings.hl7v2.inbox.exists()


def test_issue10_bookings_through_either_replica_appear_in_both(replicas: tuple[Hl7Env, Hl7Env]) -> None:
    a, b = replicas
    offered = a.find(day=1)
    booked_a = a.book(offered[0]["id"], "client-a")
    assert booked_a.status_code == 200, booked_a.text
    id_a = [e["resource"]["id"] for e in booked_a.json()["entry"] if e["resource"]["resourceType"] == "Appointment"]
    # A's confirmed SRR is in the shared mirror at once: B reads it, and B no longer offers the time.
    read = b.read(id_a[0])
    assert read.status_code == 200 and read.json()["status"] == "booked"
    assert offered[0]["start"] not in {x["start"] for x in b.find(day=1)}

    again = b.book(offered[0]["id"], "client-b")  # A's proposal, booked through B: the slot is taken
    assert again.status_code == 409, again.text

    other = b.find(day=1)[0]
    booked_b = b.book(other["id"], "client-b")
    assert booked_b.status_code == 200, booked_b.text
    id_b = [e["resource"]["id"] for e in booked_b.json()["entry"] if e["resource"]["resourceType"] == "Appointment"]
    assert a.read(id_b[0]).json()["status"] == "booked"

    a.settle_siu()  # the simulator's SIU for both bookings reached A's listener and were applied
    assert {x["id"] for x in b.search("patient=Patient/PAT1")} == {id_a[0], id_b[0]}
    a.assert_agreement()
    b.assert_agreement()


# --------------------------------------------------------------------------------------------------
# Real processes: two ``sched-adapter serve`` hosts; one dies, the other applies what it left waiting.
# --------------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[2]


def _serve_config(home: Path, port: int, mllp_port: int, peer_port: int, state: str) -> Path:
    path = home / "replica.toml"
    path.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}
workers = 1
log_level = "warning"

[backend]
kind = "hl7v2"
mapping = '{DEMO_MAPPING}'

[hl7v2]
peer_host = "127.0.0.1"
peer_port = {peer_port}
listen_host = "127.0.0.1"
listen_port = {mllp_port}
timeout_seconds = 2
retries = 1

[state]
url = '{state}'
path = "state.sqlite"

[audit]
sinks = []

[security]
auth = "off"
signing_secret_from_state = true
""",
        encoding="utf-8",
    )
    return path


def test_issue10_two_serve_processes_and_one_dies_the_other_applies_what_it_left(
    tmp_path: Path, state_url: str
) -> None:
    state = state_url
    mllp = [free_port(), free_port()]
    sim = SimulatorThread(mllp[0])  # the scheduler's SIU feed goes to host A
    servers = ProcessServers()
    try:
        procs = []
        for i, name in enumerate("ab"):
            home = tmp_path / name
            home.mkdir()
            port = free_port()
            config = _serve_config(home, port, mllp[i], sim.sim.port, state)
            procs.append(
                servers.start(
                    [sys.executable, "-m", "adapter.cli", "serve", "--config", str(config)],
                    env={"PYTHONPATH": str(REPO)},
                    port=port,
                    cwd=str(home),
                    timeout=90,
                )
            )
        host_a, host_b = (httpx.Client(base_url=p.base_url + "/fhir", timeout=60) for p in procs)
        with host_a, host_b:

            def search(client: httpx.Client) -> list[str]:
                resp = client.get("/Appointment?patient=Patient/PAT1", headers={"Accept": "application/fhir+json"})
                assert resp.status_code == 200, resp.text
                return sorted(e["resource"]["id"] for e in resp.json().get("entry", []))

            def wait_for(check: Callable[[], bool], what: str) -> None:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    if check():
                        return
                    time.sleep(0.05)
                raise AssertionError(f"timed out waiting for {what}\n{process_log(procs[1])}")

            assert send(mllp[0], siu("P-1", "S12", filler="LEG-1", placer="LEG-1")) == "AA"
            wait_for(lambda: search(host_b) == ["LEG-1"], "B to find the SIU A acknowledged")

            os.killpg(procs[0].pid, signal.SIGKILL)  # host A vanishes
            procs[0].wait(10)
            # What A stored just before it died, acknowledged but never applied: it waits in the shared inbox.
            left = siu("P-2", "S12", filler="LEG-2", placer="LEG-2", start="20260110100000+0100")
            store = open_siu_store(state)
            try:
                assert store.store_message("LEGACY|FAC", "P-2", "SIU", left) is True
                wait_for(lambda: search(host_b) == ["LEG-1", "LEG-2"], "B's applier to apply what A left")
                # The scheduler never got A's ACK and resends through the load balancer, which now picks B.
                assert send(mllp[1], left) == "AA"
                assert store.count_messages() == 2 and store.count_messages(WAITING) == 0
            finally:
                store.close()
            assert search(host_b) == ["LEG-1", "LEG-2"]
    finally:
        servers.stop_all()
        sim.stop()
