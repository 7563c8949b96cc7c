"""The floors bench_stream.py measures Sheepdog against: a stock Celery worker running
bench/celery_floor.py's no-op task (the relay's floor, bench/relay_floor.py, needs no worker)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

from bench.stack import Proc, start_celery


def celery_floor(redis_url: str) -> ModuleType:
    """bench/celery_floor.py, imported for this Redis (its app reads the settings)."""
    os.environ["SHEEPDOG_REDIS_URL"] = redis_url
    return importlib.import_module("bench.celery_floor")


def start_floor_worker(env: dict[str, str], logdir: Path) -> Proc:
    """A stock Celery worker for bench/celery_floor.py (threads pool, events on), returned once
    it runs tasks."""
    args = ["worker", "-Q", "floor", "-P", "threads", "-c", "100", "-E"]
    args += ["--loglevel", "WARNING", "-n", "floor@%h", "--without-mingle", "--without-gossip"]
    proc = start_celery(env, logdir, "floor-worker", *args, app="bench.celery_floor")
    celery_floor(env["SHEEPDOG_REDIS_URL"]).measure(3, 0.2)  # up and consuming
    return proc
