"""JSON responses rendered by orjson: the same compact UTF-8 bytes as Starlette's json.dumps,
in a fraction of its time (every call of the front door answers JSON)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse


class FastJSONResponse(JSONResponse):
    """Starlette's JSONResponse, serialized with orjson."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
