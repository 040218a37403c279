"""State store implementations behind ``StateStore`` (``scheduling.state``), chosen by ``state.url``.

* ``sqlite:///path`` (or no URL: ``state.path``): ``SqliteStateStore``, one file, one host;
* ``redis://host:port/db``, ``rediss://...``, ``redis+sentinel://h1:26379,h2:26379/service/db``:
  ``RedisStateStore``, shared by every replica (``?key_prefix=`` names its keys, default ``sched:``);
* ``postgresql://user:pw@host:port/db``: ``PostgresStateStore``, shared by every replica.

Each is blocking and runs behind ``ThreadedStateStore``; nothing outside this package and the
composition root knows which one is in use.
"""

from __future__ import annotations

from pathlib import Path

from adapter.scheduling.state import DEFAULT_TIMEOUT_SECONDS, SqliteStateStore, SyncStateStore, ThreadedStateStore

SHARED_SCHEMES = ("redis://", "rediss://", "redis+sentinel://", "unix://", "postgresql://", "postgres://")


def state_url(url: str | None, sqlite_path: str | Path) -> str:
    """The effective ``state.url``: the one given, else the SQLite file ``state.path``."""
    return url or f"sqlite:///{Path(sqlite_path)}"


def is_shared(url: str) -> bool:
    """Can replicas on several hosts share this store? (SQLite: one host only.)"""
    return url.startswith(SHARED_SCHEMES)


def open_sync_store(url: str, *, timeout_s: float = DEFAULT_TIMEOUT_SECONDS) -> SyncStateStore:
    if url.startswith("sqlite:///"):
        return SqliteStateStore(url[len("sqlite:///") :], timeout_s=timeout_s)
    if url.startswith(("redis://", "rediss://", "redis+sentinel://", "unix://")):
        from adapter.scheduling.stores.redis_store import RedisStateStore

        return RedisStateStore(url, timeout_s=timeout_s)
    if url.startswith(("postgresql://", "postgres://")):
        from adapter.scheduling.stores.postgres_store import PostgresStateStore

        return PostgresStateStore(url, timeout_s=timeout_s)
    raise ValueError(
        f"state.url {url!r}: expected sqlite:///path, redis://..., redis+sentinel://... or postgresql://..."
    )


def open_state_store(url: str, *, timeout_s: float = DEFAULT_TIMEOUT_SECONDS, threads: int = 4) -> ThreadedStateStore:
    """The async ``StateStore`` for ``url`` (see ``state_url``)."""
    return ThreadedStateStore(open_sync_store(url, timeout_s=timeout_s), threads=threads, timeout_s=timeout_s)


def secret_from_store(store: ThreadedStateStore) -> bytes:
    """The signing secret kept in a shared store (``security.signing_secret_from_state``)."""
    shared = getattr(store.gate, "shared_secret", None)
    if shared is None:
        raise ValueError("security.signing_secret_from_state needs a shared state store (state.url redis/postgresql)")
    secret: bytes = shared()
    return secret


def topology_problem(legacy_url: str, state_url: str, single_host: bool) -> str | None:
    """Why ``serve`` must refuse this combination, or None.

    A legacy database reached over ODBC is a server that other hosts can reach too; with a
    host-local state store, a replica on another host would not see this host's holds, and the
    zero-double-booking promise would end at the machine's edge.
    """
    if legacy_url.startswith("odbc:") and not is_shared(state_url) and not single_host:
        return (
            "backend.database_url is a shared (odbc:) database but the state store is host-local "
            f"({state_url}): replicas on other hosts would not see this host's holds. Set state.url to a shared "
            "store (redis://... or postgresql://...), or state.single_host = true if this is the only host."
        )
    return None
