"""Errors Sheepdog raises at its edges, each with a one-line message fit for a terminal."""

from __future__ import annotations

import re


class SheepdogError(Exception):
    """Base class: str(err) is one clear line."""


class InvalidRequest(SheepdogError, ValueError):
    """A request failed validation; nothing was enqueued or written. `param` names the first
    bad field as OpenAI's errors do (`messages[0].role`), when one field is to blame."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def in_list(self, index: int) -> InvalidRequest:
        """The same refusal for item `index` of a list of requests."""
        param = f"[{index}]" + ("" if self.param is None else f".{self.param}")
        return InvalidRequest(f"request {index}: {self}", param)


class ServiceUnavailable(SheepdogError):
    """Redis or the database cannot be reached."""

    def __init__(self, service: str, url: str, hint: str) -> None:
        self.service, self.url, self.hint = service, url, hint
        super().__init__(f"cannot reach {service} at {url}: {hint}")


class BudgetExceeded(SheepdogError):
    """A submit would take a tenant past its budget."""


class IdempotencyConflict(InvalidRequest):
    """An idempotency key already used for a different request (as the IETF Idempotency-Key
    draft answers it: a conflict; the same key with the same request gets the first id), or
    held by a submit of the same request still under way (`in_progress`: the draft's answer to
    a concurrent resend is a conflict too; resend in a moment). `first_id` None: the key came
    twice in one call, for different requests."""

    def __init__(self, key: str, first_id: str | None, *, in_progress: bool = False) -> None:
        self.key, self.first_id, self.in_progress = key, first_id, in_progress
        shown = repr(key[:60]) + ("..." if len(key) > 60 else "")
        if in_progress:
            why = f"is held by a submit of the same request still under way ({first_id}): resend"
            why += " it in a moment"
        elif first_id is None:
            why = "came twice in this call, for different requests: one key, one request"
        else:
            why = f"was already used for a different request ({first_id}): reuse a key only to"
            why += " resend the same request"
        super().__init__(f"idempotency key {shown} {why}")


REDIS_HINT = (
    'start it with: redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save ""'
    " (or set SHEEPDOG_REDIS_URL)"
)
DATABASE_HINT = (
    "start PostgreSQL (pg_ctlcluster <version> main start) or set SHEEPDOG_DATABASE_URL"
    " (default sqlite:///sheepdog.db); then run: sheepdog db upgrade"
)


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL (e.g. redis://): hide anything between : and @
        if "@" in url and "://" in url:
            scheme, rest = url.split("://", 1)
            creds, host = rest.rsplit("@", 1)
            user = creds.split(":", 1)[0]
            return f"{scheme}://{user}:***@{host}"
        return url


_KEYLIKE = re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_*\-]{4,}")


def scrub_secrets(text: str, *secrets: str | None) -> str:
    """`text` without API keys: the given secrets and anything shaped like a key (`sk-…`;
    providers echo a masked key in 401 messages)."""
    for secret in secrets:
        if secret and len(secret) >= 6:
            text = text.replace(secret, "***")
    return _KEYLIKE.sub(r"\1-***", text)
