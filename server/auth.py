"""Bearer tokens: a file of `TOKEN ROLE [NAME]` lines, compared in constant time.

    s3cr3t-worker-laptop-1   worker  laptop-1     # may act only as worker id `laptop-1`
    s3cr3t-worker-pool-xyz   worker               # any worker id; each id binds to the first token that uses it
    s3cr3t-tenant-acme-abc   control acme         # tenant `acme`: sees and acts on acme's jobs only
    s3cr3t-admin-000000000   admin                # everything

Without a file every caller is admin (loopback development only: `colaflow serve` refuses a
non-loopback address without tokens and TLS unless told `--insecure`).
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

ROLES = ("worker", "control", "admin")
DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Identity:
    role: str
    name: str | None  # worker: the one id it may use (None: any); control: its tenant
    credential: str  # a fingerprint of the token: worker ids are bound to it

    @property
    def tenant(self) -> str | None:
        """The tenant whose jobs this caller sees; None for admin (all)."""
        return None if self.role == "admin" else (self.name or DEFAULT_TENANT)


class Tokens:
    """Maps bearer tokens to identities. With no file every caller is admin (loopback development)."""

    def __init__(self, entries: dict[str, tuple[str, str | None]] | None = None):
        self.entries = entries

    @classmethod
    def load(cls, path: str | Path | None) -> Tokens:
        if path is None:
            return cls(None)
        entries: dict[str, tuple[str, str | None]] = {}
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) not in (2, 3) or parts[1] not in ROLES or len(parts[0]) < 16 or \
                    (parts[1] == "admin" and len(parts) == 3):
                raise ValueError(f"{path}:{n}: expected `TOKEN ROLE [NAME]` with a token of >= 16 characters, "
                                 f"ROLE in {ROLES} (NAME: a worker id or a tenant; admin takes none)")
            entries[parts[0]] = (parts[1], parts[2] if len(parts) == 3 else None)
        return cls(entries)

    @property
    def enabled(self) -> bool:
        return self.entries is not None

    def identity(self, metadata) -> Identity | None:
        """The caller's identity from its `authorization: Bearer …` metadata, or None."""
        if self.entries is None:
            return Identity("admin", None, "anonymous")
        given = dict(metadata or ()).get("authorization", "")
        if not given.startswith("Bearer "):
            return None
        token = given[len("Bearer "):].encode()
        found = None
        for known, entry in self.entries.items():  # check every entry: time does not depend on which matched
            if hmac.compare_digest(known.encode(), token):
                found = Identity(entry[0], entry[1], hashlib.sha256(known.encode()).hexdigest()[:16])
        return found

    def role(self, metadata) -> str | None:
        identity = self.identity(metadata)
        return None if identity is None else identity.role

    def allows(self, metadata, need: str) -> bool:
        role = self.role(metadata)
        return role == "admin" or role == need
