"""Every setting Sheepdog reads, in one place (pydantic-settings, prefix SHEEPDOG_)."""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Sheepdog's settings. Each field is read from SHEEPDOG_<NAME> (or .env)."""

    model_config = SettingsConfigDict(
        env_prefix="SHEEPDOG_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # Services
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Prefix of every Celery key in Redis (queues, events, control): several deployments can
    # share one Redis database without taking each other's tasks.
    broker_prefix: str = ""
    database_url: str = "sqlite:///sheepdog.db"

    # Provider (any OpenAI-compatible endpoint)
    openai_base_url: str | None = None
    openai_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("SHEEPDOG_OPENAI_API_KEY", "OPENAI_API_KEY")
    )
    provider_timeout_s: float = 60.0
    providers_file: str | None = None  # TOML of named providers; see core/providers.py
    default_batch_mode: str = "auto"  # native | emulated | auto, for the implicit provider
    openai_service_tiers: str = ""  # the implicit provider's tiers: "flex,priority"; none
    price_table_file: str | None = None

    # Operations
    flower_basic_auth: SecretStr | None = None
    metrics_port: int = 9808  # 0: workers expose no metrics
    # Loopback by default: the figures (spend, tokens, requests by model) are not for everyone.
    # 0.0.0.0 (or a private interface) lets a Prometheus on another host scrape them.
    metrics_address: str = "127.0.0.1"
    metrics_cache_s: float = 5.0  # DB-derived metrics are recomputed at most this often
    metrics_stream_from_db: bool = True  # TTFT/duration histograms from finished rows

    # Streaming path
    stream_idle_timeout_s: float = 30.0  # the longest wait for an answer's next text
    # An answer still streaming this long after its first text ends there (`length`).
    stream_answer_max_s: float = Field(default=1800.0, gt=0)
    stream_max_attempts: int = 5
    stream_backoff_base_s: float = 0.5
    stream_backoff_max_s: float = 30.0
    replay_ttl_s: int = 3600
    # Once the row holds the answer (the last message is out), the replay log is kept only this
    # long: late followers then read the stored row (README: sizing the replay logs).
    replay_done_ttl_s: int = 60
    heartbeat_interval_s: float = 5.0
    heartbeat_timeout_s: float = 30.0
    stream_queued_timeout_s: float = 300.0  # janitor resends stream rows queued this long

    # Lanes (rules/routing.py, streaming/lanes.py)
    flex_min_lead_s: float = 300.0  # a deadline this close or closer does not take flex
    flex_fallback_lead_s: float = 60.0  # a flex request moves to standard this before its deadline
    flex_timeout_s: float = 900.0  # the SDK's long timeout for a flex call (OpenAI: 15 min)
    flex_max_attempts: int = 30  # flex 429s before moving to standard, deadline or not
    # The producer writes each request's row before submit returns (the first durable copy:
    # Redis may lose its data without losing a request). Off: the queue message is the only
    # copy until a worker records it (run Redis with appendonly then).
    producer_writes_rows: bool = True

    # Batch path
    batch_flush_interval_s: float = 60.0
    batch_flush_threshold: int = 10_000
    batch_poll_interval_s: float = 30.0
    batch_max_lines: int = 50_000
    batch_max_bytes: int = 200 * 1024 * 1024
    batch_max_attempts: int = 3
    batch_max_wait_s: float = 26 * 3600
    batch_window_s: float = 24 * 3600
    batch_workdir: str = "/tmp/sheepdog-batches"
    batch_claim_limit: int = 500_000  # rows one flush claims at most
    batch_ingest_chunk: int = 5_000  # result lines written per transaction
    # A job lock's TTL; its holder renews it every third of that (a heartbeat), so a dead
    # submitter's or ingester's lock lapses within seconds however long a live one works.
    batch_lock_ttl_s: float = 10.0
    # Emulated batch (providers without a Batch API): plain calls under the provider's limits
    emulated_concurrency: int = 64  # calls in flight per job
    emulated_max_attempts: int = 8  # per line, for 429 / 5xx / connection errors
    emulated_backoff_base_s: float = 0.5  # doubled per attempt (full jitter), at most 30 s
    emulated_heartbeat_ttl_s: float = 10.0  # poll re-sends the job when this lapses
    emulated_progress_interval_s: float = 1.0  # request_counts written this often
    emulated_default_max_tokens: int = 1024  # rate-limit estimate for lines without one
    batch_orphan_timeout_s: float = 3600.0  # janitor takes back `batched` rows no job will end

    # Nightly documents
    documents_glob: str = "docs/**/*.md|docs/**/*.txt"
    documents_cron: str = "0 2 * * *"
    documents_model: str = "sheepdog-mini"
    documents_prompt: str = (
        "Summarise the following document in a few sentences for an internal index.\n\n"
        "Title: {title}\n\n{text}"
    )
    documents_max_parts: int = 8  # a longer document is refused, not sent
    documents_max_tokens: int = 300  # answer length per part

    # Janitor
    janitor_interval_s: float = 15.0

    # Budgets (costs/budgets.py): the default applies to tenants without their own limit
    default_daily_budget_usd: Decimal | None = None
    default_monthly_budget_usd: Decimal | None = None
    default_budget_allow_downgrade: bool = False
    budget_cache_ttl_s: float = 5.0  # how long a producer trusts "this tenant has no budget"

    # HTTP front door (`sheepdog api`, sheepdog/api/)
    api_address: str = "127.0.0.1"
    api_port: int = 8080
    api_no_auth: bool = False  # loopback addresses only; every call is tenant "default"
    api_cors_origins: str = ""  # comma-separated browser origins allowed, or "*"
    api_max_body_bytes: int = 16 * 1024 * 1024  # a larger body is refused (413) unread
    api_key_cache_s: float = 5.0  # a revoked key stops working within this
    api_rate_limit_per_minute: int | None = None  # per key, unless the key has its own
    api_rate_limit_burst: int = 20  # calls a key may make at once above its rate
    api_completion_wait_s: float = 600.0  # /v1/chat/completions gives up waiting after this
    api_events_max_s: float = 3600.0  # an event stream closes after this (clients resume)
    api_keepalive_s: float = 15.0  # an SSE comment this often keeps proxies from closing
    api_ready_cache_s: float = 1.0
    api_access_log: bool = False  # a line per call costs ~8% of intake; /metrics counts calls
    # Webhooks (webhooks/): signing secrets are encrypted with this Fernet key (base64, 32
    # bytes; `sheepdog webhooks keygen` makes one). Without it no secret can be stored or used.
    webhook_secret_key: SecretStr | None = None
    webhook_allow_private: bool = False  # deliver to private/loopback/link-local addresses
    webhook_timeout_s: float = 5.0  # connect, and each read, of one delivery
    webhook_max_age_s: float = 24 * 3600  # retried this long after the event, then dead
    webhook_backoff_base_s: float = 5.0  # doubled per attempt (full jitter)
    webhook_backoff_max_s: float = 3600.0
    webhook_endpoint_concurrency: int = 2  # deliveries in flight per endpoint (all workers)
    webhook_tenant_concurrency: int = 4  # and per tenant, across its endpoints and URLs
    webhook_claim_batch: int = 16  # most rows one slot leases at once (doubling from 1)
    webhook_sweep_interval_s: float = 2.0  # beat looks for due deliveries this often
    webhook_rotation_grace_s: float = 24 * 3600  # the previous secret still signs this long
    webhook_max_response_bytes: int = 4096  # of a receiver's answer, read and kept

    def api_key(self) -> str:
        """The provider key, or a placeholder the SDK accepts when none is set."""
        return self.openai_api_key.get_secret_value() if self.openai_api_key else "sk-unset"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
