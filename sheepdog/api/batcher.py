"""Work of concurrent callers done together: one call per round instead of one per caller. A
round starts as soon as a caller is waiting and a runner is free, and takes everyone waiting
then; whatever arrives while the runners are busy goes into the next one. So a lone caller
waits for nobody, and under load the rounds grow. A round mostly waits (for the database or
Redis): a few of them run at once, so a caller waits for one round, not for the round ahead
of it too.

Three uses in an API process:
- submissions (Tenancy.submit_calls, in a thread): one `submit_many` a round; one intake
  message carries up to 500 low-priority requests and the stream messages of a round share one
  Redis pipeline, where Celery's cost per message would otherwise limit one-request-per-call
  intake;
- ownership checks before following a stream (Tenancy.statuses, in a thread): one query a
  round, so a thousand event streams opened at once cost a few queries, not a thousand;
- the followers' reads of their replay logs (api/log_hub.py): one XREAD a round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sized
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

ROUND_MAX = 2000  # units of work (requests) per round at most (bounds one round's latency)
OWNER_ROUND_MAX = 500  # ids in one ownership query (an IN list: well inside SQLite's limits)
RUNNERS = 2  # rounds under way at once, per process

A = TypeVar("A")  # what one caller asks
R = TypeVar("R")  # what it gets back

Results = list[R | BaseException]  # each ask's result or the error refusing it, in order
RoundFn = Callable[[list[A]], Awaitable[Results[R]]]
"""Does a round's asks."""


def in_thread(fn: Callable[[list[A]], Results[R]], threads: int = RUNNERS) -> RoundFn[A, R]:
    """A blocking round function, run in threads of its own, as many as its Rounds runs rounds
    at once (the event loop goes on meanwhile): a round waits for none of the shared thread
    pool's other calls, and the executor's handoff costs ~0.1 ms less a round here than
    Starlette's pool (anyio's: 298 against 209 µs to reach the thread after 20 ms idle)."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="sheepdog-round")

    async def run(asks: list[A]) -> Results[R]:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, asks)

    return run


class Rounds(Generic[A, R]):
    """Per process (one event loop): `await rounds.ask(x)` is `(await fn([x]))[0]`, with the
    asks of concurrent callers sent to `fn` together, `runners` rounds at once."""

    def __init__(
        self,
        fn: RoundFn[A, R],
        size: Callable[[A], int] = lambda _: 1,
        max_size: int = ROUND_MAX,
        runners: int = RUNNERS,
    ) -> None:
        self._fn = fn
        self._size = size
        self._max = max_size
        self._runners_max = runners
        self._waiting: list[tuple[A, asyncio.Future[R]]] = []
        self._runners: set[asyncio.Task[None]] = set()
        self._active = 0  # runners not yet ended (counted down as they end, before any await)

    async def ask(self, work: A) -> R:
        """The result of `work`, or the error that refused it."""
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((work, done))
        if self._active < self._runners_max:
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
            for cut, (work, _) in enumerate(self._waiting, start=1):  # noqa: B007
                size += self._size(work)
                if size >= self._max:
                    break
            batch, self._waiting = self._waiting[:cut], self._waiting[cut:]
            try:
                results: Results[R] | BaseException = await self._fn([work for work, _ in batch])
            except Exception as err:  # Redis errors the client does not wrap, and the like
                results = err
            except BaseException as err:  # this runner cancelled (shutdown): no call left hanging
                for _, done in batch:
                    if not done.done():
                        done.set_exception(asyncio.CancelledError())
                raise err
            for index, (_, done) in enumerate(batch):
                if done.done():  # the caller went away
                    continue
                outcome = results if isinstance(results, BaseException) else results[index]
                if isinstance(outcome, BaseException):
                    done.set_exception(outcome)
                else:
                    done.set_result(outcome)


def sized(work: tuple[str, Sized]) -> int:
    """The size of a (tenant, requests) submission: its number of requests."""
    return len(work[1])
