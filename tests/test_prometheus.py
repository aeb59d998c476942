"""A real Prometheus scrapes a real API and two synthetic workers; every query
of the Grafana dashboard must then return data.

The scrape config is the project's own deploy/prometheus/prometheus.yml with
the compose DNS names (api, worker) replaced by the local processes' addresses
and a 1 s scrape interval. Needs Redis (REDIS_URL, default 127.0.0.1:6379) and
the `prometheus` binary (Debian's package, via scripts/install_test_tools.sh).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "llm-serving.json"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
MODEL = "smollm2-135m-instruct"
POISON = "poison-prompt-for-the-synthetic-engine"
WORKERS = 2
# Grafana variables: all models; a rate window that spans the whole test.
VARIABLES = {"$__rate_interval": "1m", "$model": ".*"}


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found:
        return found
    script = ROOT / "scripts" / "install_test_tools.sh"
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False, timeout=900)
    found = shutil.which("prometheus")
    if not found:
        pytest.skip(
            "the prometheus binary is missing and scripts/install_test_tools.sh could not install it:\n"
            + (result.stdout + result.stderr)[-2000:]
        )
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait(what: str, check: Callable[[], bool], timeout: float, logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError, KeyError, ValueError):
            pass
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{logs()}")


class Processes:
    """Child processes with their output in files, stopped at teardown."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        with (self.directory / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(
                cmd, cwd=self.directory, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def logs(self) -> str:
        parts = []
        for name, proc in self.procs.items():
            text = (self.directory / f"{name}.log").read_text(errors="replace")
            parts.append(f"--- {name} (exit code {proc.poll()}) ---\n{text[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def scrape_config(api: str, workers: list[str]) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with local targets for the compose names, scraped every 1 s."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_YML.read_text())
    hosts = {"api": [api], "worker": workers, "worker-gpu": []}
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    for job in config["scrape_configs"]:
        job.pop("scrape_interval", None)
        job.pop("scrape_timeout", None)
        targets: list[str] = []
        for static in job.pop("static_configs", []):
            for target in static["targets"]:
                host = target.rsplit(":", 1)[0]
                assert host in hosts, f"job {job['job_name']}: no local stand-in for {target}"
                targets += hosts[host]
        for dns in job.pop("dns_sd_configs", []):
            for name in dns["names"]:
                assert name in hosts, f"job {job['job_name']}: no local stand-in for DNS name {name}"
                targets += hosts[name]
        assert targets, f"job {job['job_name']} has no targets"
        job["static_configs"] = [{"targets": targets}]
    return config


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], expr))
    return queries


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    prometheus = _prometheus_binary()
    db = redis.Redis.from_url(REDIS_URL)
    try:
        db.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is needed at {REDIS_URL}: {exc}")
    prefix = f"test-prom-{uuid.uuid4().hex[:8]}:"
    env = {
        **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "REDIS_URL": REDIS_URL,
        "REDIS_PREFIX": prefix,
        "API_HOST": "127.0.0.1",
        "API_KEYS": "",
        "INFERENCE_ENGINE": "synthetic",
        "SERVED_MODEL_NAME": MODEL,
        "SYNTHETIC_TOKENS_PER_SECOND": "200",
        "SYNTHETIC_FAIL_ON": POISON,
        "MAX_ATTEMPTS": "2",
    }
    procs = Processes(tmp_path)
    api_port, prom_port = _free_port(), _free_port()
    worker_ports = [_free_port() for _ in range(WORKERS)]
    try:
        procs.start("api", [sys.executable, "-m", "api"], {**env, "API_PORT": str(api_port)})
        for i, port in enumerate(worker_ports):
            procs.start(f"worker{i}", [sys.executable, "-m", "worker"], {**env, "WORKER_METRICS_PORT": str(port)})
        api = f"http://127.0.0.1:{api_port}"
        client = httpx.Client(base_url=api, timeout=30, trust_env=False)

        def models_served() -> bool:
            models = client.get("/v1/models").json()["data"]
            return any(m["id"] == MODEL and m.get("workers", WORKERS) >= WORKERS for m in models)

        _wait("the api and both workers", models_served, 60, procs.logs)

        def worker_metrics_served() -> bool:
            urls = [f"http://127.0.0.1:{port}/metrics" for port in worker_ports]
            return all(httpx.get(url, trust_env=False).is_success for url in urls)

        _wait("the workers' metrics endpoints", worker_metrics_served, 30, procs.logs)

        config = tmp_path / "prometheus.yml"
        local_targets = [f"127.0.0.1:{p}" for p in worker_ports]
        config.write_text(yaml.safe_dump(scrape_config(f"127.0.0.1:{api_port}", local_targets)))
        procs.start(
            "prometheus",
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
            env,
        )
        prom = httpx.Client(base_url=f"http://127.0.0.1:{prom_port}", timeout=10, trust_env=False)
        _wait("prometheus to be ready", lambda: prom.get("/-/ready").is_success, 60, procs.logs)

        def all_targets_up() -> bool:
            active = prom.get("/api/v1/targets").json()["data"]["activeTargets"]
            return len(active) == 1 + WORKERS and all(t["health"] == "up" for t in active)

        _wait("every scrape target to be up", all_targets_up, 30, procs.logs)
        yield {"api": client, "prom": prom, "logs": procs.logs}
        client.close()
        prom.close()
    finally:
        procs.stop()
        keys = list(db.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            db.delete(*keys)
        db.close()


def _chat(client: httpx.Client, content: str, stream: bool) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 12, "stream": stream}
    if not stream:
        return client.post("/v1/chat/completions", json=body).status_code
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        for _ in response.iter_lines():
            pass
        return response.status_code


