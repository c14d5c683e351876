"""The ops console (``GET /ops``) end to end in headless Chromium, against a real gateway whose
writers feed the ERP simulator over real Redis and PostgreSQL.

An operator signs in with the ops key (a wrong one is refused and asked again), changes the limit
and watches the writers follow (the page's sent/s and the simulator's own per-second counts),
pauses and watches the buffer grow, resumes, inspects and replays dead letters (one, selected,
all, each confirmed), and reads the audit, newest first. Everything is driven from the keyboard
and found by its accessible name; every page must finish without a console error (a CSP
violation is one) and without a request leaving the gateway's origin.

Chromium is Debian's (``/usr/bin/chromium``), never a downloaded one. Without it these tests skip,
unless ``CI=true``, where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from playwright.async_api import Browser, ConsoleMessage, Page, Request, async_playwright, expect

from gateway.http import console_routes
from gateway.http.console_routes import CSP
from tests.conftest import KEYS, auth
from tests.erp_flow import Client, erp_sim, gateway, received
from tests.helpers import eventually, stock

CHROMIUM: Final = "/usr/bin/chromium"
CONSOLE: Final = Path(console_routes.__file__).with_name("console")
# Where make.py asks for the screenshots to go (docs/screenshots); else a temporary folder.
SCREENSHOTS_ENV: Final = "ATP_SCREENSHOTS_DIR"
# The ERP's answer to a poisoned order: markup, which the page must show as text.
POISON_ANSWER: Final = '<img src=x onerror="window.__pwned=1">no such customer'
UI_TIMEOUT_MS: Final = 20_000


def _chromium() -> str:
    path = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if path is None:
        message = "headless Chromium missing: apt-get install chromium"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    executable = _chromium()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox"]
        )
        yield launched
        await launched.close()


# -- the ERP: the simulator behind a front that refuses poisoned orders -------------------------


class ErpFront:
    """Forwards every order to the simulator, except those whose body says ``"poison": true``,
    which it refuses with a 422 (a dead letter at once) while ``refusing`` is set."""

    def __init__(self, sim: TestClient[Any, Any]) -> None:
        self.sim = sim
        self.refusing = True
        self.app = web.Application()
        self.app.router.add_post("/orders", self.orders)

    async def orders(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.refusing and json.loads(body).get("poison") is True:
            return web.Response(status=422, text=POISON_ANSWER)
        headers = {"Idempotency-Key": request.headers["Idempotency-Key"]}
        async with self.sim.post("/orders", data=body, headers=headers) as resp:
            return web.Response(
                status=resp.status, body=await resp.read(), content_type=resp.content_type
            )


@dataclass
class Stack:
    gateway: Client
    sim: TestClient[Any, Any]
    front: ErpFront
    placed: list[str] = field(default_factory=list)

    @property
    def console_url(self) -> str:
        return str(self.gateway.make_url("/ops"))

    async def place(self, order_id: str, **extra: Any) -> None:
        body = {
            "order_id": order_id,
            "lines": [{"sku": "A", "location": "L1", "quantity": 1}],
            # A customer each: no order waits for another's.
            "order": {"customer_id": order_id, **extra},
        }
        resp = await self.gateway.post("/v1/orders", json=body, headers=auth("storefront"))
        assert resp.status == 202, await resp.text()
        self.placed.append(order_id)

    async def per_second(self) -> dict[int, int]:
        """Orders the simulator accepted in each wall-clock second."""
        got = await (await self.sim.get("/_sim/per_second")).json()
        return {int(second): count for second, count in got["seconds"].items()}

    async def accepted(self) -> int:
        return int((await received(self.sim))["accepted"])

    @contextlib.asynccontextmanager
    async def orders_flowing(self, per_second: float) -> AsyncIterator[None]:
        """Storefront orders placed at ``per_second`` until the block ends."""

        async def feed() -> None:
            loop = asyncio.get_running_loop()
            start, n = loop.time(), 0
            while True:
                await self.place(f"o{n}")
                n += 1
                await asyncio.sleep(max(0.0, start + n / per_second - loop.time()))

        task = asyncio.create_task(feed())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # the one cancelled here
                await task


@pytest.fixture
async def stack(
    redis_url: str, postgres_dsn: str, redis: aioredis.Redis, pg: asyncpg.Connection
) -> AsyncIterator[Stack]:
    async with erp_sim() as sim:
        front = ErpFront(sim)
        async with (
            TestClient(TestServer(front.app)) as front_client,
            gateway(
                redis_url,
                postgres_dsn,
                str(front_client.make_url("")),
                erp_rate_per_second=50.0,
                erp_burst=2,
            ) as client,
        ):
            await stock(client, A__L1=1_000_000)
            yield Stack(client, sim, front)


# -- the page ----------------------------------------------------------------------------------


@dataclass
class Watched:
    """What a page did that a test must see clean: console errors and foreign requests."""

    origin: str
    errors: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def on_request(self, request: Request) -> None:
        self.requests.append(request)

    def assert_clean(self, keys: tuple[str, ...] = (KEYS["ops"],), answered: str = "") -> None:
        """No console error but Chromium's line for each refused call whose status is in
        ``answered`` (e.g. "401|422": the refusals the test provoked); nothing fetched from
        another origin; every API call authorized by one of ``keys``."""
        expected = re.compile(rf"status of ({answered}) \(") if answered else None
        unexpected = [e for e in self.errors if not (expected and expected.search(e))]
        assert unexpected == []  # a CSP violation, an uncaught error, an unplanned 4xx/5xx
        foreign = [r.url for r in self.requests if not r.url.startswith(self.origin)]
        assert foreign == []  # no CDN, no font service: nothing but the gateway
        calls = [r for r in self.requests if "/v1/" in r.url]
        assert calls
        for request in calls:
            assert request.headers.get("authorization") in {f"Bearer {k}" for k in keys}


@contextlib.asynccontextmanager
async def console_page(browser: Browser, stack: Stack) -> AsyncIterator[tuple[Page, Watched]]:
    context = await browser.new_context(
        viewport={"width": 1280, "height": 900}, color_scheme="dark"
    )
    page = await context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    watched = Watched(str(stack.gateway.make_url("/")))
    page.on("console", watched.on_console)
    page.on("pageerror", lambda exc: watched.errors.append(f"uncaught: {exc}"))
    page.on("request", watched.on_request)
    try:
        await page.goto(stack.console_url)
        yield page, watched
    finally:
        await context.close()


async def sign_in(page: Page, key: str) -> None:
    """Type the key and press Enter: no mouse."""
    field_ = page.get_by_label("Ops API key")
    await expect(field_).to_be_focused()
    await field_.fill(key)
    await field_.press("Enter")


async def press(page: Page, name: str) -> None:
    """Reach a button by its accessible name and press it from the keyboard."""
    button = page.get_by_role("button", name=name, exact=True)
    await button.focus()
    await button.press("Enter")


async def figure(page: Page, dd_id: str) -> float:
    text = await page.locator(f"#{dd_id}").text_content() or ""
    return float(text.split()[0].replace(",", ""))


async def wait_figure(page: Page, dd_id: str, predicate: str, within_ms: int) -> None:
    """Until the shown number satisfies ``predicate`` (JS, over ``v``)."""
    await page.wait_for_function(
        f"""() => {{
            const t = document.getElementById({dd_id!r}).textContent;
            const v = Number(t.split(" ")[0].replaceAll(",", ""));
            return !Number.isNaN(v) && ({predicate});
        }}""",
        timeout=within_ms,
    )


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/ops", "text/html"),
        ("/ops/ops.js", "text/javascript"),
        ("/ops/ops.css", "text/css"),
        ("/ops/ops.svg", "image/svg+xml"),
    ],
)
async def test_the_console_is_served_without_a_key_under_a_strict_policy(
    client: Client, path: str, content_type: str
) -> None:
    resp = await client.get(path)
    assert resp.status == 200
    assert resp.content_type == content_type
    assert resp.headers["Content-Security-Policy"] == CSP
    assert CSP.startswith("default-src 'self';")
    assert "unsafe" not in CSP
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["X-Frame-Options"] == "DENY"
    again = await client.get(path, headers={"If-None-Match": resp.headers["ETag"]})
    assert again.status == 304
    assert await again.read() == b""


def test_the_page_writes_no_markup_and_runs_nothing_inline() -> None:
    """Server data reaches the page only as text; nothing inline a CSP would have to allow."""
    script = (CONSOLE / "ops.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script
    assert "new Function" not in script
    html = (CONSOLE / "ops.html").read_text()
    assert re.findall(r"<script(?![^>]*\bsrc=)", html) == []  # no inline script
    assert re.findall(r"\son[a-z]+=", html) == []  # no inline handlers
    assert " style=" not in html
    assert "<style" not in html
    assert re.findall(r"(?:src|href)=\"(?:https?:)?//", html) == []  # nothing from elsewhere


async def test_a_wrong_key_is_refused_and_asked_again(browser: Browser, stack: Stack) -> None:
    async with console_page(browser, stack) as (page, watched):
        error = page.locator("#key-error")
        await sign_in(page, "not-a-key")
        await expect(error).to_contain_text("not accepted (401)")
        await expect(page.get_by_label("Ops API key")).to_have_attribute("aria-invalid", "true")
        await expect(page.locator("#console")).to_be_hidden()
        assert await page.evaluate("sessionStorage.length") == 0
        await sign_in(page, KEYS["feed"])  # the field is focused again, its text selected
        await expect(error).to_contain_text("not an ops key (403)")
        await sign_in(page, KEYS["ops"])
        await expect(page.locator("#state")).to_have_text(re.compile("^Running"))
        await expect(page.locator("#s-rate")).to_have_text("50.0 /s")
        await expect(page.locator("#login")).to_be_hidden()
        assert await page.evaluate("localStorage.length") == 0  # the tab's storage only
        # Kept for the tab: a reload asks nothing.
        await page.reload()
        await expect(page.locator("#state")).to_have_text(re.compile("^Running"))
        await expect(page.locator("#login")).to_be_hidden()
        # A key the gateway stops accepting: back to the sign-in, saying why.
        await page.evaluate("sessionStorage.setItem('atp-ops-key', 'revoked-key')")
        await page.reload()
        await expect(error).to_contain_text("no longer accepts this key")
        await expect(page.get_by_label("Ops API key")).to_be_focused()
        assert await page.evaluate("sessionStorage.length") == 0
        await sign_in(page, KEYS["ops"])
        await press(page, "Sign out")
        await expect(page.get_by_label("Ops API key")).to_be_focused()
        assert await page.evaluate("sessionStorage.length") == 0
        keys = ("not-a-key", "revoked-key", KEYS["feed"], KEYS["ops"])
        watched.assert_clean(keys, answered="401|403")
    # Another tab (a fresh context) is asked for the key.
    async with console_page(browser, stack) as (page, _):
        await expect(page.get_by_label("Ops API key")).to_be_focused()
        await expect(page.locator("#console")).to_be_hidden()


# Visible text under 16 px, and controls without an accessible name, anywhere on the page.
_READABILITY_JS: Final = """() => {
    const visible = (el) =>
        el.getClientRects().length > 0 && getComputedStyle(el).visibility !== "hidden";
    const tiny = [];
    for (const el of document.querySelectorAll("body *")) {
        const text = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
        if (text && visible(el) && parseFloat(getComputedStyle(el).fontSize) < 16) {
            tiny.push(`${el.tagName}#${el.id}: ${getComputedStyle(el).fontSize}`);
        }
    }
    const unnamed = [];
    for (const el of document.querySelectorAll("input, button, select, textarea")) {
        const named = (el.labels && el.labels.length)
            || el.getAttribute("aria-label") || el.getAttribute("aria-labelledby")
            || (el.tagName === "BUTTON" && el.textContent.trim());
        if (!named) unnamed.push(`${el.tagName}#${el.id}`);
    }
    return {tiny, unnamed};
}"""


async def test_every_text_is_readable_and_every_control_named(
    browser: Browser, stack: Stack
) -> None:
    """Readable at 3 a.m.: no visible text under 16 px, on the sign-in and on the console with
    every part filled (dead letters, one inspected, the audit); every control labelled."""
    await stack.place("p0", poison=True)
    async with console_page(browser, stack) as (page, watched):
        assert await page.evaluate(_READABILITY_JS) == {"tiny": [], "unnamed": []}
        await sign_in(page, KEYS["ops"])
        await set_limits(page, rate="40", burst="2", concurrency="8")
        await expect(page.locator("#dl-rows tr")).to_have_count(1)
        await press(page, "Inspect order p0")
        await expect(page.locator("#audit-rows tr")).to_have_count(1)
        assert await page.evaluate(_READABILITY_JS) == {"tiny": [], "unnamed": []}
        watched.assert_clean()


async def test_the_writers_follow_a_limit_set_in_the_console(
    browser: Browser, stack: Stack
) -> None:
    async with console_page(browser, stack) as (page, watched):
        await sign_in(page, KEYS["ops"])
        await set_limits(page, rate="5", burst="1", concurrency="50")
        await expect(page.locator("#limits-result")).to_have_text("Limits applied (version 1).")
        await expect(page.locator("#s-rate")).to_have_text("5.0 /s")
        async with stack.orders_flowing(per_second=20):
            # 20 in, at most 5 + 1 out a second: the buffer grows and sent/s settles near 5.
            await wait_figure(page, "s-depth", "v >= 20", UI_TIMEOUT_MS)
            await wait_figure(page, "s-sent", "v >= 3", UI_TIMEOUT_MS)
            assert await figure(page, "s-sent") <= 5.2
            low = await stack.per_second()
            await set_limits(page, rate="15", burst="1", concurrency="50")
            raised = time.time()
            await expect(page.locator("#s-effective")).to_have_text("15.0 /s")
            await wait_figure(page, "s-sent", "v >= 12", UI_TIMEOUT_MS)
            high = await stack.per_second()
        assert max(low.values()) <= 6  # rate + burst
        after = [n for second, n in high.items() if raised + 1 <= second < max(high)]
        assert len(after) >= 3
        assert max(after) <= 16
        assert sum(after) / len(after) >= 12
        # The audit, newest first.
        rows = page.locator("#audit-rows tr")
        await expect(rows).to_have_count(2)
        await expect(rows.nth(0)).to_contain_text("rate_per_second: 5 → 15")
        await expect(rows.nth(1)).to_contain_text("rate_per_second: 50 → 5")
        watched.assert_clean()


async def test_bad_limits_show_the_servers_errors_by_field(
    browser: Browser, stack: Stack, pg: asyncpg.Connection
) -> None:
    async with console_page(browser, stack) as (page, watched):
        await sign_in(page, KEYS["ops"])
        await expect(page.locator("#s-rate")).to_have_text("50.0 /s")
        for values, bad in (
            ({"rate": "10", "burst": "0", "concurrency": "4"}, "burst"),
            ({"rate": "fast", "burst": "2", "concurrency": "4"}, "rate_per_second"),
            ({"rate": "10", "burst": "2", "concurrency": "10001"}, "max_concurrency"),
        ):
            await set_limits(page, **values)
            await expect(page.locator(f"#{bad}-error")).not_to_be_empty()
            await expect(page.locator(f"#{bad}")).to_have_attribute("aria-invalid", "true")
            await expect(page.locator(f"#{bad}")).to_be_focused()
            for other in {"rate_per_second", "burst", "max_concurrency"} - {bad}:
                await expect(page.locator(f"#{other}-error")).to_be_empty()
            await expect(page.locator("#limits-error")).to_contain_text("Not applied")
        await expect(page.locator("#s-rate")).to_have_text("50.0 /s")
        watched.assert_clean(answered="422")
    assert await pg.fetchval("SELECT count(*) FROM erp_limits") == 0
    assert await pg.fetchval("SELECT count(*) FROM ops_audit") == 0


async def test_pause_grows_the_buffer_and_resume_drains_it(browser: Browser, stack: Stack) -> None:
    async with console_page(browser, stack) as (page, watched):
        await sign_in(page, KEYS["ops"])
        async with stack.orders_flowing(per_second=20):
            await wait_figure(page, "s-sent", "v > 0", UI_TIMEOUT_MS)
            await press(page, "Pause writers")
            await expect(page.locator("#state")).to_have_text(re.compile("^PAUSED"))
            await expect(page.locator("#flow-result")).to_have_text("Writers paused.")
            await expect(page.locator("#s-effective")).to_have_text("0.0 /s")
            await asyncio.sleep(0.5)  # calls begun before the pause land
            sent = await stack.accepted()
            depth = await figure(page, "s-depth")
            await wait_figure(page, "s-depth", f"v >= {depth + 20}", UI_TIMEOUT_MS)
            assert await stack.accepted() == sent  # nothing reached the ERP meanwhile
        await press(page, "Resume writers")
        await expect(page.locator("#state")).to_have_text(re.compile("^Running"))
        await wait_figure(page, "s-depth", "v === 0", UI_TIMEOUT_MS)
        await eventually(lambda: _accepted(stack, len(stack.placed)), 10, "every order at the ERP")
        rows = page.locator("#audit-rows tr")
        await expect(rows).to_have_count(2)
        await expect(rows.nth(0)).to_contain_text("resume")
        await expect(rows.nth(0)).to_contain_text("paused: true → false")
        await expect(rows.nth(1)).to_contain_text("pause")
        watched.assert_clean()


async def test_dead_letters_are_inspected_and_replayed(browser: Browser, stack: Stack) -> None:
    async with console_page(browser, stack) as (page, watched):
        await sign_in(page, KEYS["ops"])
        for order_id in ("ok0", "p0", "p1", "p2", "ok1"):
            await stack.place(order_id, poison=order_id.startswith("p"))
        rows = page.locator("#dl-rows tr")
        await expect(rows).to_have_count(3)  # listed as the status sees them arrive
        await expect(page.locator("#s-dead")).to_have_text("3")
        # The ERP's answer is shown as the text it is, never run as markup.
        await expect(rows.nth(0)).to_contain_text(POISON_ANSWER)
        assert await page.locator("#dl-rows img").count() == 0
        assert await page.evaluate("window.__pwned") is None
        stack.front.refusing = False

        # One, from its details; a first confirmation is cancelled and changes nothing.
        await press(page, "Inspect order p0")
        await expect(page.locator("#dl-detail-title")).to_be_focused()
        await expect(page.locator("#d-error")).to_have_text(f"ERP answered 422: {POISON_ANSWER}")
        await expect(page.locator("#d-attempts")).to_have_text("1")
        # The order as it would go to the ERP again, and what it holds.
        await expect(page.locator("#d-payload")).to_contain_text('"customer_id": "p0"')
        await expect(page.locator("#d-payload")).to_contain_text('"poison": true')
        await expect(page.locator("#d-lines")).to_contain_text('"sku": "A"')
        await press(page, "Replay this order")
        dialog = page.get_by_role("dialog")
        await expect(dialog).to_contain_text("Replay order p0?")
        await expect(page.locator("#confirm-cancel")).to_be_focused()  # the safe default
        await page.keyboard.press("Enter")
        await expect(dialog).to_be_hidden()
        await expect(page.locator("#dl-result")).to_have_text("Replay cancelled.")
        await expect(rows).to_have_count(3)
        await press(page, "Replay this order")
        await confirm(page)
        await expect(page.locator("#dl-result")).to_have_text("Replayed 1.")
        await expect(rows).to_have_count(2)
        await expect(page.locator("#dl-rows")).not_to_contain_text("p0")
        await expect(page.locator("#dl-detail")).to_be_hidden()

        # Selected, with the space bar.
        pick = page.get_by_label("Select order p1")
        await pick.focus()
        await pick.press("Space")
        await expect(pick).to_be_checked()
        await press(page, "Replay selected (1)")
        await confirm(page)
        await expect(rows).to_have_count(1)
        await expect(page.locator("#dl-rows")).to_contain_text("p2")

        # All.
        await press(page, "Replay all")
        await expect(page.get_by_role("dialog")).to_contain_text("all dead letters (1 now)")
        await confirm(page)
        await expect(page.locator("#dl-empty")).to_be_visible()
        await expect(page.locator("#s-dead")).to_have_text("0")
        await eventually(lambda: _accepted(stack, 5), 10, "every order at the ERP")
        # However many refreshes the actions asked for, the status is still polled once a second.
        before = len(watched.requests)
        await asyncio.sleep(3)
        polls = [r for r in watched.requests[before:] if r.url.endswith("/v1/ops/erp")]
        assert 2 <= len(polls) <= 4

        audit = page.locator("#audit-rows tr")
        await expect(audit).to_have_count(3)
        await expect(audit.nth(0)).to_contain_text("all: 1 replayed (p2)")
        await expect(audit.nth(1)).to_contain_text("1 replayed (p1)")
        await expect(audit.nth(2)).to_contain_text("1 replayed (p0)")
        watched.assert_clean()


async def test_dead_letters_are_paged(browser: Browser, stack: Stack) -> None:
    """Twenty a page, oldest first; the second page holds the rest, and the first comes back."""
    ids = [f"dl{n:02}" for n in range(23)]
    for order_id in ids:
        await stack.place(order_id, poison=True)
    async with console_page(browser, stack) as (page, watched):
        await sign_in(page, KEYS["ops"])
        await expect(page.locator("#s-dead")).to_have_text("23")
        rows = page.locator("#dl-rows tr")
        await expect(rows).to_have_count(20)
        await expect(rows.first).to_contain_text("dl00")
        await expect(page.locator("#dl-page")).to_have_text("Page 1")
        await press(page, "Next page")
        await expect(rows).to_have_count(3)
        assert [await row.get_attribute("data-order-id") for row in await rows.all()] == ids[20:]
        await expect(page.get_by_role("button", name="Next page")).to_be_disabled()
        await expect(page.get_by_role("button", name="First page")).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(rows).to_have_count(20)
        await expect(rows.first).to_contain_text("dl00")
        watched.assert_clean()


async def test_screenshots(browser: Browser, stack: Stack, tmp_path: Path) -> None:
    """The status view, the limits form refusing a value, the dead letters with one inspected:
    to ``$ATP_SCREENSHOTS_DIR`` (``docs/screenshots/make.py``), else a temporary folder."""
    out = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
    async with console_page(browser, stack) as (page, watched):
        await sign_in(page, KEYS["ops"])
        await set_limits(page, rate="8", burst="2", concurrency="16")
        for order_id in ("ord-1001", "ord-1002"):
            await stack.place(order_id, poison=True)
        async with stack.orders_flowing(per_second=12):
            await wait_figure(page, "s-sent", "v >= 4", UI_TIMEOUT_MS)
            await wait_figure(page, "s-depth", "v >= 20", UI_TIMEOUT_MS)
            await page.locator("#status").screenshot(path=out / "status.png")
        await set_limits(page, rate="8", burst="0", concurrency="16")
        await expect(page.locator("#burst-error")).not_to_be_empty()
        await page.locator("#limits").screenshot(path=out / "limits.png")
        await press(page, "Inspect order ord-1001")
        await page.locator("#dead-letters").screenshot(path=out / "dead-letters.png")
        await press(page, "Replay this order")
        await confirm(page)
        await press(page, "Pause writers")
        await expect(page.locator("#audit-rows tr")).to_have_count(3)
        await page.locator("#audit").screenshot(path=out / "audit.png")
        watched.assert_clean(answered="422")
    for name in ("status", "limits", "dead-letters", "audit"):
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG")
        assert 1_000 < len(png) < 400_000


# -- steps -------------------------------------------------------------------------------------


async def set_limits(page: Page, *, rate: str, burst: str, concurrency: str) -> None:
    """Type the three limits and submit with Enter (once the form shows the limits in force)."""
    await expect(page.locator("#s-version")).not_to_have_text("\u2013")  # its placeholder
    await page.get_by_label("Rate (calls begun per second").fill(rate)
    await page.get_by_label("Burst (calls at once").fill(burst)
    concurrency_field = page.get_by_label("Max concurrency (calls in flight")
    await concurrency_field.fill(concurrency)
    await concurrency_field.press("Enter")


async def confirm(page: Page) -> None:
    """Confirm the open replay dialog from the keyboard: Tab from Cancel to Replay, Enter."""
    await expect(page.locator("#confirm-cancel")).to_be_focused()
    await page.keyboard.press("Tab")
    await expect(page.get_by_role("button", name="Replay", exact=True)).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("dialog")).to_be_hidden()


async def _accepted(stack: Stack, n: int) -> bool:
    return await stack.accepted() >= n
