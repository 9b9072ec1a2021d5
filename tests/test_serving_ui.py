"""The web page, driven in system Chromium by Playwright: upload a BreastMNIST image and see
the decision and the heat map. Also: no request leaves the service (no CDN)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meddx.serving.app import create_app
from meddx.serving.auth import new_api_key
from meddx.serving.settings import ServeSettings
from serving_support import breast_png, get_package, live_server

CHROMIUM = os.environ.get("MEDDX_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def package(request):
    return get_package(request)


def _browser_or_skip():
    if not Path(CHROMIUM).is_file():
        msg = f"system Chromium not found at {CHROMIUM} (apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return pytest.importorskip("playwright.sync_api")


@pytest.mark.slow
def test_upload_shows_decision_and_heat_map(package, breast_npz, tmp_path):
    pw_api = _browser_or_skip()
    image = tmp_path / "breast_case.png"
    image.write_bytes(breast_png(breast_npz, 7))
    token, digest = new_api_key("browser")
    settings = ServeSettings(api_keys={"browser": digest}, research_use=True, warmup=False,
                             audit_log=tmp_path / "audit.jsonl")
    app = create_app([package.path], settings)
    with live_server(app) as base, pw_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_context(bypass_csp=True).new_page()  # test hooks use eval
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            response = page.goto(base + "/")
            assert "script-src 'self'" in response.headers["content-security-policy"]
            assert "research use only" in page.locator("#research").inner_text()
            page.fill("#token", token)
            page.click("#connect")
            page.wait_for_selector("#model option", state="attached", timeout=15_000)
            page.set_input_files("#file", str(image))
            page.click("#predict")
            page.wait_for_function(
                "document.getElementById('decision').textContent.length > 0", timeout=30_000)
            decision = page.locator("#decision").inner_text()
            probability = page.locator("#probability").inner_text()
            page.wait_for_function(
                "document.getElementById('heatmap').complete && "
                "document.getElementById('heatmap').naturalWidth > 0", timeout=15_000)
            heat_w = page.evaluate("document.getElementById('heatmap').naturalWidth")
            img_w = page.evaluate("document.getElementById('image').naturalWidth")
            error = page.locator("#error").inner_text()
        finally:
            browser.close()
    assert error == ""
    assert decision in ("malignant", "not malignant", "normal, benign")
    assert "%" in probability
    assert heat_w >= 224 and img_w >= 28
    outside = [u for u in requests if not u.startswith((base, "data:"))]
    assert outside == [], f"the page fetched from outside the service: {outside}"


@pytest.mark.slow
def test_page_without_token_shows_the_reason(package, tmp_path):
    pw_api = _browser_or_skip()
    _, digest = new_api_key("browser")
    settings = ServeSettings(api_keys={"browser": digest}, research_use=True, warmup=False,
                             audit_log=tmp_path / "audit.jsonl")
    with live_server(create_app([package.path], settings)) as base, \
            pw_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_context(bypass_csp=True).new_page()
            page.goto(base + "/")
            page.click("#connect")
            page.wait_for_function("document.getElementById('error').textContent.length > 0",
                                   timeout=15_000)
            text = page.locator("#error").inner_text()
        finally:
            browser.close()
    assert text.startswith("401")
