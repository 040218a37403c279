"""``RedisSiuStore``: the SIU inbox and mirror in Redis (``state.url = redis://...``), shared by every replica.

Any replica's MLLP listener acknowledges a message once Redis has it; any replica's applier may apply it; every
replica reads the same mirror.

* **Store with de-duplication** is one Lua script: ``SET NX`` of ``siu:seen:<sender>\\n<MSH-10>``, then the next
  inbox id (``INCR siu:seq``), the message hash ``siu:msg:<id>`` and the id appended to the ``siu:waiting`` list.
  Redis runs a script without interleaving other commands, so two replicas receiving the same resend store it once.
* **Durability**: Redis answers a write once it is in memory. That the ACK never precedes durability then rests on
  Redis persistence: ``appendonly yes`` keeps acknowledged messages across a Redis restart, ``appendfsync always``
  also across a power failure (``everysec``, the default, may lose the last second). The store reads
  ``CONFIG GET appendonly``/``appendfsync`` when it opens and logs a warning when they promise less (it does not
  refuse: managed Redis services often disable ``CONFIG``).
* **Claims** (a list with a visibility timeout, in Lua): a claim moves ids from ``siu:waiting`` to the sorted set
  ``siu:claimed`` scored by the claim's deadline (Redis server time, so replicas' clocks do not matter) and writes
  the batch's token into each message hash. Claims whose deadline passed (their applier died) are handed out again
  first. Committing a batch is one script that checks, message by message, that the batch still holds the claim
  before it writes the mirror and marks the message: a batch that outlived its claim changes nothing for that
  message, so two appliers never both apply one message. A batch left by an exception gives its messages back at
  once.
* **The mirror**: hash ``siu:appt:<filler id>``; sorted sets ``siu:ax:<kind>:<actor id>`` of filler ids by start
  (epoch seconds) for window queries, searched from the window start minus the longest appointment seen
  (``siu:maxdur``); set ``siu:pl:<placer id>``; set ``siu:appts`` of every filler id; hash ``siu:stale``
  (inbox id -> filler id, trigger, version). The version rule (``store.supersedes``: the newer version string
  wins, equal is stale) runs inside the commit script, comparing bytes (``bytes_le``), which is how Python
  compares these ASCII strings; ``tests/hl7v2/test_siu_store_redis.py`` checks both agree. An S17 leaves its
  appointment as a tombstone (status entered-in-error) whose version keeps a late S12 out.
* ``siu:n`` counts applied and failed messages (a message changes state once) and, under ``purged``, the applied
  messages ``purge_applied`` deleted, so counting is O(1): all messages are ``siu:seq`` minus ``purged``.
* **Retention**: each message hash keeps its receipt time twice, ``at`` (ISO text) and ``ts`` (epoch microseconds,
  the storing host's clock). Marking a message applied also adds its id to the sorted set ``siu:applied`` scored by
  ``ts``, so ``purge_applied`` finds the oldest applied messages with one ``ZRANGEBYSCORE`` and deletes them, with
  their ``siu:seen`` keys and ``siu:stale`` entries, in one script (nothing waiting or claimed is in that set).
  Data written before retention existed: a message still waiting then has no ``ts`` and is scored by the time it is
  marked applied (kept a little longer); a message already applied or failed then is not in ``siu:applied`` and is
  never purged (it stays, counted, as before; delete such old ``siu:msg:<id>`` hashes by hand if they matter).

Keys are under the URL's ``key_prefix`` (default ``sched:``). The scripts compute keys from the prefix, which Redis
Cluster does not allow: a standalone server or a Sentinel-managed primary is what this store supports (as for the
scheduling state in Redis). Nothing has a TTL: applied messages go only through ``purge_applied``, the mirror stays.
Redis "cannot now" errors (unreachable, timed out, loading, a read-only replica) are raised as
``SiuStoreUnavailable``; the client reconnects on the next call.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar, cast

import redis
import redis.sentinel

from adapter.hl7v2.store import (
    APPLIED,
    FAILED,
    WAITING,
    ActorKind,
    ApplyResult,
    InboxMessage,
    MirroredAppointment,
    MirrorWrite,
    SiuStoreUnavailable,
    supersedes,
    utc_text,
)
from adapter.redis_connect import connect, split_url

log = logging.getLogger("adapter.hl7v2.store")

DEFAULT_VISIBILITY_SECONDS = 60.0
"""How long a claim is an applier's alone: a batch takes milliseconds; after this a crashed applier's messages
are claimed again."""

# Byte order of two strings. Lua's `<` on strings calls strcoll, i.e. follows the server's locale; the version
# rule is Python's str order, which for ASCII text is byte order.
BYTES_LE = """
local function bytes_le(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a <= #b
end
"""

# KEYS: siu:seen:<sender>\n<control id>, siu:seq, siu:waiting. ARGV: prefix, sender, control id, type,
# received_at (ISO), raw, received_at (epoch microseconds). Returns 1 stored, 0 duplicate.
_STORE = """
if not redis.call('SET', KEYS[1], '', 'NX') then return 0 end
local id = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], id)
redis.call('HSET', ARGV[1] .. 'siu:msg:' .. id, 'sender', ARGV[2], 'cid', ARGV[3], 'type', ARGV[4],
           'at', ARGV[5], 'raw', ARGV[6], 'state', '0', 'ts', ARGV[7])
