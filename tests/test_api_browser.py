"""The web page in Debian's Chromium (headless, driven by Playwright) against a real server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest
from api_support import REPO_ROOT, make_checkpoint, server_command, start_server, stop_server

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("NEPHROLITH_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO_ROOT / "test-artifacts"


def require_chromium() -> Path:
    if CHROMIUM.exists() or shutil.which(str(CHROMIUM)):
        return CHROMIUM
    message = f"Chromium not found at {CHROMIUM}; install it with `make browser` (apt package chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    require_chromium()
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("ckpt"))
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    process, port = start_server(server_command(checkpoint), log_path)
    yield f"http://127.0.0.1:{port}"
    stop_server(process)


@pytest.fixture
def page(server_url, tmp_path):
    from playwright.sync_api import sync_playwright

    foreign_requests: list[str] = []

    def only_loopback(route):
        host = urlparse(route.request.url).hostname
        if route.request.url.startswith("data:") or host == "127.0.0.1":
            route.continue_()
        else:
            foreign_requests.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        # A persistent context on an empty folder is a fresh profile for every test.
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(require_chromium()),
            headless=True,
            args=CHROMIUM_ARGS,
        )
        context.route("**/*", only_loopback)
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(120_000)
        page.goto(server_url + "/")
        yield page
        context.close()
    assert foreign_requests == [], "the page requested resources outside the server"


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def test_page_slice_verdict_and_heatmap(page, islam_subset):
    page.set_input_files("#file-input", str(islam_subset / "images" / "Stone" / "Stone- (1).jpg"))
    page.click("#submit-button")
    page.wait_for_selector("#result:not([hidden])")
    page.wait_for_function("document.getElementById('heatmap').naturalWidth > 0")

    verdict = page.text_content("#verdict")
    probability = float(page.text_content("#probability"))
    heatmap_size = page.evaluate(
        "[document.getElementById('heatmap').naturalWidth, "
        "document.getElementById('heatmap').naturalHeight]"
    )
    path = screenshot(page, "api-page-slice.png")

    assert verdict in {"stone", "no_stone"}
    assert 0.0 <= probability <= 1.0
    assert heatmap_size == [256, 256]
    assert "Done" in page.text_content("#status")
    assert path.stat().st_size > 10_000


def test_page_study_curve(page, volume_samples):
    page.set_input_files("#file-input", str(volume_samples / "example_ct_sm.nii.gz"))
    page.click("#submit-button")
    page.wait_for_selector("#study:not([hidden])")

    points = page.get_attribute("#curve polyline", "points").split()
    top_images = page.locator("#top-slices img").count()
    screenshot(page, "api-page-study.png")

    assert len(points) == 30
    assert top_images == 3
    assert page.locator("#curve circle").count() == 3


def test_page_shows_server_error(page):
    page.set_input_files(
        "#file-input",
        files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not really a png"}],
    )
    page.click("#submit-button")
    page.wait_for_selector("#status.error")

    assert "415" in page.text_content("#status")
    assert page.is_hidden("#result")
