"""The studio's browser tests' shared pieces: Playwright driving Debian's headless chromium, a page that fails
its test on any script error, and ``check(page, name)``: screenshots at 1280x800 and 390x844 into
build/screenshots/ plus axe-core (no critical or serious violations). A test module declares
``pytest_plugins = ("tests.studio_browser",)`` and takes the fixtures ``page`` and ``check``; without Debian's
chromium (or Playwright) its browser tests are skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium")
ROOT = Path(__file__).parents[1]
SHOTS = ROOT / "build" / "screenshots"
AXE = ROOT / "tests" / "assets" / "axe-core" / "axe.min.js"
SIZES = {"wide": (1280, 800), "narrow": (390, 844)}


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium (make install installs it)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, bypass_csp=True)  # axe is injected
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, errors  # no script error on any page


@pytest.fixture
def check():
    return screenshots_and_axe


def screenshots_and_axe(page, name: str, axe: bool = True) -> None:
    """Screenshots at both sizes, and axe-core: no critical or serious violations (listed in the failure).
    ``axe=False``: the screenshots only (a page that reloads itself, e.g. while a run starts)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    for size, (w, h) in SIZES.items():
        page.set_viewport_size({"width": w, "height": h})
        page.screenshot(path=str(SHOTS / f"{name}-{size}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 800})
    if not axe:
        return
    page.add_script_tag(path=str(AXE))
    violations = page.evaluate("async () => (await axe.run()).violations.map(v => ({id: v.id, impact: v.impact, "
                               "help: v.help, nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))}))")
    bad = [v for v in violations if v["impact"] in ("critical", "serious")]
    assert not bad, json.dumps(bad, indent=1)
