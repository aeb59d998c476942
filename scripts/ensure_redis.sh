#!/usr/bin/env bash
# Make sure a Redis answers at REDIS_URL: use it if it does, start a local
# redis-server if it is on this machine, else say plainly what to do.
set -euo pipefail
url="${REDIS_URL:-redis://127.0.0.1:6379/0}"
py="${PYTHON:-.venv/bin/python}"
ping() { "$py" -c "import redis,sys; redis.Redis.from_url('$url', socket_connect_timeout=1).ping()" 2>/dev/null; }

if ping; then echo "redis: answering at $url"; exit 0; fi
hostport="${url#*://}"; hostport="${hostport#*@}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"; [ "$port" = "$host" ] && port=6379
if [[ "$host" =~ ^(127\.0\.0\.1|localhost)$ ]] && command -v redis-server >/dev/null; then
  echo "redis: none at $url; starting a local redis-server on port $port"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no >/dev/null
  for _ in $(seq 50); do ping && { echo "redis: started"; exit 0; }; sleep 0.1; done
fi
cat >&2 <<MSG
redis: nothing answers at $url, and no local redis-server could be started.
  Install one (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis),
  run one in a container (docker run -d -p 6379:6379 redis:7),
  or point REDIS_URL at yours (e.g. REDIS_URL=redis://host:6379/0 make run).
MSG
exit 1
