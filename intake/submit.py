"""Submitting requests: validate, route, cap, hold the budget, claim idempotency keys, then
send the messages and write the rows. The in-deployment client (sheepdog/client.py), the HTTP
front door and the nightly document job all submit through `Submitter`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis
from kombu.exceptions import BatchPublishError
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy import select
from sqlalchemy.orm import configure_mappers

from batch.low_count import count_up
from core import keys
from core.celery_app import INTAKE_TASK, celery_for
from core.db import session_scope
from core.errors import (
    DATABASE_HINT,
    InvalidRequest,
    ServiceUnavailable,
    redact_url,
)
from core.providers import tiers_for
from core.redis_conn import get_redis
from core.settings import Settings, get_settings
from costs.budgets import release_items, reserve
from costs.provider_prices import ProviderPrices
from intake.idempotency import (
    claim_keys,
    committed_unseen,
    held_by_rows,
    redis_down,
    release_claims,
    repoint_claims,
)
from lifecycle.dispatch import send_stream
from lifecycle.record import TRANSIENT, Recorded, record_safely, release_keys
from models.intake_message import IntakeItem
from models.request import ChatRequest, new_request_id
from rules.admission import Admitted, admit
from rules.caps import effective_max_tokens
from rules.prices import PriceTable, billed_lane, price_table
from rules.routing import choose_lane
from webhooks.endpoints import require_signing_secrets

log = logging.getLogger("sheepdog.intake")

INTAKE_BULK = 500  # low-priority requests per intake message

RequestLike = ChatRequest | dict[str, Any]
T = TypeVar("T")


class Submitter:
    """Validate and enqueue requests (all or nothing per call)."""

    def __init__(self, settings: Settings | None = None, prices: PriceTable | None = None):
        self.settings = settings or get_settings()
        self._prices = prices
        self._app: Any = None
        self._tier_cache: dict[str, frozenset[str]] = {}
        self._provider_prices = ProviderPrices(self.settings)

    def warm_up(self) -> None:
        """Do a first submit's one-off work now (a server calls this at start-up): build the
        Celery app and its result backend (send_task reads it: an import) and open its broker
        connection, load the modules the record path imports (seconds on a cold start), set up
        the ORM's mappers (done on the first query otherwise), open a database connection.
        Errors are left to submit."""
        with contextlib.suppress(Exception), self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
        with contextlib.suppress(Exception):
            self.celery.backend  # noqa: B018  (a property that imports and builds it)
        configure_mappers()
        with contextlib.suppress(Exception), session_scope(self.settings.database_url) as s:
            s.execute(select(1))

    @property
    def celery(self) -> Any:
        """The Celery app used to send (built from this client's settings)."""
        if self._app is None:
            self._app = celery_for(self.settings)
        return self._app

    @property
    def table(self) -> PriceTable:
        """The price table as configured: which models there are, their limits (no I/O)."""
        return self._prices or price_table()

    @property
    def prices(self) -> PriceTable:
        """The price table, its batch lane at each provider's own rate: what a hold and a cap
        are priced at (costs/provider_prices.py; an `auto` provider's remembered batch mode
        is read from Redis once a minute)."""
        return self._provider_prices.get(self.table)

    # -- submit -----------------------------------------------------------------------------

    def prepare(self, request: RequestLike) -> IntakeItem:
        """Validate one request and build its intake message (no I/O but `prices`')."""
        return self._item(admit(request, prices=self.table))

    def _item(self, admitted: Admitted) -> IntakeItem:
        req = admitted.request
        lane = choose_lane(req, self.settings, self._tiers(req.model), self.prices)
        price = self.prices.get(req.model)
        body = req.provider_body()
        prompt_tokens = admitted.prompt_tokens  # of the same messages as the body's
        max_tokens = effective_max_tokens(
            price,
            req.model,
            prompt_tokens,
            req.max_tokens,
            req.max_cost_usd,
            billed_lane(lane.lane),
        )
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        return IntakeItem(
            id=new_request_id(),
            route=lane.route,
            lane=lane.lane,
            lane_reason=lane.reason,
            escalated=lane.escalated,
            request=req.model_dump(mode="json", exclude_none=True),
            body=body,
            submitted_at=datetime.now(UTC),
        )

    def _tiers(self, model: str) -> frozenset[str]:
        """The service tiers of `model`'s provider (providers are configuration: kept)."""
        found = self._tier_cache.get(model)
        if found is None:
            found = self._tier_cache[model] = tiers_for(model, self.settings)
        return found

    def submit(self, request: RequestLike) -> str:
        """Validate and enqueue one request; returns its id. A resubmit with the same
        idempotency key returns the first request's id and enqueues nothing."""
        return self.submit_many([request])[0]

    def submit_many(self, requests: Iterable[RequestLike]) -> list[str]:
        """Validate every request first (all or nothing), then enqueue them in bulk.

        Low-priority requests travel INTAKE_BULK to a message; streaming ones one each."""
        return self._submit_items(_each(requests, self.prepare))

    def submit_admitted(self, requests: Sequence[Admitted]) -> list[str]:
        """`submit_many` for requests this process checked already (rules.admission.admit,
        with this client's price table: the front door checks on its event loop and submits
        in a thread). Not for requests from elsewhere: an Admitted is taken as it is."""
        return self._submit_items(_each(requests, self._item))

    def _submit_items(self, items: list[IntakeItem]) -> list[str]:
        require_signing_secrets(self.settings, items)
        ids = [item.id for item in items]
        fresh = claim_keys(self.settings, items, ids)
        try:  # budgets (costs/budgets.py): hold each worst case; may refuse or downgrade
            fresh = reserve(fresh, self.settings, self.prices)
        except BaseException:
            release_claims(fresh, self.settings)
            raise
        answered = self._enqueue(fresh)
        return [answered.get(rid, rid) for rid in ids]

    def _enqueue(self, items: Sequence[IntakeItem]) -> dict[str, str]:
        """Send the stream messages, then write every row (the first durable copy) before the
        ids go back: a Redis that loses its data after this cannot lose a request (the janitor
        re-sends stream rows left queued; beat batches the low ones from the table). Returns
        the items answered by an earlier row of their idempotency key (id -> that row's id)."""
        writes_rows = self.settings.producer_writes_rows
        try:
            self._send([i for i in items if i.route == "stream"] if writes_rows else items)
        except (
            KombuOperationalError,
            BatchPublishError,
            redis.ConnectionError,
            redis.TimeoutError,
            OSError,
        ) as err:
            release_claims(items, self.settings)
            release_items(items, self.settings)
            raise redis_down(self.settings) from err
        return self._record(items) if writes_rows else {}

    def _record(self, items: Sequence[IntakeItem]) -> dict[str, str]:
        recorded = Recorded()
        try:
            with session_scope(self.settings.database_url) as session:
                recorded = record_safely(session, items)
                held = held_by_rows(session, items) if recorded.created < len(items) else {}
        except TRANSIENT as err:
            # The commit may have gone through unseen (the connection lost as it went out):
            # then the rows are there, and the request is answered as recorded.
            unseen = committed_unseen(self.settings.database_url, items)
            if unseen is not None:
                log.warning("submit: commit raised (%r) but its rows are written", err)
                return self._recorded(items, recorded, unseen)
            # Not recorded: the stream messages already sent must not run (their cancel flags
            # stop them before they start), and nothing else was enqueued.
            self._cancel_unrecorded([i for i in items if i.route == "stream"])
            release_claims(items, self.settings)
            with contextlib.suppress(Exception):
                release_items(items, self.settings)
            raise ServiceUnavailable(
                "the database", redact_url(self.settings.database_url), DATABASE_HINT
            ) from err
        return self._recorded(items, recorded, held)

    def _recorded(
        self, items: Sequence[IntakeItem], recorded: Recorded, held: dict[str, str]
    ) -> dict[str, str]:
        """After the rows are written: let go of what will not run (`held`: answered by other
        rows) and count the low ones for the flush."""
        release_keys(self.settings, recorded.unkeyed)
        if held:  # answered by the rows that hold their keys: these never run
            answered = [i for i in items if i.id in held]
            repoint_claims(self.settings, [(i, held[i.id]) for i in answered])
            self._cancel_unrecorded([i for i in answered if i.route == "stream"])
            with contextlib.suppress(Exception):
                release_items(answered, self.settings)
        failed = set(recorded.failed) | set(held)
        with contextlib.suppress(redis.RedisError):  # else the next flush interval batches them
            count_up(self.settings, sum(i.route == "batch" and i.id not in failed for i in items))
        return held

    def _cancel_unrecorded(self, items: Sequence[IntakeItem]) -> None:
        """Cancel stream messages whose rows failed: the flag stops a task not started yet, the
        announcement one a worker already streams (it inserts the row it did not find)."""
        from streaming.cancel import CANCEL_FLAG_TTL_S

        names = keys.of(self.settings)
        with (
            contextlib.suppress(redis.RedisError),
            get_redis(self.settings.redis_url).pipeline(transaction=False) as pipe,
        ):
            for item in items:
                pipe.set(names.cancel_flag(item.id), b"1", ex=CANCEL_FLAG_TTL_S)
                pipe.publish(names.cancel_channel, item.id)
            pipe.execute()

    def _send(self, items: Sequence[IntakeItem]) -> None:
        if not items:
            return
        app = self.celery
        low = [item for item in items if item.route == "batch"]
        streams = [item for item in items if item.route == "stream"]
        # One pipeline for the whole burst, the task-sent events (Flower's) included: a message
        # costs one round trip to Redis less each (~0.3 ms of a stream message's ~0.8 ms here).
        with app.producer_or_acquire() as producer, producer.batch():
            for start in range(0, len(low), INTAKE_BULK):
                chunk = low[start : start + INTAKE_BULK]
                app.send_task(
                    INTAKE_TASK,
                    args=[[item.model_dump(mode="json") for item in chunk]],
                    argsrepr=f"[{len(chunk)} requests: {chunk[0].id}..{chunk[-1].id}]",
                    producer=producer,
                )
            for item in streams:
                send_stream(app, item.id, item=item, producer=producer)


def _each(requests: Iterable[T], make: Callable[[T], IntakeItem]) -> list[IntakeItem]:
    """Each request's intake message; InvalidRequest names the refused one's index (past 0)."""
    items: list[IntakeItem] = []
    for index, request in enumerate(requests):
        try:
            items.append(make(request))
        except InvalidRequest as err:
            raise err.in_list(index) if index else err from None
    return items
