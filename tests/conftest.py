"""Shared fixtures live in tests/fixtures/, one module per service."""

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.simulator",
    "tests.fixtures.workers",
    "tests.fixtures.batch",
    "tests.fixtures.costs",
    "tests.fixtures.streaming",
    "tests.fixtures.faults",
]
