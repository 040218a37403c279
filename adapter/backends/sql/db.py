"""DB-API plumbing: connections, named binds, transactions and locks for SQLite and ODBC.

Why it looks like this:

* One URL picks the driver: ``sqlite:///path/file.sqlite`` uses stdlib ``sqlite3`` (the embedded
  default); ``odbc:DRIVER={...};SERVER=...`` uses pyodbc (production: PostgreSQL, MariaDB/MySQL,
  SQL Server ...). Everything above this module is identical for both.
* Mapping SQL uses named binds (``:practitioner_keys``); both drivers are driven with ``?`` markers.
  ``compile_sql`` rewrites names to markers once and expands list values to ``?, ?, ?`` at run time.
  Values are never spliced into SQL text.
* DB-API connections must not be shared between threads (pyodbc), so each worker thread owns its
  connection (``threading.local``). ODBC calls release the GIL, so a small thread pool gives real
  parallelism. SQLite reads are fast enough (~0.1 ms) to run inline on the event loop thread; the
  thread hop would cost more than the query.
* Locking (see ``Database.write``): SQLite has one writer at a time, so a write unit starts with
  ``BEGIN IMMEDIATE`` (the whole file is the lock), after queueing on a process lock and a per-host
  ``flock`` so that waiting writers are woken in turn instead of polling. Server databases run the
  mapping's lock statement with ``FOR UPDATE`` appended, inside the same transaction as the
  re-check and the write.
* Errors: connection failures (refused, lost mid-query, server shutting down), lock timeouts and
  deadlocks become ``BackendUnavailable`` (HTTP 503, retry); after one connection is seen dead,
  every pooled connection is replaced before its next use. A COMMIT that loses its connection
  raises ``CommitOutcomeUnknown``: the write may have happened.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sqlite3
import tempfile
import threading
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

from adapter.backends.protocol import BackendUnavailable

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: SQLite's own busy handler is the only queue
    fcntl = None  # type: ignore[assignment]

T = TypeVar("T")


class LockNotTaken(Exception):
    """The mapping's ``writes.lock`` statement locked no row (misdeclared lock or unknown resource)."""


class CommitOutcomeUnknown(BackendUnavailable):
    """The connection broke during COMMIT: the write may or may not be in the legacy database."""


