"""What reservations need from Redis beyond the availability domain's ports."""

from __future__ import annotations

from typing import Protocol

from gateway.atp.ports import ImmediateScriptRunner
from gateway.errors import GatewayError


class ReservationScripts(ImmediateScriptRunner, Protocol):
    """Runs the reservation scripts; knows the Redis timeout and what a failed call means."""

    @property
    def timeout(self) -> float:
        """The longest a Redis call may take (``GATEWAY_REDIS_TIMEOUT_SECONDS``)."""
        ...

    def failure(self, error: BaseException) -> GatewayError:
        """What a failed call answers one of the requests that shared it: the gateway error
        it means, a fresh exception for each request."""
        ...
