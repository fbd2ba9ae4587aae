"""Bearer tokens against real nodes: every role against every route, and prefix limits on
reads, lists and the feed (AUTH_FILE; kv/core/access.py, kv/web/access.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kv.client import KVClient
from tests.support import require_etcd
from tests.system.tokens import auth_cluster, bearer, token, write_auth_file
from tools.cluster import HACluster, LocalCluster, Node, free_port, wait_healthy

pytestmark = pytest.mark.timeout(120)

WHO = (None, "bad", "read", "readwrite", "admin", "app1-read", "app1-write")
"""The columns of the matrix: no token, an unknown one, and each token of tests/system/tokens.py."""

OPEN = (200,) * 7
ANY_TOKEN = (401, 401, 200, 200, 200, 200, 200)
ADMIN_ONLY = (401, 401, 403, 403, 200, 403, 403)
WRITERS = (401, 401, 403, 200, 200, 403, 403)
APP1_WRITERS = (401, 401, 403, 200, 200, 403, 200)
NOBODY = (401, 401, 403, 403, 403, 403, 403)

# (node, method, path, JSON body, expected status per WHO). "leader" or "follower".
MATRIX: list[tuple[str, str, str, object, tuple[int, ...]]] = [
    ("leader", "GET", "/health", None, OPEN),
    ("leader", "GET", "/ready", None, OPEN),
    ("leader", "GET", "/primary", None, OPEN),
    ("leader", "GET", "/metrics", None, OPEN),
    ("leader", "GET", "/", None, ANY_TOKEN),
    ("leader", "GET", "/keys", None, ANY_TOKEN),
    ("leader", "GET", "/keys/app1/seed", None, ANY_TOKEN),
    ("leader", "GET", "/keys/other/seed", None, (401, 401, 200, 200, 200, 403, 403)),
    ("leader", "POST", "/keys", {"key": "app1/new", "value": 1}, APP1_WRITERS),
    ("leader", "POST", "/keys", {"key": "other/new", "value": 1}, WRITERS),
    ("leader", "PUT", "/keys/app1/put", {"value": 2}, APP1_WRITERS),
    ("leader", "PUT", "/keys/other/put", {"value": 2}, WRITERS),
    ("leader", "DELETE", "/keys/app1/absent", None, (401, 401, 403, 404, 404, 403, 404)),
    ("leader", "DELETE", "/keys/other/absent", None, (401, 401, 403, 404, 404, 403, 403)),
    ("leader", "GET", "/watch", None, ANY_TOKEN),
    ("leader", "GET", "/state", None, ADMIN_ONLY),
    ("leader", "GET", "/ui", None, ADMIN_ONLY),
    ("leader", "GET", "/ui/api/events", None, ADMIN_ONLY),
    ("leader", "GET", "/docs", None, ADMIN_ONLY),
    ("leader", "GET", "/openapi.json", None, ADMIN_ONLY),
    ("follower", "GET", "/health", None, OPEN),
    ("follower", "GET", "/ready", None, OPEN),
    ("follower", "GET", "/metrics", None, OPEN),
    ("follower", "GET", "/", None, ANY_TOKEN),
    ("follower", "GET", "/keys", None, ANY_TOKEN),
    ("follower", "GET", "/keys/app1/seed", None, ANY_TOKEN),
    ("follower", "GET", "/keys/other/seed", None, (401, 401, 200, 200, 200, 403, 403)),
    # A follower takes no writes: 403 for everyone, after the token is checked.
    ("follower", "POST", "/keys", {"key": "app1/x", "value": 1}, NOBODY),
    ("follower", "GET", "/watch", None, ANY_TOKEN),
    ("follower", "GET", "/state", None, ADMIN_ONLY),
    ("follower", "GET", "/docs", None, ADMIN_ONLY),
    # Replication's routes take the secret, never a token: 401 without it, whoever asks.
    ("follower", "POST", "/replicate", {"entries": []}, (401,) * 7),
    ("follower", "GET", "/replicate/entries", None, (401,) * 7),
]  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    folder = tmp_path_factory.mktemp("auth")
    with auth_cluster(folder) as running:
        with httpx.Client(timeout=10, trust_env=False, headers=bearer("admin")) as admin:
            for key in ("app1/seed", "other/seed"):
                answer = admin.post(f"{running.leader_url}/keys", json={"key": key, "value": 0})
                assert answer.status_code == 200, answer.text
        yield running


def status_of(client: httpx.Client, method: str, url: str, body: object, who: str | None) -> int:
    """The status of one request; a stream's status is read and the stream closed."""
    with client.stream(method, url, json=body, headers=bearer(who)) as response:
        return response.status_code


