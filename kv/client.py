"""A Python client for the store: :class:`AsyncKVClient` and :class:`KVClient`, on httpx.

    from kv.client import KVClient
    with KVClient(["http://127.0.0.1:8000", "http://127.0.0.1:8001"]) as kv:
        written = kv.put("colour", "blue")          # a WriteResponse: version, acks, ...
        kv.get("colour").value                      # "blue"

It finds the leader among its endpoints (KV_ENDPOINTS when none are given), follows the
followers' 307 to it (HA nodes) and remembers it. Errors are exceptions that carry the
server's reason (:class:`QuorumNotReached`, :class:`VersionConflict`, :class:`KeyNotFound`,
:class:`NotReady`, :class:`Unreachable`). A call retries, with backoff and jitter within
one overall `deadline`, on connection errors and while the store has no leader ready
(503 while it starts or elects, or after a leader lost its lease mid-write).

Every write carries an ``Idempotency-Key``, the same on each of its retries, so a
retry whose first attempt was applied after all (its answer lost with a leader that
died) is answered with that write instead of writing again: on the same leader after
a restart with DATA_DIR, or on the follower elected in its place. A write is therefore
applied once, whatever is retried; only a write whose every attempt failed before the
deadline raises :class:`Unreachable`, with its outcome unknown.

With auth on, pass `token` (else KV_TOKEN is used): it goes in every request's
``Authorization: Bearer`` header; a refusal raises :class:`Unauthorized`. Over TLS, pass the
cluster's CA as `ca_file` (else KV_CACERT; else the system's CAs verify the nodes).

A :class:`Session` carries the highest version it has written or read, and every read
asks for it as `min_version`, on any node: read-your-writes and monotonic reads.

:class:`KVClient` is the same client for code that does not use asyncio: each call runs
the async one on a private event loop.
"""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from kv.web.schemas import HealthResponse, KeyValue, ReplicatedEntry, WriteResponse

LAST_VERSION_HEADER = "X-Last-Version"
IDEMPOTENCY_HEADER = "Idempotency-Key"
DEFAULT_ENDPOINTS = "http://127.0.0.1:8000"


class KVError(Exception):
    """An error the store answered with (or could not be reached for); `reason` is its word."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class KeyNotFound(KVError):
    """404: the key is absent or deleted on the node read."""


class VersionConflict(KVError):
    """412: a conditional write's expected version is not the key's; nothing was written."""

    def __init__(self, reason: str, current_version: int) -> None:
        super().__init__(reason, 412)
        self.current_version = current_version


class QuorumNotReached(KVError):
    """503: fewer than `write_quorum` followers confirmed in time. The write stays applied on
    the leader as `version` and keeps replicating: not confirmed, not rolled back."""

    def __init__(self, reason: str, acks: int, write_quorum: int, version: int) -> None:
        super().__init__(reason, 503)
        self.acks = acks
        self.write_quorum = write_quorum
        self.version = version


class NotReady(KVError):
    """503 until the deadline: the leader is starting, no leader is known, or no node read
    had applied the session's version yet."""


class Unauthorized(KVError):
    """401 or 403."""


class Unreachable(KVError):
    """No endpoint answered before the deadline (for a write: its outcome is unknown)."""


@dataclass
class Session:
    """The highest version this session has written or read: every read asks for at least
    it (`min_version`), so it sees its own writes and never goes back in time, on any node."""

    last_version: int = 0

    def saw(self, version: int | None) -> None:
        if version is not None and version > self.last_version:
            self.last_version = version


def bearer(token: str) -> Callable[[httpx.Request], Awaitable[None]]:
    """A request hook that puts the token on every request, each hop of a redirect included:
    httpx drops an Authorization header when a redirect changes the origin, and an HA
    follower's 307 to its leader always does (another port or host). Only the cluster's
    nodes redirect these requests, and only to their leader."""
    value = f"Bearer {token}"

    async def add_token(request: httpx.Request) -> None:
        request.headers["Authorization"] = value

    return add_token


