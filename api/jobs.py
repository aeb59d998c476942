"""Submit-and-poll: the job resource as clients see it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson

from api.protocol import APIError, ChatJobRequest, CompletionJobRequest
from api.serving import Serving
from api.sse import sse
from shared.jobs import TERMINAL
from shared.views import job_view

JobBody = ChatJobRequest | CompletionJobRequest


async def submit(serving: Serving, body: JobBody, owner: str, idempotency_key: str | None,
                 wait: float) -> tuple[int, dict[str, Any]]:
    spec = await serving.admit(body, owner, body)
    if idempotency_key:
        key = serving.keys.idempotency(owner or "_", idempotency_key)
        if not await serving.redis.set(key, spec.id, nx=True, ex=serving.settings.result_ttl):
            existing = (await serving.redis.get(key) or b"").decode()
            job = await serving.store.get(existing)
            if job is not None:
                return 200, job_view(job, await serving.store.read_log(existing))
    sub = await serving.submit(spec)
    try:
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    async for event in sub.events(serving.store):
                        if event.terminal:
                            break
    finally:
        await sub.close()
    job = await serving.store.get(spec.id)
    assert job is not None
    events = await serving.store.read_log(spec.id)
    return (200 if job["status"] in TERMINAL else 202), job_view(job, events)


async def get_owned(serving: Serving, job_id: str, owner: str) -> dict[str, str]:
    """The job, or 404 when it does not exist, expired, or belongs to another key."""
    job = await serving.store.get(job_id)
    if job is None or job.get("owner", "") != owner:
        raise APIError(404, f"No job with id {job_id!r}.", param="job_id", code="job_not_found")
    return job


async def event_stream(serving: Serving, job_id: str, after: int) -> AsyncIterator[bytes]:
    """The job's events as SSE, `id:` = seq, resumable with Last-Event-ID."""
    sub = await serving.hub.subscribe(job_id)
    try:
        async for event in sub.events(serving.store, after):
            kind = "error" if event.error else ("done" if event.terminal else "token")
            payload = orjson.loads(event.encode())
            if event.error:
                payload["error"].pop("status", None)
            yield sse(orjson.dumps(payload), id=event.seq, event=kind)
    finally:
        await sub.close()


async def list_jobs(serving: Serving, owner: str, status: str | None, limit: int,
                    cursor: str | None) -> dict[str, Any]:
    """The caller's jobs, newest first; `cursor` is the `next_cursor` of the previous page."""
    key = serving.keys.owner_jobs(owner or "_")
    try:
        top = f"({float(cursor)!r}" if cursor else "+inf"
    except ValueError:
        raise APIError(400, "cursor: not a cursor from a previous page", param="cursor") from None
    out: list[dict[str, Any]] = []
    next_cursor: str | None = None
    while len(out) < limit:
        page = await serving.redis.zrevrangebyscore(key, top, "-inf", start=0, num=limit * 2, withscores=True)
        if not page:
            break
        async with serving.redis.pipeline(transaction=False) as pipe:
            for job_id, _ in page:
                pipe.hgetall(serving.keys.job(job_id.decode()))
            jobs = await pipe.execute()
        for (job_id, score), raw in zip(page, jobs, strict=True):
            top = f"({score!r}"
            if not raw:
                await serving.redis.zrem(key, job_id)  # expired: its hash is gone
                continue
            job = {k.decode(): v.decode() for k, v in raw.items()}
            if status and job["status"] != status:
                continue
            view = job_view(job, [])
            view.pop("output")
            out.append(view)
            next_cursor = repr(score)
            if len(out) == limit:
                break
    has_more = len(out) == limit
    return {"object": "list", "data": out, "next_cursor": next_cursor if has_more else None, "has_more": has_more}
