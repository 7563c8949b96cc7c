"""Validation of a chat-completion request body, shared by the HTTP endpoint and batch lines."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from simulator.answers import Answer, generate
from simulator.errors import ApiError, bad_request, model_not_found
from simulator.tokens import count_message_tokens


@dataclass(slots=True)
class ChatRequest:
    """A validated chat-completion request."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    has_stream_options: bool
    temperature: object
    max_tokens: int | None
    stop: str | list[str] | None

    def answer(self, length_range: tuple[int, int]) -> Answer:
        """The deterministic answer to this request."""
        return generate(
            model=self.model,
            messages=self.messages,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            stop=self.stop,
            length_range=length_range,
        )

    def prompt_tokens(self) -> int:
        return count_message_tokens(self.messages)

    def last_user_text(self) -> str:
        """Text of the last user message (what fault rules ``match`` against)."""
        return last_user_text(self.messages)


def last_user_text(messages: object) -> str:
    """Text of the last user message of a message list, '' when there is none."""
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(
                    str(part.get("text", "")) for part in content if isinstance(part, Mapping)
                )
            return ""
    return ""


def parse_chat_request(body: object, known_models: set[str] | frozenset[str]) -> ChatRequest:
    """Validate a request body as the real endpoint does; raise ``ApiError`` when it is wrong."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter", param="model")
    if model not in known_models:
        raise model_not_found(model)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request(
            "'messages' must be a non-empty array.", param="messages", code="invalid_value"
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise bad_request(f"Invalid value for 'messages[{index}]'.", param=f"messages[{index}]")
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("The simulator only supports n=1.", param="n", code="invalid_value")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise bad_request(
            "max_tokens must be a positive integer.", param="max_tokens", code="invalid_value"
        )
    temperature = body.get("temperature")
    if temperature is not None and (
        not isinstance(temperature, int | float) or not 0 <= temperature <= 2
    ):
        raise bad_request(
            "temperature must be between 0 and 2.", param="temperature", code="invalid_value"
        )
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str)
        or (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop))
    ):
        raise bad_request("stop must be a string or a list of up to 4 strings.", param="stop")
    stream = bool(body.get("stream") or False)
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise bad_request(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
                code="invalid_value",
            )
        if not isinstance(options, dict):
            raise bad_request("stream_options must be an object.", param="stream_options")
    return ChatRequest(
        model=model,
        messages=messages,
        stream=stream,
        include_usage=bool(options and options.get("include_usage")),
        has_stream_options=options is not None,
        temperature=temperature,
        max_tokens=max_tokens,
        stop=stop,
    )


def completion_body(
    request: ChatRequest, answer: Answer, completion_id: str, created: int, tier: str = "default"
) -> dict[str, Any]:
    """A ``chat.completion`` object for an answer."""
    prompt = request.prompt_tokens()
    completion = len(answer.pieces)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": request.model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": answer.text,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": answer.finish_reason,
            }
        ],
        "usage": usage(prompt, completion, tier),
        "service_tier": tier,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


SYSTEM_FINGERPRINT = "fp_sheepdog_sim"


def usage(prompt: int, completion: int, tier: str = "default") -> dict[str, Any]:
    """A usage object (naming the tier that served the call, for the bill)."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
        "service_tier": tier,
    }


def error_line_body(error: ApiError) -> dict[str, Any]:
    """The body of a batch line answered with an error."""
    return {"error": error.body()}
