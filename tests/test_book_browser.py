"""The book reads offline: the committed chapters, built, name no other host, and every page opened
from disk in headless Chromium with the network cut renders its math, its images and no errors.

Screenshots of every page land in ``_build/screenshots/`` (``FFL_SCREENSHOTS`` overrides), so a
person can look at what a reader sees. The browser is Debian's ``chromium`` (``FFL_CHROMIUM``
names another binary), driven by Playwright; without one the browser test skips and says why.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = Path(os.environ.get("FFL_SCREENSHOTS", ROOT / "_build" / "screenshots"))
# Playwright already passes Chromium the flags that stop its own background traffic (sync,
# component updates, first-run pings); these add the rest that headless Debian chromium needs.
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic"]
RAW_TEX = ("\\(", "\\)", "\\[", "\\]", "$$")
URL_IN_SCRIPT = re.compile(r"https?://[^\s\"'`<>]+", re.IGNORECASE)
REDIRECT = re.compile(r'<meta http-equiv="Refresh" content="\d+; url=([^"]+)"', re.IGNORECASE)


@pytest.fixture(scope="module")
def html_dir(tmp_path_factory) -> Path:
    """The committed book built as `jupyter-book build book/` builds it, into a temporary folder."""
    out = tmp_path_factory.mktemp("book")
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    build = subprocess.run([str(jupyter_book), "build", str(ROOT / "book"), "--path-output", str(out), "-W", "--keep-going"],
                           capture_output=True, text=True)
    assert build.returncode == 0, f"jupyter-book build failed:\n{(build.stdout + build.stderr)[-3000:]}"
    return out / "_build" / "html"


def _pages(html: Path) -> list[Path]:
    return sorted(p for p in html.rglob("*.html") if not {"_static", "_sources"} & set(p.relative_to(html).parts))


class _Loads(HTMLParser):
    """What a page makes the browser fetch: src of any tag, href of <link>, and URLs in inline scripts."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.urls += [attrs[k] for k in ("src", "data-src", "poster") if attrs.get(k)]
        if tag == "link" and attrs.get("href"):
            self.urls.append(attrs["href"])
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.urls += URL_IN_SCRIPT.findall(data)


def _external(url: str) -> bool:
    parts = urlsplit(url)
    return bool(parts.netloc) or parts.scheme not in ("", "data")


