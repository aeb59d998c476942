"""The job model and every Redis operation on jobs, for both sides.

Lifecycle: queued → running → succeeded | failed | cancelled | expired.
A job is a hash (spec, status, owner, attempts, worker, timings, result, the
inbox of the API pod that submitted it) plus a log (list of events, index = seq).
Live events are published twice: to the submitting pod's inbox (prefixed by the
job id) and to the job's own channel, for readers that resume it elsewhere. The
stream entry that delivers it to a worker carries its id and, when it is the
job's first entry, its spec (a worker starts the engine on it without waiting
for the start script's reply).

Writes that must not race are Lua scripts: a worker's emit is fenced by the
job's ``worker`` and ``attempts`` fields, so a worker whose job was taken over
(or cancelled) can no longer write to it, and a log never holds a duplicate.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from enum import StrEnum
from typing import Any, Literal, NamedTuple

import orjson
from pydantic import BaseModel, Field
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.events import Event, error_payload
from shared.keys import GROUP, PRIORITIES, Keys

# What "Redis is unreachable" looks like, from redis-py or the socket under it.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError)


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    expired = "expired"


TERMINAL = {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.expired}
Priority = Literal["high", "normal", "low"]


class Sampling(BaseModel):
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None


class JobSpec(BaseModel):
    """What the API enqueues and a worker runs."""

    id: str = Field(default_factory=lambda: new_job_id())
    model: str
    kind: Literal["chat", "completion"]
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[int] | None = None
    sampling: Sampling = Field(default_factory=Sampling)
    owner: str = ""  # hash of the API key that made it; "" when auth is off
    priority: Priority = "normal"
    deadline: float | None = None  # epoch seconds; still queued past it → expired
    created_at: float = Field(default_factory=time.time)
    webhook: dict[str, Any] | None = None


class Entry(NamedTuple):
    """A stream entry delivered to a worker; ``spec`` (JSON) only on the job's first entry."""

    stream: str
    entry: str
    job_id: str
    spec: bytes | None = None


class Started(NamedTuple):
    """The start script's verdict: ``attempt`` 0 = do not run (``status`` says why)."""

    attempt: int
    status: str
    log_len: int  # events already logged
    spec: JobSpec | None  # None unless the attempt may run and the spec was asked for


def new_job_id() -> str:
    return "job-" + secrets.token_urlsafe(18)  # 144 random bits: unguessable


# ─── Lua scripts ────────────────────────────────────────────────────────────
# A model's queue over its streams KEYS[first..]: lag (not yet delivered to the group ARGV[2])
# and pending (delivered, not acked). A stream the group never read counts whole.
_QUEUE_STATE_FN = """
local function queue_state(first, group)
  local depth, pending = 0, 0
  for i = first, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      local length = redis.call('XLEN', KEYS[i])
      local counted = false
      for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[i])) do
        local f = {}
        for j = 1, #g, 2 do f[g[j]] = g[j + 1] end
        if f['name'] == group then
          counted = true
          pending = pending + f['pending']
          if f['lag'] then depth = depth + f['lag'] else depth = depth + math.max(0, length - f['pending']) end
        end
      end
      if not counted then depth = depth + length end
    end
  end
  return depth, pending
end
"""

# KEYS: a model's streams. ARGV: group. Returns {depth, pending}.
_QUEUE_STATE = _QUEUE_STATE_FN + """
return {queue_state(1, ARGV[1])}
"""

# KEYS: job hash, its stream, models set, owner's listing, then all the model's streams
# ARGV: max depth, group, model, job id, created_at, listing cutoff, spec, then the hash's field/value
# pairs. Returns {1 if enqueued else 0, the queue's depth before}.
_ENQUEUE = _QUEUE_STATE_FN + """
local depth = queue_state(5, ARGV[2])
if depth >= tonumber(ARGV[1]) then return {0, depth} end
redis.call('HSET', KEYS[1], 'spec', ARGV[7], unpack(ARGV, 8))
redis.call('XADD', KEYS[2], '*', 'id', ARGV[4], 'spec', ARGV[7])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[6])
return {1, depth}
"""