def endpoints_from_env() -> list[str]:
    return [
        e.strip().rstrip("/")
        for e in os.environ.get("KV_ENDPOINTS", DEFAULT_ENDPOINTS).split(",")
        if e.strip()
    ]


def origin(url: httpx.URL | str) -> str:
    parts = urlsplit(str(url))
    return f"{parts.scheme}://{parts.netloc}"


class _Retry(Exception):
    """Internal: this attempt may be repeated (on another endpoint, after a backoff)."""

    def __init__(self, error: KVError) -> None:
        super().__init__(error.reason)
        self.error = error


class AsyncKVClient:
    def __init__(
        self,
        endpoints: list[str] | str | None = None,
        *,
        session: Session | None = None,
        deadline: float = 10.0,
        timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        token: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = endpoints.split(",")
        self.endpoints = [e.strip().rstrip("/") for e in endpoints or endpoints_from_env()]
        if not self.endpoints:
            raise ValueError("no endpoints: pass some, or set KV_ENDPOINTS")
        self.session = session
        self.deadline = deadline
        self.leader: str | None = None
        """The leader found last: writes go there first."""
        token = token if token is not None else os.environ.get("KV_TOKEN") or None
        ca_file = ca_file if ca_file is not None else os.environ.get("KV_CACERT") or None
        self._http = httpx.AsyncClient(
            timeout=timeout,
            follow_redirects=True,
            trust_env=False,
            transport=transport,
            event_hooks={"request": [bearer(token)]} if token else None,
            verify=ssl.create_default_context(cafile=ca_file) if ca_file else True,
        )
        self._next = 0

    async def __aenter__(self) -> AsyncKVClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- writes -------------------------------------------------------------------------

    async def put(
        self,
        key: str,
        value: Any,
        *,
        w: int | None = None,
        if_version: int | None = None,
        timeout_ms: float | None = None,
        idempotency_key: str | None = None,
    ) -> WriteResponse:
        """Write `key`, confirmed by `w` followers (default WRITE_QUORUM) within `timeout_ms`;
        with `if_version`, only if the key is at that version now (0: absent).

        `idempotency_key` (default: a fresh UUID) is what makes retries safe; pass your own
        to retry across calls, say after a QuorumNotReached."""
        params = _params(w=w, if_version=if_version, timeout_ms=timeout_ms)
        path = _key_path(key)
        return await self._write("PUT", path, params, idempotency_key, {"value": value})

    async def delete(
        self,
        key: str,
        *,
        w: int | None = None,
        if_version: int | None = None,
        timeout_ms: float | None = None,
        idempotency_key: str | None = None,
    ) -> WriteResponse:
        """Delete `key` (a replicated tombstone); KeyNotFound if it does not exist."""
        params = _params(w=w, if_version=if_version, timeout_ms=timeout_ms)
        return await self._write("DELETE", _key_path(key), params, idempotency_key)

    async def compare_and_set(
        self,
        key: str,
        expected_version: int,
        value: Any,
        *,
        w: int | None = None,
        timeout_ms: float | None = None,
        idempotency_key: str | None = None,
    ) -> WriteResponse:
        """Write `value` only if `key` is at `expected_version` (0: absent); else
        VersionConflict with the key's `current_version`. A retry of a compare-and-set
        that was applied returns that write, not a conflict."""
        return await self.put(
            key,
            value,
            w=w,
            if_version=expected_version,
            timeout_ms=timeout_ms,
            idempotency_key=idempotency_key,
        )

    async def _write(
        self,
        method: str,
        path: str,
        params: dict[str, Any],
        idempotency_key: str | None,
        body: Any = None,
    ) -> WriteResponse:
        headers = {IDEMPOTENCY_HEADER: idempotency_key or uuid.uuid4().hex}

        async def attempt(endpoint: str) -> WriteResponse:
            try:
                response = await self._http.request(
                    method, endpoint + path, params=params, json=body, headers=headers
                )
            except httpx.HTTPError as error:
                # Sent or not, it may be repeated: the leader knows its Idempotency-Key.
                raise _Retry(
                    Unreachable(
                        f"{endpoint} did not answer ({type(error).__name__}: {error}); the "
                        "write may or may not have been applied"
                    )
                ) from error
            if response.status_code == 200:
                self.leader = origin(response.url)
                written = WriteResponse.model_validate_json(response.content)
                if self.session is not None:
                    self.session.saw(written.version)
                return written
            raise _error_of(response, write=True)

        return await self._with_retries(attempt, prefer=self.leader)

    # -- reads ----------------------------------------------------------------------------

    async def get(
        self,
        key: str,
        *,
        min_version: int | None = None,
        wait_ms: float = 0,
        node: str | None = None,
    ) -> KeyValue:
        """Read `key` from `node`, or any endpoint; with a session, at least its version."""
        params = self._read_params(min_version, wait_ms)

        async def attempt(endpoint: str) -> KeyValue:
            response = await self._read(endpoint + _key_path(key), params)
            if response.status_code == 200:
                return KeyValue.model_validate_json(response.content)
            raise _error_of(response)

        return await self._with_retries(attempt, prefer=node, only=node)

    async def list(self, prefix: str = "", *, min_version: int | None = None) -> list[str]:
        """The live keys starting with `prefix`, sorted."""
        params = self._read_params(min_version, 0)

        async def attempt(endpoint: str) -> list[str]:
            response = await self._read(endpoint + "/keys", params)
            if response.status_code == 200:
                return [k for k in response.json()["keys"] if k.startswith(prefix)]
            raise _error_of(response)

        return await self._with_retries(attempt)

    async def status(self, node: str | None = None) -> HealthResponse:
        """A node's `/health`: its role, the leader it knows, its term and version."""

        async def attempt(endpoint: str) -> HealthResponse:
            response = await self._read(endpoint + "/health", {})
            return HealthResponse.model_validate_json(response.content)

        return await self._with_retries(attempt, prefer=node, only=node)

    def _read_params(self, min_version: int | None, wait_ms: float) -> dict[str, Any]:
        wanted = max(min_version or 0, self.session.last_version if self.session else 0)
        if not wanted:
            return {}
        return {"min_version": wanted, "wait_ms": f"{wait_ms or 1000:g}"}

    async def _read(self, url: str, params: dict[str, Any]) -> httpx.Response:
        try:
            response = await self._http.get(url, params=params)
        except httpx.HTTPError as error:
            raise _Retry(Unreachable(f"{origin(url)}: {type(error).__name__}: {error}")) from error
        if self.session is not None and (seen := response.headers.get(LAST_VERSION_HEADER)):
            self.session.saw(int(seen))
        return response

    async def watch(
        self, since_version: int | None = None, prefix: str | None = None
    ) -> AsyncGenerator[ReplicatedEntry, None]:
        """Every entry applied after `since_version`, then live ones, forever. A dropped
        stream is resumed from the last version received (`Last-Event-ID`), on any node."""
        last = since_version
        while True:
            endpoint = self._pick()
            headers = {} if last is None else {"Last-Event-ID": str(last)}
            params = {} if prefix is None else {"prefix": prefix}
            try:
                async with self._http.stream(
                    "GET", endpoint + "/watch", params=params, headers=headers,
                    timeout=httpx.Timeout(5.0, read=None),
                ) as response:  # fmt: skip
                    async for kind, data in _sse(response):
                        if kind in ("put", "delete"):
                            entry = ReplicatedEntry.model_validate_json(data)
                            last = entry.version
                            yield entry
            except httpx.HTTPError:
                pass
            self._next += 1
            await asyncio.sleep(0.2 + random.random() * 0.2)

    # -- retries ----------------------------------------------------------------------------

    def _pick(self, prefer: str | None = None) -> str:
        if prefer:
            return prefer
        endpoint = self.endpoints[self._next % len(self.endpoints)]
        return endpoint

    async def _with_retries(
        self, attempt: Any, prefer: str | None = None, only: str | None = None
    ) -> Any:
        """Run `attempt(endpoint)` until it returns, raises a final error, or the deadline
        passes: backoff 50 ms doubling to 1 s, with jitter, the next endpoint each time."""
        deadline = time.monotonic() + self.deadline
        tries = 0
        last_error: KVError | None = None
        while True:
            endpoint = only or (prefer if tries == 0 and prefer else self._pick())
            try:
                return await attempt(endpoint)
            except _Retry as retry:
                last_error = retry.error
                if endpoint == self.leader:
                    self.leader = None
            tries += 1
            self._next += 1
            pause = min(1.0, 0.05 * 2 ** (tries - 1)) * (0.5 + random.random() / 2)
            if time.monotonic() + pause > deadline:
                assert last_error is not None
                raise last_error
            await asyncio.sleep(pause)


def _params(**values: Any) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def _key_path(key: str) -> str:
    return "/keys/" + quote(key, safe="")


def _error_of(response: httpx.Response, write: bool = False) -> KVError | _Retry:
    """The exception for a non-200 answer: to raise, or (`_Retry`) to try again."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    reason = str(body.get("error") or response.text[:200] or f"HTTP {response.status_code}")
    status = response.status_code
    if status == 404:
        return KeyNotFound(reason, 404)
    if status == 412:
        return VersionConflict(reason, int(body.get("current_version", 0)))
    if status == 403 and write and "is a follower" in reason:
        return _Retry(NotReady(reason, 403))  # a fixed cluster's follower: try the next one
    if status in (401, 403):
        return Unauthorized(reason, status)
    if status == 503:
        if "acks" in body and "write_quorum" in body:
            return QuorumNotReached(
                reason, int(body["acks"]), int(body["write_quorum"]), int(body.get("version", 0))
            )
        return _Retry(NotReady(reason, 503))  # starting, electing, or not applied yet
    return KVError(reason, status)


async def _sse(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """(event, data) pairs from a Server-Sent Events stream."""
    kind, data = "message", list[str]()
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield kind, "\n".join(data)
            kind, data = "message", []
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


class KVClient:
    """The same client, for code that does not use asyncio (see the module docstring)."""

    def __init__(self, endpoints: list[str] | str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._async = AsyncKVClient(endpoints, **options)

    def __enter__(self) -> KVClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._loop.run_until_complete(self._async.aclose())
        self._loop.close()

    @property
    def session(self) -> Session | None:
        return self._async.session

    @property
    def leader(self) -> str | None:
        return self._async.leader

    def _run(self, call: Any) -> Any:
        return self._loop.run_until_complete(call)

    def put(self, key: str, value: Any, **options: Any) -> WriteResponse:
        return self._run(self._async.put(key, value, **options))  # type: ignore[no-any-return]

    def delete(self, key: str, **options: Any) -> WriteResponse:
        return self._run(self._async.delete(key, **options))  # type: ignore[no-any-return]

    def compare_and_set(
        self, key: str, expected_version: int, value: Any, **options: Any
    ) -> WriteResponse:
        return self._run(self._async.compare_and_set(key, expected_version, value, **options))  # type: ignore[no-any-return]

    def get(self, key: str, **options: Any) -> KeyValue:
        return self._run(self._async.get(key, **options))  # type: ignore[no-any-return]

    def list(self, prefix: str = "", **options: Any) -> list[str]:
        return self._run(self._async.list(prefix, **options))  # type: ignore[no-any-return]

    def status(self, node: str | None = None) -> HealthResponse:
        return self._run(self._async.status(node))  # type: ignore[no-any-return]

    def watch(
        self, since_version: int | None = None, prefix: str | None = None
    ) -> Iterator[ReplicatedEntry]:
        stream = self._async.watch(since_version, prefix)
        try:
            while True:
                yield self._run(stream.__anext__())
        finally:
            self._run(stream.aclose())
