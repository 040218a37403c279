"""DB-API plumbing: connections, named binds, transactions and locks for SQLite and ODBC.

Why it looks like this:

* One URL picks the driver: ``sqlite:///path/file.sqlite`` uses stdlib ``sqlite3`` (the embedded
  default); ``odbc:DRIVER={...};SERVER=...`` uses pyodbc (production: PostgreSQL, MariaDB/MySQL,
  SQL Server ...). Everything above this module is identical for both.
* Mapping SQL uses named binds (``:practitioner_keys``); both drivers are driven with ``?`` markers.
  ``compile_sql`` rewrites names to markers once and expands list values to ``?, ?, ?`` at run time.
  Values are never spliced into SQL text.
* DB-API connections must not be shared between threads (pyodbc), so each worker thread owns its
  connection (``threading.local``). Every call runs in a DB thread, never on the event loop (a
  locked SQLite file once froze every request of a worker for 28 s). Reads and write units have
  separate pools, so reads never queue behind writers that wait for a lock. ODBC calls and most of
  sqlite3 release the GIL, so the pools give real parallelism.
* Time limits (``adapter.deadline``): each unit of work has ONE deadline, ``timeout_s`` after it
  was submitted. The wait for a thread, the process writer lock, the host lock file, SQLite's
  busy handler (``PRAGMA busy_timeout``), PostgreSQL's ``lock_timeout``/``statement_timeout`` and
  MariaDB's ``innodb_lock_wait_timeout`` are each set to what is left of it, and so is the
  state store's wait when the conflict gate runs inside the unit.
* Locking (see ``Database.write``): SQLite has one writer at a time, so a write unit starts with
  ``BEGIN IMMEDIATE`` (the whole file is the lock), after queueing on a process lock and a per-host
  ``flock`` so that waiting writers are woken in turn instead of polling. Server databases run the
  mapping's lock statement with ``FOR UPDATE`` appended, inside the same transaction as the
  re-check and the write.
* Errors: connection failures (refused, lost mid-query, server shutting down), lock timeouts and
  deadlocks, and a database that refuses writes (read-only, disk full) become ``BackendUnavailable``
  (HTTP 503, retry); after one connection is seen dead, every pooled connection is replaced before
  its next use, and a connection that saw a refusal is closed at once (a PostgreSQL session keeps
  the read-only default it started with; a SQLite file opened while read-only stays read-only).
  A COMMIT that loses its connection raises ``CommitOutcomeUnknown``: the write may have happened.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import re
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

from adapter.backends.protocol import BackendError, BackendUnavailable
from adapter.deadline import Deadline, bounded, current as current_deadline
from adapter.sqlite_wal import enable_wal
from adapter.text import SQL_NAMED_BIND, fold

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: SQLite's own busy handler is the only queue
    fcntl = None  # type: ignore[assignment]  # a module or None; every use checks for None first

T = TypeVar("T")

# Kept cursors per connection (``Database.select``): the availability queries, each IN-list length once.
_KEPT_STATEMENTS = 64

log = logging.getLogger("adapter.backends.sql")


class LockNotTaken(Exception):
    """The mapping's ``writes.lock`` statement locked no row (misdeclared lock or unknown resource)."""


class LegacyBusy(BackendUnavailable):
    """A lock wait of a write unit ran out of time (503); the connection itself is fine."""


class CommitOutcomeUnknown(BackendUnavailable):
    """The connection broke during COMMIT: the write may or may not be in the legacy database."""


@dataclass(frozen=True, slots=True)
class CompiledSql:
    text: str  # with {name} slots where list binds expand
    order: tuple[str, ...]


@lru_cache(maxsize=1024)
def compile_sql(sql: str) -> CompiledSql:
    order: list[str] = []

    def repl(m: re.Match[str]) -> str:
        if m.group(1) is None:
            return m.group(0)  # a quoted literal: untouched
        order.append(m.group(1))
        return "\x00"

    text = SQL_NAMED_BIND.sub(repl, sql)
    return CompiledSql(text, tuple(order))


