"""Verify a Sheepdog webhook (Standard Webhooks) with the standard library only.

The standard library only, so the file can also be copied into a receiver that does not install
sheepdog-client. `verify_webhook(headers, body, secret)` returns the parsed JSON payload or raises
WebhookVerificationError."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

TOLERANCE_S = 5 * 60  # a timestamp further from now is refused (replays)


class WebhookVerificationError(ValueError):
    """The message is not signed with the secret, or is too old or too new."""


def verify_webhook(
    headers: Mapping[str, str],
    body: bytes | str,
    secret: str,
    *,
    tolerance_s: int = TOLERANCE_S,
    now: float | None = None,
) -> Any:
    """Check `webhook-signature` against `secret` (`whsec_...`) and the timestamp against the
    clock; return the decoded JSON body. Header names are matched case-insensitively."""
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id = lower["webhook-id"]
        timestamp = lower["webhook-timestamp"]
        signatures = lower["webhook-signature"]
    except KeyError as err:
        raise WebhookVerificationError(f"missing header {err.args[0]}") from None
    try:
        sent = int(timestamp)
    except ValueError:
        raise WebhookVerificationError("invalid webhook-timestamp") from None
    if abs((time.time() if now is None else now) - sent) > tolerance_s:
        raise WebhookVerificationError("webhook-timestamp too old or too new")
    raw = body.encode() if isinstance(body, str) else bytes(body)
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = hmac.new(key, f"{msg_id}.{sent}.".encode() + raw, hashlib.sha256).digest()
    for entry in signatures.split():
        version, _, value = entry.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(value)
        except ValueError:
            continue
        if hmac.compare_digest(given, expected):
            return json.loads(raw)
    raise WebhookVerificationError("no matching signature")
