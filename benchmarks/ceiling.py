"""The ceiling: a plain aiohttp + uvloop server with one JSON handler and nothing else.

Its body has the shape and size of a 1-SKU availability answer, encoded per request with orjson,
so the gateway's figures can be read as a fraction of what aiohttp itself allows on this core.

    python -m benchmarks.ceiling [PORT]        (or CEILING_PORT; default 8090)
"""

from __future__ import annotations

import os
import sys

import orjson
import uvloop
from aiohttp import web

HOST = "127.0.0.1"


async def handle(request: web.Request) -> web.Response:
    item = {
        "sku": "SKU-00042",
        "location": "DC1",
        "on_hand": 100,
        "reserved": 0,
        "committed": 0,
        "safety_stock": 0,
        "available": 100,
    }
    return web.Response(body=orjson.dumps({"items": [item]}), content_type="application/json")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/v1/availability", handle)
    app.router.add_get("/healthz", handle)
    return app


def main(argv: list[str]) -> None:
    port = int(argv[1]) if len(argv) > 1 else int(os.environ.get("CEILING_PORT", "8090"))
    uvloop.install()
    web.run_app(make_app(), host=HOST, port=port, access_log=None, print=None)


if __name__ == "__main__":
    main(sys.argv)
