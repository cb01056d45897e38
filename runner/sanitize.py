"""The built site made safe, then checked: notebook pages sanitised, every page scanned.

Site pages are safe by construction (runner.templating escapes every untrusted value). Notebook pages
are not: mkdocs-jupyter renders a notebook's Markdown cells and its Markdown/HTML/JavaScript/SVG outputs
as raw HTML (it even turns nbconvert's own sanitiser off), and its template loads MathJax and mermaid
from a CDN. The notebook escapes spec text at the source (runner.templating.md_text), but a run folder is
not to be trusted with the reader's browser, so the rendered HTML itself is cleaned after `mkdocs build`
and before the site is swapped in: cleaning the output, not guessing at every way a notebook reaches it.

- `sanitize_notebook_page`: inside the `.jupyter-wrapper` of a page rendered from a notebook, every block
  rendered from Markdown or from a rich output goes through an allowlist (bleach): text formatting and
  tables stay, links only to anchors on the page, no images (charts are separate ``data:`` images), no
  scripts, styles or event handlers. Scripts of mkdocs-jupyter's template that fetch code (MathJax,
  mermaid) are removed; its inline copy-button script stays.
- `check_site`: every HTML file of the built site, whatever made it, must hold no ``javascript:`` (or
  ``vbscript:``/``data:`` other than images) URL, no inline event handler, and nothing the browser fetches
  from another host (``src``, ``srcset``, stylesheets, CSS ``url()``). Plain ``<a href="https://…">`` links
  a reader clicks are allowed (the theme's footer has one); everything from spec text is escaped, so no
  such link can come from a spec. runner.site.build_site refuses to publish a site with a problem.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

# Blocks nbconvert renders from notebook data as HTML: Markdown cells and outputs, HTML, JavaScript,
# SVG, LaTeX and PDF outputs (Jupyter's class names; text and image outputs are escaped by nbconvert).
RENDERED = ("jp-RenderedHTMLCommon", "jp-RenderedJavaScript", "jp-RenderedSVG", "jp-RenderedLatex",
            "jp-RenderedPDF", "jp-RenderedMarkdown", "jp-RenderedHTML")
SAFE_TAGS = frozenset({
    "a", "b", "blockquote", "br", "code", "dd", "del", "div", "dl", "dt", "em", "h1", "h2", "h3", "h4",
    "h5", "h6", "hr", "i", "kbd", "li", "ol", "p", "pre", "s", "span", "strong", "sub", "sup", "table",
    "tbody", "td", "tfoot", "th", "thead", "tr", "ul",
})
# Elements a notebook cell may never hold, whatever their attributes.
ACTIVE = ("script", "iframe", "object", "embed", "frame", "frameset", "base", "form", "link", "meta",
          "style", "svg", "math", "img", "picture", "video", "audio", "source", "track", "input", "button")
URL_ATTRS = frozenset({"href", "src", "srcset", "action", "formaction", "data", "poster", "background",
                       "xlink:href", "cite", "manifest", "ping", "lowsrc", "dynsrc", "longdesc"})
# Attributes whose URL the browser fetches by itself (a[href] only when clicked).
FETCHED = URL_ATTRS - {"href", "cite", "longdesc", "action", "formaction"}
_CSS_REMOTE = re.compile(r"""url\(\s*['"]?\s*(?:[a-z][a-z0-9+.-]*:)?//""", re.I)
_CSS_IMPORT = re.compile(r"""@import\s+(?:url\()?\s*['"]?\s*(?:[a-z][a-z0-9+.-]*:)?//""", re.I)
_CONTROL = re.compile(r"[\x00-\x20\x7f]+")


def _anchor_only(tag: str, name: str, value: str) -> bool:
    """bleach attribute filter: ids and classes anywhere, hrefs only to an anchor on the same page."""
    if name in ("class", "id"):
        return True
    return tag == "a" and name == "href" and value.startswith("#")


def clean_fragment(html: str) -> str:
    """Untrusted notebook HTML reduced to inert formatting (text of removed tags is kept, escaped)."""
    import bleach

    return bleach.clean(html, tags=SAFE_TAGS, attributes=_anchor_only, protocols=[], strip=True,
                        strip_comments=True)


def _classes(el) -> list[str]:
    return el.get("class") or []


def sanitize_notebook_page(html: str) -> str | None:
    """`html` with its notebook sanitised (module docstring); None when the page holds no notebook."""
    if "jupyter-wrapper" not in html:
        return None
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    wrappers = soup.find_all("div", class_="jupyter-wrapper")
    if not wrappers:
        return None
    for wrapper in wrappers:
        for block in wrapper.find_all(lambda el: any(c in RENDERED for c in _classes(el))):
            if block.parent is None or block.find_parent(lambda el: any(c in RENDERED for c in _classes(el))):
                continue  # nested inside a block cleaned as a whole
            cleaned = BeautifulSoup(clean_fragment(block.decode_contents()), "html.parser")
            block.clear()
            block.append(cleaned)
        # Whatever a cell's outputs and Markdown hold beyond those blocks (the input area is code that
        # Pygments escaped, beside the template's copy button and its icon).
        for area in wrapper.find_all(class_=["jp-OutputArea", "jp-MarkdownCell"]):
            for el in area.find_all(ACTIVE):
                if not (el.name == "img" and _data_image(el.get("src", ""))):
                    el.decompose()
        for el in wrapper.find_all(True):
            for name in [a for a in el.attrs if a.lower().startswith("on")]:
                del el[name]
    # mkdocs-jupyter's template (emitted just before the wrapper) loads MathJax (src="" or a CDN) and
    # imports mermaid from a CDN in a module script: code from elsewhere that no cell here needs.
    for script in soup.find_all("script"):
        src = script.get("src")
        if script.get("type") in ("module", "text/x-mathjax-config") or (
            src is not None and (not src.strip() or url_problem("script", "src", src))
        ):
            script.decompose()
    return str(soup)


def _data_image(url: str) -> bool:
    return _CONTROL.sub("", url).lower().startswith("data:image/")


def sanitize_site(site_dir: Path) -> list[Path]:
    """Sanitise every notebook page under `site_dir` in place; return the pages changed."""
    changed = []
    for page in sorted(Path(site_dir).rglob("*.html")):
        html = page.read_text(encoding="utf-8")
        cleaned = sanitize_notebook_page(html)
        if cleaned is not None and cleaned != html:
            page.write_text(cleaned, encoding="utf-8")
            changed.append(page)
    return changed


# ---------------------------------------------------------------- the check


def url_problem(tag: str, attr: str, value: str) -> str | None:
    """Why this attribute's URL must not be in the site, or None."""
    url = _CONTROL.sub("", value)  # browsers ignore control characters and spaces inside a scheme
    if attr == "srcset":
        urls = [part.split()[0] for part in value.split(",") if part.split()]
        return next((p for u in urls if (p := url_problem(tag, "src", u))), None)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("javascript", "vbscript"):
        return f"{scheme}: URL"
    if scheme == "data" and not (tag == "img" and url.lower().startswith("data:image/")):
        return "data: URL outside an image"
    remote = bool(parts.netloc) or url.startswith("//") or scheme in ("http", "https", "ftp")
    if remote and (attr in FETCHED or (tag == "link" and attr == "href") or tag in ("base", "iframe")):
        return "remote resource"
    return None


class _Scanner(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []
        self._style = False

    def handle_starttag(self, tag, attrs) -> None:
        for name, value in attrs:
            value = value or ""
            if name.startswith("on"):
                self.problems.append(f"<{tag} {name}=…>: inline event handler")
            elif name in URL_ATTRS and (why := url_problem(tag, name, value)):
                self.problems.append(f"<{tag} {name}={value[:80]!r}>: {why}")
            elif name == "style" and (_CSS_REMOTE.search(value) or _CSS_IMPORT.search(value)):
                self.problems.append(f"<{tag} style=…>: remote resource in CSS")
            elif name == "http-equiv" and value.lower() == "refresh":
                self.problems.append(f"<{tag} http-equiv=refresh>: redirect")
        self._style = tag == "style"

    def handle_endtag(self, tag) -> None:
        self._style = False

    def handle_data(self, data) -> None:
        if self._style and (_CSS_REMOTE.search(data) or _CSS_IMPORT.search(data)):
            self.problems.append("<style>: remote resource in CSS")


def check_page(html: str) -> list[str]:
    scanner = _Scanner()
    scanner.feed(html)
    scanner.close()
    return scanner.problems


def check_site(site_dir: Path) -> list[str]:
    """Every problem (module docstring) in every HTML file under `site_dir`, as "page: problem"."""
    site_dir = Path(site_dir)
    return [
        f"{page.relative_to(site_dir).as_posix()}: {problem}"
        for page in sorted(site_dir.rglob("*.html"))
        for problem in check_page(page.read_text(encoding="utf-8"))
    ]
