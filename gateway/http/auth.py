"""Bearer API keys with roles; keys are compared in constant time and never logged."""

from __future__ import annotations

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
        self._keys = [(k.key.encode(), k.role) for k in api_keys]

    def roles_of(self, header: str | None) -> frozenset[str]:
        if not header or not header.startswith(_BEARER):
            raise Unauthorized("send 'Authorization: Bearer <key>'")
        presented = header[len(_BEARER) :].strip().encode()
        roles = set()
        # Compare against every key, match or not, so timing says nothing about which matched.
        for key, role in self._keys:
            if hmac.compare_digest(presented, key):
                roles.add(role)
        if not roles:
            raise Unauthorized("unknown API key")
        return frozenset(roles)

    def require(self, header: str | None, role: str) -> None:
        if role not in self.roles_of(header):
            raise Forbidden(f"this endpoint needs a key with role {role!r}", role=role)
