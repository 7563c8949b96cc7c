"""Ownership checks in one query (sheepdog.client.Client.owners, the front door's rounds of
them): every stored id among many answers its tenant and status, the rest nothing, on SQLite
and PostgreSQL alike."""

from __future__ import annotations

import uuid

from core.settings import Settings
from sheepdog.api.batcher import OWNER_ROUND_MAX
from sheepdog.api.tenancy import Tenancy
from sheepdog.client import Client


def test_a_full_round_of_ids_in_one_query(db_url: str, redis_url: str) -> None:
    client = Client(Settings(redis_url=redis_url, database_url=db_url))
    tenant = f"owners-{uuid.uuid4().hex[:8]}"
    ids = client.submit_many(
        [
            {
                "model": "sheepdog-mini",
                "messages": [{"role": "user", "content": f"owned {i}"}],
                "priority": "low",
                "metadata": {"tenant": tenant},
            }
            for i in range(3)
        ]
    )
    unknown = [f"req_{uuid.uuid4().hex}" for _ in range(OWNER_ROUND_MAX - len(ids))]
    assert client.owners(unknown[:100] + ids + unknown[100:]) == {
        rid: (tenant, "queued") for rid in ids
    }
    asks = [(tenant, rid) for rid in ids + unknown] + [("someone-else", ids[0])]
    statuses = Tenancy(client).statuses(asks)
    assert statuses == ["queued"] * 3 + [None] * len(unknown) + [None]
