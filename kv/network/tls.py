"""TLS on every link: what a node presents, what it trusts, and what its server tells the app.

Three settings name the files (kv/settings.py): TLS_CA_FILE, the cluster's CA, which every
outgoing link verifies against; TLS_CERT_FILE and TLS_KEY_FILE, this node's certificate,
which it serves and also presents as a client certificate when it calls another node.
`make certs` (tools/certs.py) makes all of them.

uvicorn serves the HTTPS: :func:`uvicorn_options` turns the settings into its options. With
a CA, the server asks every client for a certificate but does not insist (CERT_OPTIONAL): a
certificate from another CA fails the handshake, and no certificate is fine for the routes
that take tokens. Replication's routes insist on one (kv/web/auth.py), so they need to know
whether the connection presented one; uvicorn does not say, so :class:`PeerCertProtocol`
adds the ASGI TLS extension (`scope["extensions"]["tls"]`) to each request's scope.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any

from starlette.types import Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

if TYPE_CHECKING:
    from kv.settings import NodeSettings

PROTOCOL = "kv.network.tls:PeerCertProtocol"


def client_context(settings: NodeSettings) -> ssl.SSLContext | None:
    """What this node's outgoing links verify against and present; None without TLS_CA_FILE
    (then an https:// peer is verified against the system's CAs, as httpx does)."""
    if settings.tls_ca_file is None:
        return None
    context = ssl.create_default_context(cafile=str(settings.tls_ca_file))
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
    return context


def uvicorn_options(settings: NodeSettings) -> dict[str, Any]:
    """uvicorn.Config's keyword arguments for this node's HTTPS; {} without TLS_CERT_FILE."""
    if not settings.tls:
        return {}
    return {
        "ssl_certfile": str(settings.tls_cert_file),
        "ssl_keyfile": str(settings.tls_key_file),
        "ssl_ca_certs": str(settings.tls_ca_file),
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,
        "http": PROTOCOL,
    }


def uvicorn_args(cert: str, key: str, ca: str) -> list[str]:
    """The same, as `python -m uvicorn` command-line options."""
    return [
        "--ssl-certfile", cert,
        "--ssl-keyfile", key,
        "--ssl-ca-certs", ca,
        "--ssl-cert-reqs", str(int(ssl.CERT_OPTIONAL)),
        "--http", PROTOCOL,
    ]  # fmt: skip


def client_cert_name(scope: Scope) -> str | None:
    """The subject of the client certificate this request's connection presented, verified
    against the cluster's CA during the handshake; None if it presented none."""
    tls = scope.get("extensions", {}).get("tls")
    return None if tls is None else tls.get("client_cert_name")


def tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The ASGI TLS extension's fields for a connection; None for plain HTTP."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    peer = ssl_object.getpeercert()  # a dict only for a certificate the CA verified
    name = None
    if peer:
        name = ",".join(
            f"{field}={value}" for rdn in peer.get("subject", ()) for field, value in rdn
        )
    der = ssl_object.getpeercert(binary_form=True)
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der and peer else [],
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": None,
        "cipher_suite": None,
    }


class PeerCertProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the ASGI TLS extension in every request's scope."""

    _tls: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._tls = tls_extension(transport)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            self.scope["extensions"] = {"tls": self._tls}  # type: ignore[dict-item]
