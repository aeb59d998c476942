"""`python -m worker` runs a worker; `python -m worker --check` exits 0 if one is alive here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import time
from typing import Any

import orjson
from prometheus_client import start_http_server
from redis.asyncio import Redis

from shared import metrics
from shared.keys import Keys
from shared.settings import Settings, get_settings


async def check(settings: Settings) -> int:
    """Health check for containers: a worker of this host heartbeated within its TTL."""
    keys = Keys(settings.redis_prefix)
    redis = Redis.from_url(settings.redis_url, socket_timeout=3)
    try:
        beats = await redis.hgetall(keys.workers)
    except Exception as exc:
        print(f"unhealthy: redis unreachable: {exc}")
        return 1
    finally:
        await redis.aclose()
    host = socket.gethostname()
    for name, raw in beats.items():
        beat = orjson.loads(raw)
        age = time.time() - beat["last_seen"]
        if name.decode().startswith(host) and age < settings.heartbeat_ttl:
            print(f"healthy: {name.decode()} ({beat['engine']}:{beat['model']}, {beat['running']} running)")
            return 0
    print(f"unhealthy: no live worker of host {host}")
    return 1


async def serve(settings: Settings) -> None:
    from worker.engines import build_engine
    from worker.runtime import Worker

    engine = build_engine(settings)
    worker = Worker(settings, engine)
    metrics.init_worker_metrics(worker.model)
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, registry=metrics.WORKER_REGISTRY)
    worker.install_signal_handlers()
    try:
        await worker.run()
    finally:
        await worker.redis.aclose()


def _fast_loop() -> Any:
    """uvloop when installed (uvicorn[standard] brings it), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 0 if a worker of this host is alive")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    if args.check:
        sys.exit(asyncio.run(check(settings)))
    with asyncio.Runner(loop_factory=_fast_loop()) as runner:
        runner.run(serve(settings))


if __name__ == "__main__":
    main()
