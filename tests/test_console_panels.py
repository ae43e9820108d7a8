"""The demo console's usage and provider-key panels in a real headless Chromium, against a
twistd agentd with Redis, a monthly budget and a key-encryption key.

Screenshots of the panels go to ``$CONSOLE_SHOTS_DIR`` when it is set (for a person to look
at), else to the test's temporary directory.
"""

from __future__ import annotations

import datetime
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, Locator, Page, Playwright, expect, sync_playwright

from agentd.keys.sealing import generate_kek
from agentd.usage.layout import user_day_key
from tests.harness import token
from tests.servers import RedisServer, agent_command
from tests.test_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    Agentd,
    Console,
    running_agentd,
    wrongly_signed_token,
)

pytestmark = pytest.mark.slow

BUDGET_USD = 10.0
DESKTOP = {"width": 1280, "height": 800}
NARROW = {"width": 390, "height": 844}
FIRST_KEY = "sk-ant-console-first-0123456789abcdWXYZ"
SECOND_KEY = "sk-ant-console-second-9876543210zyxwQRST"


@pytest.fixture
def agentd(tmp_path: Path, redis_server: RedisServer) -> Iterator[Agentd]:
    """agentd with Redis for usage and user keys, a 10 USD monthly budget, and the echo agent."""
    config = (
        f"[agents]\ncommand = {json.dumps(agent_command())}\n"
        f'[redis]\nurl = "{redis_server.url}"\ntimeout_ms = 500\n'
        f'[usage]\nspool_dir = "{tmp_path / "spool"}"\nmonthly_budget_usd = {BUDGET_USD}\n'
        '[keys]\nencryption_keys = ["env:TEST_CONSOLE_KEK"]\n'
    )
    with running_agentd(tmp_path, config, {"TEST_CONSOLE_KEK": generate_kek()}) as running:
        yield running


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@contextmanager
def chromium(
    playwright: Playwright, profile: Path, viewport: dict[str, int]
) -> Iterator[BrowserContext]:
    context = playwright.chromium.launch_persistent_context(
        str(profile),
        executable_path=CHROMIUM,
        args=CHROMIUM_ARGS,
        headless=True,
        viewport=viewport,
    )
    context.set_default_timeout(15_000)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def browser(playwright: Playwright, tmp_path: Path) -> Iterator[BrowserContext]:
    with chromium(playwright, tmp_path / "chromium-profile", DESKTOP) as context:
        yield context


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    directory = Path(os.environ.get("CONSOLE_SHOTS_DIR") or tmp_path / "shots")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


class Panels(Console):
    """The console with its usage and key panels, and every message the page logged."""

    def __init__(self, page: Page) -> None:
        super().__init__(page)
        self.logged: list[str] = []
        page.on("console", lambda message: self.logged.append(message.text))
        self.usage_status = page.locator("#usage-status")
        self.keys_status = page.locator("#keys-status")
        self.keys = page.locator("#key-list .key")
        self.budget = page.locator("#budget")

    def figure(self, name: str) -> Locator:
        return self.page.locator(f"#usage-{name}")

    def tab_to(self, selector: str, key: str = "Tab", limit: int = 40) -> int:
        """Press Tab (or ``key``) until ``selector`` has focus; how many presses it took."""
        for presses in range(1, limit + 1):
            self.page.keyboard.press(key)
            if self.page.evaluate(f"document.activeElement.matches({json.dumps(selector)})"):
                return presses
        raise AssertionError(f"{selector} not reached with {limit} presses of Tab")

    def focused(self) -> str:
        return self.page.evaluate("document.activeElement.id || document.activeElement.outerHTML")

    def everything_shown(self) -> str:
        """The page's markup, its text and every form control's value."""
        return self.page.evaluate(
            """() => [
                document.documentElement.outerHTML,
                document.body.innerText,
                ...[...document.querySelectorAll("input, textarea, select")].map((e) => e.value),
            ].join("\\n")"""
        )

    def assert_never_shows(self, secret: str) -> None:
        for text in (self.everything_shown(), "\n".join(self.logged)):
            assert secret not in text
            assert secret[:-4] not in text


