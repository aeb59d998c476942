"""The serving layer: admit a request, enqueue its job, relay its events as OpenAI responses."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from redis.asyncio import Redis

from api.protocol import APIError, ChatCompletionRequest, CompletionRequest, JobOptions, Limits
from api.relay import EventHub, Subscription
from api.sse import DONE, sse
from shared import metrics, webhooks
from shared.events import Event
from shared.jobs import REDIS_DOWN, TERMINAL, JobSpec, JobStatus, JobStore
from shared.keys import Keys
from shared.settings import Settings

GenerationRequest = ChatCompletionRequest | CompletionRequest


def owner_of(api_key: str | None) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()[:24] if api_key else ""


class Serving:
    """Built once at start-up and kept on ``app.state``; routes only validate, call and return."""

    def __init__(self, settings: Settings, redis: Redis):
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.redis_prefix)
        self.store = JobStore(redis, self.keys, settings.result_ttl)
        self.hub = EventHub(redis, self.keys)
        self.limits = Limits(max_tokens_cap=settings.max_tokens_cap, default_max_tokens=settings.default_max_tokens)
        self.in_flight = 0
        self._workers: list[dict[str, Any]] = []
        self._workers_at = 0.0
        self._workers_read: asyncio.Future[list[dict[str, Any]]] | None = None

    # ── models and workers ───────────────────────────────────────────────────
    async def live_workers(self, max_age: float = 0.0) -> list[dict[str, Any]]:
        """Workers whose heartbeat is fresh; ``max_age`` > 0 allows a cached answer that old.
        Requests that find the cache stale together share one read."""
        if max_age and time.time() - self._workers_at < max_age:
            return self._workers
        if self._workers_read is None or self._workers_read.done():
            self._workers_read = asyncio.ensure_future(self._read_workers())
        return await asyncio.shield(self._workers_read)

    async def _read_workers(self) -> list[dict[str, Any]]:
        beats = await self.redis.hgetall(self.keys.workers)
        now = time.time()
        live = [orjson.loads(b) for b in beats.values()]
        self._workers = [w for w in live if now - w["last_seen"] < self.settings.heartbeat_ttl]
        self._workers_at = now
        return self._workers

    async def models(self) -> dict[str, dict[str, Any]]:
        """Models that live workers serve, plus the configured default (jobs for it may wait)."""
        found: dict[str, dict[str, Any]] = {self.settings.served_model_name: {"max_model_len": None, "workers": 0}}
        for w in await self.live_workers(max_age=1.0):
            entry = found.setdefault(w["model"], {"max_model_len": None, "workers": 0})
            entry["workers"] += 1
            entry["max_model_len"] = w.get("max_model_len")
        return found

    # ── admission ────────────────────────────────────────────────────────────
    async def admit(self, body: GenerationRequest, owner: str, options: JobOptions | None = None) -> JobSpec:
        """The job for a valid request to a known model; 4xx otherwise. The queue is checked at submit."""
        models = await self.models()
        model = body.model if body.model != "default" else self.settings.served_model_name
        if model not in models:
            raise APIError(404, f"The model `{body.model}` does not exist. Available: {', '.join(sorted(models))}.",
                           param="model", code="model_not_found")
        max_len = models[model]["max_model_len"]
        spec_extra: dict[str, Any] = {}
        if options is not None:
            spec_extra = {"priority": options.priority,
                          "deadline": time.time() + options.timeout if options.timeout else None,
                          "webhook": {"url": options.webhook, "events": options.webhook_events}
                          if options.webhook else None}
        spec = body.to_spec(model, owner, self.limits, **spec_extra)
        if max_len and spec.sampling.max_tokens >= max_len:
            raise APIError(400, f"max_tokens is {spec.sampling.max_tokens}, but this model's maximum context "
                           f"length is {max_len} tokens.", param="max_tokens", code="context_length_exceeded")
        return spec

    def acquire(self) -> None:
        """Take one of MAX_CONCURRENT_REQUESTS generation slots of this pod, or answer 429."""
        if self.in_flight >= self.settings.max_concurrent_requests:
            raise APIError(429, "Too many concurrent requests on this server; retry shortly.",
                           type_="rate_limit_error", code="too_many_requests", headers={"Retry-After": "1"})
        self.in_flight += 1
        metrics.API_STREAMS_IN_FLIGHT.inc()

    def release(self) -> None:
        self.in_flight -= 1
        metrics.API_STREAMS_IN_FLIGHT.dec()

    async def submit(self, spec: JobSpec) -> Subscription:
        """Attach a reader, then enqueue with this process's inbox as the reply channel; 429 when
        the model's queue is full (checked and enqueued in one script). The inbox was subscribed
        at start-up, so a request costs one Redis round trip and no pub/sub command."""
        sub = await self.hub.attach(spec.id)
        try:
            added, depth = await self.store.enqueue(spec, self.settings.max_queue_depth, reply_to=self.hub.inbox)
            if not added:
                raise APIError(429, f"The queue for `{spec.model}` is full ({depth} jobs waiting); retry later.",
                               type_="rate_limit_error", code="queue_full", headers={"Retry-After": "5"})
        except BaseException:
            await sub.close()
            raise
        return sub

    # ── OpenAI completions ───────────────────────────────────────────────────
    async def generate(self, body: GenerationRequest, owner: str, received: float) -> dict[str, Any] | _Stream:
        """Non-stream: the whole response. Stream: a _Stream whose body the route sends as SSE."""
        spec = await self.admit(body, owner)
        sub = await self.submit(spec)
        batches = sub.batches(self.store, replay=False)
        watch = _Latency(spec.model, received)
        if not body.stream:
            try:
                collected = [e async for batch in batches for e in watch.observe(batch)]
            finally:
                await self._abandon(spec.id, sub, batches)
            _raise_for(collected[-1])
            return _full_response(body, spec, collected)
        first = await self._first_batch(sub, batches)
        return _Stream(self, body, spec, sub, batches, first, watch)

    async def _first_batch(self, sub: Subscription, batches: AsyncIterator[list[Event]]) -> list[Event]:
        """Wait briefly for the worker to accept the job, so a bad request still gets a 4xx status."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.stream_validation_wait):
                await sub.arrived.wait()
        if not sub.arrived.is_set():
            return []
        first = await anext(batches)
        error = first[0].error
        if error and error.get("status", 500) < 500 and first[0].seq == 0:
            await self._abandon(sub.job_id, sub, batches)
            _raise_for(first[0])
        return first

    async def _abandon(self, job_id: str, sub: Subscription, batches: AsyncIterator[list[Event]]) -> None:
        """The reader is gone: stop listening, and cancel the job if it still runs."""
        with contextlib.suppress(Exception):
            await batches.aclose()  # type: ignore[attr-defined]
        await sub.close()
        with contextlib.suppress(*REDIS_DOWN):
            job = await self.store.get(job_id)
            if job and job["status"] not in TERMINAL:
                await self.cancel(job)

    async def cancel(self, job: dict[str, str]) -> None:
        if await self.store.cancel(job["id"]):
            await webhooks.notify(self.redis, self.settings, JobSpec.model_validate_json(job["spec"]),
                                  JobStatus.cancelled)


