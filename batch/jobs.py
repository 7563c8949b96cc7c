"""Shared pieces of the batch path: the per-job lock and its renewal, updates to a job row, and
a job's provider and discount. Job statuses: models/status.py, moved by batch/job_status.py."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import redis
from redis.lock import Lock
from sqlalchemy import update

from batch.job_status import move_job, move_job_now
from core import keys
from core.db import session_scope
from core.providers import ProviderConfig, load_providers
from core.redis_conn import get_redis
from core.settings import Settings
from models.status import BatchStatus
from models.tables import BatchJob, utcnow


class LostLock(RuntimeError):
    """The job lock expired and another process took the job over."""


class SimulatedCrash(RuntimeError):
    """Raised by a `crash_after` hook: the tests' stand-in for a process dying there."""


def crash_point(crash_after: str | None, point: str) -> None:
    if crash_after == point:
        raise SimulatedCrash(f"simulated crash after {point}")


log = logging.getLogger("sheepdog.batch.lock")


class KeptLock(Lock):
    """A Redis lock with a short TTL and a heartbeat: while held, a daemon thread renews it
    every third of its TTL (as the emulated executor keeps its heartbeat key), so a holder that
    dies is noticed within one TTL while a live one keeps it however long it works. `lost` is
    set when the lock was found taken over (or gone) on a renewal."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lost = False
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    def acquire(self, *args: Any, **kwargs: Any) -> bool:
        taken = bool(super().acquire(*args, **kwargs))
        if taken and self._keeper is None:
            self.lost = False
            self._stop.clear()
            self._keeper = threading.Thread(target=self._keep, name=f"lock {self.name}")
            self._keeper.daemon = True
            self._keeper.start()
        return taken

    def release(self) -> None:
        self._stop.set()
        keeper, self._keeper = self._keeper, None
        if keeper is not None and keeper is not threading.current_thread():
            keeper.join(5)
        super().release()

    def _keep(self) -> None:
        assert self.timeout is not None
        while not self._stop.wait(self.timeout / 3):
            try:
                self.reacquire()
            except redis.exceptions.LockError:  # expired and taken, or gone: the job is not ours
                log.warning("%s: lock lost", self.name)
                self.lost = True
                return
            except redis.RedisError as err:  # Redis away a moment: the next beat tries again
                log.warning("%s: lock not renewed (%r)", self.name, err)


def job_lock(settings: Settings, job_id: str) -> KeptLock:
    """The job's lock (not yet acquired): a `KeptLock` of batch_lock_ttl_s, so a job whose
    owner died is picked up by the next flush, poll or ingest within seconds."""
    lock = get_redis(settings.redis_url).lock(
        keys.of(settings).batch_job_lock(job_id),
        timeout=settings.batch_lock_ttl_s,
        blocking=False,
        lock_class=KeptLock,
        thread_local=False,  # its keeper thread renews it with the holder's token
    )
    assert isinstance(lock, KeptLock)
    return lock


def unlock(lock: Any) -> None:
    """Free a job lock; one already expired or unreachable is left to its TTL."""
    with contextlib.suppress(redis.exceptions.LockError, redis.RedisError):
        lock.release()


def keep_lock(lock: Any, job_id: str) -> None:
    """Renew a long ingest's job lock; if it expired, take it again unless someone else has,
    in which case raise LostLock (they carry on from the same files)."""
    if getattr(lock, "lost", False):
        raise LostLock(f"job {job_id}: lock taken over by another ingest")
    try:
        lock.reacquire()
    except redis.exceptions.LockError:
        if not lock.acquire():
            raise LostLock(f"job {job_id}: lock taken over by another ingest") from None


@contextlib.contextmanager
def holding(settings: Settings, job_id: str) -> Iterator[bool]:
    """Try the job's lock; yields whether it was taken (and releases it after)."""
    lock = job_lock(settings, job_id)
    taken = bool(lock.acquire())
    try:
        yield taken
    finally:
        if taken:
            unlock(lock)


def update_job(settings: Settings, job_id: str, **values: Any) -> None:
    """Write fields of one job row in a transaction of its own. A `status` among them moves
    the job through `move_job` (from any legal source; nothing written when none holds)."""
    with session_scope(settings.database_url) as session:
        if "status" in values:
            move_job(session, job_id, values.pop("status"), **values)
            return
        session.execute(
            update(BatchJob).where(BatchJob.id == job_id).values(updated_at=utcnow(), **values)
        )


def mark_empty(settings: Settings, job_id: str) -> None:
    """End a job none of whose requests could become a line: failed, and nothing to ingest."""
    now = utcnow()
    move_job_now(
        settings,
        job_id,
        BatchStatus.FAILED,
        from_=[BatchStatus.PREPARING],
        request_count=0,
        errors={"data": [{"code": "empty", "message": "no request could be written"}]},
        finished_at=now,
        ingested_at=now,
    )


def provider_of(settings: Settings, name: str | None, model: str) -> ProviderConfig:
    """The provider a job was recorded with; the model's provider when that name is no
    longer configured (KeyError when no provider serves the model)."""
    providers = load_providers(settings)
    if name:
        try:
            return providers.get(name)
        except KeyError:
            pass
    return providers.for_model(model)
