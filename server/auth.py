"""Bearer tokens: a file of `TOKEN ROLE` lines (roles: worker, control, admin), compared in constant time."""
from __future__ import annotations

import hmac
from pathlib import Path

ROLES = ("worker", "control", "admin")


class Tokens:
    """Maps bearer tokens to roles. With no file every caller is admin (loopback development)."""

    def __init__(self, entries: dict[str, str] | None = None):
        self.entries = entries

    @classmethod
    def load(cls, path: str | Path | None) -> "Tokens":
        if path is None:
            return cls(None)
        entries = {}
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ROLES or len(parts[0]) < 16:
                raise ValueError(f"{path}:{n}: expected `TOKEN ROLE` with a token of >= 16 characters "
                                 f"and ROLE in {ROLES}")
            entries[parts[0]] = parts[1]
        return cls(entries)

    def role(self, metadata) -> str | None:
        """The caller's role from its `authorization: Bearer …` metadata, or None."""
        if self.entries is None:
            return "admin"
        given = dict(metadata or ()).get("authorization", "")
        if not given.startswith("Bearer "):
            return None
        token = given[len("Bearer "):].encode()
        found = None
        for known, role in self.entries.items():  # check every entry: time does not depend on which matched
            if hmac.compare_digest(known.encode(), token):
                found = role
        return found

    def allows(self, metadata, need: str) -> bool:
        role = self.role(metadata)
        return role == "admin" or role == need
