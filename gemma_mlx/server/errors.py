"""HTTP errors in each API's own shape.

OpenAI: `{"error": {"message", "type", "param", "code"}}`. Anthropic: `{"type": "error",
"error": {"type", "message"}}`. One `APIError` carries what both need; the route decides the shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

# HTTP status -> (OpenAI error type, Anthropic error type)
_TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("invalid_request_error", "authentication_error"),
    404: ("invalid_request_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_error"),
    500: ("server_error", "api_error"),
    503: ("server_error", "overloaded_error"),
}


@dataclass(eq=False)
class APIError(Exception):
    """An error answer: HTTP `status`, a message for the client, the OpenAI `param`/`code`."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def openai(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, _TYPES[500])[0]
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }

    def anthropic(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, _TYPES[500])[1]
        return {"type": "error", "error": {"type": kind, "message": self.message}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def from_validation(error: ValidationError) -> APIError:
    """The problem pydantic found deepest in the request, naming the field: `messages.0.role:
    Input should be ...` (of a union's alternatives, the one that matched furthest)."""
    first = max(error.errors(include_url=False), key=lambda e: len(e["loc"]))
    # Union alternatives appear in the location as type names ("str", "list[...]"): not fields.
    where = ".".join(
        str(p) for p in first["loc"] if not ((isinstance(p, str) and "[" in p) or p == "str")
    )
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field (not a parameter of this API, or not supported by this server)"
    elif first["type"] == "missing":
        message = "required field missing"
    return invalid(f"{where}: {message}" if where else message, param=where or None)
