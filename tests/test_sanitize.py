"""runner.sanitize: notebook pages cleaned after mkdocs-jupyter renders them, every built page checked.

The notebook test renders a notebook holding every payload through mkdocs-jupyter's own converter (what
`mkdocs build` runs); the check is tested against hand-written pages (the oracle: what a browser would
fetch or run); the build test shows a site with an unsafe page is refused and the previous one kept.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
import yaml

from runner import site
from runner.sanitize import check_page, check_site, clean_fragment, sanitize_notebook_page
from runner.text import md_text

ROOT = Path(__file__).resolve().parent.parent
PAYLOADS = (
    "<script>alert(1)</script>",
    "[x](javascript:alert(2))",
    "![](https://example.com/x.png)",
    '"><img src=x onerror=alert(3)>',
    "<iframe src=https://example.com></iframe>",
    '<a href="jav&#x09;ascript:alert(4)">y</a>',
)


def test_md_text_makes_markdown_and_html_inert() -> None:
    import markdown

    for payload in PAYLOADS + ("norm\n[x](javascript:alert(5))",):
        html = markdown.markdown(str(md_text(payload)))
        assert check_page(html) == [] and "<script" not in html and "<img" not in html, html


def test_clean_fragment_keeps_text_drops_active_content() -> None:
    html = ('<h2 id="t">Title <script>alert(1)</script></h2><p><a href="javascript:alert(2)">x</a> '
            '<a href="#t">anchor</a> <img src="https://example.com/x.png"> <b onclick="alert(3)">b</b></p>')
    out = clean_fragment(html)
    assert check_page(out) == []
    assert "<script" not in out and "<img" not in out and "onclick" not in out and "javascript" not in out
    assert '<a href="#t">anchor</a>' in out and "<b>b</b>" in out and "alert(1)" in out  # text stays, inert


def _hostile_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nb.cells.append(nbformat.v4.new_markdown_cell("# Notebook\n\n" + "\n\n".join(PAYLOADS)))
    cell = nbformat.v4.new_code_cell("show()", execution_count=1)
    text = "\n\n".join(PAYLOADS)
    rich = {
        "text/markdown": "## " + text,
        "text/html": text,
        "application/javascript": "alert(6)",
        "image/svg+xml": '<svg><image href="https://example.com/x.png"/><script>alert(7)</script></svg>',
    }
    cell.outputs = [nbformat.v4.new_output("display_data", data={kind: data, "text/plain": kind})
                    for kind, data in rich.items()]
    cell.outputs.append(nbformat.v4.new_output("stream", name="stdout", text=text))
    nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


def test_notebook_page_is_sanitised(tmp_path) -> None:
    from mkdocs_jupyter.nbconvert2 import nb2html

    html = nb2html(str(_hostile_notebook(tmp_path / "nb.ipynb")))
    page = f"<html><body><main>{html}</main></body></html>"
    assert check_page(page), "the raw conversion is unsafe (else this test shows nothing)"
    clean = sanitize_notebook_page(page)
    assert clean is not None and check_page(clean) == []
    assert "alert(" not in "".join(s for s in clean.split("<script")[1:] if "clipboard" not in s)
    from bs4 import BeautifulSoup

    urls = [(el.name, k, v) for el in BeautifulSoup(clean, "html.parser").find_all(True)
            for k, v in el.attrs.items() if k != "xmlns" and ":" in str(v) and "//" in str(v)]
    assert urls == [], "no link or resource elsewhere is left in a notebook"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in clean  # the stream output: escaped text
    assert "clipboard-copy-icon" in clean  # the template's own copy button survives, with its icon
    assert sanitize_notebook_page("<html><body><p>no notebook</p></body></html>") is None


@pytest.mark.parametrize(
    "html",
    [
        '<a href="javascript:alert(1)">x</a>',
        '<a href="  JaVa&#x0A;Script:alert(1)">x</a>',
        '<a href="vbscript:x">x</a>',
        '<a href="data:text/html,<script>alert(1)</script>">x</a>',
        '<img src="https://example.com/x.png">',
        '<img src="//example.com/x.png">',
        '<img srcset="a.png 1x, https://example.com/x.png 2x">',
        '<script src="https://unpkg.com/iframe-worker/shim"></script>',
        '<link rel="stylesheet" href="https://example.com/x.css">',
        '<iframe src="https://example.com"></iframe>',
        '<div style="background: url(https://example.com/x.png)">x</div>',
        "<style>@import 'https://example.com/x.css';</style>",
        '<img src="x" onerror="alert(1)">',
        '<meta http-equiv="refresh" content="0; url=https://example.com">',
    ],
)
def test_check_flags_what_a_browser_would_run_or_fetch(html) -> None:
    assert check_page(f"<html><body>{html}</body></html>"), html


def test_check_allows_local_resources_and_plain_links() -> None:
    page = ('<a href="https://squidfunk.github.io/mkdocs-material/">made with</a> <a href="../x.html#a">x</a>'
            '<img src="charts/loss.png"> <img src="data:image/png;base64,iVBORw0KGgo="> '
            '<script src="assets/sort.js"></script><link rel="stylesheet" href="assets/extra.css">'
            '<p>[x](javascript:alert(1)) as text</p>')
    assert check_page(page) == []


def _nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    items = nav.values() if isinstance(nav, dict) else nav
    return [page for item in items for page in _nav_pages(item)]


def test_build_refuses_an_unsafe_site_and_keeps_the_previous_one(tmp_path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs" / "assets", docs / "assets")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    for page in _nav_pages(config["nav"]):  # a placeholder for each page the navigation names
        (docs / page).parent.mkdir(parents=True, exist_ok=True)
        (docs / page).write_text(f"# {page}\n")
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    first = site.build_site(tmp_path / "mkdocs.yml", capture=True)
    assert first.returncode == 0, first.stderr[-3000:]
    built = tmp_path / "site"
    assert check_site(built) == [] and (built / "search" / "search_index.js").is_file()
    before = (built / "method.html").read_text()

    (docs / "method.md").write_text('# method\n\n<img src="https://example.com/x.png">\n')
    second = site.build_site(tmp_path / "mkdocs.yml", capture=True)
    assert second.returncode == 1
    assert "method.html: <img src='https://example.com/x.png'>: remote resource" in second.stderr
    assert (built / "method.html").read_text() == before, "the unsafe site replaced the previous one"
    assert not [p.name for p in tmp_path.iterdir() if ".staging-" in p.name]
