"""The console in a real browser: Debian's chromium, headless, driven by selenium and chromedriver.

Logs in, opens the overview (charts drawn, with data points), filters the trace list, opens a
trace (the conversation in order, the injected payloads shown as text, never run) and writes a
screenshot of each page under the test's temp dir.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.fake_upstream import FakeUpstream
from tests.integration.admin_fixtures import IMG, SCRIPT, TOOL_NAME, console

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Where the README's screenshot is refreshed from (LLMGW_CONSOLE_SCREENSHOT=docs/console-trace.png).
SCREENSHOT_ENV = "LLMGW_CONSOLE_SCREENSHOT"


def _browser(profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1280,1400",
    ):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def _run(tmp_path: Path, base: str, key: str, xss_trace: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser(tmp_path / "chromium-profile")
    try:
        wait = WebDriverWait(driver, 20)
        driver.get(f"{base}/traces")
        wait.until(ec.presence_of_element_located((By.ID, "key")))  # sent to the login form
        assert driver.current_url == f"{base}/login"
        driver.find_element(By.ID, "key").send_keys(key)
        driver.find_element(By.ID, "login").click()
        wait.until(ec.presence_of_element_located((By.ID, "chart-requests")))
        # The overview: three charts drawn by uPlot, each with one point per minute of the hour.
        wait.until(lambda d: d.execute_script("return (window.llmgwCharts || []).length") == 3)
        points = driver.execute_script("return window.llmgwCharts.map(c => c.data[0].length)")
        assert points == [60, 60, 60]
        total = driver.execute_script("return window.llmgwCharts[0].data[1].reduce((a, b) => a + b, 0)")
        assert total == 5  # requests per minute, one-minute buckets: the five org-a traces
        assert len(driver.find_elements(By.CSS_SELECTOR, ".uplot canvas")) == 3
        models = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#by-model tbody tr td:nth-child(2)")]
        assert sorted(models) == ["console-model", "plain-model", "user-model"]
        driver.save_screenshot(str(tmp_path / "console-overview.png"))

        # The trace list, filtered by model through the form.
        driver.find_element(By.CSS_SELECTOR, "nav a[href='/traces']").click()
        wait.until(ec.presence_of_element_located((By.ID, "filters")))
        assert len(driver.find_elements(By.CSS_SELECTOR, "tr.trace-row")) == 5
        driver.find_element(By.ID, "f-model").send_keys("console-model")
        driver.find_element(By.ID, "apply").click()
        wait.until(lambda d: "model=console-model" in d.current_url)
        rows = driver.find_elements(By.CSS_SELECTOR, "tr.trace-row")
        assert len(rows) == 1
        assert IMG in rows[0].text  # the tag, as text
        driver.save_screenshot(str(tmp_path / "console-traces.png"))

        # One trace: the conversation in order, the payloads as text, nothing injected.
        rows[0].find_element(By.TAG_NAME, "a").click()
        wait.until(ec.presence_of_element_located((By.ID, "conversation")))
        assert driver.current_url == f"{base}/traces/{xss_trace}"
        roles = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#conversation .message .role")]
        assert [r.split(" ")[0].lower() for r in roles] == [
            "system",
            "user",
            "assistant",
            "tool",
            "assistant",
        ]
        texts = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#conversation .message .text")]
        assert texts[0] == "You are a careful assistant."
        assert texts[1] == f"Find {SCRIPT} and {IMG}"
        tools = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#conversation .tool-name")]
        assert tools == ["tool call: search (call_1)", f"tool call: {TOOL_NAME} (call_9)"]
        args = driver.find_elements(By.CSS_SELECTOR, "#conversation .tool-args")
        assert '"query": "<script>window.__xss=4</script>"' in args[1].text  # pretty-printed, as text
        reasoning = driver.find_element(By.CSS_SELECTOR, "details.reasoning")
        assert reasoning.get_attribute("open") is None  # collapsed
        assert driver.find_elements(By.ID, "raw-request") and driver.find_elements(By.ID, "raw-response")
        # No payload became an element or ran.
        assert driver.execute_script("return window.__xss") is None
        assert driver.find_elements(By.CSS_SELECTOR, "img") == []
        assert (
            driver.execute_script("return document.querySelectorAll('script:not([src]):not([type])').length")
            == 0
        )
        assert driver.execute_script("return document.querySelectorAll('[onerror]').length") == 0
        driver.save_screenshot(str(tmp_path / "console-trace.png"))
        target = os.environ.get(SCREENSHOT_ENV)
        if target:
            shutil.copyfile(tmp_path / "console-trace.png", target)
    finally:
        driver.quit()


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_console_in_chromium(tmp_path: Path, upstream: FakeUpstream) -> None:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        raise AssertionError("chromium and chromedriver are needed: run scripts/install-test-services")
    async with console(tmp_path, upstream) as c:
        # Selenium blocks: in a thread, so the gateway on this loop keeps serving the pages.
        await asyncio.to_thread(_run, tmp_path, f"http://127.0.0.1:{c.port}", c.admin_key, c.traces["xss"])
    for name in ("console-overview.png", "console-traces.png", "console-trace.png"):
        assert (tmp_path / name).stat().st_size > 10_000
