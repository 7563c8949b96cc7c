"""`sheepdog simulator`: serve the OpenAI-compatible provider simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the `simulator` command to the CLI."""
    app.command()(simulator)


def simulator(
    port: Annotated[int, typer.Option(help="TCP port.")] = 8099,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Bearer key clients must send (any key when unset; then the admin API answers "
            "loopback only). Prefer SHEEPDOG_SIMULATOR_API_KEY: a flag shows in `ps`."
        ),
    ] = None,
    ttft_ms: Annotated[float | None, typer.Option(help="Time to first token, ms.")] = None,
    chunk_delay_ms: Annotated[float | None, typer.Option(help="Delay between chunks, ms.")] = None,
    time_scale: Annotated[
        float | None, typer.Option(help="Batch speed-up: batch timings and window / X.")
    ] = None,
    no_batch_api: Annotated[
        bool, typer.Option("--no-batch-api", help="Answer 404 on /v1/files and /v1/batches.")
    ] = False,
    reject_stream_options: Annotated[
        bool,
        typer.Option("--reject-stream-options", help="Answer 400 when stream_options is sent."),
    ] = False,
    config: Annotated[
        Path | None, typer.Option(help="JSON file with a SimulatorConfig (faults etc.).")
    ] = None,
    data_dir: Annotated[
        str | None, typer.Option(help="Where uploaded and output files go (default: a temp dir).")
    ] = None,
) -> None:
    """Serve the OpenAI-compatible simulator (chat, files, batches, fault injection)."""
    from simulator.__main__ import parse_args
    from simulator.server import run

    argv = ["--host", host, "--port", str(port)]
    options = {
        "--api-key": api_key,
        "--ttft-ms": ttft_ms,
        "--chunk-delay-ms": chunk_delay_ms,
        "--time-scale": time_scale,
        "--config": config,
        "--data-dir": data_dir,
    }
    for flag, value in options.items():
        if value is not None:
            argv += [flag, str(value)]
    if no_batch_api:
        argv.append("--no-batch-api")
    if reject_stream_options:
        argv.append("--reject-stream-options")
    settings, bind_host, bind_port = parse_args(argv)
    typer.echo(f"simulator on http://{bind_host}:{bind_port}/v1", err=True)
    run(settings, bind_host, bind_port)
