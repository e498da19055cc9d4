"""The dashboard in a real browser: headless Chromium driven by selenium (Debian's chromium
and chromium-driver), over the TCP API with its token."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import require
from tests.obs.common import MiB, TcpServer
from tests.sessions.common import apply

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    require("chromium", "chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,1100"):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = DriverService(
        executable_path=shutil.which("chromedriver"), log_output=str(tmp_path / "driver.log")
    )
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def until(what: str, pred: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.1)


def non_blank(png: bytes) -> float:
    """The standard deviation of the screenshot's grey levels: near 0 for a blank page."""
    from PIL import Image, ImageStat

    return float(ImageStat.Stat(Image.open(io.BytesIO(png)).convert("L")).stddev[0])


def _logged_in(srv: TcpServer, browser: Any) -> Any:
    """Open the page, give the token, and return the card of session ``s`` once it is live."""
    from selenium.webdriver.common.by import By

    browser.get(srv.url + "/")
    until("asked for the token", lambda: browser.find_element(By.ID, "token").is_displayed())
    browser.find_element(By.ID, "token").send_keys(srv.token)
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    card = until(
        "showing the session", lambda: browser.find_elements(By.CSS_SELECTOR, 'article[data-name="s"]')
    )[0]
    until("live", lambda: browser.find_element(By.ID, "conn").text == "live")
    return card


