"""TLS on every link, mutual TLS for replication, and no secret in any output: a cluster of
real nodes with certificates from tools/certs.py and tokens from an AUTH_FILE."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import require_etcd
from tests.system.tokens import BAD_TOKEN, TOKENS, bearer, token, write_auth_file
from tools.certs import make_certs
from tools.cluster import HACluster, LocalCluster, wait_healthy

pytestmark = pytest.mark.timeout(120)
SECRET = "repl-secret-" + "z7" * 12


@dataclass
class Secure:
    cluster: LocalCluster
    certs: Path
    other_ca: Path
    logs: Path

    def client(self, **options: object) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
        return httpx.Client(timeout=10, trust_env=False, verify=context, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    folder = tmp_path_factory.mktemp("tls")
    certs, other = folder / "certs", folder / "other-ca"
    make_certs(certs, ["leader", "follower1", "follower2", "client"])
    make_certs(other, ["leader", "client"])  # the same names, signed by another CA
    logs = folder / "logs"
    with LocalCluster(
        followers=2,
        quorum=2,
        max_delay_ms=0,
        base_port=0,
        secret=SECRET,
        certs=certs,
        auth_file=write_auth_file(folder / "auth.toml"),
        log_dir=logs,
        data_dir=folder / "data",
        extra_env={"LOG_LEVEL": "DEBUG", "LOG_FORMAT": "json", "ACCESS_LOG": "on"},
    ) as cluster:
        yield Secure(cluster, certs, other, logs)


def test_every_node_serves_https_and_replicates_over_it(secure: Secure):
    cluster = secure.cluster
    assert cluster.leader_url.startswith("https://")
    with secure.client(headers=bearer("readwrite")) as client:
        written = client.post(f"{cluster.leader_url}/keys", json={"key": "k", "value": 1})
        assert written.status_code == 200 and written.json()["acks"] == 2, written.text
        for url in cluster.follower_urls:
            assert url.startswith("https://")
            assert client.get(f"{url}/keys/k").json()["value"] == 1
        health = client.get(f"{cluster.leader_url}/health").json()
        assert [f["state"] for f in health["replicas"]] == ["up", "up"], health


@pytest.mark.parametrize("node", [0, 1])
def test_plain_http_to_a_tls_node_is_refused(secure: Secure, node: int):
    url = [secure.cluster.leader_url, secure.cluster.follower_urls[0]][node]
    with (
        httpx.Client(timeout=5, trust_env=False) as plain,
        pytest.raises(httpx.TransportError),
    ):
        plain.get(url.replace("https://", "http://") + "/health")


def test_a_client_without_the_ca_does_not_trust_the_node(secure: Secure):
    with (
        httpx.Client(timeout=5, trust_env=False) as system_cas,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        system_cas.get(f"{secure.cluster.leader_url}/health")


def replicate(secure: Secure, cert: tuple[str, str] | None) -> httpx.Response:
    """POST /replicate to a follower with the right secret, presenting `cert` (or none)."""
    context = ssl.create_default_context(cafile=str(secure.certs / "ca.pem"))
    if cert is not None:
        context.load_cert_chain(*cert)
    with httpx.Client(timeout=5, trust_env=False, verify=context) as client:
        return client.post(
            f"{secure.cluster.follower_urls[0]}/replicate",
            json={},  # no entries: a 422, once both checks pass
            headers={"X-Replication-Secret": SECRET},
        )


def test_replication_needs_a_client_certificate_from_the_cluster_ca(secure: Secure):
    own = (str(secure.certs / "client.pem"), str(secure.certs / "client-key.pem"))
    # The cluster's certificate and the secret get past both checks, to the body's own 422.
    assert replicate(secure, own).status_code == 422
    # The secret alone is not enough over TLS.
    without = replicate(secure, None)
    assert without.status_code == 401 and "client certificate" in without.json()["error"]
    # Another CA's certificate (for the same name) fails the handshake itself.
    other = (str(secure.other_ca / "leader.pem"), str(secure.other_ca / "leader-key.pem"))
    with pytest.raises(httpx.TransportError):
        replicate(secure, other)


def test_a_leader_with_another_cas_certificate_cannot_replicate(tmp_path: Path):
    """The whole path: a leader whose certificate another CA signed reaches no follower, so
    it never becomes ready; it trusts the followers, they do not trust it."""
    certs, other = tmp_path / "certs", tmp_path / "other"
    make_certs(certs, ["follower1"])
    make_certs(other, ["leader"])
    for name in ("leader.pem", "leader-key.pem"):
        (certs / name).write_bytes((other / name).read_bytes())
    cluster = LocalCluster(
        followers=1, quorum=1, max_delay_ms=0, base_port=0, certs=certs, log_dir=tmp_path
    )
    with pytest.raises(TimeoutError, match="answering /ready"):
        cluster.start(timeout=8)  # stops every node it started when it fails
    assert not any(node.running for node in cluster.nodes)


def test_kvctl_speaks_tls_with_a_token(secure: Secure):
    env = {
        **os.environ,
        "KV_ENDPOINTS": secure.cluster.leader_url,
        "KV_CACERT": str(secure.certs / "ca.pem"),
        "KV_TOKEN": token("app1-write"),
    }

    def kvctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kv", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )

    assert kvctl("put", "app1/cli", "42").returncode == 0
    got = kvctl("-o", "json", "get", "app1/cli")
    assert got.returncode == 0 and '"value": 42' in got.stdout
    refused = kvctl("put", "other/cli", "1")
    assert refused.returncode == 6 and "app1/" in refused.stderr  # 6: a refusal
    assert token("app1-write") not in refused.stderr + refused.stdout


def test_nothing_secret_leaks(secure: Secure):
    """Every output of this run (answers, headers, logs) searched for every secret it used:
    the tokens (good and bad), the replication secret and the nodes' private keys."""
    cluster = secure.cluster
    seen: list[str] = []

    def keep(response: httpx.Response) -> None:
        seen.append(response.text)
        seen.extend(f"{name}: {value}" for name, value in response.headers.items())

    urls = [cluster.leader_url, *cluster.follower_urls]
    paths = ["/", "/health", "/ready", "/primary", "/metrics", "/state", "/keys", "/keys/k",
             "/keys/app1/x", "/ui", "/ui/app.js", "/openapi.json", "/docs", "/replicate",
             "/replicate/entries", "/nope"]  # fmt: skip
    with secure.client() as client:
        for who in [None, "bad", *TOKENS]:
            headers = bearer(who)
            client.post(f"{cluster.leader_url}/keys", json={"key": "app1/x", "value": 1},
                        headers=headers)  # fmt: skip
            for url in urls:
                for path in paths:
                    keep(client.get(url + path, headers=headers))
                keep(client.post(url + "/keys", content=b"{", headers=headers))
                keep(client.post(url + "/replicate", json={"entries": []}, headers=headers))
                keep(client.post(url + "/replicate", json={}, headers={
                    **headers, "X-Replication-Secret": SECRET[:-1]}))  # fmt: skip
        keep(client.post(f"{cluster.leader_url}/ui/login", data={"token": BAD_TOKEN}))
        keep(client.post(f"{cluster.leader_url}/ui/login", data={"token": token("read")}))
        login = client.post(f"{cluster.leader_url}/ui/login", data={"token": token("admin")})
        seen.append(login.text)  # its Set-Cookie holds the admin token, by design
        keep(client.get(f"{cluster.leader_url}/ui"))  # the page, with the cookie
    logs = {path.name: path.read_text() for path in secure.logs.glob("*.log")}
    assert logs and any('"message"' in text for text in logs.values())  # JSON logs were on
    secrets = {f"token {name}": secret for name, (secret, _, _) in TOKENS.items()}
    secrets |= {"the bad token": BAD_TOKEN, "the replication secret": SECRET}
    for key in secure.certs.glob("*-key.pem"):
        body = "".join(key.read_text().splitlines()[1:-1])  # the key's base64, whole
        secrets[key.name] = body[:40]
    for what, secret in secrets.items():
        assert not [text for text in seen if secret in text], f"{what} appears in an answer"
        for name, text in logs.items():
            assert secret not in text, f"{what} appears in {name}"


