"""What the routes' responses share: the error responses the schema lists, the shutting-down
error, the compact JSON of a stream's lines, and OpenAI's finish_reason."""

from __future__ import annotations

import json
from typing import Any

from gemmachat import openai_api as api
from gemmachat.engine import Stats

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": api.ErrorResponse, "description": text}
    for status, text in ((400, "Invalid request"), (401, "Missing or wrong API key"),
                         (413, "Request body too large"), (503, "Busy or shutting down"))
}


def shutting_down() -> api.ApiError:
    return api.ApiError(503, "the server is shutting down", code="shutting_down")


def json_line(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def finish_reason(stats: Stats) -> str:
    return "length" if stats.finish_reason == "length" else "stop"
