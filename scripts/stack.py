"""Real processes for tests: API pods and workers as subprocesses on one real Redis."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the process' life
        self.popen = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL to the whole process group (a vLLM worker has engine children): no chance to clean up."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")


class Stack:
    """Starts API pods and workers that share one Redis key prefix (isolated per test)."""

    def __init__(self, redis_url: str, prefix: str, log_dir: Path, **env: str):
        self.redis_url, self.prefix, self.log_dir = redis_url, prefix, log_dir
        self.base_env = {**os.environ, "REDIS_URL": redis_url, "REDIS_PREFIX": prefix,
                         "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "HEARTBEAT_INTERVAL": "0.5",
                         "HEARTBEAT_TTL": "2", "WORKER_METRICS_PORT": "0", **env}
        self.procs: list[Proc] = []
        self.redis = redis.Redis.from_url(redis_url)

    def _env(self, env: dict[str, str]) -> dict[str, str]:
        return {**self.base_env, **{k.upper(): str(v) for k, v in env.items()}}

    def api(self, **env: str) -> str:
        port = free_port()
        proc = Proc(f"api-{len(self.procs)}", [sys.executable, "-m", "api"],
                    self._env({"api_port": str(port), **env}), self.log_dir)
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        self._wait(lambda: httpx.get(url + "/health", timeout=1).status_code == 200, proc, 30)
        return url

    def worker(self, name: str | None = None, wait: float = 120, python: str = sys.executable, **env: str) -> Proc:
        """A worker (synthetic engine unless told otherwise), ready once it heartbeats."""
        name = name or f"w{len(self.procs)}"
        env = {"inference_engine": "synthetic", "worker_name": name, **env}
        proc = Proc(f"worker-{name}", [python, "-m", "worker"], self._env(env), self.log_dir)
        self.procs.append(proc)
        self._wait(lambda: self.redis.exists(f"{self.prefix}worker:{name}") == 1, proc, wait)
        return proc

    def _wait(self, ready: object, proc: Proc, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not proc.alive:
                raise RuntimeError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
            try:
                if ready():  # type: ignore[operator]
                    return
            except Exception:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{proc.name} not ready after {timeout}s:\n{proc.log()[-3000:]}")

    def job(self, job_id: str) -> dict[str, str]:
        raw = self.redis.hgetall(f"{self.prefix}job:{{{job_id}}}")
        return {k.decode(): v.decode() for k, v in raw.items()}

    def stop_processes(self) -> None:
        for proc in self.procs:
            proc.kill()

    def stop(self) -> None:
        """Kill every process and delete the stack's keys."""
        self.stop_processes()
        keys = list(self.redis.scan_iter(match=f"{self.prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            self.redis.delete(*keys[i:i + 500])
        self.redis.close()

    def logs(self) -> str:
        return "\n".join(f"──── {p.name} ────\n{p.log()[-4000:]}" for p in self.procs)
