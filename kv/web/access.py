"""Bearer tokens, checked in front of FastAPI: 401 without a good one, 403 beyond its role.

The middleware decides from the method and the path alone, before a body is read, so a
stranger's request costs a hash and a prebuilt answer (cheaper than a malformed body, which
at least gets parsed). What depends on a request's contents is left to the routes, which
find the caller's grant with :func:`grant_of`: the key in a `POST /keys` body
(:func:`check_key`), and which keys a list, a read of `/state` or a `/watch` shows.

A browser cannot put a header on the page's EventSources, so `/ui/login` trades an admin
token for an HttpOnly, SameSite=Strict cookie, which is accepted like the header.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from dataclasses import dataclass
from enum import StrEnum
from html import escape
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from kv.core.access import Grant, Policy, Role
from kv.web.asgi import Header, header, read_body, send_answer
from kv.web.errors import error_json

if TYPE_CHECKING:
    from kv.settings import NodeSettings

log = logging.getLogger("kvstore.access")

GRANT_SCOPE_KEY = "kv.grant"
COOKIE = "kv_token"
LOGIN_PATH = "/ui/login"
PROBES = frozenset({"/health", "/ready", "/primary"})
INTERNAL = frozenset({"/replicate", "/replicate/entries"})
"""Replication's own routes: the secret or the cluster's client certificate guards them."""
PEER_READABLE = frozenset({"/ha"})
"""Admin routes that HA nodes also read from each other, with the replication secret."""
SECRET_HEADER = b"x-replication-secret"


class OpenEndpoints(StrEnum):
    """AUTH_OPEN: what answers without a token while AUTH_FILE is set."""

    PROBES_AND_METRICS = "probes,metrics"
    PROBES = "probes"
    NONE = "none"

    def paths(self) -> frozenset[str]:
        if self is OpenEndpoints.PROBES_AND_METRICS:
            return PROBES | {"/metrics"}
        if self is OpenEndpoints.PROBES:
            return PROBES
        return frozenset()


@dataclass(frozen=True, slots=True)
class Need:
    """What a request needs: a role, and for a route naming its key, that key."""

    role: Role
    key: str | None = None


def need(method: str, path: str) -> Need:
    """The role a route needs, from its method and path: default admin, so a new route is
    closed until it is placed here."""
    writes = method in ("POST", "PUT", "DELETE", "PATCH")
    if path == "/keys":
        return Need(Role.READWRITE if writes else Role.READ)
    if path.startswith("/keys/"):
        return Need(Role.READWRITE if writes else Role.READ, path.removeprefix("/keys/"))
    if path in ("/watch", "/") or path in PROBES or path == "/metrics":
        return Need(Role.READ)
    return Need(Role.ADMIN)


def grant_of(request: Request) -> Grant | None:
    """The caller's grant; None when auth is off (every key is allowed)."""
    return request.scope.get(GRANT_SCOPE_KEY)


def check_key(scope: Scope, key: str, role: Role = Role.READWRITE) -> None:
    """403 unless the caller may use `key` (a key a route learns from the body)."""
    grant: Grant | None = scope.get(GRANT_SCOPE_KEY)
    if grant is not None and not grant.allows(role, key):
        raise HTTPException(403, grant.why_not(role, key))


def visible(request: Request, keys: list[str]) -> list[str]:
    """The keys the caller may see: all of them, as they are, when auth is off."""
    grant = grant_of(request)
    return keys if grant is None else grant.visible(keys)


CHALLENGE = (b"www-authenticate", b'Bearer realm="kv"')
HTML = b"text/html; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A JSON error answer, made once where it does not vary."""

    status: int
    body: bytes
    headers: tuple[Header, ...] = ()

    @classmethod
    def of(cls, status: int, message: str, *headers: Header) -> Refusal:
        return cls(status, error_json(message), headers)


