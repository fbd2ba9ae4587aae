"""The nemesis's `--net` clients: retrying writers and readers that record what they saw.

Each client behaves as a real one would: a write carries an `Idempotency-Key` and is sent
again with that key, at most MAX_ATTEMPTS times, after a timeout, a lost connection or a
503; redirects (307) are followed to the leader, and a node that does not answer (or
answers 503) is left for the next one. One logical operation is one entry in the
:class:`~tools.history.HistoryRecorder`, however many requests it took:

* ``ok``: a 2xx with its version (a delete's 404: the key was absent);
* ``fail``: surely not applied by any attempt: a 412 (with the current version), another
  4xx, or only answers that applied nothing (a connection refused, or a 503 that is not one
  of the two the docs say leave the write applied);
* ``info``: unknown: an attempt timed out or lost its connection after sending, or got a
  503 that applied it (``write quorum not reached``, with its version, or ``stopped leading
  before the write was acknowledged``), and no later attempt settled it.

Reads are not part of the linearizability history. docs/api/http.md and
docs/concepts/partitions.md promise no linearizable read: every node serves reads from what
it holds, a leader cut off from etcd keeps serving them until it learns of the next leader,
and a leader serves a write it applied before its quorum confirmed it (a 503 that may not
survive). A read on the leader can therefore be stale or dirty by design, and the checker
would rightly reject it. Reads (GET /keys/{key} on the node that last acknowledged, the
leader as far as the client knows) are kept in :class:`Observations` for the invariants:
a version read must carry the value of the write that was given that version.

A fraction of acknowledged writes is sent once more with the same key, as by a client
that lost the answer: the store must replay the same version (:attr:`Observations.replays`).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from kv.client import origin
from tools.history import HistoryRecorder

MAX_ATTEMPTS = 4
TIMEOUT_MS = 1000
"""The server-side quorum timeout each write asks for; the client waits a little longer."""
REPLAY_FRACTION = 0.1
APPLIED_503 = ("write quorum not reached", "stopped leading before the write was acknowledged")
"""The 503s after which the write stays applied on the node (docs/api/http.md, failover.md)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer with a version: what the store said it gave that version."""

    key: str
    value: Any
    deleted: bool
    version: int
    node: str
    status: int
    op: int | None  # None: a read
    holders: tuple[str, ...] = ()
    """A 200's node and the followers it names as having confirmed."""
    replayed: bool = False
    """Answered with `Idempotent-Replayed: true`: the write an earlier attempt made, perhaps
    on an earlier leader in an earlier term, confirmed again by this node."""


@dataclass
class Observations:
    """What the clients saw beside the history, for the store's own invariants."""

    answers: list[Answer] = field(default_factory=list)
    """Every 200 and every 503 that named a version, and every read with a version."""
    acks: list[Answer] = field(default_factory=list)
    """Writes and deletes acknowledged with 200: which node acknowledged which version."""
    replays: list[tuple[int, int, int, Any]] = field(default_factory=list)
    """(op, version acknowledged, the repeat's status, the version it named if any)."""
    server_errors: list[str] = field(default_factory=list)
    """Any 5xx other than 503."""
    attempts: int = 0


