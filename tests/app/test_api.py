"""The HTTP contract of both roles, served in-process (no sockets)."""

import asyncio
import json
from urllib.parse import quote

import pytest

from kv.settings import DEVELOPMENT_SECRET
from kv.web.auth import SECRET_HEADER
from kv.web.schemas import WriteResponse
from tests.app.inprocess import ControlledTransport, InProcessCluster, in_process_cluster
from tests.support import eventually

ODD_KEYS = [
    "with space",
    "line\nbreak",
    "ünïcødé ключ",
    "a/b/c",
    "what?",
    "100%",
    "#hash",
    "%2F",
    " lead",
    "...",
]


async def test_write_is_read_back_from_every_node(cluster: InProcessCluster):
    response = await cluster.leader.post("/keys?w=3", json={"key": "colour", "value": ["blue", 1]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["acks"] == 3 and body["write_quorum"] == 3 and body["version"] == 1
    assert {r["follower"] for r in body["replication"]} == {
        f"http://follower{i}.test" for i in range(3)
    }
    for node in [cluster.leader, *cluster.followers]:
        read = await node.get("/keys/colour")
        assert read.json() == {"key": "colour", "value": ["blue", 1], "version": 1}


@pytest.mark.parametrize("value", [None, 0, "x", [1, {"a": None}], {"nested": {"ü": 1.5}}])
async def test_write_response_matches_its_documented_model(cluster: InProcessCluster, value):
    response = await cluster.leader.post("/keys?w=2", json={"key": "k", "value": value})
    assert response.headers["content-type"] == "application/json"
    body = WriteResponse.model_validate_json(response.content)
    assert (body.key, body.value, body.deleted, body.write_quorum) == ("k", value, False, 2)
    assert set(response.json()) == set(WriteResponse.model_fields)
    deletion = await cluster.leader.delete("/keys/k")
    body = WriteResponse.model_validate_json(deletion.content)
    assert (body.value, body.deleted, body.version) == (None, True, 2)


@pytest.mark.parametrize("key", ODD_KEYS)
async def test_any_key_can_be_written_read_overwritten_and_deleted(
    cluster: InProcessCluster, key: str
):
    path = "/keys/" + quote(key, safe="")
    assert (await cluster.leader.post("/keys", json={"key": key, "value": 1})).status_code == 200
    assert (await cluster.leader.get(path)).json()["value"] == 1
    assert (await cluster.followers[0].get(path)).json()["key"] == key
    put = await cluster.leader.put(path, json={"value": 2})
    assert put.status_code == 200 and put.json()["key"] == key
    assert (await cluster.followers[1].get(path)).json()["value"] == 2
    assert (await cluster.leader.get("/keys")).json() == {"keys": [key], "count": 1}
    delete = await cluster.leader.delete(path)
    assert delete.status_code == 200 and delete.json()["deleted"] is True
    for node in [cluster.leader, *cluster.followers]:
        assert (await node.get(path)).status_code == 404


async def test_delete_of_missing_key_is_404_and_assigns_no_version(cluster: InProcessCluster):
    response = await cluster.leader.delete("/keys/nothing-here")
    assert response.status_code == 404
    assert "nothing-here" in response.json()["error"]
    assert (await cluster.leader.get("/state")).json()["last_version"] == 0


@pytest.mark.parametrize(
    ("body", "expected_status", "mentions"),
    [
        (b'{"key": "k", "value": ', 422, "not valid JSON"),
        (b"not json at all", 422, "not valid JSON"),
        (b'{"value": 1}', 422, "key"),
        (b'{"key": "k"}', 422, "value"),
        (b'{"key": "", "value": 1}', 422, "key"),
        (json.dumps({"key": "k" * 1025, "value": 1}).encode(), 422, "key"),
        (b'{"key": 5, "value": 1}', 422, "key"),
        (b'{"key": null, "value": 1}', 422, "key"),
        (b'["k", 1]', 422, "JSON object"),
        (b'{"key": "k", "value": NaN}', 422, "NaN"),
    ],
)
async def test_bad_writes_get_a_4xx_naming_the_problem_and_change_nothing(
    cluster: InProcessCluster, body: bytes, expected_status: int, mentions: str
):
    response = await cluster.leader.post(
        "/keys", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == expected_status, response.text
    assert mentions in response.json()["error"]
    for state in await cluster.states():
        assert state["store"] == {} and state["last_version"] == 0


async def test_form_encoded_body_is_told_to_send_json(cluster: InProcessCluster):
    response = await cluster.leader.post(
        "/keys",
        content=b'{"key":"k","value":1}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 422
    assert "Content-Type: application/json" in response.json()["error"]


async def test_value_over_the_limit_is_413_and_changes_nothing():
    async with in_process_cluster(max_value_bytes=1000) as cluster:
        response = await cluster.leader.post("/keys", json={"key": "k", "value": "x" * 1000})
        assert response.status_code == 413
        assert "MAX_VALUE_BYTES" in response.json()["error"]
        put = await cluster.leader.put("/keys/k", json={"value": ["y" * 999]})
        assert put.status_code == 413
        ok = await cluster.leader.post("/keys", json={"key": "k", "value": "x" * 990})
        assert ok.status_code == 200
        assert (await cluster.leader.get("/state")).json()["last_version"] == 1


@pytest.mark.parametrize(
    "query", ["w=-1", "w=4", "w=three", "timeout_ms=0", "timeout_ms=-5", "timeout_ms=abc"]
)
async def test_out_of_range_quorum_or_timeout_is_422(cluster: InProcessCluster, query: str):
    response = await cluster.leader.post(f"/keys?{query}", json={"key": "k", "value": 1})
    assert response.status_code == 422
    assert query.split("=")[0] in response.json()["error"]
    assert (await cluster.leader.get("/state")).json()["last_version"] == 0


@pytest.mark.parametrize("w", [0, 1, 2, 3])
async def test_per_request_quorum(cluster: InProcessCluster, w: int):
    response = await cluster.leader.post(f"/keys?w={w}", json={"key": "k", "value": w})
    assert response.status_code == 200
    assert response.json()["write_quorum"] == w
    assert response.json()["acks"] >= w


async def test_follower_refuses_writes_naming_the_leader(cluster: InProcessCluster):
    node = cluster.followers[0]
    attempts = [
        await node.post("/keys", json={"key": "k", "value": 1}),
        await node.put("/keys/k", json={"value": 1}),
        await node.delete("/keys/k"),
    ]
    for response in attempts:
        assert response.status_code == 403
        assert "LEADER_URL=http://leader.test" in response.json()["error"]
    assert (await node.get("/state")).json()["last_version"] == 0


ENTRY = {"entries": [{"key": "k", "value": "v", "version": 1, "deleted": False}]}


@pytest.mark.parametrize(
    "headers", [{}, {SECRET_HEADER: "wrong"}, {SECRET_HEADER: ""}, {SECRET_HEADER: "dev"}]
)
async def test_replicate_requires_the_secret(cluster: InProcessCluster, headers: dict):
    node = cluster.followers[0]
    response = await node.post("/replicate", json=ENTRY, headers=headers)
    assert response.status_code == 401
    assert SECRET_HEADER in response.json()["error"]
    assert (await node.get("/keys/k")).status_code == 404


async def test_replicate_checks_the_secret_before_reading_the_body(cluster: InProcessCluster):
    node = cluster.followers[0]
    response = await node.post(
        "/replicate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 401
    documented = (await node.get("/openapi.json")).json()["paths"]["/replicate"]["post"]
    assert any(p["name"] == SECRET_HEADER for p in documented["parameters"])


async def test_replicate_is_idempotent(cluster: InProcessCluster):
    node = cluster.followers[0]
    headers = {SECRET_HEADER: DEVELOPMENT_SECRET}
    first = await node.post("/replicate", json=ENTRY, headers=headers)
    again = await node.post("/replicate", json=ENTRY, headers=headers)
    assert first.json()["applied"] == 1
    assert (again.json()["applied"], again.json()["stale"]) == (0, 1)
    assert (await node.get("/keys/k")).json() == {"key": "k", "value": "v", "version": 1}


async def test_health_and_info_never_show_the_secret():
    async with in_process_cluster(replication_secret="s3cret-value-xyz") as cluster:
        for node in [cluster.leader, *cluster.followers]:
            for path in ["/", "/health", "/openapi.json"]:
                response = await node.get(path)
                assert response.status_code == 200
                assert "s3cret-value-xyz" not in response.text
        health = (await cluster.leader.get("/health")).json()
        assert health["status"] == "ok" and health["role"] == "leader"
        assert health["followers"] == 3 and health["write_quorum"] == 3
        assert [r["state"] for r in health["replicas"]] == ["up"] * 3
        follower_health = (await cluster.followers[0].get("/health")).json()
        assert follower_health["role"] == "follower" and follower_health["status"] == "ok"


async def test_openapi_documents_every_model(cluster: InProcessCluster):
    schemas = (await cluster.leader.get("/openapi.json")).json()["components"]["schemas"]
    for name in ["WriteRequest", "WriteResponse", "QuorumError", "KeyValue", "StateResponse"]:
        assert name in schemas
    follower_schemas = (await cluster.followers[0].get("/openapi.json")).json()
    assert "ReplicateRequest" in follower_schemas["components"]["schemas"]


async def test_quorum_timeout_is_503_and_the_write_stays_on_the_leader():
    transports: list[ControlledTransport] = []

    def wrap(i, app):
        transports.append(ControlledTransport(app))
        transports[-1].unreachable = i > 0  # only follower 0 answers
        return transports[-1]

    async with in_process_cluster(wrap=wrap) as cluster:
        response = await cluster.leader.post(
            "/keys?w=2&timeout_ms=300", json={"key": "k", "value": 1}
        )
        assert response.status_code == 503
        body = response.json()
        assert body["acks"] <= 1 and (body["write_quorum"], body["version"]) == (2, 1)
        assert f"{body['acks']} of 2" in body["error"]
        assert (await cluster.leader.get("/keys/k")).json()["version"] == 1
        # Delivery to the rest continues: once they answer, they catch up.
        for transport in transports:
            transport.unreachable = False

        async def converged() -> bool:
            codes = [(await f.get("/keys/k")).status_code for f in cluster.followers]
            return codes == [200] * len(codes)

        await eventually(converged, timeout=5)


async def test_leader_returns_at_quorum_and_the_rest_complete_in_the_background():
    transports: list[ControlledTransport] = []

    def wrap(i, app):
        transports.append(ControlledTransport(app))
        if i == 2:
            transports[-1].gate = asyncio.Event()  # held back until released
        return transports[-1]

    async with in_process_cluster(wrap=wrap) as cluster:
        response = await cluster.leader.post("/keys?w=2", json={"key": "k", "value": 1})
        assert response.status_code == 200
        assert response.json()["acks"] == 2
        assert "follower2" not in json.dumps(response.json()["replication"])
        assert (await cluster.followers[2].get("/keys/k")).status_code == 404
        gate = transports[2].gate
        assert gate is not None
        gate.set()

        async def delivered() -> bool:
            return (await cluster.followers[2].get("/keys/k")).status_code == 200

        await eventually(delivered)


async def up(cluster: InProcessCluster) -> bool:
    replicas = (await cluster.leader.get("/health")).json()["replicas"]
    return all(r["state"] == "up" for r in replicas)


async def test_failed_deliveries_are_retried_until_confirmed():
    transports: list[ControlledTransport] = []

    def wrap(i, app):
        transports.append(ControlledTransport(app))
        return transports[-1]

    async with in_process_cluster(wrap=wrap) as cluster:
        await eventually(lambda: up(cluster))
        transports[0].failures_left = 3
        response = await cluster.leader.post("/keys?w=3", json={"key": "k", "value": 1})
        assert response.status_code == 200
        attempts = {r["follower"]: r["attempts"] for r in response.json()["replication"]}
        assert attempts["http://follower0.test"] == 4
        health = (await cluster.leader.get("/health")).json()
        assert health["replicas"][0]["state"] == "up"


async def test_writes_fail_fast_while_too_few_followers_are_reachable():
    transports: list[ControlledTransport] = []

    def wrap(i, app):
        transports.append(ControlledTransport(app))
        transports[-1].unreachable = i > 0
        return transports[-1]

    async with in_process_cluster(wrap=wrap, replication_timeout_ms=30_000) as cluster:

        async def two_down() -> bool:
            replicas = (await cluster.leader.get("/health")).json()["replicas"]
            return [r["state"] for r in replicas] == ["up", "down", "down"]

        await eventually(two_down)
        started = asyncio.get_running_loop().time()
        response = await cluster.leader.post("/keys?w=2", json={"key": "k", "value": 1})
        assert asyncio.get_running_loop().time() - started < 1, "no wait for the 30 s timeout"
        assert response.status_code == 503
        assert "only 1 of 3 followers are reachable" in response.json()["error"]
        assert (await cluster.leader.post("/keys?w=1", json={"key": "k", "value": 2})).is_success


async def test_asynchronous_writes_converge(cluster: InProcessCluster):
    for i in range(20):
        response = await cluster.leader.post("/keys?w=0", json={"key": f"k{i % 3}", "value": i})
        assert response.status_code == 200 and response.json()["write_quorum"] == 0

    async def converged() -> bool:
        leader_state, *follower_states = await cluster.states()
        return all(
            (s["store"], s["versions"]) == (leader_state["store"], leader_state["versions"])
            for s in follower_states
        )

    await eventually(converged)


async def test_ready_needs_write_quorum_followers_reachable_and_health_stays_ok():
    transports: list[ControlledTransport] = []

    def wrap(i, app):
        transports.append(ControlledTransport(app))
        return transports[-1]

    async with in_process_cluster(wrap=wrap, write_quorum=2) as cluster:
        assert (await cluster.leader.get("/ready")).status_code == 200
        for transport in transports[1:]:
            transport.unreachable = True

        async def unready() -> bool:
            return (await cluster.leader.get("/ready")).status_code == 503

        await eventually(unready, timeout=5, what="/ready turning 503")
        body = (await cluster.leader.get("/ready")).json()
        assert body["ready"] is False and (body["reachable"], body["write_quorum"]) == (1, 2)
        assert body["reason"].startswith("only 1 of 3 followers are reachable")
        assert (await cluster.leader.get("/health")).status_code == 200, "liveness is separate"
        for transport in transports:
            transport.unreachable = False

        async def ready() -> bool:
            return (await cluster.leader.get("/ready")).status_code == 200

        await eventually(ready, timeout=5, what="/ready back to 200")


async def test_a_retried_write_with_an_idempotency_key_is_answered_with_the_first_write(
    cluster: InProcessCluster,
):
    headers = {"Idempotency-Key": "req-1"}
    first = await cluster.leader.post("/keys?w=3", json={"key": "k", "value": 1}, headers=headers)
    again = await cluster.leader.post("/keys?w=3", json={"key": "k", "value": 1}, headers=headers)
    assert first.status_code == again.status_code == 200, again.text
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["version"] == first.json()["version"] == 1
    assert again.json()["acks"] == 3
    assert set(first.json()) == set(WriteResponse.model_fields)  # the tag stays internal
    assert (await cluster.leader.get("/state")).json()["last_version"] == 1
    # Every follower learned the key with the entry: any of them could lead next.
    for app in cluster.follower_apps:
        assert app.state.node.store.requests.lookup("req-1") is not None


async def test_a_retried_compare_and_set_is_not_a_conflict(cluster: InProcessCluster):
    await cluster.leader.put("/keys/n", json={"value": 0})
    headers = {"Idempotency-Key": "cas-1", "If-Match": '"1"'}
    first = await cluster.leader.put("/keys/n", json={"value": 1}, headers=headers)
    again = await cluster.leader.put("/keys/n", json={"value": 1}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json()["version"] == first.json()["version"] == 2
    fresh = await cluster.leader.put(
        "/keys/n", json={"value": 1}, headers={"Idempotency-Key": "cas-2", "If-Match": '"1"'}
    )
    assert fresh.status_code == 412  # a new request is checked as usual


async def test_a_retried_delete_is_the_same_tombstone_not_a_404(cluster: InProcessCluster):
    await cluster.leader.put("/keys/gone", json={"value": 0})
    headers = {"Idempotency-Key": "del-1"}
    first = await cluster.leader.delete("/keys/gone", headers=headers)
    again = await cluster.leader.delete("/keys/gone", headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json()["deleted"] is True and again.json()["version"] == first.json()["version"]


@pytest.mark.parametrize(
    ("key", "mentions"),
    [("x" * 256, "1 to 255"), ("caf\u00e9", "ASCII"), ("reused", "different request")],
)
async def test_an_unusable_or_reused_idempotency_key_is_a_422(
    cluster: InProcessCluster, key: str, mentions: str
):
    headers = {b"Idempotency-Key": key.encode("latin-1")}
    if key == "reused":
        await cluster.leader.post("/keys", json={"key": "k", "value": 1}, headers=headers)
    response = await cluster.leader.post("/keys", json={"key": "k", "value": 2}, headers=headers)
    assert response.status_code == 422 and mentions in response.text


async def test_the_write_fast_path_and_fastapi_give_the_same_answers(cluster: InProcessCluster):
    """POST /keys is answered by kv/web/fastpath.py unless something is unusual; then by the
    FastAPI route. Both must give the same shapes and statuses."""
    plain = {"content-type": "application/json"}
    routed = {"content-type": "application/json; charset=utf-8"}  # not plain: FastAPI's route
    fast = await cluster.leader.post("/keys?w=2", content=b'{"key":"a","value":1}', headers=plain)
    slow = await cluster.leader.post("/keys?w=2", content=b'{"key":"b","value":1}', headers=routed)
    assert fast.status_code == slow.status_code == 200
    assert set(fast.json()) == set(slow.json()) == set(WriteResponse.model_fields)
    assert fast.headers["etag"] == '"1"' and slow.headers["etag"] == '"2"'
    for headers in (plain, routed):
        bad = await cluster.leader.post("/keys", content=b'{"key":""}', headers=headers)
        assert bad.status_code == 422 and "invalid request" in bad.json()["error"]
        nan = await cluster.leader.post(
            "/keys", content=b'{"key":"k","value":NaN}', headers=headers
        )
        assert nan.status_code == 422
        too_many = await cluster.leader.post(
            "/keys?w=9", content=b'{"key":"k","value":1}', headers=headers
        )
        assert too_many.status_code == 422 and "w:" in too_many.json()["error"]


async def test_an_integer_past_64_bits_comes_back_exactly(cluster: InProcessCluster):
    """Entries hold values as JSON and decode them when read: with the json module, which
    keeps big integers exact (orjson would read them as floats)."""
    big = 2**70 + 1
    written = await cluster.leader.post("/keys?w=3", json={"key": "big", "value": [big, 1.5]})
    assert written.status_code == 200 and written.json()["value"] == [big, 1.5]
    for node in [cluster.leader, *cluster.followers]:
        assert (await node.get("/keys/big")).json()["value"] == [big, 1.5]


async def test_a_page_in_lines_carries_each_entry_exactly_as_held(cluster: InProcessCluster):
    """A starting leader reads pages as lines (`format=lines`) and keeps each entry's bytes as
    its JSON; both formats must carry the same entries, values past 64 bits exactly."""
    from kv.network.delivery import parse_page

    big = 2**70 + 1
    everyone = f"w={len(cluster.followers)}"
    for key, value in [("big", [big, 1.5]), ("text", "line\nbreak"), ("gone", 1)]:
        written = await cluster.leader.post(f"/keys?{everyone}", json={"key": key, "value": value})
        assert written.status_code == 200
    assert (await cluster.leader.delete(f"/keys/gone?{everyone}")).status_code == 200
    follower = cluster.followers[0]
    pages = {}
    for format in ["json", "lines"]:
        response = await follower.get(
            f"/replicate/entries?limit=10&format={format}",
            headers={SECRET_HEADER: DEVELOPMENT_SECRET},
        )
        assert response.status_code == 200
        pages[format] = parse_page(response.headers["content-type"], response.content)
    lines = (await follower.get(
        "/replicate/entries?format=lines", headers={SECRET_HEADER: DEVELOPMENT_SECRET}
    )).content.split(b"\n")  # fmt: skip
    assert len(lines) == 1 + 3, "the fields, then one line per entry"
    held = {e.key: (e.value, e.version, e.deleted) for e in pages["json"]["entries"]}
    assert held == {e.key: (e.value, e.version, e.deleted) for e in pages["lines"]["entries"]}
    assert held["big"][0] == [big, 1.5] and held["text"][0] == "line\nbreak"
    assert held["gone"][2] is True
    assert {k: v for k, v in pages["lines"].items() if k != "entries"} == {
        k: v for k, v in pages["json"].items() if k != "entries"
    }
    bad = await follower.get(
        "/replicate/entries?format=xml", headers={SECRET_HEADER: DEVELOPMENT_SECRET}
    )
    assert bad.status_code == 422 and "format" in bad.text
