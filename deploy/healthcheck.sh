#!/bin/sh
# Container health checks that test the real thing (used by docker-compose.yml).
#   healthcheck.sh worker NAME PROCESSES  every node of this container answers `celery inspect
#                                         ping` (NAME@host, or NAME-1@host … NAME-N@host when the
#                                         worker runs N processes)
#   healthcheck.sh beat FILE MAX_AGE_S    beat saved its schedule FILE within MAX_AGE_S seconds
#                                         (it does every 3 minutes while its loop runs) and the
#                                         broker answers
set -eu
host=$(hostname)
case "${1:-}" in
  worker)
    name=$2 processes=${3:-1}
    if [ "$processes" -le 1 ]; then
      nodes="$name@$host"
    else
      nodes=$(seq -s, -f "$name-%g@$host" 1 "$processes")
    fi
    replies=$(celery -A workers.app inspect ping --timeout 5 --json --destination "$nodes" 2>/dev/null |
      grep -o '"ok"' | wc -l)
    [ "$replies" -ge "$processes" ] || { echo "$replies of $processes nodes answered ($nodes)"; exit 1; }
    echo "$nodes: pong"
    ;;
  beat)
    file=$2 max_age=$3
    newest=$(find "$(dirname "$file")" -maxdepth 1 -name "$(basename "$file")*" -newermt "-$max_age seconds" | head -1)
    [ -n "$newest" ] || { echo "beat: $file not saved in the last $max_age s"; exit 1; }
    python -c "import os, redis; redis.Redis.from_url(os.environ['SHEEPDOG_REDIS_URL'], socket_timeout=5).ping()"
    echo "beat: alive ($newest)"
    ;;
  *)
    echo "usage: healthcheck.sh worker NAME PROCESSES | beat FILE MAX_AGE_S" >&2
    exit 2
    ;;
esac
