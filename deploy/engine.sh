# shellcheck shell=bash
# A Docker engine for the compose stack: the one already running, or one started here (and, as
# root with apt, Debian's packages installed first). Sourced by deploy/compose.sh.
#
# dockerd changes the host: FORWARD policy DROP and its own chains (iptables / nf_tables), a
# docker0 bridge, net.ipv4.ip_forward=1. When this script starts dockerd it records all of that
# first and puts it back when it stops it (engine_stop); an engine it did not start is left alone.

ENGINE_STATE=${ENGINE_STATE:-$STATE_DIR/engine}

engine_running() { docker info >/dev/null 2>&1; }

engine_install() {
  local need=()
  command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
  command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
  command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
  [ ${#need[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "compose: missing ${need[*]} and cannot install them (needs root and apt-get)" >&2
    return 1
  fi
  echo "compose: installing Debian's ${need[*]}"
  # Installing must not start a daemon behind our back (policy-rc.d 101 = do not start services).
  local policy=/usr/sbin/policy-rc.d made_policy=""
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; }
  local rc=$?
  [ -n "$made_policy" ] && rm -f "$policy"
  return $rc
}

# Record what dockerd is about to change.
_firewall_save() {
  mkdir -p "$ENGINE_STATE"
  if command -v nft >/dev/null 2>&1 && iptables --version 2>/dev/null | grep -q nf_tables; then
    nft list ruleset >"$ENGINE_STATE/nft.before"
  else
    : >"$ENGINE_STATE/nft.none"
    iptables-save >"$ENGINE_STATE/iptables.before" 2>/dev/null || true
    ip6tables-save >"$ENGINE_STATE/ip6tables.before" 2>/dev/null || true
  fi
  sysctl -n net.ipv4.ip_forward >"$ENGINE_STATE/ip_forward.before"
  sysctl -n net.ipv6.conf.all.forwarding >"$ENGINE_STATE/ip6_forward.before" 2>/dev/null || true
  ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort >"$ENGINE_STATE/links.before"
  local dir
  for dir in /run/containerd /run/docker /var/run/docker; do
    if [ -e "$dir" ]; then echo "$dir"; fi
  done >"$ENGINE_STATE/run-dirs.before"
}

# Put back what _firewall_save recorded; remove the links dockerd made.
_firewall_restore() {
  if [ -f "$ENGINE_STATE/nft.before" ]; then
    { echo "flush ruleset"; cat "$ENGINE_STATE/nft.before"; } | nft -f -
  else
    local table
    for cmd in iptables ip6tables; do
      for table in filter nat mangle raw; do
        "$cmd" -t "$table" -F 2>/dev/null && "$cmd" -t "$table" -X 2>/dev/null || true
      done
      for chain in INPUT FORWARD OUTPUT; do "$cmd" -P "$chain" ACCEPT 2>/dev/null || true; done
    done
    [ -s "$ENGINE_STATE/iptables.before" ] && iptables-restore <"$ENGINE_STATE/iptables.before" || true
    [ -s "$ENGINE_STATE/ip6tables.before" ] && ip6tables-restore <"$ENGINE_STATE/ip6tables.before" || true
  fi
  sysctl -q -w net.ipv4.ip_forward="$(cat "$ENGINE_STATE/ip_forward.before")" >/dev/null
  [ -s "$ENGINE_STATE/ip6_forward.before" ] &&
    sysctl -q -w net.ipv6.conf.all.forwarding="$(cat "$ENGINE_STATE/ip6_forward.before")" >/dev/null
  local link
  ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort |
    comm -13 "$ENGINE_STATE/links.before" - | while read -r link; do
      case "$link" in docker0 | br-* | veth*) ip link delete "$link" 2>/dev/null || true ;; esac
    done
  # The engine's runtime directories (sockets, state), when it made them and nothing is still
  # mounted below them.
  local dir
  for dir in /run/containerd /run/docker /var/run/docker; do
    if [ -e "$dir" ] && ! grep -qx "$dir" "$ENGINE_STATE/run-dirs.before" &&
      ! awk '{print $2}' /proc/mounts | grep -q "^$dir/"; then
      rm -rf "$dir"
    fi
  done
  return 0
}

engine_start() {
  if engine_running; then echo "compose: using the running Docker engine"; return 0; fi
  if [ -e /var/run/docker.sock ] && [ ! -f "$ENGINE_STATE/dockerd.pid" ]; then
    echo "compose: /var/run/docker.sock exists but no engine answers; not starting another" >&2
    return 1
  fi
  engine_install || return 1
  [ "$(id -u)" = 0 ] || { echo "compose: no Docker engine, and starting one needs root" >&2; return 1; }
  echo "compose: starting dockerd (recording the firewall first; compose-down puts it back)"
  _firewall_save
  # Its own data root: images cached across runs, nothing mixed with another engine's.
  local root=${SHEEPDOG_DOCKER_ROOT:-/var/lib/docker}
  mkdir -p "$root"
  # setsid: the engine outlives the make that started it, until compose-down stops it.
  setsid dockerd --storage-driver=overlay2 --data-root "$root" \
    </dev/null >"$ENGINE_STATE/dockerd.log" 2>&1 &
  echo $! >"$ENGINE_STATE/dockerd.pid"
  for _ in $(seq 120); do
    engine_running && { echo "compose: dockerd up (pid $(cat "$ENGINE_STATE/dockerd.pid"))"; return 0; }
    kill -0 "$(cat "$ENGINE_STATE/dockerd.pid")" 2>/dev/null || break
    sleep 0.5
  done
  echo "compose: dockerd did not start; its log:" >&2
  tail -20 "$ENGINE_STATE/dockerd.log" >&2
  engine_stop
  return 1
}

# Stop dockerd if this script started it, then restore the host.
engine_stop() {
  [ -f "$ENGINE_STATE/dockerd.pid" ] || return 0
  local pid
  pid=$(cat "$ENGINE_STATE/dockerd.pid")
  if kill -0 "$pid" 2>/dev/null; then
    echo "compose: stopping dockerd (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  _firewall_restore
  echo "compose: firewall, forwarding and links restored"
  rm -rf "$ENGINE_STATE"
}