def bind(sql: str, values: dict[str, Any]) -> tuple[str, list[Any]]:
    """Named binds -> (sql with ? markers, positional parameters)."""
    compiled = compile_sql(sql)
    pieces = compiled.text.split("\x00")
    out = [pieces[0]]
    params: list[Any] = []
    for name, tail in zip(compiled.order, pieces[1:], strict=False):
        if name not in values:
            raise KeyError(f"no value for bind parameter :{name}")
        value = values[name]
        if isinstance(value, (list, tuple, set, frozenset)):
            items = list(value)
            if items:
                out.append(", ".join("?" * len(items)))
                params.extend(items)
            else:
                out.append("NULL")  # IN (NULL) matches nothing, as an empty OR should
        else:
            out.append("?")
            params.append(value)
        out.append(tail)
    return "".join(out), params


class Database:
    """Connections and units of work for one legacy database."""

    def __init__(self, url: str, *, pool_size: int = 4, timeout_s: float = 10.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        if url.startswith("sqlite:///"):
            self.dialect = "sqlite"
            self._sqlite_path = url[len("sqlite:///") :]
        elif url.startswith("odbc:"):
            self._odbc = url[len("odbc:") :]
            upper = self._odbc.upper()
            self.dialect = (
                "postgresql"
                if "POSTGRES" in upper
                else "mariadb"
                if ("MARIADB" in upper or "MYSQL" in upper)
                else "sqlite"
                if "SQLITE" in upper
                else "odbc"
            )
        else:
            raise ValueError(f"database url must start with sqlite:/// or odbc:, got {url!r}")
        self.kind = "sqlite3" if url.startswith("sqlite:///") else "pyodbc"
        self._local = threading.local()
        # Reads and write units have their own threads (and so their own connections): a write unit
        # may wait for a lock up to the timeout, and reads must not queue behind waiting writers.
        self._readers = ThreadPoolExecutor(
            max_workers=pool_size, thread_name_prefix="legacy-read", initializer=self._mark_reader_thread
        )
        self._writers = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="legacy-write")
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self._generation = 0  # bumped when a connection is found dead (see _call)
        self._writer = threading.Lock()  # SQLite: one write unit per process at a time (see write)
        self._host: _HostLock | None = None  # SQLite: the per-host writer lock file, opened on first write
        self._queues: dict[str, threading.Lock] = {}  # server databases: one per booking lock key (see write)

    # -- connections -------------------------------------------------------------------------
    def _mark_reader_thread(self) -> None:
        self._local.reader = True

    def _connect(self) -> Any:
        try:
            if self.kind == "sqlite3":
                conn = sqlite3.connect(
                    self._sqlite_path, timeout=self.timeout_s, isolation_level=None, check_same_thread=True
                )
                # FOLD() in a mapping's name filter: case- and accent-insensitive, as FHIR string search is.
                conn.create_function("SCHED_FOLD", 1, sql_fold_function, deterministic=True)
                enable_wal(conn)
                conn.execute("PRAGMA synchronous=NORMAL")
            else:
                import pyodbc  # imported lazily: the embedded default needs no ODBC manager

                # Reader threads' connections run in autocommit: at READ COMMITTED (both servers here) every
                # statement takes its own snapshot anyway, so a transaction around a read unit bought nothing
                # but round trips and server work: psqlODBC wrapped each statement in a SAVEPOINT/RELEASE
                # (its statement-level rollback) and ended the unit with a COMMIT; MariaDB a COMMIT. An
                # uncached `$find` ran 8 statements on PostgreSQL for its 3 queries (issue 14).
                reader = getattr(self._local, "reader", False)
                conn = pyodbc.connect(self._odbc, autocommit=reader, timeout=int(self.timeout_s))
                try:
                    conn.timeout = int(self.timeout_s)  # per-statement timeout, where the driver has one
                except pyodbc.Error:
                    pass  # psqlODBC refuses SQL_ATTR_QUERY_TIMEOUT; lock waits are bounded server-side
                if self.dialect == "postgresql":
                    cur = conn.cursor()
                    cur.execute(f"SET lock_timeout = {_millis(self.timeout_s)}")
                    cur.execute(f"SET statement_timeout = {_millis(self.timeout_s)}")
                    conn.commit()
                if self.dialect == "mariadb":
                    # Bind text as UTF-8: with pyodbc's default (UTF-16) MariaDB Connector/ODBC garbles
                    # every text parameter longer than 127 characters (a note, an OpenEMR pc_recurrspec).
                    conn.setencoding(encoding="utf-8")
                    conn.setdecoding(pyodbc.SQL_CHAR, encoding="utf-8")
                    # Text columns come as SQL_WCHAR from the Unicode driver; fetched as UTF-8 (SQL_C_CHAR) instead
                    # of UTF-16 they decode in one step: the availability read's fetch ~1.17 -> ~0.75 ms (issue 14).
                    conn.setdecoding(pyodbc.SQL_WCHAR, encoding="utf-8")
                    # Read committed: a fresh snapshot per statement, as a booking re-check needs.
                    cur = conn.cursor()
                    cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    cur.execute(f"SET SESSION innodb_lock_wait_timeout = {int(self.timeout_s)}")
                    conn.commit()
        except Exception as exc:  # driver-specific connection failures
            if _is_connection_error(exc):
                raise BackendUnavailable(f"cannot connect to the legacy database: {_first_line(exc)}") from exc
            raise
        with self._lock:
            self._all.append(conn)
        return conn

    def connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            self._local.statements = {}
        return conn

    def select(self, conn: Any, sql: str, values: dict[str, Any]) -> Any:
        """Run a SELECT with named binds; returns the cursor to fetch its rows from.

        ODBC: the cursor is kept with this thread's connection, one per statement text, and reused by the
        next unit that runs the same text. psqlODBC prepares a statement once per cursor (a named server-side
        statement, for which PostgreSQL settles on a generic plan), and MariaDB Connector/ODBC likewise: a
        fresh cursor per call parsed and planned the availability queries of every ``$find`` again (~0.15 ms
        per query on PostgreSQL, on a server that shares the CPU with the adapter). sqlite3 keeps its own
        statement cache per connection.
        """
        text, params = bind(sql, values)
        cur, text = self._statement(conn, text)
        cur.execute(text, params)
        return cur

    def _statement(self, conn: Any, text: str) -> tuple[Any, str]:
        """The cursor to run ``text`` on, and ``text`` as that cursor was first given it: pyodbc skips the
        prepare step only when it gets the very same string object again, not merely an equal one."""
        new_cursor = conn.cursor
        if self.kind != "pyodbc" or getattr(self._local, "conn", None) is not conn:
            return new_cursor(), text
        statements: dict[str, tuple[Any, str]] = self._local.statements
        kept = statements.get(text)
        if kept is None:
            if len(statements) >= _KEPT_STATEMENTS:  # e.g. IN lists of every length: start over
                self._forget_statements()
                statements = self._local.statements
            kept = statements[text] = (new_cursor(), text)
        return kept

    def _forget_statements(self) -> None:
        for cur, _text in getattr(self._local, "statements", {}).values():
            try:
                cur.close()
            except Exception as exc:  # the connection may be gone already: nothing left to release
                log.debug("legacy database: closing a kept cursor failed (%s)", exc)
        self._local.statements = {}

    def _discard(self) -> None:
        self._forget_statements()
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already broken; nothing to release
                pass

    # -- running work ------------------------------------------------------------------------
    async def run(self, fn: Callable[[Any], T], *, write: bool = False) -> T:
        """Run ``fn(connection)`` in a DB thread (never on the event loop), within ``timeout_s``.

        The unit gets one deadline: the wait for a free thread, every lock wait inside ``fn``
        (``write``) and the state-store calls of the conflict gate all draw on it. A unit still
        queued when it expires is dropped (503); one already running ends by itself, because each
        of its waits is bounded by what is left.
        """
        deadline = Deadline.after(self.timeout_s)
        future = (self._writers if write else self._readers).submit(self._call, fn, deadline, not write)
        waiting = asyncio.wrap_future(future)
        try:
            return await asyncio.wait_for(asyncio.shield(waiting), deadline.remaining())
        except TimeoutError:
            if future.cancel():
                raise BackendUnavailable(
                    f"the legacy database is busy: no database thread became free within {self.timeout_s:g} s"
                ) from None
            return await waiting

    def _call(self, fn: Callable[[Any], T], deadline: Deadline, retry: bool) -> T:
        if deadline.expired():
            raise BackendUnavailable(
                f"the legacy database is busy: no database thread became free within {self.timeout_s:g} s"
            )
        with bounded(deadline):
            reused = getattr(self._local, "conn", None) is not None
            try:
                return self._call_now(fn)
            except BackendUnavailable as exc:
                # A read on a pooled connection that turned out dead (the server restarted, or an
                # operator ended the sessions) is tried once more on a new one: reads have no side
                # effects, and the client should not pay for a connection it never saw. Writes are
                # never repeated here (their conflict gate already ran).
                cause = exc.__cause__
                if not (retry and reused and cause is not None and _is_lost(cause)) or deadline.expired():
                    raise
            return self._call_now(fn)

    def _call_now(self, fn: Callable[[Any], T]) -> T:
        # After one thread saw the connection drop, every pooled connection is suspect (a restarted
        # or unplugged server kills them all): each thread replaces its own before the next use,
        # so an outage costs one failed request, not one per pooled connection.
        if getattr(self._local, "generation", self._generation) != self._generation:
            self._discard()
        generation = self._generation
        try:
            conn = self.connection()
            self._local.generation = generation
        except Exception as exc:  # any failure to open a connection means "not available now" (503)
            # A server that refuses new connections has most likely dropped the pooled ones too (the
            # first thing to fail may be a pool that had not connected yet): replace them all.
            if not _is_refusal(exc.__cause__ if isinstance(exc, BackendUnavailable) else exc):
                self._generation = generation + 1
            if isinstance(exc, BackendUnavailable):
                raise
            raise BackendUnavailable(f"cannot connect to the legacy database: {_first_line(exc)}") from exc
        try:
            result = fn(conn)
            if self.kind == "pyodbc" and not conn.autocommit:
                conn.commit()  # end the unit of work: MariaDB would serve stale snapshots otherwise
            return result
        except BaseException as exc:
            try:
                if self.kind == "pyodbc":
                    conn.rollback()
                elif conn.in_transaction:
                    conn.execute("ROLLBACK")
            except Exception:
                self._discard()
            if not isinstance(exc, BackendError) or isinstance(exc, BackendUnavailable):
                self._forget_statements()  # a kept cursor that may have seen the error is not trusted again
            if isinstance(exc, BackendUnavailable):
                if not isinstance(exc, LegacyBusy):  # waiting for our own lock says nothing about the link
                    self._discard()
                    self._generation += 1
                raise
            if _is_refusal(exc):
                # Read-only or full: this connection may keep its read-only session (a PostgreSQL
                # session keeps the default_transaction_read_only it started with; SQLite keeps a
                # file it could only open read-only), so it goes; the others are fine.
                self._discard()
                raise BackendUnavailable(f"the legacy database refuses writes now: {_first_line(exc)}") from exc
            if _is_connection_error(exc):
                if not _is_lock_error(exc):
                    self._discard()  # a lock timeout leaves a healthy connection; anything else may not
                    self._generation += 1
                raise BackendUnavailable(f"legacy database unavailable: {_first_line(exc)}") from exc
            raise

    def lockable(self, sql: str) -> str:
        """``sql`` as a statement that row-locks what it selects until the unit of work ends.

        SQLite needs nothing (``BEGIN IMMEDIATE`` already excludes every other writer). On server
        databases a ``SELECT`` gets ``FOR UPDATE`` appended unless the mapping wrote a locking
        clause itself (``FOR UPDATE``, SQL Server's ``WITH (UPDLOCK...)``); any other statement
        (e.g. a no-op ``UPDATE ... SET K = K``) locks by itself and runs unchanged.
        """
        if self.dialect == "sqlite":
            return sql
        upper = " ".join(sql.upper().split())
        if not upper.startswith("SELECT") or "FOR UPDATE" in upper or "UPDLOCK" in upper or "HOLDLOCK" in upper:
            return sql
        return sql.rstrip().rstrip(";") + " FOR UPDATE"

    @contextmanager
    def write(
        self,
        conn: Any,
        lock_sql: str | None,
        lock_binds: Sequence[dict[str, Any]],
        also_locks: Iterable[str] = (),
    ) -> Iterator[Any]:
        """A write unit: take the booking lock(s), yield, commit; roll back on any error.

        SQLite (stdlib driver): ``BEGIN IMMEDIATE`` takes the database's single write lock before
        anything is read, so the re-check and the write of two bookings can never interleave. SQLite
        through ODBC: the same, with the driver switched to autocommit so that our ``BEGIN
        IMMEDIATE`` is the transaction. Server databases: the mapping's lock statement, once per
        bind set (callers sort them so two units never wait on each other in opposite order); a
        locking SELECT must return at least one row, otherwise nothing would serialise the
        bookings and the write is refused (``LockNotTaken``).

        ``also_locks`` names the further rows the caller locks inside the unit (e.g. the patients'):
        writers of this process that will wait for them queue in Python too (see below).

        A failure of the final COMMIT that looks like a lost connection raises
        ``CommitOutcomeUnknown``: the write may or may not have been applied.
        """
        cur = conn.cursor()
        manual = self.kind == "sqlite3" or self.dialect == "sqlite"
        deadline = current_deadline() or Deadline.after(self.timeout_s)
        queued = False
        if manual:
            # Writers queue here before BEGIN IMMEDIATE: threads of this process on a lock, processes
            # on this host on an flock()ed file, both of which wake the next waiter at once. Left to
            # itself, SQLite's busy handler polls with growing sleeps (up to 100 ms): under load one
            # process kept the file lock while the other's writers slept for seconds. Every wait
            # takes what is left of the unit's deadline, so together they end within the timeout.
            if not self._writer.acquire(timeout=deadline.remaining()):
                raise LegacyBusy(f"the legacy database is busy: no write slot within {self.timeout_s:g} s")
            queued = True
            try:
                if not self._host_lock().acquire(deadline.remaining()):
                    raise LegacyBusy(
                        f"the legacy database is busy: another process kept it locked for {self.timeout_s:g} s"
                    )
            except BaseException:
                self._writer.release()
                raise
        held: list[threading.Lock] = []
        if lock_sql and not manual:
            # Threads of this process that want the same booking lock queue here, on a Python lock,
            # so at most one of them per process waits inside the driver. A waiting pyodbc call was
            # seen to keep the GIL now and then; with several waiters of one process in the driver
            # the holder of the row lock (same process) could not run, and everything stalled until
            # the statement timeout.
            # Every row the unit will wait for counts (the booking lock and ``also_locks``), taken in one
            # sorted order, so two threads of this process never wait for each other's queues.
            keys = {repr(sorted(values.items())) for values in lock_binds} | {f"also:{name}" for name in also_locks}
            for key in sorted(keys):
                queue = self._queue_for(key)
                if not queue.acquire(timeout=deadline.remaining()):
                    for other in reversed(held):
                        other.release()
                    raise LegacyBusy(f"the legacy database is busy: no booking lock within {self.timeout_s:g} s")
                held.append(queue)
        if self.kind == "pyodbc" and manual:
            conn.rollback()
            conn.autocommit = True
        try:
            if manual:
                # The busy handler of SQLite waits for a lock held by a process outside this host's
                # queue (another program, or a reader checkpointing): no longer than the unit has left.
                cur.execute(f"PRAGMA busy_timeout = {_millis(deadline.remaining())}")
                cur.execute("BEGIN IMMEDIATE")
            elif self.dialect == "postgresql":
                # Inside this transaction only: lock waits and statements end with the unit.
                ms = str(_millis(deadline.remaining()))
                cur.execute(
                    "SELECT set_config('lock_timeout', ?, true), set_config('statement_timeout', ?, true)", ms, ms
                )
                cur.fetchall()
            elif self.dialect == "mariadb":
                # Whole seconds only (at least 1): the unit may overrun its deadline by < 1 s here.
                cur.execute(f"SET SESSION innodb_lock_wait_timeout = {max(1, math.ceil(deadline.remaining()))}")
            try:
                if lock_sql and not manual:
                    locking = self.lockable(lock_sql)
                    for values in lock_binds:
                        text, params = bind(locking, values)
                        cur.execute(text, params)
                        # A SELECT must return the locked row. (An UPDATE's row count is no proof:
                        # MariaDB counts changed rows only, and a no-op UPDATE changes none.)
                        if cur.description is not None and not cur.fetchall():
                            raise LockNotTaken(
                                f"writes.lock locked no row for {values}: nothing would serialise these bookings"
                            )
                yield cur
            except BaseException:
                try:
                    if manual:
                        cur.execute("ROLLBACK")
                    else:
                        conn.rollback()
                except Exception:  # the connection is gone; the server rolls back on its own
                    pass
                raise
            try:
                cur.execute("COMMIT") if manual else conn.commit()
            except Exception as exc:
                if _is_connection_error(exc) and not _is_lock_error(exc) and not _is_refusal(exc):
                    raise CommitOutcomeUnknown(
                        f"the legacy database connection failed while committing: {_first_line(exc)}"
                    ) from exc
                raise
        finally:
            if self.kind == "pyodbc" and manual:
                try:
                    conn.autocommit = False
                except Exception:  # a broken connection: _call discards it before its next use
                    pass
            if queued:
                self._host_lock().release()
                self._writer.release()
            for queue in reversed(held):
                queue.release()

    def _queue_for(self, key: str) -> threading.Lock:
        with self._lock:
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = threading.Lock()
            return queue

    def _host_lock(self) -> _HostLock:
        """The per-host writer lock of a SQLite file (a lock file in the temp folder named after the
        database's path, so nothing is created next to the legacy database)."""
        if self._host is None:
            path = self._sqlite_path if self.kind == "sqlite3" else _odbc_database(self._odbc)
            self._host = _HostLock(host_lock_path(path) if path and fcntl is not None else None)
        return self._host

    async def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except Exception:  # closing at shutdown; connection may belong to a dead thread
                pass
        self._readers.shutdown(wait=False, cancel_futures=True)
        self._writers.shutdown(wait=False, cancel_futures=True)
        if self._host is not None:
            self._host.close()
            self._host = None


