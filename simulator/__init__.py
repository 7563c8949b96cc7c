"""An OpenAI-compatible provider simulator: chat completions (plain and SSE), files, batches.

Deterministic answers, the real batch lifecycle on a configurable time scale, and fault injection
(configured at start, changed at runtime through ``/_sim/config``, or per request with the
``X-Sim-Faults`` header).
"""

from simulator.config import FaultRule, SimulatorConfig

__all__ = ["FaultRule", "SimulatorConfig", "SimulatorProcess", "create_app", "run"]


def __getattr__(name: str) -> object:
    # Lazy: importing the config must not pull in Starlette or uvicorn.
    if name == "create_app":
        from simulator.app import create_app

        return create_app
    if name in ("SimulatorProcess", "run"):
        from simulator import server

        return getattr(server, name)
    raise AttributeError(name)