def _traffic(client: httpx.Client) -> list[int]:
    """Concurrent chats, streamed and not, then two 4xx: 8 x 200, 2 x 4xx."""
    calls: list[Callable[[], int]] = [
        *(lambda i=i: _chat(client, f"hello {i}", stream=i % 2 == 0) for i in range(8)),
        lambda: client.post("/v1/chat/completions", json={"model": MODEL}).status_code,
        lambda: client.post("/v1/chat/completions", json={"model": "no-such-model", "messages": []}).status_code,
    ]
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def _query(prom: httpx.Client, expr: str) -> list[dict[str, Any]]:
    response = prom.get("/api/v1/query", params={"query": expr})
    body = response.json()
    assert body["status"] == "success", f"{expr}: {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_every_dashboard_query_returns_data(stack: dict[str, Any]) -> None:
    client: httpx.Client = stack["api"]
    prom: httpx.Client = stack["prom"]
    with ThreadPoolExecutor(max_workers=1) as background:
        # A prompt that crashes the engine: the job fails (after its retries).
        poisoned = background.submit(_chat, client, f"please {POISON}", False)
        # Two waves a few scrapes apart: the first creates the labelled series,
        # the second makes their rates (and so the quantiles) non-zero.
        first = _traffic(client)
        time.sleep(3)
        second = _traffic(client)
        assert poisoned.result(timeout=90) >= 500
    for statuses in (first, second):
        assert statuses[:8] == [200] * 8, statuses
        assert all(400 <= s < 500 for s in statuses[8:]), statuses

    queries = dashboard_queries()
    assert queries
    missing: dict[str, str] = {}
    deadline = time.monotonic() + 20
    while True:
        missing = {}
        for title, expr in queries:
            result = _query(prom, expr)
            values = [float(r["value"][1]) for r in result]
            if not values:
                missing[expr] = f"{title}: no series"
            elif "histogram_quantile" in expr and all(math.isnan(v) for v in values):
                missing[expr] = f"{title}: only NaN (no observations in the window)"
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, "dashboard queries without data:\n" + "\n".join(
        f"  {why}\n    {expr}" for expr, why in missing.items()
    )

    # The dashboard's `model` variable: label_values(llm_queue_depth, model).
    values = prom.get("/api/v1/label/model/values", params={"match[]": "llm_queue_depth"}).json()["data"]
    assert MODEL in values
    # Both worker replicas were scraped as separate targets of the `worker` job.
    up = _query(prom, 'sum(up{job="worker"})')
    assert float(up[0]["value"][1]) == WORKERS
