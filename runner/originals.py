"""The original notebooks' printed per-epoch losses, and a run's losses beside them.

Input data: ``data/reference/original_results.md`` (provenance in ``data/reference/README.md``), one
``## <notebook>`` section per notebook holding a Markdown table ``| epoch | train | valid |`` with
epochs 0, 1, 2, ...; a notebook that trained again from where it stopped has one table per training
segment, each after a line starting "Training segment". ``nan`` is what the notebook printed and is
kept as a float NaN. Anything else in the file (notes, blank lines) is ignored; a malformed table
is an error naming the file, the line and what was expected.

``compare_losses`` puts a run's metrics.json epochs beside one notebook segment: our epoch ``e``
(1-based, as metrics.json numbers them) is the originals' epoch ``e - 1`` (0-based, as printed).
This module is torch-free: the report imports it.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ORIGINAL_RESULTS", "ComparisonRow", "EpochLoss", "OriginalRun", "OriginalsError", "compare_losses",
    "find_original", "load_original_results", "parse_original_results",
]

ORIGINAL_RESULTS = Path(__file__).resolve().parents[1] / "data" / "reference" / "original_results.md"

_HEADER = re.compile(r"^\|\s*epoch\s*\|\s*train\s*\|\s*valid\s*\|$")
_RULE = re.compile(r"^\|(\s*:?-+:?\s*\|){3}$")
_ROW = re.compile(r"^\|([^|]*)\|([^|]*)\|([^|]*)\|$")


class OriginalsError(ValueError):
    """The originals' results file is malformed, or names no such notebook."""


@dataclass(frozen=True)
class EpochLoss:
    epoch: int  # 0-based, as the notebook printed it
    train: float  # NaN where the notebook printed nan
    valid: float


@dataclass(frozen=True)
class OriginalRun:
    notebook: str
    segments: tuple[tuple[EpochLoss, ...], ...]  # one per training segment, in order

    @property
    def epochs(self) -> tuple[EpochLoss, ...]:
        """The first training segment: what a spec reproducing the notebook's first fit compares with."""
        return self.segments[0]


@dataclass(frozen=True)
class ComparisonRow:
    """One epoch of ours beside theirs (differences: ours - theirs). None where a side has no value;
    theirs is NaN where the notebook printed nan (and the difference None)."""

    epoch: int  # the originals' 0-based epoch (our metrics.json epoch - 1)
    ours_train: float | None
    theirs_train: float | None
    train_diff: float | None
    ours_valid: float | None
    theirs_valid: float | None
    valid_diff: float | None


def _value(cell: str, where: str) -> float:
    text = cell.strip()
    if text == "nan":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise OriginalsError(f"{where}: expected a loss (a number or nan), got {text!r}") from None


def parse_original_results(text: str, source: str = "original_results.md") -> dict[str, OriginalRun]:
    """{notebook: OriginalRun} from the file's text, in file order; `source` names it in errors."""
    runs: dict[str, list[list[EpochLoss]]] = {}
    notebook: str | None = None
    segment: list[EpochLoss] | None = None  # the table being read
    new_segment = True  # the next table starts a segment
    for number, raw in enumerate(text.splitlines(), start=1):
        line, where = raw.strip(), f"{source}:{number}"
        if line.startswith("## "):
            notebook = line[3:].strip()
            if notebook in runs:
                raise OriginalsError(f"{where}: notebook {notebook!r} appears twice")
            runs[notebook], segment, new_segment = [], None, True
        elif line.startswith("Training segment"):
            segment, new_segment = None, True
        elif _HEADER.match(line) or _RULE.match(line):
            if notebook is None:
                raise OriginalsError(f"{where}: a table before any '## <notebook>' heading")
            if segment is None and not new_segment:
                raise OriginalsError(f"{where}: a second table without a 'Training segment' line before it")
            if segment is None:
                segment, new_segment = [], False
                runs[notebook].append(segment)
        elif line.startswith("|"):
            match = _ROW.match(line)
            if segment is None or match is None:
                raise OriginalsError(f"{where}: expected a row '| epoch | train | valid |' inside a table, "
                                     f"got {line!r}")
            epoch_text = match.group(1).strip()
            if epoch_text != str(len(segment)):
                raise OriginalsError(f"{where}: expected epoch {len(segment)} (epochs count up from 0), "
                                     f"got {epoch_text!r}")
            train, valid = (_value(match.group(k), where) for k in (2, 3))
            segment.append(EpochLoss(len(segment), train, valid))
        elif line and segment is not None and segment:
            segment = None  # text after a table ends it
    empty = [n for n, segs in runs.items() if not segs or not all(segs)]
    if empty:
        raise OriginalsError(f"{source}: no epochs for notebook(s) {empty}")
    return {n: OriginalRun(n, tuple(tuple(s) for s in segs)) for n, segs in runs.items()}


def load_original_results(path: str | Path = ORIGINAL_RESULTS) -> dict[str, OriginalRun]:
    """The bundled originals' results (or another file in the same format)."""
    path = Path(path)
    return parse_original_results(path.read_text(encoding="utf-8"), str(path))


def find_original(runs: Mapping[str, OriginalRun], notebook: str) -> OriginalRun:
    """The notebook's run; an unknown name is an error listing the closest names."""
    if notebook in runs:
        return runs[notebook]
    close = difflib.get_close_matches(notebook, list(runs), n=3, cutoff=0.5)
    raise OriginalsError(f"no printed losses for notebook {notebook!r}; closest: {close or 'none'}")


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def compare_losses(ours: Sequence[Mapping[str, Any]], theirs: Sequence[EpochLoss]) -> list[ComparisonRow]:
    """Our metrics.json ``epochs`` beside one segment of theirs, epoch by epoch, over the longer of the two.

    A difference needs a finite value on both sides: an epoch one side did not reach, a nan the notebook
    printed or a loss our run did not record (null in metrics.json) gives None there.
    """
    by_epoch = {int(e["epoch"]) - 1: e for e in ours}
    last = max([*by_epoch, len(theirs) - 1], default=-1)
    rows = []
    for i in range(last + 1):
        mine = by_epoch.get(i, {})
        other = theirs[i] if i < len(theirs) else None
        cells: list[float | None] = []
        for ours_key, theirs_key in (("train_loss", "train"), ("valid_loss", "valid")):
            a = _finite(mine.get(ours_key))
            b = getattr(other, theirs_key) if other is not None else None
            diff = a - b if a is not None and b is not None and math.isfinite(b) else None
            cells += [a, b, diff]
        rows.append(ComparisonRow(i, *cells))
    return rows
