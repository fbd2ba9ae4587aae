"""The /ui page in a real browser: Playwright driving Debian's chromium against a real cluster.

It writes and reads through the page's forms, freezes a follower (SIGSTOP) and requires its
card to turn `down` within 2 s, thaws it and sees it come back `up`, checks that the page
loads nothing from anywhere but the leader, and saves screenshots (KV_UI_SCREENSHOTS, or
the test's temporary folder).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kv.settings import DEVELOPMENT_SECRET
from tools.cluster import HACluster, LocalCluster

playwright_api = pytest.importorskip("playwright.async_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    if CHROMIUM is None:
        missing = (
            "Debian's chromium is not installed (apt-get install chromium); .ci/run installs it"
        )
        if os.environ.get("CI"):
            pytest.fail(missing)  # in CI a skip here would hide a broken install
        pytest.skip(missing)
    async with playwright_api.async_playwright() as playwright:
        # Playwright's own browser download cannot work here: point it at Debian's.
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


async def test_the_live_page_writes_reads_and_shows_a_frozen_follower_down(browser, tmp_path: Path):
    shots = Path(os.environ.get("KV_UI_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with LocalCluster(followers=3, quorum=2, max_delay_ms=300, base_port=0) as cluster:
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        expect = playwright_api.expect
        await page.goto(f"{cluster.leader_url}/ui")
        cards = page.locator(".card")
        await expect(cards).to_have_count(3, timeout=5000)
        for index in range(3):
            await expect(cards.nth(index)).to_have_attribute("data-state", "up", timeout=5000)

        # Write through the page at w=2, three times.
        await page.select_option("#write-w", "2")
        for i in range(3):
            await page.get_by_label("Value (JSON)").fill(f'"v{i}"')
            await page.get_by_role("button", name="Write").click()
            await expect(page.locator("#write-result")).to_contain_text(f"200: version {i + 1}")
        # Two confirmations answer the write; a third follower whose random delay ended
        # within the same few milliseconds is counted too, and the page says so.
        confirmed = re.compile(r"[23] of w=2 confirmed")
        await expect(page.locator("#write-result")).to_contain_text(confirmed)
        await expect(page.locator("#flow tr")).to_have_count(9, timeout=5000)
        await expect(page.locator("#feed li").first).to_contain_text('v3 colour = "v2"')

        # The keyboard alone: Tab from the key to the value, type, Enter submits.
        await page.focus("#write-key")
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.id") == "write-value"
        await page.keyboard.press("Control+A")
        await page.keyboard.type('"by keyboard"')
        await page.keyboard.press("Enter")
        await expect(page.locator("#write-result")).to_contain_text("200: version 4")

        # Read it back from follower 2, with and without min_version.
        await page.get_by_label("From").select_option("1")
        await page.get_by_label("Only once it has my last write").check()
        await page.get_by_role("button", name="Read").click()
        await expect(page.locator("#read-result")).to_contain_text("200 from")
        await expect(page.locator("#read-result")).to_contain_text('"by keyboard" (version 4')
        await page.get_by_label("From").select_option("-1")
        await page.get_by_label("Only once it has my last write").uncheck()
        await page.get_by_role("button", name="Read").click()
        await expect(page.locator("#read-result")).to_contain_text('200 from the leader: "by')
        await page.screenshot(path=str(shots / "ui-writes.png"), full_page=True)

        # Freeze follower 1: its card must say `down` within 2 s, then `up` after a thaw.
        cluster.pause_follower(0)
        frozen_at = time.monotonic()
        try:
            await expect(cards.nth(0)).to_have_attribute("data-state", "down", timeout=2000)
            took = time.monotonic() - frozen_at
            await expect(cards.nth(0)).to_contain_text("no answer within 500 ms")
            await page.screenshot(path=str(shots / "ui-follower-down.png"), full_page=True)
        finally:
            cluster.resume_follower(0)
        await expect(cards.nth(0)).to_have_attribute("data-state", "up", timeout=10000)
        await expect(page.locator("#connection")).to_have_text("live")
        print(f"the card turned down {took:.2f} s after SIGSTOP")

        assert DEVELOPMENT_SECRET not in await page.content(), "nothing secret on the page"
        leader = cluster.leader_url
        outside = [url for url in requested if not url.startswith(leader) and url != "data:,"]
        assert not outside, f"the page loaded from elsewhere: {outside}"
        assert not errors, errors


async def test_the_page_reconnects_after_the_leader_restarts(browser):
    with LocalCluster(followers=1, quorum=1, max_delay_ms=0, base_port=0) as cluster:
        page = await browser.new_page()
        expect = playwright_api.expect
        await page.goto(f"{cluster.leader_url}/ui")
        await expect(page.locator("#connection")).to_have_text("live", timeout=5000)
        await expect(page.locator("#summary")).to_contain_text("term 1")
        cluster.restart_leader()
        await expect(page.locator("#summary")).to_contain_text("term 2", timeout=15000)
        await expect(page.locator("#connection")).to_have_text("live")


async def test_on_ha_nodes_the_page_shows_the_leader_its_lease_and_each_election(
    browser, tmp_path: Path
):
    """Every HA node serves the page; one open on a follower shows a failover as it happens."""
    if shutil.which("etcd") is None:
        missing = "etcd is not installed (apt-get install etcd-server); .ci/run installs it"
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    shots = Path(os.environ.get("KV_UI_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with HACluster(
        nodes=4, quorum=2, max_delay_ms=100, base_port=0, scratch=tmp_path, log_dir=tmp_path
    ) as cluster:
        leader = cluster.wait_for_primary(20)
        watcher = next(m for m in cluster.members if m.name != leader)
        expect = playwright_api.expect
        on_leader = await browser.new_page()
        await on_leader.goto(f"{cluster.member(leader).url}/ui")
        await expect(on_leader.locator("#election-summary")).to_contain_text(
            f"This node ({leader}) holds the lease", timeout=5000
        )
        await expect(on_leader.locator("#election-summary")).to_contain_text(
            "s left unless renewed"
        )
        await on_leader.close()

        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await page.goto(f"{watcher.url}/ui")
        summary = page.locator("#election-summary")
        await expect(summary).to_contain_text(f"{leader} leads in term 1", timeout=5000)
        await expect(summary).to_contain_text(f"This node is {watcher.name}, a follower")
        assert await page.get_by_role("button", name="Write").is_disabled()
        cluster.kill(leader)
        await expect(summary).to_contain_text("leads in term 2", timeout=15000)
        elections = page.locator("#elections li")
        await expect(elections.first).to_contain_text("term 2:")
        await expect(elections.first).to_contain_text("s without a leader")
        await expect(elections).to_have_count(2)
        await expect(page.locator("#connection")).to_have_text("live")
        new = cluster.wait_for_primary(10)
        if new == watcher.name:  # the page's own node was promoted: the page says so
            await expect(page.locator("#summary")).to_contain_text("Leader term 2", timeout=5000)
            await expect(summary).to_contain_text(f"This node ({new}) holds the lease")
        else:
            await expect(summary).to_contain_text(f"{new} leads in term 2")
        await page.screenshot(path=str(shots / "ui-ha-election.png"), full_page=True)


async def test_with_tokens_the_page_logs_in_and_then_works_on_its_cookie(browser, tmp_path: Path):
    """AUTH_FILE set: /ui shows a login form; an admin token opens the page, whose streams
    and forms then ride on the HttpOnly cookie (a browser cannot put a header on an
    EventSource). The token appears nowhere in the page."""
    from tests.system.tokens import auth_cluster, token

    with auth_cluster(tmp_path, max_delay_ms=50) as cluster:
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        expect = playwright_api.expect
        answer = await page.goto(f"{cluster.leader_url}/ui")
        assert answer is not None and answer.status == 401
        await page.get_by_label("Token").fill(token("read"))
        await page.get_by_role("button", name="Log in").click()
        await expect(page.locator("[role=alert]")).to_contain_text("not an admin token")
        await page.get_by_label("Token").fill(token("admin"))
        await page.get_by_role("button", name="Log in").click()
        cards = page.locator(".card")
        await expect(cards).to_have_count(2, timeout=5000)
        for index in range(2):
            await expect(cards.nth(index)).to_have_attribute("data-state", "up", timeout=5000)
        await page.get_by_role("button", name="Write").click()
        await expect(page.locator("#write-result")).to_contain_text("200: version 1")
        await expect(page.locator("#feed li").first).to_contain_text("v1")
        cookies = await page.context.cookies()
        assert [c["httpOnly"] for c in cookies if c["name"] == "kv_token"] == [True]
        assert token("admin") not in await page.content()
