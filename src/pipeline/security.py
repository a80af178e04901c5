"""Browser defences: a service on 127.0.0.1 without a token is reachable by every page.

Any web page its user visits can send requests to a local service, so the
API defends itself against browsers on other sites (DESIGN.md, "HTTP
contract"). What lives where, and why:

- **Cross-site refusal and JSON-only bodies** are *route-class logic*:
  :func:`refusal` is called by the routes of ``pipeline.api.create_router``
  (its ``_route_class``) before the route does anything, dependencies and
  body included. A router included in a host application keeps these
  defences with no setup there, exactly like the lock-to-503 translation;
  app middleware would silently vanish in a host app that did not add it.
  They need no configuration: a request whose ``Origin`` is not its own
  origin (scheme, host and port of the request itself), or whose
  ``Sec-Fetch-Site`` is neither ``same-origin`` nor ``none``, is 403; a body
  that is not ``application/json`` is 415. The second is a defence in
  depth: the content types a page may send cross-origin without a CORS
  preflight (a "simple" request: ``text/plain``, forms, multipart, or none)
  are exactly the ones refused, so no page gets a body read even where a
  browser sent neither header (every current browser sends ``Origin`` with
  a ``POST``, which the first check refuses).
- **Allowed hosts** (:class:`AllowedHosts`, DNS rebinding) and the
  **app-wide response headers** (:class:`SecurityHeaders`) are *pure ASGI
  middleware* that ``create_app`` installs. The allowed names belong to a
  deployment, not to the router: a host application answers to its own
  names, and adds :class:`AllowedHosts` (or Starlette's
  ``TrustedHostMiddleware``) itself, as the README says. Pure ASGI, not
  ``BaseHTTPMiddleware``, so that event streams
  pass through unbuffered and a client's disconnect still reaches them.
  The routes also set ``nosniff`` and ``Cache-Control: no-store`` on their
  own answers, so those hold in a host application too.

A ``Host`` that names the very address the connection arrived on (the
ASGI ``server`` entry, from the socket, e.g. ``127.0.0.1:8000`` or the
LAN address of a server bound to ``0.0.0.0``) is always allowed: a DNS
rebinding attack needs a name of the attacker's, never an address.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
SAFE_FETCH_SITES = frozenset({"same-origin", "none"})
# Every answer of the API: never sniffed into HTML, never stored by a cache
# (runs change, and a shared cache must not keep one user's data).
API_HEADERS: Mapping[str, str] = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
# The dashboard loads its script, style and data from its own origin only (no
# inline script or style; its favicon is a data: URL), and no site may frame
# it (its Cancel buttons must not be clicked through another page).
DASHBOARD_CSP = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
DASHBOARD_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": DASHBOARD_CSP,
    "X-Frame-Options": "DENY",
}
# The OpenAPI pages (Swagger UI, ReDoc) are built by FastAPI with an inline
# script and by their bundles with inline styles; the browser still loads
# nothing from another host (ReDoc's bundle would fetch its logo from a CDN).
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
DOCS_HEADERS: Mapping[str, str] = {"Content-Security-Policy": DOCS_CSP, "X-Frame-Options": "DENY"}


def _error(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"detail": detail}, status_code=status, headers={**API_HEADERS, **(headers or {})}
    )


# -- hosts and origins ------------------------------------------------------------


def split_host(value: str) -> tuple[str, int | None] | None:
    """``host[:port]`` as (lower-cased host, IPv6 in brackets; port or None); None if malformed."""
    value = value.strip().lower()
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[: end + 1], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    elif value.count(":") > 1:  # a bare IPv6 address, as in an ASGI server entry
        host, port_text = f"[{value}]", None
    else:
        host, _, port_text = value.partition(":")
        port_text = port_text if ":" in value else None
    host = host.rstrip(".")
    if not host:
        return None
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return host, int(port_text)


def allowed_hosts(configured: Iterable[str], bound_host: str | None = None) -> list[str]:
    """``PIPELINE_ALLOWED_HOSTS`` when set; else the loopback names and the bound host."""
    hosts = [host for host in configured if host.strip()]
    if not hosts:
        hosts = [*LOOPBACK_HOSTS, *([bound_host] if bound_host else [])]
    return hosts


class AllowedHosts:
    """Answer only requests whose ``Host`` is allowed; others get 400 and a JSON detail.

    Like Starlette's ``TrustedHostMiddleware`` (``*.example.com`` patterns,
    ``*`` for any), but the refusal is the API's JSON error, the port never
    matters, and the address the connection arrived on is always allowed.
    """

    def __init__(self, app: ASGIApp, hosts: Iterable[str]) -> None:
        self.app = app
        self.any = False
        self.exact: set[str] = set()
        self.suffixes: list[str] = []
        for pattern in hosts:
            pattern = pattern.strip().lower()
            if pattern == "*":
                self.any = True
            elif pattern.startswith("*."):
                self.suffixes.append(pattern[1:])
            else:
                parsed = split_host(pattern)
                if parsed is not None:
                    self.exact.add(parsed[0])

    def allows(self, scope: Scope) -> bool:
        if self.any:
            return True
        parsed = split_host(Headers(scope=scope).get("host", ""))
        if parsed is None:
            return False
        host = parsed[0]
        if host in self.exact or any(host.endswith(suffix) for suffix in self.suffixes):
            return True
        server = scope.get("server")
        own = split_host(str(server[0])) if server else None
        return own is not None and own[0] == host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.allows(scope):
            detail = "this server does not answer to that Host header (see PIPELINE_ALLOWED_HOSTS)"
            if scope["type"] == "websocket":  # nothing here speaks websocket; refuse it plainly
                await send({"type": "websocket.close", "code": 1008})
                return
            await _error(400, detail)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _origin_of(url: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    scheme = parts.scheme.lower()
    host = split_host(parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]")
    if host is None:
        return None
    return scheme, host[0], port if port is not None else DEFAULT_PORTS.get(scheme, -1)


def _own_origin(request: Request) -> tuple[str, str, int] | None:
    parsed = split_host(request.headers.get("host", ""))
    if parsed is None:
        return None
    scheme = request.url.scheme.lower()
    host, port = parsed
    return scheme, host, port if port is not None else DEFAULT_PORTS.get(scheme, -1)


def cross_site(request: Request) -> str | None:
    """Why this request comes from another site according to its browser, or None."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site.strip().lower() not in SAFE_FETCH_SITES:
        return f"cross-site request refused (Sec-Fetch-Site: {fetch_site.strip().lower()[:20]})"
    origin = request.headers.get("origin")
    if origin is not None:
        given = _origin_of(origin)
        if given is None or given != _own_origin(request):
            return "cross-origin request refused (its Origin is not this server's)"
    return None


