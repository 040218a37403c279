"""The HL7v2 backend end to end: the legacy scheduler simulator on its own event loop (a thread), the adapter
served by uvicorn on another, both talking MLLP over real sockets; the test speaks FHIR over real HTTP."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import httpx
from hl7v2util import DEMO_MAPPING
from serverutil import ThreadServer, free_port

from adapter.hl7v2.store import WAITING, SiuStore, open_siu_store
from adapter.scheduling.stores import state_url
from adapter.server import build_app
from adapter.testing.hl7_demo import demo_settings
from adapter.testing.hl7_simulator import LegacySchedulerSimulator, SimAppointment, demo_templates

T = TypeVar("T")
ZONE = ZoneInfo("Europe/Berlin")


class SimulatorThread:
    """The simulator on an event loop of its own, so the test thread can drive it synchronously."""

    def __init__(self, siu_port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hl7-simulator", daemon=True)
        self.thread.start()
        self.sim = LegacySchedulerSimulator(demo_templates(), siu_target=("127.0.0.1", siu_port))
        self.call(self.sim.start())

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], T]) -> T:
        async def wrapped() -> T:
            return fn()

        return self.call(wrapped())

    def appointments(self) -> list[SimAppointment]:
        return self.run(lambda: [a for a in self.sim.appointments.values()])

    def booked(self) -> list[SimAppointment]:
        return [a for a in self.appointments() if a.status == "Booked"]

    def stop(self) -> None:
        self.call(self.sim.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()  # its self-pipe sockets too (warnings are errors in this suite)


class Hl7Env:
    """One adapter (a "host") in front of the simulator. ``sim``: another replica's simulator to share (its SIU
    feed keeps going to that replica's listener); by default a simulator of its own, feeding this one."""

    def __init__(self, tmp: Path, sim: SimulatorThread | None = None, **sections: dict[str, Any]) -> None:
        self.mllp_port = free_port()
        self._own_sim = sim is None
        self.sim = sim if sim is not None else SimulatorThread(self.mllp_port)
        hl7 = {"timeout_seconds": 1.0, "retries": 1, **sections.pop("hl7v2", {})}
        self.settings = demo_settings(
            port=8080,
            mllp_port=self.mllp_port,
            peer_port=self.sim.sim.port,
            data_dir=tmp,
            mapping=DEMO_MAPPING,
            hl7v2=hl7,
            **sections,
        )
        self.app = build_app(self.settings)
        self.server = ThreadServer(self.app)
        self.base = self.server.start() + "/fhir"
        self.http = httpx.Client(base_url=self.base, timeout=60)

    def close(self) -> None:
        self.http.close()
        self.server.stop()
        if self._own_sim:
            self.sim.stop()

    # -- FHIR ------------------------------------------------------------------------------------
    def post(
        self, path: str, body: dict[str, Any], client: str | None = None, key: str | None = None
    ) -> httpx.Response:
        headers = {"Content-Type": "application/fhir+json"}
        if client:
            headers["X-Client-Id"] = client
        if key:
            headers["Idempotency-Key"] = key
        return self.http.post(path, json=body, headers=headers)

    def find(
        self, day: int = 1, practitioner: str = "DOC1", patient: str = "PAT1", count: int = 200
    ) -> list[dict[str, Any]]:
        start = next_weekday(day)
        entries = [
            {"name": "start", "valueDateTime": start.isoformat()},
            {"name": "end", "valueDateTime": (start + dt.timedelta(days=1)).isoformat()},
            {"name": "_count", "valueInteger": count},
            {"name": "practitioner", "valueReference": {"reference": f"Practitioner/{practitioner}"}},
            {"name": "patient-reference", "valueReference": {"reference": f"Patient/{patient}"}},
        ]
        resp = self.post("/Appointment/$find", parameters(*entries), client="finder")
        assert resp.status_code == 200, resp.text
        return appointments_of(resp.json())

    def hold(self, token: str, client: str | None) -> httpx.Response:
        return self.post("/Appointment/$hold", parameters(ref(token)), client=client)

    def book(
        self,
        token: str | None = None,
        client: str | None = None,
        *,
        key: str | None = None,
        resource: dict[str, Any] | None = None,
    ) -> httpx.Response:
        entries = [ref(token)] if token else []
        if resource is not None:
            entries.append({"name": "appointment-resource", "resource": resource})
        return self.post("/Appointment/$book", parameters(*entries), client=client, key=key)

    def read(self, appt_id: str) -> httpx.Response:
        return self.http.get(f"/Appointment/{appt_id}", headers={"Accept": "application/fhir+json"})

    def search(self, query: str) -> list[dict[str, Any]]:
        resp = self.http.get(f"/Appointment?{query}", headers={"Accept": "application/fhir+json"})
        assert resp.status_code == 200, resp.text
        return appointments_of(resp.json())

    # -- agreement -----------------------------------------------------------------------------
    def wait_for(self, check: Callable[[], bool], what: str, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def settle_siu(self) -> None:
        """Every SIU the simulator queued is acknowledged and applied to the adapter's mirror."""
        self.sim.call(self.sim.sim.siu_idle())
        self.wait_for(lambda: self.inbox_waiting() == 0, "the SIU inbox to be applied")

    def siu_store(self) -> SiuStore:
        """Another connection to this adapter's SIU store (the caller closes it)."""
        return open_siu_store(
            state_url(self.settings.state.url, self.settings.state.path), sqlite_path=self.settings.hl7v2.inbox
        )

    def inbox_waiting(self) -> int:
        store = self.siu_store()
        try:
            return store.count_messages(WAITING)
        finally:
            store.close()

    def journal_intents(self) -> int:
        import sqlite3

        url = self.settings.state.url or ""
        if url.startswith("postgresql://"):
            import psycopg

            with psycopg.connect(url) as pg:
                row = pg.execute("SELECT count(*) FROM sched_journal WHERE state = 'intent'").fetchone()
                return int(row[0]) if row else 0
        if url.startswith("redis://"):
            import redis

            from adapter.redis_connect import split_url

            plain, prefix = split_url(url)
            client = redis.Redis.from_url(plain)
            try:  # the journal's tokens in `ji` whose hash is still an intent (see redis_store's key list)
                tokens = client.zrange(f"{prefix}ji", 0, -1)
                return sum(client.hget(f"{prefix}j:{t.decode()}", "state") == b"intent" for t in tokens)
            finally:
                client.close()
        conn = sqlite3.connect(self.settings.state.path)
        try:
            return int(conn.execute("SELECT count(*) FROM journal WHERE state = 'intent'").fetchone()[0])
        finally:
            conn.close()

    def assert_agreement(self) -> None:
        """Adapter (mirror + journal) and simulator agree on every appointment."""
        self.settle_siu()
        assert self.journal_intents() == 0, "a booking is still of unknown outcome"
        sim = {a.filler_id: a for a in self.sim.appointments()}
        for fid, a in sim.items():
            read = self.read(fid)
            assert read.status_code == 200, (fid, read.text)
            body = read.json()
            assert body["status"] == ("booked" if a.status == "Booked" else "cancelled"), (
                fid,
                body["status"],
                a.status,
            )
            assert dt.datetime.fromisoformat(body["start"]) == a.start, (fid, body["start"], a.start)
            assert dt.datetime.fromisoformat(body["end"]) == a.end
        ours = self.search("_count=500&status=booked,cancelled,entered-in-error,noshow,fulfilled,arrived,pending")
        assert {x["id"] for x in ours} == set(sim), (
            "the mirror holds appointments the simulator does not (or misses some)"
        )


def next_weekday(days_ahead: int) -> dt.datetime:
    """Local midnight of the ``days_ahead``-th weekday from tomorrow on (the simulator works Monday to Friday)."""
    day = dt.datetime.now(ZONE).date()
    n = 0
    while True:
        day += dt.timedelta(days=1)
        if day.weekday() < 5:
            n += 1
            if n == days_ahead:
                return dt.datetime.combine(day, dt.time(), ZONE)


def parameters(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(entries)}


def ref(token: str) -> dict[str, Any]:
    return {"name": "appointment-reference", "valueReference": {"reference": f"Appointment/{token}"}}


def appointments_of(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e["resource"]["resourceType"] == "Appointment"]


def issues_of(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    if bundle["resourceType"] == "OperationOutcome":
        return list(bundle["issue"])
    return [
        i
        for e in bundle.get("entry", [])
        if e["resource"]["resourceType"] == "OperationOutcome"
        for i in e["resource"]["issue"]
    ]


def actor_id(appt: dict[str, Any], kind: str) -> str | None:
    for p in appt.get("participant", []):
        reference = p.get("actor", {}).get("reference", "")
        if reference.startswith(kind + "/"):
            return str(reference.split("/", 1)[1])
    return None
