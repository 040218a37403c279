"""Issue 10.3: Prometheus metrics, JSON request log lines, X-Request-Id, /healthz and /readyz.

Real app (``build_app``) over the seeded SQLite demo, served by uvicorn in a thread or by
``sched-adapter serve`` in a subprocess (several workers: multiprocess metrics). Readiness failures
use real outages: an ODBC URL to a port nothing listens on, and a throwaway ``redis-server``
started on a free port and then stopped.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from apputil import REPO, local_midnight, make_app, parameters, write_server_config
from prometheus_client.parser import text_string_to_metric_families
from serverutil import free_port, port_accepts, process_log
from stateutil import drop_redis_keys, redis_state_url

from adapter import observability
from adapter.scheduling.state import StateGate, StateStore

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base: str) -> Metrics:
    resp = httpx.get(f"{base}/metrics", timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    out: Metrics = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(m: Metrics, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in m.items() if n == name and want <= set(ls))


def find_body(days: int = 3) -> dict[str, Any]:
    return parameters(
        ("start", "valueDateTime", local_midnight(days).isoformat()),
        ("end", "valueDateTime", local_midnight(days + 3).isoformat()),
        ("patient-reference", "valueReference", {"reference": "Patient/7"}),
        ("_count", "valueInteger", 5),
    )


def ref(token: str) -> dict[str, Any]:
    return parameters(("appointment-reference", "valueReference", {"reference": f"Appointment/{token}"}))


@pytest.fixture
def request_lines() -> Iterator[io.StringIO]:
    """The JSON lines of the ``adapter.request`` logger, as the serve command writes them."""
    sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    handler.setFormatter(observability._JsonLines())
    log = logging.getLogger("adapter.request")
    log.addHandler(handler)
    try:
        yield sink
    finally:
        log.removeHandler(handler)


@pytest.fixture
def demo_base(tmp_path: Path, sqlite_demo_path: Path, live_server: Callable[..., str]) -> str:
    return live_server(make_app(tmp_path, f"sqlite:///{sqlite_demo_path}", find={"cache_seconds": 60}))


def test_issue10_3_metrics_change_after_transactions(demo_base: str) -> None:
    fhir = demo_base + "/fhir"
    before = scrape(demo_base)
    with httpx.Client(timeout=60) as c:
        found = c.post(f"{fhir}/Appointment/$find", json=find_body(), headers={"X-Client-Id": "m"})
        assert found.status_code == 200
        c.post(f"{fhir}/Appointment/$find", json=find_body(), headers={"X-Client-Id": "m"})  # from the cache
        slots = [e["resource"]["id"] for e in found.json()["entry"] if e["resource"]["resourceType"] == "Appointment"]
        assert c.post(f"{fhir}/Appointment/$hold", json=ref(slots[0]), headers={"X-Client-Id": "a"}).status_code == 200
        conflict = c.post(f"{fhir}/Appointment/$hold", json=ref(slots[0]), headers={"X-Client-Id": "b"})
        assert conflict.status_code == 409
        headers = {"X-Client-Id": "a", "Idempotency-Key": "metrics-1"}
        booked = c.post(f"{fhir}/Appointment/$book", json=ref(slots[0]), headers=headers)
        assert booked.status_code == 200
        replay = c.post(f"{fhir}/Appointment/$book", json=ref(slots[0]), headers=headers)
        assert replay.status_code == 200 and replay.content == booked.content
    after = scrape(demo_base)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("sched_request_duration_seconds_count", transaction="find", status="200") == 2
    assert delta("sched_request_duration_seconds_count", transaction="hold", status="200") == 1
    assert delta("sched_request_duration_seconds_count", transaction="hold", status="409") == 1
    assert delta("sched_request_duration_seconds_count", transaction="book", status="200") == 2
    assert delta("sched_request_duration_seconds_sum", transaction="book") > 0
    assert delta("sched_conflicts_total", transaction="hold") == 1
    assert delta("sched_holds_total", event="created") == 1
    assert delta("sched_holds_total", event="converted") == 1
    assert delta("sched_idempotent_replays_total") == 1
    assert delta("sched_legacy_call_duration_seconds_count", call="book", outcome="ok") == 1
    assert delta("sched_legacy_call_duration_seconds_count", call="availability") >= 1
    assert delta("sched_state_call_duration_seconds_count", call="place_hold") >= 1
    assert delta("sched_state_call_duration_seconds_count", call="idempotency_begin") == 2
    # The patient rules of issue 7.1: a patient's holds in $find, the patient's calendar in the booking gate.
    assert delta("sched_state_call_duration_seconds_count", call="holds_by_patient", outcome="ok") >= 1
    assert delta("sched_state_call_duration_seconds_count", call="check_patient_free", outcome="ok") >= 1
    lookups = delta("sched_availability_cache_lookups_total")
    loads = delta("sched_availability_cache_loads_total")
    assert lookups >= 2 and loads < lookups  # the second $find was served from the cache
    assert delta("sched_legacy_errors_total") == 0


@pytest.mark.parametrize(
    ("protocol", "wrapper"),
    [(StateStore, observability.MeasuredStateStore), (StateGate, observability.MeasuredGate)],
)
def test_issue10_3_every_state_call_is_measured_explicitly(protocol: type, wrapper: type) -> None:
    """Each call the domain may make on the state store is a method of the timing wrapper itself,
    not an untimed fall-through (a call the Protocol gains later must be added to the wrapper)."""
    names = {n for n in vars(protocol) if not n.startswith("_") and callable(getattr(protocol, n, None))}
    names |= {n for n in vars(protocol) if isinstance(vars(protocol)[n], property)}
    assert names, protocol
    missing = sorted(n for n in names if n not in vars(wrapper))
    assert missing == [], f"{wrapper.__name__} does not wrap {missing}"


def test_issue10_3_request_id_is_validated_and_echoed_and_logged_without_patient_data(
    demo_base: str, request_lines: io.StringIO
) -> None:

    fhir = demo_base + "/fhir"
    with httpx.Client(timeout=60) as c:
        given = c.post(f"{fhir}/Appointment/$find", json=find_body(), headers={"X-Request-Id": "portal-42.a_b:c-d"})
        assert given.headers["x-request-id"] == "portal-42.a_b:c-d"
        for bad in ("x" * 129, "has space", "semi;colon", ""):
            r = c.get(f"{fhir}/metadata", headers={"X-Request-Id": bad})
            assert r.headers["x-request-id"] != bad and len(r.headers["x-request-id"]) == 32
        fresh = c.get(f"{fhir}/Appointment/nope-404")
        assert len(fresh.headers["x-request-id"]) == 32 and fresh.status_code == 404
    # A line is written when the response has gone out, so it may trail the client's last read.
    deadline = time.monotonic() + 10
    while len(request_lines.getvalue().splitlines()) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    lines = [json.loads(line) for line in request_lines.getvalue().splitlines()]
    find_line = next(line for line in lines if line["request_id"] == "portal-42.a_b:c-d")
    assert find_line["transaction"] == "find" and find_line["status"] == 200 and find_line["method"] == "POST"
    assert find_line["duration_ms"] > 0 and find_line["event"] == "request"
    assert any(line["transaction"] == "read" and line["status"] == 404 for line in lines)
    assert len([line for line in lines if line["transaction"] == "metadata"]) == 4
    text = request_lines.getvalue()
    assert "Patient" not in text and "nope-404" not in text  # no references, no paths


def test_issue10_3_healthz_and_readyz(demo_base: str) -> None:
    assert httpx.get(f"{demo_base}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{demo_base}/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"legacy": "ok", "state": "ok", "mapping": "ok"}}
    assert httpx.get(f"{demo_base}/fhir/healthz").status_code == 404  # outside /fhir only


def test_issue10_3_readyz_fails_when_the_legacy_database_is_down(
    tmp_path: Path, live_server: Callable[..., str]
) -> None:
    dead = free_port()
    url = f"odbc:DRIVER={{PostgreSQL Unicode}};SERVER=127.0.0.1;PORT={dead};DATABASE=x;UID=postgres;PWD="
    base = live_server(make_app(tmp_path, url, backend={"timeout_seconds": 2}))
    assert httpx.get(f"{base}/healthz").status_code == 200
    resp = httpx.get(f"{base}/readyz", timeout=30)
    assert resp.status_code == 503
    checks = resp.json()["checks"]
    assert checks["legacy"] != "ok" and checks["state"] == "ok" and checks["mapping"] == "ok"
    before = scrape(base)
    assert httpx.post(f"{base}/fhir/Appointment/$find", json=find_body(), timeout=30).status_code == 503
    after = scrape(base)
    assert value(after, "sched_legacy_errors_total") > value(before, "sched_legacy_errors_total")
    finds_503 = ("sched_request_duration_seconds_count",)
    assert (
        value(after, *finds_503, transaction="find", status="503")
        - value(before, *finds_503, transaction="find", status="503")
        == 1
    )  # the registry is the process's: other tests' requests count too, so compare


def test_issue10_3_readyz_fails_when_redis_is_down(
    tmp_path: Path, sqlite_demo_path: Path, live_server: Callable[..., str]
) -> None:
    """A throwaway redis-server is the state store: ready while it runs, 503 once it is stopped,
    ready again when it is back (same port). Requests that need the store get 503 meanwhile."""
    redis_server = shutil.which("redis-server")
    assert redis_server, "redis-server is needed (apt-get install redis-server)"
    port = free_port()
    argv = [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        deadline = time.monotonic() + 20
        while not port_accepts(port):
            assert proc.poll() is None and time.monotonic() < deadline, "throwaway redis-server did not start"
            time.sleep(0.05)
        return proc

    proc = start()
    try:
        app = make_app(
            tmp_path,
            f"sqlite:///{sqlite_demo_path}",
            state={"url": f"redis://127.0.0.1:{port}/0", "timeout_seconds": 2},
            security={"signing_secret": None, "signing_secret_from_state": True},
        )
        base = live_server(app)
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
        found = httpx.post(f"{base}/fhir/Appointment/$find", json=find_body(), timeout=60)
        assert found.status_code == 200
        proc.terminate()
        proc.wait(10)
        resp = httpx.get(f"{base}/readyz", timeout=30)
        assert resp.status_code == 503 and resp.json()["checks"]["state"] != "ok"
        assert resp.json()["checks"]["legacy"] == "ok"
        token = next(
            e["resource"]["id"] for e in found.json()["entry"] if e["resource"]["resourceType"] == "Appointment"
        )
        held = httpx.post(f"{base}/fhir/Appointment/$hold", json=ref(token), timeout=60)
        assert held.status_code == 503 and "retry-after" in held.headers
        proc = start()
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)


def test_issue10_3_metrics_add_up_over_several_workers(tmp_path: Path, live_server_process: Any) -> None:
    """``serve`` with 2 workers: whichever worker answers /metrics reports the requests of both."""
    port = free_port()
    config = write_server_config(tmp_path, port, workers=2)
    p = live_server_process.start(
        [sys.executable, "-m", "adapter.cli", "serve", "--config", str(config)],
        env={"PYTHONPATH": str(REPO), "PROMETHEUS_MULTIPROC_DIR": None},
        port=port,
        cwd=str(tmp_path),
        timeout=90,
    )
    base = p.base_url
    with httpx.Client(timeout=60) as c:
        for _ in range(20):  # new connections: the kernel spreads them over both workers
            with httpx.Client(timeout=60) as one:
                assert one.get(f"{base}/fhir/metadata").status_code == 200
        counts = {value(scrape(base), "sched_request_duration_seconds_count", transaction="metadata") for _ in range(6)}
        assert counts == {20.0}, (counts, process_log(p))
        assert c.get(f"{base}/readyz").status_code == 200


def test_issue10_2_serve_refuses_a_shared_legacy_database_with_a_host_local_state_store(tmp_path: Path) -> None:
    port = free_port()
    url = "odbc:DRIVER={PostgreSQL Unicode};SERVER=db;PORT=5432;DATABASE=pm;UID=u;PWD=p"
    config = write_server_config(tmp_path, port, database_url=url, demo=False)
    run = [sys.executable, "-m", "adapter.cli", "serve", "--config", str(config)]
    refused = subprocess.run(run, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert refused.returncode == 2 and "state.single_host" in refused.stderr and "host-local" in refused.stderr
    assert not port_accepts(port)


def test_issue10_2_topology_rule() -> None:
    from adapter.scheduling.stores import topology_problem

    odbc = "odbc:DRIVER={x};SERVER=db"
    assert topology_problem(odbc, "sqlite:///var/s.sqlite", single_host=False)
    assert topology_problem(odbc, "sqlite:///var/s.sqlite", single_host=True) is None
    assert topology_problem(odbc, "redis://r:6379/0", single_host=False) is None
    assert topology_problem(odbc, "postgresql://u@pg/state", single_host=False) is None
    assert topology_problem("sqlite:///demo.sqlite", "sqlite:///var/s.sqlite", single_host=False) is None


def test_issue10_1_serve_on_a_redis_state_store(tmp_path: Path, redis_url: str, live_server_process: Any) -> None:
    """``state.url`` reaches the served app: a hold placed through the server lands in Redis."""
    import redis

    from adapter.scheduling.stores.redis_store import split_url

    state = redis_state_url(redis_url, "serve")
    port = free_port()
    config = write_server_config(tmp_path, port)
    p = live_server_process.start(
        [sys.executable, "-m", "adapter.cli", "serve", "--config", str(config)],
        env={"PYTHONPATH": str(REPO), "SCHED_STATE__URL": state},
        port=port,
        cwd=str(tmp_path),
        timeout=90,
    )
    try:
        with httpx.Client(timeout=60) as c:
            found = c.post(f"{p.base_url}/fhir/Appointment/$find", json=find_body())
            token = next(
                e["resource"]["id"] for e in found.json()["entry"] if e["resource"]["resourceType"] == "Appointment"
            )
            assert c.post(f"{p.base_url}/fhir/Appointment/$hold", json=ref(token)).status_code == 200
        plain, prefix = split_url(state)
        client = redis.Redis.from_url(plain)
        try:
            assert client.exists(f"{prefix}h:{token}") == 1
        finally:
            client.close()
        assert not (tmp_path / "var" / "adapter-state.sqlite").exists()
    finally:
        live_server_process.stop(p)
        drop_redis_keys(state)


def test_issue10_3_request_log_lines_are_written_off_the_event_loop_and_dropped_when_stderr_stalls() -> None:
    """The request log's writer thread takes the write; a caller never waits for stderr. With nobody reading
    stderr, lines beyond the backlog are dropped and counted (``sched_request_log_dropped_total``)."""
    import threading

    class StalledStream(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.unblocked = threading.Event()

        def write(self, text: str) -> int:
            self.unblocked.wait(30)
            return super().write(text)

    stream = StalledStream()
    handler, listener = observability.request_log_writer(stream, backlog=100)
    log = logging.getLogger("test.request_log.stalled")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    dropped_before = observability.REQUEST_LOG_DROPPED._value.get()
    try:
        logger_done = threading.Event()

        def log_many() -> None:
            for i in range(1_000):
                log.info("request", extra={"fields": {"event": "request", "n": i}})
            logger_done.set()

        threading.Thread(target=log_many, daemon=True).start()
        assert logger_done.wait(10), "logging waited for a stalled stderr"
        dropped = observability.REQUEST_LOG_DROPPED._value.get() - dropped_before
        assert 1_000 - 101 <= dropped <= 1_000 - 100  # the backlog, and at most one line in the writer's hands
    finally:
        stream.unblocked.set()
        listener.stop()
        log.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 1_000 - dropped
    numbers = [line["n"] for line in lines]
    # In order, and the waiting lines are kept: those dropped are the newest at the time (the writer may take its
    # first line only after the backlog has filled, and one later line then finds room).
    assert numbers == sorted(numbers) and numbers[:100] == list(range(100))
    assert lines[0]["event"] == "request" and lines[0]["logger"] == "test.request_log.stalled"


def test_issue10_3_server_log_level_warning_turns_the_request_log_off(
    tmp_path: Path, sqlite_demo_path: Path, live_server: Callable[..., str], request_lines: io.StringIO
) -> None:
    url = f"sqlite:///{sqlite_demo_path}"
    (tmp_path / "quiet").mkdir()
    (tmp_path / "loud").mkdir()
    try:
        quiet = live_server(make_app(tmp_path / "quiet", url, server={"log_level": "warning"}))
        assert httpx.get(f"{quiet}/fhir/metadata", timeout=30).status_code == 200
        assert observability.request_log.level == logging.WARNING
        time.sleep(0.2)
        assert request_lines.getvalue() == ""
    finally:
        observability.configure_request_log("info")  # the logger is per process: leave it as other tests expect
    loud = live_server(make_app(tmp_path / "loud", url, server={"log_level": "info"}))
    assert httpx.get(f"{loud}/fhir/metadata", timeout=30).status_code == 200
    deadline = time.monotonic() + 10
    while not request_lines.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert json.loads(request_lines.getvalue().splitlines()[0])["transaction"] == "metadata"
