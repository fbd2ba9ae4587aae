"""The replication secret, checked before a request reaches the router.

Checking it in front of FastAPI means a delivery without the right
`X-Replication-Secret` is refused before its body is read or parsed (so a
stranger cannot make a follower parse megabytes), and that an authentic delivery
pays no dependency-injection machinery on the hot path.
"""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from kv.web.asgi import header

SECRET_HEADER = "X-Replication-Secret"


class RequireSecret:
    """Answer 401 to requests for `paths` that lack the secret; pass everything else on."""

    def __init__(self, app: ASGIApp, secret: str, paths: frozenset[str]) -> None:
        self.app = app
        self.secret = secret.encode()
        self.paths = paths
        self.header = SECRET_HEADER.lower().encode()
        self.refusal = json.dumps(
            {"error": f"missing or wrong {SECRET_HEADER} header", "detail": None}
        ).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths and not self._authentic(scope):
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(self.refusal)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": self.refusal})
            return
        await self.app(scope, receive, send)

    def _authentic(self, scope: Scope) -> bool:
        presented = header(scope, self.header)
        # compare_digest takes as long whatever the first wrong byte, so timing says nothing.
        return presented is not None and hmac.compare_digest(presented, self.secret)