class _Latency:
    """Feeds the TTFT, inter-token and end-to-end histograms as events pass."""

    def __init__(self, model: str, received: float):
        self.model, self.received = model, received
        self.last: float | None = None

    def observe(self, batch: list[Event]) -> list[Event]:
        now = time.perf_counter()
        for event in batch:
            if event.text or event.ids:
                if self.last is None:
                    metrics.TIME_TO_FIRST_TOKEN.labels(self.model).observe(now - self.received)
                else:
                    metrics.INTER_TOKEN_LATENCY.labels(self.model).observe(now - self.last)
                self.last = now
            if event.terminal and not event.error:
                metrics.E2E_REQUEST_LATENCY.labels(self.model).observe(now - self.received)
        return batch


class _Stream:
    """An accepted streaming request: its SSE body as OpenAI chunks, one write per batch of events."""

    def __init__(self, serving: Serving, body: GenerationRequest, spec: JobSpec, sub: Subscription,
                 batches: AsyncIterator[list[Event]], first: list[Event], watch: _Latency):
        self.serving, self.body, self.spec, self.sub = serving, body, spec, sub
        self.batches, self.first, self.watch = batches, first, watch
        self.chat = isinstance(body, ChatCompletionRequest)
        self.object = "chat.completion.chunk" if self.chat else "text_completion"
        self.created = int(time.time())
        # A token chunk is head + JSON string + tail: the hot path encodes only the text.
        head, tail = self._chunk(self._choice("\0", None)).split(b'"\\u0000"')
        self.head, self.tail = head, tail

    def _chunk(self, choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> bytes:
        payload: dict[str, Any] = {"id": self.spec.id, "object": self.object, "created": self.created,
                                   "model": self.spec.model, "choices": [choice] if choice else []}
        if usage is not None:
            payload["usage"] = usage
        return sse(orjson.dumps(payload))

    def _choice(self, text: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    async def _all_batches(self) -> AsyncIterator[list[Event]]:
        if self.first:
            yield self.first
            if self.first[-1].terminal:
                return
        async for batch in self.batches:
            yield batch

    def _encode(self, event: Event) -> bytes:
        if event.error:
            return sse(orjson.dumps({"error": {k: v for k, v in event.error.items() if k != "status"}}))
        if not event.terminal:
            return self.head + orjson.dumps(event.text) + self.tail if event.text else b""
        out = self._chunk(self._choice(event.text, _openai_reason(event.finish_reason)))
        if self.body.include_usage:
            out += self._chunk(None, event.usage)
        return out

    async def body_iterator(self) -> AsyncIterator[bytes]:
        finished = False
        # The role chunk goes out with the first tokens and [DONE] with the last: fewer, fuller writes.
        opening = self._chunk(self._choice(None, None, role=True)) if self.chat else b""
        try:
            async for batch in self._all_batches():
                out = opening + b"".join(self._encode(e) for e in self.watch.observe(batch))
                opening = b""
                if batch[-1].terminal:
                    finished = True
                    yield out + DONE
                    break
                yield out
        finally:
            if not finished:  # the client went away: free the batch slot at once
                await asyncio.shield(self.serving._abandon(self.spec.id, self.sub, self.batches))
            else:
                await self.sub.close()


def _openai_reason(reason: str | None) -> str | None:
    return None if reason is None else ("stop" if reason in ("stop", "cancelled") else reason)


def _raise_for(event: Event) -> None:
    if event.error:
        err = event.error
        raise APIError(int(err.get("status") or 500), err.get("message", "error"), err.get("type", "server_error"),
                       err.get("param"), err.get("code"))


def _full_response(body: GenerationRequest, spec: JobSpec, events: list[Event]) -> dict[str, Any]:
    text = "".join(e.text for e in events)
    final = events[-1]
    reason = _openai_reason(final.finish_reason)
    if isinstance(body, ChatCompletionRequest):
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "logprobs": None, "finish_reason": reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    return {"id": spec.id, "object": obj, "created": int(spec.created_at), "model": spec.model,
            "choices": [choice], "usage": final.usage or {}}

