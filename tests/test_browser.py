"""The published site in a real browser, with hostile text in every text field of the specs.

Two tiny specs whose title, notes, group and axis hold script tags, `javascript:` Markdown links, remote
Markdown images, a newline followed by a Markdown link and an attribute breakout go through
`python -m runner run` (smoke profile, the real notebook) and `python -m runner site` into a tmp project.
Headless Chromium (Debian's `chromium`, driven by Playwright through `executable_path`) then opens every
built page twice: from disk (`file://`, as the README tells users to) and from a local HTTP server. On every
page: no dialog opens (every payload calls alert), no script element carries spec text, nothing is logged
as a console error or page error and no request fails, every image loads (each scrolled into view first,
so lazy images load too), and every link into the site resolves to a file of the site. Search, typed
into the search box, finds each experiment by its id and links to its page.

CI installs chromium (.ci/run); this test fails, never skips, when the browser is missing.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from runner.sanitize import check_site

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("RUNNER_CHROMIUM", "/usr/bin/chromium")
TINY = "model: {block_out_channels: [32, 64], blocks: DA, layers_per_block: 1}\ntrain: {batch_size: 16}\n"
SCRIPT = "<script>alert(1)</script>"
JS_LINK = "[x](javascript:alert(2))"
REMOTE_IMAGE = "![](https://example.com/x.png)"
BREAKOUT = '"><img src=x onerror=alert(3)>'
# One text field each, every payload somewhere; the axis starts a new Markdown line with a link.
HOSTILE = {
    "hostile_a": {
        "title": f"A {SCRIPT} {BREAKOUT}",
        "notes": f"{JS_LINK}\n\n{REMOTE_IMAGE}\n\n<iframe src=https://example.com></iframe> {SCRIPT}",
        "group": f"g {SCRIPT}",
        "axis": f"norm\n{JS_LINK}",
    },
    "hostile_b": {
        "title": f"B {JS_LINK} {REMOTE_IMAGE}",
        "notes": f"{BREAKOUT}\n[y](javascript:alert(4)) <a href=\"javascript:alert(5)\">z</a>",
        "group": f"{BREAKOUT[:40]}",
        "axis": f"lr\n{REMOTE_IMAGE}",
    },
}

pytestmark = pytest.mark.slow


def _spec_text(fields: dict[str, str]) -> str:
    import json

    # JSON strings are YAML flow scalars: every payload reaches the spec exactly as written.
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()) + TINY


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RUNNER_KILL_AT", None)
    return env


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("hostile")
    (project / "experiments").mkdir()
    for spec_id, fields in HOSTILE.items():
        (project / "experiments" / f"{spec_id}.yaml").write_text(_spec_text(fields))
    shutil.copy(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    shutil.copytree(ROOT / "docs" / "assets", project / "docs" / "assets")
    results = project / "results"
    specs = [str(project / "experiments" / f"{i}.yaml") for i in HOSTILE]
    for command in (
        ["run", *specs, "--profile", "smoke", "--results", str(results)],
        ["site", "--results", str(results), "--config", str(project / "mkdocs.yml")],
    ):
        proc = subprocess.run([sys.executable, "-m", "runner", *command], cwd=project, env=_env(),
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{command[0]}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return project / "site"


def _pages(site: Path, where: str = "http") -> list[Path]:
    """The site's pages; from disk all but 404.html, the web server's not-found page: a server shows it
    at any missing path, so MkDocs links its assets from the site root ("/assets/..."), and no page
    links to it."""
    return sorted(p for p in site.rglob("*.html") if where == "http" or p.name != "404.html")


def test_hostile_specs_reach_the_site_and_nothing_unsafe_is_built(built) -> None:
    for spec_id in HOSTILE:
        assert (built / "experiments" / spec_id / "index.html").is_file()
        assert (built / "experiments" / spec_id / "notebook.html").is_file()
    assert check_site(built) == []
    page = (built / "experiments" / "hostile_a" / "notebook.html").read_text()
    # The payloads are on the page as text, not as markup.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and SCRIPT not in page


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest's output for failures
        pass


@pytest.fixture(scope="module")
def server(built):
    handler = functools.partial(_QuietHandler, directory=str(built))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).is_file(), (
        f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install -y chromium; .ci/run "
        "does this) or set RUNNER_CHROMIUM"
    )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


# Each image scrolled into view (a lazy one starts loading only then) and waited for there, until it
# loads or fails (or 15 s pass); then whether it has pixels.
_IMAGES = """async () => {
  const settled = img => img.complete ? Promise.resolve() : new Promise(r => {
    img.addEventListener('load', r); img.addEventListener('error', r); setTimeout(r, 15000); });
  const images = Array.from(document.images);
  for (const img of images) { img.scrollIntoView(); await settled(img); }
  return images.map(img => [img.currentSrc || img.src, img.complete && img.naturalWidth > 0]);
}"""
_LINKS = "() => Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"
_SCRIPTS = "() => Array.from(document.scripts).map(s => s.text).filter(t => t.includes('alert('))"


def _local_file(url: str, site: Path, base: str) -> Path | None:
    """The site file a link into the site points at (None for links elsewhere, e.g. the theme's footer)."""
    if url.startswith(base):
        rel = unquote(urlsplit(url[len(base):]).path)
    elif url.startswith("file://"):
        rel = unquote(urlsplit(url).path)
        path = Path(rel)
        return path / "index.html" if path.is_dir() else path
    else:
        return None
    path = site / rel
    return path / "index.html" if path.is_dir() else path


def _visit_all(browser, site: Path, base: str, where: str) -> dict:
    """Open every page of `site` at `base` (a file:// or http:// URL of the site's folder)."""
    context = browser.new_context()
    page = context.new_page()
    dialogs: list[str] = []
    errors: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(f"{page.url}: {d.message}"), d.dismiss()))
    page.on("console", lambda m: errors.append(f"{page.url}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"{page.url}: {e}"))
    # A load the next navigation cancels (e.g. the search worker still starting) is not a failure.
    page.on("requestfailed", lambda r: None if r.failure == "net::ERR_ABORTED"
            else errors.append(f"{page.url}: request failed {r.url} ({r.failure})"))
    images = links = 0
    broken: list[str] = []
    for path in _pages(site, where):
        rel = path.relative_to(site).as_posix()
        page.goto(base + rel, wait_until="load")
        for src, ok in page.evaluate(_IMAGES):
            images += 1
            if not ok:
                broken.append(f"{rel}: image {src} did not load")
        for href in page.evaluate(_LINKS):
            target = _local_file(href, site, base)
            if target is not None:
                links += 1
                if not target.is_file():
                    broken.append(f"{rel}: link {href} leads to no file")
        broken += [f"{rel}: script with spec text: {t[:80]!r}" for t in page.evaluate(_SCRIPTS)]
    found = {spec_id: _search(page, base, spec_id) for spec_id in HOSTILE}
    page.wait_for_timeout(200)  # late console errors of the last page
    context.close()
    return {"dialogs": dialogs, "errors": errors, "broken": broken, "images": images, "links": links,
            "found": found}


def _search(page, base: str, spec_id: str) -> list[str]:
    """Type `spec_id` into the home page's search box; the hrefs of the results shown."""
    page.goto(base + "index.html", wait_until="load")
    box = page.locator("input.md-search__input")
    box.click()
    box.press_sequentially(spec_id)
    results = page.locator(".md-search-result__item a")
    try:
        results.first.wait_for(timeout=15_000)
    except Exception:  # noqa: BLE001 - reported as "no result" below
        return []
    return [a.get_attribute("href") or "" for a in results.all()]


@pytest.mark.parametrize("where", ["file", "http"])
def test_every_page_in_a_real_browser(built, server, browser, where) -> None:
    start = time.monotonic()
    base = built.as_uri() + "/" if where == "file" else server
    seen = _visit_all(browser, built, base, where)
    pages = len(_pages(built, where))
    print(f"\n{where}: {pages} pages, {seen['images']} images, {seen['links']} internal links checked "
          f"in {time.monotonic() - start:.1f} s")
    assert seen["dialogs"] == [], "a script from spec text ran"
    assert seen["errors"] == []
    assert seen["broken"] == []
    assert seen["images"] >= 4 * len(HOSTILE), "the experiment pages' charts were not seen"
    for spec_id, hrefs in seen["found"].items():
        assert any(f"experiments/{spec_id}/" in h for h in hrefs), f"search for {spec_id} found {hrefs}"
