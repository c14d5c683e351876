"""Parsing ``/v1/availability`` queries: a fast path for plain ones, a thorough one for errors.

Almost every storefront query is plain ``sku=A&sku=B&location=L``; checking its raw text with one
regular expression and splitting it by hand costs a fraction of building a MultiDict and matching
each value. Anything unusual (percent-escapes, repeats, unknown names, a bad value) takes the
thorough path, which lists every problem for the 422. The fast path answers only what the
thorough one would answer the same (a property test over raw query strings holds them to it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, NamedTuple

from multidict import MultiMapping

from gateway.atp.schemas import CODE_PATTERN
from gateway.errors import ValidationFailed

MAX_SKUS: Final = 100
_CODE: Final = re.compile(CODE_PATTERN)
_PLAIN: Final = re.compile(r"[A-Za-z0-9._:\-=&]+")
_PARAMS: Final = frozenset({"sku", "location", "location_group"})


class AvailabilityQuery(NamedTuple):
    skus: list[str]
    location: str | None
    group: str | None


def parse_query(raw: str, decoded: Callable[[], MultiMapping[str]]) -> AvailabilityQuery:
    """``raw`` is the query string; ``decoded()`` parses it, called only on the slow path."""
    return _fast(raw) or _thorough(decoded())


def _fast(raw: str) -> AvailabilityQuery | None:
    if not _PLAIN.fullmatch(raw):
        return None
    skus: list[str] = []
    location = group = None
    for part in raw.split("&"):
        name, _, value = part.partition("=")
        # A second "=" belongs to the value ("sku=a=b" is SKU "a=b"), which no code allows.
        if not 1 <= len(value) <= 64 or "=" in value:
            return None
        if name == "sku":
            skus.append(value)
        elif name == "location" and location is None and group is None:
            location = value
        elif name == "location_group" and group is None and location is None:
            group = value
        else:
            return None
    if not 1 <= len(skus) <= MAX_SKUS or (location is None and group is None):
        return None
    return AvailabilityQuery(skus, location, group)


def _thorough(query: MultiMapping[str]) -> AvailabilityQuery:
    skus = query.getall("sku", [])
    errors = [
        {"field": name, "message": "unknown query parameter"} for name in query.keys() - _PARAMS
    ]
    if not 1 <= len(skus) <= MAX_SKUS:
        errors.append({"field": "sku", "message": f"give 1 to {MAX_SKUS} sku parameters"})
    errors += (
        {"field": f"sku[{i}]", "message": f"must match {CODE_PATTERN}"}
        for i, sku in enumerate(skus)
        if not _CODE.match(sku)
    )
    locations = query.getall("location", [])
    groups = query.getall("location_group", [])
    if len(locations) + len(groups) != 1:
        errors.append(
            {"field": "location", "message": "give exactly one of location or location_group"}
        )
    for name, values in (("location", locations), ("location_group", groups)):
        errors += (
            {"field": name, "message": f"must match {CODE_PATTERN}"}
            for v in values
            if not _CODE.match(v)
        )
    if errors:
        raise ValidationFailed(errors)
    return AvailabilityQuery(
        skus, locations[0] if locations else None, groups[0] if groups else None
    )
