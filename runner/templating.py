"""The Jinja environment of the site pages and its filters.

Everything that comes from a spec or a run (titles, notes, error messages) is untrusted text: the
environment autoescapes, tables are raw HTML (so Markdown syntax inside values stays inert), and Markdown
contexts (headings, paragraphs) use the ``md`` filter, which also backslash-escapes Markdown punctuation.
Undefined variables raise (StrictUndefined). Numbers go through runner.text.fmt (``num``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape

from runner.text import duration, fmt, md_text, sort_key  # md_text: also the notebook's escaping

TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "site"

def meta_title(value: Any) -> Markup:
    """A page title for YAML front matter. MkDocs would otherwise take the title from the H1 and the
    theme writes it into <title> with entities decoded (striptags), so untrusted text could open tags
    there; a front-matter title is used verbatim, so it is HTML-escaped here and JSON-quoted (valid YAML)."""
    return Markup(json.dumps(str(escape(" ".join(str(value).split()))), ensure_ascii=False))


def environment(templates: Path = TEMPLATES) -> Environment:
    """The Jinja environment for site pages: StrictUndefined, autoescape on, page filters."""
    env = Environment(
        loader=FileSystemLoader(str(templates)),
        undefined=StrictUndefined,
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(esc=escape, md=md_text, meta_title=meta_title, num=fmt, sortkey=sort_key,
                       duration=duration)
    return env
