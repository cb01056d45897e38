"""Figures drawn once and stored with a snapshot: a content-addressed cache in front of the site's drawers.

    render_site --chart/figure request--> FigureCache --hit (its recorded sha256 verified)--> copy the PNG
                                                     --miss--> the real drawer (runner.charts) [--> store]

A figure's key is the sha256 of (`key_parts`): the drawer and the chart kind or figure name with its
options, the runs in order (each by the id the chart shows and the sha256 of the files a chart reads:
metrics.json and stats.npz), and the sha256 of the drawing code (runner/charts.py and the runner modules
it draws with) and the matplotlib version. Any change to what a chart is drawn from is a new key, so a
stored figure is never stale: it is found or it is not.

Stores: `published/NAME/_figures/` holds `<key>.png` and `index.json` (each file's sha256 and size),
filled by `python -m runner publish` and only read by `runner site` (a committed snapshot is not written
by building its site). A store serves only figures whose runs all belong to it; a figure that mixes runs
of several snapshots or local runs, or that shows a damaged run, is simply drawn. A stored PNG whose
sha256 is not the recorded one is never served: it is redrawn, and reported once.

The folder starts with '_' so that `runner.results.load_runs` does not take it for a run folder.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from runner.files import read_json, write_atomic, write_json
from runner.manifest import sha256_file
from runner.results import METRICS_FILE, STATS_FILE, Run

FIGURES = "_figures"  # published/NAME/_figures/
INDEX = "index.json"
VERSION = 1
MODES = ("read", "store")
# The drawing code: charts.py and the runner modules whose values it draws with (window, limits, formats).
CODE = ("charts.py", "bngap.py", "insights.py", "statsfile.py", "text.py")
_RUNNER = Path(__file__).resolve().parent
Drawer = Callable[[Sequence[Run], str, Path], Path]  # runner.site.Drawer


class FigureCacheWarning(UserWarning):
    """A stored figure failed its check and was redrawn instead of served."""


def code_hash() -> str:
    import matplotlib

    digest = hashlib.sha256(f"matplotlib {matplotlib.__version__}\n".encode())
    for name in CODE:
        digest.update(f"{name} {sha256_file(_RUNNER / name)}\n".encode())
    return digest.hexdigest()


class FigureCache:
    """Serves figures from the _figures/ stores of `snapshots` (folders of run folders). `mode`: "read"
    (runner site: a committed snapshot is never written) or "store" (runner publish: what is drawn is
    stored; `save` writes the index). Wrap the drawers with `chart` and `figure`; `counts` says how many
    figures were served from a store, reused from earlier in this render, drawn, and found stored but
    failing their check (rejected)."""

    def __init__(self, snapshots: Sequence[Path], mode: str = "read"):
        if mode not in MODES:
            raise ValueError(f"figure cache mode {mode!r}: expected one of {', '.join(MODES)}")
        self.write = mode == "store"
        self.stores = {Path(s).resolve(): Path(s) / FIGURES for s in snapshots}
        self.index = {root: _read_index(store) for root, store in self.stores.items()}
        self.code = code_hash()
        self.counts = {"served": 0, "reused": 0, "drawn": 0, "rejected": 0}
        self._hashes: dict[Path, str | None] = {}
        self._drawn: dict[str, tuple[Path, str]] = {}  # key -> (first output this render, its sha256)
        self._reported: set[Path] = set()

    # ------------------------------------------------------------ wrapping the drawers

    def chart(self, draw: Drawer) -> Drawer:
        """A site Drawer (runs, kind, out) in front of `draw` (runner.charts.comparison_chart)."""
        return lambda runs, kind, out: self.serve("chart", kind, {}, runs, Path(out),
                                                  lambda: draw(runs, kind, out))

    def figure(self, draw: Callable[..., Path]) -> Callable[..., Path]:
        """A writeup figure drawer (name, runs, out, **options) in front of `draw` (charts.writeup_figure)."""
        return lambda name, runs, out, **options: self.serve("figure", name, options, runs, Path(out),
                                                             lambda: draw(name, runs, out, **options))

    # ------------------------------------------------------------ keys

    def key_parts(self, drawer: str, name: str, options: dict[str, Any], runs: Sequence[Run]
                  ) -> dict[str, Any] | None:
        """What a figure is drawn from, or None when it is not cached (a damaged run: drawn as such)."""
        parts = []
        for run in runs:
            if run.damaged or run.metrics is None:
                return None
            parts.append({"id": run.id, METRICS_FILE: self._sha(run.folder / METRICS_FILE),
                          STATS_FILE: self._sha(run.folder / STATS_FILE)})
        return {"version": VERSION, "drawer": drawer, "name": name, "options": options, "runs": parts,
                "code": self.code}

    def key(self, drawer: str, name: str, options: dict[str, Any], runs: Sequence[Run]) -> str | None:
        parts = self.key_parts(drawer, name, options, runs)
        if parts is None:
            return None
        text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def _sha(self, path: Path) -> str | None:
        if path not in self._hashes:
            self._hashes[path] = sha256_file(path) if path.is_file() else None
        return self._hashes[path]

    def _store_of(self, runs: Sequence[Run]) -> Path | None:
        """The snapshot folder all `runs` belong to, when it has a store; else None (drawn, not stored)."""
        roots = {r.folder.resolve().parent for r in runs}
        root = roots.pop() if len(roots) == 1 else None
        return root if root in self.stores else None

    # ------------------------------------------------------------ serving

    def serve(self, drawer: str, name: str, options: dict[str, Any], runs: Sequence[Run], out: Path,
              draw: Callable[[], Path]) -> Path:
        root = self._store_of(runs)
        key = self.key(drawer, name, options, runs)
        if key is not None and key in self._drawn and _copy_verified(*self._drawn[key], out):
            self.counts["reused"] += 1  # drawn earlier in this render (the same chart on two pages)
            return out
        if root is not None and key is not None:
            entry = self.index[root].get(f"{key}.png")
            src = self.stores[root] / f"{key}.png"
            if entry is not None:
                if _copy_verified(src, str(entry.get("sha256")), out):
                    self.counts["served"] += 1
                    return out
                self._reject(src)
        written = Path(draw())
        self.counts["drawn"] += 1
        if key is not None:
            sha = sha256_file(written)
            self._drawn[key] = (written, sha)
            if root is not None and self.write:
                self._store(root, key, written, sha, drawer, name, runs)
        return written

    def _reject(self, src: Path) -> None:
        self.counts["rejected"] += 1
        if src not in self._reported:
            self._reported.add(src)
            warnings.warn(f"figure cache: {src} is missing or does not match its recorded sha256; "
                          "redrawn, not served", FigureCacheWarning, stacklevel=3)

    def _store(self, root: Path, key: str, png: Path, sha: str, drawer: str, name: str,
               runs: Sequence[Run]) -> None:
        dst = self.stores[root] / f"{key}.png"
        write_atomic(dst, lambda tmp: tmp.write_bytes(png.read_bytes()))
        self.index[root][dst.name] = {"sha256": sha, "size": dst.stat().st_size,
                                      "what": f"{drawer} {name}: {', '.join(r.id for r in runs)}"}

    def save(self) -> dict[str, int]:
        """Write each writable store's index.json; the number of figures and their bytes, over all stores."""
        files = size = 0
        for root, store in self.stores.items():
            entries = self.index[root]
            if self.write and entries:
                write_json(store / INDEX, {"version": VERSION, "code": self.code, "files": entries})
            files += len(entries)
            size += sum(int(e.get("size", 0)) for e in entries.values())
        return {"figures": files, "bytes": size}


def _read_index(store: Path) -> dict[str, dict[str, Any]]:
    """index.json's files ({} when there is none or it is unreadable: every figure is then drawn)."""
    try:
        data = read_json(store / INDEX)
        files = data["files"] if data.get("version") == VERSION else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    return {str(k): v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}


def _copy_verified(src: Path, sha: str, out: Path) -> bool:
    """Copy `src` to `out` when its bytes hash to `sha`; False (nothing written) otherwise."""
    try:
        data = src.read_bytes()
    except OSError:
        return False
    if hashlib.sha256(data).hexdigest() != sha:
        return False
    write_atomic(out, lambda tmp: tmp.write_bytes(data))
    return True
