"""Simulator configuration: server settings and fault rules (pydantic, JSON- and CLI-loadable)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BatchFault = Literal["fail_validation", "expire", "lose_lines", "error_lines"]
ServedTier = Literal["flex", "priority"]
OFFERED_TIERS: tuple[ServedTier, ...] = ("flex", "priority")


class FaultRule(BaseModel):
    """One fault: *when* it applies (targeting) and *what* it does (effects).

    Targeting (all given conditions must hold):
    - ``match``: the last user message contains this substring (for batch rules: a line's
      last user message; a batch-wide rule applies when any line matches).
    - ``model``: the request's model equals this.
    - ``first``: only the first K requests that pass the other conditions (batches for batch rules).
    - ``probability``: share of those requests, drawn from a PRNG seeded per rule (deterministic
      for a given arrival order). For ``lose_lines``/``error_lines`` it is the share of lines.

    Chat effects: ``ttft_ms``, ``chunk_delay_ms``, ``status`` (429/500/503/400/...; 429 gets a
    ``Retry-After: retry_after_s`` header), ``cut_after`` (stream drops the connection after N
    content chunks, no ``[DONE]``), ``stall_after`` + ``stall_s`` (stream sends nothing for S
    seconds after N content chunks, then carries on), ``no_finish_reason`` (the stream ends with
    ``data: [DONE]`` but never names a finish reason, as some OpenAI-compatible servers do),
    ``keepalive_ms`` (every wait of a stream, before its first token, between tokens and in
    a stall, is filled with an SSE comment this often, as relays keep a connection alive),
    ``second_choice`` (each content chunk of a stream is followed by one of a choice with
    index 1 holding other text, as a relay answering ``n=2`` streams them),
    ``append_text`` (the answer ends with this piece, e.g. control characters or a NUL, which
    real models do emit), ``stream_usage`` (a stream's usage chunk carries this object instead,
    as a relay that miscounts might send).

    Batch effects: ``batch`` = ``fail_validation`` | ``expire`` (after ``after_lines`` lines,
    default half) | ``lose_lines`` (those custom_ids get no line anywhere) | ``error_lines``
    (those lines go to the error file with a 400 response body).
    """

    model_config = ConfigDict(extra="forbid")

    match: str | None = None
    model: str | None = None
    first: int | None = Field(default=None, ge=0)
    probability: float = Field(default=1.0, ge=0.0, le=1.0)

    ttft_ms: float | None = Field(default=None, ge=0)
    chunk_delay_ms: float | None = Field(default=None, ge=0)
    status: int | None = Field(default=None, ge=400, le=599)
    retry_after_s: float = Field(default=1.0, ge=0)
    message: str | None = None
    cut_after: int | None = Field(default=None, ge=0)
    stall_after: int | None = Field(default=None, ge=0)
    stall_s: float = Field(default=5.0, ge=0)
    keepalive_ms: float | None = Field(default=None, gt=0)
    second_choice: bool | None = None
    no_finish_reason: bool | None = None
    append_text: str | None = None
    stream_usage: dict[str, Any] | None = None

    batch: BatchFault | None = None
    after_lines: int | None = Field(default=None, ge=0)

    @property
    def is_batch(self) -> bool:
        """True for a rule that acts on batches rather than chat completions."""
        return self.batch is not None


class SimulatorConfig(BaseModel):
    """Everything the simulator is started with. Runtime changes go through ``PUT /_sim/config``."""

    model_config = ConfigDict(extra="forbid")

    api_key: str | None = None
    ttft_ms: float = Field(default=0.0, ge=0)
    chunk_delay_ms: float = Field(default=0.0, ge=0)
    time_scale: float = Field(default=1.0, gt=0)
    no_batch_api: bool = False
    reject_stream_options: bool = False
    answer_tokens: tuple[int, int] = (20, 60)
    data_dir: str | None = None
    # The models served; None: simulator/models.py's list (a provider serves its own models).
    models: list[str] | None = None
    faults: list[FaultRule] = Field(default_factory=list)

    # Service tiers (simulator/tiers.py): those offered; any other is served as `default`.
    service_tiers: list[ServedTier] = Field(default_factory=lambda: list(OFFERED_TIERS))
    flex_capacity: int | None = Field(default=None, ge=0)  # flex calls at once; None: no limit
    flex_slowdown: float = Field(default=3.0, ge=1)  # flex delays are these times the standard
    flex_ttft_ms: float = Field(default=20.0, ge=0)  # and its first token waits this much more
    priority_speedup: float = Field(default=2.0, ge=1)  # priority delays divided by this

    # Batch timing in provider seconds, divided by time_scale.
    batch_validate_s: float = Field(default=10.0, ge=0)
    batch_seconds_per_line: float = Field(default=0.2, ge=0)
    batch_finalize_s: float = Field(default=5.0, ge=0)
    batch_window_s: float = Field(default=24 * 3600.0, gt=0)

    # Limits of the real Batch API.
    batch_max_lines: int = Field(default=50_000, gt=0)
    max_file_bytes: int = Field(default=200 * 1024 * 1024, gt=0)
    # Any other request body (chat, batch create, admin): refused (413) past this, unread.
    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0)

    @model_validator(mode="after")
    def _check_range(self) -> SimulatorConfig:
        low, high = self.answer_tokens
        if low < 1 or high < low:
            raise ValueError("answer_tokens must be (low, high) with 1 <= low <= high")
        return self

    def scaled(self, provider_seconds: float) -> float:
        """Real seconds for a span of provider time."""
        return provider_seconds / self.time_scale

    def resolved_data_dir(self) -> Path:
        """The data directory, created when missing (a fresh temp dir when unset)."""
        if self.data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix="sheepdog-sim-")
        path = Path(self.data_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @classmethod
    def from_file(cls, path: str | Path) -> SimulatorConfig:
        """Load a configuration from a JSON file."""
        return cls.model_validate_json(Path(path).read_text())