_READ = """
-- KEYS: a model's streams in the order to read them. ARGV: group, consumer, how many entries.
-- Reads each stream in turn (XREADGROUP >, no blocking) until enough were found: one round trip.
-- Returns {stream, entry id, job id, spec or ''} each.
local want, out = tonumber(ARGV[3]), {}
for _, stream in ipairs(KEYS) do
  if want <= 0 then break end
  local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', want, 'STREAMS', stream, '>')
  if reply then
    for _, item in ipairs(reply[1][2]) do
      local fields, f = item[2], {}
      for j = 1, #fields, 2 do f[fields[j]] = fields[j + 1] end
      if f['id'] then table.insert(out, {stream, item[1], f['id'], f['spec'] or ''}) end
      want = want - 1
    end
  end
end
return out
"""

# KEYS[1] job hash, KEYS[2] log. ARGV[1] worker, ARGV[2] now, ARGV[3] max attempts, ARGV[4] '1' to
# return the spec. Returns {attempt, status, log length, spec?}; attempt 0 = do not run (status says why).
_START = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {0, 'missing', 0} end
if st ~= 'queued' and st ~= 'running' then return {0, st, 0} end
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if n > tonumber(ARGV[3]) then return {0, 'exhausted', n} end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1])
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[2])
local n_log = redis.call('LLEN', KEYS[2])
if ARGV[4] ~= '1' then return {n, 'running', n_log} end
return {n, 'running', n_log, redis.call('HGET', KEYS[1], 'spec')}
"""

# Publishes live events to the job's channel and, prefixed by the job id, to the inbox of the
# API pod that submitted it (the hash's reply_to).
_PUBLISH_FN = """
local function publish(reply_to, channel, job_id, payload)
  redis.call('PUBLISH', channel, payload)
  if reply_to then redis.call('PUBLISH', reply_to, job_id .. '\\n' .. payload) end
