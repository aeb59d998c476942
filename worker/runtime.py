"""The worker loop: pull jobs from Redis streams, feed the engine, publish tokens.

Tasks, all on one event loop (the engine runs its model off-loop):
- ``_read_loop``    XREADGROUP up to the free batch capacity, highest lane first.
- ``_run_job``      one per job: start (fenced), resume from the log, relay deltas. A job's
                    first delivery carries its spec: the engine starts on it at once and
                    the first event waits for the start script's verdict.
- ``_publish_loop`` flushes every buffered event in one pipeline per engine step.
- ``_heartbeat_loop`` liveness key, keeps own entries fresh, takes over the
  entries of dead workers (XAUTOCLAIM), which continue from the job's log.
- ``_cancel_loop``  hears cancellations and aborts the job within one step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from shared import metrics, redisconn, webhooks
from shared.events import Event
from shared.jobs import REDIS_DOWN, Entry, JobSpec, JobStatus, JobStore, Started, ensure_group, lanes
from shared.keys import GROUP, Keys
from shared.settings import Settings
from worker.engines.base import Engine, EngineRequestError, GenerationRequest, SamplingParams

log = logging.getLogger("worker")


class Fenced(Exception):
    """The job was taken over or cancelled: this worker may no longer write to it."""


@dataclass
class Active:
    job_id: str
    stream: str
    entry: str
    task: asyncio.Task[None] | None = None
    attempt: int = 0
    spec: JobSpec | None = None
    why_stopped: str = ""  # "cancel" | "handback" | "fenced"
    first_spec: bytes | None = None  # the spec carried by the job's first stream entry


# Outcomes that only a finish script that succeeded gives: it acked and deleted the entry itself.
_ACKED_BY_FINISH = ("succeeded", "failed")


class _NotFirst(Exception):
    """The start script says this is no first attempt after all: run the job the ordinary way."""

    def __init__(self, started: Started):
        self.started = started


@dataclass
class _Pending:
    """An emit or a finish waiting for the next pipelined flush."""

    job: Active
    events: list[Event] = field(default_factory=list)
    finish: tuple[JobStatus, Event] | None = None
    done: asyncio.Future[bool] | None = None


class Worker:
    def __init__(self, settings: Settings, engine: Engine, redis: Redis | None = None):
        self.settings = settings
        self.engine = engine
        self.name = settings.worker_name
        self.model = engine.model or settings.served_model_name
        self.redis = redis or redisconn.connect(settings.redis_url, health_check_interval=10)
        self.keys = Keys(settings.redis_prefix)
        self.store = JobStore(self.redis, self.keys, settings.result_ttl)
        self.lanes = lanes(self.keys, self.model)
        self.active: dict[str, Active] = {}
        self.stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._buffer: list[_Pending] = []
        self._flush_wanted = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._order, self._order_at = self.lanes, 0.0
        self.counts = {"succeeded": 0, "failed": 0, "cancelled": 0, "expired": 0, "retried": 0, "dead_lettered": 0}
        self._m_batch = metrics.WORKER_BATCH_SIZE.labels(self.model)
        self._m_tokens = metrics.WORKER_GENERATED_TOKENS.labels(self.model)
        self._m_step = metrics.WORKER_STEP_DURATION.labels(self.model)

    def __repr__(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items())
        return f"<Worker {self.name} {self.engine.name}:{self.model} running={len(self.active)} {counts}>"

    # ── lifecycle ────────────────────────────────────────────────────────────
    async def run(self) -> None:
        await self.engine.start()
        await self._with_redis(self._setup)
        gc.freeze()  # the loaded model's objects are permanent: the collector's full passes skip them
        log.info("worker %s ready: engine=%s model=%s batch=%d", self.name, self.engine.name,
                 self.model, self.engine.max_batch_size)
        loops = [self._read_loop(), self._publish_loop(), self._heartbeat_loop(), self._cancel_loop()]
        tasks = [asyncio.create_task(c) for c in loops]
        arq = webhooks.arq_worker(self.settings, self.redis) if self.settings.run_arq else None
        if arq is not None:
            tasks.append(asyncio.create_task(arq.async_run()))
        await self.stopping.wait()
        await self._shutdown(tasks[0])
        if arq is not None:
            await arq.close()
        for t in tasks[1:]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.engine.close()
        log.info("worker stopped: %r", self)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)

    async def _setup(self) -> None:
        for stream in self.lanes:
            await ensure_group(self.redis, stream)
        await self._heartbeat()

    async def _shutdown(self, reader: asyncio.Task[None]) -> None:
        """Stop reading; let running jobs finish within the grace period; hand back the rest."""
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        running = [a.task for a in self.active.values() if a.task]
        if running:
            log.info("draining %d jobs (grace %.0fs)", len(running), self.settings.shutdown_grace)
            await asyncio.wait(running, timeout=self.settings.shutdown_grace)
        left = list(self.active.values())
        for job in left:
            job.why_stopped = "handback"
            if job.task:
                job.task.cancel()
        await asyncio.gather(*(j.task for j in left if j.task), return_exceptions=True)
        await self._flush()  # the log must hold everything sent before another worker resumes it
        for job in left:
            await self._with_redis(functools.partial(self._hand_back, job), attempts=5)
        with contextlib.suppress(*REDIS_DOWN, RedisError):
            await self.redis.delete(self.keys.worker_alive(self.name))
            await self.redis.hdel(self.keys.workers, self.name)

    async def _hand_back(self, job: Active) -> None:
        """Requeue at once (not after the takeover timeout); a hand-back is no failed attempt."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(job.stream, {"id": job.job_id})
            pipe.xack(job.stream, GROUP, job.entry)
            pipe.xdel(job.stream, job.entry)
            pipe.hincrby(self.keys.job(job.job_id), "attempts", -1)
            await pipe.execute()
        log.info("handed back %s", job.job_id)

    async def _with_redis(self, op: Callable[[], Awaitable[Any]], attempts: int = 0) -> Any:
        """Run ``op``, retrying with backoff while Redis is unreachable (forever if attempts=0)."""
        delay, n = 0.1, 0
        while True:
            try:
                return await op()
            except REDIS_DOWN as exc:
                n += 1
                if attempts and n >= attempts:
                    raise
                log.warning("redis unreachable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # ── taking jobs ──────────────────────────────────────────────────────────
    def free_slots(self) -> int:
        return self.engine.max_batch_size - len(self.active)

    async def _read_loop(self) -> None:
        while True:
            if self.free_slots() <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                entries = await self._read_entries(self.free_slots())
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._setup()  # Redis lost its data (restart without AOF): recreate
                continue
            except REDIS_DOWN as exc:
                log.warning("redis unreachable while reading (%s)", exc)
                await asyncio.sleep(1.0)
                continue
            for stream, entry, job_id, spec in entries:
                self._launch(stream, entry, job_id, spec)
            if entries:
                await asyncio.sleep(0)  # the new jobs reach the engine before the next read goes out

    async def _lane_order(self) -> list[str]:
        """Highest lane first; but a lower lane whose next job has waited past PRIORITY_AGING goes
        first, so a low lane is never starved. Stream ids are ms timestamps: no extra state."""
        aging = self.settings.priority_aging
        if aging <= 0:
            return self.lanes
        now = time.time()
        if now - self._order_at > 1.0:  # the waits change slowly: look once a second, not per read
            cutoff = int((now - aging) * 1000)
            aged = [lane for lane in self.lanes[1:] if (await self._next_waiting_ms(lane) or cutoff) < cutoff]
            self._order = [*aged[::-1], *(lane for lane in self.lanes if lane not in aged)]
            self._order_at = now
        return self._order

    async def _next_waiting_ms(self, stream: str) -> int | None:
        groups = await self.redis.xinfo_groups(stream)
        delivered = next((g["last-delivered-id"] for g in groups if g["name"] == GROUP.encode()), b"0-0")
        head = await self.redis.xrange(stream, min=b"(" + delivered, count=1)
        return int(head[0][0].split(b"-")[0]) if head else None

    async def _read_entries(self, count: int) -> list[Entry]:
        found = await self.store.read(await self._lane_order(), self.name, count)
        if found:
            return found
        # a burst that wakes us is taken whole (per lane; an engine queues the rare extra itself)
        reply = await self.redis.xreadgroup(GROUP, self.name, dict.fromkeys(self.lanes, ">"), count=count, block=1000)
        return _entries(reply)

    def _launch(self, stream: str, entry: str, job_id: str, first_spec: bytes | None = None) -> None:
        if job_id in self.active:
            return
        job = Active(job_id, stream, entry, first_spec=first_spec)
        self.active[job_id] = job
        job.task = asyncio.create_task(self._run_job(job))

    # ── running a job ────────────────────────────────────────────────────────
    async def _run_job(self, job: Active) -> None:
        try:
            outcome = await self._run(job)
        except asyncio.CancelledError:
            if job.why_stopped == "handback":
                return  # _shutdown requeues it
            if job.why_stopped not in ("cancel", "fenced"):
                raise
            outcome = "cancelled" if job.why_stopped == "cancel" else "fenced"
        except Fenced:
            outcome = "fenced"
        except REDIS_DOWN as exc:
            log.warning("job %s: redis unreachable (%s); it will be retried", job.job_id, exc)
            outcome = "retried"
        except Exception:
            log.exception("job %s failed in the engine; it will be retried", job.job_id)
            outcome = "retried"
        self._end(job, outcome)

    def _end(self, job: Active, outcome: str) -> None:
        """Count the outcome and free the slot. The entry is acked only when the job ended (by
        the finish script itself when this worker finished it): a retried one stays pending,
        unrefreshed, for XAUTOCLAIM to pick up; a fenced one may belong to another worker now,
        which acks it."""
        self.active.pop(job.job_id, None)
        self._slot_freed.set()
        if outcome in self.counts:
            self.counts[outcome] += 1
            metrics.WORKER_JOBS.labels(self.model, outcome).inc()
        if outcome not in ("retried", "fenced", *_ACKED_BY_FINISH):
            task = asyncio.create_task(self._ack(job))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _ack(self, job: Active) -> None:
        """Ack and delete the entry: the stream holds only work not yet done."""

        async def ack() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                await pipe.xack(job.stream, GROUP, job.entry).xdel(job.stream, job.entry).execute()

        with contextlib.suppress(*REDIS_DOWN):
            await self._with_redis(ack, attempts=20)

    async def _run(self, job: Active) -> str:
        if job.first_spec is not None:
            spec = JobSpec.model_validate_json(job.first_spec)
            if not (spec.deadline and time.time() > spec.deadline):
                return await self._run_first(job, spec)
        return await self._run_started(job, await self.store.start(job.job_id, self.name, self.settings.max_attempts))

    async def _run_first(self, job: Active, spec: JobSpec) -> str:
        """A first delivery: the engine starts while the start script is in flight (one round trip
        off the time to first token); nothing is written before the script said this is attempt 1
        of a queued job with an empty log. Otherwise the engine's work is dropped and the job runs
        the ordinary way (cancelled while queued: skipped; a stray redelivery: resumed)."""
        start = asyncio.ensure_future(self.store.start(job.job_id, self.name, self.settings.max_attempts,
                                                       with_spec=False))

        async def verdict() -> None:
            started = await start
            if started.attempt != 1 or started.log_len:
                raise _NotFirst(started._replace(spec=spec if started.attempt else None))
            job.attempt, job.spec = started.attempt, spec
            await webhooks.notify(self.redis, self.settings, spec, JobStatus.running)

        try:
            return await self._generate(job, spec, [], verdict)
        except _NotFirst as exc:
            return await self._run_started(job, exc.started)
        finally:
            if not start.done():  # a hand-back must find the attempt counted
                with contextlib.suppress(BaseException):
                    await asyncio.shield(start)

    async def _run_started(self, job: Active, started: Started) -> str:
        attempt, status, log_len, spec = started
        if attempt == 0 or spec is None:
            if status == "exhausted":
                await self._dead_letter(job, log_len)
                return "dead_lettered"
            return "skipped"  # already ended (cancelled while queued, …) or gone
        job.attempt, job.spec = attempt, spec
        if spec.deadline and time.time() > spec.deadline and log_len == 0:
            if await self.store.fail(job.job_id, "The job's deadline passed while it was queued.",
                                     type_="timeout_error", code="job_expired", status_code=408,
                                     status=JobStatus.expired, worker=self.name, attempt=attempt):
                await webhooks.notify(self.redis, self.settings, spec, JobStatus.expired)
            return "expired"
        if attempt == 1:
            await webhooks.notify(self.redis, self.settings, spec, JobStatus.running)
        previous = await self.store.read_log(job.job_id) if log_len else []
        if attempt > 1:
            log.info("job %s: attempt %d resumes after %d events", job.job_id, attempt, log_len)
        return await self._generate(job, spec, previous)

    async def _generate(self, job: Active, spec: JobSpec, previous: list[Event],
                        admitted: Callable[[], Awaitable[None]] | None = None) -> str:
        """Run the engine and relay its deltas; ``admitted`` (if given) must return before the first
        write: it may raise to drop the engine's work."""
        request = GenerationRequest(
            id=job.job_id,
            params=SamplingParams(**spec.sampling.model_dump()),
            messages=spec.messages,
            prompt=spec.prompt,
            resume_token_ids=[t for e in previous for t in e.ids],
        )
        seq = len(previous)
        try:
            async with contextlib.aclosing(self.engine.generate(request)) as deltas:  # type: ignore[type-var]
                async for delta in deltas:
                    if admitted is not None:
                        await admitted()
                        admitted = None
                    self._m_tokens.inc(len(delta.token_ids))
                    if delta.finish_reason is None:
                        self._push(_Pending(job, [Event(seq, delta.text, delta.token_ids)]))
                        seq += 1
                        continue
                    usage = {"prompt_tokens": delta.prompt_tokens, "completion_tokens": delta.completion_tokens,
                             "total_tokens": delta.prompt_tokens + delta.completion_tokens}
                    final = Event(seq, delta.text, delta.token_ids, delta.finish_reason, usage)
                    return await self._finish(job, JobStatus.succeeded, final)
        except EngineRequestError as exc:
            if admitted is not None:
                await admitted()
            error = {"message": str(exc), "type": "invalid_request_error", "code": exc.code,
                     "param": exc.param, "status": 400}
            await self._finish(job, JobStatus.failed, Event(seq, finish_reason="error", error=error))
            return "failed"
        raise RuntimeError("engine ended a request without a finish reason")

    async def _finish(self, job: Active, status: JobStatus, event: Event) -> str:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._push(_Pending(job, finish=(status, event), done=done))
        if not await done:
            raise Fenced()
        assert job.spec is not None
        await webhooks.notify(self.redis, self.settings, job.spec, status)
        return "succeeded" if status == JobStatus.succeeded else "failed"

    async def _dead_letter(self, job: Active, attempts: int) -> None:
        log.error("job %s failed %d times: dead-lettered", job.job_id, attempts - 1)
        await self.redis.xadd(self.keys.dead(self.model), {
            "id": job.job_id, "stream": job.stream, "entry": job.entry, "attempts": attempts - 1,
            "worker": self.name, "at": time.time()})
        if await self.store.fail(job.job_id, f"The job failed on {attempts - 1} attempts and was dead-lettered.",
                                 code="max_attempts_exceeded"):
            raw = await self.store.get(job.job_id)
            if raw:
                await webhooks.notify(self.redis, self.settings, JobSpec.model_validate_json(raw["spec"]),
                                      JobStatus.failed)

    # ── publishing: one pipeline per engine step ─────────────────────────────
    def _push(self, item: _Pending) -> None:
        self._buffer.append(item)
        self._flush_wanted.set()

    async def _publish_loop(self) -> None:
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted.clear()
            await self._flush()

    async def _flush(self) -> None:
        async with self._flush_lock:  # one writer at a time keeps each job's events in order
            await self._flush_buffer()

    async def _flush_buffer(self) -> None:
        while self._buffer:
            items, self._buffer = self._buffer, []
            started = time.perf_counter()
            try:
                try:
                    await self._write(items)
                except NoScriptError:  # Redis restarted: its script cache is empty
                    await self.store.load_scripts()
                    await self._write(items)
            except REDIS_DOWN as exc:
                log.warning("redis unreachable while publishing (%s); retrying", exc)
                self._buffer = items + self._buffer
                await asyncio.sleep(0.5)
                continue
            except Exception:
                log.exception("publishing failed; the jobs concerned will be retried from their log")
                for item in items:
                    self._stop(item.job, "fenced")
                    if item.done is not None and not item.done.done():
                        item.done.set_result(False)
                continue
            self._m_step.observe(time.perf_counter() - started)

    async def _write(self, items: list[_Pending]) -> None:
        batches = _merge_emits(items)
        async with self.redis.pipeline(transaction=False) as pipe:
            for item in batches:
                job = item.job
                if item.events:
                    await self.store.emit(pipe, job.job_id, self.name, job.attempt, item.events)
                elif item.finish:
                    status, event = item.finish
                    await self.store.finish(job.job_id, status, event, worker=self.name, attempt=job.attempt,
                                            expected_seq=event.seq, client=pipe, entry=(job.stream, job.entry))
            results = await pipe.execute()
        for item, ok in zip(batches, results, strict=True):
            if item.done is not None and not item.done.done():
                item.done.set_result(bool(ok))
            elif not ok:
                self._stop(item.job, "fenced")  # taken over or cancelled: stop generating

    def _stop(self, job: Active, why: str) -> None:
        if job.task and not job.why_stopped:
            job.why_stopped = why
            job.task.cancel()

    # ── liveness, takeover, cancellation ─────────────────────────────────────
    async def _heartbeat(self) -> None:
        running = len(self.active)
        self._m_batch.set(self.engine.num_running() or running)
        beat = orjson.dumps({"name": self.name, "model": self.model, "engine": self.engine.name,
                             "running": running, "max_batch_size": self.engine.max_batch_size,
                             "max_model_len": self.engine.max_model_len, "last_seen": time.time()})
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.worker_alive(self.name), beat, px=int(self.settings.heartbeat_ttl * 1000))
            pipe.hset(self.keys.workers, self.name, beat)
            for job in self.active.values():  # keep own entries fresh: nobody takes over a slow job
                pipe.xclaim(job.stream, GROUP, self.name, 0, [job.entry], justid=True)
            await pipe.execute()

    async def _take_over(self) -> None:
        """Claim entries idle past the heartbeat TTL: their worker died or their attempt failed."""
        idle_ms = int(self.settings.heartbeat_ttl * 1000)
        for stream in self.lanes:
            free = self.free_slots()
            if free <= 0 or self.stopping.is_set():
                return
            _, claimed, _ = await self.redis.xautoclaim(stream, GROUP, self.name, idle_ms, "0-0", count=free)
            for entry, fields in claimed:
                if fields:  # an entry trimmed away comes back empty
                    job_id = fields[b"id"].decode()
                    log.info("taking over %s (entry %s)", job_id, entry.decode())
                    self._launch(stream, entry.decode(), job_id)

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self._heartbeat()
                await self._take_over()
                await self._forget_dead_workers()
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    await self._setup()
                else:
                    log.warning("heartbeat: %s", exc)
            except REDIS_DOWN as exc:
                log.warning("heartbeat: redis unreachable (%s)", exc)
            await asyncio.sleep(self.settings.heartbeat_interval)

    async def _forget_dead_workers(self) -> None:
        names = [n.decode() for n in await self.redis.hkeys(self.keys.workers)]
        if not names:
            return
        alive = await self.redis.exists(*[self.keys.worker_alive(n) for n in names])
        if alive == len(names):
            return
        for name in names:
            if not await self.redis.exists(self.keys.worker_alive(name)):
                await self.redis.hdel(self.keys.workers, name)

    async def _cancel_loop(self) -> None:
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.keys.cancel)
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self._cancel(message["data"].decode())
            except REDIS_DOWN as exc:
                log.warning("cancel listener: redis unreachable (%s)", exc)
                await asyncio.sleep(1.0)

    def _cancel(self, job_id: str) -> None:
        job = self.active.get(job_id)
        if job:
            log.info("cancelling %s", job_id)
            self._stop(job, "cancel")


def _entries(reply: Any) -> list[Entry]:
    return [Entry(stream.decode(), entry.decode(), fields[b"id"].decode(), fields.get(b"spec"))
            for stream, items in reply or [] for entry, fields in items]


def _merge_emits(items: list[_Pending]) -> list[_Pending]:
    """All buffered events of a job become one fenced append, followed by its finish."""
    emits: dict[str, _Pending] = {}
    finishes: list[_Pending] = []
    for item in items:
        if item.finish:
            finishes.append(item)
        elif item.job.job_id in emits:
            emits[item.job.job_id].events += item.events
        else:
            emits[item.job.job_id] = _Pending(item.job, list(item.events))
    return [*emits.values(), *finishes]
