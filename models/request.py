"""The request a backend service submits, validated at the edge before anything is enqueued."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sheepdog.errors import InvalidRequest

MAX_CONTENT_CHARS = 2_000_000
MAX_METADATA_PAIRS = 16
ROLES = ("system", "developer", "user", "assistant")


class Priority(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def route(self) -> str:
        """The path a priority takes by default: people wait on high and normal."""
        return "batch" if self is Priority.LOW else "stream"


def new_request_id() -> str:
    """A random, unguessable request id (128 bits), made by the producer."""
    return "req_" + secrets.token_hex(16)


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid")

    role: str
    content: str
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        return role

    @field_validator("content")
    @classmethod
    def _content_size(cls, content: str) -> str:
        if not content.strip():
            raise ValueError("content is empty")
        if len(content) > MAX_CONTENT_CHARS:
            raise ValueError(
                f"content is {len(content):,} characters, over the limit of {MAX_CONTENT_CHARS:,}"
            )
        return content


class ChatRequest(BaseModel):
    """A chat-completion request as the producer client takes it."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    model: str
    messages: list[Message]
    priority: Priority = Priority.NORMAL
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    stop: str | list[str] | None = None
    max_cost_usd: Decimal | None = None
    deadline: datetime | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    webhook_url: str | None = None  # told when this request ends (signed, webhooks/)

    @field_validator("priority", mode="before")
    @classmethod
    def _known_priority(cls, value: object) -> object:
        if isinstance(value, str) and value not in {p.value for p in Priority}:
            raise ValueError(f"unknown priority {value!r} (expected high, normal or low)")
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str, info: ValidationInfo) -> str:
        table = _price_table(info)
        if model not in table:
            raise ValueError(f"unknown model {model!r} (known: {', '.join(table.names())})")
        return model

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, messages: list[Message]) -> list[Message]:
        if not messages:
            raise ValueError("messages is empty: give at least one message")
        return messages

    @field_validator("max_tokens")
    @classmethod
    def _positive_tokens(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(f"max_tokens must be positive, got {value}")
        return value

    @field_validator("max_cost_usd")
    @classmethod
    def _non_negative_cap(cls, value: Decimal | None) -> Decimal | None:
        if value is not None and value < 0:
            raise ValueError(f"max_cost_usd must not be negative, got {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError(f"stop takes at most 4 sequences, got {len(value)}")
        return value

    @field_validator("deadline")
    @classmethod
    def _future_deadline(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        if value <= datetime.now(UTC):
            raise ValueError(f"deadline {value.isoformat()} is in the past")
        return value

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"metadata has {len(value)} pairs, over the limit of 16")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _safe_webhook_url(cls, url: str | None) -> str | None:
        # Form and literal addresses here; the resolved address at every delivery.
        from sheepdog.settings import get_settings
        from webhooks.addresses import check_form

        if url is not None:
            check_form(url, allow_private=get_settings().webhook_allow_private)
        return url

    @model_validator(mode="after")
    def _fits_model(self, info: ValidationInfo) -> ChatRequest:
        from sheepdog.tokens import count_message_tokens

        price = _price_table(info).get(self.model)
        if self.max_tokens is not None and self.max_tokens > price.max_output_tokens:
            raise ValueError(
                f"max_tokens {self.max_tokens} exceeds {self.model}'s output limit of "
                f"{price.max_output_tokens}"
            )
        prompt = count_message_tokens(m.model_dump() for m in self.messages)
        if prompt >= price.context_window:
            raise ValueError(
                f"the messages are about {prompt:,} tokens, too long for {self.model}'s context "
                f"window of {price.context_window:,}"
            )
        return self

    @property
    def tenant(self) -> str:
        return self.metadata.get("tenant", "default")

    def provider_body(self) -> dict[str, Any]:
        """The chat.completions body sent to the provider (no Sheepdog-only fields)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [m.model_dump(exclude_none=True) for m in self.messages],
        }
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.stop is not None:
            body["stop"] = self.stop
        return body


def _price_table(info: ValidationInfo) -> Any:
    from costs.prices import price_table

    context = info.context or {}
    return context.get("price_table") or price_table()


def _loc_part(part: object) -> str:
    text = str(part)
    if isinstance(part, int) or (text.isidentifier() and len(text) <= 40):
        return text
    return repr(text[:40])  # a caller's odd key: quoted, escaped, never a line break


def format_validation_error(err: ValidationError) -> str:
    """One line naming each bad field and why, e.g. `priority: unknown priority 'x' (...)`."""
    parts = []
    for e in err.errors(include_url=False):
        where = ".".join(_loc_part(p) for p in e["loc"]) or "request"
        msg = " ".join(str(e["msg"]).removeprefix("Value error, ").split())
        parts.append(f"{where}: {msg}")
    return "invalid request: " + "; ".join(parts)


def parse_request(data: object, *, context: dict[str, Any] | None = None) -> ChatRequest:
    """Validate one request; raise InvalidRequest with a one-line reason."""
    if isinstance(data, ChatRequest):
        return data
    if not isinstance(data, dict):
        raise InvalidRequest(f"invalid request: expected an object, got {type(data).__name__}")
    try:
        return ChatRequest.model_validate(data, context=context)
    except ValidationError as err:
        raise InvalidRequest(format_validation_error(err)) from None
