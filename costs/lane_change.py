"""A batch request moved to a dearer lane after it was priced: the flush's escalation and a
salvage send it to flex or the standard stream, billed at up to twice the batch rate it was
capped and held at. Before it moves, its `max_tokens` is cut so that its worst case at the
standard rate (flex may fall back to it) stays within its cost cap and within what its budget
held; one whose prompt alone does not fit stays on the batch lane (its deadline is a wish, the
cap and the budget are limits). The same holds for an `auto` provider whose probe answered only
after the submit that it has no Batch API: its lines are billed at the standard rate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, bindparam, select, update
from sqlalchemy.orm import Session

from core.db import among
from core.errors import InvalidRequest
from costs.reservations import HELD
from models.intake_message import Lane
from models.tables import Request, Reservation
from rules.caps import max_tokens_for_cap
from rules.prices import PriceTable, price_table
from rules.tokens import count_message_tokens


@dataclass
class Refit:
    """What moving to the stream path takes: new bodies, and the rows that cannot move."""

    bodies: dict[str, dict[str, Any]] = field(default_factory=dict)  # only the changed ones
    kept: set[str] = field(default_factory=set)

    def write(self, session: Session, still: ColumnElement[bool]) -> None:
        """Store the new bodies of the rows that `still` holds for (the state they were read
        in: a row that has moved on since keeps its body)."""
        if self.bodies:
            session.connection().execute(
                update(Request)
                .where(Request.id == bindparam("_id"), still)
                .values(body=bindparam("body"))
                .execution_options(synchronize_session=False),
                [{"_id": rid, "body": body} for rid, body in self.bodies.items()],
            )


def refit(
    session: Session,
    ids: Sequence[str],
    route: Lane = "stream",
    prices: PriceTable | None = None,
) -> Refit:
    """Each of `ids`' body with `max_tokens` within its cap and its hold at `route`'s rate in
    `prices` (the table's by default); a move to the stream path is priced at
    `billed_lane("flex")`, the standard rate (flex may fall back to it)."""
    out = Refit()
    if not ids:
        return out
    table = prices or price_table()
    held = dict(
        session.execute(
            select(Reservation.request_id, Reservation.amount_usd).where(
                among(session, Reservation.request_id, ids), Reservation.state == HELD
            )
        ).all()
    )
    rows = session.execute(
        select(Request.id, Request.model, Request.body, Request.max_cost_usd).where(
            among(session, Request.id, ids)
        )
    )
    for rid, model, body, cap in rows:
        limits = [limit for limit in (cap, held.get(rid)) if limit is not None]
        if not limits or model not in table:
            continue
        price = table.get(model)
        prompt = count_message_tokens(body["messages"])
        given = body.get("max_tokens") or price.max_output_tokens
        tokens = given
        try:
            for limit in limits:
                tokens = min(tokens, max_tokens_for_cap(price, model, prompt, limit, route))
        except InvalidRequest:
            out.kept.add(rid)
            continue
        if tokens != given:
            out.bodies[rid] = {**body, "max_tokens": tokens}
    return out
