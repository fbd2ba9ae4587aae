"""A bad setting stops a real uvicorn process, naming the variable and the reason."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TWO = "http://127.0.0.1:9001,127.0.0.1:9002"


@pytest.mark.parametrize(
    ("role", "env", "name"),
    [
        ("leader", {"FOLLOWERS": TWO, "WRITE_QUORUM": "7"}, "WRITE_QUORUM"),
        ("leader", {"MAX_DELAY_MS": "soon"}, "MAX_DELAY_MS"),
        ("follower", {"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
    ],
)
def test_a_bad_value_stops_uvicorn_with_the_name_and_reason(role: str, env: dict, name: str):
    clean = {k: v for k, v in os.environ.items() if k not in ("FOLLOWERS", "WRITE_QUORUM")}
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", f"{role}:app", "--port", "0"],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"configuration error: {name}" in result.stderr
    assert "Traceback" not in result.stderr