redis.call('RPUSH', KEYS[3], id)
return 1
"""

# KEYS: siu:waiting, siu:claimed. ARGV: prefix, batch token, limit, visibility (ms). Claims whose deadline
# passed come first, then waiting ids in arrival order. Returns {id, raw, id, raw, ...}.
_CLAIM = """
-- TIME before writes: Redis < 5 replicates scripts verbatim unless told to replicate their effects.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, deadline = tonumber(ARGV[3]), now + tonumber(ARGV[4])
local out, n = {}, 0
local function take(id)
  local key = ARGV[1] .. 'siu:msg:' .. id
  local v = redis.call('HMGET', key, 'state', 'raw')
  if v[1] ~= '0' then redis.call('ZREM', KEYS[2], id) return end
  redis.call('HSET', key, 'owner', ARGV[2])
  redis.call('ZADD', KEYS[2], deadline, id)
  table.insert(out, id); table.insert(out, v[2])
  n = n + 1
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)) do take(id) end
while n < limit do
  local id = redis.call('LPOP', KEYS[1])
  if not id then break end
  take(id)
end
return out
"""

# Write one appointment into the mirror unless the stored version is as new or newer (then record it stale).
# `a` is the decoded JSON of ``_appointment_fields`` plus `score` (start, epoch seconds, absent without a start)
# and `dur` (seconds); the actor lists are JSON text, stored as they are.
_MIRROR_WRITE = (
    BYTES_LE
    + """
local ACTORS = {{'practitioner', 'prac'}, {'location', 'loc'}, {'patient', 'pat'}}
local function mirror_write(prefix, a, inbox_id, trigger)
  local key = prefix .. 'siu:appt:' .. a.f
  local current = redis.call('HGET', key, 'v')
  if current and bytes_le(a.v, current) then
    redis.call('HSETNX', prefix .. 'siu:stale', inbox_id, cjson.encode({a.f, trigger, a.v}))
    return 'stale'
  end
  if current then
    local old = redis.call('HMGET', key, 'pl', 'prac', 'loc', 'pat')
    redis.call('SREM', prefix .. 'siu:pl:' .. old[1], a.f)
    for i, kind in ipairs(ACTORS) do
      for _, actor in ipairs(cjson.decode(old[i + 1])) do
        redis.call('ZREM', prefix .. 'siu:ax:' .. kind[1] .. ':' .. actor, a.f)
      end
    end
    redis.call('DEL', key)
  end
  local fields = {}
  for name, value in pairs(a) do
    if name ~= 'score' and name ~= 'dur' then
      table.insert(fields, name); table.insert(fields, value)
    end
  end
  redis.call('HSET', key, unpack(fields))
  redis.call('SADD', prefix .. 'siu:appts', a.f)
  redis.call('SADD', prefix .. 'siu:pl:' .. a.pl, a.f)
  if a.score then
    for _, kind in ipairs(ACTORS) do
      for _, actor in ipairs(cjson.decode(a[kind[2]])) do
        redis.call('ZADD', prefix .. 'siu:ax:' .. kind[1] .. ':' .. actor, a.score, a.f)
      end
    end
    if a.dur > tonumber(redis.call('GET', prefix .. 'siu:maxdur') or '0') then
      redis.call('SET', prefix .. 'siu:maxdur', a.dur)
    end
  end
  return 'applied'
