"""Schemathesis against both apps' OpenAPI schemas, on a real local cluster.

Bounded (50 examples per operation, a fixed seed) so it is repeatable and takes
seconds. It fails on any 5xx, any status code or content type the schema does not
document, and any response body that does not match its documented model.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.system.tokens import token, write_auth_file
from tools.cluster import LocalCluster

HERE = Path(__file__).resolve().parent
SECRET = "fuzz-secret"
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    ]
)


@pytest.fixture(scope="module", params=["plain", "auth"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Each run twice: without AUTH_FILE, and with it (the fuzzer holds an admin token)."""
    logs = tmp_path_factory.mktemp("fuzz")
    auth = write_auth_file(logs / "auth.toml") if request.param == "auth" else None
    with LocalCluster(
        followers=2, max_delay_ms=0, base_port=0, secret=SECRET, log_dir=logs, auth_file=auth
    ) as running:
        yield running


@pytest.mark.parametrize("role", ["leader", "follower"])
def test_no_server_errors_and_no_schema_violations(cluster: LocalCluster, role: str):
    url = cluster.leader_url if role == "leader" else cluster.follower_urls[0]
    auth = (
        [] if cluster.auth_file is None else ["--header", f"Authorization: Bearer {token('admin')}"]
    )
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run", f"{url}/openapi.json",
        "--header", f"X-Replication-Secret: {SECRET}",
        *auth,
        "--checks", CHECKS,
        # The coverage phase bypasses hooks; fuzzing and stateful still reach every field.
        "--phases", "examples,fuzzing,stateful",
        "--max-examples", "50",
        "--seed", "20261121",
        # No example database: stored cases from earlier runs were replayed past the hooks,
        # so the same seed failed now and then. Each run is now exactly its seed.
        "--generation-database", "none",
        "--workers", "1",
        # GET /watch and the /ui page's stream last as long as the client listens: they
        # have no end to check (tests/system/test_ui.py and test_integration.py cover them).
        "--exclude-path", "/watch",
        "--exclude-path", "/ui/api/events",
        # GET /primary takes no input, and its documented answer on every node but the
        # leader is 503, which the server-error check counts as a failure; the failover
        # tests check both its answers.
        "--exclude-path", "/primary",
        "--no-color",
    ]  # fmt: skip
    result = subprocess.run(
        command,
        cwd=HERE,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks", "PYTHONPATH": str(HERE)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    print(result.stdout[-2000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "generated" in result.stdout
