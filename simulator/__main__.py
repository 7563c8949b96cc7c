"""``python -m simulator``: serve the OpenAI-compatible simulator."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from simulator.config import SimulatorConfig
from simulator.server import run

# The key from the environment: a command-line flag is visible to every user in `ps`.
API_KEY_ENV = "SHEEPDOG_SIMULATOR_API_KEY"


def parse_args(argv: Sequence[str] | None = None) -> tuple[SimulatorConfig, str, int]:
    """(config, host, port) from command-line options; options override ``--config FILE``,
    and the key comes from --api-key, else SHEEPDOG_SIMULATOR_API_KEY, else the file."""
    parser = argparse.ArgumentParser(prog="python -m simulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--config", help="JSON file with a SimulatorConfig")
    parser.add_argument("--api-key")
    parser.add_argument("--ttft-ms", type=float)
    parser.add_argument("--chunk-delay-ms", type=float)
    parser.add_argument("--time-scale", type=float)
    parser.add_argument("--no-batch-api", action="store_true", default=None)
    parser.add_argument("--reject-stream-options", action="store_true", default=None)
    parser.add_argument("--data-dir")
    args = parser.parse_args(argv)
    config = SimulatorConfig.from_file(args.config) if args.config else SimulatorConfig()
    overrides = {
        "api_key": args.api_key or os.environ.get(API_KEY_ENV) or None,
        "ttft_ms": args.ttft_ms,
        "chunk_delay_ms": args.chunk_delay_ms,
        "time_scale": args.time_scale,
        "no_batch_api": args.no_batch_api,
        "reject_stream_options": args.reject_stream_options,
        "data_dir": args.data_dir,
    }
    changes = {key: value for key, value in overrides.items() if value is not None}
    if changes:
        config = SimulatorConfig.model_validate({**config.model_dump(), **changes})
    return config, args.host, args.port


def main(argv: Sequence[str] | None = None) -> None:
    config, host, port = parse_args(argv)
    run(config, host, port)


if __name__ == "__main__":
    main()
