"""JSONL lines of the Batch API: the input line we write, and the output and error lines the
provider sends back (validated one at a time, never a whole file)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.tables import INTEGER_MAX, max_chars

ID_CHARS = max_chars("id")

CHAT_URL: Literal["/v1/chat/completions"] = "/v1/chat/completions"


class InputMessage(BaseModel):
    """A chat message inside a batch line's body (the provider's shape, extra keys allowed)."""

    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1)
    content: str | list[Any]


class InputBody(BaseModel):
    """The chat.completions body of one batch line."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[InputMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, gt=0)


class InputLine(BaseModel):
    """One line of a batch input file: `{custom_id, method, url, body}`."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1, max_length=64)
    method: Literal["POST"] = "POST"
    url: Literal["/v1/chat/completions"] = CHAT_URL
    body: InputBody


class LineUsage(BaseModel):
    """A provider's usage object (a batch line's, a stream's last chunk): counts the token
    columns can hold, or it is refused."""

    model_config = ConfigDict(extra="ignore")

    prompt_tokens: int = Field(ge=0, le=INTEGER_MAX)
    completion_tokens: int = Field(ge=0, le=INTEGER_MAX)


class LineMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    content: str | None = None
    refusal: str | None = None


class LineChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    index: Any = None  # read only to pick choice 0 among several (batch/results.py)
    message: LineMessage
    finish_reason: str | None = None


class CompletionBody(BaseModel):
    """The part of a chat.completion object an ingest needs."""

    model_config = ConfigDict(extra="ignore")

    choices: list[LineChoice] = Field(min_length=1)
    usage: LineUsage | None = None


class ErrorObject(BaseModel):
    """The provider's error: `{code, message}` (other keys ignored)."""

    model_config = ConfigDict(extra="ignore")

    code: str | None = None
    message: str | None = None

    def reason(self, status_code: int | None = None) -> str:
        code = self.code or (f"http_{status_code}" if status_code else "error")
        return f"{code}: {self.message or 'no message'}"


class LineResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status_code: int
    request_id: str | None = None
    body: dict[str, Any] | None = None


class OutputLine(BaseModel):
    """One line of an output or error file, exactly as the provider sends it."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    # A request id, as the `requests` table holds one (anything else names no request).
    custom_id: str = Field(min_length=1, max_length=ID_CHARS, pattern="^[^\x00]*$")
    response: LineResponse | None = None
    error: ErrorObject | None = None


class BatchErrorItem(BaseModel):
    """One entry of a failed batch's `errors.data` (validation failure)."""

    model_config = ConfigDict(extra="ignore")

    code: str | None = None
    message: str | None = None
    line: int | None = None
    param: str | None = None
