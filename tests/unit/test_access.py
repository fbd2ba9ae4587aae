"""Tokens, roles and prefixes (kv/core/access.py), and which route needs what (kv/web/access.py)."""

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from kv.core.access import Grant, Policy, Role, token_digest
from kv.network.tls import connection_tls
from kv.settings import FollowerSettings, describe_errors
from kv.web.access import Need, need, presented_token, warn_if_open

WRITER = "writer-token-1"
READER = "reader-token-2"
ADMIN = "admin-token-3"

AUTH_TOML = f"""
[[tokens]]
name = "app1-writer"
sha256 = "{token_digest(WRITER)}"
role = "readwrite"
prefixes = ["app1/"]

[[tokens]]
name = "reader"
sha256 = "{token_digest(READER).upper()}"
role = "read"

[[tokens]]
name = "ops"
sha256 = "{token_digest(ADMIN)}"
role = "admin"
"""


def test_a_token_is_known_by_its_hash_and_nothing_else():
    policy = Policy.from_toml(AUTH_TOML)
    writer = policy.identify(WRITER.encode())
    assert writer is not None and writer.name == "app1-writer" and writer.role is Role.READWRITE
    reader = policy.identify(READER.encode())
    assert reader is not None and reader.name == "reader"  # an upper-case digest works too
    assert policy.identify(b"") is None
    assert policy.identify(token_digest(WRITER).encode()) is None  # the hash is not a token
    assert policy.identify(WRITER[:-1].encode()) is None


def test_roles_include_the_ones_below_them():
    admin = Grant("a", "0" * 64, Role.ADMIN)
    reader = Grant("r", "1" * 64, Role.READ)
    assert admin.may(Role.READ) and admin.may(Role.READWRITE) and admin.may(Role.ADMIN)
    assert reader.may(Role.READ) and not reader.may(Role.READWRITE)


def test_prefixes_limit_keys_and_what_a_list_shows():
    grant = Grant("w", "0" * 64, Role.READWRITE, ("app1/", "shared/"))
    assert grant.allows(Role.READWRITE, "app1/x") and grant.allows(Role.READ, "shared/y")
    assert not grant.allows(Role.READ, "app2/x")
    assert not grant.allows(Role.READ, "app1")  # the prefix, not a key that begins it
    assert grant.visible(["a", "app1/b", "app2/c", "shared/d"]) == ["app1/b", "shared/d"]
    assert Grant("all", "0" * 64, Role.READ).visible(["a", "b"]) == ["a", "b"]


def test_a_refusal_names_the_token_and_what_it_lacks_never_the_token_itself():
    grant = Grant("app1-writer", token_digest(WRITER), Role.READ, ("app1/",))
    assert "role read" in grant.why_not(Role.READWRITE) and "readwrite" in grant.why_not(
        Role.READWRITE
    )
    message = Grant("app1-writer", token_digest(WRITER), Role.READWRITE, ("app1/",)).why_not(
        Role.READ, "app2/x"
    )
    assert "'app1/'" in message and "'app2/x'" in message
    assert WRITER not in message and token_digest(WRITER) not in message


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("not toml [", "is not valid TOML"),
        ("", "at least one [[tokens]]"),
        ("[[tokens]]\nsha256 = '" + "0" * 64 + "'\nrole = 'read'", "needs a name"),
        ("[[tokens]]\nname = 'x'\nsha256 = 'abc'\nrole = 'read'", "64 hex digits"),
        ("[[tokens]]\nname = 'x'\nsha256 = '" + "0" * 64 + "'\nrole = 'root'", "not one of"),
        ("[[tokens]]\nname = 'x'\nsha256 = '" + "0" * 64 + "'", "needs a role"),
        (
            "[[tokens]]\nname = 'x'\nsha256 = '" + "0" * 64 + "'\nrole = 'read'\nprefixes = []",
            "prefixes is empty",
        ),
        (
            "[[tokens]]\nname = 'x'\nsha256 = '" + "0" * 64 + "'\nrole = 'read'\ntoken = 's'",
            "unknown fields: token",
        ),
        (
            "[[tokens]]\nname = 'x'\nsha256 = '" + "0" * 64 + "'\nrole = 'read'\n"
            "[[tokens]]\nname = 'x'\nsha256 = '" + "1" * 64 + "'\nrole = 'read'",
            "more than once",
        ),
    ],
)
def test_a_bad_auth_file_says_what_is_wrong(text: str, says: str):
    with pytest.raises(ValueError, match=None) as raised:
        Policy.from_toml(text)
    assert says in str(raised.value)