@pytest.mark.parametrize(
    ("node", "method", "path", "body", "expected"),
    MATRIX,
    ids=[f"{n}-{m}-{p}-{json.dumps(b)[:20] if b else ''}" for n, m, p, b, _ in MATRIX],
)
def test_every_role_against_every_route(cluster, node, method, path, body, expected):
    url = (cluster.leader_url if node == "leader" else cluster.follower_urls[0]) + path
    with httpx.Client(timeout=10, trust_env=False) as client:
        got = tuple(status_of(client, method, url, body, who) for who in WHO)
    assert got == expected, "\n".join(
        f"{who or 'no token'}: got {g}, expected {e}"
        for who, g, e in zip(WHO, got, expected, strict=True)
        if g != e
    )


def test_refusals_say_why_in_json(cluster):
    with httpx.Client(timeout=10, trust_env=False) as client:
        missing = client.get(f"{cluster.leader_url}/keys")
        assert missing.status_code == 401 and "Bearer" in missing.headers["www-authenticate"]
        assert "needs a token" in missing.json()["error"]
        unknown = client.get(f"{cluster.leader_url}/keys", headers=bearer("bad"))
        assert "not known" in unknown.json()["error"]
        read_only = client.post(
            f"{cluster.leader_url}/keys", json={"key": "k", "value": 1}, headers=bearer("read")
        )
        assert "role read" in read_only.json()["error"]
        outside = client.get(f"{cluster.leader_url}/keys/other/seed", headers=bearer("app1-read"))
        assert "'app1/'" in outside.json()["error"] and "'other/seed'" in outside.json()["error"]
        follower = client.post(
            f"{cluster.follower_urls[0]}/keys",
            json={"key": "k", "value": 1},
            headers=bearer("readwrite"),
        )
        assert "is a follower" in follower.json()["error"]


@pytest.mark.parametrize("node", [0, 1])
def test_a_list_shows_only_the_keys_a_token_may_see(cluster, node: int):
    url = [cluster.leader_url, cluster.follower_urls[0]][node]
    with httpx.Client(timeout=10, trust_env=False) as client:
        limited = client.get(f"{url}/keys", headers=bearer("app1-read")).json()
        full = client.get(f"{url}/keys", headers=bearer("read")).json()
    assert limited["keys"] and all(key.startswith("app1/") for key in limited["keys"])
    assert limited["count"] == len(limited["keys"])
    assert "other/seed" in full["keys"] and set(limited["keys"]) < set(full["keys"])


def watched_keys(url: str, who: str, until: str, timeout: float = 10.0) -> list[str]:
    """The keys of /watch's events from version 0 until `until`'s, as `who` sees them."""
    keys: list[str] = []
    deadline = time.monotonic() + timeout
    with (
        httpx.Client(timeout=timeout, trust_env=False) as client,
        client.stream("GET", f"{url}/watch?since_version=0", headers=bearer(who)) as stream,
    ):
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("data: "):
                keys.append(json.loads(line.removeprefix("data: "))["key"])
                if keys[-1] == until:
                    return keys
            assert time.monotonic() < deadline, f"no {until} within {timeout} s: {keys}"
    raise AssertionError(f"the stream ended before {until}: {keys}")


@pytest.mark.parametrize("node", [0, 1])
def test_the_feed_shows_only_the_keys_a_token_may_see(cluster, node: int):
    with httpx.Client(timeout=10, trust_env=False, headers=bearer("admin")) as admin:
        for key in ("other/feed", "app1/feed-end"):
            admin.post(f"{cluster.leader_url}/keys?w=2", json={"key": key, "value": 1})
    url = [cluster.leader_url, cluster.follower_urls[1]][node]
    limited = watched_keys(url, "app1-read", until="app1/feed-end")
    assert limited and all(key.startswith("app1/") for key in limited), limited
    full = watched_keys(url, "read", until="app1/feed-end")
    assert "other/feed" in full and "other/seed" in full


