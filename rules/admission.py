"""The edge's one check of a request: the schema (models/request.py), then the rules that need
no service: a model the price table knows, its output limit and context window, and a webhook
URL's form."""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import InvalidRequest, SheepdogError
from core.settings import get_settings
from models.request import ChatRequest, validate_request
from rules.addresses import check_form
from rules.prices import PriceTable, price_table
from rules.tokens import count_message_tokens


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request that passed the whole check, with its prompt's token estimate: what the
    submit path takes without checking it again (the front door checks on its event loop,
    and submits in a thread)."""

    request: ChatRequest
    prompt_tokens: int


def admit(data: object, *, prices: PriceTable | None = None) -> Admitted:
    """Validate one request; raise InvalidRequest with a one-line reason naming each problem."""
    request = validate_request(data)
    prompt = count_message_tokens(m.model_dump() for m in request.messages)
    problems = [
        *_webhook_problems(request),
        *_model_problems(request, prices or price_table(), prompt),
    ]
    if problems:
        text = "; ".join(problem for _, problem in problems)
        raise InvalidRequest("invalid request: " + text, problems[0][0])
    return Admitted(request, prompt)


def parse_request(data: object, *, prices: PriceTable | None = None) -> ChatRequest:
    """Validate one request (as `admit`), the request alone."""
    return admit(data, prices=prices).request


def _webhook_problems(request: ChatRequest) -> list[tuple[str, str]]:
    # Form and literal addresses here; the resolved address at every delivery.
    if request.webhook_url is None:
        return []
    try:
        check_form(request.webhook_url, allow_private=get_settings().webhook_allow_private)
    except (SheepdogError, ValueError) as err:  # ValueError: urlsplit's own (a bad IPv6)
        return [("webhook_url", f"webhook_url: {err}")]
    return []


# Each problem is (param, text): the field OpenAI's `param` names, and the reason.
def _model_problems(request: ChatRequest, prices: PriceTable, prompt: int) -> list[tuple[str, str]]:
    if request.model not in prices:
        known = ", ".join(prices.names())
        return [("model", f"model: unknown model {request.model!r} (known: {known})")]
    price = prices.get(request.model)
    if request.max_tokens is not None and request.max_tokens > price.max_output_tokens:
        limit = price.max_output_tokens
        return [
            (
                "max_tokens",
                f"max_tokens {request.max_tokens} exceeds {request.model}'s output"
                f" limit of {limit}",
            )
        ]
    if prompt >= price.context_window:
        window = price.context_window
        return [
            (
                "messages",
                f"the messages are about {prompt:,} tokens, too long for"
                f" {request.model}'s context window of {window:,}",
            )
        ]
    return []