def test_book_names_no_other_host_and_ships_mathjax(html_dir):
    pages = _pages(html_dir)
    assert html_dir / "intro.html" in pages
    external = {}
    for page in pages:
        parser = _Loads()
        parser.feed(page.read_text())
        if bad := [u for u in parser.urls if _external(u)]:
            external[str(page.relative_to(html_dir))] = bad
    for sheet in html_dir.rglob("*.css"):
        urls = re.findall(r"url\(\s*['\"]?([^'\")]+)", sheet.read_text(errors="replace"))
        if bad := [u for u in urls if _external(u)]:
            external[str(sheet.relative_to(html_dir))] = bad
    assert not external, f"the book loads from other hosts: {external}"

    # Pages with math load MathJax from the build itself, and the fonts it needs are there.
    intro = (html_dir / "intro.html").read_text()
    assert 'class="math' in intro
    assert 'src="_static/mathjax/tex-chtml.js"' in intro
    assert (html_dir / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert list((html_dir / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))


# Run in each page once it has loaded: wait for MathJax and images, then report what a reader would
# see wrong. Code (pre/code) is hidden while reading the text: it may legitimately show `$$` or `\(`.
CHECK_PAGE = """async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  // MathJax's script is deferred, so it has run by the load event, unless it could not be loaded.
  if (document.querySelector('script[src*="mathjax" i]')) {
    const deadline = Date.now() + 5000;
    while (!(window.MathJax && MathJax.startup) && Date.now() < deadline) await sleep(50);
    if (window.MathJax && MathJax.startup) await Promise.race([MathJax.startup.promise, sleep(30000)]);
  }
  const images = [...document.images];
  images.forEach(img => { img.loading = 'eager'; });
  const settled = img => img.complete ? null : new Promise(r => { img.onload = img.onerror = r; });
  await Promise.race([Promise.all(images.map(settled)), sleep(30000)]);
  const hide = document.createElement('style');
  hide.textContent = 'pre, code { display: none !important; }';
  document.head.append(hide);
  const text = document.body.innerText;
  hide.remove();
  return {
    text,
    math: document.querySelectorAll('.math').length,
    unrendered: [...document.querySelectorAll('.math')].filter(m => !m.querySelector('mjx-container'))
      .map(m => m.textContent.slice(0, 80)),
    texErrors: [...document.querySelectorAll('mjx-merror')].map(e => e.getAttribute('data-mjx-error') || e.textContent),
    rendered: document.querySelectorAll('mjx-container').length,
    brokenImages: images.filter(img => img.naturalWidth === 0).map(img => img.getAttribute('src')),
    images: images.length,
  };
}"""


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium; the test using it skips, with the reason, where there is none."""
    binary = os.environ.get("FFL_CHROMIUM") or shutil.which("chromium")
    if not binary:
        pytest.skip("no chromium on PATH (Debian: `apt-get install chromium`; .ci/run installs it), "
                    "or set FFL_CHROMIUM to a Chromium binary")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency: pip install -e '.[test]'")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=binary, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def read_offline(browser, site: Path, shots: Path) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """Open every page of ``site`` from disk with nothing else reachable; screenshot each into
    ``shots``. Returns the problems per page (empty when all is well) and what each page showed."""
    root = site.resolve().as_uri() + "/"
    problems: dict[str, list[str]] = {}
    current = {"page": "(browser)"}

    def report(message: str) -> None:
        problems.setdefault(current["page"], []).append(message)

    def only_the_book(route):
        # Offline: anything outside the built book is refused, and is a failure.
        if route.request.url.startswith((root, "data:")):
            route.continue_()
        else:
            report(f"request to {route.request.url}")
            route.abort()

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.route("**/*", only_the_book)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.on("console", lambda m: m.type == "error" and report(f"console error: {m.text} ({m.location.get('url')})"))
    page.on("pageerror", lambda e: report(f"uncaught exception: {e}"))
    page.on("requestfailed", lambda r: r.url.startswith(root) and report(f"failed to load {r.url}: {r.failure}"))
    seen = {}
    for path in _pages(site):
        current["page"] = name = str(path.relative_to(site))
        page.goto(path.resolve().as_uri(), wait_until="load")
        if redirect := REDIRECT.search(path.read_text()):  # index.html: check the page it leads to
            page.wait_for_url((path.parent / redirect.group(1)).resolve().as_uri(), wait_until="load")
        seen[name] = result = page.evaluate(CHECK_PAGE)
        page.screenshot(path=shots / (name.removesuffix(".html").replace("/", "__") + ".png"), full_page=True)
        if raw := [token for token in RAW_TEX if token in result["text"]]:
            where = min(result["text"].find(t) for t in raw)
            report(f"raw TeX {raw} in the visible text: ...{result['text'][max(0, where - 60):where + 60]!r}...")
        if result["unrendered"]:
            report(f"{len(result['unrendered'])} of {result['math']} math elements not typeset: {result['unrendered'][:3]}")
        if result["texErrors"]:
            report(f"MathJax TeX errors: {result['texErrors'][:3]}")
        if result["brokenImages"]:
            report(f"broken images: {result['brokenImages']}")
    context.close()
    return problems, seen


def _toc_pages() -> set[str]:
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())

    def files(entries):  # chapters, their sections, and the chapters of every part
        for e in entries:
            if "file" in e:
                yield e["file"]
            yield from files(e.get("sections", []) + e.get("chapters", []))

    return {f"{toc['root']}.html", *(f"{f}.html" for f in files(toc.get("parts", []) + toc.get("chapters", [])))}


@pytest.mark.slow
def test_every_page_renders_offline_in_chromium(browser, html_dir):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in SCREENSHOTS.glob("*.png"):
        old.unlink()
    problems, seen = read_offline(browser, html_dir, SCREENSHOTS)
    assert _toc_pages() <= set(seen), f"pages missing from the build: {_toc_pages() - set(seen)}"
    assert not problems, (f"{len(problems)} page(s) not right offline (screenshots in {SCREENSHOTS}):\n"
                          + "\n".join(f"  {name}: {msgs}" for name, msgs in problems.items()))
    # The checks saw what they check: the intro's math typeset, the chapters' figures loaded.
    assert seen["intro.html"]["rendered"] == seen["intro.html"]["math"] > 0
    assert sum(r["images"] for r in seen.values()) > 0
    print(f"\n{len(seen)} pages read offline; screenshots in {SCREENSHOTS}")


@pytest.mark.slow
def test_reading_offline_catches_what_a_reader_would_see_wrong(browser, tmp_path):
    site = tmp_path / "site"
    (site / "img").mkdir(parents=True)
    Image.new("RGB", (4, 4), "red").save(site / "img" / "ok.png")
    (site / "good.html").write_text('<p>prose, and code: <code>$$x$$</code></p><img src="img/ok.png">')
    (site / "bad.html").write_text(
        '<p>the weights \\(W_1 \\dots W_l\\) untypeset</p>'
        '<img src="img/missing.png"><img src="https://cdn.invalid/remote.png">'
        '<script>console.error("boom")</script>')
    problems, seen = read_offline(browser, site, tmp_path)
    assert set(problems) == {"bad.html"}, problems
    found = "\n".join(problems["bad.html"])
    assert "raw TeX ['\\\\(', '\\\\)']" in found
    assert "broken images: ['img/missing.png', 'https://cdn.invalid/remote.png']" in found
    assert "request to https://cdn.invalid/remote.png" in found
    assert "console error: boom" in found
    assert seen["good.html"]["images"] == 1 and (tmp_path / "good.png").stat().st_size > 0