def test_the_page_logs_in_with_an_admin_token_and_a_cookie(cluster):
    with httpx.Client(timeout=10, trust_env=False) as browser:
        form = browser.get(f"{cluster.leader_url}/ui", headers={"Accept": "text/html"})
        assert form.status_code == 401 and "<form" in form.text and "/ui/login" in form.text
        wrong = browser.post(f"{cluster.leader_url}/ui/login", data={"token": token("read")})
        assert wrong.status_code == 403 and token("read") not in wrong.text
        assert "set-cookie" not in wrong.headers
        login = browser.post(f"{cluster.leader_url}/ui/login", data={"token": token("admin")})
        assert login.status_code == 303 and login.headers["location"] == "/ui"
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        page = browser.get(f"{cluster.leader_url}/ui")  # the client keeps the cookie
        assert page.status_code == 200 and token("admin") not in page.text
        # The page's read form reads a follower through the leader, with the same token.
        read = browser.get(
            f"{cluster.leader_url}/ui/api/read", params={"key": "app1/seed", "node": 0}
        )
        assert read.status_code == 200 and read.json()["status"] == 200, read.text


def test_with_auth_open_none_even_the_probes_need_a_token(tmp_path: Path):
    node = Node(
        "follower",
        free_port(),
        {"AUTH_FILE": str(write_auth_file(tmp_path / "auth.toml")), "AUTH_OPEN": "none"},
        tmp_path / "follower.log",
    )
    node.start()
    try:
        with httpx.Client(timeout=5, trust_env=False) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    status = client.get(f"{node.url}/health", headers=bearer("read")).status_code
                    if status == 200:
                        break
                except httpx.TransportError:
                    pass
                assert node.running and time.monotonic() < deadline, "the follower did not start"
                time.sleep(0.05)
            for path in ("/health", "/ready", "/primary", "/metrics"):
                assert client.get(node.url + path).status_code == 401, path
                assert client.get(node.url + path, headers=bearer("read")).status_code in (200, 503)
    finally:
        node.stop()


def test_without_an_auth_file_the_node_needs_no_token(tmp_path: Path):
    with (
        LocalCluster(followers=1, quorum=1, max_delay_ms=0, base_port=0, log_dir=tmp_path) as plain,
        httpx.Client(timeout=10, trust_env=False) as client,
    ):
        assert (
            client.post(f"{plain.leader_url}/keys", json={"key": "k", "value": 1}).status_code
            == 200
        )
        assert client.get(f"{plain.leader_url}/state").status_code == 200
        wait_healthy([plain.follower_urls[0]], 5)


def test_ha_nodes_elect_a_leader_and_take_tokens(tmp_path: Path):
    """HA nodes with AUTH_FILE: peers still read each other's /ha (with the secret), one
    leads, a write needs a token, and a follower's 307 leads a token holder to the leader."""
    require_etcd()
    auth = write_auth_file(tmp_path / "auth.toml")
    with HACluster(
        nodes=3, max_delay_ms=0, base_port=0, log_dir=tmp_path, extra_env={"AUTH_FILE": str(auth)}
    ) as cluster:
        wait_healthy(cluster.urls, 30)  # /health stays open (AUTH_OPEN's default)
        leader = cluster.wait_for_primary(30)
        # Primary once elected; ready once it reaches its followers (/ready stays open).
        wait_healthy([cluster.url_of(leader)], 30, path="/ready")
        follower = next(name for name in cluster.node_urls() if name != leader)
        with httpx.Client(timeout=10, trust_env=False, follow_redirects=True) as client:
            assert client.get(f"{cluster.url_of(leader)}/ha").status_code == 401
            assert client.get(f"{cluster.url_of(leader)}/ha", headers=bearer("admin")).json()[
                "is_leader"
            ]
            body = {"key": "app1/ha", "value": 1}
            assert client.post(f"{cluster.url_of(follower)}/keys", json=body).status_code == 401
            # httpx (like curl -L) drops the Authorization header when a redirect changes
            # the origin, so the token goes again to where the 307 points.
            redirect = client.post(
                f"{cluster.url_of(follower)}/keys",
                json=body,
                headers=bearer("app1-write"),
                follow_redirects=False,
            )
            assert redirect.status_code == 307, redirect.text
            assert redirect.headers["location"].startswith(cluster.url_of(leader))
            written = client.post(
                redirect.headers["location"], json=body, headers=bearer("app1-write")
            )
            assert written.status_code == 200, written.text
            # The Python client does that itself.
            with KVClient([cluster.url_of(follower)], token=token("app1-write")) as kv:
                assert kv.put("app1/ha-client", 2).acks == 2
            read = client.get(f"{cluster.url_of(follower)}/keys/app1/ha", headers=bearer("read"))
            # Acknowledged at W=2 of the leader's 2 followers: this one holds it.
            assert read.status_code == 200 and read.json()["value"] == 1, read.text
