"""Every Redis key name of the project, and nothing else.

The keys of one job share the hash tag ``{id}`` so a job's keys live in one
slot and the layout also works on Redis Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "workers"  # the consumer group of every job stream
PRIORITIES = ("high", "normal", "low")


@dataclass(frozen=True)
class Keys:
    prefix: str = "llm:"

    def jobs(self, model: str, priority: str = "normal") -> str:
        """The job stream of a model; one lane per priority."""
        lane = "" if priority == "normal" else f":{priority}"
        return f"{self.prefix}jobs:{model}{lane}"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{{{job_id}}}"

    def log(self, job_id: str) -> str:
        """Every event of the job, in order: replay and the retry checkpoint."""
        return f"{self.prefix}job:{{{job_id}}}:log"

    def events(self, job_id: str) -> str:
        """The pub/sub channel of the job's live events (for readers that resume it)."""
        return f"{self.prefix}job:{{{job_id}}}:events"

    def inbox(self, pod: str) -> str:
        """The pub/sub channel of one API pod: the live events of every job it submitted, each
        message prefixed by the job id. One subscription per pod, none per request."""
        return f"{self.prefix}inbox:{pod}"

    def idempotency(self, owner: str, key: str) -> str:
        return f"{self.prefix}idem:{owner}:{key}"

    def owner_jobs(self, owner: str) -> str:
        """Sorted set of an owner's jobs by creation time (listing)."""
        return f"{self.prefix}owner:{owner}:jobs"

    @property
    def cancel(self) -> str:
        return f"{self.prefix}cancel"

    @property
    def workers(self) -> str:
        """Hash: worker name → JSON heartbeat (model, engine, batch, last seen)."""
        return f"{self.prefix}workers"

    def worker_alive(self, name: str) -> str:
        """Key with a TTL; gone when the worker stopped heartbeating."""
        return f"{self.prefix}worker:{name}"

    def dead(self, model: str) -> str:
        return f"{self.prefix}dead:{model}"

    @property
    def models(self) -> str:
        """Set of models that ever had a queue (for metrics and stats)."""
        return f"{self.prefix}models"