def api(agentd: Agentd, path: str, user: str = "alice") -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{agentd.port}{path}",
        headers={"Authorization": f"Bearer {token(user)}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def seed_spend(redis: RedisServer, usd: float, user: str = "alice") -> None:
    """Earlier usage this month, as recordings leave it in today's day hash."""
    key = user_day_key(user, datetime.datetime.now(datetime.UTC).date())
    redis.cli("HINCRBY", key, "cost", str(round(usd * 1_000_000)))
    redis.cli("HINCRBY", key, "queries", "3")
    redis.cli("HINCRBY", key, "input_tokens", "41250")
    redis.cli("HINCRBY", key, "output_tokens", "9630")


def open_panels(browser: BrowserContext, agentd: Agentd, jwt: str | None = None) -> Panels:
    panels = Panels(browser.new_page())
    panels.open(agentd.console_url(jwt or token()))
    return panels


def test_usage_after_two_prompts_shows_their_tokens_as_the_api_reports_them(
    agentd: Agentd, browser: BrowserContext
) -> None:
    panels = open_panels(browser, agentd)
    panels.expect_status("open")
    expect(panels.figure("queries")).to_have_text("0")
    expect(panels.budget).to_have_attribute("data-state", "ok")

    panels.send("one two three")
    expect(panels.transcript.locator(".turn").nth(0)).to_have_attribute("data-state", "done")
    # Refreshed by the done alone: nothing on the page was touched.
    expect(panels.figure("input")).to_have_text("3")
    panels.send("four five six seven eight")
    expect(panels.transcript.locator(".turn").nth(1)).to_have_attribute("data-state", "done")
    expect(panels.figure("input")).to_have_text("8")

    totals = api(agentd, "/api/usage")["totals"]
    assert (totals["input_tokens"], totals["output_tokens"], totals["queries"]) == (8, 8, 2)
    expect(panels.figure("output")).to_have_text(str(totals["output_tokens"]))
    expect(panels.figure("queries")).to_have_text(str(totals["queries"]))
    expect(panels.figure("cost")).to_have_text("$0.00")
    expect(panels.page.locator("#budget-amount")).to_have_text("$0.00 of $10.00 (0 %)")
    assert panels.errors == []


def test_the_budget_bar_shows_the_spend_the_soft_warning_and_no_budget(
    agentd: Agentd, browser: BrowserContext, redis_server: RedisServer, shots: Path
) -> None:
    seed_spend(redis_server, 7.6)
    panels = open_panels(browser, agentd)
    bar = panels.page.locator("#budget-bar")
    expect(panels.page.locator("#budget-amount")).to_have_text("$7.60 of $10.00 (76 %)")
    expect(panels.budget).to_have_attribute("data-state", "ok")
    expect(bar).to_have_attribute("aria-valuenow", "7.6")
    expect(bar).to_have_attribute("aria-valuemax", "10")
    assert bar.locator(".fill").evaluate("e => e.style.width") == "76%"

    seed_spend(redis_server, 0.8)
    panels.page.get_by_role("button", name="Refresh usage").click()
    expect(panels.page.locator("#budget-amount")).to_have_text("$8.40 of $10.00 (84 %)")
    expect(panels.budget).to_have_attribute("data-state", "warning")
    expect(panels.page.locator("#budget-note")).to_have_text(
        "Over 80 % of your budget is spent: prompts are refused once it is reached."
    )
    panels.page.screenshot(path=shots / "desktop-budget-warning.png")

    # Spent elsewhere meanwhile: the next prompt is refused, and that alone refreshes the panel.
    seed_spend(redis_server, 1.6)
    panels.expect_status("open")
    panels.send("one more")
    expect(panels.transcript.locator(".turn .meta")).to_contain_text("quota_exceeded")
    expect(panels.budget).to_have_attribute("data-state", "reached")
    expect(bar).to_have_attribute("aria-valuenow", "10")
    assert bar.locator(".fill").evaluate("e => e.style.width") == "100%"
    panels.page.screenshot(path=shots / "desktop-budget-reached.png")

    redis_server.cli("HSET", "{usage}:budgets", "user:alice", "0")
    panels.page.get_by_role("button", name="Refresh usage").click()
    expect(panels.budget).to_have_attribute("data-state", "none")
    expect(panels.page.locator("#budget-amount")).to_have_text("none set")
    expect(panels.page.locator("#budget-note")).to_be_empty()
    expect(bar).to_be_hidden()
    expect(panels.figure("cost")).to_have_text("$10.00")
    panels.page.screenshot(path=shots / "desktop-no-budget.png")
    assert panels.errors == []


def test_a_key_typed_from_the_keyboard_shows_its_last_4_and_never_the_key(
    agentd: Agentd, browser: BrowserContext
) -> None:
    panels = open_panels(browser, agentd)
    panels.expect_status("open")
    expect(panels.page.locator("#keys-empty")).to_be_visible()

    panels.tab_to("#key-provider")
    panels.page.keyboard.press("Tab")
    assert panels.focused() == "key-value"
    panels.page.keyboard.type(FIRST_KEY)
    panels.page.keyboard.press("Enter")

    expect(panels.keys_status).to_have_text("Saved the Anthropic key ending in WXYZ.")
    expect(panels.keys).to_have_count(1)
    expect(panels.keys.first.locator(".key-name")).to_have_text("Anthropic")
    expect(panels.keys.first.locator(".key-last4")).to_have_text("WXYZ")
    expect(panels.page.locator("#key-value")).to_have_value("")
    assert panels.focused() == "key-value"
    assert [(k["provider"], k["last4"]) for k in api(agentd, "/api/keys")["keys"]] == [
        ("anthropic", "WXYZ")
    ]
    panels.assert_never_shows(FIRST_KEY)
    assert panels.errors == []


def test_replacing_a_key_shows_the_new_last_4_and_deleting_it_removes_it(
    agentd: Agentd, browser: BrowserContext
) -> None:
    panels = open_panels(browser, agentd)
    panels.page.get_by_label("API key").fill(FIRST_KEY)
    panels.page.get_by_label("API key").press("Enter")
    expect(panels.keys.first.locator(".key-last4")).to_have_text("WXYZ")

    # Back from the key field, where Enter left the focus.
    panels.tab_to("button[aria-label='Replace the Anthropic key']", key="Shift+Tab")
    panels.page.keyboard.press("Enter")
    assert panels.focused() == "key-value"
    expect(panels.page.locator("#key-save")).to_have_text("Replace key")
    panels.page.keyboard.type(SECOND_KEY)
    panels.page.keyboard.press("Enter")

    expect(panels.keys_status).to_have_text("Replaced the Anthropic key ending in QRST.")
    expect(panels.keys).to_have_count(1)
    expect(panels.keys.first.locator(".key-last4")).to_have_text("QRST")
    assert api(agentd, "/api/keys")["keys"][0]["last4"] == "QRST"

    panels.tab_to("button[aria-label='Delete the Anthropic key']", key="Shift+Tab")
    panels.page.keyboard.press("Enter")
    expect(panels.keys_status).to_have_text("Deleted the Anthropic key.")
    expect(panels.keys).to_have_count(0)
    expect(panels.page.locator("#keys-empty")).to_be_visible()
    assert panels.focused() == "keys-heading"
    assert api(agentd, "/api/keys")["keys"] == []
    panels.assert_never_shows(FIRST_KEY)
    panels.assert_never_shows(SECOND_KEY)
    assert panels.errors == []


def test_the_panels_say_why_when_redis_is_down_or_the_token_is_refused(
    agentd: Agentd, browser: BrowserContext, redis_server: RedisServer, shots: Path
) -> None:
    panels = open_panels(browser, agentd)
    expect(panels.figure("queries")).to_have_text("0")

    redis_server.stop()
    panels.page.get_by_role("button", name="Refresh usage").click()
    expect(panels.usage_status).to_contain_text(
        "Could not read usage: usage is unavailable right now; try again (HTTP 503)."
        " The figures shown are from "
    )
    expect(panels.figure("queries")).to_have_text("0")
    panels.page.get_by_label("API key").fill(FIRST_KEY)
    panels.page.get_by_role("button", name="Save key").click()
    expect(panels.keys_status).to_have_text(
        "The Anthropic key was not saved: "
        "stored keys are unavailable right now; try again (HTTP 503)."
    )
    expect(panels.page.locator("#key-value")).to_have_value("")
    panels.assert_never_shows(FIRST_KEY)
    panels.page.screenshot(path=shots / "desktop-redis-down.png")

    refused = open_panels(browser, agentd, wrongly_signed_token())
    expect(refused.usage_status).to_have_text(
        "Could not read usage: the token was refused (HTTP 401): paste a fresh one and connect."
    )
    expect(refused.keys_status).to_have_text(
        "Could not read your keys: the token was refused (HTTP 401): paste a fresh one and connect."
    )
    expect(refused.page.locator("#usage-figures")).to_be_hidden()
    assert panels.errors == refused.errors == []


def test_the_panels_sit_beside_the_chat_on_a_desktop_and_below_it_on_a_phone(
    agentd: Agentd,
    playwright: Playwright,
    redis_server: RedisServer,
    tmp_path: Path,
    shots: Path,
) -> None:
    seed_spend(redis_server, 7.9)
    for name, viewport in (("desktop", DESKTOP), ("narrow", NARROW)):
        with chromium(playwright, tmp_path / f"profile-{name}", viewport) as context:
            panels = open_panels(context, agentd)
            panels.expect_status("open")
            panels.send("How much of my budget is left this month?")
            expect(panels.transcript.locator(".turn")).to_have_attribute("data-state", "done")
            expect(panels.budget).to_have_attribute("data-state", "ok")
            # Three seeded, then one prompt per width.
            expect(panels.figure("queries")).to_have_text("4" if name == "desktop" else "5")
            layout = panels.page.evaluate(
                """() => {
                    const box = (id) => document.getElementById(id).getBoundingClientRect();
                    return {
                        overflow: document.documentElement.scrollWidth - innerWidth,
                        chat: box("conversation").toJSON(),
                        account: box("account").toJSON(),
                    };
                }"""
            )
            assert layout["overflow"] <= 0, layout
            if name == "desktop":
                assert layout["account"]["left"] >= layout["chat"]["right"], layout
                assert layout["account"]["top"] == layout["chat"]["top"], layout
            else:
                assert layout["account"]["top"] >= layout["chat"]["bottom"], layout
            full = name == "narrow"
            panels.page.screenshot(path=shots / f"{name}-usage-budget.png", full_page=full)

            panels.page.get_by_label("API key").fill(FIRST_KEY)
            panels.page.get_by_label("API key").press("Enter")
            expect(panels.keys.first.locator(".key-last4")).to_have_text("WXYZ")
            panels.page.screenshot(path=shots / f"{name}-one-key.png", full_page=full)

            assert panels.focused() == "key-value"
            panels.page.keyboard.type("sk-being-typed")
            panels.page.screenshot(path=shots / f"{name}-key-form-focused.png", full_page=full)
            panels.page.get_by_role("button", name="Delete the Anthropic key").click()
            expect(panels.keys).to_have_count(0)
            assert panels.errors == []
