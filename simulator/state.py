"""The simulator's mutable state, shared by every endpoint through ``app.state.sim``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from simulator.config import SimulatorConfig
from simulator.errors import ApiError
from simulator.faults import FaultEngine
from simulator.stats import Stats
from simulator.tiers import FlexSlots


class SimState:
    """Configuration in force, fault engine, statistics and the known models."""

    def __init__(self, config: SimulatorConfig, models: list[str]) -> None:
        self.startup = config.model_copy(deep=True)
        self.config = config
        self.engine = FaultEngine(config.faults)
        self.stats = Stats()
        self.flex = FlexSlots()
        self.models = frozenset(models)
        self.model_list = list(models)
        self.data_dir = config.resolved_data_dir()
        # Filled in by create_app (kept here so handlers need one lookup).
        self.files: Any = None
        self.batches: Any = None

    def apply(self, changes: dict[str, Any]) -> SimulatorConfig:
        """Change the configuration at runtime; ``faults`` given → the rules are replaced."""
        merged = {**self.config.model_dump(), **changes}
        merged["data_dir"] = self.config.data_dir
        self.config = SimulatorConfig.model_validate(merged)
        if "faults" in changes:
            self.engine = FaultEngine(self.config.faults)
        return self.config

    def reset(self) -> None:
        """Back to the startup configuration, fresh counters and statistics."""
        self.config = self.startup.model_copy(deep=True)
        self.config.data_dir = str(self.data_dir)
        self.engine = FaultEngine(self.config.faults)
        self.stats = Stats()


Handler = Callable[[Request], Awaitable[Response]]


def sim(request: Request) -> SimState:
    """The state of the app serving a request."""
    state: SimState = request.app.state.sim
    return state


def api(*, batch_api: bool = False) -> Callable[[Handler], Handler]:
    """Wrap a public endpoint: bearer-key check, Batch-API switch, ``ApiError`` → JSON error."""

    def decorate(handler: Handler) -> Handler:
        @wraps(handler)
        async def wrapper(request: Request) -> Response:
            state = sim(request)
            try:
                check_key(state, request)
                if batch_api and state.config.no_batch_api:
                    raise ApiError(404, f"Invalid URL ({request.method} {request.url.path})")
                return await handler(request)
            except ApiError as error:
                state.stats.count(f"errors.{error.status}")
                return error.response()

        return wrapper

    return decorate


def check_key(state: SimState, request: Request) -> None:
    """401 unless the bearer key is the configured one (any key is fine when none is set)."""
    expected = state.config.api_key
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:] if header[:7].lower() == "bearer " else ""
    if given != expected:
        shown = f"{given[:3]}***{given[-4:]}" if given else "(none)"
        raise ApiError(
            401, f"Incorrect API key provided: {shown}.", code="invalid_api_key", param=None
        )
