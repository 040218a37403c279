"""Redis URLs as ``state.url`` spells them, for every store kept in Redis (the scheduling state, the SIU feed).

``?key_prefix=`` is the adapter's own query parameter (the prefix of every key, default ``sched:``): it is taken
out before redis-py sees the URL. ``redis+sentinel://[:pw@]h1:p1,h2:p2/service/db`` connects to the primary that
Sentinel names for ``service``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.sentinel


def split_url(url: str) -> tuple[str, str]:
    """``(url without key_prefix, key_prefix)``: the prefix is ours, redis-py would reject it."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((v for k, v in query if k == "key_prefix"), "sched:")
    rest = urlencode([(k, v) for k, v in query if k != "key_prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


def connect(url: str, timeout_s: float) -> redis.Redis:
    """A client for ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://[:pw@]h1:p1,h2:p2/service/db``."""
    options: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if not url.startswith("redis+sentinel://"):
        return redis.Redis.from_url(url, **options)
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    password = parts.password
    hosts = []
    for item in netloc.split(","):
        host, _, port = item.partition(":")
        hosts.append((host, int(port or 26379)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("a redis+sentinel:// URL names the monitored service: redis+sentinel://h:26379/mymaster/0")
    service, db = path[0], int(path[1]) if len(path) > 1 else 0
    # redis-py leaves Sentinel's constructor and master_for unannotated; what they return is documented.
    make_sentinel = cast("Callable[..., redis.sentinel.Sentinel]", redis.sentinel.Sentinel)
    sentinel = make_sentinel(hosts, sentinel_kwargs=options, password=password, db=db, **options)
    master_for = cast("Callable[[str], redis.Redis]", sentinel.master_for)
    return master_for(service)
