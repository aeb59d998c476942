#!/usr/bin/env python3
"""Container health check: GET /health (or /ready); exit 0 on HTTP 200, else 1.

    python scripts/healthcheck.py [--url http://localhost:8000] [--ready] [--timeout S]

Standard library only (runs in slim images). Prints one line. Proxies are ignored.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

BODY_PREVIEW_CHARS = 200


def probe(url: str, timeout_s: float) -> tuple[int | None, str]:
    """(HTTP status or None when unreachable, body preview or failure reason)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            return response.status, read_preview(response)
    except urllib.error.HTTPError as error:
        return error.code, read_preview(error)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        return None, str(reason)


def read_preview(response: object) -> str:
    read = getattr(response, "read", None)
    if read is None:
        return ""
    try:
        body: bytes = read(BODY_PREVIEW_CHARS)
    except OSError:
        return ""
    return " ".join(body.decode(errors="replace").split())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="GET /health (or /ready); exit 0 on 200.")
    parser.add_argument("--url", default="http://localhost:8000", help="server base URL")
    parser.add_argument("--ready", action="store_true", help="check /ready instead of /health")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    url = args.url.rstrip("/") + ("/ready" if args.ready else "/health")
    started = time.monotonic()
    status, detail = probe(url, args.timeout)
    elapsed_ms = (time.monotonic() - started) * 1000
    if status == 200:
        print(f"OK {url} 200 in {elapsed_ms:.0f} ms")
        return 0
    if status is None:
        print(f"FAIL {url} unreachable after {elapsed_ms:.0f} ms: {detail}")
    else:
        print(f"FAIL {url} {status} in {elapsed_ms:.0f} ms: {detail}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
