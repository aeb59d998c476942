#!/usr/bin/env bash
# API + one worker on this machine, joined by Redis. Ctrl-C stops both.
set -euo pipefail
py="${PYTHON:-.venv/bin/python}"
"$py" -m worker &
worker=$!
trap 'kill $worker 2>/dev/null; wait $worker 2>/dev/null' EXIT INT TERM
echo "worker: pid $worker (loading the model…)"
"$py" -m api
