"""The worker process's one database writer for the streaming path.

A thousand streams must not mean a thousand threads each opening a transaction to claim its row
and another to end it: they would queue for connections and for the GIL, and the event loop
relaying tokens would wait behind them. Instead the loop hands claims and ends to this writer,
which sends whatever has gathered as ONE transaction (a batch of claims, a batch of ends) on its
own thread: a flush starts as soon as something is pending and what arrives meanwhile goes into
the next one, so a lone request waits one transaction and a thousand cost a few dozen.

Claims and ends run on two threads (claims are on the time-to-first-token path, ends are not);
the heartbeat shares the ends' thread, as both touch the rows this worker is streaming.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

from models.intake import IntakeItem
from streaming import store

log = logging.getLogger("sheepdog.streaming.writer")

T = TypeVar("T")
_Claims = dict[str, tuple[IntakeItem | None, "asyncio.Future[store.Claim | None]"]]
_Ends = dict[str, tuple[store.Claim, store.End, "asyncio.Future[Decimal | None]"]]


class Writer:
    """Batches the streaming path's claims and ends into one transaction per flush."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self._claims: _Claims = {}
        self._ends: _Ends = {}
        self._claim_wake = asyncio.Event()
        self._end_wake = asyncio.Event()
        self._claim_pool = concurrent.futures.ThreadPoolExecutor(1, "sheepdog-stream-claims")
        self._end_pool = concurrent.futures.ThreadPoolExecutor(1, "sheepdog-stream-ends")
        self.claim_flushes = 0
        self.end_flushes = 0

    def claim(self, request_id: str, item: IntakeItem | None) -> asyncio.Future[store.Claim | None]:
        """Record (when `item` is given) and claim the row; resolves to None when not queued."""
        done: asyncio.Future[store.Claim | None] = asyncio.get_running_loop().create_future()
        if request_id in self._claims:  # the same request twice at once: one of them runs it
            done.set_result(None)
        else:
            self._claims[request_id] = (item, done)
            self._claim_wake.set()
        return done

    def finish(
        self, request_id: str, claim: store.Claim, end: store.End
    ) -> asyncio.Future[Decimal | None]:
        """Write the stream's end; resolves to its cost, or raises store.Fenced."""
        done: asyncio.Future[Decimal | None] = asyncio.get_running_loop().create_future()
        self._ends[request_id] = (claim, end, done)
        self._end_wake.set()
        return done

    async def on_end_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run other row work (the heartbeat) on the ends' thread, between two flushes."""
        return await asyncio.get_running_loop().run_in_executor(self._end_pool, fn, *args)

    async def run_claims(self) -> None:
        """The claims' flush loop; runs for the life of the process."""
        loop = asyncio.get_running_loop()
        while True:
            await self._claim_wake.wait()
            self._claim_wake.clear()
            while self._claims:
                batch, self._claims = self._claims, {}
                wanted = {rid: item for rid, (item, _) in batch.items()}
                results: dict[str, store.Claim | BaseException | None]
                try:
                    got = await loop.run_in_executor(
                        self._claim_pool, store.claim_many, self.db_url, wanted
                    )
                    results = {rid: got.get(rid) for rid in batch}
                except Exception:
                    # One bad row must not fail the others: each on its own (the usual case
                    # is the database being away, and then every one of them fails alike).
                    log.warning("claim batch of %d failed; claiming one by one", len(batch))
                    results = {}
                    for rid, item in wanted.items():
                        try:
                            results[rid] = await loop.run_in_executor(
                                self._claim_pool, store.claim, self.db_url, rid, item
                            )
                        except Exception as err:
                            results[rid] = err
                self.claim_flushes += 1
                for rid, (_, done) in batch.items():
                    _resolve(done, results[rid])

    async def run_ends(self) -> None:
        """The ends' flush loop; runs for the life of the process."""
        loop = asyncio.get_running_loop()
        while True:
            await self._end_wake.wait()
            self._end_wake.clear()
            while self._ends:
                batch, self._ends = self._ends, {}
                wanted = {rid: (claim, end) for rid, (claim, end, _) in batch.items()}
                results: dict[str, Decimal | BaseException | None]
                try:
                    results = dict(
                        await loop.run_in_executor(
                            self._end_pool, store.finish_many, self.db_url, wanted
                        )
                    )
                except Exception:
                    log.warning("end batch of %d failed; writing one by one", len(batch))
                    results = {}
                    for rid, (claim, end) in wanted.items():
                        try:
                            results[rid] = await loop.run_in_executor(
                                self._end_pool, store.finish, self.db_url, rid, claim, end
                            )
                        except Exception as err:
                            results[rid] = err
                self.end_flushes += 1
                for rid, (_, _, done) in batch.items():
                    _resolve(done, results[rid])


def _resolve(done: asyncio.Future[Any], result: Any) -> None:
    if done.done():
        return
    if isinstance(result, BaseException):
        done.set_exception(result)
    else:
        done.set_result(result)
