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

# The longest modules (seconds in a `make test` run), in the order they are started: `make test`
# runs modules in parallel (pytest-xdist, --dist loadfile --no-loadscope-reorder), each module in
# one process, handed out in collection order. Long ones first, so the run ends on short ones
# rather than waiting for a long module started last. Not listed: after these, in file order.
LONG_FIRST = [
    "test_faults_batch",  # 160
    "test_emulated_e2e",  # 100
    "test_faults_services",  # 95
    "test_faults_security",  # 90
    "test_cli",  # 75
    "test_client_package",  # 70-100 (builds and installs a wheel)
    "test_demo",  # 65
    "test_faults_stream",  # 60
    "test_janitor",  # 60
    "test_faults_load",  # 60
    "test_client_browser",  # 55-70
    "test_stream",  # 45
    "test_client_stream",  # 40
    "test_metrics",  # 40
    "test_documents_e2e",  # 35
    "test_faults_stream_pg",  # 35
    "test_flower",  # 35
    "test_exposure",  # 75
    "test_isolation",  # 70
    "test_batch_e2e",  # 35
    "test_batch_flow",  # 25
    "test_intake",  # 25
    "test_costs_report",  # 25
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules in LONG_FIRST order, then the rest; tests within a module keep their order."""
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
