"""The arq worker on its own: `arq shared.arq_worker.WorkerSettings`.

A module of its own because arq's CLI wants settings as class attributes, read
at import: nothing else imports it, so no other process pays for that.
"""

from __future__ import annotations

from typing import Any

import httpx
from arq.connections import RedisSettings
from redis.asyncio import Redis

from shared.jobs import JobStore
from shared.keys import Keys
from shared.settings import get_settings
from shared.webhooks import CRON_JOBS, deliver_webhook, queue_name


class WorkerSettings:
    """`arq shared.arq_worker.WorkerSettings` runs deliveries and housekeeping apart from the engine workers
    (set RUN_ARQ=false on those). Settings come from the environment like everything else."""

    functions = [deliver_webhook]
    cron_jobs = CRON_JOBS
    queue_name = queue_name(get_settings())
    redis_settings = RedisSettings.from_dsn(get_settings().redis_url)

    @staticmethod
    async def on_startup(ctx: dict[str, Any]) -> None:
        settings = get_settings()
        redis = Redis.from_url(settings.redis_url)
        ctx.update(settings=settings, store=JobStore(redis, Keys(settings.redis_prefix), settings.result_ttl),
                   http=httpx.AsyncClient(timeout=settings.webhook_timeout))
