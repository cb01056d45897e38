"""Run folders (results/<id>/) -> Markdown pages in docs/ for MkDocs (mkdocs.yml at the repo root).

Pages (all generated; docs/assets/ is the only hand-written part of docs/ and is never touched):

- ``index.md``                    home: what the lab studies, writeup link, healthiest/least healthy examples
- ``experiments/index.md``        sortable table of every run (docs/assets/sort.js sorts it in the browser)
- ``experiments/<id>/index.md``   one run: status, resolved spec, metrics, charts, executed notebook
- ``comparisons/index.md``, ``comparisons/<kind>.md``   one comparison chart per spec group and chart kind
- ``insights/index.md``, ``insights/{summary,architecture,hyperparameters,reading}.md``   health verdicts,
  per-axis tables, sentences and comparison charts (``insights/charts/``) from runner.insights
- ``method.md``                   how runs are made, what the statistics mean, the health measures

Health (measures, verdicts, ranking) has one source, runner.insights: each run is assessed once per
render (reading its stats.npz once) and every page that shows a max std or a verdict takes it from there.

Everything that comes from a spec or a run (titles, notes, error messages) is untrusted text: the
Jinja environment autoescapes, tables are raw HTML (so Markdown syntax inside values stays inert), and
Markdown contexts (headings, paragraphs) use the ``md`` filter, which also backslash-escapes Markdown
punctuation. Pages are rendered into a hidden staging folder inside docs/ and moved into place only when
every page rendered, so a failure leaves the previous pages intact.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape

from runner import insights as ins
from runner.spec import SAFE_ID, Spec, SpecError, load_resolved

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates" / "site"
KEEP = frozenset({"assets"})  # hand-written entries of docs/ that rendering never removes
STAGING_PREFIX = ".render-"  # MkDocs skips dot-folders, so a leftover staging folder never gets built
DASH = "\u2014"
# runner.stats.HIST_BINS / HIST_RANGE (fixed by the contract; tests check they agree). Not imported:
# runner.stats imports torch, which rendering pages should not wait for.
HIST_BINS, HIST_RANGE = 40, (0.0, 10.0)

# Fallback used only while runner.charts cannot be imported (its CHART_KINDS are the real ones).
FALLBACK_KINDS = ("loss", "stats", "hist", "dead")
KIND_TITLES = ins.CHART_TITLES
# Comparison charts per axis on the insight pages: activations first, the loss last.
INSIGHT_KINDS = ("stats", "hist", "dead", "loss")
EXAMPLE_KINDS = ("stats", "hist", "dead")  # the charts the home page shows its two examples with


class SiteError(ValueError):
    """Results could not be turned into pages: the message names the file or id and what was expected."""


# ---------------------------------------------------------------- loading runs


@dataclass(frozen=True)
class RunRecord:
    """One run folder: its resolved spec, metrics.json and chart PNGs (file stem -> path)."""

    id: str
    spec: Spec
    metrics: dict[str, Any]
    run_dir: Path
    charts: dict[str, Path] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return str(self.metrics.get("status") or "failed")


def safe_id(value: str, what: str = "id") -> str:
    """Return `value` if it may become a path/URL component (the spec's SAFE_ID), else raise SiteError."""
    if not isinstance(value, str) or not SAFE_ID.match(value):
        raise SiteError(f"{what} {value!r} is not a safe id; expected lowercase letters, digits, '_' or '-'")
    return value


def load_runs(results_dir: Path) -> list[RunRecord]:
    """Every run folder under `results_dir` that has a metrics.json, sorted by id.

    Folders starting with '.' or '_' (temporary or in progress) and folders without metrics.json are
    skipped; failed runs have metrics too and are kept. An unsafe folder name, unreadable metrics, or a
    missing/invalid spec.yaml raises SiteError.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return []
    runs = []
    for run_dir in sorted(results_dir.iterdir()):
        if run_dir.name.startswith((".", "_")) or not run_dir.is_dir():
            continue
        if not (run_dir / "metrics.json").is_file():
            continue
        runs.append(load_run(run_dir))
    return runs


def load_run(run_dir: Path) -> RunRecord:
    """Load one run folder (see load_runs)."""
    run_id = safe_id(run_dir.name, f"run folder {run_dir}:")
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SiteError(f"{run_dir / 'metrics.json'}: unreadable metrics ({e})") from None
    if not isinstance(metrics, dict):
        raise SiteError(f"{run_dir / 'metrics.json'}: expected a JSON object")
    try:
        spec = load_resolved(run_dir / "spec.yaml")
    except SpecError as e:
        raise SiteError(f"{run_dir}: {e}") from None
    if spec.id != run_id:
        raise SiteError(f"{run_dir}: spec.yaml has id {spec.id!r}; expected the folder name {run_id!r}")
    charts = {p.stem: p for p in sorted((run_dir / "charts").glob("*.png")) if SAFE_ID.match(p.stem)}
    return RunRecord(id=run_id, spec=spec, metrics=metrics, run_dir=run_dir, charts=charts)


# ---------------------------------------------------------------- Jinja environment and filters

# Python-Markdown's backslash escapes (plus '|' from the tables extension).
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|])")


def md_text(value: Any) -> Markup:
    """Untrusted text for a Markdown context (heading, paragraph, alt text): whitespace collapsed to one
    line, Markdown punctuation backslash-escaped, then HTML-escaped (in that order, so entities such as
    &#39; keep their '#')."""
    text = " ".join(str(value).split())
    return Markup(escape(_MD_SPECIAL.sub(r"\\\1", text)))


def meta_title(value: Any) -> Markup:
    """A page title for YAML front matter. MkDocs would otherwise take the title from the H1 and the
    theme writes it into <title> with entities decoded (striptags), so untrusted text could open tags
    there; a front-matter title is used verbatim, so it is HTML-escaped here and JSON-quoted (valid YAML)."""
    return Markup(json.dumps(str(escape(" ".join(str(value).split()))), ensure_ascii=False))


def fmt_num(value: Any, digits: int = 4) -> str:
    """Numbers for pages: ints exactly (with thousands separators), floats to `digits` significant
    digits, DASH for null/non-finite/missing."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return DASH
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    value = float(value)
    return f"{value:.{digits}g}" if math.isfinite(value) else DASH


def sort_key(value: Any) -> str:
    """Raw value for a table cell's data-sort attribute ('' sorts last)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value) if math.isfinite(value) else ""
    return "" if value is None else str(value)


def fmt_duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return DASH
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


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
    env.filters.update(
        esc=escape, md=md_text, meta_title=meta_title, num=fmt_num, sortkey=sort_key, duration=fmt_duration
    )
    return env


# ---------------------------------------------------------------- page models


def _charts_api() -> tuple[tuple[str, ...], dict[str, str], Callable[..., Path] | None]:
    try:
        from runner.charts import CAPTIONS, CHART_KINDS, comparison_chart
    except ImportError:
        return FALLBACK_KINDS, {k: "" for k in FALLBACK_KINDS}, None
    return tuple(CHART_KINDS), dict(CAPTIONS), comparison_chart


def status_text(metrics: dict[str, Any]) -> str:
    status = metrics.get("status") or "failed"
    if status == "diverged":
        step = metrics.get("diverged_at_step")
        return f"diverged at step {step}" if step is not None else "diverged"
    return str(status)


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _seed_name(spec: Spec) -> str | None:
    try:
        return spec.seed_name()
    except SpecError:
        return None


def _spec_rows(spec: Spec) -> list[tuple[str, str]]:
    """Every resolved field as (dotted name, text) rows: what the run actually used."""
    rows: list[tuple[str, str]] = []
    for key, value in spec.model_dump(mode="json").items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            name = f"{key}.{sub}" if sub else key
            if isinstance(v, list):
                v = ", ".join(str(x) for x in v)
            rows.append((name, DASH if v is None else str(v)))
    rows.append(("content_hash", spec.content_hash()))
    return rows


def _noise_text(spec: Spec) -> str:
    n = spec.noise
    sched = n.schedule if n.beta_end is None else f"{n.schedule} \u03b2_end={n.beta_end:g}"
    return f"{sched}, t {n.timestep_input}"


def _notebook_check(path: Path) -> tuple[bool, list[str]]:
    """(readable, errors): error outputs as 'ename: evalue' (mkdocs-jupyter shows them without notice)."""
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
        cells = nb["cells"]
        errors = [
            f"{out.get('ename', 'Error')}: {_ANSI.sub('', str(out.get('evalue', '')))}"
            for cell in cells
            for out in cell.get("outputs", []) or []
            if isinstance(out, dict) and out.get("output_type") == "error"
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False, []
    try:
        import nbformat

        nbformat.reads(json.dumps(nb), as_version=4)
    except Exception:  # noqa: BLE001 - whatever nbformat rejects would also break the mkdocs build
        return False, []
    return True, errors


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class Entry:
    """One row of the site: a spec and its run (None: not run yet)."""

    spec: Spec
    run: RunRecord | None
    stale: bool = False

    @property
    def id(self) -> str:
        return self.spec.id


def _entries(runs: list[RunRecord], specs: Sequence[Spec] | None) -> list[Entry]:
    if specs is None:
        return [Entry(r.spec, r) for r in runs]
    by_id = {r.id: r for r in runs}
    out = []
    for spec in specs:
        run = by_id.get(safe_id(spec.id, "spec id"))
        stale = run is not None and run.metrics.get("spec_hash") not in (None, spec.content_hash())
        out.append(Entry(spec, run, stale))
    return out


def _row(entry: Entry, item: ins.Assessed | None) -> dict[str, Any]:
    """Table row view: resolved fields from the run's own spec (what ran), text from the given spec,
    health (max std, verdict) from the run's assessment (None: not run)."""
    spec = entry.run.spec if entry.run else entry.spec
    m = spec.model
    metrics = entry.run.metrics if entry.run else {}
    return {
        "id": entry.id,
        "linked": entry.run is not None,
        "title": entry.spec.title or entry.id,
        "family": m.family,
        "channels": ",".join(map(str, m.block_out_channels)),
        "blocks": m.blocks if m.family == "diffusers" else f"attn\u2265{m.attention_start}",
        "norms": f"{m.resnet_norm} / {m.attention_norm}" if m.family == "diffusers" else "course (batch)",
        "init": m.init,
        "lr": spec.train.lr,
        "batch": spec.train.batch_size,
        "noise": _noise_text(spec),
        "scale": spec.data.scale,
        "status": status_text(metrics) if entry.run else "not run",
        "status_class": (metrics.get("status") or "failed") if entry.run else "missing",
        "stale": entry.stale,
        "train_loss": _get(metrics, "final", "train_loss"),
        "valid_loss": _get(metrics, "final", "valid_loss"),
        "max_std": item.health.max_std if item else None,
        "verdict": item.verdict.level if item else None,
        "verdict_rank": ins.LEVELS.index(item.verdict.level) if item else None,
        "reasons": list(item.verdict.reasons) if item else [],
    }


def _model_notes(spec: Spec) -> list[str]:
    """What some spec fields really do to the model, in the words of the stage that builds it."""
    from runner.models import ATTENTION_NORM_NOTE, CONV_FLAG_NOTE
    from runner.noise import describe_timestep

    notes = [describe_timestep(spec.noise, spec.model.family)]
    if spec.model.conv == "conv2d":
        notes.append(CONV_FLAG_NOTE)
    if spec.model.family == "diffusers" and spec.model.attention_norm != "group":
        notes.append(ATTENTION_NORM_NOTE)
    return notes


def _suites() -> list[dict[str, Any]]:
    """For each profile, the specs under experiments/ that `run_all` runs with it (invalid specs skipped:
    `python -m runner validate` reports them)."""
    from runner.spec import PROFILES, discover, load_spec

    specs = []
    for path in discover(ROOT / "experiments") if (ROOT / "experiments").is_dir() else []:
        try:
            specs.append(load_spec(path))
        except SpecError:
            continue
    return [{"name": p, "ids": [s.id for s in specs if p in s.suites]} for p in PROFILES]


def _experiment_page(
    entry: Entry,
    run: RunRecord,
    kinds: Sequence[str],
    captions: dict[str, str],
    notebook: tuple[bool, list[str]] | None,
    item: ins.Assessed,
    axis_anchor: tuple[str, str] | None = None,
) -> dict[str, Any]:
    m = run.metrics
    ordered = [k for k in kinds if k in run.charts] + sorted(set(run.charts) - set(kinds))
    return {
        "id": run.id,
        "title": entry.spec.title or run.id,
        "notes": [p for p in re.split(r"\n\s*\n", entry.spec.notes.strip()) if p],
        "group": entry.spec.group,
        "axis": run.spec.axis,
        "axis_anchor": axis_anchor,  # (insight page stem, heading anchor) of the run's axis, or None
        "status": m.get("status") or "failed",
        "status_text": status_text(m),
        "diverged_at": m.get("diverged_at_step"),
        "error": m.get("error"),
        "stale": entry.stale,
        "run_hash": m.get("spec_hash"),
        "spec_hash": entry.spec.content_hash(),
        "seed_name": _seed_name(run.spec),
        "verdict": item.verdict.level,
        "reasons": list(item.verdict.reasons),
        "max_std_module": item.health.max_std_module,
        "model_notes": _model_notes(run.spec),
        "spec_rows": _spec_rows(run.spec),
        "metrics": {
            "train_loss": _get(m, "final", "train_loss"),
            "valid_loss": _get(m, "final", "valid_loss"),
            "valid_loss_batch_stats": _get(m, "final", "valid_loss_batch_stats"),
            "steps_completed": m.get("steps_completed"),
            "steps_total": m.get("steps_total"),
            "steps_per_epoch": m.get("steps_per_epoch"),
            "params": m.get("params"),
            "total_s": _get(m, "timings", "total_s"),
            "step_s": _get(m, "timings", "step_s"),
            "device": _get(m, "environment", "device"),
            "precision": _get(m, "environment", "precision"),
            "versions": ", ".join(
                f"{k} {v}"
                for k in ("python", "torch", "diffusers")
                if (v := _get(m, "environment", k)) is not None
            ),
            "profile": m.get("profile") or run.spec.profile,
            "max_std": item.health.max_std,
        },
        "epochs": [e for e in m.get("epochs") or [] if isinstance(e, dict)],
        "charts": [
            {"file": f"{k}.png", "kind": k, "title": KIND_TITLES.get(k, k), "caption": captions.get(k, "")}
            for k in ordered
        ],
        "notebook": None if notebook is None else {"readable": notebook[0], "errors": notebook[1]},
    }


# ---------------------------------------------------------------- rendering


class _Writer:
    """Renders pages into a staging folder and remembers what it wrote (paths relative to docs/)."""

    def __init__(self, env: Environment, stage: Path):
        self.env, self.stage, self.pages = env, stage, []

    def page(self, rel: str, template: str, **context: Any) -> None:
        path = self.stage / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.env.get_template(template).render(**context), encoding="utf-8")
        self.pages.append(rel)

    def copy(self, src: Path, rel: str) -> None:
        dst = self.stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def render_site(
    results_dir: Path,
    docs_dir: Path,
    specs: list[Spec] | None = None,
) -> list[Path]:
    """Render every page from the run folders in `results_dir` into `docs_dir`; return the pages written.

    `specs` (optional) selects and orders the experiments (specs without a run are listed as "not run";
    titles/notes come from these specs, resolved fields from each run's own spec.yaml, and runs whose
    spec_hash differs are marked stale). Previously generated pages are replaced; docs_dir/assets/ is kept.
    """
    results_dir, docs_dir = Path(results_dir), Path(docs_dir)
    _check_docs_dir(docs_dir, results_dir)
    runs = load_runs(results_dir)
    entries = _entries(runs, specs)
    docs_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=docs_dir))
    try:
        writer = _Writer(environment(), stage)
        _render_all(writer, entries)
        _swap_in(stage, docs_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return [docs_dir / rel for rel in writer.pages]


def _check_docs_dir(docs_dir: Path, results_dir: Path) -> None:
    """Refuse folders where clearing generated pages could destroy something else."""
    d, r = docs_dir.resolve(), results_dir.resolve()
    if d == r or d in r.parents:
        raise SiteError(f"docs folder {docs_dir} contains the results folder {results_dir}")
    for marker in (".git", "pyproject.toml", "mkdocs.yml"):
        if (d / marker).exists():
            raise SiteError(f"docs folder {docs_dir} holds {marker}: looks like a project root, not docs/")


def _swap_in(stage: Path, docs_dir: Path) -> None:
    """Remove previously generated entries of docs_dir (never KEEP or dot entries), move the new ones in."""
    for old in docs_dir.iterdir():
        if old.name.startswith(STAGING_PREFIX) and old != stage and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)  # left by a render that was killed before its cleanup ran
            continue
        if old.name in KEEP or old.name.startswith("."):
            continue
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    for new in stage.iterdir():
        if new.name not in KEEP:
            new.replace(docs_dir / new.name)


