"""OpenAI-compatible request and response models; a request turns itself into a job."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.jobs import JobSpec, Priority, Sampling


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Limits(BaseModel):
    """What the API enforces on a request before it is queued."""

    max_tokens_cap: int
    default_max_tokens: int


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def plain(self) -> dict[str, str]:
        """The message with its content as one string (text parts joined)."""
        content = self.content or ""
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Generation(BaseModel):
    """Fields shared by chat and completion requests. Unknown fields are ignored, as vLLM does."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling(self, limits: Limits) -> Sampling:
        wanted = self.requested_max_tokens()
        if wanted is not None and wanted > limits.max_tokens_cap:
            raise APIError(400, f"max_tokens is {wanted}, over this server's cap of {limits.max_tokens_cap}.",
                           param="max_tokens", code="max_tokens_exceeded")
        max_tokens = wanted if wanted is not None else limits.default_max_tokens
        stop = self.stop if isinstance(self.stop, list) else []
        return Sampling(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, stop=stop,
                        seed=self.seed)


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_spec(self, model: str, owner: str, limits: Limits, **job: Any) -> JobSpec:
        try:
            messages = [m.plain() for m in self.messages]
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        return JobSpec(model=model, kind="chat", messages=messages, sampling=self.sampling(limits), owner=owner,
                       **job)


class CompletionRequest(_Generation):
    prompt: str | list[int] = Field(description="text, or token ids")
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[int]) -> str | list[int]:
        if isinstance(v, list) and any(t < 0 for t in v):
            raise ValueError("token ids must be non-negative")
        return v

    def to_spec(self, model: str, owner: str, limits: Limits, **job: Any) -> JobSpec:
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        return JobSpec(model=model, kind="completion", prompt=self.prompt, sampling=self.sampling(limits),
                       owner=owner, **job)


WebhookEvent = Literal["started", "completed", "failed", "cancelled", "expired"]
DEFAULT_WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("completed", "failed", "cancelled", "expired")


class JobOptions(BaseModel):
    """What a submitted job adds to a chat or completion request."""

    priority: Priority = "normal"
    timeout: float | None = Field(None, gt=0, description="seconds the job may wait in the queue")
    webhook: str | None = Field(None, description="URL that receives the job's events")
    webhook_events: list[WebhookEvent] = Field(default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS))


class ChatJobRequest(ChatCompletionRequest, JobOptions):
    pass


class CompletionJobRequest(CompletionRequest, JobOptions):
    pass


def now() -> int:
    return int(time.time())
