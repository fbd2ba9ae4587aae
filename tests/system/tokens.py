"""The tokens the security tests use, and an AUTH_FILE that holds only their hashes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kv.core.access import token_digest
from tools.cluster import LocalCluster

# name -> (token, role, prefixes). The tokens are long and unlike anything else in a log,
# so that the leak test can search every output for them.
TOKENS: dict[str, tuple[str, str, list[str] | None]] = {
    "read": ("tok-read-6f1d0c2a9b8e4f7d", "read", None),
    "readwrite": ("tok-readwrite-3a9c5e7b1d2f4a6c", "readwrite", None),
    "admin": ("tok-admin-8e2b4d6f0a1c3e5a", "admin", None),
    "app1-read": ("tok-app1read-1b3d5f7a9c0e2d4f", "read", ["app1/"]),
    "app1-write": ("tok-app1write-9d7b5f3a1c8e6a4b", "readwrite", ["app1/"]),
}
BAD_TOKEN = "tok-unknown-0000aaaa1111bbbb"


def token(name: str) -> str:
    return TOKENS[name][0]


def bearer(name: str | None) -> dict[str, str]:
    """The Authorization header for a token by name; None: no header; "bad": an unknown one."""
    if name is None:
        return {}
    return {"Authorization": f"Bearer {BAD_TOKEN if name == 'bad' else token(name)}"}


def write_auth_file(path: Path) -> Path:
    lines = []
    for name, (secret, role, prefixes) in TOKENS.items():
        lines += ["[[tokens]]", f'name = "{name}"', f'sha256 = "{token_digest(secret)}"']
        lines.append(f'role = "{role}"')
        if prefixes is not None:
            lines.append("prefixes = [" + ", ".join(f'"{p}"' for p in prefixes) + "]")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def auth_cluster(folder: Path, **options: Any) -> LocalCluster:
    """A leader and two followers (W=2, no delay) on free ports, taking these tokens;
    `options` override or add LocalCluster's settings."""
    settings: dict[str, Any] = {
        "followers": 2,
        "quorum": 2,
        "max_delay_ms": 0,
        "base_port": 0,
        "auth_file": write_auth_file(folder / "auth.toml"),
        "log_dir": folder,
    }
    return LocalCluster(**(settings | options))