def _render_all(w: _Writer, entries: list[Entry]) -> None:
    kinds, captions, comparison_chart = _charts_api()
    runs = [e.run for e in entries if e.run is not None]
    items = {i.id: i for i in ins.assess(runs)}  # reads each stats.npz, once for every page
    rows = [_row(e, items[e.id] if e.run is not None else None) for e in entries]
    anchors = ins.axis_anchors(items.values())
    for e in entries:
        if e.run is not None:
            anchor = anchors.get((e.run.spec.group, e.run.spec.axis))
            _render_experiment(w, e, e.run, kinds, captions, items[e.id], anchor)
    titles = {k: KIND_TITLES.get(k, k.capitalize()) for k in kinds}
    w.page("experiments/index.md", "experiments.md.j2", rows=rows, counts=_counts(rows))
    ready = [i for i in items.values() if i.health.has_stats and all(k in i.charts for k in EXAMPLE_KINDS)]
    w.page(
        "index.md",
        "home.md.j2",
        examples=_examples(ready),
        examples_ready=len(ready),
        verdicts=_verdict_counts(items.values()),
        captions=captions,
        titles=titles,
        counts=_counts(rows),
        kinds=kinds,
    )
    _render_comparisons(w, entries, kinds, captions, titles, comparison_chart)
    _render_insights(w, runs, list(items.values()), kinds, comparison_chart)
    w.page("method.md", "method.md.j2", **_method_context(runs))


