"""Bearer tokens: the admin token for /admin/*, the optional feedback token for /feedback.

The ``HTTPBearer`` schemes put ``securitySchemes`` into the OpenAPI document and mark the
routes that depend on them; the checks themselves are ours (constant-time, JSON errors).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.http.errors import ClientError
from service.settings import settings_of

admin_scheme = HTTPBearer(scheme_name="AdminToken", auto_error=False,
                          description="DIGITS_ADMIN_TOKEN (or the file DIGITS_ADMIN_TOKEN_FILE)")
feedback_scheme = HTTPBearer(scheme_name="FeedbackToken", auto_error=False,
                             description="DIGITS_FEEDBACK_TOKEN; needed only when the service sets one")

Credentials = HTTPAuthorizationCredentials | None


def check_bearer(credentials: Credentials, expected: str, what: str) -> None:
    """401 unless the request carries ``Authorization: Bearer <expected>``."""
    if credentials is None or not credentials.credentials:
        raise ClientError(401, "missing_token", f"send 'Authorization: Bearer <{what}>'")
    if not hmac.compare_digest(credentials.credentials.strip().encode(), expected.encode()):
        raise ClientError(401, "invalid_token", f"the {what} is not valid")


def require_admin(request: Request, credentials: Annotated[Credentials, Depends(admin_scheme)]) -> None:
    """The admin token; 403 when none is configured at all (admin disabled)."""
    expected = settings_of(request.app).admin_token_value()
    if not expected:
        raise ClientError(403, "admin_disabled",
                          "admin routes are disabled: set DIGITS_ADMIN_TOKEN (or DIGITS_ADMIN_TOKEN_FILE) "
                          "and restart the service")
    check_bearer(credentials, expected, "admin token")


def require_feedback_token(request: Request, credentials: Annotated[Credentials, Depends(feedback_scheme)]) -> None:
    """The feedback token when DIGITS_FEEDBACK_TOKEN is set; open otherwise."""
    expected = settings_of(request.app).feedback_token_value()
    if expected:
        check_bearer(credentials, expected, "feedback token")
