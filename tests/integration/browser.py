"""A real browser for OPEN tests: Debian's chromium, headless, driven by selenium through Debian's
chromedriver. Screenshots are kept as test artifacts in $ANALYSIS_OPERATOR_ARTIFACTS
(default /tmp/analysis-operator-artifacts). The browser keeps its console, so a page that does not
come up can say why (`diagnosis`)."""

from __future__ import annotations

import os
import pathlib

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

ARTIFACTS = pathlib.Path(os.environ.get("ANALYSIS_OPERATOR_ARTIFACTS", "/tmp/analysis-operator-artifacts"))


def chromium(*arguments: str) -> webdriver.Chrome:
    """`arguments`: more of chromium's, e.g. --host-resolver-rules for hosts that only the test knows."""
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900", *arguments):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    driver.set_page_load_timeout(60)
    return driver


def sign_in(driver: webdriver.Chrome, origin: str, cookie: str, token: str) -> None:
    """Set the session cookie the facility's SSO would have set for the gateway's origin."""
    driver.get(origin + "/env/")  # any page of the origin, so the cookie can be set for it
    driver.delete_all_cookies()
    driver.add_cookie({"name": cookie, "value": token, "path": "/"})


def jupyterlab_shown(driver: webdriver.Chrome) -> bool:
    """JupyterLab's UI is drawn: its main area is there and its splash screen (shown while the
    extensions load, over the main area) is gone."""
    return bool(
        driver.find_elements(By.CSS_SELECTOR, "#jp-main-dock-panel")
        and not driver.find_elements(By.CSS_SELECTOR, "#jupyterlab-splash")
    )


def screenshot(driver: webdriver.Chrome, name: str) -> pathlib.Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def diagnosis(driver: webdriver.Chrome) -> str:
    """What the page's console said and which of its requests failed (status 0 or 400 and above),
    for a timeout's message."""
    console = [f"{entry['level']}: {entry['message']}" for entry in driver.get_log("browser")]
    failed = driver.execute_script(
        "return performance.getEntriesByType('resource')"
        ".filter(entry => !entry.responseStatus || entry.responseStatus >= 400)"
        ".map(entry => entry.responseStatus + ' ' + entry.name);"
    )
    return f"console: {console or '(empty)'}; failed requests: {failed or '(none)'}"