def test_dashboard_live_progress_heat_map_and_pause(
    tcp_server: TcpServer, browser: Any, tmp_path: Path
) -> None:
    require("qemu-io")
    from selenium.webdriver.common.by import By

    srv = tcp_server
    srv.cli("volume", "create", "a", "--size", "64MiB")
    srv.cli("volume", "create", "b", "--size", "64MiB")
    srv.cli("session", "create", "s", "--source", "a", "--target", "b")
    apply(srv, "a", "write -P 1 0 4M")
    srv.cli("session", "update", "s", "--wait")

    browser.get(srv.url + "/")
    token = until("asked for the token", lambda: browser.find_element(By.ID, "token").is_displayed())
    assert token
    browser.find_element(By.ID, "token").send_keys(srv.token)
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    card = until(
        "showing the session", lambda: browser.find_elements(By.CSS_SELECTOR, 'article[data-name="s"]')
    )[0]
    until("live", lambda: browser.find_element(By.ID, "conn").text == "live")
    assert card.find_element(By.CSS_SELECTOR, ".state").text == "idle"
    # the volume rows are rebuilt on every refresh: read them in one step of the page's script
    names = "return [...document.querySelectorAll('#volumes tbody td:first-child')].map(e => e.textContent)"
    until("volumes listed", lambda: browser.execute_script(names) == ["a", "b"])

    # the heat map of tracking changes once qemu-io writes to the source
    tracking = card.find_element(By.CSS_SELECTOR, "canvas.tracking")
    until("drawn", lambda: tracking.get_attribute("data-cells-set") is not None)
    assert tracking.get_attribute("data-cells-set") == "0"
    blank_map = browser.execute_script("return arguments[0].toDataURL()", tracking)
    apply(srv, "a", "write -P 2 0 16M", "write -P 3 40M 8M")  # 24 MiB: 3/8 of the volume
    until(
        "tracking drawn", lambda: tracking.get_attribute("data-cells-set") == str(3 * 1024 // 8), timeout=15
    )
    assert browser.execute_script("return arguments[0].toDataURL()", tracking) != blank_map

    # an update at 2 MiB/s (24 MiB: 12 s, the screenshot of a loaded machine's browser
    # included): its progress moves on the page, then the pause button pauses it
    srv.cli("session", "update", "s", "--max-rate", "2MiB/s")
    until("copying", lambda: card.find_element(By.CSS_SELECTOR, ".state").text == "copying")
    first = int(
        until(
            "progress",
            lambda: int(card.get_attribute("data-done") or 0) > 0 and card.get_attribute("data-done"),
        )
    )
    until("progress moving", lambda: int(card.get_attribute("data-done") or 0) > first + MiB)
    transfer = card.find_element(By.CSS_SELECTOR, "canvas.transfer")
    until("transfer drawn", lambda: int(transfer.get_attribute("data-cells-set") or 0) > 0, timeout=15)
    assert "%" in card.find_element(By.CSS_SELECTOR, ".progress .label").text
    assert "/s" in card.find_element(By.CSS_SELECTOR, ".rate").text
    png = browser.get_screenshot_as_png()
    (tmp_path / "dashboard.png").write_bytes(png)
    assert non_blank(png) > 10, "the screenshot is blank"
    if os.environ.get("DELTAVOL_SCREENSHOT") == "1":  # refresh the README's picture
        SCREENSHOT.write_bytes(png)

    card.find_element(By.CSS_SELECTOR, 'button[data-action="pause"]').click()
    st = srv.wait_state("paused", timeout=30)
    assert st["update"]["bytes_done"] < st["update"]["bytes_total"]
    until("shown paused", lambda: card.find_element(By.CSS_SELECTOR, ".state").text == "paused")
    card.find_element(By.CSS_SELECTOR, 'button[data-action="resume"]').click()
    srv.wait_idle(st["update"]["id"], timeout=60)
    until("shown idle", lambda: card.find_element(By.CSS_SELECTOR, ".state").text == "idle")
    assert json.loads(srv.cli("session", "status", "s", "--json"))["consistent"]

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_dashboard_files_need_no_token_but_the_data_does(tcp_server: TcpServer) -> None:
    from tests.obs.common import tcp_get

    status, body = tcp_get(tcp_server, "/", None)
    assert status == 200 and b"<title>deltavol</title>" in body
    status, body = tcp_get(tcp_server, "/dashboard/app.js", None)
    assert status == 200 and b"EventSource" in body
    status, body = tcp_get(tcp_server, "/dashboard/config.json", None)
    assert status == 200 and json.loads(body) == {"token_required": True}
    assert tcp_get(tcp_server, "/v1/sessions", None)[0] == 401
    assert tcp_get(tcp_server, "/v1/events?token=wrong", None)[0] == 401
    assert tcp_get(tcp_server, "/v1/sessions/x/bitmaps?token=" + tcp_server.token, None)[0] == 401
    assert tcp_get(tcp_server, "/dashboard/../api.token", None)[0] in (403, 404)


def test_dashboard_restore_with_confirmation_and_a_refused_reverse(
    tcp_server: TcpServer, browser: Any, tmp_path: Path
) -> None:
    """A session to an nbdkit export whose reads take three seconds (so a restore lasts): the
    reverse button is refused by the server, and the page says why; the restore button,
    once confirmed, brings the source's bytes back, and the page shows it restoring, then
    idle."""
    require("qemu-io", "nbdkit")
    from selenium.webdriver.common.by import By

    from tests.sessions.targets import serving, uri

    srv, size = tcp_server, 16 * MiB
    image, sock = tmp_path / "t.img", tmp_path / "t.sock"
    image.write_bytes(bytes(size))
    slow_reads = [
        "nbdkit",
        "-f",
        "-U",
        str(sock),
        "-e",
        "t",
        "--filter=delay",
        "file",
        str(image),
        "rdelay=1",
    ]
    with serving(slow_reads, sock):
        srv.cli("volume", "create", "a", "--size", str(size))
        srv.cli("session", "create", "s", "--source", "a", "--target", uri(sock))
        apply(srv, "a", "write -P 1 0 4M", "write -P 2 8M 1M")
        srv.cli("session", "update", "s", "--full", "--wait")
        at_pit = hashlib.sha256(srv.image("a")).hexdigest()
        apply(srv, "a", "write -P 7 0 2M", "write -z 8M 64k", "write -P 9 12M 64k")  # after the update
        changed = hashlib.sha256(srv.image("a")).hexdigest()
        assert changed != at_pit

        card = _logged_in(srv, browser)
        until("idle", lambda: card.find_element(By.CSS_SELECTOR, ".state").text == "idle")
        message = browser.find_element(By.ID, "message")

        # reverse: asked first; then the server refuses (an NBD export cannot be promoted)
        card.find_element(By.CSS_SELECTOR, 'button[data-action="reverse"]').click()
        confirm = card.find_element(By.CSS_SELECTOR, ".confirm")
        assert confirm.is_displayed() and "writable source" in confirm.text, confirm.text
        confirm.find_element(By.CSS_SELECTOR, ".yes").click()
        until("the refusal shown", lambda: "refused" in message.text)
        out = srv.run("session", "reverse", "s")  # what the server says, through the CLI
        assert out.returncode == 1 and out.stderr.startswith("deltavol: "), out
        why = out.stderr.strip().removeprefix("deltavol: ")
        assert "cannot be reversed" in why and why in message.text, (why, message.text)
        assert not confirm.is_displayed()
        assert json.loads(srv.cli("session", "status", "s", "--json"))["state"] == "idle"

        # restore: "keep it" changes nothing, the confirmed one restores
        card.find_element(By.CSS_SELECTOR, 'button[data-action="restore"]').click()
        assert "overwrites a" in confirm.text, confirm.text
        confirm.find_element(By.CSS_SELECTOR, ".no").click()
        assert not confirm.is_displayed()
        assert hashlib.sha256(srv.image("a")).hexdigest() == changed
        card.find_element(By.CSS_SELECTOR, 'button[data-action="restore"]').click()
        confirm.find_element(By.CSS_SELECTOR, ".yes").click()
        until("shown restoring", lambda: card.find_element(By.CSS_SELECTOR, ".state").text == "restoring")
        assert "restoring" in card.find_element(By.CSS_SELECTOR, ".progress .label").text
        assert card.find_element(By.CSS_SELECTOR, 'button[data-action="restore"]').get_attribute("disabled")
        # 34 chunks back, each read taking a second: long, longer on a loaded machine
        until("shown idle", lambda: card.find_element(By.CSS_SELECTOR, ".state").text == "idle", timeout=120)
        st = json.loads(srv.cli("session", "status", "s", "--json"))
    assert st["state"] == "idle" and st["consistent"] and st["update"]["kind"] == "restore", st
    assert hashlib.sha256(srv.image("a")).hexdigest() == at_pit
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert all("/reverse" in e["message"] for e in errors), errors  # the refused request's 409
