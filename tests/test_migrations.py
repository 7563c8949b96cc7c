"""Migrations run up from empty on both databases, and match the models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from core.db import get_engine
from models.migrate import upgrade
from models.tables import Base
from tests.fixtures.pg import throwaway_database

TABLES = {"requests", "batch_jobs", "documents", "cost_ledger", "budgets", "budget_reservations"}


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    with throwaway_database("sheepdog_m", migrate=False) as url:
        yield url


def test_upgrade_from_empty_creates_every_table_and_matches_the_models(empty_db: str) -> None:
    upgrade(empty_db)
    engine = get_engine(empty_db)
    assert set(inspect(engine).get_table_names()) >= TABLES
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"
    upgrade(empty_db)  # a second run is a no-op
