"""etcd v3 through its JSON gateway, with httpx: leases, the election transaction, a watch.

As Patroni does, the node speaks plain HTTP to etcd's gRPC gateway (under `/v3/` in 3.4)
rather than pulling in a gRPC client. The gateway's quirks are handled here: keys and
values are base64, int64 fields come back as strings, and fields at their zero value
(`succeeded: false`, an event's `type: PUT`) are left out.

Errors come in the body: `{"error": "etcdserver: ...", "code": 5}` (with an HTTP status,
or a 200 once a stream has begun, where it may be `{"error": {"grpc_code": ..}}`);
streaming calls wrap their answer as `{"result": ...}`. An answer is never read without
its `header`, which every real one carries, so an error or a stranger's body is never
taken for a value. One quirk matters most: in 3.4 a keepalive of a lease etcd no longer
has (expired, or never granted) answers 200 `{"result": {"header": .., "ID": ..}}`,
with no TTL: that, and only that, means the lease expired.

Which endpoint: the one that last answered. An endpoint that fails (no connection, no
answer in time, a 5xx, an error body, a body that is not etcd's) is left for the next
one, in this call and the next ones. An error that is etcd's own answer about the request
(gRPC codes such as NotFound or InvalidArgument: a lease it does not have, a TTL too
large) is :class:`EtcdRefused`: every member would say the same, so nothing is retried.

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
from typing import Any, TypeVar

import httpx

from kv.ha.decide import ClusterView, LeaderRecord

log = logging.getLogger("kvstore.ha")

REQUEST_TIMEOUT_S = 1.0
WATCH_RETRY_S = 0.2
REFUSALS = {3: "InvalidArgument", 5: "NotFound", 6: "AlreadyExists", 7: "PermissionDenied"}
REFUSALS |= {9: "FailedPrecondition", 11: "OutOfRange", 16: "Unauthenticated"}
"""gRPC codes that are etcd's answer about the request itself, the same from any member."""
NOT_FOUND = 5

T = TypeVar("T")


class EtcdError(Exception):
    """etcd did not answer, or answered with an error."""