def _render_experiment(
    w: _Writer,
    entry: Entry,
    run: RunRecord,
    kinds: Sequence[str],
    captions: dict[str, str],
    item: ins.Assessed,
    axis_anchor: tuple[str, str] | None,
) -> None:
    base = f"experiments/{safe_id(run.id)}"
    for stem, png in run.charts.items():
        w.copy(png, f"{base}/{stem}.png")
    nb_path = run.run_dir / "notebook.ipynb"
    notebook = _notebook_check(nb_path) if nb_path.is_file() else None
    if notebook is not None and notebook[0]:
        w.copy(nb_path, f"{base}/notebook.ipynb")
    w.page(
        f"{base}/index.md",
        "experiment.md.j2",
        run=_experiment_page(entry, run, kinds, captions, notebook, item, axis_anchor),
    )


def _counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts = {"total": len(rows)}
    for row in rows:
        counts[row["status_class"]] = counts.get(row["status_class"], 0) + 1
    return counts


def _verdict_counts(items: Iterable[ins.Assessed]) -> dict[str, int]:
    levels = [i.verdict.level for i in items]
    return {"total": len(levels), **{level: levels.count(level) for level in ins.LEVELS}}


def _examples(ready: list[ins.Assessed]) -> dict[str, Any] | None:
    """Healthiest and least healthy of the runs with statistics and the example charts, by the insights
    ranking (verdict, then health score); None with fewer than two such runs."""
    best, worst = ins.examples(ready, EXAMPLE_KINDS)
    if best is None or worst is None:
        return None

    def view(r: ins.RankedRun) -> dict[str, Any]:
        return {"id": r.id, "title": r.title, "level": r.verdict.level, "max_std": ins.fmt(r.health.max_std)}

    return {"kinds": EXAMPLE_KINDS, "good": view(best), "bad": view(worst)}


