"""Typed application state: every shared object the handlers reach, as an ``AppKey``."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from gateway.adapters.batcher import CommandBatcher
from gateway.adapters.postgres import Postgres
from gateway.adapters.redis import RedisPort
from gateway.atp.availability import AvailabilityReader
from gateway.atp.config_store import LocationConfig
from gateway.atp.events import EventApplier
from gateway.buffering.control import ErpControl
from gateway.buffering.intake import OrderIntake
from gateway.buffering.store import FlowStore
from gateway.lifecycle import Lifecycle, Readiness
from gateway.reservation.service import ReservationService
from gateway.settings import Settings

SETTINGS: Final = web.AppKey("settings", Settings)
LIFECYCLE: Final = web.AppKey("lifecycle", Lifecycle)
REDIS: Final = web.AppKey("redis", RedisPort)
BATCHER: Final = web.AppKey("batcher", CommandBatcher)
POSTGRES: Final = web.AppKey("postgres", Postgres)
READINESS: Final = web.AppKey("readiness", Readiness)
APPLIER: Final = web.AppKey("applier", EventApplier)
AVAILABILITY: Final = web.AppKey("availability", AvailabilityReader)
RESERVATIONS_SERVICE: Final = web.AppKey("reservations", ReservationService)
LOCATION_CONFIG: Final = web.AppKey("location_config", LocationConfig)
ORDER_INTAKE: Final = web.AppKey("order_intake", OrderIntake)
ERP_FLOW: Final = web.AppKey("erp_flow", FlowStore)
ERP_CONTROL: Final = web.AppKey("erp_control", ErpControl)
