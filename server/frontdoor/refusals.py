"""What the front door answers when it turns a request away: a ``Refused`` carries
the HTTP status, one code of a closed set (also the ``handshakes_refused`` metric's
label values), what to do, and OpenAI's error shape; ``routes.refusal()`` makes it
the HTTP response.
"""

from __future__ import annotations

import math
from typing import Any, Literal

RefusalCode = Literal[
    "missing_api_key", "invalid_api_key", "client_secret_expired", "origin_not_allowed",
    "host_not_allowed", "invalid_subprotocol", "rate_limited", "server_full", "server_draining",
    "too_many_sessions", "admin_api_off", "admin_key_required", "invalid_value",
    "resume_token_invalid", "resume_token_not_yours", "resume_unavailable",
]


class Refused(Exception):
    """A request the front door turns away, with the HTTP status and what to do."""

    def __init__(self, status: int, code: RefusalCode, message: str, *,
                 retry_after: float | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = None if retry_after is None else max(1, math.ceil(retry_after))
        self.param = param

    def body(self) -> dict[str, Any]:
        """OpenAI's error shape."""
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"type": kind, "code": self.code, "message": self.message,
                          "param": self.param}}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}