end
"""
)

# KEYS: siu:claimed, siu:waiting, siu:n, siu:applied. ARGV: prefix, batch token, the batch's ids (JSON list, inbox
# order), ops (JSON list in call order: {w = inbox id, t = trigger, a = appointment} a mirror write, {m = inbox id,
# s = 1 or 2, e = error} a mark), now (epoch microseconds: the retention score of a message stored without ``ts``).
# An applied message joins siu:applied scored by its receipt time. A write or mark of a message this batch no longer holds is skipped; claimed
# messages left unmarked go back to the front of the waiting list. Returns each write's result, in order
# ('lost' for a skipped one).
_COMMIT = (
    _MIRROR_WRITE
    + """
local prefix, token = ARGV[1], ARGV[2]
local mine = {}
for _, id in ipairs(cjson.decode(ARGV[3])) do
  local key = prefix .. 'siu:msg:' .. id
  local v = redis.call('HMGET', key, 'state', 'owner')
  mine[tostring(id)] = v[1] == '0' and v[2] == token
end
local results = {}
for _, op in ipairs(cjson.decode(ARGV[4])) do
  if op.w then
    local id = tostring(op.w)
    if mine[id] == false then
      table.insert(results, 'lost')
    else
      table.insert(results, mirror_write(prefix, op.a, id, op.t))
    end
  else
    local id = tostring(op.m)
    if mine[id] then
      local key = prefix .. 'siu:msg:' .. id
      redis.call('HSET', key, 'state', op.s)
      if op.e then redis.call('HSET', key, 'error', op.e) end
      redis.call('HDEL', key, 'owner')
      redis.call('ZREM', KEYS[1], id)
      redis.call('HINCRBY', KEYS[3], op.s, 1)
      if tostring(op.s) == '1' then
        redis.call('ZADD', KEYS[4], redis.call('HGET', key, 'ts') or ARGV[5], id)
      end
      mine[id] = nil
    end
  end
end
local back = cjson.decode(ARGV[3])
for i = #back, 1, -1 do
  local id = tostring(back[i])
  if mine[id] then
    redis.call('HDEL', prefix .. 'siu:msg:' .. id, 'owner')
    redis.call('ZREM', KEYS[1], id)
    redis.call('LPUSH', KEYS[2], id)
  end
end
return results
"""
)

# KEYS: siu:claimed, siu:waiting. ARGV: prefix, batch token, the batch's ids (JSON list, inbox order).
# The batch failed: what it still holds goes back to the front of the waiting list, in order.
_GIVE_BACK = """
local ids = cjson.decode(ARGV[3])
for i = #ids, 1, -1 do
  local id = tostring(ids[i])
  local key = ARGV[1] .. 'siu:msg:' .. id
  local v = redis.call('HMGET', key, 'state', 'owner')
  if v[1] == '0' and v[2] == ARGV[2] then
    redis.call('HDEL', key, 'owner')
    redis.call('ZREM', KEYS[1], id)
    redis.call('LPUSH', KEYS[2], id)
  end
