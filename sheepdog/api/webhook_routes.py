"""A tenant's webhooks through its own key: the same tenant-scoped functions the CLI calls
(webhooks/endpoints.py), never another tenant's.

- `POST /v1/webhooks` `{"url", "events"?}` -> 201 `{"endpoint", "secret"}` (the tenant's signing
  secret, shown once when this made it; null when the tenant had one).
- `GET /v1/webhooks` -> `{"data": [endpoint…]}`; `DELETE /v1/webhooks/{id}` -> 204.
- `POST /v1/webhooks/rotate-secret` -> `{"secret"}` (the previous one signs beside it a while).
- `GET /v1/webhooks/failed` -> `{"data": [delivery…]}`;
  `POST /v1/webhooks/deliveries/{ref}/redeliver` -> the delivery.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from core.db import session_scope
from sheepdog.api.body import read_json
from sheepdog.api.errors import ApiError
from sheepdog.api.responses import FastJSONResponse
from webhooks import endpoints
from webhooks.endpoints import WebhookError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from sheepdog.api.front import Front

T = TypeVar("T")


class NewEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    url: str
    events: list[str] | None = None


def _front(request: Request) -> Front:
    return request.app.state.front  # type: ignore[no-any-return]


async def _in_session(front: Front, work: Callable[[Session], T]) -> T:
    """Run `work` in one transaction off the event loop; WebhookError as a 404 or a 400."""

    def run() -> T:
        with session_scope(front.settings.database_url) as session:
            return work(session)

    try:
        return await run_in_threadpool(run)
    except WebhookError as err:
        if str(err).startswith("no webhook"):  # unknown, or another tenant's: alike
            raise ApiError(404, str(err), "not_found", "id") from None
        raise ApiError(400, str(err), "invalid_request") from None


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


async def add(request: Request) -> Response:
    front = _front(request)
    who = await front.auth.principal(request)
    body, _ = await read_json(request, front.settings.api_max_body_bytes)
    try:
        new = NewEndpoint.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(
            400, f"invalid request: {where}: {first['msg']}", "invalid_request"
        ) from None
    added = await _in_session(
        front,
        lambda s: endpoints.add_endpoint(s, front.settings, who.tenant, new.url, new.events),
    )
    return FastJSONResponse(_dump(added), status_code=201)


async def list_all(request: Request) -> Response:
    front = _front(request)
    who = await front.auth.principal(request)
    views = await _in_session(front, lambda s: endpoints.list_endpoints(s, who.tenant))
    return FastJSONResponse({"data": [_dump(v) for v in views]})


async def remove(request: Request) -> Response:
    front = _front(request)
    who = await front.auth.principal(request)
    endpoint_id = request.path_params["id"]
    await _in_session(front, lambda s: endpoints.remove_endpoint(s, who.tenant, endpoint_id))
    return Response(status_code=204)


async def rotate(request: Request) -> Response:
    front = _front(request)
    who = await front.auth.principal(request)
    secret = await _in_session(
        front, lambda s: endpoints.rotate_secret(s, front.settings, who.tenant)
    )
    return FastJSONResponse({"secret": secret})


async def failed(request: Request) -> Response:
    front = _front(request)
    who = await front.auth.principal(request)
    views = await _in_session(front, lambda s: endpoints.failed_deliveries(s, who.tenant))
    return FastJSONResponse({"data": [_dump(v) for v in views]})


async def redeliver(request: Request) -> Response:
    front = _front(request)
    who = await front.auth.principal(request)
    ref = request.path_params["ref"]
    view = await _in_session(
        front, lambda s: endpoints.redeliver(s, front.settings, who.tenant, ref)
    )
    return FastJSONResponse(_dump(view))
