# shellcheck shell=bash
# Local stand-ins for the official images, for hosts that cannot reach Docker Hub: a Debian
# bookworm base made with debootstrap, and Python, Redis, PostgreSQL and Prometheus images built
# on it from Debian's packages (deploy/images/*). Sourced by deploy/compose.sh. Each image is built
# only when missing, so a second run reuses them (`compose.sh clean` removes them).

LOCAL_PREFIX=sheepdog-local
LOCAL_BASE=$LOCAL_PREFIX/debian:bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

# name=directory under deploy/images
LOCAL_IMAGES=(
  "$LOCAL_PREFIX/python:3.11=python"
  "$LOCAL_PREFIX/redis:7=redis"
  "$LOCAL_PREFIX/postgres:15=postgres"
  "$LOCAL_PREFIX/prometheus:2=prometheus"
)

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# True when Docker Hub answers (then the compose file's own images are pulled).
registry_reachable() {
  [ "${SHEEPDOG_LOCAL_IMAGES:-}" = 1 ] && return 1
  timeout 60 docker pull -q redis:7-alpine >/dev/null 2>&1
}

build_local_base() {
  image_exists "$LOCAL_BASE" && return 0
  command -v debootstrap >/dev/null 2>&1 || engine_install || return 1
  local root
  root=$(mktemp -d /tmp/sheepdog-rootfs.XXXXXX)
  echo "compose: debootstrap bookworm (minbase) from $DEBIAN_MIRROR"
  if ! debootstrap --variant=minbase bookworm "$root" "$DEBIAN_MIRROR" >"$STATE_DIR/debootstrap.log" 2>&1; then
    echo "compose: debootstrap failed (see $STATE_DIR/debootstrap.log)" >&2
    rm -rf "$root"
    return 1
  fi
  cat >"$root/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb ${DEBIAN_MIRROR%/debian}/debian-security bookworm-security main
EOF
  # What a container base needs no copy of: apt's lists and caches, docs, man pages.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/var/log/*
  printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/locale/*\n' \
    >"$root/etc/dpkg/dpkg.cfg.d/01-slim"
  # Packages installed in a build must not try to start their services (as Docker's own images).
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d" && chmod +x "$root/usr/sbin/policy-rc.d"
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"$root/etc/apt/apt.conf.d/01-slim"
  tar -C "$root" -c . | docker import -c 'CMD ["bash"]' - "$LOCAL_BASE" >/dev/null
  rm -rf "$root"
  echo "compose: base image $LOCAL_BASE made"
}

build_local_images() {
  build_local_base || return 1
  local entry name dir
  for entry in "${LOCAL_IMAGES[@]}"; do
    name=${entry%%=*}
    dir=${entry#*=}
    image_exists "$name" && continue
    echo "compose: building $name from Debian's packages"
    docker build -q --build-arg BASE="$LOCAL_BASE" -t "$name" "$REPO/deploy/images/$dir" >/dev/null || return 1
  done
}

# The override that points the compose file at the local images (the compose file itself
# keeps the official names for hosts that reach Docker Hub).
write_local_override() {
  cat >"$1" <<EOF
# Written by deploy/compose.sh: Docker Hub was not reachable, so the stack runs on images built
# locally from Debian's packages (deploy/images/). Do not edit; it is rewritten on each compose-up.
services:
  redis:
    image: $LOCAL_PREFIX/redis:7
  postgres:
    image: $LOCAL_PREFIX/postgres:15
  prometheus:
    image: $LOCAL_PREFIX/prometheus:2
  migrate:
    build:
      context: .
      args:
        PYTHON_IMAGE: $LOCAL_PREFIX/python:3.11
EOF
}

remove_local_images() {
  local entry
  for entry in "${LOCAL_IMAGES[@]}"; do docker rmi -f "${entry%%=*}" >/dev/null 2>&1 || true; done
  docker rmi -f "$LOCAL_BASE" >/dev/null 2>&1 || true
}
