"""The state store on Redis (``state.url = redis://host:port/db`` or ``redis+sentinel://...``).

For several hosts behind a load balancer: every replica sees the same holds, stored proposals,
idempotency records, booking journal, calendar version and signing secret.

How the guarantees of ``SqliteStateStore`` carry over:

* Atomic claims: every check-then-write (place a hold, begin an idempotency key, claim a stale
  intent, ...) is ONE Lua script; Redis runs a script without interleaving any other command, so
  two replicas racing for one hold cannot both win.
* Expiry: a hold or stored proposal is valid while its ``x`` (expiry, epoch seconds) is after the
  caller's ``now`` (so an injected clock works); its key also carries a Redis TTL of its remaining
  life plus a grace period, so nothing outlives its use even if no sweep ever runs. Idempotency
  records and settled journal entries expire after a day (the SQLite store's retention).
* Lock-owner liveness: leases (``stores.leases``), one hash field per process instance.
* Change counters (``scheduling.change_counters``): ``calendar`` and ``holds`` are ``INCR``ed after every
  calendar change and every hold placed/released/booked, and each bump is PUBLISHed on ``<prefix>calendar``
  (``calendar`` or ``holds``). A listener thread per process subscribes to it and keeps local copies
  (``counters``), re-read on every (re)subscription and every second; this process's own bumps are visible
  here at once. A cached ``$find`` reads the local copy (no round trip); holds themselves are still read from
  Redis on every ``$find``, so another host's hold is never offered during a message's delay.

Keys (all under ``key_prefix``, default ``sched:``): ``h:<id>`` hold hash, ``hp:<practitioner>``
zset of hold ids by start, ``hx`` zset of ``practitioner\\n id`` by expiry, ``hpat:<patient>``
zset of the ids of a patient's holds by start (a hold's patients are in its ``pats`` field, a JSON
list), ``p:<id>`` proposal,
``px`` zset of proposal ids by expiry, ``i:<n>:<client>:<key>`` idempotency hash, ``j:<token>``
journal hash, ``ji`` zset of intent tokens by last update, ``jis`` zset of intent tokens by start (an
intent's hash also carries what it occupies: ``prac``, ``s``, ``e``, ``pats``, so that bookings in flight
can be found by time), ``owners`` hash of owner leases,
``calendar`` version, ``secret`` the shared signing secret.

The scripts touch keys they compute from the prefix, which Redis Cluster does not allow; a
standalone server or a Sentinel-managed primary is what this store supports.

Blocking (the sync redis-py client): run it through ``ThreadedStateStore``; its ``gate`` is this
object, called from the backend's DB thread inside the legacy booking lock.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import secrets
import threading
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar, cast

import redis
import redis.sentinel

from adapter.backends.protocol import Interval
from adapter.redis_connect import connect, split_url
from adapter.scheduling.change_counters import CALENDAR, HOLDS, WatchedCounters
from adapter.scheduling.state import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_TIMEOUT_SECONDS,
    Hold,
    HoldConflict,
    IdempotencyInProgress,
    IdempotencyMismatch,
    JournalEntry,
    StateUnavailable,
    StoredResponse,
)
from adapter.scheduling.stores.intents import in_flight
from adapter.scheduling.stores.leases import DEFAULT_OWNER_LEASE_SECONDS, LeaseKeeper, new_owner, wall_clock

log = logging.getLogger("adapter.state")

P = ParamSpec("P")
T = TypeVar("T")

RETENTION_SECONDS = 86400
GRACE_SECONDS = 3600  # a key outlives its logical expiry by this much: clocks of replicas may differ

# Shared Lua: is the owner/updated pair stale? (owner lease gone or run out, or request lease over)
_STALE = """
local function stale(owner, updated, now, lease, owners)
  if not owner or owner == '' then return true end
  local until_s = redis.call('HGET', owners, owner)
  if not until_s or tonumber(until_s) <= now then return true end
  return tonumber(updated) <= now - lease
end
"""

_RELEASE = """
local function release(prefix, id)
  local h = prefix .. 'h:' .. id
  local v = redis.call('HMGET', h, 'prac', 'pats')
  if v[1] then
    redis.call('ZREM', prefix .. 'hp:' .. v[1], id)
    redis.call('ZREM', prefix .. 'hx', v[1] .. '\\n' .. id)
  end
  if v[2] then
    for _, pid in ipairs(cjson.decode(v[2])) do redis.call('ZREM', prefix .. 'hpat:' .. pid, id) end
  end
  redis.call('DEL', h)
