"""The request a backend service submits, validated at the edge before anything is enqueued."""

from __future__ import annotations

import re
import secrets
import unicodedata
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Context, Decimal
from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from core.errors import InvalidRequest
from models.tables import USD, max_chars

MAX_CONTENT_CHARS = 2_000_000
# What the `requests` columns can hold (PostgreSQL enforces them; SQLite does not): checked
# here so that a request the table cannot store is refused at the edge, not lost at intake.
TENANT_MAX_CHARS = max_chars("tenant")
MAX_COST_USD_LIMIT = Decimal(10) ** (USD.precision - USD.scale)  # type: ignore[operator]
USD_STEP = Decimal(10) ** -USD.scale  # type: ignore[operator]
USD_CONTEXT = Context(prec=(USD.precision or 20) + 2)  # digits for any value under the limit
# As OpenAI's metadata: 16 pairs, besides the keys the front door sets itself (`tenant` from
# the key, `user` from OpenAI's field).
MAX_METADATA_PAIRS = 16
SHEEPDOG_METADATA = frozenset({"tenant", "user"})


def column_usd(value: Decimal) -> Decimal | None:
    """`value` as a USD column stores it (its scale, rounded as PostgreSQL rounds), or None when
    the column cannot hold it: 9999999999.99999999999 is below the limit but rounds up to it."""
    value = value if isinstance(value, Decimal) else Decimal(str(value))
    if value >= MAX_COST_USD_LIMIT:
        return None
    stored = value.quantize(USD_STEP, ROUND_HALF_UP, context=USD_CONTEXT)
    return stored if stored < MAX_COST_USD_LIMIT else None


def check_tenant(tenant: str) -> None:
    """InvalidRequest unless `tenant` fits the tables' tenant columns (a budget, a key, a
    webhook endpoint is kept for one)."""
    if not 0 < len(tenant) <= TENANT_MAX_CHARS:
        raise InvalidRequest(
            f"tenant is {len(tenant):,} characters; a tenant is 1 to {TENANT_MAX_CHARS} characters"
        )
    try:
        _no_surrogates(tenant)
    except ValueError as err:
        raise InvalidRequest(f"tenant is {err}") from None
    if not tenant.isprintable():  # a NUL (PostgreSQL refuses it) or a control character
        raise InvalidRequest(f"tenant must be printable text, got {tenant[:40]!r}")


MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 1_000
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # a message's `name`, as the OpenAI API takes it
_SURROGATE = re.compile("[\\ud800-\\udfff]")  # lone surrogates: argv that was not UTF-8
REQUEST_ID = re.compile(r"^req_[0-9a-f]{32}$")
PLAIN_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
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


def check_request_id(value: object) -> str:
    """`value` if it is shaped like a request id; InvalidRequest (one line) otherwise."""
    if isinstance(value, str) and REQUEST_ID.match(value):
        return value
    shown = (
        repr(value[:40]) + ("..." if len(value) > 40 else "")
        if isinstance(value, str)
        else (type(value).__name__)
    )
    raise InvalidRequest(f"invalid request id {shown}: expected req_ and 32 hex digits")


def _no_surrogates(value: str) -> str:
    """Text that can be sent as UTF-8: argv with invalid UTF-8 arrives as lone surrogates."""
    found = _SURROGATE.search(value)  # a scan in C: a prompt is checked per character
    if found is not None:
        raise ValueError(
            f"not valid UTF-8 text (a lone surrogate or undecodable byte at {found.start()})"
        )
    return value


def _visible(text: str) -> bool:
    """Whether `text` has a character that is neither whitespace nor invisible (zero-width
    spaces, joiners, BOMs and other format characters)."""
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cf", "Cc") for ch in text)


