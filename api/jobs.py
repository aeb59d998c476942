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
from shared.events import Event
from shared.jobs import TERMINAL, JobSpec

JobBody = ChatJobRequest | CompletionJobRequest


def _num(job: dict[str, str], key: str) -> float | None:
    return float(job[key]) if job.get(key) else None


def job_view(job: dict[str, str], events: list[Event]) -> dict[str, Any]:
    """Status, output so far, result, usage and timings of a job."""
    spec = JobSpec.model_validate_json(job["spec"])
    created, started = _num(job, "created_at"), _num(job, "started_at")
    first, finished = _num(job, "first_token_at"), _num(job, "finished_at")
    output = "".join(e.text for e in events)
    view: dict[str, Any] = {
        "id": job["id"], "object": "job", "status": job["status"], "model": spec.model, "kind": spec.kind,
        "priority": spec.priority, "attempts": int(job.get("attempts", 0)), "worker": job.get("worker"),
        "created_at": created, "started_at": started, "first_token_at": first, "finished_at": finished,
        "timings": {
            "queued_s": _delta(created, started), "time_to_first_token_s": _delta(created, first),
            "total_s": _delta(created, finished),
        },
        "output": output, "tokens": len([t for e in events for t in e.ids]),
        "finish_reason": job.get("finish_reason"),
        "usage": orjson.loads(job["usage"]) if job.get("usage") else None,
        "error": _public_error(job),
    }
    if job.get("webhook"):
        view["webhook"] = orjson.loads(job["webhook"])
    if job["status"] == "succeeded":
        view["result"] = _result(spec, job, output)
    return view


def _delta(a: float | None, b: float | None) -> float | None:
    return round(b - a, 4) if a is not None and b is not None else None


def _public_error(job: dict[str, str]) -> dict[str, Any] | None:
    if not job.get("error"):
        return None
    error = orjson.loads(job["error"])
    error.pop("status", None)
    return error


def _result(spec: JobSpec, job: dict[str, str], text: str) -> dict[str, Any]:
    """The OpenAI-shaped response the same request would have got synchronously."""
    reason = "stop" if job.get("finish_reason") in ("stop", None) else job["finish_reason"]
    usage = orjson.loads(job["usage"]) if job.get("usage") else {}
    if spec.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "logprobs": None, "finish_reason": reason}
        obj = "chat.completion"
    else:
        choice, obj = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}, "text_completion"
    return {"id": spec.id, "object": obj, "created": int(spec.created_at), "model": spec.model,
            "choices": [choice], "usage": usage}


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