end
"""

# The first active hold (by start) of these patients overlapping s..e, other than `own`; ids whose
# hash is gone (its TTL ran out) are dropped from the index on the way.
_PATIENT_CONFLICT = """
local function patient_conflict(prefix, pats, s, e, now, own)
  for _, pid in ipairs(pats) do
    local key = prefix .. 'hpat:' .. pid
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', '(' .. e)) do
      if id ~= own then
        local v = redis.call('HMGET', prefix .. 'h:' .. id, 's', 'e', 'x', 'prac')
        if not v[3] then
          redis.call('ZREM', key, id)
        elseif tonumber(v[3]) > now and tonumber(v[2]) > s then
          return {v[4], v[1], v[2], pid}
        end
      end
    end
  end
  return nil
end
"""

# KEYS: h:<id>, hp:<prac>, hx. ARGV: prefix, id, prac, loc, s, e, x, client(json), payload, now, grace,
# patients(json list). Returns {0} placed, {1, fields} existing, {2, s, e} practitioner conflict,
# {3, prac, s, e, patient} patient conflict.
_PLACE_HOLD = (
    _RELEASE
    + _PATIENT_CONFLICT
    + """
local now = tonumber(ARGV[10])
local existing = redis.call('HGET', KEYS[1], 'x')
if existing and tonumber(existing) > now then
  return {1, redis.call('HGETALL', KEYS[1])}
end
local s, e = tonumber(ARGV[5]), tonumber(ARGV[6])
for _, other in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[6])) do
  if other ~= ARGV[2] then
    local v = redis.call('HMGET', ARGV[1] .. 'h:' .. other, 's', 'e', 'x')
    if not v[3] then
      redis.call('ZREM', KEYS[2], other)
    elseif tonumber(v[3]) > now and tonumber(v[2]) > s then
      return {2, v[1], v[2]}
    end
  end
end
local pats = cjson.decode(ARGV[12])
local found = patient_conflict(ARGV[1], pats, s, ARGV[6], now, ARGV[2])
if found then return {3, found[1], found[2], found[3], found[4]} end
release(ARGV[1], ARGV[2])  -- an expired hold of the same slot, out of every index
local life = math.floor((tonumber(ARGV[7]) - now + tonumber(ARGV[11])) * 1000)
redis.call('HSET', KEYS[1], 'prac', ARGV[3], 'loc', ARGV[4], 's', ARGV[5], 'e', ARGV[6], 'x', ARGV[7],
           'client', ARGV[8], 'payload', ARGV[9], 'pats', ARGV[12])
redis.call('PEXPIRE', KEYS[1], life)
redis.call('ZADD', KEYS[2], s, ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[7], ARGV[3] .. '\\n' .. ARGV[2])
for _, pid in ipairs(pats) do
  local key = ARGV[1] .. 'hpat:' .. pid
  redis.call('ZADD', key, s, ARGV[2])
  -- A patient's index lives as long as its longest hold, so patients seen once leave no key behind.
  if redis.call('PTTL', key) < life then redis.call('PEXPIRE', key, life) end
end
return {0}
"""
)

# KEYS: hp:<prac>. ARGV: prefix, s, e, now, own_hold, client(json). Returns {} or {s, e} of a conflict.
_CONFLICT = """
local s, now = tonumber(ARGV[2]), tonumber(ARGV[4])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])) do
  local v = redis.call('HMGET', ARGV[1] .. 'h:' .. id, 's', 'e', 'x', 'client')
  if v[3] and tonumber(v[3]) > now and tonumber(v[2]) > s then
    local own = id == ARGV[5] and (v[4] == 'null' or v[4] == ARGV[6])
    if not own then return {v[1], v[2]} end
  end
end
return {}
"""

# ARGV: prefix, s, e, now, own_hold, patients(json list). Returns {} or {prac, s, e, patient}.
_PATIENT_CHECK = (
    _PATIENT_CONFLICT
    + """
