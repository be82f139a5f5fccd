"""Who may call the server: the Host allow-list, the refusal of cross-site requests, and the optional
authentication on every route. `app.RequestGuard` applies these checks before any route runs.

- Host: a loopback server answers only requests for localhost / 127.0.0.1 / [::1] (and the configured
  `allowed_hosts`). Otherwise a web page could reach it by DNS rebinding: its own name, resolved to
  127.0.0.1, makes the browser treat the server as the page's origin.
- Cross-site requests (CSRF): a browser sends some POSTs to any site without asking it first (forms,
  `text/plain` bodies). State-changing requests whose `Origin` is another site that `cors_origins` does not
  list are refused, and so are bodies that are not JSON (every A1111 and OpenAI client sends JSON).
- Credentials: with an API key, `Authorization: Bearer <key>` is accepted, and so is basic auth whose
  password is the key (any user name): that lets a browser log in to the web UI through its own password
  prompt. Comparisons are constant-time. Only CORS preflights from an allowed origin go without (a browser
  never sends credentials with those).
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Mapping
from urllib.parse import urlsplit

from .settings import ServerSettings

CHALLENGE = {"WWW-Authenticate": 'Basic realm="sdlab", charset="UTF-8"'}
STATE_CHANGING = frozenset({"POST", "PUT", "DELETE", "PATCH"})
MAX_ECHO = 80  # characters of a client's header value quoted back in a refusal
DEFAULT_PORTS = {"http": 80, "https": 443}


# ---- Host ----


def host_refusal(host: str | None, settings: ServerSettings) -> str | None:
    """Why a request with this Host header is not answered, or None if it is."""
    names = settings.host_names
    if names is None or _host_name(host or "") in names:
        return None
    valid = ", ".join(f"[{name}]" if ":" in name else name for name in sorted(names))
    return (f"Host {_shown(host or '')} is not served here (DNS rebinding protection); valid: {valid}, with any "
            "port. Start the server with --allowed-host NAME to add a name")


def _host_name(host: str) -> str | None:
    """'Example.com:7860' -> 'example.com', '[::1]:7860' -> '::1'; None if it is not host[:port]."""
    try:
        parts = urlsplit("//" + host.strip())
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        return None
    if parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    return (parts.hostname or "").rstrip(".") or None


# ---- cross-site requests ----


def is_allowed_preflight(method: str, headers: Mapping[str, str], settings: ServerSettings) -> bool:
    """A CORS preflight (OPTIONS asking whether a request may be sent) from an origin in `cors_origins`."""
    return (method == "OPTIONS" and bool(settings.cors_origins) and "access-control-request-method" in headers
            and _listed_origin(headers.get("origin"), settings))


def cross_site_refusal(method: str, headers: Mapping[str, str], settings: ServerSettings) -> str | None:
    """Why a state-changing request from another site is refused, or None if it may go on."""
    if method not in STATE_CHANGING:
        return None
    origin = headers.get("origin")
    if _listed_origin(origin, settings):
        return None
    cross = headers.get("sec-fetch-site") == "cross-site" or (
        origin is not None and not _same_origin(origin, headers.get("host", "")))
    if not cross:
        return None
    return (f"cross-site {method} from origin {_shown(origin or 'unknown')} refused (CSRF protection): "
            "start the server with --cors-origin ORIGIN to let that site's pages call it")


def content_type_refusal(method: str, headers: Mapping[str, str]) -> str | None:
    """Why a state-changing request's body is refused: it must be JSON (or absent, for routes like /interrupt).
    Form and text bodies are what a cross-site page can send without the server's consent."""
    if method not in STATE_CHANGING:
        return None
    content_type = headers.get("content-type")
    if content_type is None:
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        if has_body:
            return "a body without a Content-Type is refused: send JSON with Content-Type: application/json"
        return None
    if is_json(content_type):
        return None
    return (f"Content-Type {_shown(content_type)} refused: this API takes JSON bodies "
            "(Content-Type: application/json)")


def is_json(content_type: str) -> bool:
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/")
                                                and media_type.endswith("+json"))


def _listed_origin(origin: str | None, settings: ServerSettings) -> bool:
    return origin is not None and ("*" in settings.cors_origins or origin in settings.cors_origins)


def _same_origin(origin: str, host: str) -> bool:
    """Whether `Origin: scheme://name[:port]` names the server the request was sent to (its Host header).
    The scheme is not compared: behind a TLS proxy the page is https and the server sees http."""
    try:
        page, server = urlsplit(origin), urlsplit("//" + host)
        default = DEFAULT_PORTS.get(page.scheme)
        return (page.hostname is not None and page.hostname == server.hostname
                and (page.port or default) == (server.port or default))
    except ValueError:  # a port that is not a number
        return False


def _shown(value: str) -> str:
    """A client's header value, quoted and shortened, for an error message."""
    return repr(value if len(value) <= MAX_ECHO else value[:MAX_ECHO] + "...")


# ---- credentials ----


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
