"""The front door: `sheepdog api` and `sheepdog keys create|list|revoke`."""

from __future__ import annotations

from typing import Annotated

import typer

from sheepdog.cli.output import edge, fail, print_json


def register(app: typer.Typer) -> None:
    app.command("api")(api)
    keys = typer.Typer(help="Tenant API keys of the front door.", no_args_is_help=True)
    keys.command("create")(keys_create)
    keys.command("list")(keys_list)
    keys.command("revoke")(keys_revoke)
    app.add_typer(keys, name="keys")


def api(
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    address: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    processes: Annotated[int, typer.Option(help="Server processes.")] = 1,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="No keys, tenant 'default' (loopback only).")
    ] = False,
) -> None:
    """Serve the HTTP front door (OpenAI-compatible and Sheepdog's own API)."""
    from sheepdog.api.front import is_loopback
    from sheepdog.api.server import serve

    if no_auth and not is_loopback(address):
        fail(f"--no-auth serves only a loopback address (127.0.0.1, ::1), not {address}")
    if processes < 1:
        fail("--processes must be at least 1")
    # No start-up check of Redis or the database: the server starts without them (a compose
    # stack starts in any order) and /readyz says 503 until both answer.
    with edge():
        serve(address, port, processes, no_auth)


def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant the key speaks for.")],
    name: Annotated[str, typer.Option(help="A label for `keys list`.")] = "",
    rate_limit: Annotated[
        int | None,
        typer.Option(help="Calls a minute (default: SHEEPDOG_API_RATE_LIMIT_PER_MINUTE)."),
    ] = None,
) -> None:
    """Make a key; prints it once (only its hash is stored)."""
    from core.settings import get_settings
    from sheepdog.tenant_keys import create_key

    with edge():
        key, info = create_key(get_settings().database_url, tenant, name, rate_limit)
    typer.echo(key)
    typer.echo(f"{info.id} for tenant {info.tenant}: shown once, store it now", err=True)


def keys_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
) -> None:
    """List keys (id, tenant, name, first characters, state); never the keys."""
    from core.settings import get_settings
    from sheepdog.tenant_keys import list_keys

    with edge():
        infos = list_keys(get_settings().database_url, tenant)
    for info in infos:
        state = "revoked" if info.revoked_at else "active"
        if as_json:
            print_json(
                {
                    "id": info.id,
                    "tenant": info.tenant,
                    "name": info.name,
                    "prefix": info.prefix,
                    "rate_limit_per_minute": info.rate_limit_per_minute,
                    "created_at": info.created_at.isoformat(),
                    "revoked_at": info.revoked_at.isoformat() if info.revoked_at else None,
                    "state": state,
                }
            )
        else:
            typer.echo(f"{info.id}  {info.tenant}  {info.prefix}…  {state}  {info.name}".rstrip())


def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (keys list).")]) -> None:
    """Revoke a key: calls with it answer 401 (within SHEEPDOG_API_KEY_CACHE_S)."""
    from core.settings import get_settings
    from sheepdog.tenant_keys import revoke_key

    with edge():
        done = revoke_key(get_settings().database_url, key_id)
    typer.echo("revoked" if done else "already revoked")
