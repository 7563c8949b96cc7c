"""Signing secrets at rest: Fernet-encrypted with the deployment's key
(SHEEPDOG_WEBHOOK_SECRET_KEY), so a database dump alone cannot forge a signature.

Several comma-separated keys make a MultiFernet: the first encrypts, any decrypts (rotate the
key by putting the new one first; secrets written under the old key still read)."""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from core.errors import SheepdogError
from core.settings import Settings

KEY_HINT = "set SHEEPDOG_WEBHOOK_SECRET_KEY (`sheepdog webhooks keygen` prints a new key)"


class WebhookKeyError(SheepdogError):
    """No key to encrypt or decrypt signing secrets, or the key does not fit them."""


def new_key() -> str:
    return Fernet.generate_key().decode()


def _fernet(settings: Settings) -> MultiFernet:
    raw = settings.webhook_secret_key.get_secret_value() if settings.webhook_secret_key else ""
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    if not keys:  # unset, or set empty (docker-compose passes an empty value through)
        raise WebhookKeyError(f"webhook signing secrets need a key: {KEY_HINT}")
    try:
        return MultiFernet([Fernet(k) for k in keys])
    except ValueError:
        raise WebhookKeyError(
            "SHEEPDOG_WEBHOOK_SECRET_KEY is not a Fernet key (32 url-safe base64 bytes)"
        ) from None


def encrypt(settings: Settings, secret: str) -> str:
    return _fernet(settings).encrypt(secret.encode()).decode()


def decrypt(settings: Settings, token: str) -> str:
    try:
        return _fernet(settings).decrypt(token.encode()).decode()
    except InvalidToken:
        raise WebhookKeyError(
            "a webhook signing secret does not decrypt with SHEEPDOG_WEBHOOK_SECRET_KEY"
        ) from None
