"""Digit labels, the one rule for every way a client sends one.

A label is one of the ASCII digits ``0``-``9`` (multipart fields, archive folder names) or a
JSON integer 0-9. Nothing else: not the other characters ``str.isdigit()`` accepts
(``²``, ``٧``, ``７``, ``𝟕``), not JSON ``true``, ``7.0`` or ``"7"``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, Strict

from service.http.errors import ClientError, echo

DIGITS = "0123456789"

# For pydantic models of JSON bodies: strict, so booleans, floats and strings are refused.
Label = Annotated[int, Strict(), Field(ge=0, le=9, description="the true digit: a JSON integer 0-9")]


def parse_label(text: str, field: str = "label") -> int:
    """A label sent as text; 422 naming ``field`` for anything but exactly one ASCII digit."""
    if len(text) != 1 or text not in DIGITS:
        raise ClientError(422, "invalid_label", f"{field} must be one of the digits 0-9, got {echo(text)}")
    return DIGITS.index(text)
