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
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = rf"([\d.]+(?:{'|'.join(_UNITS)}))"  # as wrk prints one: 850.00us, 1.02s, 1.00m


def available() -> bool:
    return shutil.which("wrk") is not None


def _seconds(text: str) -> float:
    unit = text.lstrip("0123456789.")
    return float(text[: -len(unit)]) * _UNITS[unit]


def intake(url: str, key: str, clients: int, seconds: int, tag: str) -> dict[str, Any]:
    """`clients` connections for `seconds` (one wrk thread): calls accepted (2xx) a second,
    calls refused, and the latency percentiles wrk reports (of every answered call; a call
    unanswered after 30 s counts as a timeout, named in `errors`). A run that could not be
    made or read says why in `failed`."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(SCRIPT % {"key": key, "tag": tag})
        cmd = ["wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "--timeout", "30s", "--latency"]
        try:
            done = subprocess.run(
                [*cmd, "-s", str(script), url], capture_output=True, text=True, timeout=seconds + 90
            )
        except subprocess.TimeoutExpired:
            return {"failed": "wrk did not end"}
    out = done.stdout
    total = re.search(rf"(\d+) requests in {_DURATION},", out)
    lat = dict(re.findall(rf"^\s+(50|99)(?:\.0+)?%\s+{_DURATION}\s*$", out, re.M))
    if done.returncode != 0 or total is None or set(lat) != {"50", "99"}:
        return {"failed": f"wrk exited {done.returncode}: {(done.stderr or out).strip()[:200]}"}
    refused = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: .*", out)
    bad = int(refused.group(1)) if refused else 0
    return {
        "rate": (int(total.group(1)) - bad) / _seconds(total.group(2)),
        "refused": bad,
        "errors": errors.group(0) if errors else "",
        "p50": _seconds(lat["50"]),
        "p99": _seconds(lat["99"]),
    }
