#!/usr/bin/env bash
# The compose stack, for real: `deploy/compose.sh up|smoke|down|clean` (make compose-up, ...).
#   up     a Docker engine (the running one, or dockerd started here), the base images (pulled
#          from Docker Hub, or built from Debian's packages when it cannot be reached), the
#          Sheepdog image, the stack; waits until every service is healthy and migrate exited 0
#   smoke  the demo's workload through the running stack (deploy/smoke-inside.sh); exit 0 only
#          when every request succeeded
#   down   stops the stack and removes its containers, network and volumes; stops dockerd and
#          restores the firewall if `up` started it
#   clean  down, then removes the images too (the next `up` starts cold)
#   engine only the engine (running, or started here): fails when none can be had
# Settings (environment): FLOWER_PORT (5555), PROMETHEUS_PORT (9090), SHEEPDOG_FLOWER_BASIC_AUTH
# (default admin:<random>, kept in var/compose/), SHEEPDOG_EXTRA_CA_DIR (extra CA certificates to
# trust, default /usr/local/share/ca-certificates), SHEEPDOG_LOCAL_IMAGES=1 (skip Docker Hub),
# SHEEPDOG_DOCKER_ROOT (data root of a dockerd started here), COMPOSE_PROJECT_NAME (sheepdog).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
STATE_DIR=${SHEEPDOG_COMPOSE_STATE:-$REPO/var/compose}
mkdir -p "$STATE_DIR"
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-sheepdog}
# shellcheck source=deploy/engine.sh
source "$REPO/deploy/engine.sh"
# shellcheck source=deploy/base-images.sh
source "$REPO/deploy/base-images.sh"

OVERRIDE=$STATE_DIR/docker-compose.local.yml
ENV_FILE=$STATE_DIR/compose.env
UP_TIMEOUT_S=${UP_TIMEOUT_S:-600}

compose() {
  local files=(-f "$REPO/docker-compose.yml")
  [ -f "$OVERRIDE" ] && files+=(-f "$OVERRIDE")
  docker-compose --project-directory "$REPO" "${files[@]}" --env-file "$ENV_FILE" "$@"
}

step() { printf '\n== %s\n' "$*"; }
took() { printf '   (%d s)\n' $((SECONDS - $1)); }

