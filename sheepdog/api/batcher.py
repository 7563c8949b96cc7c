"""Submissions of concurrent calls sent together: one `submit_many` per round instead of one per
call. A round starts as soon as a call is waiting and a runner is free, and takes everyone
waiting then; whatever arrives while the runners are busy goes into the next one. So a lone
call waits for nobody, and under load the rounds grow (one intake message carries up to 500
low-priority requests; the stream messages of a round share one Redis pipeline): Celery's cost
per message is what limits one-request-per-call intake otherwise. A round mostly waits (for
the database's commit): RUNNERS of them run at once, so a call waits for one commit, not for
the round ahead of it too."""

from __future__ import annotations

import asyncio

from starlette.concurrency import run_in_threadpool

from core.errors import SheepdogError
from rules.admission import Admitted
from sheepdog.api.tenancy import Tenancy

ROUND_MAX = 2000  # requests per round at most (bounds one round's latency)
RUNNERS = 2  # rounds under way at once, per process


class SubmitBatcher:
    """Per process (one event loop); calls Tenancy.submit_calls in a thread, RUNNERS rounds at
    once."""

    def __init__(self, tenancy: Tenancy) -> None:
        self.tenancy = tenancy
        self._waiting: list[tuple[str, list[Admitted], asyncio.Future[list[str]]]] = []
        self._runners: set[asyncio.Task[None]] = set()
        self._active = 0  # runners not yet ended (counted down as they end, before any await)

    async def submit(self, tenant: str, requests: list[Admitted]) -> list[str]:
        """The ids of `requests` (all or nothing), or the error that refused them."""
        done: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._waiting.append((tenant, requests, done))
        if self._active < RUNNERS:
            self._active += 1
            runner = asyncio.create_task(self._run())
            self._runners.add(runner)  # (a reference, so that the task is not collected)
            runner.add_done_callback(self._runners.discard)
        return await done

    async def _run(self) -> None:
        try:
            await self._rounds()
        finally:
            self._active -= 1

    async def _rounds(self) -> None:
        while self._waiting:
            size, cut = 0, 0
            for cut, (_, requests, _) in enumerate(self._waiting, start=1):  # noqa: B007
                size += len(requests)
                if size >= ROUND_MAX:
                    break
            batch, self._waiting = self._waiting[:cut], self._waiting[cut:]
            calls = [(tenant, requests) for tenant, requests, _ in batch]
            try:
                results: list[list[str] | SheepdogError] | BaseException = await run_in_threadpool(
                    self.tenancy.submit_calls, calls
                )
            except Exception as err:  # Redis errors the client does not wrap, and the like
                results = err
            except BaseException as err:  # this runner cancelled (shutdown): no call left hanging
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(asyncio.CancelledError())
                raise err
            for index, (_, _, done) in enumerate(batch):
                if done.done():  # the caller went away
                    continue
                outcome = results if isinstance(results, BaseException) else results[index]
                if isinstance(outcome, BaseException):
                    done.set_exception(outcome)
                else:
                    done.set_result(outcome)
