"""The one error type of the V2 protocol layer: a status and a message for people, and the one
place the service's own errors (``ClientError``) become it.

REST answers it as the spec's ``{"error": "<message>"}``; gRPC as the matching status code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fastapi import HTTPException

MAX_MESSAGE_CHARS = 1000  # a gRPC client refuses a status message over its metadata limit (8 KiB)


class ProtocolError(Exception):
    """A client mistake (400/404/413) or an unavailable model (503), with a message naming the
    problem; never longer than MAX_MESSAGE_CHARS, however much of the request it quotes."""

    def __init__(self, status_code: int, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            cut = MAX_MESSAGE_CHARS - 40
            message = f"{message[:cut]}... ({len(message) - cut:,} more characters)"
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def bad_request(message: str) -> ProtocolError:
    return ProtocolError(400, message)


@contextlib.contextmanager
def as_protocol_error(where: str = "", status: int | None = None) -> Iterator[None]:
    """A ``ClientError`` (any FastAPI ``HTTPException``) raised inside becomes a ProtocolError:
    its message prefixed with ``where``, its status kept unless ``status`` is given."""
    try:
        yield
    except HTTPException as exc:
        raise ProtocolError(status or exc.status_code, f"{where}{exc.detail}") from None