# The stack's settings for this host: Flower's password, ports, a lively batch cadence.
write_env() {
  local auth=${SHEEPDOG_FLOWER_BASIC_AUTH:-}
  if [ -z "$auth" ] && [ -f "$STATE_DIR/flower-auth" ]; then auth=$(cat "$STATE_DIR/flower-auth"); fi
  if [ -z "$auth" ]; then auth="admin:$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"; fi
  (umask 077 && printf '%s\n' "$auth" >"$STATE_DIR/flower-auth")
  (umask 077 && cat >"$ENV_FILE" <<EOF
SHEEPDOG_FLOWER_BASIC_AUTH=$auth
FLOWER_PORT=${FLOWER_PORT:-5555}
PROMETHEUS_PORT=${PROMETHEUS_PORT:-9090}
SHEEPDOG_BATCH_FLUSH_INTERVAL_S=${SHEEPDOG_BATCH_FLUSH_INTERVAL_S:-5}
SHEEPDOG_BATCH_POLL_INTERVAL_S=${SHEEPDOG_BATCH_POLL_INTERVAL_S:-2}
SIMULATOR_TIME_SCALE=${SIMULATOR_TIME_SCALE:-10}
STREAM_PROCESSES=${STREAM_PROCESSES:-2}
EOF
  )
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

copy_extra_ca() {
  local src=${SHEEPDOG_EXTRA_CA_DIR-/usr/local/share/ca-certificates} dest=$REPO/deploy/ca-certificates
  rm -f "$dest"/*.crt
  [ -n "$src" ] && [ -d "$src" ] || return 0
  local crt n=0
  while IFS= read -r -d '' crt; do
    cp "$crt" "$dest/extra-$n-$(basename "$crt")"
    n=$((n + 1))
  done < <(find "$src" -name '*.crt' -print0)
  [ $n -gt 0 ] && echo "compose: the image trusts $n extra CA certificate(s) from $src"
  return 0
}

# Every service healthy (or, for migrate, exited 0); prints the states while it waits.
wait_healthy() {
  local deadline=$((SECONDS + UP_TIMEOUT_S)) states bad
  while :; do
    states=$(compose ps -q | xargs -r docker inspect -f \
      '{{index .Config.Labels "com.docker.compose.service"}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}-{{end}} {{.State.ExitCode}}')
    bad=$(awk '($1 == "migrate" && !($2 == "exited" && $4 == 0)) || ($1 != "migrate" && $3 != "healthy")' <<<"$states")
    if [ -z "$bad" ] && [ -n "$states" ]; then
      awk '{printf "   %-14s %s\n", $1, ($1 == "migrate" ? "exited " $4 : $3)}' <<<"$states" | sort
      return 0
    fi
    if awk '$1 == "migrate" && $2 == "exited" && $4 != 0 {found=1} END {exit !found}' <<<"$states"; then
      echo "compose: migrate failed:" >&2; compose logs --tail 40 migrate >&2; return 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "compose: not healthy after ${UP_TIMEOUT_S}s:" >&2
      echo "$bad" >&2
      compose logs --tail 30 $(awk '{print $1}' <<<"$bad" | sort -u) >&2 || true
      return 1
    fi
    sleep 2
  done
}

cmd_up() {
  local t0=$SECONDS t
  step "engine"
  engine_start
  step "base images"
  t=$SECONDS
  if registry_reachable; then
    echo "compose: Docker Hub answers: the official images"
    rm -f "$OVERRIDE"
    write_env
    compose pull -q redis postgres prometheus
  else
    echo "compose: Docker Hub cannot be reached: images built from Debian's packages (deploy/images/)"
    build_local_images
    write_local_override "$OVERRIDE"
    write_env
  fi
  took $t
  for port in "${FLOWER_PORT:-5555}" "${PROMETHEUS_PORT:-9090}"; do
    if ! port_free "$port" && ! compose ps -q | grep -q .; then
      echo "compose: 127.0.0.1:$port is taken; set FLOWER_PORT / PROMETHEUS_PORT" >&2
      return 1
    fi
  done
  step "the Sheepdog image"
  t=$SECONDS
  copy_extra_ca
  compose build migrate 2>&1 | grep -v -e '^DEPRECATED' -e 'Install the buildx' -e 'docs.docker.com/go/buildx' -e '^ *$' | tail -5
  [ "${PIPESTATUS[0]}" -eq 0 ] || return 1
  rm -f "$REPO"/deploy/ca-certificates/*.crt
  # The previous build's image, untagged now (the build stage stays: the next build's cache).
  docker image prune -f --filter label=sheepdog.stage=runtime >/dev/null
  echo "   sheepdog:latest $(docker image inspect -f '{{.Size}}' sheepdog:latest | awk '{printf "%.0f MB", $1 / 1e6}')"
  took $t
  step "the stack"
  t=$SECONDS
  compose up -d --no-build --remove-orphans 2>&1 | grep -v -e '^$' || true
  wait_healthy
  took $t
  local auth
  auth=$(cut -d: -f1 "$STATE_DIR/flower-auth")
  cat <<EOF

Sheepdog is up ($((SECONDS - t0)) s):
  Flower       http://127.0.0.1:${FLOWER_PORT:-5555}/   user $auth, password in $STATE_DIR/flower-auth
  API          http://127.0.0.1:${API_PORT:-8080}/v1   (keys: docker-compose exec api sheepdog keys create --tenant T)
  Prometheus   http://127.0.0.1:${PROMETHEUS_PORT:-9090}/targets  (every worker's /metrics, scraped),
               http://127.0.0.1:${PROMETHEUS_PORT:-9090}/alerts   (deploy/prometheus/alerts.yml)
  Worker metrics, raw: docker-compose exec worker-stream python -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9808/metrics').read().decode())"
  Next: make compose-smoke; make compose-down
EOF
}

cmd_smoke() {
  engine_running || { echo "compose: no Docker engine; run make compose-up first" >&2; return 1; }
  [ -f "$ENV_FILE" ] || { echo "compose: the stack is not up; run make compose-up first" >&2; return 1; }
  local t=$SECONDS
  # A one-off client container on the stack's network, like any producer: it submits, follows
  # the streams over Redis pub/sub and reads the results; nothing runs inside the services.
  compose run --rm --no-deps -T -e COLUMNS="${COLUMNS:-120}" --entrypoint deploy/smoke-inside.sh \
    worker-batch
  echo "compose smoke: $((SECONDS - t)) s"
}

cmd_down() {
  if engine_running; then
    [ -f "$ENV_FILE" ] || write_env
    compose down --volumes --remove-orphans --timeout 20 2>&1 | grep -v '^$' || true
  fi
  engine_stop
  rm -f "$ENV_FILE" "$OVERRIDE" "$REPO"/deploy/ca-certificates/*.crt
}

cmd_clean() {
  if engine_running || engine_start; then
    [ -f "$ENV_FILE" ] || write_env
    compose down --volumes --remove-orphans --rmi all --timeout 20 || true
    remove_local_images
    docker image prune -f --filter label=sheepdog.stage >/dev/null 2>&1 || true
  fi
  cmd_down
  rm -rf "$STATE_DIR"
}

case "${1:-}" in
  engine) engine_start ;;  # only the engine: CI asks whether one can be had
  up) cmd_up ;;
  smoke) cmd_smoke ;;
  down) cmd_down ;;
  clean) cmd_clean ;;
  *) echo "usage: deploy/compose.sh up|smoke|down|clean|engine" >&2; exit 2 ;;
esac
