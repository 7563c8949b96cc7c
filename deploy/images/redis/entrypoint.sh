#!/bin/sh
# As the official image does: a redis-server started without a config file listens on every
# interface of the container with protected mode off (the stack's network is its boundary).
set -eu
if [ "${1:-}" = redis-server ] && [ "${2:-}" = "${2#*.conf}" ]; then
  shift
  exec redis-server --bind '* -::*' --protected-mode no "$@"
fi
exec "$@"
