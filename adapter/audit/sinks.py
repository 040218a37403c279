"""Where AuditEvents go. Each sink's ``send`` blocks (it runs in the audit thread) and raises on
any failure, so that the trail keeps the event in its spool and tries again later."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

import orjson


class Sink(Protocol):
    name: str

    def send(self, event: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class FileSink:
    """One AuditEvent per line (JSON Lines), appended; the default sink."""

    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def send(self, event: dict[str, Any]) -> None:
        # One write() of a whole line on an O_APPEND file: lines from several workers do not interleave.
        line = orjson.dumps(event) + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def close(self) -> None:
        return None


class FhirSink:
    """``POST [base]/AuditEvent`` to an Audit Record Repository (IHE ITI-20, FHIR feed)."""

    name = "fhir"

    def __init__(self, base_url: str, *, timeout_seconds: float = 5.0, ca_file: Path | None = None) -> None:
        self.url = base_url.rstrip("/") + "/AuditEvent"
        self.timeout = timeout_seconds
        self.context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None

    def send(self, event: dict[str, Any]) -> None:
        req = urllib.request.Request(
            self.url,
            data=orjson.dumps(event),
            method="POST",
            headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.context) as resp:
                resp.read()
                if not 200 <= resp.status < 300:
                    raise OSError(f"the audit repository answered {resp.status}")
        except urllib.error.HTTPError as exc:
            raise OSError(f"the audit repository answered {exc.code}") from None

    def close(self) -> None:
        return None


class SyslogTlsSink:
    """RFC 5424 messages over TLS with RFC 5425 octet-counting framing (``LEN SP MSG``), as ATNA's
    ITI-20 asks; the message body is the AuditEvent JSON. The connection is kept and re-opened after
    an error."""

    name = "syslog"
    FACILITY_AUTHPRIV = 10
    SEVERITY_NOTICE = 5

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ca_file: Path | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        timeout_seconds: float = 5.0,
        app_name: str = "sched-adapter",
        hostname: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout_seconds
        self.app_name = app_name
        self.hostname = (hostname or socket.gethostname() or "-")[:255]
        self.context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        if client_cert:
            self.context.load_cert_chain(str(client_cert), str(client_key) if client_key else None)
        self._sock: ssl.SSLSocket | None = None
        self._lock = threading.Lock()

    def format(self, event: dict[str, Any]) -> bytes:
        pri = self.FACILITY_AUTHPRIV * 8 + self.SEVERITY_NOTICE
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        header = f"<{pri}>1 {stamp} {self.hostname} {self.app_name} {os.getpid()} IHE+FHIR - "
        msg = header.encode("ascii", "replace") + orjson.dumps(event)
        return str(len(msg)).encode("ascii") + b" " + msg

    def send(self, event: dict[str, Any]) -> None:
        frame = self.format(event)
        with self._lock:
            try:
                if self._sock is None:
                    raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
                    self._sock = self.context.wrap_socket(raw, server_hostname=self.host)
                self._sock.sendall(frame)
            except OSError:
                self._close()
                raise

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:  # closing a socket that already failed: nothing is left to release or report
                pass
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close()
