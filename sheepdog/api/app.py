"""The front door's ASGI app (Starlette): routes, errors in OpenAI's shape, CORS, health.

Built by `create_app()` (uvicorn's factory, once per process); nothing happens at import.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import redis
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.errors import SheepdogError
from core.heap import freeze_startup_heap
from core.settings import Settings, get_settings
from sheepdog.api import native, openai_compat, webhook_routes
from sheepdog.api.errors import ApiError, error_body, from_sheepdog
from sheepdog.api.front import Front, is_loopback
from sheepdog.api.metrics import MetricsMiddleware
from sheepdog.api.responses import FastJSONResponse

log = logging.getLogger("sheepdog.api")


async def healthz(request: Request) -> Response:
    return FastJSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state = await request.app.state.front.readiness()
    ok = all(v == "ok" for v in state.values())
    return FastJSONResponse({"status": "ok" if ok else "unavailable", **state}, 200 if ok else 503)


async def metrics(request: Request) -> Response:
    return request.app.state.front.metrics.exposition()  # type: ignore[no-any-return]


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _sheepdog_error(request: Request, exc: Exception) -> Response:
    return from_sheepdog(exc).response()


async def _unavailable(request: Request, exc: Exception) -> Response:
    service = "Redis" if isinstance(exc, (redis.RedisError, OSError)) else "the database"
    log.warning("api: %s unavailable: %s", service, type(exc).__name__)
    return ApiError(503, f"{service} is unavailable; try again later", "unavailable").response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return FastJSONResponse(
        error_body(exc.status_code, str(exc.detail), code),
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _internal(request: Request, exc: Exception) -> Response:
    log.exception("api: unexpected error on %s %s", request.method, request.url.path)
    return FastJSONResponse(error_body(500, "internal error", "internal_error"), status_code=500)


ROUTES = [
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/metrics", metrics),
    Route("/v1/models", openai_compat.models),
    Route("/v1/chat/completions", openai_compat.chat_completions, methods=["POST"]),
    Route("/v1/requests", native.submit, methods=["POST"]),
    Route("/v1/requests", native.list_requests, methods=["GET"]),
    Route("/v1/requests/{id}", native.get_one, methods=["GET"]),
    Route("/v1/requests/{id}/cancel", native.cancel, methods=["POST"]),
    Route("/v1/requests/{id}/events", native.events, methods=["GET"]),
    Route("/v1/webhooks", webhook_routes.add, methods=["POST"]),
    Route("/v1/webhooks", webhook_routes.list_all, methods=["GET"]),
    Route("/v1/webhooks/rotate-secret", webhook_routes.rotate, methods=["POST"]),
    Route("/v1/webhooks/failed", webhook_routes.failed, methods=["GET"]),
    Route("/v1/webhooks/deliveries/{ref}/redeliver", webhook_routes.redeliver, methods=["POST"]),
    Route("/v1/webhooks/{id}", webhook_routes.remove, methods=["DELETE"]),
]


def build_app(settings: Settings, *, no_auth: bool = False) -> Starlette:
    """The app for `settings`; `no_auth` (tenant "default" for every call) only on loopback."""
    if no_auth and not is_loopback(settings.api_address):
        raise SheepdogError(f"--no-auth serves only a loopback address, not {settings.api_address}")
    front = Front(settings, no_auth)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The first call must not pay the imports and connections of a cold start.
        await run_in_threadpool(front.client.warm_up)
        freeze_startup_heap()
        yield
        await front.redis.aclose()

    origins = [o.strip() for o in settings.api_cors_origins.split(",") if o.strip()]
    middleware = [Middleware(MetricsMiddleware, metrics=front.metrics)]
    if origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                # Any request header: the key travels in Authorization, never in a cookie, so
                # the origin is the whole check; and the SDKs send headers of their own
                # (the OpenAI JS SDK's x-stainless-*, Sheepdog's X-Sheepdog-*).
                allow_headers=["*"],
                expose_headers=["Retry-After", "WWW-Authenticate"],
                max_age=600,
            )
        )
    handlers: dict[Any, Any] = {
        ApiError: _api_error,
        SheepdogError: _sheepdog_error,
        redis.ConnectionError: _unavailable,
        redis.TimeoutError: _unavailable,
        OperationalError: _unavailable,
        PoolTimeout: _unavailable,
        HTTPException: _http_error,
        Exception: _internal,
    }
    app = Starlette(
        routes=ROUTES, middleware=middleware, exception_handlers=handlers, lifespan=lifespan
    )
    app.state.front = front
    return app


def create_app() -> Starlette:
    """uvicorn's factory: settings from the environment (the CLI sets SHEEPDOG_API_*)."""
    from sheepdog.api.server import install_log_scrubber

    install_log_scrubber()
    settings = get_settings()
    return build_app(settings, no_auth=settings.api_no_auth)
