"""The front door's own Prometheus metrics: calls by endpoint and status code, open event
streams, time to first byte. With --processes N every process writes to the multiprocess
directory (sheepdog.metrics.prepare_multiprocess) and /metrics adds them up."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ApiMetrics:
    """The instruments, on a registry of their own (one app per process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "sheepdog_api_requests",
            "HTTP calls answered by the front door",
            ["endpoint", "method", "code"],
            registry=self.registry,
        )
        self.open_streams = Gauge(
            "sheepdog_api_open_streams",
            "Event streams (native and chat.completion chunks) open now",
            ["endpoint"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.ttfb = Histogram(
            "sheepdog_api_time_to_first_byte_seconds",
            "From a call's arrival to the first byte of its response body",
            ["endpoint"],
            buckets=TTFB_BUCKETS,
            registry=self.registry,
        )

        # labels() takes a lock and builds a key per call; the children, once made, are kept.
        self._ttfb: dict[str, Any] = {}
        self._calls: dict[tuple[str, str, str], Any] = {}

    def observe_ttfb(self, endpoint: str, seconds: float) -> None:
        child = self._ttfb.get(endpoint)
        if child is None:
            child = self._ttfb[endpoint] = self.ttfb.labels(endpoint)
        child.observe(seconds)

    def count_call(self, endpoint: str, method: str, code: str) -> None:
        key = (endpoint, method, code)
        child = self._calls.get(key)
        if child is None:
            child = self._calls[key] = self.calls.labels(*key)
        child.inc()

    @contextmanager
    def stream_open(self, endpoint: str) -> Iterator[None]:
        gauge = self.open_streams.labels(endpoint)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def exposition(self) -> Response:
        registry: Any = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def endpoint_of(scope: Scope) -> str:
    """The matched route's path template (`/v1/requests/{id}`), never the raw path: ids would
    make a series each."""
    route = scope.get("route")
    return str(getattr(route, "path", None) or "unmatched")


class MetricsMiddleware:
    """Counts every call and times its first body byte (pure ASGI: streams pass through)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]
        first = [True]

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and first[0]:
                first[0] = False
                self.metrics.observe_ttfb(endpoint_of(scope), time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            self.metrics.count_call(endpoint_of(scope), scope["method"], str(status[0]))
