"""Shared fixtures live in tests/fixtures/, one module per service."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.simulator",
    "tests.fixtures.workers",
    "tests.fixtures.batch",
    "tests.fixtures.costs",
    "tests.fixtures.streaming",
    "tests.fixtures.faults",
    "tests.fixtures.api",
    "tests.fixtures.webhooks",
]

# The longest modules (seconds in a `make test` run, 2026-12-01), in the order they are started:
# `make test` runs modules in parallel (pytest-xdist, --dist loadfile --no-loadscope-reorder),
# each module in one process, handed out in collection order. Long ones first, so the run ends
# on short ones rather than waiting for a long module started last. Not listed: after these, in
# file order.
LONG_FIRST = [
    "test_faults_redis_loss",  # 213
    "test_faults_batch",  # 87
    "test_webhooks_e2e",  # 62
    "test_edges",  # 54
    "test_cli",  # 51
    "test_faults_services",  # 47
    "test_faults_security",  # 42
    "test_emulated_e2e",  # 38
    "test_lanes",  # 37
    "test_faults_edges",  # 37
    "test_faults_stream",  # 37
    "test_demo",  # 36
    "test_janitor",  # 32
    "test_stream",  # 27
    "test_client_package",  # 26
    "test_faults_stream_pg",  # 25
    "test_api_edges",  # 24
    "test_faults_load",  # 22
    "test_metrics",  # 21
    "test_api_native",  # 21
    "test_webhooks",  # 21
    "test_api_keys",  # 21
    "test_isolation",  # 19
    "test_batch_flow",  # 18
    "test_client_stream",  # 17
    "test_client_browser",  # 16
    "test_exposure",  # 13
    "test_edges_property",  # 13
    "test_flower",  # 13
    "test_batch_e2e",  # 12
    "test_replay_trim",  # 12
    "test_api_openai",  # 10
    "test_intake",  # 10
    "test_documents_e2e",  # 9
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules in LONG_FIRST order, then the rest; tests within a module keep their order."""
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