local found = patient_conflict(ARGV[1], cjson.decode(ARGV[6]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), ARGV[5])
if found then return found end
return {}
"""
)

# KEYS: hpat:<patient>... ARGV: prefix, s, e, now. Returns {s, e, ...} per patient in KEYS order.
_HOLDS_BY_PATIENT = """
local s, now = tonumber(ARGV[2]), tonumber(ARGV[4])
local out = {}
for _, key in ipairs(KEYS) do
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', '(' .. ARGV[3])) do
    local v = redis.call('HMGET', ARGV[1] .. 'h:' .. id, 's', 'e', 'x')
    if v[3] and tonumber(v[3]) > now and tonumber(v[2]) > s then
      table.insert(out, v[1]); table.insert(out, v[2])
    end
  end
end
return out
"""

# KEYS: hp:<prac>... ARGV: prefix, s, e, now. Returns {index, s, e, ...} (index into KEYS, 1-based).
_HOLDS_BY_PRAC = """
local s, now = tonumber(ARGV[2]), tonumber(ARGV[4])
local out = {}
for i, key in ipairs(KEYS) do
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', '(' .. ARGV[3])) do
    local v = redis.call('HMGET', ARGV[1] .. 'h:' .. id, 's', 'e', 'x')
    if v[3] and tonumber(v[3]) > now and tonumber(v[2]) > s then
      table.insert(out, i); table.insert(out, v[1]); table.insert(out, v[2])
    end
  end
end
return out
"""

# KEYS: hx, px, owners. ARGV: prefix, now, retention. Returns how many holds and proposals went.
_SWEEP = (
    _RELEASE
    + """
local n = 0
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])) do
  local cut = string.find(member, '\\n', 1, true)
  local prac, id = string.sub(member, 1, cut - 1), string.sub(member, cut + 1)
  local x = redis.call('HGET', ARGV[1] .. 'h:' .. id, 'x')
  if not x or tonumber(x) <= tonumber(ARGV[2]) then
    release(ARGV[1], id)
    redis.call('ZREM', ARGV[1] .. 'hp:' .. prac, id)
  end
  redis.call('ZREM', KEYS[1], member)
  n = n + 1
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])) do
  redis.call('DEL', ARGV[1] .. 'p:' .. id)
  redis.call('ZREM', KEYS[2], id)
  n = n + 1
end
-- Leases of processes gone for a day (killed: nobody dropped them) are forgotten.
local owners = redis.call('HGETALL', KEYS[3])
for i = 1, #owners, 2 do
  if tonumber(owners[i + 1]) <= tonumber(ARGV[2]) - tonumber(ARGV[3]) then redis.call('HDEL', KEYS[3], owners[i]) end
end
return n
"""
)

_RELEASE_SCRIPT = _RELEASE + "release(ARGV[1], ARGV[2]) return 0"

# KEYS: i:<...>, owners. ARGV: operation, body_hash, now, owner, lease, retention
_IDEM_BEGIN = (
    _STALE
    + """
local now = tonumber(ARGV[3])
local r = redis.call('HMGET', KEYS[1], 'op', 'hash', 'state', 'status', 'mt', 'body', 'owner', 'created')
if not r[1] then
  redis.call('HSET', KEYS[1], 'op', ARGV[1], 'hash', ARGV[2], 'state', 'started', 'owner', ARGV[4], 'created', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  return {0}
end
if r[1] ~= ARGV[1] or r[2] ~= ARGV[2] then return {1} end
if r[3] == 'done' then return {2, r[4], r[5], r[6]} end
if not stale(r[7], r[8], now, tonumber(ARGV[5]), KEYS[2]) then return {3} end
redis.call('HSET', KEYS[1], 'owner', ARGV[4], 'created', ARGV[3])
return {0}
"""
)

# KEYS: i:<...>. ARGV: '' (failed: forget a started record) or status, media type, body
_IDEM_FINISH = """
if #ARGV == 0 then
  if redis.call('HGET', KEYS[1], 'state') == 'started' then redis.call('DEL', KEYS[1]) end
  return 0
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'state', 'done', 'status', ARGV[1], 'mt', ARGV[2], 'body', ARGV[3])
  redis.call('HDEL', KEYS[1], 'owner')
end
return 0
"""

_JOURNAL_FIELDS = "'client', 'rk', 'payload', 'state', 'appt', 'owner', 'created', 'updated'"

# KEYS: j:<token>, ji, jis. ARGV: prefix, token, appointment id, owner, now, release(0/1), retention
_JOURNAL_DONE = (
    _RELEASE
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'state', 'done', 'appt', ARGV[3], 'owner', ARGV[4], 'updated', ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[7])
end
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
if ARGV[6] == '1' then release(ARGV[1], ARGV[2]) end
return 0
"""
)

# KEYS: j:<token>, ji. ARGV: token, now
_JOURNAL_ABANDON = """
if redis.call('HGET', KEYS[1], 'state') == 'intent' then
  redis.call('HDEL', KEYS[1], 'owner')
  redis.call('HSET', KEYS[1], 'updated', ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
end
return 0
"""

# KEYS: j:<token>, ji, jis. ARGV: token
_JOURNAL_DROP = """
if redis.call('HGET', KEYS[1], 'state') == 'intent' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
return 0
"""

