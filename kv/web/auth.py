"""The replication secret (and, over TLS, the cluster's client certificate), checked
before a request reaches the router.

Checking it in front of FastAPI means a delivery without the right
`X-Replication-Secret` is refused before its body is read or parsed (so a
stranger cannot make a follower parse megabytes), and that an authentic delivery
pays no dependency-injection machinery on the hot path.

Over TLS, when the server asks clients for a certificate (uvicorn's `--ssl-ca-certs` with
`--ssl-cert-reqs 1` or 2, as `tools/cluster.py --tls` and docker-compose.tls.yml launch
it), a delivery must also come on a connection that presented one signed by the cluster's
CA: mutual TLS (kv/network/tls.py). A certificate from another CA never gets this far: the
handshake refuses it.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from kv.network.tls import connection_tls
from kv.web.asgi import header, send_answer
from kv.web.errors import error_json

SECRET_HEADER = "X-Replication-Secret"


class RequireSecret:
    """Answer 401 to requests for `paths` that lack the secret; pass everything else on."""

    def __init__(self, app: ASGIApp, secret: str, paths: frozenset[str]) -> None:
        self.app = app
        self.secret = secret.encode()
        self.paths = paths
        self.header = SECRET_HEADER.lower().encode()
        self.wrong_secret = error_json(f"missing or wrong {SECRET_HEADER} header")
        self.no_cert = error_json(
            "replication over TLS needs a client certificate signed by the cluster's CA"
        )
        self.unseen = error_json(
            "this server does not show the app the connection's TLS state, so replication "
            "over it is refused; run the node under uvicorn (kv/network/tls.py)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            if scope.get("scheme") == "https":
                tls = connection_tls(receive)
                if tls is None:
                    await send_answer(send, 401, self.unseen)
                    return
                if tls.client_cert_requested and tls.client_cert_name is None:
                    await send_answer(send, 401, self.no_cert)
                    return
            if not self._authentic(scope):
                await send_answer(send, 401, self.wrong_secret)
                return
        await self.app(scope, receive, send)

    def _authentic(self, scope: Scope) -> bool:
        presented = header(scope, self.header)
        # compare_digest takes as long whatever the first wrong byte, so timing says nothing.
        return presented is not None and hmac.compare_digest(presented, self.secret)