def test_ha_nodes_talk_tls_to_each_other_and_to_etcd(tmp_path: Path):
    """HA nodes on HTTPS, with mutual TLS between them and to an etcd that requires a client
    certificate from the cluster's CA: one leads, a write replicates, and when the leader is
    killed another is elected through the same etcd and takes writes."""
    require_etcd()
    certs = tmp_path / "certs"
    make_certs(certs, ["node1", "node2", "node3", "etcd", "client"])
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    with HACluster(
        nodes=3, quorum=1, max_delay_ms=0, base_port=0, log_dir=tmp_path, certs=certs,
        secret=SECRET,
    ) as cluster:  # fmt: skip
        assert cluster.etcd is not None and cluster.etcd.url.startswith("https://")
        wait_healthy(cluster.urls, 30, ca=cluster.ca)
        leader = cluster.wait_for_primary(30)
        assert cluster.url_of(leader).startswith("https://")
        wait_healthy([cluster.url_of(leader)], 30, path="/ready", ca=cluster.ca)
        with httpx.Client(timeout=10, trust_env=False, verify=context) as client:
            # /ready needs as many followers reachable as the default quorum (1); a write at
            # w=2 needs both, so wait until the leader has reached both over TLS.
            deadline = time.monotonic() + 30
            while True:
                health = client.get(f"{cluster.url_of(leader)}/health").json()
                if all(r["state"] == "up" for r in health["replicas"]):
                    break
                assert time.monotonic() < deadline, health
                time.sleep(0.1)
            written = client.post(
                f"{cluster.url_of(leader)}/keys?w=2", json={"key": "k", "value": 1}
            )
            assert written.status_code == 200 and written.json()["acks"] == 2, written.text
            cluster.kill(leader)
            successor = cluster.wait_for_primary(30, exclude=[leader])
            # A new leader may answer 503 while it meets its followers: retry the same write,
            # as a client does (one Idempotency-Key: applied once).
            deadline = time.monotonic() + 15
            while True:
                again = client.post(
                    f"{cluster.url_of(successor)}/keys",
                    json={"key": "k", "value": 2},
                    headers={"Idempotency-Key": "ha-tls-again"},
                )
                if again.status_code != 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert again.status_code == 200, again.text
            assert again.json()["version"] > written.json()["version"]
            assert client.get(f"{cluster.url_of(successor)}/keys/k").json()["value"] == 2
        # Without a certificate, etcd itself refuses: the nodes got in with theirs.
        with pytest.raises(httpx.TransportError):
            httpx.post(f"{cluster.etcd.url}/v3/kv/range", json={"key": "a2V5"}, verify=context)