# KEYS: ji, owners. ARGV: prefix, now, owner, lease, limit, token ('' = every stale intent)
_JOURNAL_CLAIM = (
    _STALE
    + """
local now = tonumber(ARGV[2])
local tokens
if ARGV[6] ~= '' then tokens = {ARGV[6]} else tokens = redis.call('ZRANGE', KEYS[1], 0, -1) end
local out = {}
local n = 0
for _, token in ipairs(tokens) do
  if n >= tonumber(ARGV[5]) then break end
  local key = ARGV[1] .. 'j:' .. token
  local r = redis.call('HMGET', key, """
    + _JOURNAL_FIELDS
    + """)
  if r[4] == 'intent' and stale(r[6], r[8], now, tonumber(ARGV[4]), KEYS[2]) then
    redis.call('HSET', key, 'owner', ARGV[3], 'updated', ARGV[2])
    redis.call('ZADD', KEYS[1], ARGV[2], token)
    table.insert(out, token)
    for i = 1, 8 do table.insert(out, r[i] or false) end
    n = n + 1
  end
end
return out
"""
)

# The intents in flight (state 'intent', indexed in `jis` by start) overlapping s..e; tokens whose hash
# is no longer an intent are dropped from the index on the way. Returns {token, prac, s, e, pats(json), ...}.
_INTENTS_OVERLAPPING = """
local function intents_overlapping(prefix, jis, s, e)
  local out = {}
  for _, token in ipairs(redis.call('ZRANGEBYSCORE', jis, '-inf', '(' .. e)) do
    local v = redis.call('HMGET', prefix .. 'j:' .. token, 'state', 'prac', 's', 'e', 'pats')
    if v[1] ~= 'intent' or not v[2] then
      redis.call('ZREM', jis, token)
    elseif tonumber(v[4]) > tonumber(s) then
      table.insert(out, {token, v[2], v[3], v[4], v[5]})
    end
  end
  return out
end
"""

# KEYS: jis. ARGV: prefix, s, e. Returns {prac, s, e, pats(json), ...}.
_INTENTS_READ = (
    _INTENTS_OVERLAPPING
    + """
local out = {}
for _, it in ipairs(intents_overlapping(ARGV[1], KEYS[1], ARGV[2], ARGV[3])) do
  for i = 2, 5 do table.insert(out, it[i]) end
end
return out
"""
)

# What journal_intent writes (KEYS: j:<token>, ji, jis; ARGV from 3 on, see _JOURNAL_INTENT).
_RECORD_INTENT = """
local function record_intent()
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'client', ARGV[3], 'rk', ARGV[4], 'payload', ARGV[5], 'state', 'intent',
             'owner', ARGV[6], 'created', ARGV[7], 'updated', ARGV[7])
  redis.call('ZADD', KEYS[2], ARGV[7], ARGV[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
  if ARGV[8] ~= '' then
    redis.call('HSET', KEYS[1], 'prac', ARGV[8], 's', ARGV[9], 'e', ARGV[10], 'pats', ARGV[11])
    redis.call('ZADD', KEYS[3], ARGV[9], ARGV[2])
  end
end
"""

# KEYS: j:<token>, ji, jis. ARGV: prefix, token, client(json), rk(json), payload, owner, now, and what the
# intent occupies as read from its payload: prac ('' = not a booking of a slot), s, e, pats(json list).
_JOURNAL_INTENT = _RECORD_INTENT + "record_intent() return 0"

# KEYS: j:<token>, ji, jis, hp:<prac>. ARGV: as _JOURNAL_INTENT, then 12: the requested prac, 13: s, 14: e,
# 15: patients (json list), 16: client as the holds store it (json). In the SQLite store's order: a foreign
# hold of the practitioner {1, s, e}, a hold of a patient {2, prac, s, e, patient}, an intent in flight of
# the practitioner {1, s, e} or of a patient {2, prac, s, e, patient}; else the intent is recorded, {0}.
_JOURNAL_INTENT_EXCLUSIVE = (
    _PATIENT_CONFLICT
    + _INTENTS_OVERLAPPING
    + _RECORD_INTENT
    + """
local s, now = tonumber(ARGV[13]), tonumber(ARGV[7])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[14])) do
  local v = redis.call('HMGET', ARGV[1] .. 'h:' .. id, 's', 'e', 'x', 'client')
  if v[3] and tonumber(v[3]) > now and tonumber(v[2]) > s then
    local own = id == ARGV[2] and (v[4] == 'null' or v[4] == ARGV[16])
    if not own then return {1, v[1], v[2]} end
  end
end
local pats = cjson.decode(ARGV[15])
local found = patient_conflict(ARGV[1], pats, s, ARGV[14], now, ARGV[2])
if found then return {2, found[1], found[2], found[3], found[4]} end
local mine = {}
for _, pid in ipairs(pats) do mine[pid] = true end
for _, it in ipairs(intents_overlapping(ARGV[1], KEYS[3], ARGV[13], ARGV[14])) do
  if it[2] == ARGV[12] then return {1, it[3], it[4]} end
  local shared = {}
  for _, pid in ipairs(cjson.decode(it[5])) do
    if mine[pid] then table.insert(shared, pid) end
  end
  if #shared > 0 then
    table.sort(shared)
    return {2, it[2], it[3], it[4], shared[1]}
  end
end
record_intent()
return {0}
"""
)


