"""The course's site, built from the committed notebooks and read in a real browser.

The site is built with the README's command into a temporary folder, served on 127.0.0.1, and
Debian's Chromium (driven by Playwright) visits every page with every request to another address
aborted, as a reader offline would: each page answers 200, its images load, nothing is logged as
an error, every link inside the site resolves (fragment included), the home page draws the
README's two Mermaid diagrams as SVG, a chapter with formulas shows typeset math, each chapter's
"Abrir no Colab" opens its own notebook, and the Portuguese search finds the chapters.

Needs Chromium (`apt-get install -y chromium`, or NANOMOE_CHROMIUM=path) and the site's
JavaScript libraries, fetched once from the npm registry (`uv run python website/vendor.py`);
`.ci/run` does both, and in CI a missing one fails instead of skipping (NANOMOE_REQUIRE_BROWSER=1 or CI set).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "website"))
import vendor  # noqa: E402

CHROMIUM = os.environ.get("NANOMOE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHAPTERS = sorted(p.stem for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
PAGES = ["index.html", "website/capitulos.html", "docs/glossario.html", "docs/benchmarks.html"] + [
    f"notebooks/{c}.html" for c in CHAPTERS]
# a chapter page's whole output is in the HTML; wait only for what scripts draw
TIMEOUT_MS = 20_000


def _missing(what: str, how: str) -> None:
    message = f"{what} not found: {how}"
    if os.environ.get("CI") or os.environ.get("NANOMOE_REQUIRE_BROWSER"):
        pytest.fail(message + " (CI must run this test)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if not Path(CHROMIUM).exists():
        _missing("Chromium", "install it with `sudo apt-get install -y chromium` to run the site's browser test")
    pytest.importorskip("playwright", reason="the 'site' dependency group is not installed: `uv sync --group site`")
    if not vendor.ready():
        _missing("MathJax and Mermaid", "fetch them once with `uv run python website/vendor.py` (npm registry)")
    out = tmp_path_factory.mktemp("site") / "html"
    # the README's build command; -W: a broken cross-reference or link between pages fails the build
    cmd = [sys.executable, "-m", "sphinx", "-E", "-q", "-W", "--keep-going", "-b", "html", "-c", "website", ".",
           str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"site build failed:\n{done.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


class _QuietHandler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript", ".js": "text/javascript"}

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def browser(site):  # after `site`: where Chromium is missing, that fixture skips before a launch fails
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    """A fresh page whose every request outside 127.0.0.1 is aborted and recorded, with its console errors."""
    context = browser.new_context()
    page = context.new_page()
    page.blocked, page.errors = [], []

    def only_loopback(route):
        if urlparse(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            page.blocked.append(route.request.url)
            route.abort()

    context.route("**/*", only_loopback)
    page.on("console", lambda msg: msg.type == "error" and page.errors.append(msg.text))
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("response", lambda r: r.status >= 400 and page.errors.append(f"HTTP {r.status} {r.url}"))
    yield page
    context.close()


def _visit(page, url: str) -> None:
    response = page.goto(url, wait_until="load")
    assert response is not None and response.status == 200, f"{url}: HTTP {response and response.status}"


def _anchors(path: Path) -> set[str]:
    return set(re.findall(r'\sid="([^"]+)"', path.read_text(encoding="utf-8")))


def _broken_links(page, site: Path, server: str) -> list[str]:
    """Links inside the site whose file, or whose #fragment in that file, does not exist."""
    broken = []
    hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
    for href in hrefs:
        if not href.startswith(server) or "?" in href:
            continue
        url = urlparse(href)
        target = site / unquote(url.path[1:])
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            broken.append(href)
        elif url.fragment and target.suffix == ".html" and unquote(url.fragment) not in _anchors(target):
            broken.append(href)
    return broken


