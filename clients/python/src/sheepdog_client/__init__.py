"""sheepdog-client: talk to a Sheepdog deployment over its HTTP front door.

from sheepdog_client import Client

with Client("http://127.0.0.1:8080", api_key="sdk-…") as client:
    rid = client.submit(model="gpt-4.1", messages=[{"role": "user", "content": "Hi"}])
    print(client.stream_text(rid))
"""

from sheepdog_client.async_client import AsyncClient, AsyncEventStream
from sheepdog_client.client import Client, EventStream
from sheepdog_client.errors import (
    APIConnectionError,
    AuthenticationError,
    BudgetExceeded,
    Conflict,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    RequestFailed,
    SheepdogError,
    Unavailable,
    WaitTimeout,
)
from sheepdog_client.models import CancelResult, Event, Page, RequestView, Usage
from sheepdog_client.webhooks import WebhookVerificationError, verify_webhook

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "AsyncClient",
    "AsyncEventStream",
    "AuthenticationError",
    "BudgetExceeded",
    "CancelResult",
    "Client",
    "Conflict",
    "Event",
    "EventStream",
    "InvalidRequest",
    "NotFound",
    "Page",
    "PermissionDenied",
    "RateLimited",
    "RequestFailed",
    "RequestView",
    "SheepdogError",
    "Unavailable",
    "Usage",
    "WaitTimeout",
    "WebhookVerificationError",
    "verify_webhook",
]
