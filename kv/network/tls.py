"""TLS on every link: what a node presents, what it trusts, and what a connection presented.

Three settings name the files (kv/settings.py): TLS_CA_FILE, the cluster's CA, which every
outgoing link verifies against; TLS_CERT_FILE and TLS_KEY_FILE, this node's certificate,
which it serves and also presents as a client certificate when it calls another node.
`make certs` (tools/certs.py) makes all of them.

uvicorn serves the HTTPS, from its own options (:func:`uvicorn_args`). Given the CA
(`--ssl-ca-certs`) and `--ssl-cert-reqs 1`, it asks every client for a certificate but does
not insist: one from another CA fails the handshake, and none is fine for the routes that
take tokens. Replication's routes insist (kv/web/auth.py), so they must know what the
connection under a request presented. uvicorn does not put that in the ASGI scope, so
:func:`connection_tls` reads it from the connection itself.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.types import Receive

if TYPE_CHECKING:
    from kv.settings import NodeSettings


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
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return {}
    return {
        "ssl_certfile": str(settings.tls_cert_file),
        "ssl_keyfile": str(settings.tls_key_file),
        "ssl_ca_certs": str(settings.tls_ca_file),
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,
    }


def uvicorn_args(cert: str, key: str, ca: str) -> list[str]:
    """The same, as `python -m uvicorn` command-line options."""
    return [
        "--ssl-certfile", cert,
        "--ssl-keyfile", key,
        "--ssl-ca-certs", ca,
        "--ssl-cert-reqs", str(int(ssl.CERT_OPTIONAL)),
    ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class ConnectionTLS:
    """What the TLS connection under a request established."""

    client_cert_requested: bool
    """The server asked for a client certificate (it was given a CA and --ssl-cert-reqs)."""
    client_cert_name: str | None
    """The subject of the client certificate the handshake verified; None if none was sent."""


def connection_tls(receive: Receive) -> ConnectionTLS | None:
    """The TLS state of the connection under a request; None over plain HTTP, or when the
    server does not let it be seen (then a caller that needs it must refuse).

    uvicorn hands each request a `receive` bound to its RequestResponseCycle, which holds
    the connection's transport (httptools and h11 alike), so this must see the server's own
    `receive`, before any middleware wraps it. tests/system/test_tls.py checks it does.
    """
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    ssl_object = None if transport is None else transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    requested = ssl_object.context.verify_mode != ssl.CERT_NONE
    peer = ssl_object.getpeercert()  # a dict only for a certificate the CA verified
    name = None
    if peer:
        name = ",".join(
            f"{field}={value}" for rdn in peer.get("subject", ()) for field, value in rdn
        )
    return ConnectionTLS(requested, name)
