"""Live job events for every stream of one API process, over ONE pub/sub connection.

Each API process has an inbox channel, subscribed once at start-up: workers publish
the events of the jobs this process submitted there, prefixed by the job id.
``EventHub.attach(job_id)`` registers a reader for such a job before it is enqueued,
so a request costs no pub/sub command at all. ``EventHub.subscribe(job_id)`` is for
a job submitted elsewhere (a resumed stream): it subscribes to the job's own channel
and returns once Redis confirmed it. ``Subscription.events`` merges the live events
with the job's log: it replays from any ``seq``, fills gaps from the log, drops
duplicates, and polls the log when the channel is quiet, so a lost message or a
Redis restart never leaves a reader hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from shared.events import Event, error_payload
from shared.jobs import REDIS_DOWN, JobStore
from shared.keys import Keys

log = logging.getLogger("api.relay")
QUIET_POLL = 2.0  # seconds without a live event before the log is checked


class RedisUnavailable(Exception):
    pass


class Subscription:
    def __init__(self, hub: EventHub, job_id: str, direct: bool = False):
        self.hub, self.job_id, self.direct = hub, job_id, direct  # direct: fed from the inbox
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: the hub lost Redis
        self.arrived = asyncio.Event()

    def put(self, raw: bytes | None) -> None:
        self.queue.put_nowait(raw)
        self.arrived.set()

    async def close(self) -> None:
        await self.hub.unsubscribe(self)

    async def events(self, store: JobStore, after: int = -1) -> AsyncIterator[Event]:
        """Every event with seq > ``after``, in order, once each, through the terminal one."""
        async for batch in self.batches(store, after):
            for event in batch:
                yield event

    async def batches(self, store: JobStore, after: int = -1, replay: bool = True) -> AsyncIterator[list[Event]]:
        """Like ``events``, but as lists of what is available at once: a slow reader gets fewer, bigger writes.

        ``replay=False`` skips the first log read: for a job subscribed to before it was enqueued,
        the channel has everything (a gap still sends the reader to the log)."""
        next_seq = after + 1
        pending: list[Event] = await self._from_log(store, next_seq) if replay else []
        while True:
            ready: list[Event] = []
            for event in pending:
                if event.seq > next_seq:  # a gap: the log has what the channel lost
                    break
                if event.seq == next_seq:
                    ready.append(event)
                    next_seq += 1
                    if event.terminal:
                        yield ready
                        return
            if ready:
                yield ready
            pending = await self._next(store, next_seq)

    async def _next(self, store: JobStore, next_seq: int) -> list[Event]:
        if self.queue.empty():
            try:
                async with asyncio.timeout(QUIET_POLL):
                    await self.arrived.wait()
            except TimeoutError:
                return await self._from_log(store, next_seq)
        batch = []
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        self.arrived.clear()
        if None in batch:  # the channel broke: trust only the log
            return await self._from_log(store, next_seq)
        events = [Event.decode(line) for raw in batch if raw is not None for line in raw.split(b"\n")]
        if events and events[0].seq > next_seq:
            return await self._from_log(store, next_seq)
        return events

    async def _from_log(self, store: JobStore, start: int) -> list[Event]:
        for delay in (0.2, 0.5, 1.0, 2.0):
            try:
                return await store.read_log(self.job_id, start)
            except REDIS_DOWN as exc:
                log.warning("job %s: cannot read the log (%s)", self.job_id, exc)
                await asyncio.sleep(delay)
        error = error_payload("Lost the connection to Redis while streaming; the job goes on: "
                              "poll GET /v1/jobs/{id} or resume its events.", "server_error", "redis_unavailable",
                              status=503)
        return [Event(start, finish_reason="error", error=error)]


class EventHub:
    def __init__(self, redis: Redis, keys: Keys):
        self.redis, self.keys = redis, keys
        self.inbox = keys.inbox(f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
        self._inbox = self.inbox.encode()
        self._direct: dict[str, Subscription] = {}  # job id → reader of a job this process submitted
        self._subs: dict[str, set[Subscription]] = {}  # channel → subscriptions
        self._confirm: dict[str, asyncio.Future[None]] = {}
        self._pubsub: PubSub | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def attach(self, job_id: str, timeout: float = 5.0) -> Subscription:
        """A reader of a job this process is about to enqueue with ``reply_to=self.inbox``."""
        if not self._ready.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError as exc:
                raise RedisUnavailable("timed out waiting for the pub/sub connection") from exc
        sub = Subscription(self, job_id, direct=True)
        self._direct[job_id] = sub
        return sub

    async def subscribe(self, job_id: str, timeout: float = 5.0) -> Subscription:
        """Subscribe to the job's channel; returns once Redis confirmed it: no later event is missed."""
        channel = self.keys.events(job_id)
        sub = Subscription(self, job_id)
        first = channel not in self._subs
        self._subs.setdefault(channel, set()).add(sub)
        if not first:
            return sub
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
                assert self._pubsub is not None
                confirmed = self._confirm.setdefault(channel, asyncio.get_running_loop().create_future())
                await self._pubsub.subscribe(channel)
                await confirmed
        except REDIS_DOWN as exc:
            self._drop(channel, sub)
            raise RedisUnavailable(str(exc) or "timed out subscribing") from exc
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        if sub.direct:
            if self._direct.get(sub.job_id) is sub:
                del self._direct[sub.job_id]
            return
        channel = self.keys.events(sub.job_id)
        if self._drop(channel, sub) and self._pubsub is not None and self._ready.is_set():
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(channel)

    def _drop(self, channel: str, sub: Subscription) -> bool:
        """Forget ``sub``; True when it was the channel's last subscriber."""
        subs = self._subs.get(channel)
        if subs is None:
            return False
        subs.discard(sub)
        if subs:
            return False
        del self._subs[channel]
        self._confirm.pop(channel, None)
        return True

    async def _run(self) -> None:
        delay = 0.1
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.inbox, *self._subs)
                self._pubsub = pubsub  # ready once Redis confirmed the inbox (in _dispatch)
                delay = 0.1
                await self._dispatch(pubsub)
            except REDIS_DOWN as exc:
                log.warning("pub/sub connection lost (%s); reconnecting in %.1fs", exc, delay)
            finally:
                self._ready.clear()
                self._pubsub = None
                for subs in self._subs.values():
                    for sub in subs:
                        sub.put(None)
                for sub in self._direct.values():
                    sub.put(None)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _dispatch(self, pubsub: PubSub) -> None:
        while True:
            message = await pubsub.get_message(timeout=1.0)  # under the socket timeout: quiet is not dead
            if message is None:
                continue
            kind = message["type"]
            if kind == "message" and message["channel"] == self._inbox:
                job_id, _, data = message["data"].partition(b"\n")
                direct = self._direct.get(job_id.decode())
                if direct is not None:
                    direct.put(data)
                continue
            channel = message["channel"].decode()
            if kind == "message":
                for sub in self._subs.get(channel, ()):
                    sub.put(message["data"])
            elif kind == "subscribe" and channel == self.inbox:
                self._ready.set()
            elif kind == "subscribe":
                confirmed = self._confirm.pop(channel, None)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)
