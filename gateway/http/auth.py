"""Bearer API keys with roles; never logged, and found in time independent of the key.

A presented key is hashed (SHA-256) and looked up by digest; the digest found is then compared in
constant time. The lookup's timing depends on the digest, which an attacker cannot steer towards a
secret prefix, so timing reveals nothing about how much of a key was right; and it costs one hash
per request rather than one comparison per configured key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from aiohttp import web

from gateway.errors import Forbidden, Unauthorized
from gateway.settings import ApiKey

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_BEARER: Final = "Bearer "


class Authenticator:
    def __init__(self, api_keys: Sequence[ApiKey]) -> None:
        roles: dict[bytes, set[str]] = {}
        for k in api_keys:
            roles.setdefault(_digest(k.key), set()).add(k.role)
        self._roles = {digest: (digest, frozenset(r)) for digest, r in roles.items()}

    def roles_of(self, header: str | None) -> frozenset[str]:
        if not header or not header.startswith(_BEARER):
            raise Unauthorized("send 'Authorization: Bearer <key>'")
        digest = _digest(header[len(_BEARER) :].strip())
        found = self._roles.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            raise Unauthorized("unknown API key")
        return found[1]

    def require(self, header: str | None, role: str) -> None:
        if role not in self.roles_of(header):
            raise Forbidden(f"this endpoint needs a key with role {role!r}", role=role)


def key_fingerprint(header: str | None) -> str:
    """Who called, for an audit: the first 16 hex digits of the SHA-256 of the presented key,
    which names a key without revealing it. For handlers behind the guard, which has checked
    the key already; computed only where a handler records its caller, not per request."""
    key = header[len(_BEARER) :].strip() if header and header.startswith(_BEARER) else ""
    return _digest(key).hex()[:16]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
