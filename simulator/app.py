"""``create_app(config)``: the Starlette application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from simulator import admin, batches, chat, files
from simulator.batch_store import BatchStore
from simulator.config import SimulatorConfig
from simulator.errors import ApiError, json_response
from simulator.guard import BodyLimit
from simulator.models import MODELS
from simulator.state import SimState, api, sim


@api()
async def list_models(request: Request) -> Response:
    """``GET /v1/models``: the models this simulator serves."""
    created = int(sim(request).stats.started_at)
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "sheepdog-simulator"}
        for name in sim(request).model_list
    ]
    return json_response({"object": "list", "data": data})


@api()
async def retrieve_model(request: Request) -> Response:
    """``GET /v1/models/{model}``."""
    name = request.path_params["model"]
    state = sim(request)
    if name not in state.models:
        raise ApiError(
            404, f"The model '{name}' does not exist", code="model_not_found", param="model"
        )
    created = int(state.stats.started_at)
    return json_response(
        {"id": name, "object": "model", "created": created, "owned_by": "sheepdog-simulator"}
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = f"Invalid URL ({request.method} {request.url.path})"
    return json_response(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        },
        status=status,
    )


def create_app(config: SimulatorConfig | None = None, models: list[str] | None = None) -> Starlette:
    """The simulator app for ``config``; the models served: ``models``, else ``config.models``,
    else ``simulator.models.MODELS``."""
    config = config or SimulatorConfig()
    served = models if models is not None else config.models
    state = SimState(config, list(served) if served is not None else list(MODELS))
    state.files = files.FileStore(state.data_dir)
    state.batches = BatchStore()

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await state.batches.close()

    routes = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        Route("/v1/chat/completions", chat.chat_completions, methods=["POST"]),
        Route("/v1/files", files.create_file, methods=["POST"]),
        Route("/v1/files", files.list_files, methods=["GET"]),
        Route("/v1/files/{file_id}", files.retrieve_file, methods=["GET"]),
        Route("/v1/files/{file_id}", files.delete_file, methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", files.file_content, methods=["GET"]),
        Route("/v1/batches", batches.create_batch, methods=["POST"]),
        Route("/v1/batches", batches.list_batches, methods=["GET"]),
        Route("/v1/batches/{batch_id}", batches.retrieve_batch, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", batches.cancel_batch, methods=["POST"]),
        Route("/_sim/config", admin.get_config, methods=["GET"]),
        Route("/_sim/config", admin.put_config, methods=["PUT"]),
        Route("/_sim/stats", admin.get_stats, methods=["GET"]),
        Route("/_sim/reset", admin.reset, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        # Inside Starlette's error middleware: a body cut off at the limit is answered 413 here.
        middleware=[Middleware(BodyLimit, state=state)],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.sim = state
    return app