class Client:
    """One client: its own keys' versions as last seen, for conditional writes."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        urls: list[str],
        process: int,
        rng: random.Random,
        recorder: HistoryRecorder,
        seen: Observations,
        keys: list[str],
    ) -> None:
        self.http, self.urls, self.process, self.rng = http, urls, process, rng
        self.recorder, self.seen, self.keys = recorder, seen, keys
        self.turn = process
        self.target = urls[process % len(urls)]
        self.known: dict[str, int] = {}  # key -> version last seen (0: absent)
        self.counter = 0

    def next_node(self) -> None:
        self.turn += 1
        self.target = self.urls[self.turn % len(self.urls)]

    async def run(self, until: float) -> None:
        while time.monotonic() < until:
            key = self.rng.choice(self.keys)
            draw = self.rng.random()
            if draw < 0.15:
                await self.read(key)
            elif draw < 0.3:
                await self.write(key, delete=True, conditional=self.rng.random() < 0.5)
            else:
                await self.write(key, delete=False, conditional=self.rng.random() < 0.4)

    async def read(self, key: str) -> None:
        try:
            response = await self.http.get(f"{self.target}/keys/{quote(key, safe='')}")
        except httpx.HTTPError:
            self.next_node()
            await asyncio.sleep(0.05)
            return
        self._server_error(response, "read", key)
        if response.status_code == 200:
            body = response.json()
            version = int(body["version"])
            self.known[key] = version
            node = origin(response.url)
            self.seen.answers.append(Answer(key, body["value"], False, version, node, 200, None))
        elif response.status_code == 404:
            self.known[key] = 0

    async def write(self, key: str, *, delete: bool, conditional: bool) -> None:
        self.counter += 1
        value = None if delete else f"c{self.process}-{self.counter}"
        condition: int | None = self.known.get(key, 0) if conditional else None
        if delete and condition == 0:
            condition = None  # "delete only if absent" asks nothing sensible
        idem = f"c{self.process}-{self.counter}"
        op = self.recorder.invoke(
            self.process,
            "delete" if delete else "write",
            key,
            value,
            if_version=condition,
            idempotency_key=idem,
        )
        params = {"timeout_ms": str(TIMEOUT_MS), "w": str(self.rng.choice([2, 2, 2, 3]))}
        if condition is not None:
            params["if_version"] = str(condition)
        request = _Request(
            "DELETE" if delete else "PUT",
            f"/keys/{quote(key, safe='')}",
            params,
            None if delete else {"value": value},
            {"Idempotency-Key": idem},
        )
        await self.settle(op, key, value, delete, request)

    async def settle(self, op: int, key: str, value: Any, delete: bool, request: _Request) -> None:
        """Send `request` until an answer settles it, or MAX_ATTEMPTS; complete `op` once."""
        maybe_applied = False
        last: str = "no attempt"
        status: int | None = None
        answered: int | None = None  # the last HTTP status any attempt got
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                self.recorder.retry(op)
                await asyncio.sleep(0.05 * 2**attempt)
            self.seen.attempts += 1
            try:
                response = await request.send(self.http, self.target)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                last, status = f"{type(error).__name__} at {self.target}", None
                self.next_node()
                continue  # never sent: applied nothing
            except httpx.HTTPError as error:
                maybe_applied = True
                last, status = f"{type(error).__name__} at {self.target}", None
                self.next_node()
                continue
            status, node = response.status_code, origin(response.url)
            answered = status
            self._server_error(response, request.method, key)
            body = _json(response)
            if status == 200:
                version = int(body["version"])
                confirmed = [d["follower"] for d in body.get("replication", []) if d.get("ok")]
                replayed = response.headers.get("idempotent-replayed") == "true"
                holders = (node, *confirmed)
                answer = Answer(key, value, delete, version, node, 200, op, holders, replayed)
                self.seen.answers.append(answer)
                self.seen.acks.append(answer)
                self.known[key] = version
                self.target = node
                if self.rng.random() < REPLAY_FRACTION:
                    await self.replay(op, version, request)
                self.recorder.ok(op, version=version, node=node)
                return
            if status == 404 and delete:
                self.known[key] = 0
                self.recorder.ok(op, status=404, node=node)
                return
            if status == 412:
                current = body.get("current_version")
                if isinstance(current, int):
                    self.known[key] = current
                self.recorder.fail(op, status=412, current_version=current, node=node)
                return
            last = str(body.get("error", f"HTTP {status}"))[:200]
            if status == 503:
                if any(reason in last for reason in APPLIED_503):
                    maybe_applied = True
                    if isinstance(body.get("version"), int):
                        self.seen.answers.append(
                            Answer(key, value, delete, body["version"], node, 503, op)
                        )
                self.next_node()
                continue
            if 400 <= status < 500 and not maybe_applied:
                self.recorder.fail(op, status=status, error=last, node=node)
                return
            break  # a 5xx other than 503 (counted), or a 4xx after an attempt that applied
        if maybe_applied or (status is not None and status >= 500 and status != 503):
            self.recorder.info(op, error=last, status=status)
        else:  # status 0: no attempt was answered, and none was sent
            self.recorder.fail(op, status=answered or 0, error=last)

    async def replay(self, op: int, version: int, request: _Request) -> None:
        """The same request again, as by a client that lost the 200: the same version back."""
        try:
            response = await request.send(self.http, self.target)
        except httpx.HTTPError:
            return
        got = _json(response).get("version")  # a 200's, or a 503's that applied it
        self.seen.replays.append((op, version, response.status_code, got))

    def _server_error(self, response: httpx.Response, method: str, key: str) -> None:
        if response.status_code >= 500 and response.status_code != 503:
            self.seen.server_errors.append(
                f"{method} {key} at {origin(response.url)}: HTTP {response.status_code}"
            )


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    params: dict[str, str]
    json: Any
    headers: dict[str, str]

    async def send(self, http: httpx.AsyncClient, target: str) -> httpx.Response:
        return await http.request(
            self.method,
            f"{target}{self.path}",
            params=self.params,
            json=self.json,
            headers=self.headers,
        )


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
