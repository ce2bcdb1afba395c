"""The one error every backend raises: the service cannot do what was asked.

    ServerSideError (server.errors)
      └── BackendUnavailable   code ``backend_unavailable``

Raised by speech-to-text, the language model and text-to-speech alike, whichever
implementation is configured; the session tells the client and goes on.
"""

from __future__ import annotations

from ..errors import ServerSideError


class BackendUnavailable(ServerSideError):
    """A backend cannot answer: unreachable, refused, at capacity, an HTTP error, a
    timeout, a stream cut off mid-reply, or a model that cannot load. The message
    names the service (its URL) and says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__("backend_unavailable", message)