def _unavailable_on_error(method: Callable[P, T]) -> Callable[P, T]:
    """Redis "cannot now" errors (unreachable, timed out, loading, read-only replica) -> StateUnavailable."""

    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except (
            redis.ConnectionError,
            redis.TimeoutError,
            redis.BusyLoadingError,
            redis.ReadOnlyError,
            redis.sentinel.MasterNotFoundError,
        ) as exc:
            raise StateUnavailable(f"the adapter's state store (Redis) is not available: {exc}") from exc

    return guarded


def _s(value: bytes | str | None) -> str | None:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _ts(t: dt.datetime) -> str:
    return repr(t.timestamp())


def _dt(s: bytes | str | float) -> dt.datetime:
    return dt.datetime.fromtimestamp(float(s.decode("ascii") if isinstance(s, bytes) else s), tz=dt.UTC)


def _client_json(client: str | None) -> str:
    return json.dumps(client)


class RedisStateStore:
    """The state in Redis (see the module docstring). Blocking: use it through ``ThreadedStateStore``.

    redis-py annotates each command as ``Awaitable[T] | T`` (one signature for its sync and async
    clients); ``self.r`` is the synchronous client, which returns the value itself, so the call sites
    ``cast`` to the concrete reply type (bytes replies: the client is not created with decode_responses).
    """

    def __init__(
        self,
        url: str,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        timeout_s: float = DEFAULT_TIMEOUT_SECONDS,
        owner_lease_seconds: float = DEFAULT_OWNER_LEASE_SECONDS,
        clock: Callable[[], float] = wall_clock,
    ) -> None:
        plain, self.prefix = split_url(url)
        self.url = url
        self.lease_seconds = lease_seconds
        self.timeout_s = timeout_s
        self.r = connect(plain, timeout_s)
        self.owner = new_owner()
        self._place = self.r.register_script(_PLACE_HOLD)
        self._conflict = self.r.register_script(_CONFLICT)
        self._by_prac = self.r.register_script(_HOLDS_BY_PRAC)
        self._patient_check = self.r.register_script(_PATIENT_CHECK)
        self._by_patient = self.r.register_script(_HOLDS_BY_PATIENT)
        self._sweep = self.r.register_script(_SWEEP)
        self._release = self.r.register_script(_RELEASE_SCRIPT)
        self._idem_begin = self.r.register_script(_IDEM_BEGIN)
        self._idem_finish = self.r.register_script(_IDEM_FINISH)
        self._done = self.r.register_script(_JOURNAL_DONE)
        self._abandon = self.r.register_script(_JOURNAL_ABANDON)
        self._drop = self.r.register_script(_JOURNAL_DROP)
        self._claim = self.r.register_script(_JOURNAL_CLAIM)
        self._intents = self.r.register_script(_INTENTS_READ)
        self._intent = self.r.register_script(_JOURNAL_INTENT)
        self._intent_exclusive = self.r.register_script(_JOURNAL_INTENT_EXCLUSIVE)
        self.leases = LeaseKeeper(self._renew_lease, owner_lease_seconds, clock)
        self._counters = WatchedCounters(self._fetch_counters, self._watch_counters, name="redis")

    @property
    def counters(self) -> WatchedCounters:
        return self._counters

    def _fetch_counters(self) -> tuple[int, int]:
        cal, holds = cast("list[bytes | None]", self.r.mget([self._k("calendar"), self._k("holds")]))
        return int(cal or 0), int(holds or 0)

    def _watch_counters(self, on_message: Callable[[], None], stop: threading.Event) -> None:
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self._k("calendar"))
            on_message()  # subscribed: re-read, a bump may have gone by while nobody listened
            while not stop.is_set():
                if pubsub.get_message(timeout=0.5) is not None:
                    on_message()
        finally:
            pubsub.close()

    def _bump(self, which: int) -> None:
        name = "calendar" if which == CALENDAR else "holds"
        with self.r.pipeline(transaction=False) as pipe:
            pipe.incr(self._k(name))
            pipe.publish(self._k("calendar"), name)
            value, _ = pipe.execute()
        self._counters.seen(which, int(value))

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _idem_key(self, client: str, key: str) -> str:
        return f"{self.prefix}i:{len(client)}:{client}:{key}"

    def _renew_lease(self, until_s: float) -> None:
        self.r.hset(self._k("owners"), self.owner, repr(until_s))

    @_unavailable_on_error
    def ping(self) -> None:
        self.r.ping()

    # -- holds -------------------------------------------------------------------------------
    @_unavailable_on_error
    def holds_by_practitioner(
        self, practitioner_ids: Iterable[str], window: Interval, now: dt.datetime
    ) -> dict[str, list[Interval]]:
        ids = list(dict.fromkeys(practitioner_ids))
        if not ids:
            return {}
        flat = self._by_prac(
            keys=[self._k("hp", p) for p in ids],
            args=[self.prefix, _ts(window.start), _ts(window.end), _ts(now)],
        )
        out: dict[str, list[Interval]] = {}
        for i in range(0, len(flat), 3):
            out.setdefault(ids[int(flat[i]) - 1], []).append(Interval(_dt(flat[i + 1]), _dt(flat[i + 2])))
        return out

    def _hold_from(self, hold_id: str, fields: dict[bytes, bytes]) -> Hold:
        return Hold(
            hold_id,
            _s(fields[b"prac"]) or "",
            _s(fields[b"loc"]) or "",
            Interval(_dt(fields[b"s"]), _dt(fields[b"e"])),
            _dt(fields[b"x"]),
            json.loads(fields[b"client"]),
            json.loads(fields[b"payload"]),
        )

    @_unavailable_on_error
    def get_hold(self, hold_id: str, now: dt.datetime) -> Hold | None:
        fields = cast("dict[bytes, bytes]", self.r.hgetall(self._k("h", hold_id)))
        if not fields or float(fields[b"x"]) <= now.timestamp():
            return None
        return self._hold_from(hold_id, fields)

    @_unavailable_on_error
    def check_free(
        self,
        practitioner_id: str,
        interval: Interval,
        now: dt.datetime,
        own_hold: str | None,
        client: str | None = None,
    ) -> None:
        found = self._conflict(
            keys=[self._k("hp", practitioner_id)],
            args=[self.prefix, _ts(interval.start), _ts(interval.end), _ts(now), own_hold or "", _client_json(client)],
        )
        if found:
            raise HoldConflict(practitioner_id, Interval(_dt(found[0]), _dt(found[1])))

    @_unavailable_on_error
    def check_patient_free(
        self, patient_ids: Iterable[str], interval: Interval, now: dt.datetime, own_hold: str | None
    ) -> None:
        """No active hold for any of these patients overlaps ``interval`` (except ``own_hold``).

        Call inside the legacy lock (the backend locks the patient too), like ``check_free``."""
        pats = [str(p) for p in patient_ids]
        if not pats:
            return
        found = self._patient_check(
            keys=[],
            args=[self.prefix, _ts(interval.start), _ts(interval.end), _ts(now), own_hold or "", json.dumps(pats)],
        )
        if found:
            raise HoldConflict(_s(found[0]) or "", Interval(_dt(found[1]), _dt(found[2])), patient_id=_s(found[3]))

    @_unavailable_on_error
    def holds_by_patient(self, patient_ids: Iterable[str], window: Interval, now: dt.datetime) -> list[Interval]:
        pats = [str(p) for p in patient_ids]
        if not pats:
            return []
        flat = self._by_patient(
            keys=[self._k("hpat", p) for p in pats],
            args=[self.prefix, _ts(window.start), _ts(window.end), _ts(now)],
        )
        return [Interval(_dt(flat[i]), _dt(flat[i + 1])) for i in range(0, len(flat), 2)]

    @_unavailable_on_error
    def place_hold(self, hold: Hold, now: dt.datetime) -> Hold:
        """Insert ``hold``; an active hold with the same id is returned unchanged (no extension)."""
        result = self._place(
            keys=[self._k("h", hold.id), self._k("hp", hold.practitioner_id), self._k("hx")],
            args=[
                self.prefix,
                hold.id,
                hold.practitioner_id,
                hold.location_id,
                _ts(hold.interval.start),
                _ts(hold.interval.end),
                _ts(hold.expires_at),
                _client_json(hold.client),
                json.dumps(hold.payload),
                _ts(now),
                GRACE_SECONDS,
                json.dumps([str(p) for p in hold.payload.get("patient_ids") or ()]),
            ],
        )
        if result[0] == 1:
            flat = result[1]
            return self._hold_from(hold.id, dict(zip(flat[::2], flat[1::2], strict=True)))
        if result[0] == 2:
            raise HoldConflict(hold.practitioner_id, Interval(_dt(result[1]), _dt(result[2])))
        if result[0] == 3:
            raise HoldConflict(_s(result[1]) or "", Interval(_dt(result[2]), _dt(result[3])), patient_id=_s(result[4]))
        self._bump(HOLDS)
        return hold

    @_unavailable_on_error
    def release(self, hold_id: str) -> None:
        self._release(keys=[], args=[self.prefix, hold_id])
        self._bump(HOLDS)

    @_unavailable_on_error
    def sweep(self, now: dt.datetime) -> int:
        return int(
            self._sweep(
                keys=[self._k("hx"), self._k("px"), self._k("owners")], args=[self.prefix, _ts(now), RETENTION_SECONDS]
            )
        )

    # -- stored proposals ----------------------------------------------------------------------
    @_unavailable_on_error
    def put_proposal(self, proposal_id: str, payload: str, expires_at: dt.datetime) -> None:
        key = self._k("p", proposal_id)
        life = max(0.0, expires_at.timestamp() - wall_clock()) + GRACE_SECONDS
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"payload": payload, "x": _ts(expires_at)})
            pipe.pexpire(key, int(life * 1000))
            pipe.zadd(self._k("px"), {proposal_id: expires_at.timestamp()})
            pipe.execute()

    @_unavailable_on_error
    def get_proposal(self, proposal_id: str, now: dt.datetime) -> str | None:
        payload, x = cast("list[bytes | None]", self.r.hmget(self._k("p", proposal_id), ["payload", "x"]))
        if payload is None or x is None or float(x) <= now.timestamp():
            return None
        return _s(payload)

    # -- idempotency -------------------------------------------------------------------------
    @_unavailable_on_error
    def idempotency_begin(
        self, client: str, key: str, operation: str, body_hash: str, now: dt.datetime
    ) -> StoredResponse | None:
        """None: go ahead (the key is now reserved by this process). A StoredResponse: replay it."""
        result = self._idem_begin(
            keys=[self._idem_key(client, key), self._k("owners")],
            args=[operation, body_hash, _ts(now), self.owner, self.lease_seconds, RETENTION_SECONDS],
        )
        if result[0] == 1:
            raise IdempotencyMismatch(f"Idempotency-Key {key!r} was already used with a different request")
        if result[0] == 2:
            return StoredResponse(int(result[1]), _s(result[2]) or "", bytes(result[3]))
        if result[0] == 3:
            raise IdempotencyInProgress(f"a request with Idempotency-Key {key!r} is still being processed")
        return None

    @_unavailable_on_error
    def idempotency_finish(self, client: str, key: str, response: StoredResponse | None) -> None:
        args: list[Any] = [] if response is None else [response.status, response.media_type, response.body]
        self._idem_finish(keys=[self._idem_key(client, key)], args=args)

    # -- calendar version ----------------------------------------------------------------------
    @_unavailable_on_error
    def calendar_version(self) -> int:
        value = cast("bytes | None", self.r.get(self._k("calendar")))
        return int(value) if value is not None else 0

    @_unavailable_on_error
    def bump_calendar_version(self) -> None:
        self._bump(CALENDAR)

    # -- signing secret ------------------------------------------------------------------------
    @_unavailable_on_error
    def shared_secret(self) -> bytes:
        """The signing secret every replica on this store uses (created once, by whoever comes first)."""
        self.r.set(self._k("secret"), secrets.token_urlsafe(32), nx=True)
        value = cast("bytes | None", self.r.get(self._k("secret")))
        assert value is not None  # set just above unless someone else did
        return bytes(value)

    # -- booking journal -----------------------------------------------------------------------
    def _entry(self, token: str, r: list[Any]) -> JournalEntry:
        client, rk, payload, state, appt, owner, created, updated = r
        return JournalEntry(
            token,
            json.loads(client),
            json.loads(rk),
            json.loads(payload),
            _s(state) or "",
            _s(appt) if appt else None,
            _s(owner) if owner else None,
            _dt(created),
            _dt(updated),
        )

    @_unavailable_on_error
    def journal_get(self, token: str) -> JournalEntry | None:
        r = cast(
            "list[bytes | None]",
            self.r.hmget(
                self._k("j", token), ["client", "rk", "payload", "state", "appt", "owner", "created", "updated"]
            ),
        )
        return self._entry(token, r) if r[3] is not None else None

    def _intent_args(
        self,
        token: str,
        client: str | None,
        request_key: str | None,
        payload: dict[str, Any],
        now: dt.datetime,
        fallback: tuple[str, Interval, tuple[str, ...]] | None = None,
    ) -> list[Any]:
        try:
            occupied: tuple[str, Interval, tuple[str, ...]] | None = in_flight(payload)
        except (KeyError, TypeError, ValueError):
            # Not the booking of a slot as the SQLite store reads one: what the caller says it books, if anything.
            occupied = fallback
        occupies: list[Any] = ["", "", "", "[]"]
        if occupied is not None:
            prac, span, pats = occupied
            occupies = [prac, _ts(span.start), _ts(span.end), json.dumps(list(pats))]
        return [
            self.prefix,
            token,
            _client_json(client),
            json.dumps(request_key),
            json.dumps(payload),
            self.owner,
            _ts(now),
            *occupies,
        ]

    def _journal_keys(self, token: str) -> list[str]:
        return [self._k("j", token), self._k("ji"), self._k("jis")]

    @_unavailable_on_error
    def journal_intent(
        self, token: str, *, client: str | None, request_key: str | None, payload: dict[str, Any], now: dt.datetime
    ) -> None:
        self._intent(keys=self._journal_keys(token), args=self._intent_args(token, client, request_key, payload, now))

    @_unavailable_on_error
    def intents_overlapping(self, window: Interval) -> list[tuple[str, Interval, tuple[str, ...]]]:
        """Bookings in flight overlapping ``window``: (practitioner, interval, patients), as in the SQLite store."""
        flat = cast(
            "list[bytes]",
            self._intents(keys=[self._k("jis")], args=[self.prefix, _ts(window.start), _ts(window.end)]),
        )
        return [
            (
                _s(flat[i]) or "",
                Interval(_dt(flat[i + 1]), _dt(flat[i + 2])),
                tuple(str(p) for p in json.loads(flat[i + 3])),
            )
            for i in range(0, len(flat), 4)
        ]

    @_unavailable_on_error
    def journal_intent_exclusive(
        self,
        token: str,
        *,
        client: str | None,
        request_key: str | None,
        payload: dict[str, Any],
        now: dt.datetime,
        practitioner_id: str,
        patient_ids: Iterable[str],
        interval: Interval,
    ) -> None:
        """``journal_intent`` for a backend that cannot lock (see the SQLite store): ONE script refuses
        (``HoldConflict``) a foreign hold or another booking in flight overlapping the practitioner's or a
        patient's time, else records the intent, so two replicas can never both pass."""
        pats = sorted({str(p) for p in patient_ids})
        result = cast(
            "list[Any]",
            self._intent_exclusive(
                keys=[*self._journal_keys(token), self._k("hp", practitioner_id)],
                args=[
                    *self._intent_args(
                        token, client, request_key, payload, now, (practitioner_id, interval, tuple(pats))
                    ),
                    practitioner_id,
                    _ts(interval.start),
                    _ts(interval.end),
                    json.dumps(pats),
                    _client_json(client),
                ],
            ),
        )
        if result[0] == 1:
            raise HoldConflict(practitioner_id, Interval(_dt(result[1]), _dt(result[2])))
        if result[0] == 2:
            raise HoldConflict(_s(result[1]) or "", Interval(_dt(result[2]), _dt(result[3])), patient_id=_s(result[4]))

    @_unavailable_on_error
    def journal_done(self, token: str, appointment_id: str, now: dt.datetime, *, release_hold: bool) -> None:
        self._done(
            keys=self._journal_keys(token),
            args=[
                self.prefix,
                token,
                appointment_id,
                self.owner,
                _ts(now),
                "1" if release_hold else "0",
                RETENTION_SECONDS,
            ],
        )
        if release_hold:
            self._bump(HOLDS)

    @_unavailable_on_error
    def journal_abandon(self, token: str, now: dt.datetime) -> None:
        self._abandon(keys=[self._k("j", token), self._k("ji")], args=[token, _ts(now)])

    @_unavailable_on_error
    def journal_drop(self, token: str) -> None:
        self._drop(keys=self._journal_keys(token), args=[token])

    def _claimed(self, flat: list[Any]) -> list[JournalEntry]:
        return [self._entry(_s(flat[i]) or "", flat[i + 1 : i + 9]) for i in range(0, len(flat), 9)]

    @_unavailable_on_error
    def journal_claim(self, token: str, now: dt.datetime) -> JournalEntry | None:
        flat = self._claim(
            keys=[self._k("ji"), self._k("owners")],
            args=[self.prefix, _ts(now), self.owner, self.lease_seconds, 1, token],
        )
        claimed = self._claimed(flat)
        return claimed[0] if claimed else None

    @_unavailable_on_error
    def journal_claim_stale(self, now: dt.datetime, limit: int = 100) -> list[JournalEntry]:
        flat = self._claim(
            keys=[self._k("ji"), self._k("owners")],
            args=[self.prefix, _ts(now), self.owner, self.lease_seconds, limit, ""],
        )
        return self._claimed(flat)

    def close(self) -> None:
        self.leases.stop()
        self._counters.close()
        try:
            self.r.hdel(self._k("owners"), self.owner)  # our leftovers are stale at once
        except redis.RedisError as exc:
            log.info("could not drop the owner lease (it runs out by itself): %s", exc)
        self.r.close()
