"""`sheepdog webhooks add|list|remove|rotate-secret|failed|redeliver|keygen`: a tenant's
webhook endpoints and signing secret (the logic is webhooks/endpoints.py, which the HTTP API
calls with the key's tenant)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from sqlalchemy.orm import Session

from sheepdog.cli.output import edge, print_json

TenantOpt = Annotated[str, typer.Option("--tenant", help="The tenant (metadata.tenant).")]
AnyTenantOpt = Annotated[
    str | None, typer.Option("--tenant", help="Only this tenant (default: all).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON output.")]


def register(app: typer.Typer) -> None:
    hooks = typer.Typer(
        help="Webhooks: endpoints, signing secrets, failed deliveries.", no_args_is_help=True
    )
    commands: list[tuple[str, Callable[..., Any]]] = [
        ("add", add),
        ("list", list_),
        ("remove", remove),
        ("rotate-secret", rotate_secret),
        ("failed", failed),
        ("redeliver", redeliver),
        ("keygen", keygen),
    ]
    for name, fn in commands:
        hooks.command(name)(fn)
    app.add_typer(hooks, name="webhooks")


@contextmanager
def _session() -> Iterator[tuple[Session, Any]]:
    from core.db import check_database, session_scope
    from core.settings import get_settings

    settings = get_settings()
    with edge():
        check_database(settings.database_url)
        with session_scope(settings.database_url) as session:
            yield session, settings


def add(
    url: Annotated[str, typer.Argument(help="http(s) URL receiving the events.")],
    tenant: TenantOpt,
    events: Annotated[
        str | None,
        typer.Option(help="Comma-separated event types (default: all), e.g. request.succeeded."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register an endpoint; prints the tenant's signing secret the first time (only then)."""
    from webhooks.endpoints import add_endpoint

    wanted = None if events is None else [e.strip() for e in events.split(",") if e.strip()]
    with _session() as (session, settings):
        added = add_endpoint(session, settings, tenant, url, wanted)
    if as_json:
        print_json(added.model_dump(mode="json"))
        return
    typer.echo(f"endpoint {added.endpoint.id} for tenant {tenant}: {url}")
    if added.secret:
        typer.echo(f"signing secret (shown once, keep it safe): {added.secret}")
    else:
        typer.echo("signed with the tenant's existing secret (rotate-secret makes a new one)")


def list_(tenant: AnyTenantOpt = None, as_json: JsonOpt = False) -> None:
    """List endpoints."""
    from webhooks.endpoints import list_endpoints

    with _session() as (session, _):
        rows = list_endpoints(session, tenant)
    if as_json:
        print_json([r.model_dump(mode="json") for r in rows])
        return
    for r in rows:
        state = "enabled" if r.enabled else f"disabled ({r.disabled_reason})"
        typer.echo(f"{r.id}  {r.tenant}  {r.url}  events={','.join(r.events)}  {state}")


def remove(
    endpoint_id: Annotated[str, typer.Argument(help="Endpoint id (we_...).")],
    tenant: AnyTenantOpt = None,
) -> None:
    """Remove an endpoint (its pending deliveries are dropped)."""
    from webhooks.endpoints import remove_endpoint

    with _session() as (session, _):
        remove_endpoint(session, tenant, endpoint_id)
    typer.echo(f"removed {endpoint_id}")


def rotate_secret(tenant: TenantOpt, as_json: JsonOpt = False) -> None:
    """Make a new signing secret (printed once); the old one also signs for a grace period."""
    from webhooks.endpoints import rotate_secret as rotate

    with _session() as (session, settings):
        secret = rotate(session, settings, tenant)
        grace = settings.webhook_rotation_grace_s
    if as_json:
        print_json({"tenant": tenant, "secret": secret, "previous_valid_s": grace})
        return
    typer.echo(f"new signing secret for {tenant} (shown once): {secret}")
    typer.echo(f"the previous secret also signs for {grace:g} s")


def failed(
    tenant: AnyTenantOpt = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Deliveries that gave up (dead), newest first."""
    from webhooks.endpoints import failed_deliveries

    with _session() as (session, _):
        rows = failed_deliveries(session, tenant, limit)
    if as_json:
        print_json([r.model_dump(mode="json") for r in rows])
        return
    for r in rows:
        typer.echo(
            f"{r.id}  {r.webhook_id}  {r.tenant}  {r.event_type}  {r.subject_id}  "
            f"attempts={r.attempts}  {r.last_error}"
        )


def redeliver(
    ref: Annotated[str, typer.Argument(help="Delivery number or webhook-id (msg_...).")],
    tenant: AnyTenantOpt = None,
) -> None:
    """Send a delivery again now, with the same webhook-id."""
    from webhooks.endpoints import redeliver as again

    with _session() as (session, settings):
        view = again(session, settings, tenant, ref)
    typer.echo(f"delivery {view.id} ({view.webhook_id}) pending again")


def keygen() -> None:
    """Print a new key for SHEEPDOG_WEBHOOK_SECRET_KEY (encrypts the signing secrets)."""
    from webhooks.crypto import new_key

    typer.echo(new_key())
