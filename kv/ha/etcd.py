"""etcd v3 through its JSON gateway, with httpx: leases, the election transaction, a watch.

As Patroni does, the node speaks plain HTTP to etcd's gRPC gateway (under `/v3/` in 3.4)
rather than pulling in a gRPC client. The gateway's quirks are handled here: keys and
values are base64, int64 fields come back as strings, and fields at their zero value
(`succeeded: false`, an event's `type: PUT`) are left out.

Keys, under ETCD_PREFIX:

* `<prefix>/leader`: JSON `{"name", "url", "term"}`, on the leader's lease;
* `<prefix>/term`: the term counter. The campaign raises it in the same transaction that
  creates the leader key, so two leaders can never share a term.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from kv.ha.decide import ClusterView, LeaderRecord

log = logging.getLogger("kvstore.ha")

REQUEST_TIMEOUT_S = 1.0
WATCH_RETRY_S = 0.2


class EtcdError(Exception):
    """etcd did not answer, or answered with an error."""


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def prefix_end(key: str) -> str:
    """The range_end that makes a range cover every key starting with `key`."""
    raw = key.encode()
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode()


class Etcd:
    """One node's connection to etcd: tries each endpoint in turn until one answers."""

    def __init__(
        self,
        endpoints: list[str],
        prefix: str,
        name: str,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.endpoints = list(endpoints)
        self.prefix = prefix
        self.leader_key = f"{prefix}/leader"
        self.term_key = f"{prefix}/term"
        self.name = name
        self._current = 0
        # An https:// etcd is verified against TLS_CA_FILE, and given this node's certificate.
        self._client = httpx.AsyncClient(
            timeout=REQUEST_TIMEOUT_S,
            trust_env=False,
            limits=httpx.Limits(max_connections=8),
            verify=tls or True,
        )

    @property
    def where(self) -> str:
        return ", ".join(self.endpoints)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _post(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        errors = []
        for attempt in range(len(self.endpoints)):
            index = (self._current + attempt) % len(self.endpoints)
            endpoint = self.endpoints[index]
            try:
                response = await self._client.post(f"{endpoint}{path}", json=body, timeout=timeout)
            except httpx.TransportError as exc:
                errors.append(f"{endpoint}: {describe(exc, timeout)}")
                continue
            self._current = index
            if response.status_code != 200:
                raise EtcdError(f"etcd at {endpoint} answered {path} with {response.text[:200]}")
            answer: dict[str, Any] = response.json()
            return answer.get("result", answer)  # streaming calls wrap their answer
        raise EtcdError(f"cannot reach etcd at {'; '.join(errors)}")

    # -- leases ---------------------------------------------------------------------------

    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: its id and the TTL etcd granted."""
        answer = await self._post("/v3/lease/grant", {"TTL": ttl}, REQUEST_TIMEOUT_S)
        return int(answer["ID"]), int(answer["TTL"])

    async def keepalive(self, lease: int, timeout: float = REQUEST_TIMEOUT_S) -> int:
        """Renew `lease`; the TTL it now has, 0 if etcd no longer knows it (expired)."""
        answer = await self._post("/v3/lease/keepalive", {"ID": str(lease)}, timeout)
        return int(answer.get("TTL", 0))

    async def revoke(self, lease: int, timeout: float = REQUEST_TIMEOUT_S) -> None:
        """Drop `lease` and every key on it: the leader key disappears at once."""
        try:
            await self._post("/v3/lease/revoke", {"ID": str(lease)}, timeout)
        except EtcdError as exc:
            if "not found" not in str(exc):
                raise

    # -- the cluster --------------------------------------------------------------------

    async def read(self) -> ClusterView:
        """The leader key and the term counter, in one range over the prefix."""
        answer = await self._post(
            "/v3/kv/range",
            {"key": b64(self.leader_key), "range_end": prefix_end(self.prefix + "/")},
            REQUEST_TIMEOUT_S,
        )
        leader: LeaderRecord | None = None
        term, term_revision = 0, 0
        for kv in answer.get("kvs", []):
            key = unb64(kv["key"])
            if key == self.leader_key:
                leader = parse_leader(unb64(kv.get("value", "")), int(kv.get("lease", 0)))
            elif key == self.term_key:
                term, term_revision = int(unb64(kv.get("value", "")) or 0), int(kv["mod_revision"])
        return ClusterView(leader, term, term_revision)

    async def campaign(
        self, url: str, lease: int, view: ClusterView, floor: int
    ) -> LeaderRecord | None:
        """Create the leader key on `lease` if it is absent, raising the term counter in the
        same transaction to above both its value in `view` and `floor`. The record if won."""
        term = max(view.term, floor) + 1
        record = LeaderRecord(self.name, url, term, lease)
        compare = [
            {"key": b64(self.leader_key), "target": "CREATE", "create_revision": "0"},
            {"key": b64(self.term_key), "target": "MOD", "mod_revision": str(view.term_revision)},
        ]
        success = [
            {
                "request_put": {
                    "key": b64(self.leader_key),
                    "value": b64(leader_value(record)),
                    "lease": str(lease),
                }
            },
            {"request_put": {"key": b64(self.term_key), "value": b64(str(term))}},
        ]
        body = {"compare": compare, "success": success, "failure": []}
        answer = await self._post("/v3/kv/txn", body, REQUEST_TIMEOUT_S)
        return record if answer.get("succeeded") else None

    async def raise_term(self, record: LeaderRecord, at_least: int) -> LeaderRecord:
        """While leading, move to a term of at least `at_least` (a peer has seen a term
        above the counter: etcd's data was lost or replaced). Fails if we no longer lead."""
        for _ in range(10):
            view = await self.read()
            if view.leader is None or view.leader.lease != record.lease:
                raise EtcdError("lost the leader key while raising the term")
            term = max(view.term + 1, at_least)
            raised = LeaderRecord(record.name, record.url, term, record.lease)
            compare = [
                {
                    "key": b64(self.term_key),
                    "target": "MOD",
                    "mod_revision": str(view.term_revision),
                },
                {"key": b64(self.leader_key), "target": "LEASE", "lease": str(record.lease)},
            ]
            success = [
                {"request_put": {"key": b64(self.term_key), "value": b64(str(term))}},
                {
                    "request_put": {
                        "key": b64(self.leader_key),
                        "value": b64(leader_value(raised)),
                        "lease": str(record.lease),
                    }
                },
            ]
            answer = await self._post(
                "/v3/kv/txn",
                {"compare": compare, "success": success, "failure": []},
                REQUEST_TIMEOUT_S,
            )
            if answer.get("succeeded"):
                return raised
        raise EtcdError("the term counter kept changing while raising it")

    async def watch(self, on_change: Callable[[], Awaitable[None] | None]) -> None:
        """Call `on_change` whenever a key under the prefix changes; reconnect forever."""
        body = {
            "create_request": {
                "key": b64(self.prefix + "/"),
                "range_end": prefix_end(self.prefix + "/"),
            }
        }
        failures = 0
        while True:
            endpoint = self.endpoints[self._current % len(self.endpoints)]
            try:
                async with self._client.stream(
                    "POST", f"{endpoint}/v3/watch", json=body, timeout=httpx.Timeout(1.0, read=None)
                ) as response:
                    async for line in response.aiter_lines():
                        if '"events"' in line:
                            failures = 0
                            result = on_change()
                            if result is not None:
                                await result
            except (httpx.HTTPError, ValueError) as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "watching etcd at %s failed (%s); retrying", endpoint, describe(exc, 1.0)
                    )
                self._current += 1
            await asyncio.sleep(WATCH_RETRY_S)


def leader_value(record: LeaderRecord) -> str:
    return json.dumps({"name": record.name, "url": record.url, "term": record.term})


def parse_leader(value: str, lease: int) -> LeaderRecord | None:
    try:
        data = json.loads(value)
        return LeaderRecord(str(data["name"]), str(data["url"]), int(data["term"]), lease)
    except (ValueError, KeyError, TypeError):
        log.warning("the leader key holds %r, not a leader record; ignoring it", value[:200])
        return None


def describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {timeout * 1000:g} ms"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused" if "refused" in str(exc).lower() else f"cannot connect ({exc})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