end
return 0
"""

# KEYS: siu:applied, siu:n, siu:stale. ARGV: prefix, before (epoch microseconds, exclusive), limit. Deletes the
# oldest applied messages received before ``before`` with their de-duplication keys (only the one naming this
# message) and stale records; returns how many.
_PURGE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local n = 0
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local key = ARGV[1] .. 'siu:msg:' .. id
  local v = redis.call('HMGET', key, 'state', 'sender', 'cid')
  if v[1] == '1' then
    local seen = ARGV[1] .. 'siu:seen:' .. v[2] .. '\\n' .. v[3]
    if redis.call('GET', seen) == id then redis.call('DEL', seen) end
    redis.call('DEL', key)
    redis.call('HDEL', KEYS[3], id)
    n = n + 1
  end
end
if n > 0 then
  redis.call('HINCRBY', KEYS[2], '1', -n)
  redis.call('HINCRBY', KEYS[2], 'purged', n)
end
return n
"""

# ARGV: prefix, appointment (JSON), trigger, inbox id. A write outside any batch (a confirmed SRR).
_RECORD = _MIRROR_WRITE + "return mirror_write(ARGV[1], cjson.decode(ARGV[2]), ARGV[4], ARGV[3])"

# KEYS: siu:ax:<kind>:<actor id>, siu:maxdur. ARGV: prefix, floor(window start), ceil(window end) (epoch
# seconds). Candidates by start, from the window start minus the longest appointment seen to the window end;
# returns their hashes (HGETALL replies), the caller keeps the exact overlaps.
_FOR_ACTOR = """
local lo = tonumber(ARGV[2]) - tonumber(redis.call('GET', KEYS[2]) or '0') - 1
local out = {}
for _, fid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], lo, '(' .. ARGV[3])) do
  table.insert(out, redis.call('HGETALL', ARGV[1] .. 'siu:appt:' .. fid))
end
return out
"""

# KEYS: siu:pl:<placer id>. ARGV: prefix.
_BY_PLACER = """
local out = {}
for _, fid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  table.insert(out, redis.call('HGETALL', ARGV[1] .. 'siu:appt:' .. fid))
end
return out
"""


P = ParamSpec("P")
T = TypeVar("T")

# Redis "cannot now": unreachable, timed out, loading its data, a read-only replica after a failover.
_UNAVAILABLE = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    redis.ReadOnlyError,
    redis.sentinel.MasterNotFoundError,
)


@contextmanager
def _unavailable() -> Iterator[None]:
    try:
        yield
    except _UNAVAILABLE as exc:
        raise SiuStoreUnavailable(f"the SIU store (Redis) is not available: {exc}") from exc


def _guarded(method: Callable[P, T]) -> Callable[P, T]:
    """Redis "cannot now" errors become ``SiuStoreUnavailable`` (the listener then sends no ACK)."""

    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
        with _unavailable():
            return method(*args, **kwargs)

    return guarded


