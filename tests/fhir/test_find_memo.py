"""The ``$find`` response memo (issue 14, ``adapter/fhir/find.py``): same request, same second, same answer,
byte for byte; anything that changes the answer (a hold, a booking, a legacy change once the cache's TTL has
run out, another caller, another format) is never hidden by it. Real app, real SQLite demo database; the
request clock is fixed so that every request falls in one second unless a test says otherwise."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from starlette.testclient import TestClient

from adapter.demo.seed import ensure_demo_database
from adapter.fhir.context import FhirContext, ResponseMemo
from adapter.server import build_app
from tests.apputil import appointments, local_midnight, make_settings, parameters

NY = ZoneInfo("America/New_York")
FIND = "/fhir/Appointment/$find"
HEADERS = {"Content-Type": "application/fhir+json"}


class CountingMemo(ResponseMemo):
    """The real memo, counting the answers it served and the computations it was told of."""

    def __init__(self) -> None:
        super().__init__()
        self.hits = 0
        self.computed = 0

    def get(self, key: Hashable) -> tuple[bytes, str] | None:
        found = super().get(key)
        self.hits += found is not None
        return found

    def begin(self, key: Hashable) -> asyncio.Future[tuple[bytes, str]]:
        self.computed += 1
        return super().begin(key)


@pytest.fixture
def demo_db(tmp_path: Path) -> Path:
    path = tmp_path / "clinicware.sqlite"
    ensure_demo_database(path, today=dt.date.today())
    return path


def _client(tmp_path: Path, demo_db: Path, now: dt.datetime, **find: Any) -> tuple[TestClient, CountingMemo]:
    settings = make_settings(tmp_path, f"sqlite:///{demo_db}", find=find)
    app = build_app(settings, clock=lambda: now)
    ctx: FhirContext = app.state.fhir
    memo = CountingMemo()
    ctx.find_memo = memo
    return TestClient(app, raise_server_exceptions=False), memo


def _body(count: int = 20) -> dict[str, Any]:
    start = local_midnight(1)
    return parameters(
        ("start", "valueDateTime", start.isoformat()),
        ("end", "valueDateTime", (start + dt.timedelta(days=3)).isoformat()),
        ("practitioner", "valueReference", {"reference": "Practitioner/SPEARSB"}),
        ("_count", "valueInteger", count),
    )


def _slots(content: bytes | dict[str, Any]) -> set[tuple[str, str]]:
    import orjson

    bundle = orjson.loads(content) if isinstance(content, bytes) else content
    return {(a["start"], a["participant"][0]["actor"]["reference"]) for a in appointments(bundle)}


NOW = dt.datetime.now(dt.UTC).replace(microsecond=250_000)


def test_issue14_memo_answer_is_byte_identical_to_a_fresh_computation(tmp_path: Path, demo_db: Path) -> None:
    client, memo = _client(tmp_path, demo_db, NOW)
    with client:
        first = client.post(FIND, json=_body(), headers=HEADERS)
        again = client.post(FIND, json=_body(), headers=HEADERS)
        assert first.status_code == again.status_code == 200
        assert memo.hits == 1
        memo._entries.clear()  # the same request computed afresh, in the same second
        fresh = client.post(FIND, json=_body(), headers=HEADERS)
        assert memo.hits == 1
    assert again.content == first.content == fresh.content
    assert again.headers["content-type"] == first.headers["content-type"] == fresh.headers["content-type"]
    assert again.headers["content-length"] == first.headers["content-length"]


def test_issue14_memo_keys_on_format_caller_and_body(tmp_path: Path, demo_db: Path) -> None:
    client, memo = _client(tmp_path, demo_db, NOW)
    with client:
        json_answer = client.post(FIND, json=_body(), headers=HEADERS)
        xml_answer = client.post(FIND, json=_body(), headers={**HEADERS, "Accept": "application/fhir+xml"})
        assert xml_answer.headers["content-type"].startswith("application/fhir+xml")
        client.post(FIND, json=_body(), headers={**HEADERS, "X-Client-Id": "other"})
        other_count = client.post(FIND, json=_body(count=5), headers=HEADERS)
        assert memo.hits == 0
        assert len(appointments(other_count.json())) == 5
        assert client.post(FIND, json=_body(), headers=HEADERS).content == json_answer.content
        assert memo.hits == 1


def test_issue14_a_hold_placed_in_the_same_second_is_never_offered_from_the_memo(tmp_path: Path, demo_db: Path) -> None:
    client, memo = _client(tmp_path, demo_db, NOW)
    with client:
        before = client.post(FIND, json=_body(), headers=HEADERS)
        first = appointments(before.json())[0]
        held = client.post(
            "/fhir/Appointment/$hold",
            json=parameters(("appointment-reference", "valueReference", {"reference": f"Appointment/{first['id']}"})),
            headers={**HEADERS, "X-Client-Id": "a"},
        )
        assert held.status_code == 200
        after = client.post(FIND, json=_body(), headers=HEADERS)
        assert memo.hits == 0  # the holds counter moved: a new key
        assert (first["start"], first["participant"][0]["actor"]["reference"]) not in _slots(after.content)
        assert client.post(FIND, json=_body(), headers=HEADERS).content == after.content
        assert memo.hits == 1


def test_issue14_a_legacy_change_shows_once_the_cache_ttl_has_run_out_even_in_the_same_second(
    tmp_path: Path, demo_db: Path
) -> None:
    """The memo holds an answer for at most one second of monotonic time, whatever the request clock says, and a
    reload of the availability cache moves its generation: the staleness bound stays ``find.cache_seconds``."""
    client, memo = _client(tmp_path, demo_db, NOW, cache_seconds=1)
    with client:
        before = client.post(FIND, json=_body(), headers=HEADERS)
        first = appointments(before.json())[0]
        start = dt.datetime.fromisoformat(first["start"]).astimezone(NY)
        conn = sqlite3.connect(demo_db)
        conn.execute(
            "INSERT INTO APPT (APPT_ID, PAT_ID, PROV_ID, FAC_ID, APPT_DT, APPT_TM, DUR_MIN, TYPE_CD, STATUS_CD) "
            "VALUES (990001, 7, 'SPEARSB ', 1, ?, ?, ?, 'FOLLOW', 'S')",
            (int(start.strftime("%Y%m%d")), start.hour * 100 + start.minute, first["minutesDuration"]),
        )
        conn.commit()
        conn.close()
        time.sleep(1.1)  # past the cache's TTL (and the memo's second); the request clock has not moved
        after = client.post(FIND, json=_body(), headers=HEADERS)
        assert memo.hits == 0
    assert (first["start"], "Practitioner/SPEARSB") not in _slots(after.content)


def test_issue14_no_memo_when_the_cache_is_off_or_shorter_than_a_second(tmp_path: Path, demo_db: Path) -> None:
    for seconds in (0, 0.5):
        client, memo = _client(tmp_path / str(seconds), demo_db, NOW, cache_seconds=seconds)
        with client:
            answers = {client.post(FIND, json=_body(), headers=HEADERS).content for _ in range(3)}
        assert memo.hits == 0 and len(memo) == 0
        assert len(answers) == 1  # the same second and nothing changed: the same answer anyway


def test_issue14_find_memo_false_computes_every_find(tmp_path: Path, demo_db: Path) -> None:
    """``find.memo = false``: the operator's switch (and the bench's "computed" row): no answer comes from the memo,
    and the answers are the same as with it."""
    client, memo = _client(tmp_path, demo_db, NOW, memo=False)
    with client:
        answers = {client.post(FIND, json=_body(), headers=HEADERS).content for _ in range(3)}
    assert memo.hits == 0 and memo.computed == 0 and len(memo) == 0
    assert len(answers) == 1
    with_memo, counting = _client(tmp_path / "memo", demo_db, NOW)
    with with_memo:
        assert {with_memo.post(FIND, json=_body(), headers=HEADERS).content for _ in range(3)} == answers
    assert counting.hits == 2


def test_issue14_a_burst_of_the_same_find_is_computed_once(
    tmp_path: Path, demo_db: Path, live_server: Callable[..., str]
) -> None:
    """Every connection of a portal sends the same $find at the turn of a second: one computation, the others
    wait for it and get the same bytes."""
    settings = make_settings(tmp_path, f"sqlite:///{demo_db}")
    app = build_app(settings, clock=lambda: NOW)
    memo = CountingMemo()
    app.state.fhir.find_memo = memo
    base = live_server(app)

    async def burst() -> list[bytes]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=16)) as c:
            answers = await asyncio.gather(*(c.post(base + FIND, json=_body(), headers=HEADERS) for _ in range(16)))
        assert {r.status_code for r in answers} == {200}
        return [r.content for r in answers]

    contents = asyncio.run(burst())
    assert len(set(contents)) == 1
    assert memo.computed == 1


def test_issue14_no_memo_with_a_shared_state_store_every_find_reads_the_holds(
    tmp_path: Path, demo_db: Path, redis_url: str
) -> None:
    """Redis (and PostgreSQL) counters are only eventually consistent across hosts: another host's hold must not
    wait for a message, so nothing is memoised and each $find reads the holds from the store."""
    from stateutil import drop_redis_keys, redis_state_url

    url = redis_state_url(redis_url, "memo-off")
    settings = make_settings(tmp_path, f"sqlite:///{demo_db}", state={"url": url, "single_host": True})
    app = build_app(settings, clock=lambda: NOW)
    memo = CountingMemo()
    app.state.fhir.find_memo = memo
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            assert app.state.fhir.service.find_fingerprint() is None
            answers = [client.post(FIND, json=_body(), headers=HEADERS) for _ in range(3)]
            assert {r.status_code for r in answers} == {200}
            assert memo.hits == 0 and memo.computed == 0 and len(memo) == 0
    finally:
        drop_redis_keys(url)


def test_issue14_memo_is_bounded_by_entries_bytes_and_one_second() -> None:
    async def scenario() -> None:
        memo = ResponseMemo(max_entries=3, max_age=0.2, max_bytes=250)
        for n in range(4):
            memo.put(n, bytes(50), "application/fhir+json")
        assert len(memo) == 3 and memo.get(0) is None and memo.get(3) is not None  # the oldest went
        memo.put("big", bytes(200), "application/fhir+json")
        assert memo.get("big") is not None and memo.get(1) is None and len(memo) <= 2  # bytes bounded too
        await asyncio.sleep(0.25)
        assert memo.get("big") is None and memo.get(3) is None  # older than max_age: never served

    asyncio.run(scenario())
