"""Who may read or write what: bearer tokens with a role, limited to key prefixes.

Pure logic, as etcd's auth store and Consul's ACL policies keep theirs: no HTTP here.
The web layer (kv/web/access.py) finds the token in a request, asks :meth:`Policy.identify`
for its grant, and asks the grant what it allows.

The policy holds only SHA-256 digests of the tokens, so a leaked AUTH_FILE gives nobody a
token. A presented token is hashed and compared with every digest in constant time
(`hmac.compare_digest`, and no early exit), so how long a refusal takes says nothing about
which digest came close.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any


class Role(IntEnum):
    """Each role may do everything the ones below it may."""

    READ = 1
    READWRITE = 2
    ADMIN = 3

    @classmethod
    def named(cls, name: str) -> Role:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(
                f"role {name!r} is not one of {', '.join(r.name.lower() for r in cls)}"
            ) from None

    @property
    def label(self) -> str:
        return self.name.lower()


DIGEST = re.compile(r"^[0-9a-f]{64}$")


def token_digest(token: str | bytes) -> str:
    """The hex SHA-256 of a token: what AUTH_FILE holds in its place."""
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).hexdigest()


@dataclass(frozen=True, slots=True)
class Grant:
    """One `[[tokens]]` entry of AUTH_FILE."""

    name: str
    sha256: str
    role: Role
    prefixes: tuple[str, ...] | None = None
    """None: every key. Otherwise a key is allowed when it starts with one of these."""

    def may(self, role: Role) -> bool:
        return self.role >= role

    def covers(self, key: str) -> bool:
        return self.prefixes is None or key.startswith(self.prefixes)

    def allows(self, role: Role, key: str) -> bool:
        return self.may(role) and self.covers(key)

    def visible(self, keys: Iterable[str]) -> list[str]:
        """The keys among `keys` this grant may see, in their order."""
        if self.prefixes is None:
            return list(keys)
        return [key for key in keys if key.startswith(self.prefixes)]

    def why_not(self, role: Role, key: str | None = None) -> str:
        """The 403's message: what this token lacks (never the token itself)."""
        if not self.may(role):
            return (
                f"token {self.name!r} has role {self.role.label}; this needs {role.label} or above"
            )
        return (
            f"token {self.name!r} may only use keys starting with "
            + ", ".join(repr(prefix) for prefix in self.prefixes or ())
            + (f"; not {key!r}" if key is not None else "")
        )


class Policy:
    """Every token's grant, by digest."""

    def __init__(self, grants: Iterable[Grant]) -> None:
        self.grants = tuple(grants)
        names = [grant.name for grant in self.grants]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"token name {name!r} appears more than once")
        digests = [grant.sha256 for grant in self.grants]
        for grant in self.grants:
            if digests.count(grant.sha256) > 1:
                raise ValueError(f"token {grant.name!r} has the same sha256 as another token")
        self._digests = [bytes.fromhex(grant.sha256) for grant in self.grants]

    def identify(self, token: bytes) -> Grant | None:
        """The grant of `token`, or None. Every digest is compared, in constant time."""
        presented = hashlib.sha256(token).digest()
        found: Grant | None = None
        for grant, digest in zip(self.grants, self._digests, strict=True):
            if hmac.compare_digest(presented, digest):
                found = grant
        return found

    @classmethod
    def from_toml(cls, text: str) -> Policy:
        """Parse AUTH_FILE's TOML; a ValueError says which entry is wrong and why."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"is not valid TOML: {error}") from None
        unknown = set(document) - {"tokens"}
        if unknown:
            raise ValueError(f"has unknown tables or keys: {', '.join(sorted(unknown))}")
        entries = document.get("tokens")
        if not isinstance(entries, list) or not entries:
            raise ValueError("must hold at least one [[tokens]] entry")
        return cls(parse_grant(i, entry) for i, entry in enumerate(entries, start=1))

    @classmethod
    def from_file(cls, path: Path) -> Policy:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ValueError(f"cannot be read: {error.strerror or error}") from None
        return cls.from_toml(text)


GRANT_FIELDS = {"name", "sha256", "role", "prefixes"}


def parse_grant(number: int, entry: Any) -> Grant:
    where = f"[[tokens]] entry {number}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is not a table")
    unknown = set(entry) - GRANT_FIELDS
    if unknown:
        raise ValueError(f"{where} has unknown fields: {', '.join(sorted(unknown))}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where} needs a name")
    where = f"token {name!r}"
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not DIGEST.match(digest.lower()):
        raise ValueError(f"{where}: sha256 must be 64 hex digits (the SHA-256 of the token)")
    role = entry.get("role")
    if not isinstance(role, str):
        raise ValueError(f"{where} needs a role: read, readwrite or admin")
    try:
        parsed_role = Role.named(role)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    prefixes = entry.get("prefixes")
    if prefixes is not None:
        if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
            raise ValueError(f"{where}: prefixes must be a list of strings")
        if not prefixes:
            raise ValueError(f"{where}: prefixes is empty; leave it out to allow every key")
    return Grant(
        name=name,
        sha256=digest.lower(),
        role=parsed_role,
        prefixes=None if prefixes is None else tuple(prefixes),
    )
