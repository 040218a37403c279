"""Run HTTP servers for tests: uvicorn in a thread, or a server in a subprocess.

Thread servers (:class:`ThreadServer`) are cheap and share the test's process;
process servers (:func:`start_process_server`) are needed for restart tests
and for anything that must run in a clean interpreter.
"""

from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (bind to port 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_accepts(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# uvicorn in a background thread
# ---------------------------------------------------------------------------
def _looks_like_factory(app: Any) -> bool:
    """True for a callable taking no required arguments (an app factory).

    An ASGI app is called as ``app(scope, receive, send)``.
    """
    if isinstance(app, str) or not callable(app):
        return False
    try:
        sig = inspect.signature(app)
    except (TypeError, ValueError):
        return False
    required = [
        p
        for p in sig.parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return not required


class ThreadServer:
    """uvicorn serving *app* on 127.0.0.1 from a daemon thread.

    *app* is an ASGI app, an app factory (a callable with no required
    arguments; detected automatically unless *factory* is given) or an
    import string ``"module:attr"``. uvicorn does not install signal handlers
    outside the main thread, so this is safe inside pytest.
    """

    def __init__(self, app: Any, *, factory: bool | None = None, **config: Any) -> None:
        import uvicorn

        if factory is None:
            factory = _looks_like_factory(app)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.port: int = self.sock.getsockname()[1]
        self.base_url = f"http://{HOST}:{self.port}"
        options: dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "log_level": "warning",
            "lifespan": "on",
            "timeout_graceful_shutdown": 5,
        }
        options.update(config)
        self.config = uvicorn.Config(app, factory=factory, **options)
        self.server = uvicorn.Server(self.config)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # SystemExit on lifespan startup failure
            self.error = exc

    def start(self, timeout: float = 30.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.started and port_accepts(self.port):
                return self.base_url
            if not self.thread.is_alive():
                self.sock.close()
                raise RuntimeError(f"uvicorn thread exited during startup: {self.error!r}")
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"uvicorn did not start on {self.base_url} within {timeout}s")

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(5)
        try:
            self.sock.close()
        except OSError:
            pass
        if self.thread.is_alive():
            raise RuntimeError(f"uvicorn thread for {self.base_url} did not stop")


# ---------------------------------------------------------------------------
# Servers in a subprocess
# ---------------------------------------------------------------------------
def _merged_env(env: Mapping[str, str | None] | None) -> dict[str, str]:
    merged = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = str(value)
    return merged


def process_log(p: subprocess.Popen) -> str:
    """Everything the process wrote to stdout/stderr so far."""
    path = getattr(p, "log_path", None)
    if not path or not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def start_process_server(
    argv: Sequence[str],
    env: Mapping[str, str | None] | None,
    port: int,
    *,
    host: str = HOST,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 30.0,
) -> subprocess.Popen:
    """Start ``argv`` in its own process group and wait until *port* accepts.

    *env* overlays ``os.environ`` (a value of None removes the variable). Any
    ``{port}`` in *argv* is replaced with *port*; ``argv[0] == "python"`` means
    this interpreter. Output goes to a temporary log file (``p.log_path``,
    read with :func:`process_log`) so the pipe can never fill up. The returned
    Popen carries ``argv``, ``env``, ``port``, ``base_url`` and ``log_path``
    attributes. Raises RuntimeError (with the log) if the process exits or
    the port does not open within *timeout* seconds.
    """
    args = [str(a).replace("{port}", str(port)) for a in argv]
    if args and args[0] == "python":
        args[0] = sys.executable
    fd, log_path = tempfile.mkstemp(prefix=f"sched-server-{port}-", suffix=".log")
    with os.fdopen(fd, "wb") as log:
        p = subprocess.Popen(
            args,
            env=_merged_env(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    p.argv = list(argv)  # type: ignore[attr-defined]
    p.env = dict(env or {})  # type: ignore[attr-defined]
    p.port = port  # type: ignore[attr-defined]
    p.base_url = f"http://{host}:{port}"  # type: ignore[attr-defined]
    p.log_path = log_path  # type: ignore[attr-defined]

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(
                f"server {args!r} exited with {p.returncode} before port {port} opened:\n{process_log(p)}"
            )
        if port_accepts(port, host):
            return p
        time.sleep(0.05)
    stop_process_server(p)
    raise RuntimeError(f"server {args!r} did not open port {port} within {timeout}s:\n{process_log(p)}")


def stop_process_server(p: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM the server's process group, SIGKILL after *timeout*; return its exit code."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(5)
    else:
        # The leader is gone; make sure nothing else of its group lingers.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return p.returncode


class ProcessServers:
    """Tracks servers started in subprocesses and stops leftovers at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(
        self,
        argv: Sequence[str],
        env: Mapping[str, str | None] | None = None,
        port: int | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen:
        """Start a server (see :func:`start_process_server`); *port* defaults to a free one."""
        p = start_process_server(argv, env, port if port is not None else free_port(), **kwargs)
        p.start_kwargs = kwargs  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    __call__ = start

    def stop(self, p: subprocess.Popen, timeout: float = 10.0) -> int | None:
        return stop_process_server(p, timeout)

    def restart(self, p: subprocess.Popen, **overrides: Any) -> subprocess.Popen:
        """Stop *p* and start the same argv/env on the same port."""
        self.stop(p)
        kwargs = {**getattr(p, "start_kwargs", {}), **overrides}
        return self.start(p.argv, p.env, p.port, **kwargs)  # type: ignore[attr-defined]

    def stop_all(self) -> None:
        for p in self.procs:
            try:
                stop_process_server(p)
            finally:
                log_path = getattr(p, "log_path", None)
                if log_path:
                    try:
                        os.unlink(log_path)
                    except OSError:
                        pass
        self.procs.clear()