class Message(BaseModel):
    """One chat message."""

    # Instances are validated again when passed in: `model_construct` skips validation.
    model_config = ConfigDict(extra="forbid", revalidate_instances="always")

    role: str
    content: str
    name: str | None = None

    @field_validator("role", "content", "name")
    @classmethod
    def _utf8(cls, value: str | None) -> str | None:
        return None if value is None else _no_surrogates(value)

    @field_validator("content")
    @classmethod
    def _not_invisible(cls, content: str) -> str:
        if content and len(content) <= MAX_CONTENT_CHARS and not _visible(content):
            raise ValueError("content is empty (only whitespace or invisible characters)")
        return content

    @field_validator("name")
    @classmethod
    def _name_shape(cls, name: str | None) -> str | None:
        if name is not None and not NAME.match(name):
            shown = repr(name[:40]) + ("..." if len(name) > 40 else "")
            raise ValueError(f"name {shown} must be 1-64 letters, digits, _ or -")
        return name

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

    model_config = ConfigDict(
        extra="forbid", str_strip_whitespace=False, revalidate_instances="always"
    )

    model: str
    messages: list[Message]
    priority: Priority = Priority.NORMAL
    # Strict: `true` or "10" is a caller's mistake, not a number to guess at.
    max_tokens: int | None = Field(default=None, strict=True)
    temperature: float | None = Field(default=None, ge=0, le=2, strict=True)
    stop: str | list[str] | None = None
    max_cost_usd: Decimal | None = None
    deadline: datetime | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=max_chars("idempotency_key")
    )
    webhook_url: str | None = None  # told when this request ends (signed, webhooks/)
    # A high request may ask for the priority lane (rules/routing.py; the provider must sell it).
    lane: Literal["priority"] | None = None

    @field_validator("priority", mode="before")
    @classmethod
    def _known_priority(cls, value: object) -> object:
        if isinstance(value, str) and value not in {p.value for p in Priority}:
            raise ValueError(f"unknown priority {value!r} (expected high, normal or low)")
        return value

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

    @field_validator("max_cost_usd", mode="before")
    @classmethod
    def _plain_decimal(cls, value: object) -> object:
        # Decimal() also reads "1_000" and " 5 ": a cap is written as JSON writes a number.
        if isinstance(value, str) and not PLAIN_DECIMAL.fullmatch(value):
            raise ValueError(f"max_cost_usd {value[:40]!r} is not a plain decimal number")
        return value

    @field_validator("deadline", mode="before")
    @classmethod
    def _iso_deadline(cls, value: object) -> object:
        # pydantic reads a number as Unix seconds or milliseconds, guessing which by its size.
        numeric = isinstance(value, int | float) or (
            isinstance(value, str) and PLAIN_DECIMAL.fullmatch(value.strip()) is not None
        )
        if numeric:
            raise ValueError(
                "deadline must be an ISO 8601 time such as 2026-12-08T12:00:00Z, not a number"
            )
        return value

    @field_validator("max_cost_usd")
    @classmethod
    def _non_negative_cap(cls, value: Decimal | None) -> Decimal | None:
        if value is not None and value < 0:
            raise ValueError(f"max_cost_usd must not be negative, got {value}")
        if value is None:
            return None
        stored = column_usd(value.copy_abs() if value.is_zero() else value)  # -0 is 0
        if stored is None:
            raise ValueError(
                f"max_cost_usd {value} is too large (must be below {MAX_COST_USD_LIMIT:,})"
            )
        return stored

    @field_validator("idempotency_key")
    @classmethod
    def _storable_key(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("idempotency_key contains a NUL character")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError(f"stop takes at most 4 sequences, got {len(value)}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        sequences = [value] if isinstance(value, str) else value or []
        if value is not None and (not sequences or not all(sequences)):
            raise ValueError("stop must be one or more non-empty strings (or left out)")
        for s in sequences:
            _no_surrogates(s)
        return value

    @field_validator("model", "idempotency_key")
    @classmethod
    def _utf8(cls, value: str | None) -> str | None:
        return None if value is None else _no_surrogates(value)

    @field_validator("deadline")
    @classmethod
    def _future_deadline(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        try:
            value.astimezone(UTC)  # what the table stores: a time past year 9999 cannot be
        except OverflowError:
            raise ValueError(f"deadline {value.isoformat()} is past the year 9999 in UTC") from None
        if value <= datetime.now(UTC):
            raise ValueError(f"deadline {value.isoformat()} is in the past")
        return value

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, str]) -> dict[str, str]:
        own = len(value.keys() - SHEEPDOG_METADATA)
        if own > MAX_METADATA_PAIRS:
            raise ValueError(
                f"metadata has {own} pairs besides tenant and user,"
                f" over the limit of {MAX_METADATA_PAIRS}"
            )
        tenant = value.get("tenant")
        if tenant is not None:
            check_tenant(tenant)  # InvalidRequest is a ValueError: pydantic reports it
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_sizes(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            shown = repr(key[:40])
            if len(key) > MAX_METADATA_KEY_CHARS:
                raise ValueError(f"metadata key {shown}... is over {MAX_METADATA_KEY_CHARS} chars")
            if len(text) > MAX_METADATA_VALUE_CHARS:
                raise ValueError(
                    f"metadata {shown} is {len(text):,} characters, over the limit of "
                    f"{MAX_METADATA_VALUE_CHARS:,}"
                )
            _no_surrogates(key)
            _no_surrogates(text)
        return value

    @model_validator(mode="after")
    def _priority_lane_is_for_high(self) -> ChatRequest:
        if self.lane == "priority" and self.priority is not Priority.HIGH:
            raise ValueError(f"lane 'priority' is for priority high, not {self.priority.value}")
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


def error_param(err: ValidationError) -> str | None:
    """The first bad field's path as OpenAI's errors write `param`: `messages[0].role`. The
    names pydantic gives a union's branches (`stop.str`, `stop.list[str]`) are no field's."""
    errors = err.errors(include_url=False)
    path = ""
    for part in errors[0]["loc"] if errors else ():
        if isinstance(part, int):
            path += f"[{part}]"
        elif not part.isidentifier() or part in _TYPE_NAMES:
            break
        else:
            path += f".{part}" if path else part
    return path or None


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def validate_request(data: object) -> ChatRequest:
    """Validate one request against the schema; raise InvalidRequest with a one-line reason.
    The edge's whole check, with the model's limits, is rules/admission.py's admit."""
    if not isinstance(data, dict | ChatRequest):
        raise InvalidRequest(f"invalid request: expected an object, got {type(data).__name__}")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as err:
        raise InvalidRequest(format_validation_error(err), error_param(err)) from None
