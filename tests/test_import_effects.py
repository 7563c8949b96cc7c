"""Importing Sheepdog's code changes nothing in the host process: no Celery app is built, kombu is
not patched, no Celery signal handler is connected. Only starting a worker (worker_app) does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

PROBE = """
import importlib, json, pkgutil, sys
for package in ("core", "models", "rules", "costs", "webhooks", "lifecycle", "streaming",
                "batch", "intake", "documents", "scheduler", "tasks", "workers", "sheepdog"):
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        if info.name in ("sheepdog.__main__",) or ".migrations" in info.name:
            continue
        importlib.import_module(info.name)
import celery._state
from celery import signals
from kombu.transport import redis as kombu_redis
def state():
    return {
        "apps": sum(a.main == "sheepdog" for a in celery._state._get_active_apps()),
        "current_is_default": celery._state.get_current_app().main in (None, "default"),
        "kombu_patched": kombu_redis.Channel._connparams.__module__ != "kombu.transport.redis",
        "receivers": sum(len(s.receivers or []) for s in (
            signals.worker_init, signals.worker_ready, signals.worker_process_init,
            signals.task_prerun, signals.task_postrun)),
    }
before = state()
if "--start" in sys.argv:
    from workers.app import worker_app
    worker_app()
print(json.dumps({"imported": before, "started": state()}))
"""


@pytest.fixture(scope="module")
def seen() -> dict[str, dict[str, object]]:
    """What a fresh interpreter holds after importing every module, then after worker_app()."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "--start"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_importing_every_module_changes_nothing(seen: dict[str, dict[str, object]]) -> None:
    assert seen["imported"] == {
        "apps": 0,
        "current_is_default": True,
        "kombu_patched": False,
        "receivers": 0,
    }


def test_starting_a_worker_app_installs_what_a_worker_needs(
    seen: dict[str, dict[str, object]],
) -> None:
    started = seen["started"]
    assert started["apps"] == 1
    assert started["current_is_default"] is False
    assert started["kombu_patched"] is True
    assert isinstance(started["receivers"], int) and started["receivers"] >= 6
