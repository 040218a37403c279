"""Shared state stores for tests: a private Redis key space and PostgreSQL URLs from test DSNs.

Redis: the session's ``redis_url`` fixture flushes its db (15) at session start, and other test
sessions on this machine may do the same at any time, so the state-store tests use db 13 with a key
prefix unique to the run (``redis_state_url``) and delete exactly their keys afterwards.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
from urllib.parse import urlsplit, urlunsplit

STATE_REDIS_DB = 13
_counter = itertools.count(1)
_RUN = secrets.token_hex(3)


def redis_state_url(redis_url: str, hint: str = "t") -> str:
    """A ``state.url`` on the Redis of ``redis_url``, db 13, with a key prefix of its own."""
    parts = urlsplit(redis_url)
    prefix = f"sched-test:{os.getpid()}:{_RUN}:{next(_counter)}:{re.sub(r'[^A-Za-z0-9]+', '-', hint)[:40]}:"
    return urlunsplit(parts._replace(path=f"/{STATE_REDIS_DB}", query=f"key_prefix={prefix}"))


def drop_redis_keys(state_url: str) -> None:
    import redis

    from adapter.scheduling.stores.redis_store import split_url

    plain, prefix = split_url(state_url)
    client = redis.Redis.from_url(plain)
    try:
        keys = list(client.scan_iter(match=prefix.replace("[", "\\[").replace("*", "\\*") + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def pg_state_url(odbc_dsn: str) -> str:
    """A ``postgresql://`` URL for the database of an ODBC DSN made by ``tests/dbutil.py``."""
    attrs = {}
    for item in odbc_dsn.split(";"):
        key, _, value = item.partition("=")
        attrs[key.strip().upper()] = value.strip().strip("{}")
    user = attrs.get("UID") or "postgres"
    password = attrs.get("PWD") or ""
    auth = f"{user}:{password}@" if password else f"{user}@"
    return f"postgresql://{auth}{attrs.get('SERVER', '127.0.0.1')}:{attrs.get('PORT', '5432')}/{attrs['DATABASE']}"
