"""The worker process's one database writer for the streaming path.

A thousand streams must not mean a thousand threads each opening a transaction to claim its row
and another to end it: they would queue for connections and for the GIL, and the event loop
relaying tokens would wait behind them. Instead the loop hands claims and ends to this writer,
which sends whatever has gathered as ONE transaction (a batch of claims, a batch of ends) on its
own thread: a flush starts as soon as something is pending and what arrives meanwhile goes into
the next one, so a lone request waits one transaction and a thousand cost a few dozen.

Claims and ends run on two threads (claims are on the time-to-first-token path, ends are not);
the heartbeat shares the ends' thread, as both touch the rows this worker is streaming.

Every future handed out resolves, whatever the database does: a batch that fails because the
database is away is sent again with backoff for up to `retry_s`, then its futures fail with
`store.Unavailable`; a batch that fails for another reason is written one by one; a call that
hangs is abandoned after `call_timeout_s` (with its thread: the next call gets a fresh one); and
the flush loops outlive any exception. Nothing is keyed by request id between flushes, so a
claim or end that went wrong can never block a later one for the same request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, TypeVar

from models.intake_message import IntakeItem
from streaming import store
from streaming.end import End

log = logging.getLogger("sheepdog.streaming.writer")

T = TypeVar("T")
_Claim = tuple[str, IntakeItem | None, "asyncio.Future[store.Claim | None]"]
_End = tuple[str, store.Claim, End, "asyncio.Future[Decimal | None]"]

BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0


class Writer:
    """Batches the streaming path's claims and ends into one transaction per flush."""

    def __init__(
        self,
        db_url: str,
        *,
        call_timeout_s: float = 30.0,
        retry_s: float = 60.0,
        rows_first: bool = True,
    ) -> None:
        self.db_url = db_url
        # Producers write the rows, so a claim finds them (store.claim_many's order).
        self._claim_many = functools.partial(store.claim_many, rows_first=rows_first)
        self.call_timeout_s = call_timeout_s
        self.retry_s = retry_s
        self._claims: list[_Claim] = []
        self._ends: list[_End] = []
        self._claim_wake = asyncio.Event()
        self._end_wake = asyncio.Event()
        self._pools = {"claims": _pool("claims"), "ends": _pool("ends")}
        self.claim_flushes = 0
        self.end_flushes = 0
        self.abandoned_calls = 0

    @property
    def max_wait_s(self) -> float:
        """How long a caller may wait for a claim or end before treating it as lost: the
        retry window plus a batch call and a few one-by-one calls past it."""
        return self.retry_s + 4 * self.call_timeout_s

    def claim(self, request_id: str, item: IntakeItem | None) -> asyncio.Future[store.Claim | None]:
        """Record (when `item` is given) and claim the row; resolves to None when not queued,
        or fails (store.Unavailable when the database stayed away)."""
        done: asyncio.Future[store.Claim | None] = asyncio.get_running_loop().create_future()
        self._claims.append((request_id, item, done))
        self._claim_wake.set()
        return done

    def finish(
        self, request_id: str, claim: store.Claim, end: End
    ) -> asyncio.Future[Decimal | None]:
        """Write the stream's end; resolves to its cost, or raises store.Fenced (or
        store.Unavailable when the database stayed away)."""
        done: asyncio.Future[Decimal | None] = asyncio.get_running_loop().create_future()
        self._ends.append((request_id, claim, end, done))
        self._end_wake.set()
        return done

    async def on_end_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run other row work (the heartbeat) on the ends' thread, between two flushes."""
        return await self._call("ends", fn, *args)

    async def _call(self, which: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn` on the named thread, bounded by call_timeout_s.

        A call the driver never returns from (a connection cut without the socket noticing)
        would hold the thread, and every flush behind it, for good: it is abandoned with its
        thread and the next call gets a fresh one."""
        pool = self._pools[which]
        running = asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        try:
            return await asyncio.wait_for(running, self.call_timeout_s)
        except TimeoutError:
            if self._pools[which] is pool:
                log.error(
                    "%s: %s did not return in %gs; abandoning its thread",
                    which,
                    getattr(fn, "__name__", fn),
                    self.call_timeout_s,
                )
                self._pools[which] = _pool(which)
                pool.shutdown(wait=False)
            self.abandoned_calls += 1
            raise store.Unavailable(
                f"database call timed out after {self.call_timeout_s:g}s"
            ) from None

    # -- flush loops -----------------------------------------------------------------------

    async def run_claims(self) -> None:
        """The claims' flush loop; runs for the life of the process."""
        while True:
            await self._claim_wake.wait()
            self._claim_wake.clear()
            while self._claims:
                batch, self._claims = self._claims, []
                futures = [done for _, _, done in batch]
                await self._guarded("claim", futures, self._flush_claims(batch))
                self.claim_flushes += 1

    async def run_ends(self) -> None:
        """The ends' flush loop; runs for the life of the process."""
        while True:
            await self._end_wake.wait()
            self._end_wake.clear()
            while self._ends:
                pending, self._ends = self._ends, []
                batch: list[_End] = []
                seen: set[str] = set()
                for entry in pending:
                    # Another attempt's end for the same row waits for the next flush.
                    (self._ends if entry[0] in seen else batch).append(entry)
                    seen.add(entry[0])
                futures = [done for *_, done in batch]
                await self._guarded("end", futures, self._flush_ends(batch))
                self.end_flushes += 1

    async def _guarded(self, what: str, futures: list[asyncio.Future[Any]], flush: Any) -> None:
        """Run one flush so that the loop survives it and every future of it resolves."""
        try:
            await flush
        except asyncio.CancelledError:
            raise  # the loop is shutting down (the finally still fails the futures)
        except Exception as err:  # a bug in a flush must not kill the loop or strand callers
            log.exception("%s flush of %d failed", what, len(futures))
            for done in futures:
                _resolve(done, store.Unavailable(f"{what} not written: {err!r}"))
            await asyncio.sleep(BACKOFF_FIRST_S)  # a failing flush must not spin the loop
        finally:
            for done in futures:
                _resolve(done, store.Unavailable(f"{what} not written"))

    async def _flush_claims(self, batch: list[_Claim]) -> None:
        wanted: dict[str, IntakeItem | None] = {}
        for rid, item, _ in batch:
            # The same request twice in one flush: one claim, the other gets None below.
            wanted[rid] = wanted.get(rid) or item
        results = await self._write("claims", self._claim_many, store.claim, wanted)
        first: set[str] = set()
        for rid, _, done in batch:
            if rid in first:
                _resolve(done, None)  # both were live at once: one of them runs it
                continue
            first.add(rid)
            _resolve(done, results.get(rid))

    async def _flush_ends(self, batch: list[_End]) -> None:
        wanted = {rid: (claim, end) for rid, claim, end, _ in batch}  # ids unique (run_ends)
        results = await self._write("ends", store.finish_many, store.finish, wanted)
        for rid, _, _, done in batch:
            _resolve(done, results.get(rid))

    async def _write(
        self,
        which: str,
        many: Callable[[str, Mapping[str, Any]], Mapping[str, Any]],
        one: Callable[..., Any],
        wanted: Mapping[str, Any],
    ) -> Mapping[str, Any]:
        """`many` for the whole batch, sent again while the database is away (up to retry_s);
        after any other error each request is written on its own by `one`, so one bad row does
        not fail the others. Values are results or the exception of that request."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_s
        delay = BACKOFF_FIRST_S
        while True:
            try:
                return await self._call(which, many, self.db_url, wanted)
            except Exception as err:
                if not store.is_transient(err):
                    log.warning(
                        "%s batch of %d failed (%r); writing one by one", which, len(wanted), err
                    )
                    break
                if loop.time() + delay > deadline:
                    log.error(
                        "%s batch of %d: database unavailable for %gs (%r); giving up",
                        which,
                        len(wanted),
                        self.retry_s,
                        err,
                    )
                    gone = store.Unavailable(f"database unavailable: {err!r}")
                    return dict.fromkeys(wanted, gone)
                log.warning(
                    "%s batch of %d: database unavailable (%r); retrying in %.2fs",
                    which,
                    len(wanted),
                    err,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
        results: dict[str, Any] = {}
        for rid, args in wanted.items():
            try:
                results[rid] = await self._call(which, one, self.db_url, rid, *_tuple(args))
            except Exception as err:
                results[rid] = err
        return results


def _tuple(args: Any) -> tuple[Any, ...]:
    return args if isinstance(args, tuple) else (args,)


def _pool(which: str) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, f"sheepdog-stream-{which}")


def _resolve(done: asyncio.Future[Any], result: Any) -> None:
    if done.done():
        return
    if isinstance(result, BaseException):
        done.set_exception(result)
    else:
        done.set_result(result)