class _HostLock:
    """An ``flock`` on a file, taken with a time limit.

    A blocking ``flock`` is woken by the kernel the moment the holder lets go, which polling
    (``LOCK_NB`` and sleep) is not; but it cannot time out. So the blocking call runs in a helper
    thread and the writer waits for it with a timeout. A writer that gives up leaves the helper
    waiting: the next writer of this process (callers hold the process writer lock, so there is
    one at a time) inherits it instead of starting another, and if nobody wants the lock by the
    time the helper gets it, the helper lets it go at once. At most one helper per file and process.
    """

    def __init__(self, path: str | None) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600) if path else None
        self._cond = threading.Condition()
        self._held = False
        self._pending = False  # a helper thread is blocked in flock()
        self._wanted = False  # a writer is waiting for the helper
        self._closed = False

    def acquire(self, timeout: float) -> bool:
        fd = self._fd
        if fd is None:  # not POSIX, or no file to name the lock after: SQLite's busy handler queues alone
            return True
        with self._cond:
            if not self._pending:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self._held = True
                    return True
                except BlockingIOError:
                    self._pending = True
                    threading.Thread(target=self._wait, args=(fd,), name="legacy-flock", daemon=True).start()
            self._wanted = True
            try:
                return self._cond.wait_for(lambda: self._held, timeout)
            finally:
                self._wanted = False

    def _wait(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            # Not expected on a regular file; never leave the next writers waiting for a helper that is gone.
            with self._cond:
                self._pending = False
                self._cond.notify_all()
            raise
        with self._cond:
            self._pending = False
            if self._closed:
                os.close(fd)  # closing the file releases the lock
            elif self._wanted:
                self._held = True
                self._cond.notify_all()
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def release(self) -> None:
        with self._cond:
            if self._held and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._held = False

    def close(self) -> None:
        with self._cond:
            self._closed = True
            if self._fd is not None and not self._pending:
                os.close(self._fd)  # a pending helper closes it when its flock() returns
            self._fd = None


def host_lock_path(database_path: str | os.PathLike[str]) -> str:
    """The per-host writer lock file of a SQLite database: in the temp folder, named after the
    database's real path, so every process on this host that writes the file finds the same one."""
    digest = hashlib.sha1(os.path.realpath(database_path).encode()).hexdigest()[:20]
    return os.path.join(tempfile.gettempdir(), f"sched-adapter-{digest}.lock")


def _millis(seconds: float) -> int:
    """A lock timeout in ms for SQL: at least 1 (0 would mean "wait forever" on PostgreSQL)."""
    return max(1, int(seconds * 1000))


def sql_fold_function(value: Any) -> str | None:
    """SQLite's ``SCHED_FOLD(x)``: NFKD without combining marks, case-folded (NULL stays NULL)."""
    return None if value is None else fold(str(value))


def _odbc_database(dsn: str) -> str | None:
    m = re.search(r"(?i)(?:^|;)\s*DATABASE\s*=\s*(\{[^}]*\}|[^;]*)", dsn)
    return m.group(1).strip().strip("{}") if m else None


def query(cur_or_conn: Any, sql: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Run a SELECT with named binds; rows as dicts keyed by the column names."""
    text, params = bind(sql, values)
    cur = (
        cur_or_conn.cursor() if hasattr(cur_or_conn, "cursor") and not hasattr(cur_or_conn, "fetchall") else cur_or_conn
    )
    cur.execute(text, params)
    return dict_rows(cur)


def dict_rows(cur: Any) -> list[dict[str, Any]]:
    """The rows of an executed cursor as dicts keyed by the column names."""
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=False)) for row in cur.fetchall()]


def execute(cur: Any, sql: str, values: dict[str, Any]) -> int:
    text, params = bind(sql, values)
    cur.execute(text, params)
    affected: int = cur.rowcount
    return affected


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__


_MARIADB_CONNECTION_CODES = ("(2002)", "(2003)", "(2005)", "(2006)", "(2013)", "(2026)", "(2055)")
# psqlODBC reports a dropped connection as a generic HY000 with one of these texts.
_LOST_CONNECTION_TEXTS = (
    "connection has been lost",
    "server closed the connection",
    "could not send data",
    "could not receive data",
    "no connection to the server",
    "terminating connection",
    "connection not open",
    "communication link failure",
)


def _is_driver_error(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.Error) or type(exc).__module__ == "pyodbc"


def _sqlstate(exc: BaseException) -> str:
    state = exc.args[0] if getattr(exc, "args", None) else ""
    return state if isinstance(state, str) else ""


def _is_lock_error(exc: BaseException) -> bool:
    """A lock or statement wait that ran out of time: retryable, and the connection is healthy."""
    if _sqlstate(exc) in ("55P03", "57014"):  # PostgreSQL lock_timeout, statement_timeout
        return True
    msg = str(exc).lower()
    return "lock wait timeout" in msg or "deadlock" in msg or "database is locked" in msg


# SQLite's texts for "cannot write now" (SQLITE_READONLY*, SQLITE_FULL, SQLITE_IOERR).
_SQLITE_REFUSALS = ("readonly database", "read-only database", "database or disk is full", "disk i/o error")
# MariaDB: 1290 --read-only, 1792 read-only transaction, 1036 read-only table, 1021 disk full,
# 1114 table full; pyodbc appends the native error number in parentheses.
_MARIADB_REFUSAL_CODES = ("(1290)", "(1792)", "(1036)", "(1021)", "(1114)")


def _is_refusal(exc: BaseException | None) -> bool:
    """The database is up but refuses writes for now (read-only, disk full): retryable (503).

    Not a business rule (422): nothing is wrong with the request, and it succeeds unchanged once
    an operator makes the database writable again.
    """
    if exc is None or not _is_driver_error(exc):
        return False
    if isinstance(exc, sqlite3.Error):
        return any(t in str(exc).lower() for t in _SQLITE_REFUSALS)
    state = _sqlstate(exc)
    text = str(exc)
    # 25006 read_only_sql_transaction (PostgreSQL, MariaDB), 53100 disk_full, 53xxx out of resources.
    if state == "25006" or state.startswith("53"):
        return True
    if any(code in text for code in _MARIADB_REFUSAL_CODES):
        return True
    lower = text.lower()
    return "readonly database" in lower or "read-only transaction" in lower or "database or disk is full" in lower


def _is_lost(exc: BaseException) -> bool:
    """The connection itself failed (not a lock or statement timeout, not a refusal)."""
    return _is_connection_error(exc) and not _is_lock_error(exc) and not _is_refusal(exc)


def _is_connection_error(exc: BaseException) -> bool:
    """Errors that mean "the legacy system is not there / too busy now": retryable (503)."""
    if not _is_driver_error(exc):
        return False  # e.g. the state store's StateUnavailable raised by the gate: not about this database
    if isinstance(exc, sqlite3.OperationalError):
        msg = str(exc).lower()
        return "locked" in msg or "unable to open" in msg or "disk i/o" in msg or _is_refusal(exc)
    name = type(exc).__name__
    if name in ("OperationalError", "InterfaceError"):
        return True
    state = _sqlstate(exc)
    text = str(exc)
    # 08xxx connection exceptions, HYT00/HYT01 timeouts, 40001 serialization, 40P01 deadlock,
    # 55P03 lock timeout, 57014 statement timeout, 57P0x PostgreSQL shutting down; MariaDB reports
    # lock wait timeouts and lost or refused connections as a generic HY000 with its own error number.
    return (
        state.startswith("08")
        or state in ("HYT00", "HYT01", "40001", "40P01", "55P03", "57014", "57P01", "57P02", "57P03")
        or _is_refusal(exc)
        or (
            state == "HY000"
            and (
                _is_lock_error(exc)
                or any(code in text for code in _MARIADB_CONNECTION_CODES)
                or any(t in text.lower() for t in _LOST_CONNECTION_TEXTS)
            )
        )
    )
