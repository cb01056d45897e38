"""The project's one number format, one slug function and one escaping of untrusted text for Markdown
(`md_text`), used by pages, sentences, tables, charts and the notebook.

A value shown anywhere goes through `fmt`, so the same number never reads "1230" on one page and
"1.23e+03" on another, and a sentence never states a number its table shows differently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from markupsafe import Markup, escape

DASH = "\u2014"
# Python-Markdown's backslash escapes (plus '|' from the tables extension); CommonMark renderers
# (mistune in nbconvert) honour the same escapes.
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|])")
_COUNT_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")


def fmt(x: Any) -> str:
    """Ints exactly (thousands separated), floats to 3 significant digits (trailing zeros dropped,
    scientific below 1e-4 or from 1e5), "∞" for infinities, DASH for None, NaN and non-numbers."""
    if x is None or isinstance(x, bool):
        return DASH
    if isinstance(x, int) or type(x).__name__.startswith(("int", "uint")):
        try:
            return f"{int(x):,}"
        except (TypeError, ValueError):
            return DASH
    try:
        x = float(x)
    except (TypeError, ValueError):
        return DASH
    if math.isnan(x):
        return DASH
    if math.isinf(x):
        return "\u221e" if x > 0 else "-\u221e"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    if mag >= 5 or mag < -4:
        return f"{x:.2e}"
    decimals = 2 - mag
    if decimals <= 0:
        return f"{int(round(x, decimals)):,}"
    return f"{round(x, decimals):.{decimals}f}".rstrip("0").rstrip(".")


def sort_key(value: Any) -> str:
    """The raw value for a sortable table cell's data-sort attribute ('' sorts last)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value) if math.isfinite(value) else ""
    return "" if value is None else str(value)


def slug(text: str, taken: set[str] | None = None, default: str = "item") -> str:
    """A URL- and file-safe slug (lowercase letters, digits, '_' and '-'); with `taken`, suffixed -2,
    -3 ... until it is not in `taken`, which it is then added to."""
    base = re.sub(r"[^a-z0-9_-]+", "-", str(text).lower()).strip("-_")[:60] or default
    if taken is None:
        return base
    out, n = base, 2
    while out in taken:
        out, n = f"{base}-{n}", n + 1
    taken.add(out)
    return out


def slugs(names: Iterable[str], default: str = "item") -> dict[str, str]:
    """A distinct slug per distinct name, in order of first appearance."""
    taken: set[str] = set()
    return {name: slug(name, taken, default) for name in dict.fromkeys(names)}


def count_word(n: int) -> str:
    """Small counts spelled out, so that every digit in a sentence is a number from its table."""
    return _COUNT_WORDS[n] if 0 <= n < len(_COUNT_WORDS) else fmt(n)


def join_words(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def plural(n: int, word: str, shown: str | None = None) -> str:
    return f"{fmt(n) if shown is None else shown} {word}{'' if n == 1 else 's'}"


def duration(seconds: Any) -> str:
    """Seconds for people: "12.3 s", "4 min 05 s", "1 h 02 min"; DASH when not a finite number."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return DASH
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def md_text(value: Any) -> Markup:
    """Untrusted text for a Markdown context (heading, paragraph, table cell, alt text), on the site's
    pages (the ``md`` filter) and in the notebook's Markdown output alike: whitespace collapsed to one
    line (a newline cannot start a new block), Markdown punctuation backslash-escaped (no link, image or
    emphasis), then HTML-escaped (in that order, so entities such as &#39; keep their '#')."""
    text = " ".join(str(value).split())
    return Markup(escape(_MD_SPECIAL.sub(r"\\\1", text)))