@pytest.mark.parametrize("path", PAGES)
def test_page_loads_offline(page, site, server, path):
    _visit(page, server + path)
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # lazy images, if any
    page.wait_for_function("[...document.images].every(i => i.complete)", timeout=TIMEOUT_MS)
    unloaded = page.eval_on_selector_all("img", "els => els.filter(e => !(e.naturalWidth > 0)).map(e => e.src)")
    assert not unloaded, f"{path}: images that did not load: {unloaded}"
    assert not page.blocked, f"{path}: asked for something outside the site: {page.blocked}"
    assert not page.errors, f"{path}: console errors: {page.errors}"
    broken = _broken_links(page, site, server)
    assert not broken, f"{path}: links that do not resolve: {broken}"
    assert page.locator("html").get_attribute("lang") == "pt-BR"


def test_home_draws_the_two_mermaid_diagrams(page, server):
    _visit(page, server + "index.html")
    page.wait_for_function("document.querySelectorAll('.mermaid svg').length >= 2", timeout=TIMEOUT_MS)
    assert page.locator(".mermaid svg").count() >= 2
    assert "GPTConfig" in page.title() or page.locator("h1").first.inner_text().startswith("nanomoe")
    assert not page.errors, page.errors


def test_chapter_math_is_typeset(page, server):
    _visit(page, server + "notebooks/02_modern_gpt.html")
    page.wait_for_function("document.querySelectorAll('mjx-container').length > 0", timeout=TIMEOUT_MS)
    assert page.locator("mjx-container").count() > 5
    assert not page.errors, page.errors


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_reads_as_a_post(page, server, chapter):
    _visit(page, server + f"notebooks/{chapter}.html")
    colab = page.locator("a.colab-button").get_attribute("href")
    assert colab == f"https://colab.research.google.com/github/sagui-nlp/nanomoe/blob/main/notebooks/{chapter}.ipynb"
    download = page.locator("a.download-button").get_attribute("href")
    assert download == f"{chapter}.ipynb"
    assert len(page.locator(".chapter-summary").inner_text()) > 150
    assert page.locator(".chapter-time").inner_text().startswith("Tempo da execução padrão:")
    i = CHAPTERS.index(chapter)
    if i > 0:
        assert page.locator("a.chapter-prev").get_attribute("href") == f"{CHAPTERS[i - 1]}.html"
    if i + 1 < len(CHAPTERS):
        assert page.locator("a.chapter-next").get_attribute("href") == f"{CHAPTERS[i + 1]}.html"


@pytest.mark.parametrize("word", ["roteadores", "especialistas"])
def test_portuguese_search_finds_chapters(page, server, word):
    _visit(page, server + f"search.html?q={word}")
    selector = "#search-results ul.search li a"
    page.wait_for_function(f"document.querySelectorAll('{selector}').length > 0", timeout=TIMEOUT_MS)
    hrefs = page.eval_on_selector_all(selector, "els => els.map(e => e.getAttribute('href'))")
    assert any("notebooks/0" in h for h in hrefs), f"search for {word!r} found no chapter: {hrefs}"
    assert not page.errors, page.errors


def test_index_and_feed_list_every_chapter(site):
    index = (site / "website" / "capitulos.html").read_text(encoding="utf-8")
    feed = (site / "feed.xml").read_text(encoding="utf-8")
    for chapter in CHAPTERS:
        assert f"notebooks/{chapter}.html" in index
        assert f"notebooks/{chapter}.html" in feed
    assert (site / ".nojekyll").exists()


@pytest.fixture(autouse=True)
def _screenshots(request, page, server):
    """With NANOMOE_SITE_SHOTS=folder, the home page and chapters 03 and 06 are saved as PNGs to look at."""
    yield
    folder = os.environ.get("NANOMOE_SITE_SHOTS")
    if folder and request.node.name == "test_home_draws_the_two_mermaid_diagrams":
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name, path in [("home", "index.html"), ("03", "notebooks/03_train_moe.html"),
                           ("06", "notebooks/06_modern_routers.html")]:
            _visit(page, server + path)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=False)