def persistence_problem(client: redis.Redis) -> str | None:
    """What Redis's persistence settings leave of store-before-ACK, or None if acknowledged means on disk.

    None too when the settings cannot be read (``CONFIG`` disabled or renamed): then nothing is known.
    """
    try:
        aof = cast("dict[bytes | str, bytes | str]", client.config_get("appendonly"))
        fsync = cast("dict[bytes | str, bytes | str]", client.config_get("appendfsync"))
    except redis.ResponseError as exc:
        log.info("SIU inbox on Redis: cannot read its persistence settings (%s); make sure appendonly is on", exc)
        return None

    def value(reply: dict[bytes | str, bytes | str], name: str) -> str:
        raw = reply.get(name, reply.get(name.encode(), b""))
        return raw.decode() if isinstance(raw, bytes) else raw

    if value(aof, "appendonly") != "yes":
        return (
            "Redis runs with appendonly no: SIU messages acknowledged since the last snapshot are lost if Redis "
            "restarts (set appendonly yes, and appendfsync always to survive a power failure)"
        )
    if value(fsync, "appendfsync") != "always":
        return (
            f"Redis runs with appendfsync {value(fsync, 'appendfsync')}: a power failure or OS crash may lose the "
            "SIU messages acknowledged in the last second (appendfsync always closes that window)"
        )
    return None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_us(moment: datetime) -> int:
    """A moment as whole microseconds since the epoch: the retention score (exact in a Redis score, a double)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _dedup(ids: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(ids))


def _appointment_fields(write: MirrorWrite) -> dict[str, Any]:
    """The hash fields of one mirrored appointment (absent: None), plus the index data ``score`` and ``dur``."""
    a = write.appointment
    fields: dict[str, Any] = {
        "f": a.filler_id,
        "pl": a.placer_id,
        "ls": a.legacy_status,
        "sv": a.service,
        "rs": a.reason,
        "pf": a.patient_family,
        "pg": a.patient_given,
        "v": a.version,
        "tr": a.last_trigger,
        "cid": a.last_control_id,
        "snd": a.sender,
        "raw": write.raw,
        "prac": json.dumps(_dedup(a.practitioner_ids)),
        "loc": json.dumps(_dedup(a.location_ids)),
        "pat": json.dumps(_dedup(a.patient_ids)),
    }
    optional = {
        "st": a.status,
        "sr": a.status_reason,
        "su": utc_text(a.start),
        "eu": utc_text(a.end),
        "sl": a.start.isoformat() if a.start else None,
        "el": a.end.isoformat() if a.end else None,
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    if a.start is not None:
        fields["score"] = math.floor(a.start.timestamp())
        fields["dur"] = max(0, math.ceil((a.end - a.start).total_seconds())) if a.end is not None else 0
    return fields


def _text(fields: dict[bytes, bytes], name: str) -> str | None:
    value = fields.get(name.encode())
    return None if value is None else value.decode("utf-8")


def _appointment(reply: Sequence[bytes] | dict[bytes, bytes]) -> MirroredAppointment:
    """A mirrored appointment from its hash (an HGETALL reply: a dict, or a flat list from a script)."""
    fields = reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))

    def req(name: str) -> str:
        return _text(fields, name) or ""

    start, end = _text(fields, "sl"), _text(fields, "el")
    return MirroredAppointment(
        filler_id=req("f"),
        placer_id=req("pl"),
        status=_text(fields, "st"),
        legacy_status=req("ls"),
        status_reason=_text(fields, "sr"),
        start=datetime.fromisoformat(start) if start else None,
        end=datetime.fromisoformat(end) if end else None,
        service=req("sv"),
        reason=req("rs"),
        patient_family=req("pf"),
        patient_given=req("pg"),
        version=req("v"),
        last_trigger=req("tr"),
        last_control_id=req("cid"),
        sender=req("snd"),
        practitioner_ids=tuple(json.loads(req("prac") or "[]")),
        location_ids=tuple(json.loads(req("loc") or "[]")),
        patient_ids=tuple(json.loads(req("pat") or "[]")),
    )


class _RedisBatch:
    """Claimed messages and what the applier did with them, sent to Redis as one script when the batch ends.

    ``apply`` answers before that script runs, from the stored version (and the writes earlier in the batch):
    versions only grow, so "stale" is final; "applied" may turn out stale if another replica wrote a newer version
    of the same appointment meanwhile, which the commit script then records (the mirror is right either way).
    """

    def __init__(self, store: RedisSiuStore, token: str, messages: list[InboxMessage]) -> None:
        self.store = store
        self.token = token
        self.messages: Sequence[InboxMessage] = messages
        self.ops: list[dict[str, Any]] = []
        self._versions: dict[str, str] = {}

    def apply(self, write: MirrorWrite) -> ApplyResult:
        a = write.appointment
        stored = self._versions.get(a.filler_id)
        if stored is None:
            stored = self.store._stored_version(a.filler_id)
        self.ops.append({"w": str(write.inbox_id), "t": a.last_trigger, "a": _appointment_fields(write)})
        if not supersedes(a.version, stored):
            return "stale"
        self._versions[a.filler_id] = a.version
        return "applied"

    def mark_applied(self, inbox_id: int) -> None:
        self.ops.append({"m": str(inbox_id), "s": str(APPLIED)})

    def mark_failed(self, inbox_id: int, error: str) -> None:
        self.ops.append({"m": str(inbox_id), "s": str(FAILED), "e": error})


class RedisSiuStore:
    """``SiuStore`` in Redis (see the module docstring). Blocking: call it from worker threads."""

    def __init__(
        self, url: str, *, timeout_s: float = 30.0, visibility_seconds: float = DEFAULT_VISIBILITY_SECONDS
    ) -> None:
        plain, self.prefix = split_url(url)
        self.url = url
        self.visibility_ms = int(visibility_seconds * 1000)
        self.r = connect(plain, timeout_s)
        # Batch tokens: unique per process and batch, so two batches (threads, replicas) never share a claim.
        self._claimant = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._batches = 0
        self._batches_lock = threading.Lock()
        self._store = self.r.register_script(_STORE)
        self._claim = self.r.register_script(_CLAIM)
        self._commit = self.r.register_script(_COMMIT)
        self._give_back = self.r.register_script(_GIVE_BACK)
        self._purge = self.r.register_script(_PURGE)
        self._record = self.r.register_script(_RECORD)
        self._for_actor = self.r.register_script(_FOR_ACTOR)
        self._by_placer = self.r.register_script(_BY_PLACER)
        self.persistence_warning: str | None = None
        try:
            self.persistence_warning = persistence_problem(self.r)
        except redis.RedisError as exc:  # not reachable yet: the first store_message says so loudly enough
            log.info("SIU inbox on Redis: persistence settings not checked (%s)", exc)
        if self.persistence_warning:
            log.warning("SIU inbox on Redis: %s", self.persistence_warning)

    def _k(self, name: str) -> str:
        return f"{self.prefix}siu:{name}"

    @_guarded
    def _stored_version(self, filler_id: str) -> str | None:
        version = cast("bytes | None", self.r.hget(self._k(f"appt:{filler_id}"), "v"))
        return None if version is None else version.decode("ascii")

    # --- the inbox ---------------------------------------------------------------------------------------------
    @_guarded
    def store_message(self, sender: str, control_id: str, message_type: str, raw: bytes) -> bool:
        now = datetime.now(UTC)
        new = self._store(
            keys=[self._k(f"seen:{sender}\n{control_id}"), self._k("seq"), self._k("waiting")],
            args=[self.prefix, sender, control_id, message_type, now.isoformat(), raw, epoch_us(now)],
        )
        return bool(new)

    @_guarded
    def count_messages(self, state: int | None = None) -> int:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.get(self._k("seq"))
            pipe.hmget(self._k("n"), [str(APPLIED), str(FAILED), "purged"])
            seq_raw, (applied_raw, failed_raw, purged_raw) = pipe.execute()
        seq, applied, failed, purged = (int(x or 0) for x in (seq_raw, applied_raw, failed_raw, purged_raw))
        total = seq - purged
        if state is None:
            return total
        return {WAITING: total - applied - failed, APPLIED: applied, FAILED: failed}.get(state, 0)

    @_guarded
    def purge_applied(self, before: datetime, limit: int) -> int:
        return int(
            self._purge(
                keys=[self._k("applied"), self._k("n"), self._k("stale")],
                args=[self.prefix, epoch_us(before), limit],
            )
        )

    # --- the applier -------------------------------------------------------------------------------------------
    def _token(self) -> str:
        with self._batches_lock:
            self._batches += 1
            return f"{self._claimant}:{self._batches}"

    @contextmanager
    def claim(self, limit: int) -> Iterator[_RedisBatch]:
        token = self._token()
        with _unavailable():
            flat = cast(
                "list[bytes]",
                self._claim(
                    keys=[self._k("waiting"), self._k("claimed")],
                    args=[self.prefix, token, limit, self.visibility_ms],
                ),
            )
        messages = sorted(
            (InboxMessage(int(flat[i]), bytes(flat[i + 1])) for i in range(0, len(flat), 2)),
            key=lambda m: m.inbox_id,
        )
        batch = _RedisBatch(self, token, messages)
        if not messages:
            yield batch
            return
        ids = json.dumps([str(m.inbox_id) for m in messages])
        try:
            yield batch
        except BaseException:
            try:
                self._give_back(keys=[self._k("claimed"), self._k("waiting")], args=[self.prefix, token, ids])
            except redis.RedisError as exc:  # the claims run out by themselves
                log.warning("SIU inbox on Redis: could not give back a failed batch's claims: %s", exc)
            raise
        with _unavailable():  # the claims, still held, run out: the messages are claimed again later
            results = self._commit(
                keys=[self._k("claimed"), self._k("waiting"), self._k("n"), self._k("applied")],
                args=[self.prefix, token, ids, json.dumps(batch.ops), epoch_us(datetime.now(UTC))],
            )
        if b"lost" in results:
            log.warning(
                "SIU inbox on Redis: a batch outlived its claims (%d ms); another applier took its messages",
                self.visibility_ms,
            )

    @_guarded
    def record(self, write: MirrorWrite) -> ApplyResult:
        result = self._record(
            args=[
                self.prefix,
                json.dumps(_appointment_fields(write)),
                write.appointment.last_trigger,
                str(write.inbox_id),
            ]
        )
        return cast("ApplyResult", result.decode())

    # --- the mirror's reads ------------------------------------------------------------------------------------
    @_guarded
    def by_filler_id(self, filler_id: str) -> MirroredAppointment | None:
        fields = cast("dict[bytes, bytes]", self.r.hgetall(self._k(f"appt:{filler_id}")))
        return _appointment(fields) if fields else None

    @_guarded
    def by_placer_id(self, placer_id: str) -> list[MirroredAppointment]:
        replies = self._by_placer(keys=[self._k(f"pl:{placer_id}")], args=[self.prefix])
        return [_appointment(r) for r in replies if r]

    @_guarded
    def for_actor(
        self,
        kind: ActorKind,
        actor_id: str,
        start: datetime,
        end: datetime,
        *,
        statuses: frozenset[str] | None = None,
    ) -> list[MirroredAppointment]:
        replies = self._for_actor(
            keys=[self._k(f"ax:{kind}:{actor_id}"), self._k("maxdur")],
            args=[self.prefix, math.floor(start.timestamp()), math.ceil(end.timestamp())],
        )
        lo, hi = utc_text(start) or "", utc_text(end) or ""
        found: list[tuple[str, MirroredAppointment]] = []
        for reply in replies:
            if not reply:
                continue
            fields = dict(zip(reply[::2], reply[1::2], strict=True))
            su, eu = _text(fields, "su"), _text(fields, "eu")
            if su is not None and eu is not None and su < hi and eu > lo:
                found.append((su, _appointment(fields)))
        found.sort(key=lambda pair: pair[0])
        out = [a for _, a in found]
        if statuses is not None:
            out = [a for a in out if a.status in statuses]
        return out

    @_guarded
    def all_appointments(self) -> list[MirroredAppointment]:
        out: list[MirroredAppointment] = []
        chunk: list[str] = []

        def load() -> None:
            with self.r.pipeline(transaction=False) as pipe:
                for fid in chunk:
                    pipe.hgetall(self._k(f"appt:{fid}"))
                out.extend(_appointment(f) for f in pipe.execute() if f)
            chunk.clear()

        for member in self.r.sscan_iter(self._k("appts"), count=1000):
            chunk.append(cast("bytes", member).decode("utf-8"))
            if len(chunk) >= 500:
                load()
        if chunk:
            load()
        return out

    @_guarded
    def patient_names(self) -> dict[str, tuple[str, str]]:
        names: dict[str, tuple[str, str]] = {}
        for a in sorted(self.all_appointments(), key=lambda a: a.version):
            for pid in a.patient_ids:
                names[pid] = (a.patient_family, a.patient_given)
        return names

    @_guarded
    def count(self) -> int:
        return int(cast("int", self.r.scard(self._k("appts"))))

    @_guarded
    def stale_count(self) -> int:
        return int(cast("int", self.r.hlen(self._k("stale"))))

    def close(self) -> None:
        # The connection pool reconnects on the next call, so the store stays usable.
        self.r.close()
