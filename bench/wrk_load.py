"""One-request-per-call intake driven by wrk (a C load generator), when it is installed.

The aiohttp load generator of bench/api_load.py costs ~200 µs of CPU a call on the same two
cores as the API and PostgreSQL; wrk costs a tenth of that, so its rate says more of what the
front door itself can take. Each call is a distinct low-priority request (a Lua counter in the
prompt). Install it with `apt-get install wrk`; without it the row says so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

SCRIPT = """
local n = 0
local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer %(key)s"}
request = function()
  n = n + 1
  return wrk.format("POST", "/v1/requests", headers,
    '{"model":"sheepdog-mini","messages":[{"role":"user","content":"wrk %(tag)s ' .. n ..
    '"}],"priority":"low"}')
end
"""
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def available() -> bool:
    return shutil.which("wrk") is not None


def _seconds(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * _UNITS[unit]


def intake(url: str, key: str, clients: int, seconds: int, tag: str) -> dict[str, Any]:
    """`clients` connections for `seconds` (one wrk thread): calls accepted (2xx) a second,
    calls refused, and the latency percentiles wrk reports."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(SCRIPT % {"key": key, "tag": tag})
        cmd = ["wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "--latency", "-s", str(script)]
        out = subprocess.run(
            [*cmd, url], capture_output=True, text=True, check=True, timeout=seconds + 60
        ).stdout
    total, wall = re.search(r"(\d+) requests in ([\d.]+\w+),", out).groups()  # type: ignore[union-attr]
    refused = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: .*", out)
    lat = dict(re.findall(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+\w+)$", out, re.M))
    bad = int(refused.group(1)) if refused else 0
    return {
        "rate": (int(total) - bad) / _seconds(wall),
        "refused": bad,
        "errors": errors.group(0) if errors else "",
        "p50": _seconds(lat["50"]),
        "p99": _seconds(lat["99"]),
    }