class EtcdRefused(EtcdError):
    """etcd answered, and refused the request (a lease it does not have, a bad value)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Unanswered(Exception):
    """One endpoint gave no usable answer: the next one is asked."""


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def prefix_end(key: str) -> str:
    """The range_end that makes a range cover every key starting with `key`."""
    raw = key.encode()
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode()


class Etcd:
    """One node's connection to etcd: asks the endpoint that last answered, then the rest."""

    def __init__(
        self,
        endpoints: list[str],
        prefix: str,
        name: str,
        tls: ssl.SSLContext | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`transport`: what carries the requests, in place of sockets (tests fake etcd)."""
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
            transport=transport,
        )

    @property
    def where(self) -> str:
        return ", ".join(self.endpoints)

    @property
    def current(self) -> str:
        """The endpoint the next call asks first."""
        return self.endpoints[self._current % len(self.endpoints)]

    async def aclose(self) -> None:
        await self._client.aclose()

    def _failed(self, index: int) -> None:
        """Endpoint `index` failed: the next call begins with the one after it."""
        self._current = (index + 1) % len(self.endpoints)

    async def _post(
        self,
        path: str,
        body: dict[str, Any],
        timeout: float,
        parse: Callable[[dict[str, Any]], T],
    ) -> T:
        """`parse` of the first usable answer to `path`, from each endpoint in turn.

        `timeout` bounds each endpoint's answer. Raises EtcdRefused at once if etcd refuses
        the request, EtcdError naming every endpoint and what it did if none answers."""
        failures = []
        first = self._current
        for attempt in range(len(self.endpoints)):
            index = (first + attempt) % len(self.endpoints)
            endpoint = self.endpoints[index]
            try:
                answer = await self._ask(endpoint, path, body, timeout)
                value = parse(answer)
            except Unanswered as exc:
                failures.append(f"{endpoint}: {exc}")
                self._failed(index)
                continue
            except (KeyError, TypeError, ValueError) as exc:
                failures.append(f"{endpoint}: answered {json.dumps(answer)[:200]} ({exc!r})")
                self._failed(index)
                continue
            self._current = index
            return value
        raise EtcdError(f"cannot reach etcd at {'; '.join(failures)} (asking {path})")

    async def _ask(
        self, endpoint: str, path: str, body: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        """One endpoint's answer to `path`, unwrapped from `result`."""
        try:
            response = await self._client.post(f"{endpoint}{path}", json=body, timeout=timeout)
        except httpx.HTTPError as exc:
            raise Unanswered(describe(exc, timeout)) from exc
        return answer_of(endpoint, path, response.status_code, response.text)

    # -- leases ---------------------------------------------------------------------------

    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: its id and the TTL etcd granted."""

        def granted(answer: dict[str, Any]) -> tuple[int, int]:
            return int(answer["ID"]), int(answer["TTL"])

        return await self._post("/v3/lease/grant", {"TTL": ttl}, REQUEST_TIMEOUT_S, granted)

    async def keepalive(self, lease: int, timeout: float = REQUEST_TIMEOUT_S) -> int:
        """Renew `lease`; the TTL it now has, 0 if etcd no longer knows it (expired).

        etcd 3.4 answers a lease it does not have with its header and the ID, no TTL
        (checked against etcd 3.4.23): an answer that is not even that is an error."""

        def renewed(answer: dict[str, Any]) -> int:
            if int(answer["ID"]) != lease:
                raise ValueError(f"the answer is about lease {answer['ID']}, not {lease}")
            return max(0, int(answer.get("TTL", 0)))

        return await self._post("/v3/lease/keepalive", {"ID": str(lease)}, timeout, renewed)

    async def revoke(self, lease: int, timeout: float = REQUEST_TIMEOUT_S) -> None:
        """Drop `lease` and every key on it: the leader key disappears at once. A lease
        etcd does not have (expired, or revoked already) is gone: that is success."""
        try:
            await self._post("/v3/lease/revoke", {"ID": str(lease)}, timeout, lambda _: None)
        except EtcdRefused as exc:
            if exc.code != NOT_FOUND:
                raise

    # -- the cluster --------------------------------------------------------------------

    async def read(self) -> ClusterView:
        """The leader key and the term counter, in one range over the prefix."""

        def view(answer: dict[str, Any]) -> ClusterView:
            leader: LeaderRecord | None = None
            term, term_revision = 0, 0
            for kv in answer.get("kvs", []):
                key = unb64(kv["key"])
                if key == self.leader_key:
                    leader = parse_leader(unb64(kv.get("value", "")), int(kv.get("lease", 0)))
                elif key == self.term_key:
                    term = int(unb64(kv.get("value", "")) or 0)
                    term_revision = int(kv["mod_revision"])
            return ClusterView(leader, term, term_revision)

        body = {"key": b64(self.leader_key), "range_end": prefix_end(self.prefix + "/")}
        return await self._post("/v3/kv/range", body, REQUEST_TIMEOUT_S, view)

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
        won = await self._post("/v3/kv/txn", body, REQUEST_TIMEOUT_S, succeeded)
        return record if won else None

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
            body = {"compare": compare, "success": success, "failure": []}
            if await self._post("/v3/kv/txn", body, REQUEST_TIMEOUT_S, succeeded):
                return raised
        raise EtcdError("the term counter kept changing while raising it")

    async def watch(self, on_change: Callable[[], Awaitable[None] | None]) -> None:
        """Call `on_change` whenever a key under the prefix changes; reconnect forever, to
        the next endpoint after one that fails, and call it once reconnected too (changes
        may have been missed meanwhile)."""
        failures = 0

        async def changed(created: bool) -> None:
            nonlocal failures
            if created:
                if not failures:
                    return
                log.info("watching etcd at %s again", self.current)
                failures = 0
            result = on_change()
            if result is not None:
                await result

        while True:
            index = self._current % len(self.endpoints)
            endpoint = self.endpoints[index]
            try:
                await self._watch_stream(endpoint, changed)
                problem = "it ended the watch stream"
            except (Unanswered, EtcdError) as exc:
                problem = str(exc)
            except httpx.HTTPError as exc:
                problem = describe(exc, REQUEST_TIMEOUT_S)
            failures += 1
            self._failed(index)
            if failures == 1:
                log.warning(
                    "watching etcd at %s failed (%s); trying %s", endpoint, problem, self.current
                )
            await asyncio.sleep(WATCH_RETRY_S)

    async def _watch_stream(
        self, endpoint: str, changed: Callable[[bool], Awaitable[None]]
    ) -> None:
        """Await `changed(True)` once the watch is set up, then `changed(False)` for each
        change etcd reports under the prefix. Returns when the stream ends; raises
        Unanswered, EtcdRefused or httpx's errors if it fails."""
        path = "/v3/watch"
        body = {
            "create_request": {
                "key": b64(self.prefix + "/"),
                "range_end": prefix_end(self.prefix + "/"),
            }
        }
        timeout = httpx.Timeout(REQUEST_TIMEOUT_S, read=None)
        async with self._client.stream(
            "POST", f"{endpoint}{path}", json=body, timeout=timeout
        ) as response:
            if response.status_code != 200:
                await response.aread()
                answer_of(endpoint, path, response.status_code, response.text)
                raise Unanswered(f"answered HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                result = answer_of(endpoint, path, 200, line)
                if result.get("canceled"):
                    reason = result.get("cancel_reason") or "no reason given"
                    raise Unanswered(f"cancelled the watch ({reason})")
                if result.get("created"):
                    await changed(True)
                elif result.get("events"):
                    await changed(False)


def answer_of(endpoint: str, path: str, status: int, text: str) -> dict[str, Any]:
    """etcd's answer in `text` (a response to `path` with HTTP `status`), unwrapped from
    `result`. Raises EtcdRefused for etcd's refusal of the request itself, and Unanswered
    for anything else that is not an answer: an error, a 5xx, a body not from etcd."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise Unanswered(f"answered HTTP {status} with {text.strip()[:200]!r}, not JSON")
    error = body.get("error")
    if error:
        message, code = error_of(body)
        name = REFUSALS.get(code) if code is not None else None
        if name is not None:
            assert code is not None
            raise EtcdRefused(f"etcd at {endpoint} refused {path}: {message} ({name})", code)
        raise Unanswered(f"answered HTTP {status} with an error: {message}")
    if status != 200:
        raise Unanswered(f"answered HTTP {status} with {text.strip()[:200]!r}")
    result = body.get("result", body)
    if not isinstance(result, dict) or "header" not in result:
        raise Unanswered(f"answered {text.strip()[:200]!r}, which is not etcd's answer")
    return result


def error_of(body: dict[str, Any]) -> tuple[str, int | None]:
    """The message and gRPC code of an error body, in either of the gateway's forms:
    `{"error": "...", "code": 5}`, or in a stream `{"error": {"grpc_code": 5, ...}}`."""
    error = body["error"]
    code = body.get("code")
    if isinstance(error, dict):
        code = error.get("grpc_code", error.get("code", code))
        error = error.get("message") or json.dumps(error)
    try:
        return str(error), int(code) if code is not None else None
    except (TypeError, ValueError):
        return str(error), None


def succeeded(answer: dict[str, Any]) -> bool:
    """A transaction's outcome (the gateway leaves `succeeded: false` out)."""
    return bool(answer.get("succeeded", False))


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