def _slug(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")[:60] or "group"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}-{i}", i + 1
    taken.add(slug)
    return slug


def _groups(entries: list[Entry]) -> list[tuple[str, list[Entry]]]:
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        if e.run is not None:
            groups.setdefault(e.spec.group, []).append(e)
    return sorted(groups.items())


def _render_comparisons(
    w: _Writer,
    entries: list[Entry],
    kinds: Sequence[str],
    captions: dict[str, str],
    titles: dict[str, str],
    comparison_chart: Callable[..., Path] | None,
) -> None:
    groups = _groups(entries)
    taken: set[str] = set()
    slugs = {name: _slug(name, taken) for name, _ in groups}
    for kind in kinds:
        sections = []
        for name, members in groups:
            section = {"name": name, "ids": [e.id for e in members], "image": None, "error": None}
            if comparison_chart is None:
                section["error"] = "runner.charts is not available, so no comparison chart was drawn."
            else:
                rel = f"comparisons/{kind}/{slugs[name]}.png"
                out = w.stage / rel
                try:
                    comparison_chart(
                        [e.run.run_dir for e in members if e.run], kind, out, [e.id for e in members]
                    )
                    section["image"] = f"{kind}/{slugs[name]}.png"
                except Exception as e:  # noqa: BLE001 - one bad chart shows on its page, the site still builds
                    warnings.warn(f"comparison chart {kind}/{name}: {e}", stacklevel=2)
                    section["error"] = f"{type(e).__name__}: {e}"
            sections.append(section)
        w.page(
            f"comparisons/{kind}.md",
            "comparison.md.j2",
            kind=kind,
            title=titles[kind],
            caption=captions.get(kind, ""),
            sections=sections,
        )
    w.page(
        "comparisons/index.md",
        "comparisons.md.j2",
        kinds=kinds,
        titles=titles,
        captions=captions,
        groups=[(name, [e.id for e in members]) for name, members in groups],
    )


def _render_insights(
    w: _Writer,
    runs: list[RunRecord],
    items: list[ins.Assessed],
    kinds: Sequence[str],
    comparison_chart: Callable[..., Path] | None,
) -> None:
    """insights/: one page per group with axis tables and comparison charts, the reading guide, the
    writeup (summary) and the index. `items` are the assessed `runs`."""
    tables = ins.axis_tables(items)
    for group in ins.PAGE_TITLES:
        mine = [t for t in tables if t.group == group]
        slugs = ins.axis_slugs(t.axis for t in mine)
        charts = {
            t.axis: _axis_charts(w, t, f"{group}-{slugs[t.axis]}", kinds, comparison_chart) for t in mine
        }
        w.page(f"insights/{group}.md", "insights_axis.md.j2", **ins.axis_page_context(items, group, charts))
    run_charts = {r.id: {k: f"../experiments/{r.id}/{k}.png" for k in r.charts} for r in runs}
    w.page("insights/reading.md", "insights_reading.md.j2", **ins.reading_context(items, run_charts))
    w.page("insights/summary.md", "insights_summary.md.j2", **ins.summary_context(items))
    w.page("insights/index.md", "insights.md.j2", **_insights_index(items, tables))


def _axis_charts(
    w: _Writer,
    table: ins.AxisTable,
    stem: str,
    kinds: Sequence[str],
    comparison_chart: Callable[..., Path] | None,
) -> list[tuple[str, str]]:
    """Draw the comparison charts of one axis table into insights/charts/<stem>-<kind>.png; returns
    [(kind, path relative to the insight page)] of those drawn (a failed chart is warned about and left
    out, so one bad run folder does not stop the site)."""
    if comparison_chart is None:
        return []
    out = []
    for kind in (k for k in INSIGHT_KINDS if k in kinds):
        rel = f"charts/{stem}-{kind}.png"
        try:
            run_dirs = [r.item.run.run_dir for r in table.rows]
            comparison_chart(run_dirs, kind, w.stage / "insights" / rel, [r.id for r in table.rows])
        except Exception as e:  # noqa: BLE001 - see the docstring
            warnings.warn(f"insight chart {stem}/{kind}: {type(e).__name__}: {e}", stacklevel=2)
            continue
        out.append((kind, rel))
    return out


_PAGE_TEXTS = {
    "architecture": "normalisation in the residual and attention blocks and other layer choices",
    "hyperparameters": "learning rate, batch size, noise schedule, init, width and more, each against the "
    "Diffusers baseline",
}


def _insights_index(items: list[ins.Assessed], tables: list[ins.AxisTable]) -> dict[str, Any]:
    pages = [
        {
            "file": "summary.md",
            "title": ins.SUMMARY_TITLE,
            "text": "every run ranked by health, with the measured takeaways and links to the evidence.",
        },
    ]
    for group, title in ins.PAGE_TITLES.items():
        mine = [t for t in tables if t.group == group]
        n = len({r.id for t in mine for r in t.rows})
        axes = f"{len(mine)} ax{'es' if len(mine) != 1 else 'is'}"
        runs = f"{n} run{'s' if n != 1 else ''} on {axes}" if n else "no runs yet"
        pages.append(
            {"file": f"{group}.md", "title": title, "text": f"{_PAGE_TEXTS.get(group, title)}; {runs}."}
        )
    reading = "the three activation charts explained with the healthiest and least healthy runs."
    pages.append({"file": "reading.md", "title": ins.READING_TITLE, "text": reading})
    counts = _verdict_counts(items)
    elsewhere = sorted({i.spec.group for i in items} - set(ins.PAGE_TITLES))
    return {"pages": pages, "counts": counts, "total": counts["total"], "elsewhere": elsewhere}


def _method_context(runs: list[RunRecord]) -> dict[str, Any]:
    from runner.spec import PROFILES, TrainSpec

    defaults = TrainSpec()
    return {
        "profiles": [
            {"name": k, "size": _get(v, "data", "size"), "epochs": _get(v, "train", "epochs")}
            for k, v in PROFILES.items()
        ],
        "used_profiles": sorted({r.spec.profile for r in runs}),
        "suites": _suites(),
        "bins": HIST_BINS,
        "range": tuple(HIST_RANGE),
        "bin_width": (HIST_RANGE[1] - HIST_RANGE[0]) / HIST_BINS,
        "train": defaults,
        **ins.method_context(),
    }


# ---------------------------------------------------------------- command line


def main(args: argparse.Namespace) -> int:
    """`python -m runner site`: render docs/ from --results, then `mkdocs build --strict` (skipped with
    --no-build). Exit status: 0 ok, 2 results that cannot become pages, else mkdocs' own."""
    try:
        pages = render_site(Path(args.results), ROOT / "docs")
    except SiteError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"rendered {len(pages)} pages into {ROOT / 'docs'}")
    if getattr(args, "no_build", False):
        return 0
    return build_site(ROOT / "mkdocs.yml").returncode


def build_site(config: Path, capture: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `mkdocs build --strict -f config` with this interpreter, from the config's folder."""
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config)]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # silence Material's end-of-life banner in logs
    cwd = Path(config).parent
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=capture, text=True, check=False)
