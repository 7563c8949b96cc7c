"""A `POST /v1/chat/completions` call turned into a Sheepdog request (the body as OpenAI's SDKs
send it, Sheepdog's knobs from headers). Fields Sheepdog does not carry to the provider are
refused (400) rather than silently dropped."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers

from models.request import error_param, format_validation_error
from sheepdog.api.errors import ApiError

PRIORITY = "x-sheepdog-priority"
DEADLINE = "x-sheepdog-deadline"
MAX_COST = "x-sheepdog-max-cost-usd"
IDEMPOTENCY = "idempotency-key"
# The request fields a call sets through headers: a refusal's `param` names the header.
HEADER_OF = {
    "priority": "X-Sheepdog-Priority",
    "deadline": "X-Sheepdog-Deadline",
    "max_cost_usd": "X-Sheepdog-Max-Cost-Usd",
    "idempotency_key": "Idempotency-Key",
}

FLEX_REFUSED = (
    "service_tier flex is not taken on /v1/chat/completions: submit the request with priority "
    "low and a deadline on POST /v1/requests, and Sheepdog runs it on the flex tier when the "
    "deadline allows and the provider sells it"
)

LOW_REFUSED = (
    "priority low is not served on /v1/chat/completions (a batch may take hours to answer): "
    "submit it with POST /v1/requests and read it with GET /v1/requests/{id}"
)


# Strict, as the native API is (and as OpenAI's own API answers `"max_tokens": "10"` or 10.0):
# a JSON `true`, a string or a float where a whole number goes is refused, never coerced.
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class ChatBody(BaseModel):
    """What Sheepdog takes of OpenAI's chat.completions body."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    metadata: dict[str, str] | None = None
    user: str | None = Field(default=None, max_length=200)
    # OpenAI's own: "priority" asks for the priority lane (a high request; Sheepdog takes it
    # when the provider sells the tier), "auto"/"default" change nothing, "flex" is refused.
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _content(message: dict[str, Any], index: int) -> Any:
    """A message's content as one string (text parts joined); anything else is left for the
    request's own validation to name."""
    content = message.get("content")
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ApiError(
                400,
                f"invalid request: messages.{index}.content: only text parts are supported,"
                f" got {kind!r}",
                "invalid_request",
                f"messages.{index}.content",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ApiError(
                400,
                f"invalid request: messages.{index}.content: a text part's text must be a"
                f" string, got {_json_type(text)}",
                "invalid_request",
                f"messages.{index}.content",
            )
        texts.append(text)
    return "".join(texts)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "an object" if isinstance(value, dict) else "an array"


def parse_chat_body(raw: object) -> ChatBody:
    if not isinstance(raw, dict):
        raise ApiError(400, "invalid request: expected a JSON object", "invalid_request")
    try:
        return ChatBody.model_validate(raw)
    except ValidationError as err:
        raise ApiError(
            400, format_validation_error(err), "invalid_request", error_param(err)
        ) from None


def openai_param(param: str | None, body: ChatBody) -> str | None:
    """A refusal's `param` as the caller wrote it: the header that set the field, or
    `max_completion_tokens` when that is what the body said."""
    if param == "max_tokens" and body.max_completion_tokens is not None:
        return "max_completion_tokens"
    return HEADER_OF.get(param or "", param)


def to_request(body: ChatBody, headers: Headers) -> dict[str, Any]:
    """The Sheepdog request (models/request.py ChatRequest fields) for this call."""
    if body.service_tier == "flex":
        raise ApiError(400, FLEX_REFUSED, "service_tier_not_supported", "service_tier")
    asked_priority = body.service_tier == "priority"
    default = "high" if asked_priority else "normal"
    priority = (headers.get(PRIORITY) or default).strip().lower()
    if priority == "low":
        raise ApiError(400, LOW_REFUSED, "priority_not_supported", "X-Sheepdog-Priority")
    messages = []
    for index, message in enumerate(body.messages):
        m = {k: v for k, v in message.items() if v is not None}  # an SDK echo's nulls
        if "content" in m:
            m["content"] = _content(m, index)
        messages.append(m)
    request: dict[str, Any] = {"model": body.model, "messages": messages, "priority": priority}
    if asked_priority:
        request["lane"] = "priority"
    # max_completion_tokens is OpenAI's current name (0 is a value: refused by the request's
    # own check, not taken for "no limit").
    max_tokens = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    if body.temperature is not None:
        request["temperature"] = body.temperature
    if body.stop is not None:
        request["stop"] = body.stop
    metadata = dict(body.metadata or {})
    if body.user:
        metadata.setdefault("user", body.user)
    if metadata:
        request["metadata"] = metadata
    if headers.get(DEADLINE):
        request["deadline"] = headers[DEADLINE].strip()
    if headers.get(MAX_COST):
        request["max_cost_usd"] = headers[MAX_COST].strip()
    if headers.get(IDEMPOTENCY):
        request["idempotency_key"] = headers[IDEMPOTENCY].strip()
    return request
