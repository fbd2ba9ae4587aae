"""Log lines name their node; JSON lines are one object each."""

import json
import logging

from kv.settings import FollowerSettings, LeaderSettings, port_from_argv
from kv.web.logs import JsonFormatter, NodeName


def test_the_port_comes_from_uvicorns_command_line():
    assert port_from_argv(["uvicorn", "leader:app", "--port", "8003"]) == "8003"
    assert port_from_argv(["uvicorn", "leader:app", "--port=8004"]) == "8004"
    assert port_from_argv(["uvicorn", "leader:app"]) is None


def test_node_name_defaults_to_the_role_and_can_be_set(monkeypatch):
    monkeypatch.setattr("sys.argv", ["uvicorn", "follower:app", "--port", "8002"])
    assert FollowerSettings().name == "follower:8002"
    assert LeaderSettings(node_name="leader-a").name == "leader-a"
    monkeypatch.setattr("sys.argv", ["pytest"])
    assert LeaderSettings().name == "leader"


def test_a_json_line_is_one_object_with_the_node_and_the_traceback():
    record = logging.LogRecord("kvstore", logging.ERROR, __file__, 1, "failed %s", ("x",), None)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    NodeName("follower3").filter(record)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["node"] == "follower3" and parsed["message"] == "failed x"
    assert parsed["level"] == "ERROR" and "RuntimeError: boom" in parsed["exception"]