class RequireToken:
    """Authenticate every request but the open ones; authorise by route (see :func:`need`)."""

    def __init__(
        self,
        app: ASGIApp,
        policy: Policy,
        open_paths: frozenset[str],
        secret: str,
        secure_cookie: bool = False,
    ) -> None:
        self.app = app
        self.policy = policy
        self.open_paths = open_paths | INTERNAL
        self.secret = secret.encode()
        self.secure_cookie = secure_cookie
        self.missing = Refusal.of(
            401, "this node needs a token: send 'Authorization: Bearer <token>'", CHALLENGE
        )
        self.unknown = Refusal.of(401, "the token is not known to this node", CHALLENGE)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        if scope["path"] in PEER_READABLE and self._from_peer(scope):
            await self.app(scope, receive, send)
            return
        if scope["path"] == LOGIN_PATH:
            await self.login(scope, receive, send)
            return
        token = presented_token(scope)
        if token is None:
            await self.refuse(scope, send, self.missing)
            return
        grant = self.policy.identify(token)
        if grant is None:
            await self.refuse(scope, send, self.unknown)
            return
        needed = need(scope["method"], scope["path"])
        if not grant.may(needed.role) or (needed.key is not None and not grant.covers(needed.key)):
            await self.refuse(scope, send, Refusal.of(403, grant.why_not(needed.role, needed.key)))
            return
        scope[GRANT_SCOPE_KEY] = grant
        await self.app(scope, receive, send)

    def _from_peer(self, scope: Scope) -> bool:
        presented = header(scope, SECRET_HEADER)
        return presented is not None and hmac.compare_digest(presented, self.secret)

    async def refuse(self, scope: Scope, send: Send, refusal: Refusal) -> None:
        if refusal.status == 401 and scope["path"] == "/ui" and _wants_html(scope):
            await send_answer(send, 401, login_page().encode(), HTML, [CHALLENGE])
            return
        await send_answer(send, refusal.status, refusal.body, headers=refusal.headers)

    async def login(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /ui/login with an admin token (a form field): set the cookie, go to /ui."""
        if scope["method"] != "POST":
            await self.refuse(scope, send, Refusal.of(405, "POST the form of /ui to log in"))
            return
        body = await read_body(receive) or b""
        fields = dict(parse_qsl(body[:4096].decode("latin-1")))
        token = fields.get("token", "").strip().encode("latin-1")
        grant = self.policy.identify(token) if token else None
        if grant is None or not grant.may(Role.ADMIN):
            page = login_page("that is not an admin token").encode()
            await send_answer(send, 401 if grant is None else 403, page, HTML)
            return
        cookie = f"{COOKIE}={token.decode('latin-1')}; Path=/; HttpOnly; SameSite=Strict"
        if self.secure_cookie:
            cookie += "; Secure"
        where = [(b"location", b"/ui"), (b"set-cookie", cookie.encode("latin-1"))]
        await send_answer(send, 303, b"", None, where)


def presented_token(scope: Scope) -> bytes | None:
    """The bearer token of the Authorization header, else of the page's cookie."""
    headers = Headers(scope=scope)
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        return token.encode("latin-1") if scheme.lower() == "bearer" and token else None
    cookies = headers.get("cookie")
    if cookies:
        for part in cookies.split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and value:
                return value.encode("latin-1")
    return None


def _wants_html(scope: Scope) -> bool:
    return "text/html" in Headers(scope=scope).get("accept", "")


def login_page(problem: str | None = None) -> str:
    note = f'<p role="alert">{escape(problem)}</p>' if problem else ""
    return (
        "<!doctype html><html lang=en><meta charset=utf-8><title>Log in: replicated KV</title>"
        "<h1>This node needs an admin token</h1>"
        f"{note}"
        f'<form method=post action="{LOGIN_PATH}">'
        "<label>Token <input name=token type=password autocomplete=off required></label> "
        "<button>Log in</button></form></html>"
    )


def install_access_control(app: Any, settings: NodeSettings) -> None:
    """Add the token check when AUTH_FILE is set; without it every client may do anything."""
    if settings.policy is not None:
        app.add_middleware(
            RequireToken,
            policy=settings.policy,
            open_paths=settings.auth_open.paths(),
            secret=settings.replication_secret,
            secure_cookie=settings.tls,
        )


def warn_if_open(settings: NodeSettings, host: str) -> None:
    """One loud line when a node without AUTH_FILE listens beyond loopback."""
    if settings.policy is None and not is_loopback(host):
        log.warning(
            "NO AUTHENTICATION: %s listens on %s and AUTH_FILE is unset, so anyone who can "
            "reach it may read, write and delete every key. Set AUTH_FILE "
            "(docs/operations/security.md)",
            settings.name,
            host,
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere
