"""The ops console: ``GET /ops`` and its assets, static files shipped inside the package.

The page needs no key to load (it holds no data); the key is entered in the page and sent by its
script as ``Authorization: Bearer`` on every ops API call, which keep their role checks. The
files are a few kilobytes, read once when this module is imported (before any event loop runs),
so serving them never touches the disk. Each answer carries a strict Content-Security-Policy:
the page may load and call only its own origin, run no inline script and be framed by nobody.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Final

from aiohttp import hdrs, web

routes = web.RouteTableDef()

# default-src 'self' covers scripts, styles, images, fonts and fetch (connect-src); the rest
# closes what default-src does not: <base>, form targets and framing (clickjacking).
CSP: Final = "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Revalidate every load (a deploy shows at once); the ETag makes that a 304.
    hdrs.CACHE_CONTROL: "no-cache",
}
_CONSOLE: Final = resources.files("gateway.http") / "console"


class Asset:
    """One file of the console with its content type and a strong ETag of its bytes."""

    __slots__ = ("body", "content_type", "etag")

    def __init__(self, name: str, content_type: str) -> None:
        self.body = (_CONSOLE / name).read_bytes()
        self.content_type = content_type
        self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'

    async def serve(self, request: web.Request) -> web.Response:
        headers = {**_SECURITY_HEADERS, hdrs.ETAG: self.etag}
        if self.etag in request.headers.get(hdrs.IF_NONE_MATCH, ""):
            return web.Response(status=304, headers=headers)
        headers[hdrs.CONTENT_TYPE] = self.content_type
        return web.Response(body=self.body, headers=headers)


# path -> file: the page at /ops, its assets under /ops/ (absolute URLs in the page).
ASSETS: Final = {
    "/ops": Asset("ops.html", "text/html; charset=utf-8"),
    "/ops/ops.js": Asset("ops.js", "text/javascript; charset=utf-8"),
    "/ops/ops.css": Asset("ops.css", "text/css; charset=utf-8"),
    "/ops/ops.svg": Asset("ops.svg", "image/svg+xml"),
}
for _path, _asset in ASSETS.items():
    routes.get(_path)(_asset.serve)  # no @requires: open, like /healthz
