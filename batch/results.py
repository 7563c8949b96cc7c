"""Reading a batch's result lines: what one output or error line says about its request.

`parse_line` is the one entry: a fast path for the common answer line, and the pydantic models
(the reference) for everything else. Pure: no service, no database."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import orjson
from pydantic import ValidationError

from models.batch_lines import ID_CHARS, CompletionBody, ErrorObject, OutputLine
from models.tables import INTEGER_MAX, bounded, storable

# An answer; a failure the request ends with; or no answer worth keeping, tried in a later batch.
ResultKind = Literal["ok", "fail", "requeue"]

# A line the emulated executor gave up on (provider down or throttling) is retried like an
# expired one, in a later batch.
REQUEUE_CODES = frozenset({"batch_expired", "batch_cancelled", "emulated_retries_exhausted"})


@dataclass(slots=True)
class LineResult:
    """What one result line says about its request."""

    kind: ResultKind
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.text is not None:
            self.text = storable(self.text)
        if self.finish_reason is not None:
            self.finish_reason = bounded(self.finish_reason, "finish_reason")
        if self.reason is not None:
            self.reason = storable(self.reason)


def parse_line(raw: bytes) -> tuple[str, LineResult] | None:
    """(custom_id, result) of one output/error line, or None when the line is malformed.

    A line counts as an answer only when it is a 200 response whose body has a choice with
    text; anything else is a failure with the provider's reason, or malformed."""
    return _plain_answer(raw) or _parse_validated(raw)


def _plain_answer(raw: bytes) -> tuple[str, LineResult] | None:
    """The common line (one choice with text, usage or none) read with orjson and exact type
    checks, at a fraction of the models' cost. It accepts only lines the models accept and gives
    the same result; anything else (errors, odd shapes, malformed lines) returns None and goes
    through `_parse_validated`, the reference."""
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(line) is not dict or line.get("error") is not None:
        return None
    custom_id, response, line_id = line.get("custom_id"), line.get("response"), line.get("id")
    if type(custom_id) is not str or not 0 < len(custom_id) <= ID_CHARS or "\x00" in custom_id:
        return None
    if type(response) is not dict:
        return None
    if not (line_id is None or type(line_id) is str) or response.get("status_code") != 200:
        return None
    request_id, body = response.get("request_id"), response.get("body")
    if type(response["status_code"]) is not int or type(body) is not dict:
        return None
    if not (request_id is None or type(request_id) is str):
        return None
    choices, usage = body.get("choices"), body.get("usage")
    if type(choices) is not list or len(choices) != 1 or type(choices[0]) is not dict:
        return None
    message, finish = choices[0].get("message"), choices[0].get("finish_reason")
    if type(message) is not dict or not (finish is None or type(finish) is str):
        return None
    text, refusal = message.get("content"), message.get("refusal")
    if type(text) is not str or not (refusal is None or type(refusal) is str):
        return None
    if usage is None:
        return custom_id, LineResult("ok", text=text, finish_reason=finish)
    if type(usage) is not dict:
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if type(prompt) is not int or type(completion) is not int:
        return None
    if not (0 <= prompt <= INTEGER_MAX and 0 <= completion <= INTEGER_MAX):  # as LineUsage
        return None
    return custom_id, LineResult("ok", text, finish, prompt, completion)


def _parse_validated(raw: bytes) -> tuple[str, LineResult] | None:
    """`parse_line` through the pydantic models: every shape, errors included."""
    try:
        line = OutputLine.model_validate_json(raw)
    except ValidationError:
        return None
    response, error = line.response, line.error
    if response is not None and response.status_code == 200 and error is None:
        try:
            body = CompletionBody.model_validate(response.body or {})
        except ValidationError:
            return None
        # A lone choice is the answer; among several (a relay answering n > 1) choice 0 is,
        # and no other's text is taken for it.
        choices = body.choices
        choice = (
            choices[0] if len(choices) == 1 else next((c for c in choices if c.index == 0), None)
        )
        if choice is None:
            return None
        if choice.message.content is None:
            if choice.message.refusal:
                return line.custom_id, LineResult(
                    "fail", reason=f"refusal: {choice.message.refusal}"
                )
            return None
        usage = body.usage
        return line.custom_id, LineResult(
            "ok",
            text=choice.message.content,
            finish_reason=choice.finish_reason,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
        )
    if error is None and response is not None:
        raw_error = (response.body or {}).get("error")
        try:
            error = ErrorObject.model_validate(raw_error if isinstance(raw_error, dict) else {})
        except ValidationError:
            error = ErrorObject()
        reason = error.reason(response.status_code)
    elif error is not None:
        reason = error.reason()
    else:
        return None
    kind: ResultKind = "requeue" if error.code in REQUEUE_CODES else "fail"
    return line.custom_id, LineResult(kind, reason=reason)