_NAMED = re.compile(r"'(?:[^']|'')*'|(?<![:\w]):([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True, slots=True)
class CompiledSql:
    text: str  # with {name} slots where list binds expand
    order: tuple[str, ...]


@lru_cache(maxsize=1024)
def compile_sql(sql: str) -> CompiledSql:
    order: list[str] = []

    def repl(m: re.Match) -> str:
        if m.group(1) is None:
            return m.group(0)  # a quoted literal: untouched
        order.append(m.group(1))
        return "\x00"

    text = _NAMED.sub(repl, sql)
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
        self._executor = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="legacy-db")
        self.inline_reads = self.kind == "sqlite3"
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self._generation = 0  # bumped when a connection is found dead (see _call)
        self._writer = threading.Lock()  # SQLite: one write unit per process at a time (see write)
        self._lock_fd: int | None = None  # SQLite: the per-host writer lock file, opened on first write

    # -- connections -------------------------------------------------------------------------
    def _connect(self) -> Any:
        try:
            if self.kind == "sqlite3":
                conn = sqlite3.connect(
                    self._sqlite_path, timeout=self.timeout_s, isolation_level=None, check_same_thread=True
                )
                # FOLD() in a mapping's name filter: case- and accent-insensitive, as FHIR string search is.
                conn.create_function("SCHED_FOLD", 1, sql_fold_function, deterministic=True)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            else:
                import pyodbc  # imported lazily: the embedded default needs no ODBC manager

                conn = pyodbc.connect(self._odbc, autocommit=False, timeout=int(self.timeout_s))
                try:
                    conn.timeout = int(self.timeout_s)  # per-statement timeout, where the driver has one
                except pyodbc.Error:
                    pass  # psqlODBC refuses SQL_ATTR_QUERY_TIMEOUT; lock waits are bounded server-side
                if self.dialect == "postgresql":
                    cur = conn.cursor()
                    cur.execute(f"SET lock_timeout = '{int(self.timeout_s)}s'")
                    conn.commit()
                if self.dialect == "mariadb":
                    # Bind text as UTF-8: with pyodbc's default (UTF-16) MariaDB Connector/ODBC garbles
                    # every text parameter longer than 127 characters (a note, an OpenEMR pc_recurrspec).
                    conn.setencoding(encoding="utf-8")
                    conn.setdecoding(pyodbc.SQL_CHAR, encoding="utf-8")
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
        return conn

    def _discard(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already broken; nothing to release
                pass

    # -- running work ------------------------------------------------------------------------
    async def run(self, fn: Callable[[Any], T], *, inline: bool | None = None) -> T:
        """Run ``fn(connection)`` in a DB thread (or inline for SQLite reads)."""
        if self.inline_reads if inline is None else inline:
            return self._call(fn)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[Any], T]) -> T:
        # After one thread saw the connection drop, every pooled connection is suspect (a restarted
        # or unplugged server kills them all): each thread replaces its own before the next use,
        # so an outage costs one failed request, not one per pooled connection.
        if getattr(self._local, "generation", self._generation) != self._generation:
            self._discard()
        try:
            conn = self.connection()
            self._local.generation = self._generation
        except BackendUnavailable:
            raise
        except Exception as exc:  # any failure to open a connection means "not available now" (503)
            raise BackendUnavailable(f"cannot connect to the legacy database: {_first_line(exc)}") from exc
        try:
            result = fn(conn)
            if self.kind == "pyodbc":
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
            if isinstance(exc, BackendUnavailable):
                self._discard()
                self._generation += 1
                raise
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
    def write(self, conn: Any, lock_sql: str | None, lock_binds: Sequence[dict[str, Any]]) -> Iterator[Any]:
        """A write unit: take the booking lock(s), yield, commit; roll back on any error.

        SQLite (stdlib driver): ``BEGIN IMMEDIATE`` takes the database's single write lock before
        anything is read, so the re-check and the write of two bookings can never interleave. SQLite
        through ODBC: the same, with the driver switched to autocommit so that our ``BEGIN
        IMMEDIATE`` is the transaction. Server databases: the mapping's lock statement, once per
        bind set (callers sort them so two units never wait on each other in opposite order); a
        locking SELECT must return at least one row, otherwise nothing would serialise the
        bookings and the write is refused (``LockNotTaken``).

        A failure of the final COMMIT that looks like a lost connection raises
        ``CommitOutcomeUnknown``: the write may or may not have been applied.
        """
        cur = conn.cursor()
        manual = self.kind == "sqlite3" or self.dialect == "sqlite"
        queued = False
        if manual:
            # Writers queue here before BEGIN IMMEDIATE: threads of this process on a lock, processes
            # on this host on an flock()ed file, both of which wake the next waiter at once. Left to
            # itself, SQLite's busy handler polls with growing sleeps (up to 100 ms): under load one
            # process kept the file lock while the other's writers slept for seconds.
            if not self._writer.acquire(timeout=self.timeout_s):
                raise BackendUnavailable(f"the legacy database is busy: no write slot within {self.timeout_s:g} s")
            queued = True
            try:
                self._host_lock(True)
            except BaseException:
                self._writer.release()
                raise
        if self.kind == "pyodbc" and manual:
            conn.rollback()
            conn.autocommit = True
        try:
            if manual:
                cur.execute("BEGIN IMMEDIATE")
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
                if _is_connection_error(exc) and not _is_lock_error(exc):
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
                self._host_lock(False)
                self._writer.release()

    def _host_lock(self, take: bool) -> None:
        """Take/release the per-host writer lock of a SQLite file (a lock file in the temp folder
        named after the database's path, so nothing is created next to the legacy database)."""
        if self._lock_fd is None:
            path = self._sqlite_path if self.kind == "sqlite3" else _odbc_database(self._odbc)
            if not path or fcntl is None:
                return
            digest = hashlib.sha1(os.path.realpath(path).encode()).hexdigest()[:20]
            self._lock_fd = os.open(
                os.path.join(tempfile.gettempdir(), f"sched-adapter-{digest}.lock"), os.O_RDWR | os.O_CREAT, 0o600
            )
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX if take else fcntl.LOCK_UN)

    async def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except Exception:  # closing at shutdown; connection may belong to a dead thread
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def sql_fold_function(value: Any) -> str | None:
    """SQLite's ``SCHED_FOLD(x)``: NFKD without combining marks, case-folded (NULL stays NULL)."""
    if value is None:
        return None
    text = unicodedata.normalize("NFKD", str(value))
    return "".join(c for c in text if not unicodedata.combining(c)).casefold()


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
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=False)) for row in cur.fetchall()]


def execute(cur: Any, sql: str, values: dict[str, Any]) -> int:
    text, params = bind(sql, values)
    cur.execute(text, params)
    return cur.rowcount


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


def _is_lock_error(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return "lock wait timeout" in msg or "deadlock" in msg or "database is locked" in msg


def _is_connection_error(exc: BaseException) -> bool:
    """Errors that mean "the legacy system is not there / too busy now": retryable (503)."""
    if isinstance(exc, sqlite3.OperationalError):
        msg = str(exc).lower()
        return "locked" in msg or "unable to open" in msg or "disk i/o" in msg
    name = type(exc).__name__
    if name in ("OperationalError", "InterfaceError"):
        return True
    state = exc.args[0] if getattr(exc, "args", None) else ""
    text = str(exc)
    # 08xxx connection exceptions, HYT00/HYT01 timeouts, 40001 serialization, 40P01 deadlock,
    # 57P0x PostgreSQL shutting down; MariaDB reports lock wait timeouts and lost or refused
    # connections as a generic HY000 with its own error number.
    return isinstance(state, str) and (
        state.startswith("08")
        or state in ("HYT00", "HYT01", "40001", "40P01", "57P01", "57P02", "57P03")
        or (
            state == "HY000"
            and (
                _is_lock_error(exc)
                or any(code in text for code in _MARIADB_CONNECTION_CODES)
                or any(t in text.lower() for t in _LOST_CONNECTION_TEXTS)
            )
        )
    )
