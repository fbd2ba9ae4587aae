"""kv/ha/etcd.py against a fake etcd (httpx.MockTransport): which endpoint each call asks,
and which answers are errors. The gateway's bodies here are the ones etcd 3.4.23 sends
(tests/system/test_etcd_client.py checks them against the real one)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

import kv.ha.etcd
from kv.ha.etcd import Etcd, EtcdError, EtcdRefused

A, B, C = "http://a.test:2379", "http://b.test:2379", "http://c.test:2379"
HEADER = {"cluster_id": "1", "member_id": "2", "revision": "9", "raft_term": "2"}
NO_LEADER = {"error": "etcdserver: no leader", "message": "etcdserver: no leader", "code": 14}
LEASE_NOT_FOUND = {
    "error": "etcdserver: requested lease not found",
    "message": "etcdserver: requested lease not found",
    "code": 5,
}

Answer = Callable[[httpx.Request], httpx.Response]


def granted(_: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"header": HEADER, "ID": "7", "TTL": "5"})


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


def silent(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("timed out", request=request)


def status(code: int, body: dict[str, Any] | str) -> Answer:
    def answer(_: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(code, text=body)
        return httpx.Response(code, json=body)

    return answer


class FakeEtcd:
    """Endpoints by origin, each answering as its function says; `asked` records the order."""

    def __init__(self, **answers: Answer) -> None:
        self.answers = {f"http://{name}.test:2379": answer for name, answer in answers.items()}
        self.asked: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        origin = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        self.asked.append(origin)
        return self.answers[origin](request)

    def client(self) -> Etcd:
        return Etcd([A, B, C], "/kv", "n1", transport=httpx.MockTransport(self))


async def test_a_refused_endpoint_is_left_for_the_next_in_this_call_and_the_next_ones() -> None:
    fake = FakeEtcd(a=refused, b=granted, c=granted)
    etcd = fake.client()
    assert await etcd.grant(5) == (7, 5)
    assert fake.asked == [A, B]
    fake.asked.clear()
    assert await etcd.grant(5) == (7, 5)
    assert fake.asked == [B], "the next call must begin with the endpoint that answered"


async def test_a_failed_endpoint_passes_the_turn_to_the_one_after_it_round_robin() -> None:
    fake = FakeEtcd(a=granted, b=granted, c=granted)
    etcd = fake.client()
    await etcd.grant(5)
    fake.answers[A] = silent
    await etcd.grant(5)
    assert fake.asked == [A, A, B]
    fake.answers[B] = refused
    fake.asked.clear()
    await etcd.grant(5)
    assert fake.asked == [B, C]
    fake.answers[C] = status(503, NO_LEADER)
    fake.answers[A] = granted
    fake.asked.clear()
    await etcd.grant(5)
    assert fake.asked == [C, A], "after the last endpoint comes the first"
    assert etcd.current == A


async def test_a_5xx_moves_to_the_next_endpoint() -> None:
    fake = FakeEtcd(a=status(503, NO_LEADER), b=granted, c=granted)
    etcd = fake.client()
    assert await etcd.grant(5) == (7, 5)
    assert fake.asked == [A, B]
    assert etcd.current == B


@pytest.mark.parametrize(
    "body",
    [
        NO_LEADER,  # a unary call's error, with a 200
        # a streaming call's error, once its 200 has been sent
        {"error": {"grpc_code": 14, "http_code": 503, "message": "etcdserver: no leader"}},
        {"result": {"ID": "7", "TTL": "5"}},  # no header: not etcd's answer
        {},
    ],
)
async def test_an_error_body_with_a_200_is_an_error_and_moves_on(body: dict[str, Any]) -> None:
    fake = FakeEtcd(a=status(200, body), b=status(200, body), c=status(200, body))
    etcd = fake.client()
    with pytest.raises(EtcdError) as raised:
        await etcd.keepalive(7)
    assert fake.asked == [A, B, C], "every endpoint is asked before giving up"
    assert not isinstance(raised.value, EtcdRefused)
    assert etcd.current == A, "the turn passed all the way round"


async def test_keepalive_of_an_expired_lease_is_0_and_of_a_live_one_its_ttl() -> None:
    # etcd 3.4's keepalive of a lease it no longer has: the header and the ID, no TTL.
    expired = status(200, {"result": {"header": HEADER, "ID": "7"}})
    live = status(200, {"result": {"header": HEADER, "ID": "7", "TTL": "9"}})
    fake = FakeEtcd(a=expired, b=live, c=live)
    etcd = fake.client()
    assert await etcd.keepalive(7) == 0
    fake.answers[A] = live
    assert await etcd.keepalive(7) == 9
    assert fake.asked == [A, A]


async def test_keepalive_refused_by_etcd_raises_rather_than_reading_an_expired_lease() -> None:
    fake = FakeEtcd(a=status(200, LEASE_NOT_FOUND), b=granted, c=granted)
    etcd = fake.client()
    with pytest.raises(EtcdRefused, match=r"etcd at http://a\.test:2379 refused") as raised:
        await etcd.keepalive(7)
    assert raised.value.code == 5
    assert fake.asked == [A], "etcd's own refusal is the same from every member"


async def test_keepalive_of_another_lease_is_not_an_answer() -> None:
    other = status(200, {"result": {"header": HEADER, "ID": "8", "TTL": "9"}})
    fake = FakeEtcd(a=other, b=other, c=other)
    with pytest.raises(EtcdError, match="not 7"):
        await fake.client().keepalive(7)


async def test_revoke_of_a_lease_etcd_does_not_have_succeeds_and_other_refusals_raise() -> None:
    fake = FakeEtcd(a=status(404, LEASE_NOT_FOUND), b=granted, c=granted)
    etcd = fake.client()
    await etcd.revoke(7)
    assert fake.asked == [A]
    denied = {"error": "etcdserver: permission denied", "code": 7}
    fake.answers[A] = status(403, denied)
    with pytest.raises(EtcdRefused, match="permission denied"):
        await etcd.revoke(7)


async def test_the_error_names_each_endpoint_and_what_it_did() -> None:
    fake = FakeEtcd(a=refused, b=silent, c=status(502, "<html>Bad Gateway</html>"))
    with pytest.raises(EtcdError) as raised:
        await fake.client().read()
    assert str(raised.value) == (
        "cannot reach etcd at http://a.test:2379: connection refused; "
        "http://b.test:2379: no answer within 1000 ms; "
        "http://c.test:2379: answered HTTP 502 with '<html>Bad Gateway</html>', not JSON "
        "(asking /v3/kv/range)"
    )


async def test_an_error_body_is_named_in_words() -> None:
    fake = FakeEtcd(a=status(503, NO_LEADER), b=refused, c=refused)
    with pytest.raises(EtcdError, match=r"a\.test:2379: answered HTTP 503 with an error: "
                       "etcdserver: no leader; "):  # fmt: skip
        await fake.client().grant(5)


async def test_a_read_of_an_empty_prefix_and_a_campaign_lost() -> None:
    fake = FakeEtcd(
        a=status(200, {"header": HEADER}), b=granted, c=granted
    )  # range: no kvs; txn: no `succeeded` (false is left out)
    etcd = fake.client()
    view = await etcd.read()
    assert (view.leader, view.term) == (None, 0)
    assert await etcd.campaign("http://n1", 7, view, 0) is None


def watch_lines(*messages: dict[str, Any], sent: asyncio.Event | None = None) -> Answer:
    """A /v3/watch stream: `messages`, one a line; then `sent` is set (by then the client has
    handled every line) and the stream stays open."""

    async def body() -> AsyncIterator[bytes]:
        for message in messages:
            yield json.dumps(message).encode() + b"\n"
        if sent is None:
            return
        sent.set()
        await asyncio.Event().wait()

    def answer(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body())

    return answer


CREATED = {"result": {"header": HEADER, "created": True}}
EVENT = {"result": {"header": HEADER, "events": [{"kv": {"key": "L2t2L2xlYWRlcg=="}}]}}


async def watch_until(etcd: Etcd, sent: asyncio.Event) -> int:
    """Run etcd.watch until `sent` is set (within 5 s): how often it called on_change."""
    seen: list[None] = []
    task = asyncio.create_task(etcd.watch(lambda: seen.append(None)))
    try:
        async with asyncio.timeout(5):
            await sent.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return len(seen)


async def test_watch_leaves_a_failing_endpoint_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(kv.ha.etcd, "WATCH_RETRY_S", 0.01)
    caplog.set_level(logging.INFO, logger="kvstore.ha")
    sent = asyncio.Event()
    fake = FakeEtcd(
        a=status(503, NO_LEADER),
        b=watch_lines({"error": {"grpc_code": 14, "message": "etcdserver: no leader"}}),
        c=watch_lines(CREATED, EVENT, sent=sent),
    )
    etcd = fake.client()
    # Reconnected after failures: once for the watch set up (changes may have been missed
    # meanwhile), once for the event.
    assert await watch_until(etcd, sent) == 2
    assert fake.asked == [A, B, C]
    assert etcd.current == C, "the other calls leave the failed endpoints too"
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert messages == [
        (
            "WARNING",
            "watching etcd at http://a.test:2379 failed (answered HTTP 503 with an error: "
            "etcdserver: no leader); trying http://b.test:2379",
        ),
        ("INFO", "watching etcd at http://c.test:2379 again"),
    ]


async def test_a_watch_set_up_at_once_reports_only_changes() -> None:
    sent = asyncio.Event()
    fake = FakeEtcd(a=watch_lines(CREATED, EVENT, EVENT, sent=sent), b=refused, c=refused)
    etcd = fake.client()
    assert await watch_until(etcd, sent) == 2
    assert fake.asked == [A]


async def test_a_watch_etcd_cancels_or_ends_is_left_for_the_next_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kv.ha.etcd, "WATCH_RETRY_S", 0.01)
    sent = asyncio.Event()
    cancelled = {"result": {"header": HEADER, "canceled": True, "cancel_reason": "compacted"}}
    fake = FakeEtcd(
        a=watch_lines(CREATED, cancelled),
        b=watch_lines(CREATED),
        c=watch_lines(CREATED, EVENT, sent=sent),
    )
    # b's watch was set up after a failed (a change may have been missed), then ended; c's
    # after b ended, then one event.
    assert await watch_until(fake.client(), sent) == 3
    assert fake.asked == [A, B, C]