# -- request bodies ------------------------------------------------------------------

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _is_json(content_type: str) -> bool:
    media_type, *params = (part.strip().lower() for part in content_type.split(";"))
    if media_type != "application/json":
        return False
    for param in params:
        name, _, value = param.partition("=")
        if name.strip() == "charset" and value.strip().strip('"') not in ("utf-8", "utf8"):
            return False
    return True


def wrong_body_type(request: Request) -> str | None:
    """Why this request's body is refused (not ``application/json``), or None.

    An empty body without a ``Content-Type`` is fine (``POST /runs`` reads it
    as ``{}``; cancel and resume take none). A ``Content-Type`` other than
    JSON is refused even with an empty body: it is what a form or a
    ``text/plain`` fetch from another page sends.
    """
    if request.method not in _BODY_METHODS:
        return None
    content_type = request.headers.get("content-type")
    if content_type is None:
        length = request.headers.get("content-length", "").strip()
        has_body = "transfer-encoding" in request.headers or (length not in ("", "0"))
        if not has_body:
            return None
        return "a request body must be application/json (no Content-Type was given)"
    if not _is_json(content_type):
        return "a request body must be application/json (UTF-8)"
    return None


def refusal(request: Request) -> Response | None:
    """The API's answer to a request it must not act on (403 or 415), or None to go on."""
    reason = cross_site(request)
    if reason is not None:
        return _error(403, reason)
    reason = wrong_body_type(request)
    if reason is not None:
        return _error(415, reason)
    return None


# -- response headers --------------------------------------------------------------------


class SecurityHeaders:
    """Headers on every response of the app: ``nosniff`` always; ``no-store`` on JSON.

    HTML pages (the dashboard, the API docs) cannot be framed by another site:
    ``X-Frame-Options: DENY`` and, unless the page sets its own policy,
    ``Content-Security-Policy: frame-ancestors 'none'``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                content_type = headers.get("content-type", "").lower()
                if content_type.startswith("application/json"):
                    headers.setdefault("Cache-Control", "no-store")
                elif content_type.startswith("text/html"):
                    headers.setdefault("X-Frame-Options", "DENY")
                    headers.setdefault("Content-Security-Policy", "frame-ancestors 'none'")
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- event stream slots ----------------------------------------------------------------------


class StreamSlots:
    """Counts open event streams, overall and per client address, under two caps.

    A stream takes a slot before it starts and gives it back when it ends,
    whichever way (the run ended, the client left, the server stops).
    """

    def __init__(self, *, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self._lock = threading.Lock()
        self._open = 0
        self._by_client: dict[str, int] = {}

    @property
    def open(self) -> int:
        with self._lock:
            return self._open

    def acquire(self, client: str) -> str | None:
        """Take a slot for ``client``; None on success, else why not."""
        with self._lock:
            if self._open >= self.total:
                return f"too many open event streams (at most {self.total}); retry later"
            mine = self._by_client.get(client, 0)
            if mine >= self.per_client:
                return (
                    f"too many open event streams from this client (at most {self.per_client}); "
                    "close one, or follow the list with GET /runs"
                )
            self._open += 1
            self._by_client[client] = mine + 1
            return None

    def release(self, client: str) -> None:
        with self._lock:
            self._open = max(self._open - 1, 0)
            left = self._by_client.get(client, 0) - 1
            if left > 0:
                self._by_client[client] = left
            else:
                self._by_client.pop(client, None)


def client_key(request: Request) -> str:
    """Who a request is from, for per-client caps: the peer address (``-`` when unknown)."""
    return request.client.host if request.client else "-"


def busy(detail: str, *, status: int, retry_after: int) -> JSONResponse:
    """A refusal that a client should retry later (503 or 429 with ``Retry-After``)."""
    return _error(status, detail, {"Retry-After": str(retry_after)})
