"""Real headless Chromium for tests that must see a page as a person would.

Debian's chromium and chromedriver (``scripts/ensure-browser.sh`` installs them), driven by
Selenium. Nothing is downloaded at run time: Selenium Manager is skipped because the driver's
path is given.

    with Browser() as browser:
        page = browser.open(path_or_url)
        assert not page.errors()
        assert page.count(".card") == 3
        page.screenshot(Path("test-output/page.png"))

In a test module, ``browser = browser_fixture()`` defines a fixture named ``browser`` that starts
one browser for the module and fails the tests (never skips them) when Chromium is missing.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_HINT = "run scripts/ensure-browser.sh (or: sudo apt-get install chromium chromium-driver)"
DEFAULT_WIDTH = 1200
DEFAULT_HEIGHT = 900
# How long a page may take to finish loading and decoding its images.
LOAD_TIMEOUT_S = 20.0

# Headless, no sandbox (we run as root in containers), and none of Chromium's own traffic: on a
# closed network its background connections are refused and would only add noise and delay.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)

_ALL_IMAGES_DONE = "return Array.from(document.images).every(img => img.complete);"
_BROKEN_IMAGES = (
    "return Array.from(document.images)"
    ".filter(img => !(img.complete && img.naturalWidth > 0))"
    ".map(img => img.currentSrc || img.src || img.outerHTML);"
)


class BrowserUnavailable(RuntimeError):
    """Chromium or chromedriver is not installed, or would not start."""


@dataclass(frozen=True)
class ConsoleEntry:
    """One line of the browser console: level is SEVERE, WARNING, INFO or DEBUG."""

    level: str
    message: str
    source: str = ""


@dataclass
class Page:
    """A page loaded in the browser, with what a test asks about it."""

    url: str
    _driver: webdriver.Chrome = field(repr=False)
    _console: list[ConsoleEntry] = field(default_factory=list, repr=False)

    def console(self) -> list[ConsoleEntry]:
        """Every console entry logged since the page was opened."""
        for entry in _drain_console(self._driver):
            self._console.append(
                ConsoleEntry(
                    level=str(entry.get("level", "")),
                    message=str(entry.get("message", "")),
                    source=str(entry.get("source", "")),
                )
            )
        return list(self._console)

    def errors(self) -> list[ConsoleEntry]:
        """The SEVERE console entries: script errors, failed loads, CSP violations."""
        return [entry for entry in self.console() if entry.level == "SEVERE"]

    def count(self, selector: str) -> int:
        """How many elements match a CSS selector."""
        return len(self._driver.find_elements(By.CSS_SELECTOR, selector))

    def texts(self, selector: str) -> list[str]:
        """The rendered text of each element matching a CSS selector, in document order."""
        return [element.text for element in self._driver.find_elements(By.CSS_SELECTOR, selector)]

    def broken_images(self) -> list[str]:
        """The src (or markup) of every <img> that did not load; empty when all loaded."""
        broken: list[str] = self._driver.execute_script(_BROKEN_IMAGES)
        return broken

    def images_loaded(self) -> bool:
        """Whether every <img> on the page loaded (naturalWidth > 0)."""
        return not self.broken_images()

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the whole page, beyond the window's height, and return its path."""
        metrics = self._driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
        size = metrics["cssContentSize"]
        shot = self._driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {
                    "x": 0,
                    "y": 0,
                    "width": size["width"],
                    "height": size["height"],
                    "scale": 1,
                },
            },
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


class Browser:
    """One headless Chromium with a fresh profile, closed (profile and all) on exit."""

    def __init__(self, *, width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT) -> None:
        self.width = width
        self.height = height
        self._driver: webdriver.Chrome | None = None
        self._scratch: Path | None = None  # the profile and chromedriver's log

    def __enter__(self) -> Browser:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
        if missing:
            raise BrowserUnavailable(f"{' and '.join(missing)} not found: {INSTALL_HINT}")
        self._scratch = Path(tempfile.mkdtemp(prefix="test-browser-"))
        log = self._scratch / "chromedriver.log"
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self._scratch / 'profile'}")
        options.add_argument(f"--window-size={self.width},{self.height}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = Service(executable_path=str(CHROMEDRIVER), log_output=str(log))
        try:
            self._driver = webdriver.Chrome(options=options, service=service)
        except WebDriverException as exc:
            tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
            self.close()
            raise BrowserUnavailable(
                f"Chromium did not start: {exc.msg}\nchromedriver log:\n{tail}\n{INSTALL_HINT}"
            ) from exc

    def open(self, target: str | Path) -> Page:
        """Load a URL or a local file and wait until the page and its images have loaded."""
        driver = self._require()
        url = target.resolve().as_uri() if isinstance(target, Path) else target
        _drain_console(driver)  # drop what the previous page logged
        driver.get(url)
        WebDriverWait(driver, LOAD_TIMEOUT_S).until(_loaded)
        return Page(url=url, _driver=driver)

    def close(self) -> None:
        if self._driver is not None:
            self._driver.quit()
            self._driver = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def _require(self) -> webdriver.Chrome:
        if self._driver is None:
            raise BrowserUnavailable("the browser is not running: use it as a context manager")
        return self._driver


def _drain_console(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """The console entries logged since the last call: chromedriver forgets what it returns."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return entries


def _loaded(driver: Any) -> bool:
    return bool(
        driver.execute_script("return document.readyState") == "complete"
        and driver.execute_script(_ALL_IMAGES_DONE)
    )


def browser_fixture() -> Callable[[], Iterator[Browser]]:
    """A pytest fixture named ``browser`` that fails (never skips) when Chromium is missing.

    Assign it as ``browser = browser_fixture()`` in a test module: one browser per module.
    """

    @pytest.fixture(scope="module", name="browser")
    def _browser() -> Iterator[Browser]:
        browser = Browser()
        try:
            browser.start()
        except BrowserUnavailable as exc:
            problem = str(exc)  # failed below, outside the handler: one message, not a chain
        else:
            problem = ""
        if problem:
            pytest.fail(problem, pytrace=False)
        try:
            yield browser
        finally:
            browser.close()

    return _browser
