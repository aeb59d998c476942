"""The job resource as clients see it: `GET /v1/jobs/{id}` and webhook payloads."""

from __future__ import annotations

from typing import Any

import orjson

from shared.events import Event
from shared.jobs import JobSpec


def _num(job: dict[str, str], key: str) -> float | None:
    return float(job[key]) if job.get(key) else None


def job_view(job: dict[str, str], events: list[Event]) -> dict[str, Any]:
    """Status, output so far, result, usage and timings of a job."""
    spec = JobSpec.model_validate_json(job["spec"])
    created, started = _num(job, "created_at"), _num(job, "started_at")
    first, finished = _num(job, "first_token_at"), _num(job, "finished_at")
    output = "".join(e.text for e in events)
    view: dict[str, Any] = {
        "id": job["id"], "object": "job", "status": job["status"], "model": spec.model, "kind": spec.kind,
        "priority": spec.priority, "attempts": int(job.get("attempts", 0)), "worker": job.get("worker"),
        "created_at": created, "started_at": started, "first_token_at": first, "finished_at": finished,
        "timings": {
            "queued_s": _delta(created, started), "time_to_first_token_s": _delta(created, first),
            "total_s": _delta(created, finished),
        },
        "output": output, "tokens": len([t for e in events for t in e.ids]),
        "finish_reason": job.get("finish_reason"),
        "usage": orjson.loads(job["usage"]) if job.get("usage") else None,
        "error": _public_error(job),
    }
    if spec.webhook:
        deliveries = [orjson.loads(v) for k, v in job.items() if k.startswith("delivery:")]
        view["webhook"] = {**spec.webhook, "deliveries": sorted(deliveries, key=lambda d: d["at"])}
    if job["status"] == "succeeded":
        view["result"] = _result(spec, job, output)
    return view


def _delta(a: float | None, b: float | None) -> float | None:
    return round(b - a, 4) if a is not None and b is not None else None


def _public_error(job: dict[str, str]) -> dict[str, Any] | None:
    if not job.get("error"):
        return None
    error = orjson.loads(job["error"])
    error.pop("status", None)
    return error


def _result(spec: JobSpec, job: dict[str, str], text: str) -> dict[str, Any]:
    """The OpenAI-shaped response the same request would have got synchronously."""
    reason = "stop" if job.get("finish_reason") in ("stop", None) else job["finish_reason"]
    usage = orjson.loads(job["usage"]) if job.get("usage") else {}
    if spec.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "logprobs": None, "finish_reason": reason}
        obj = "chat.completion"
    else:
        choice, obj = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}, "text_completion"
    return {"id": spec.id, "object": obj, "created": int(spec.created_at), "model": spec.model,
            "choices": [choice], "usage": usage}
