"""The FastAPI application: thin routes over the serving layer built once at start-up."""

from __future__ import annotations

import contextlib
import gc
import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import jobs
from api.protocol import APIError, ChatCompletionRequest, CompletionRequest
from api.relay import RedisUnavailable
from api.serving import Serving, owner_of
from api.sse import EventStream
from shared import metrics, redisconn
from shared.jobs import REDIS_DOWN, TERMINAL, JobStatus
from shared.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = redisconn.connect(settings.redis_url, socket_connect_timeout=2, socket_timeout=5,
                                  health_check_interval=10)
        serving = Serving(settings, redis)
        await serving.hub.start()
        app.state.serving = serving
        gc.freeze()  # the start-up heap is permanent: the collector's full passes skip it (short pauses)
        yield
        await serving.hub.close()
        await redis.aclose()

    app = FastAPI(title="llm-serving", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible LLM serving over a Redis job queue.")
    app.state.settings = settings
    _add_error_handlers(app)
    app.add_middleware(_BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(_RequestMetrics)
    _add_routes(app, settings)
    return app


async def _serving(request: Request) -> Serving:
    serving: Serving = request.app.state.serving
    return serving


async def _caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The owner id of the caller's API key ("" when auth is off); 401 for a missing or wrong key."""
    keys = request.app.state.settings.api_key_list
    if not keys:
        return ""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not any(secrets.compare_digest(token, k) for k in keys):
        raise APIError(401, "Invalid or missing API key: send `Authorization: Bearer <key>`.",
                       code="invalid_api_key")
    return owner_of(token)


ServingDep = Annotated[Serving, Depends(_serving)]
Owner = Annotated[str, Depends(_caller)]


def _add_routes(app: FastAPI, settings: Settings) -> None:
    async def _generate(body: ChatCompletionRequest | CompletionRequest, serving: Serving, owner: str) -> Any:
        received = time.perf_counter()
        serving.acquire()
        try:
            result = await serving.generate(body, owner, received)
        except BaseException:
            serving.release()
            raise
        if isinstance(result, dict):
            serving.release()
            return result
        return EventStream(_releasing(serving, result.body_iterator()), ping=15)

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, serving: ServingDep, owner: Owner) -> Any:
        return await _generate(body, serving, owner)

    @app.post("/v1/completions", tags=["openai"])
    async def completions(body: CompletionRequest, serving: ServingDep, owner: Owner) -> Any:
        return await _generate(body, serving, owner)

    @app.get("/v1/models", tags=["openai"])
    async def list_models(serving: ServingDep, owner: Owner) -> dict[str, Any]:
        models = await serving.models()
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "llm-serving",
             "max_model_len": info["max_model_len"], "workers": info["workers"]}
            for name, info in sorted(models.items())]}

    @app.post("/v1/jobs", tags=["jobs"], status_code=202)
    async def submit_job(body: jobs.JobBody, serving: ServingDep, owner: Owner,
                         idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
                         wait: Annotated[float, Query(ge=0, le=300)] = 0) -> JSONResponse:
        status, view = await jobs.submit(serving, body, owner, idempotency_key, wait)
        return JSONResponse(view, status_code=status, headers={"Location": f"/v1/jobs/{view['id']}"})

    @app.get("/v1/jobs", tags=["jobs"])
    async def list_jobs(serving: ServingDep, owner: Owner,
                        status: Annotated[JobStatus | None, Query()] = None,
                        limit: Annotated[int, Query(ge=1, le=100)] = 20,
                        cursor: Annotated[str | None, Query(pattern=r"^[0-9.e+-]+$", max_length=40)] = None,
                        ) -> dict[str, Any]:
        return await jobs.list_jobs(serving, owner, status.value if status else None, limit, cursor)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    async def get_job(job_id: str, serving: ServingDep, owner: Owner) -> dict[str, Any]:
        job = await jobs.get_owned(serving, job_id, owner)
        return jobs.job_view(job, await serving.store.read_log(job_id))

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"])
    async def job_events(job_id: str, serving: ServingDep, owner: Owner,
                         last_event_id: Annotated[int | None, Header(ge=-1)] = None,
                         after: Annotated[int | None, Query(ge=-1)] = None) -> EventStream:
        await jobs.get_owned(serving, job_id, owner)
        start = after if after is not None else (last_event_id if last_event_id is not None else -1)
        return EventStream(jobs.event_stream(serving, job_id, start), ping=15)

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"])
    async def cancel_job(job_id: str, serving: ServingDep, owner: Owner) -> dict[str, Any]:
        job = await jobs.get_owned(serving, job_id, owner)
        if job["status"] not in TERMINAL:
            await serving.cancel(job)
        job = await jobs.get_owned(serving, job_id, owner)
        return jobs.job_view(job, await serving.store.read_log(job_id))

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        """Liveness: the process serves HTTP."""
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"])
    async def ready(serving: ServingDep, owner: Owner) -> JSONResponse:
        """Readiness: Redis answers and a live worker serves the default model."""
        try:
            await serving.redis.ping()
            models = await serving.models()
        except REDIS_DOWN as exc:
            return JSONResponse({"status": "unavailable", "redis": f"unreachable: {exc}"}, status_code=503)
        workers = models[settings.served_model_name]["workers"]
        ok = workers > 0
        return JSONResponse({"status": "ready" if ok else "no_workers", "redis": "ok",
                             "model": settings.served_model_name, "workers": workers},
                            status_code=200 if ok else 503)

    @app.get("/stats", tags=["ops"])
    async def stats(serving: ServingDep, owner: Owner) -> dict[str, Any]:
        return await _stats(serving)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def prometheus_metrics(serving: ServingDep, owner: Owner) -> Response:
        with contextlib.suppress(*REDIS_DOWN):
            for model, state in (await _stats(serving))["models"].items():
                metrics.set_queue_state(model, depth=state["queue_depth"], pending=state["pending"],
                                        dead_letters=state["dead_letters"], workers_live=state["workers"])
        return Response(generate_latest(metrics.API_REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def _releasing(serving: Serving, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A stream holds its slot for as long as it runs."""
    try:
        async for chunk in body:
            yield chunk
    finally:
        serving.release()


async def _stats(serving: Serving) -> dict[str, Any]:
    workers = await serving.live_workers()
    names = {m.decode() for m in await serving.redis.smembers(serving.keys.models)}
    names |= {w["model"] for w in workers} | {serving.settings.served_model_name}
    models: dict[str, Any] = {}
    for model in sorted(names):
        queue = await serving.store.queue_state(model)
        models[model] = {"queue_depth": queue["depth"], "pending": queue["pending"],
                         "dead_letters": await serving.redis.xlen(serving.keys.dead(model)),
                         "workers": sum(1 for w in workers if w["model"] == model),
                         "running": sum(w["running"] for w in workers if w["model"] == model)}
    return {"models": models, "workers": workers, "api": {"in_flight": serving.in_flight}}


# ── errors in OpenAI's shape ─────────────────────────────────────────────────
def _error(status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "header", "path")]
        if first.get("type") == "json_invalid":
            return _error(400, f"Malformed JSON body: {first.get('msg')}", "invalid_request_error", "invalid_json")
        where = ".".join(loc)
        message = f"{where}: {first['msg']}" if where else str(first["msg"])
        return _error(400, message, "invalid_request_error", "invalid_value", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error(exc.status_code, str(exc.detail), type_, headers=getattr(exc, "headers", None))

    @app.exception_handler(RedisUnavailable)
    async def redis_unavailable(_: Request, exc: Exception) -> JSONResponse:
        return _error(503, "The job queue (Redis) is unreachable; retry shortly.", "server_error",
                      "service_unavailable", headers={"Retry-After": "2"})

    for kind in REDIS_DOWN:
        app.add_exception_handler(kind, redis_unavailable)

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"Internal error: {type(exc).__name__}", "server_error", "internal_error")


# ── middleware (pure ASGI: streams pass straight through) ────────────────────
class _BodyLimit:
    """413 for a body over the limit, whether it says its length or streams it."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise APIError(413, "too large")
            return message

        try:
            await self.app(scope, limited, send)
        except APIError as exc:
            if exc.status != 413:
                raise
            await self._reject(send)

    async def _reject(self, send: Send) -> None:
        response = _error(413, f"Request body over {self.max_bytes} bytes.", "invalid_request_error",
                          "request_too_large")
        await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.request", "body": b""}


class _RequestMetrics:
    """Requests by route template and status; duration to the last byte."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.API_REQUESTS.labels(route, scope["method"], str(status)).inc()
            metrics.API_REQUEST_DURATION.labels(route).observe(time.perf_counter() - started)
