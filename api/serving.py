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
from redis.exceptions import ResponseError

from api.protocol import APIError, ChatCompletionRequest, CompletionRequest, JobOptions, Limits
from api.relay import EventHub, RedisUnavailable, Subscription
from api.sse import DONE, sse
from shared import metrics, webhooks
from shared.events import Event
from shared.jobs import REDIS_DOWN, TERMINAL, JobSpec, JobStatus, JobStore, lanes
from shared.keys import GROUP, Keys
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

    # ── models and workers ───────────────────────────────────────────────────
    async def live_workers(self) -> list[dict[str, Any]]:
        beats = await self.redis.hgetall(self.keys.workers)
        now = time.time()
        live = [orjson.loads(b) for b in beats.values()]
        return [w for w in live if now - w["last_seen"] < self.settings.heartbeat_ttl]

    async def models(self) -> dict[str, dict[str, Any]]:
        """Models that live workers serve, plus the configured default (jobs for it may wait)."""
        found: dict[str, dict[str, Any]] = {self.settings.served_model_name: {"max_model_len": None, "workers": 0}}
        for w in await self.live_workers():
            entry = found.setdefault(w["model"], {"max_model_len": None, "workers": 0})
            entry["workers"] += 1
            entry["max_model_len"] = w.get("max_model_len")
        return found

    async def queue_state(self, model: str) -> dict[str, int]:
        """Lag (not yet delivered) and pending (delivered, not acked) over the model's lanes."""
        depth = pending = 0
        for stream in lanes(self.keys, model):
            try:
                groups = {g["name"].decode(): g for g in await self.redis.xinfo_groups(stream)}
            except ResponseError:  # no stream yet
                continue
            group = groups.get(GROUP)
            if group is None:  # no worker has ever read it: everything is waiting
                depth += await self.redis.xlen(stream)
                continue
            lag = group.get("lag")
            pending += int(group["pending"])
            depth += int(lag) if lag is not None else max(0, await self.redis.xlen(stream) - int(group["pending"]))
        return {"depth": depth, "pending": pending}

    # ── admission ────────────────────────────────────────────────────────────
    async def admit(self, body: GenerationRequest, owner: str, options: JobOptions | None = None) -> JobSpec:
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
        depth = (await self.queue_state(model))["depth"]
        if depth >= self.settings.max_queue_depth:
            raise APIError(429, f"The queue for `{model}` is full ({depth} jobs waiting); retry later.",
                           type_="rate_limit_error", code="queue_full", headers={"Retry-After": "5"})
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
        """Subscribe first, then enqueue: no event can be missed."""
        sub = await self.hub.subscribe(spec.id)
        try:
            await self.store.enqueue(spec)
        except BaseException:
            await sub.close()
            raise
        return sub

    # ── OpenAI completions ───────────────────────────────────────────────────
    async def generate(self, body: GenerationRequest, owner: str, received: float) -> dict[str, Any] | Any:
        """Non-stream: the whole response. Stream: (first events, iterator) for the SSE route."""
        spec = await self.admit(body, owner)
        sub = await self.submit(spec)
        events = sub.events(self.store)
        watch = _Latency(spec.model, received)
        if not body.stream:
            try:
                collected = [e async for e in watch.track(events)]
            finally:
                await self._abandon(spec.id, sub, events)
            final = collected[-1]
            _raise_for(final)
            return _full_response(body, spec, collected)
        first = await self._first_event(sub, events)
        return _Stream(self, body, spec, sub, events, first, watch)

    async def _first_event(self, sub: Subscription, events: AsyncIterator[Event]) -> Event | None:
        """Wait briefly for the worker to accept the job, so a bad request still gets a 4xx status."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.stream_validation_wait):
                await sub.arrived.wait()
        if not sub.arrived.is_set():
            return None
        first = await anext(events)
        if first.error and first.error.get("status", 500) < 500 and first.seq == 0:
            await self._abandon(sub.job_id, sub, events)
            _raise_for(first)
        return first

    async def _abandon(self, job_id: str, sub: Subscription, events: AsyncIterator[Event]) -> None:
        """The reader is gone: stop listening, and cancel the job if it still runs."""
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]
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

    async def track(self, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        async for event in events:
            now = time.perf_counter()
            if event.text or event.ids:
                if self.last is None:
                    metrics.TIME_TO_FIRST_TOKEN.labels(self.model).observe(now - self.received)
                else:
                    metrics.INTER_TOKEN_LATENCY.labels(self.model).observe(now - self.last)
                self.last = now
            if event.terminal and not event.error:
                metrics.E2E_REQUEST_LATENCY.labels(self.model).observe(now - self.received)
            yield event


class _Stream:
    """An accepted streaming request: its SSE body as OpenAI chunks."""

    def __init__(self, serving: Serving, body: GenerationRequest, spec: JobSpec, sub: Subscription,
                 events: AsyncIterator[Event], first: Event | None, watch: _Latency):
        self.serving, self.body, self.spec, self.sub = serving, body, spec, sub
        self.events, self.first, self.watch = events, first, watch
        self.chat = isinstance(body, ChatCompletionRequest)
        self.object = "chat.completion.chunk" if self.chat else "text_completion"
        self.created = int(time.time())

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

    async def _all_events(self) -> AsyncIterator[Event]:
        if self.first is not None:
            yield self.first
            if self.first.terminal:
                return
        async for event in self.events:
            yield event

    async def body_iterator(self) -> AsyncIterator[bytes]:
        finished = False
        try:
            if self.chat:
                yield self._chunk(self._choice(None, None, role=True))
            async for event in self.watch.track(self._all_events()):
                if event.error:
                    yield sse(orjson.dumps({"error": {k: v for k, v in event.error.items() if k != "status"}}))
                    break
                reason = _openai_reason(event.finish_reason)
                if event.text or reason:
                    yield self._chunk(self._choice(event.text, reason))
                if event.terminal:
                    if self.body.include_usage:
                        yield self._chunk(None, event.usage)
                    break
            finished = True
            yield DONE
        finally:
            if not finished:  # the client went away: free the batch slot at once
                await asyncio.shield(self.serving._abandon(self.spec.id, self.sub, self.events))
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


__all__ = ["APIError", "JobStatus", "RedisUnavailable", "Serving", "owner_of"]
