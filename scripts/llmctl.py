#!/usr/bin/env python3
"""llmctl: submit, poll, stream, cancel and list llm-serving jobs from the command line.

    llmctl submit "Write a haiku" [--max-tokens 64] [--priority high] [--webhook URL] [--wait 30] [--stream]
    llmctl get JOB_ID            llmctl wait JOB_ID [--timeout 600]
    llmctl stream JOB_ID [--after SEQ]
    llmctl cancel JOB_ID         llmctl list [--status running] [--limit 20] [--cursor C]

LLM_URL (default http://localhost:8000) and LLM_API_KEY configure it; so do --url and --api-key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import httpx


def _client(args: argparse.Namespace) -> httpx.Client:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.url, headers=headers, timeout=httpx.Timeout(30, read=None))


def _check(r: httpx.Response) -> dict[str, Any]:
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except Exception:
            message = r.text
        sys.exit(f"error {r.status_code}: {message}")
    data: dict[str, Any] = r.json()
    return data


def _show(data: dict[str, Any]) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def submit(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"model": args.model, "max_tokens": args.max_tokens, "priority": args.priority}
    if args.completion:
        body["prompt"] = args.prompt
    else:
        body["messages"] = [{"role": "user", "content": args.prompt}]
    if args.temperature is not None:
        body["temperature"] = args.temperature
    if args.timeout:
        body["timeout"] = args.timeout
    if args.webhook:
        body["webhook"] = args.webhook
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    with _client(args) as http:
        job = _check(http.post("/v1/jobs", json=body, headers=headers, params={"wait": args.wait}))
        if args.stream:
            print(f"# {job['id']}", file=sys.stderr)
            _stream(http, job["id"], -1)
        else:
            _show(job)


def _stream(http: httpx.Client, job_id: str, after: int) -> None:
    with http.stream("GET", f"/v1/jobs/{job_id}/events", params={"after": after}) as r:
        if r.status_code >= 400:
            r.read()
            _check(r)
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            print(event.get("text", ""), end="", flush=True)
            if event.get("error"):
                sys.exit(f"\nerror: {event['error']['message']}")
            if event.get("finish_reason"):
                print(f"\n# finish_reason={event['finish_reason']} usage={event.get('usage')}", file=sys.stderr)
                return


def get(args: argparse.Namespace) -> None:
    with _client(args) as http:
        _show(_check(http.get(f"/v1/jobs/{args.job_id}")))


def wait(args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.timeout
    with _client(args) as http:
        while True:
            job = _check(http.get(f"/v1/jobs/{args.job_id}"))
            if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
                _show(job)
                return
            time.sleep(args.interval)


def stream(args: argparse.Namespace) -> None:
    with _client(args) as http:
        _stream(http, args.job_id, args.after)


def cancel(args: argparse.Namespace) -> None:
    with _client(args) as http:
        _show(_check(http.delete(f"/v1/jobs/{args.job_id}")))


def list_jobs(args: argparse.Namespace) -> None:
    params: dict[str, Any] = {"limit": args.limit}
    if args.status:
        params["status"] = args.status
    if args.cursor:
        params["cursor"] = args.cursor
    with _client(args) as http:
        page = _check(http.get("/v1/jobs", params=params))
    for job in page["data"]:
        print(f"{job['id']}  {job['status']:<9}  {job['priority']:<6}  {job['model']}  "
              f"tokens={(job['usage'] or {}).get('completion_tokens', '-')}")
    if page["next_cursor"]:
        print(f"# next page: --cursor {page['next_cursor']}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llmctl", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("LLM_URL", "http://localhost:8000"))
    parser.add_argument("--api-key", default=os.environ.get("LLM_API_KEY", ""))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("submit", help="submit a job")
    p.add_argument("prompt")
    p.add_argument("--model", default=os.environ.get("LLM_MODEL", "default"))
    p.add_argument("--completion", action="store_true", help="a plain completion, not a chat")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float)
    p.add_argument("--priority", choices=["high", "normal", "low"], default="normal")
    p.add_argument("--timeout", type=float, help="seconds the job may wait in the queue")
    p.add_argument("--webhook")
    p.add_argument("--idempotency-key")
    p.add_argument("--wait", type=float, default=0, help="answer with the result if done within this many seconds")
    p.add_argument("--stream", action="store_true", help="print the tokens as they come")
    p.set_defaults(run=submit)

    for name, run in (("get", get), ("cancel", cancel)):
        p = sub.add_parser(name, help=f"{name} a job")
        p.add_argument("job_id")
        p.set_defaults(run=run)
    p = sub.add_parser("wait", help="poll until the job ends")
    p.add_argument("job_id")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--interval", type=float, default=0.5)
    p.set_defaults(run=wait)
    p = sub.add_parser("stream", help="print a job's tokens, from the start or after a seq")
    p.add_argument("job_id")
    p.add_argument("--after", type=int, default=-1)
    p.set_defaults(run=stream)
    p = sub.add_parser("list", help="your recent jobs, newest first")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled", "expired"])
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--cursor")
    p.set_defaults(run=list_jobs)

    args = parser.parse_args(argv)
    args.url = args.url.rstrip("/")
    args.run(args)


if __name__ == "__main__":
    main()