def test_a_bad_auth_file_stops_the_node_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    auth = tmp_path / "auth.toml"
    auth.write_text("[[tokens]]\nname = 'x'\nsha256 = 'nope'\nrole = 'read'\n")
    monkeypatch.setenv("AUTH_FILE", str(auth))
    with pytest.raises(ValidationError) as raised:
        FollowerSettings()
    lines = describe_errors(raised.value)
    assert any("AUTH_FILE" in line and "64 hex digits" in line for line in lines), lines
    monkeypatch.setenv("AUTH_FILE", str(tmp_path / "missing.toml"))
    with pytest.raises(ValidationError) as raised:
        FollowerSettings()
    assert any(
        "AUTH_FILE" in line and "is not a file" in line for line in describe_errors(raised.value)
    )


def test_tls_files_go_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cert = tmp_path / "node.pem"
    cert.write_text("x")
    monkeypatch.setenv("TLS_CERT_FILE", str(cert))
    with pytest.raises(ValidationError) as raised:
        FollowerSettings()
    assert any("TLS_KEY_FILE" in line for line in describe_errors(raised.value))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("method", "path", "needed"),
    [
        ("GET", "/keys", Need(Role.READ)),
        ("POST", "/keys", Need(Role.READWRITE)),
        ("GET", "/keys/app1/x", Need(Role.READ, "app1/x")),
        ("PUT", "/keys/a", Need(Role.READWRITE, "a")),
        ("DELETE", "/keys/a", Need(Role.READWRITE, "a")),
        ("GET", "/watch", Need(Role.READ)),
        ("GET", "/", Need(Role.READ)),
        ("GET", "/metrics", Need(Role.READ)),
        ("GET", "/health", Need(Role.READ)),
        ("GET", "/state", Need(Role.ADMIN)),
        ("GET", "/ui", Need(Role.ADMIN)),
        ("GET", "/ui/api/events", Need(Role.ADMIN)),
        ("GET", "/docs", Need(Role.ADMIN)),
        ("GET", "/openapi.json", Need(Role.ADMIN)),
        ("GET", "/some/new/route", Need(Role.ADMIN)),
    ],
)
def test_each_route_needs_a_role(method: str, path: str, needed: Need):
    assert need(method, path) == needed


def test_the_token_comes_from_the_header_else_the_cookie():
    def scope(*headers: tuple[bytes, bytes]) -> dict[str, object]:
        return {"type": "http", "headers": list(headers)}

    assert presented_token(scope((b"authorization", b"Bearer abc"))) == b"abc"
    assert presented_token(scope((b"authorization", b"bearer  abc "))) == b"abc"
    assert presented_token(scope((b"authorization", b"Basic abc"))) is None
    assert presented_token(scope((b"cookie", b"a=1; kv_token=xyz"))) == b"xyz"
    assert presented_token(scope()) is None


@pytest.mark.parametrize(
    ("host", "loud"),
    [("127.0.0.1", False), ("localhost", False), ("::1", False), ("0.0.0.0", True)],
)
def test_a_node_without_auth_beyond_loopback_says_so_loudly(
    host: str, loud: bool, caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.WARNING, logger="kvstore.access"):
        warn_if_open(FollowerSettings(node_name="f1"), host)
    said = [r.getMessage() for r in caplog.records if "NO AUTHENTICATION" in r.getMessage()]
    assert len(said) == (1 if loud else 0)


def test_a_connection_whose_tls_state_cannot_be_seen_is_reported_as_unknown():
    async def receive() -> dict[str, object]:  # not uvicorn's: no connection behind it
        return {"type": "http.request"}

    assert connection_tls(receive) is None
