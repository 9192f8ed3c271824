"""API keys: random tokens, of which the server keeps only the sha256, each with a scope (read, or write).

``siamkit serve-keys create --file F --scope write`` appends a key to F (JSON, replaced atomically, readable by
its owner only) and prints the token once; ``siamkit serve --api-keys F`` then asks every /v1 request for one
(``Authorization: Bearer TOKEN`` or ``X-API-Key: TOKEN``). A write key may also read. A stolen keys file gives
no token: sha256 of 256 random bits cannot be reversed, and needs no salt or slow hash (nothing to guess).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import SiamkitError
from ..fileio import atomic_write, file_lock, lock_path

KEYS_FORMAT = "siamkit-serve-keys-v1"
SCOPES = ("read", "write")
TOKEN_PREFIX = "sk_"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class Key:
    id: str
    sha256: str
    scope: str
    created: str


class KeyRing:
    """The keys of a keys file; ``scope_of(token)`` says what a presented token may do."""

    def __init__(self, keys: list[Key]):
        self.keys = keys

    @classmethod
    def read(cls, path: str | os.PathLike) -> "KeyRing":
        path = Path(path)
        fix = f"create it with siamkit serve-keys create --file {path} --scope write"
        try:
            data = json.loads(path.read_text())
            if data.get("format") != KEYS_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            keys = [Key(k["id"], k["sha256"], k["scope"], k.get("created", "")) for k in data["keys"]]
            if any(k.scope not in SCOPES or len(k.sha256) != 64 for k in keys):
                raise ValueError("a key with an unknown scope or hash")
        except FileNotFoundError:
            raise SiamkitError(f"the API keys file {path} does not exist; {fix}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SiamkitError(f"{path} is not a siamkit API keys file ({type(e).__name__}: {e}); {fix}") from None
        if not keys:
            raise SiamkitError(f"{path} holds no API key; {fix}")
        return cls(keys)

    def scope_of(self, token: str | None) -> str | None:
        """The presented token's scope, or None if it is no key of this ring (compared in constant time)."""
        if not token:
            return None
        digest = token_hash(token)
        found = None
        for key in self.keys:  # every key compared, so the time taken says nothing about which matched
            if hmac.compare_digest(digest, key.sha256):
                found = key.scope
        return found


def create_key(path: str | os.PathLike, scope: str) -> str:
    """Add a new key of ``scope`` to the keys file at ``path`` (made if missing); returns the token, shown once."""
    if scope not in SCOPES:
        raise SiamkitError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    path = Path(path)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SiamkitError(f"cannot create the folder of {path} ({e.strerror}); pass a --file in a writable "
                           f"folder") from None
    with file_lock(lock_path(path), f"the API keys file {path}"):
        keys = KeyRing.read(path).keys if path.exists() else []
        key = Key(secrets.token_hex(4), token_hash(token), scope,
                  datetime.now(timezone.utc).isoformat(timespec="seconds"))
        data = {"format": KEYS_FORMAT, "keys": [vars(k) for k in [*keys, key]]}

        def write(f):
            os.fchmod(f.fileno(), 0o600)  # before a byte is written: the file is never readable by others
            f.write((json.dumps(data, indent=2) + "\n").encode())

        atomic_write(path, write)
    return token