end
"""

# KEYS[1] job, KEYS[2] log. ARGV[1] worker, ARGV[2] attempt, ARGV[3] channel,
# ARGV[4] first seq, ARGV[5] now, ARGV[6] job id, ARGV[7..] encoded events.
# 1 = written; 0 = fenced off (job taken over, cancelled or gone).
_EMIT = _PUBLISH_FN + """
local h = redis.call('HMGET', KEYS[1], 'worker', 'attempts', 'status', 'reply_to')
if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] or h[3] ~= 'running' then return 0 end
if redis.call('LLEN', KEYS[2]) ~= tonumber(ARGV[4]) then return 0 end
if tonumber(ARGV[4]) == 0 then redis.call('HSETNX', KEYS[1], 'first_token_at', ARGV[5]) end
local events = {}
for i = 7, #ARGV do
  redis.call('RPUSH', KEYS[2], ARGV[i])
  events[#events + 1] = ARGV[i]
end
publish(h[4], ARGV[3], ARGV[6], table.concat(events, '\\n'))
return 1
"""

# KEYS[1] job, KEYS[2] log. ARGV[1] worker ('' = anyone: API cancel, dead letter),
# ARGV[2] attempt, ARGV[3] channel, ARGV[4] ttl, ARGV[5] status, ARGV[6] now,
# ARGV[7] json of hash fields to set, ARGV[8] final event json without seq, ARGV[9] the seq the
# writer expects its terminal event to get (-1: any), ARGV[10] job id; a worker's finish also
# has KEYS[3] the job's stream, ARGV[11] group, ARGV[12] its entry, acked and deleted with it.
# Appends the terminal event with the next seq, sets the status, starts the TTL. A worker's
# finish after a lost emit is refused: no gap, ever.
_FINISH = _PUBLISH_FN + """
local h = redis.call('HMGET', KEYS[1], 'worker', 'attempts', 'status', 'reply_to')
if not h[3] then return 0 end
if h[3] ~= 'queued' and h[3] ~= 'running' then return 0 end
if ARGV[1] ~= '' and (h[1] ~= ARGV[1] or h[2] ~= ARGV[2]) then return 0 end
local n = redis.call('LLEN', KEYS[2])
if tonumber(ARGV[9]) >= 0 and n ~= tonumber(ARGV[9]) then return 0 end
local ev = cjson.decode(ARGV[8])
ev['seq'] = n
local raw = cjson.encode(ev)
redis.call('RPUSH', KEYS[2], raw)
publish(h[4], ARGV[3], ARGV[10], raw)
redis.call('HSET', KEYS[1], 'status', ARGV[5], 'finished_at', ARGV[6])
for k, v in pairs(cjson.decode(ARGV[7])) do redis.call('HSET', KEYS[1], k, v) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
if KEYS[3] then
  redis.call('XACK', KEYS[3], ARGV[11], ARGV[12])
  redis.call('XDEL', KEYS[3], ARGV[12])
end
return 1
"""


class _Script:
    """A Lua script called by its SHA. Unlike redis-py's Script, a pipeline holding it does not
    cost a SCRIPT EXISTS round trip per execute: a NOSCRIPT error is handled by the caller."""

    def __init__(self, redis: Redis, source: str):
        self.redis, self.source = redis, source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: list[str], args: list[Any], client: Any = None) -> Any:
        if client is not None:  # a pipeline: queue it
            return client.evalsha(self.sha, len(keys), *keys, *args)
        try:
            return await self.redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.redis.script_load(self.source)
            return await self.redis.evalsha(self.sha, len(keys), *keys, *args)


class JobStore:
    def __init__(self, redis: Redis, keys: Keys, result_ttl: int = 86_400):
        self.redis = redis
        self.keys = keys
        self.result_ttl = result_ttl
        self._queue_state = _Script(redis, _QUEUE_STATE)
        self._enqueue = _Script(redis, _ENQUEUE)
        self._read = _Script(redis, _READ)
        self._start = _Script(redis, _START)
        self._emit = _Script(redis, _EMIT)
        self._finish = _Script(redis, _FINISH)

    async def load_scripts(self) -> None:
        """After a Redis restart the script cache is empty: load ours again."""
        for script in (self._queue_state, self._enqueue, self._read, self._start, self._emit, self._finish):
            await self.redis.script_load(script.source)

    # ── API side ──
    async def queue_state(self, model: str) -> dict[str, int]:
        """Lag (not yet delivered) and pending (delivered, not acked) over the model's lanes."""
        depth, pending = await self._queue_state(lanes(self.keys, model), [GROUP])
        return {"depth": int(depth), "pending": int(pending)}

    async def enqueue(self, spec: JobSpec, max_depth: int | None = None, reply_to: str = "") -> tuple[bool, int]:
        """Write the job hash and add it to its model's stream, atomically, unless the model's
        queue already holds ``max_depth`` waiting jobs: (enqueued, the queue's depth before).
        ``reply_to``: the submitting API pod's inbox, where workers publish the live events."""
        fields = {
            "id": spec.id,
            "status": JobStatus.queued,
            "model": spec.model,
            "owner": spec.owner,
            "attempts": 0,
            "created_at": spec.created_at,
        }
        if reply_to:
            fields["reply_to"] = reply_to
        keys = [self.keys.job(spec.id), self.keys.jobs(spec.model, spec.priority), self.keys.models,
                self.keys.owner_jobs(spec.owner or "_"), *lanes(self.keys, spec.model)]
        args: list[Any] = [max_depth or 1 << 62, GROUP, spec.model, spec.id, repr(spec.created_at),
                           repr(spec.created_at - self.result_ttl), spec.model_dump_json()]
        for name, value in fields.items():
            args += [name, value if isinstance(value, str) else repr(value)]
        added, depth = await self._enqueue(keys, args)
        return bool(added), int(depth)

    async def get(self, job_id: str) -> dict[str, str] | None:
        raw = await self.redis.hgetall(self.keys.job(job_id))
        return {k.decode(): v.decode() for k, v in raw.items()} if raw else None

    async def read_log(self, job_id: str, start: int = 0) -> list[Event]:
        raw = await self.redis.lrange(self.keys.log(job_id), start, -1)
        return [Event.decode(r) for r in raw]

    async def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; the worker hears it and frees the slot."""
        ok = await self.finish(job_id, JobStatus.cancelled, Event(0, finish_reason="cancelled"))
        if ok:
            await self.redis.publish(self.keys.cancel, job_id)
        return ok

    # ── worker side ──
    async def read(self, streams: list[str], consumer: str, count: int) -> list[Entry]:
        """Up to ``count`` new entries for ``consumer``, taken from ``streams`` in that order (no
        waiting)."""
        reply = await self._read(streams, [GROUP, consumer, count])
        return [Entry(stream.decode(), entry.decode(), job_id.decode(), spec or None)
                for stream, entry, job_id, spec in reply]

    async def start(self, job_id: str, worker: str, max_attempts: int,
                    with_spec: bool = True) -> Started:
        """Take the job for one attempt."""
        attempt, status, log_len, *spec = await self._start(
            keys=[self.keys.job(job_id), self.keys.log(job_id)],
            args=[worker, time.time(), max_attempts, "1" if with_spec else "0"],
        )
        status = status.decode() if isinstance(status, bytes) else status
        return Started(int(attempt), status, int(log_len), JobSpec.model_validate_json(spec[0]) if spec else None)

    async def emit(self, pipe: Any, job_id: str, worker: str, attempt: int, events: list[Event]) -> None:
        """Queue a fenced append of ``events`` on ``pipe`` (one engine step, pipelined)."""
        await self._emit(
            keys=[self.keys.job(job_id), self.keys.log(job_id)],
            args=[worker, attempt, self.keys.events(job_id), events[0].seq, time.time(), job_id,
                  *(e.encode() for e in events)],
            client=pipe,
        )

    async def finish(self, job_id: str, status: JobStatus, event: Event,
                     fields: dict[str, Any] | None = None, worker: str = "", attempt: int = 0,
                     expected_seq: int = -1, client: Any = None, entry: tuple[str, str] | None = None) -> bool:
        """Append the terminal event (seq assigned here; refused unless it is ``expected_seq``
        when that is given) and end the job; ``entry`` (stream, entry id): the worker's delivery,
        acked and deleted in the same script."""
        extra = dict(fields or {})
        if event.usage:
            extra["usage"] = orjson.dumps(event.usage).decode()
        if event.error:
            extra["error"] = orjson.dumps(event.error).decode()
        if event.finish_reason:
            extra["finish_reason"] = event.finish_reason
        final = orjson.loads(event.encode())
        final.pop("seq", None)
        keys = [self.keys.job(job_id), self.keys.log(job_id)]
        args = [worker, attempt, self.keys.events(job_id), self.result_ttl, str(status),
                time.time(), orjson.dumps(extra), orjson.dumps(final or {"finish_reason": "stop"}),
                expected_seq, job_id]
        if entry is not None:
            keys.append(entry[0])
            args += [GROUP, entry[1]]
        result = await self._finish(keys=keys, args=args, client=client)
        return bool(result)

    async def fail(self, job_id: str, message: str, *, type_: str = "server_error",
                   code: str | None = None, param: str | None = None, status_code: int = 500,
                   status: JobStatus = JobStatus.failed, worker: str = "", attempt: int = 0) -> bool:
        error = error_payload(message, type_, code, param, status_code)
        return await self.finish(job_id, status, Event(0, finish_reason="error", error=error),
                                 worker=worker, attempt=attempt)


async def ensure_group(redis: Redis, stream: str) -> None:
    """Create the consumer group (and the stream) if missing; idempotent."""
    try:
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except Exception as exc:  # BUSYGROUP: it exists
        if "BUSYGROUP" not in str(exc):
            raise


def lanes(keys: Keys, model: str) -> list[str]:
    """The streams of a model, highest priority first."""
    return [keys.jobs(model, p) for p in PRIORITIES]
