"""Optional authentication on every route: an API key (Bearer) and/or HTTP basic auth.

With an API key, `Authorization: Bearer <key>` is accepted, and so is basic auth whose password is the key
(any user name): that lets a browser log in to the web UI through its own password prompt. Comparisons are
constant-time.
"""

from __future__ import annotations

import base64
import binascii
import secrets

from .settings import ServerSettings

CHALLENGE = {"WWW-Authenticate": 'Basic realm="sdlab", charset="UTF-8"'}


def auth_required(settings: ServerSettings) -> bool:
    return bool(settings.api_key or settings.basic_auth)


def authorized(header: str | None, settings: ServerSettings) -> bool:
    """Whether an Authorization header value satisfies the configured key or credentials."""
    if not auth_required(settings):
        return True
    scheme, _, value = (header or "").partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and settings.api_key:
        return _same(value.strip(), settings.api_key)
    if scheme == "basic":
        user, password = _basic(value.strip())
        if password is None:
            return False
        if settings.basic_auth and _same(f"{user}:{password}", settings.basic_auth):
            return True
        return bool(settings.api_key) and _same(password, settings.api_key)
    return False


def _basic(value: str) -> tuple[str, str | None]:
    try:
        user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return "", None
    return (user, password) if sep else ("", None)


def _same(a: str, b: str) -> bool:
    return secrets.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
