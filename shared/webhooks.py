"""Webhook deliveries and housekeeping, as arq jobs.

A job may name a ``webhook`` URL and the events it wants (started, completed,
failed, cancelled, expired). Whoever moves the job into such a state calls
``notify``; one arq job per (job, event) delivers it, retrying with exponential
backoff, and records every try on the job. The body is signed:
``X-Webhook-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import Any

import httpx
import orjson
from arq import Retry, cron
from arq.connections import ArqRedis
from redis.asyncio import Redis

from shared.jobs import JobSpec, JobStatus, JobStore, lanes
from shared.keys import GROUP, Keys
from shared.settings import Settings
from shared.views import job_view

log = logging.getLogger("webhooks")
EVENT_OF = {JobStatus.running: "started", JobStatus.succeeded: "completed", JobStatus.failed: "failed",
            JobStatus.cancelled: "cancelled", JobStatus.expired: "expired"}


def queue_name(settings: Settings) -> str:
    return f"{settings.redis_prefix}arq:queue"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, tolerance: float = 300) -> bool:
    """What a receiver does: recompute the signature and check the timestamp is fresh."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    if not parts.get("t", "").isdigit() or abs(time.time() - int(parts["t"])) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, int(parts["t"]), body), header)


async def notify(redis: Redis, settings: Settings, spec: JobSpec, status: JobStatus) -> None:
    """Enqueue a delivery if the job asked for this event; once per (job, event)."""
    event = EVENT_OF.get(status)
    if not spec.webhook or event not in spec.webhook.get("events", ()):
        return
    arq = ArqRedis(connection_pool=redis.connection_pool)
    await arq.enqueue_job("deliver_webhook", spec.id, event, _job_id=f"webhook:{spec.id}:{event}",
                          _queue_name=queue_name(settings))


async def deliver_webhook(ctx: dict[str, Any], job_id: str, event: str) -> str:
    settings: Settings = ctx["settings"]
    store: JobStore = ctx["store"]
    job = await store.get(job_id)
    if job is None:
        return "job gone"
    spec = JobSpec.model_validate_json(job["spec"])
    assert spec.webhook
    body = orjson.dumps({"event": event, "job": job_view(job, await store.read_log(job_id)), "sent_at": time.time()})
    headers = {"Content-Type": "application/json", "User-Agent": "llm-serving-webhook",
               "X-Webhook-Event": event, "X-Webhook-Id": f"{job_id}:{event}"}
    if settings.webhook_secret:
        headers["X-Webhook-Signature"] = sign(settings.webhook_secret, int(time.time()), body)
    attempt = ctx["job_try"]
    record: dict[str, Any] = {"event": event, "attempt": attempt, "at": time.time()}
    try:
        response = await ctx["http"].post(spec.webhook["url"], content=body, headers=headers)
        record["status"] = response.status_code
        ok = 200 <= response.status_code < 300
    except httpx.HTTPError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        ok = False
    record["ok"] = ok
    await _record(store, job_id, record)
    if ok:
        return f"delivered {event} on try {attempt}"
    if attempt >= settings.webhook_max_tries:
        log.warning("webhook %s for %s given up after %d tries", event, job_id, attempt)
        return "gave up"
    raise Retry(defer=settings.webhook_backoff * 2 ** (attempt - 1))


async def _record(store: JobStore, job_id: str, record: dict[str, Any]) -> None:
    """One hash field per try: concurrent deliveries of one job never overwrite each other."""
    field = f"delivery:{record['event']}:{record['attempt']}"
    await store.redis.hset(store.keys.job(job_id), field, orjson.dumps(record))


# ── housekeeping ─────────────────────────────────────────────────────────────
async def sweep_expired(ctx: dict[str, Any]) -> int:
    """Mark queued jobs whose deadline passed as expired now, not when a worker reaches them."""
    store: JobStore = ctx["store"]
    keys: Keys = store.keys
    swept = 0
    for model in await store.redis.smembers(keys.models):
        for stream in lanes(keys, model.decode()):
            for _, fields in await store.redis.xrange(stream, count=1000):
                job = await store.get(fields[b"id"].decode())
                if not job or job["status"] != "queued":
                    continue
                spec = JobSpec.model_validate_json(job["spec"])
                if spec.deadline and spec.deadline < time.time() and await store.fail(
                        spec.id, "The job's deadline passed while it was queued.", type_="timeout_error",
                        code="job_expired", status_code=408, status=JobStatus.expired):
                    await notify(store.redis, ctx["settings"], spec, JobStatus.expired)
                    swept += 1
    return swept


async def trim_streams(ctx: dict[str, Any]) -> None:
    """Dead-letter streams keep the newest 10,000; workers that left are dropped from the group."""
    store: JobStore = ctx["store"]
    keys = store.keys
    for model in await store.redis.smembers(keys.models):
        await store.redis.xtrim(keys.dead(model.decode()), maxlen=10_000, approximate=True)
        for stream in lanes(keys, model.decode()):
            try:
                consumers = await store.redis.xinfo_consumers(stream, GROUP)
            except Exception:
                continue
            for c in consumers:
                name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                if c["pending"] == 0 and c["idle"] > 3_600_000 and not await store.redis.exists(
                        keys.worker_alive(name)):
                    await store.redis.xgroup_delconsumer(stream, GROUP, name)


async def report_dead_letters(ctx: dict[str, Any]) -> dict[str, int]:
    store: JobStore = ctx["store"]
    counts = {}
    for model in await store.redis.smembers(store.keys.models):
        n = await store.redis.xlen(store.keys.dead(model.decode()))
        if n:
            counts[model.decode()] = n
    if counts:
        log.warning("dead-lettered jobs: %s", counts)
    return counts


def arq_worker(settings: Settings, redis: Redis) -> Any:
    """The arq worker that runs beside the engine loop (or alone: see shared/arq_worker.py)."""
    from arq.worker import Worker

    store = JobStore(redis, Keys(settings.redis_prefix), settings.result_ttl)
    ctx = {"settings": settings, "store": store, "http": httpx.AsyncClient(timeout=settings.webhook_timeout)}
    return Worker(functions=[deliver_webhook], cron_jobs=CRON_JOBS, queue_name=queue_name(settings),
                  redis_pool=ArqRedis(connection_pool=redis.connection_pool), handle_signals=False, ctx=ctx,
                  max_tries=settings.webhook_max_tries + 1, keep_result=3600, poll_delay=0.2, log_results=False)


CRON_JOBS = [
    cron(sweep_expired, second={0, 15, 30, 45}, run_at_startup=False),
    cron(trim_streams, minute={0, 30}, second=0),
    cron(report_dead_letters, minute=set(range(0, 60, 5)), second=0),
]
