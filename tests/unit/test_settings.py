"""Start-up validation: a bad value stops the process, naming the variable."""

import pytest
from pydantic import ValidationError

from kv.settings import FollowerSettings, LeaderSettings, describe_errors

TWO = "http://127.0.0.1:9001,127.0.0.1:9002"


def problems(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> list[str]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as raised:
        LeaderSettings()
    return describe_errors(raised.value)


def test_followers_accepts_urls_and_host_port():
    settings = LeaderSettings(followers=TWO)  # type: ignore[arg-type]
    assert settings.followers == ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]


def test_defaults():
    settings = LeaderSettings(followers=",".join(f"h{i}:80" for i in range(5)))  # type: ignore[arg-type]
    assert (settings.quorum, settings.min_delay_ms, settings.max_delay_ms) == (3, 0, 1000)
    assert settings.replication_timeout_ms == 5000
    assert settings.uses_development_secret


def test_unset_quorum_is_capped_at_the_number_of_followers():
    assert LeaderSettings(followers="a:1").quorum == 1  # type: ignore[arg-type]
    assert LeaderSettings().quorum == 0


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"FOLLOWERS": TWO, "WRITE_QUORUM": "3"}, "WRITE_QUORUM"),
        ({"FOLLOWERS": TWO, "WRITE_QUORUM": "-1"}, "WRITE_QUORUM"),
        ({"FOLLOWERS": TWO, "WRITE_QUORUM": "two"}, "WRITE_QUORUM"),
        ({"MIN_DELAY_MS": "500", "MAX_DELAY_MS": "100"}, "MIN_DELAY_MS"),
        ({"MIN_DELAY_MS": "-1"}, "MIN_DELAY_MS"),
        ({"REPLICATION_TIMEOUT_MS": "0"}, "REPLICATION_TIMEOUT_MS"),
        ({"FOLLOWERS": "ftp://x:1"}, "FOLLOWERS"),
        ({"FOLLOWERS": "host:notaport"}, "FOLLOWERS"),
        ({"FOLLOWERS": "a:1,a:1"}, "FOLLOWERS"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"REPLICATION_SECRET": ""}, "REPLICATION_SECRET"),
        ({"HEARTBEAT_TIMEOUT_MS": "0"}, "HEARTBEAT_TIMEOUT_MS"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"ACCESS_LOG": "sometimes"}, "ACCESS_LOG"),
        ({"NODE_NAME": "has spaces"}, "NODE_NAME"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], names: str
):
    assert any(line.startswith(names) for line in problems(monkeypatch, env))


def test_follower_leader_url():
    assert FollowerSettings(leader_url="leader:8000").leader_url == "http://leader:8000"
    assert FollowerSettings(leader_url="").leader_url is None
