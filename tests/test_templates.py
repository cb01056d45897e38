"""Templates state only measured things: no number may be written into a template's text, except a few
that are part of notation (ranges such as [0, 1), formulas)."""

from __future__ import annotations

import re
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "site"
ALLOWED = {"0", "1", "2"}  # [0, 1), 1 − ᾱ, t·π/2
_JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?%?(?![\w])")


def numbers_in(text: str) -> list[str]:
    """Numbers in a template's literal text (Jinja expressions, statements and comments removed)."""
    return _NUMBER.findall(_JINJA.sub(" ", text))


def test_templates_write_no_numbers_outside_the_allowlist() -> None:
    found = {p.name: [n for n in numbers_in(p.read_text(encoding="utf-8")) if n not in ALLOWED]
             for p in sorted(TEMPLATES.glob("*.j2"))}
    assert {name: nums for name, nums in found.items() if nums} == {}


def test_the_check_sees_numbers_in_text_but_not_in_expressions() -> None:
    assert numbers_in("stds climb to 300, near 5.5 {{ x|num(3) }} {% if a > 40 %}") == ["300", "5.5"]
    assert numbers_in("UNet2DModel fp16 [0, 1) {# 99 #}") == ["0", "1"]
