"""Page view-models: the variables of each template in templates/site/, built from the Report.

Nothing here reads run files or analyses runs (runner.results and runner.report did that once); charts
are drawn through the `Charts` callable the site passes in. Every page's numbers are the Report's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner import insights as ins
from runner import prose
from runner.charts import CAPTIONS, CHART_KINDS, TITLES, has_bn_gap, has_buckets
from runner.insights import Assessed, AxisTable
from runner.model_notes import model_notes
from runner.originals import OriginalRun, OriginalsError, compare_losses, find_original
from runner.report import Report
from runner.results import Run
from runner.spec import (
    PROFILES,
    NoiseSpec,
    Spec,
    SpecError,
    TrainSpec,
    describe_precision,
    discover,
    load_spec,
)
from runner.statsfile import BIN_WIDTH, HIST_BINS, HIST_RANGE
from runner.text import DASH, fmt, slugs

# The groups with an insight page (insights/<group>.md, listed in mkdocs.yml's nav), and their titles.
PAGE_TITLES = {
    "architecture": "Layer architecture insights",
    "hyperparameters": "Hyperparameter insights",
    "ablations": "Ablations of the open question",
    "reproductions": "Reproductions of the original notebooks",
}
REPRODUCTION_TITLE = "Reproduction: our losses beside the originals'"
SUMMARY_TITLE = "Writeup: what makes training healthy"
READING_TITLE = "How to read activation statistics"
INSIGHT_KINDS = ("stats", "hist", "dead", "loss")  # comparison charts per axis: activations first
# Drawn only for the runs that recorded what they show (a BatchNorm gap, statistics by timestep).
GAP_KINDS = ("bn_gap",)
BUCKET_COMPARISON_KINDS = ("bucket_comparison_std", "bucket_comparison_dead")
RUN_BUCKET_KINDS = ("buckets_std", "buckets_dead")
EXAMPLE_KINDS = ("stats", "hist", "dead")  # the charts the home page and reading guide show examples of

# charts(runs, kind, path relative to docs/) -> None when drawn, else the error text to show.
Charts = Callable[[Sequence[Run], str, str], "str | None"]


# ---------------------------------------------------------------- the specs under experiments/


@dataclass(frozen=True)
class SpecFile:
    """A spec under experiments/: where it is, its text fields and its content hash per profile."""

    path: str  # relative to the project root, as a command line would name it
    spec: Spec  # loaded with its first suite's profile (or "full" when it is in no suite)
    hashes: dict[str, str]  # profile -> content hash
    full: Spec | None = None  # at the full profile: the original scale (data size, epochs, precision)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def full_command(self) -> str:
        return f"python -m runner run {self.path} --profile full"

    @property
    def command(self) -> str:
        return f"python -m runner run {self.path} --profile {self.spec.profile}"


def spec_files(experiments: Path, root: Path) -> list[SpecFile]:
    """Every valid spec under `experiments` (invalid ones are `python -m runner validate`'s to report)."""
    out = []
    for path in discover(experiments) if experiments.is_dir() else []:
        try:
            specs = {p: load_spec(path, p, data_root=None) for p in PROFILES}  # listed, not run
        except SpecError:
            continue
        suites = specs["full"].suites
        profile = next((p for p in PROFILES if p in suites), "full")
        rel = (
            path.resolve().relative_to(root.resolve()).as_posix()
            if root.resolve() in path.resolve().parents
            else str(path)
        )
        out.append(
            SpecFile(rel, specs[profile], {p: s.content_hash() for p, s in specs.items()}, specs["full"])
        )
    return out


# ---------------------------------------------------------------- one row per run or spec


@dataclass(frozen=True)
class Entry:
    """A row of the experiments index: a run folder, a spec file, or both."""

    id: str
    run: Run | None
    spec_file: SpecFile | None

    @property
    def stale(self) -> bool:
        """The run's spec hash differs from what the spec file now resolves to at the run's profile."""
        if self.run is None or self.spec_file is None or self.run.metrics is None or self.run.spec is None:
            return False
        now = self.spec_file.hashes.get(self.run.spec.profile)
        return now is not None and now != self.run.metrics.spec_hash

    @property
    def title(self) -> str:
        spec = self.spec_file.spec if self.spec_file else self.run.spec if self.run else None
        return (spec.title if spec else None) or self.id


def entries(report: Report, files: Sequence[SpecFile]) -> list[Entry]:
    """Runs and spec files joined by id: spec files in their order, then runs without a spec file."""
    runs = {r.id: r for r in report.runs}
    out = [Entry(f.id, runs.pop(f.id, None), f) for f in files]
    return out + [Entry(run_id, run, None) for run_id, run in sorted(runs.items())]


def _noise_text(spec: Spec) -> str:
    n = spec.noise
    sched = n.schedule if n.beta_end is None else f"{n.schedule} \u03b2_end={fmt(n.beta_end)}"
    return f"{sched}, t {n.timestep_input}"


def row(e: Entry, report: Report) -> dict[str, Any]:
    run = e.run
    spec = run.spec if run and run.spec else e.spec_file.spec if e.spec_file else None
    item = report.assessed.get(e.id)
    m = spec.model if spec else None
    status = "not run" if run is None else "damaged" if run.damaged else run.metrics.status_text
    return {
        "id": e.id,
        "linked": run is not None,
        "title": e.title,
        "family": m.family if m else DASH,
        "channels": ",".join(map(str, m.block_out_channels)) if m else DASH,
        "blocks": (m.blocks if m.family == "diffusers" else f"attn\u2265{m.attention_start}") if m else DASH,
        "norms": (f"{m.resnet_norm} / {m.attention_norm}" if m.family == "diffusers" else "course (batch)")
        if m
        else DASH,
        "init": m.init if m else DASH,
        "lr": spec.train.lr if spec else None,
        "batch": spec.train.batch_size if spec else None,
        "noise": _noise_text(spec) if spec else DASH,
        "scale": spec.data.scale if spec else None,
        "status": status,
        "status_class": "missing" if run is None else run.status,
        "stale": e.stale,
        "profile": spec.profile if spec else DASH,
        "command": e.spec_file.command if run is None and e.spec_file else None,
        "damage": run.damage if run else None,
        "train_loss": item.health.train_loss if item else None,
        "valid_loss": item.health.valid_loss if item else None,
        "max_std": item.health.max_std if item else None,
        "verdict": item.level if item else None,
        "verdict_rank": ins.LEVELS.index(item.level) if item else None,
        "reasons": list(item.verdict.reasons) if item else [],
    }


def counts(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    out = {"total": len(rows)}
    for row in rows:
        out[row["status_class"]] = out.get(row["status_class"], 0) + 1
    return out


def experiments_index(report: Report, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"rows": rows, "counts": counts(rows), "profiles": list(PROFILES)}


# ---------------------------------------------------------------- one run's page


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def notebook_check(path: Path) -> tuple[bool, list[str]]:
    """(readable, errors): error outputs as 'ename: evalue' (mkdocs-jupyter shows them without notice)."""
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
        errors = [
            f"{out.get('ename', 'Error')}: {_ANSI.sub('', str(out.get('evalue', '')))}"
            for cell in nb["cells"]
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


def _seed_name(spec: Spec) -> str | None:
    try:
        return spec.seed_name()
    except SpecError:
        return None


def _anchor(report: Report, spec: Spec) -> tuple[str, str] | None:
    if spec.group not in PAGE_TITLES:
        return None
    slug = report.axis_slugs.get((spec.group, spec.axis))
    return (spec.group, slug) if slug else None


def run_diagnostics(run: Run, charts: Charts, base: str) -> list[dict[str, str]]:
    """Draw a run's diagnostic charts into `base` (its page's folder, relative to docs/): the BatchNorm gap
    when it recorded one, the statistics by timestep when its stats.npz holds buckets; [] otherwise."""
    kinds = [*(GAP_KINDS if has_bn_gap(run) else ()), *(RUN_BUCKET_KINDS if has_buckets(run) else ())]
    out = []
    for kind in kinds:
        error = charts([run], kind, f"{base}/{kind}.png")
        out.append({"file": f"{kind}.png", "kind": kind, "title": TITLES[kind], "caption": CAPTIONS[kind],
                    "error": error})
    return out


def _epoch_rows(run: Run) -> list[dict[str, Any]]:
    """metrics.json's epochs with the largest BatchNorm running gap of each (None: not measured)."""
    rows = []
    for e in run.metrics.epochs if run.metrics else []:
        pairs = (e.bn_running_gap or {}).values()
        gaps = [v for pair in pairs for v in (pair.mean, pair.var) if v is not None]
        rows.append({**e.model_dump(exclude={"bn_running_gap"}), "largest_gap": max(gaps, default=None)})
    return rows


def experiment_page(
    e: Entry,
    report: Report,
    notebook: tuple[bool, list[str]] | None,
    diagnostics: Sequence[dict[str, str]] = (),
) -> dict[str, Any]:
    """Variables of experiment.md.j2 for a sound run (`e.run` with spec and metrics); `diagnostics` are
    the charts `run_diagnostics` drew."""
    run, item = e.run, report.assessed[e.id]
    assert run is not None and run.spec is not None and run.metrics is not None
    m, text_spec = run.metrics, (e.spec_file.spec if e.spec_file else run.spec)
    charts = run.charts
    ordered = [k for k in CHART_KINDS if k in charts] + sorted(set(charts) - set(CHART_KINDS))
    env = m.environment
    return {
        "id": run.id,
        "title": e.title,
        "damaged": False,
        "notes": [p for p in re.split(r"\n\s*\n", text_spec.notes.strip()) if p],
        "group": text_spec.group,
        "axis": run.spec.axis,
        "axis_anchor": _anchor(report, run.spec),
        "status": m.status,
        "status_text": m.status_text,
        "diverged_at": m.diverged_at_step,
        "error": m.error,
        "stale": e.stale,
        "run_hash": m.spec_hash,
        "spec_hash": e.spec_file.hashes.get(run.spec.profile) if e.spec_file else m.spec_hash,
        "seed_name": _seed_name(run.spec),
        "verdict": item.level,
        "reasons": list(item.verdict.reasons),
        "max_std_module": item.health.max_std_module,
        "model_notes": model_notes(run.spec),
        "spec_rows": _spec_rows(run.spec),
        "metrics": {
            "train_loss": m.final.train_loss,
            "valid_loss": m.final.valid_loss,
            "valid_loss_batch_stats": m.final.valid_loss_batch_stats,
            "steps_completed": m.steps_completed,
            "steps_total": m.steps_total,
            "steps_per_epoch": m.steps_per_epoch,
            "params": m.params,
            "total_s": m.timings.total_s,
            "step_s": m.timings.step_s,
            "device": env.device,
            "precision": env.precision,
            "profile": m.profile,
            "max_std": item.health.max_std,
            "versions": ", ".join(
                f"{k} {v}" for k in ("python", "torch", "diffusers") if (v := getattr(env, k)) is not None
            ),
        },
        "epochs": _epoch_rows(run),
        "has_gap": any(e.bn_running_gap for e in m.epochs),
        "precision_note": describe_precision(run.spec),
        "reproduces": run.spec.reproduces,
        "bn_sentence": prose.bn_gap_sentence(item.health),
        "diagnostics": list(diagnostics),
        "charts": [
            {"file": f"{k}.png", "kind": k, "title": TITLES.get(k, k), "caption": CAPTIONS.get(k, "")}
            for k in ordered
        ],
        "notebook": None if notebook is None else {"readable": notebook[0], "errors": notebook[1]},
    }


def damaged_page(e: Entry) -> dict[str, Any]:
    """Variables of damaged.md.j2: a run folder that could not be read, and why."""
    assert e.run is not None
    return {"id": e.id, "title": e.title, "damage": e.run.damage or "unknown", "folder": e.run.folder.name}


# ---------------------------------------------------------------- home, comparisons


def _example(item: Assessed | None, charts: dict[str, str] | None = None) -> dict[str, Any] | None:
    if item is None:
        return None
    h = item.health
    return {
        "id": item.id,
        "title": item.spec.title or item.id,
        "level": item.level,
        "reasons": list(item.verdict.reasons),
        "max_std": fmt(h.max_std),
        "max_std_module": h.max_std_module or DASH,
        "std_growth": fmt(h.std_growth),
        "dead_early": fmt(h.dead_early),
        "dead_late": fmt(h.dead_late),
        "charts": dict(charts or {}),
    }


def home(report: Report, rows: list[dict[str, Any]]) -> dict[str, Any]:
    best, worst = report.examples(EXAMPLE_KINDS)
    ready = [
        i
        for i in report.assessed.values()
        if i.health.has_stats and all(k in i.run.charts for k in EXAMPLE_KINDS)
    ]
    examples = (
        None
        if best is None or worst is None
        else {"kinds": EXAMPLE_KINDS, "good": _example(best), "bad": _example(worst)}
    )
    return {
        "examples": examples,
        "examples_ready": len(ready),
        "verdicts": report.verdict_counts(),
        "captions": CAPTIONS,
        "titles": TITLES,
        "counts": counts(rows),
        "kinds": CHART_KINDS,
    }


def _groups(report: Report) -> list[tuple[str, list[Assessed]]]:
    groups: dict[str, list[Assessed]] = {}
    for item in report.assessed.values():
        groups.setdefault(item.spec.group, []).append(item)
    return sorted(groups.items())


def comparisons(report: Report, charts: Charts) -> list[tuple[str, str, dict[str, Any]]]:
    """[(page path, template, variables)] of comparisons/<kind>.md and comparisons/index.md; draws one
    chart per group and kind into comparisons/<kind>/<group slug>.png."""
    groups = _groups(report)
    names = slugs((name for name, _ in groups), default="group")
    pages = []
    for kind in CHART_KINDS:
        sections = []
        for name, members in groups:
            rel = f"comparisons/{kind}/{names[name]}.png"
            error = charts([i.run for i in members], kind, rel)
            sections.append(
                {
                    "name": name,
                    "ids": [i.id for i in members],
                    "error": error,
                    "image": None if error else f"{kind}/{names[name]}.png",
                }
            )
        pages.append(
            (
                f"comparisons/{kind}.md",
                "comparison.md.j2",
                {"kind": kind, "title": TITLES[kind], "caption": CAPTIONS[kind], "sections": sections},
            )
        )
    pages.append(
        (
            "comparisons/index.md",
            "comparisons.md.j2",
            {
                "kinds": CHART_KINDS,
                "titles": TITLES,
                "captions": CAPTIONS,
                "groups": [(name, [i.id for i in members]) for name, members in groups],
            },
        )
    )
    return pages


# ---------------------------------------------------------------- insight pages


def _row_view(row: ins.Row) -> dict[str, Any]:
    return {
        "id": row.id,
        "title": row.item.spec.title or row.id,
        "role": row.role,
        "level": row.level,
        "reasons": list(row.item.verdict.reasons),
        "cells": list(zip(row.cells, row.sort_keys, strict=True)),
    }


def _axis_charts(table: AxisTable, stem: str, charts: Charts) -> list[dict[str, str]]:
    runs = [r.item.run for r in table.rows]
    kinds = [
        *INSIGHT_KINDS,
        *(GAP_KINDS if any(has_bn_gap(r) for r in runs) else ()),
        *(BUCKET_COMPARISON_KINDS if any(has_buckets(r) for r in runs) else ()),
    ]
    out = []
    for kind in kinds:
        rel = f"charts/{stem}-{kind}.png"
        if charts([r.item.run for r in table.rows], kind, f"insights/{rel}") is None:
            out.append({"kind": kind, "title": TITLES[kind], "src": rel})
    return out


def axis_page(report: Report, group: str, charts: Charts) -> dict[str, Any]:
    """Variables of insights_axis.md.j2 for one group; draws the axis comparison charts."""
    tables = [t for t in report.tables if t.group == group]
    scope = [r.id for t in tables for r in t.rows]
    return {
        "title": PAGE_TITLES.get(group, f"{group.capitalize()} insights"),
        "group": group,
        "scale_note": report.scale_note_for(scope),
        "axes": [
            {
                "name": t.axis,
                "slug": report.axis_slugs[(group, t.axis)],
                "sentences": list(report.sentences[(group, t.axis)]),
                "questions": axis_questions(t),
                "columns": list(t.columns),
                "rows": [_row_view(r) for r in t.rows],
                "charts": _axis_charts(t, f"{group}-{report.axis_slugs[(group, t.axis)]}", charts),
            }
            for t in tables
        ],
    }


QUESTION = "Question:"  # the paragraph of a spec's notes that states its axis's hypothesis, as a question


def axis_questions(table: AxisTable) -> list[str]:
    """The distinct "Question: ..." paragraphs of the notes of an axis's runs (its hypothesis, in order)."""
    found = []
    for row in table.rows:
        for para in re.split(r"\n\s*\n", row.item.spec.notes.strip()):
            text = " ".join(para.split())
            if text.startswith(QUESTION):
                found.append(text[len(QUESTION):].strip())
    return list(dict.fromkeys(found))


def timestep_comparison(report: Report, charts: Charts) -> dict[str, Any]:
    """Variables of comparison_timestep.md.j2: per group, the runs with statistics by timestep, their
    std and dead share per bucket compared (comparisons/timestep/<group slug>-<kind>.png)."""
    groups = _groups(report)
    names = slugs((name for name, _ in groups), default="group")
    sections = []
    for name, members in groups:
        runs = [i.run for i in members if has_buckets(i.run)]
        images = []
        for kind in BUCKET_COMPARISON_KINDS if runs else ():
            rel = f"timestep/{names[name]}-{kind}.png"
            error = charts(runs, kind, f"comparisons/{rel}")
            images.append({"title": TITLES[kind], "caption": CAPTIONS[kind], "src": None if error else rel,
                           "error": error})
        sections.append({"name": name, "ids": [r.id for r in runs],
                         "without": [i.id for i in members if not has_buckets(i.run)], "images": images})
    return {"title": "Statistics by timestep", "sections": sections}


# ---------------------------------------------------------------- the reproduction page


def _scale_gaps(ran: Spec, full: Spec | None) -> list[str]:
    """What differs between the scale a run ran at and its spec's own (full-profile) scale."""
    if full is None:
        return [] if ran.profile == "full" else [f"profile {ran.profile}, not full"]
    out = []
    for what, ours, theirs in (
        ("latents", ran.data.size, full.data.size),
        ("epochs trained", ran.train.epochs_run, full.train.epochs_run),
        ("epochs of the schedule", ran.train.epochs, full.train.epochs),
        ("batch size", ran.train.batch_size, full.train.batch_size),
    ):
        if ours != theirs:
            out.append(f"{what}: {fmt(ours)} here, {fmt(theirs)} at the original scale")
    if ran.train.precision != full.train.precision:
        out.append(f"precision: {ran.train.precision} here, {full.train.precision} at the original scale")
    return out


def _comparison_rows(run: Run, original: OriginalRun) -> list[dict[str, str]]:
    ours = [e.model_dump() for e in run.metrics.epochs] if run.metrics else []
    return [
        {
            "epoch": fmt(r.epoch),
            **{k: fmt(getattr(r, k)) for k in ("ours_train", "theirs_train", "train_diff", "ours_valid",
                                               "theirs_valid", "valid_diff")},
        }
        for r in compare_losses(ours, original.epochs)
    ]


def reproduction(
    report: Report, files: Sequence[SpecFile], originals: dict[str, OriginalRun] | OriginalsError
) -> dict[str, Any]:
    """Variables of reproduction.md.j2: every sound run whose spec `reproduces` a notebook, its per-epoch
    losses beside the notebook's with the differences and the scale it ran at; the reproducing specs not
    run yet with the command that runs them at the original scale. `originals` is
    runner.originals.load_original_results() (or the error that reading it gave)."""
    by_id = {f.id: f for f in files}
    runs = []
    for item in report.assessed.values():
        notebook = item.spec.reproduces
        if not notebook:
            continue
        spec_file = by_id.get(item.id)
        try:
            if isinstance(originals, OriginalsError):
                raise originals
            original = find_original(originals, notebook)
        except OriginalsError as err:
            original, error = None, str(err)
        else:
            error = None
        gaps = _scale_gaps(item.spec, spec_file.full if spec_file else None)
        runs.append({
            "id": item.id,
            "title": item.spec.title or item.id,
            "notebook": notebook,
            "profile": item.spec.profile,
            "status": item.run.metrics.status_text if item.run.metrics else item.run.status,
            "precision": item.spec.train.precision,
            "size": fmt(item.spec.data.size),
            "epochs": fmt(item.spec.train.epochs_run),
            "scale_gaps": gaps,
            "command": spec_file.full_command if gaps and spec_file else None,
            "error": error,
            "segments": len(original.segments) if original else 0,
            "rows": _comparison_rows(item.run, original) if original else [],
        })
    damaged = {r.id for r in report.damaged}
    not_run = [
        {"id": f.id, "title": f.spec.title or f.id, "notebook": f.spec.reproduces, "command": f.full_command,
         "state": "damaged" if f.id in damaged else "not run"}
        for f in files
        if f.spec.reproduces and f.id not in report.assessed
    ]
    return {"title": REPRODUCTION_TITLE, "runs": runs, "not_run": not_run}


def reading(report: Report) -> dict[str, Any]:
    best, worst = report.examples(EXAMPLE_KINDS)

    def links(item: Assessed | None) -> dict[str, str]:
        return {k: f"../experiments/{item.id}/{k}.png" for k in item.run.charts} if item else {}

    return {
        "title": READING_TITLE,
        "healthiest": _example(best, links(best)),
        "least_healthy": _example(worst, links(worst)),
        "captions": CAPTIONS,
        "dead_below": fmt(BIN_WIDTH),
    }


def summary(report: Report) -> dict[str, Any]:
    rows = [
        {
            "rank": n,
            "id": i.id,
            "title": i.spec.title or i.id,
            "group": i.spec.group,
            "axis": i.spec.axis,
            "axis_anchor": _anchor(report, i.spec),
            "level": i.level,
            "reasons": list(i.verdict.reasons),
            "score": fmt(i.score),
            "max_std": fmt(i.health.max_std),
            "dead_late": fmt(i.health.dead_late),
        }
        for n, i in enumerate(report.ranked, start=1)
    ]
    return {
        "title": SUMMARY_TITLE,
        "scale_note": report.scale_note,
        "ranking": rows,
        "score_text": prose.SCORE_TEXT,
        "counts": report.verdict_counts(),
        "takeaways": [{"text": t.text, "ids": list(t.ids)} for t in report.takeaways],
    }


def insights_index(report: Report) -> dict[str, Any]:
    pages = [
        {
            "file": "summary.md",
            "title": SUMMARY_TITLE,
            "text": "every run ranked by health, with the measured takeaways and links to the evidence.",
        }
    ]
    for group, title in PAGE_TITLES.items():
        mine = [t for t in report.tables if t.group == group]
        n = len({r.id for t in mine for r in t.rows})
        what = (
            f"{fmt(n)} run{'s' if n != 1 else ''} on {fmt(len(mine))} ax{'es' if len(mine) != 1 else 'is'}"
            if n
            else "no runs yet"
        )
        pages.append(
            {"file": f"{group}.md", "title": title, "text": f"the {group} group's variants: {what}."}
        )
    pages.append(
        {
            "file": "reading.md",
            "title": READING_TITLE,
            "text": "the activation charts explained with the healthiest and least healthy runs.",
        }
    )
    verdicts = report.verdict_counts()
    elsewhere = sorted({i.spec.group for i in report.assessed.values()} - set(PAGE_TITLES))
    return {
        "pages": pages,
        "counts": verdicts,
        "total": verdicts["total"],
        "elsewhere": elsewhere,
        "page_groups": list(PAGE_TITLES),
    }


# ---------------------------------------------------------------- method


def _suites(suite_record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The suite last run (results/suite.json): its profile and the ids it ran, as recorded."""
    if not suite_record:
        return []
    runs = suite_record.get("runs") or []
    return [{"name": str(suite_record.get("profile") or DASH), "ids": [str(r.get("id")) for r in runs]}]


def method(report: Report, data_stats: dict[str, Any], suite_record: dict[str, Any] | None) -> dict[str, Any]:
    """Variables of method.md.j2: profiles, the suite as run, data figures from the data's stats.json,
    timings from the runs' metrics, histogram constants and the health measures."""
    timed = [
        i for i in report.assessed.values() if i.run.metrics and i.run.metrics.timings.step_s is not None
    ]
    split = data_stats.get("split") or {}
    return {
        "profiles": [
            {
                "name": k,
                "size": (v.get("data") or {}).get("size"),
                "epochs": (v.get("train") or {}).get("epochs"),
            }
            for k, v in PROFILES.items()
        ],
        "used_profiles": sorted({i.spec.profile for i in report.assessed.values()}),
        "suites": _suites(suite_record),
        "timings": [
            {
                "id": i.id,
                "profile": i.spec.profile,
                "steps": i.run.metrics.steps_completed,
                "total_s": i.run.metrics.timings.total_s,
                "step_s": i.run.metrics.timings.step_s,
                "device": i.run.metrics.environment.device or DASH,
            }
            for i in timed
        ],
        "data": {
            "train": split.get("train"),
            "valid": split.get("valid"),
            "std": data_stats.get("std"),
            "shape": data_stats.get("shape"),
        },
        "bins": HIST_BINS,
        "range": HIST_RANGE,
        "bin_width": BIN_WIDTH,
        "train": TrainSpec(),
        "noise": NoiseSpec(),
        "measures": list(prose.MEASURES.items()),
        "thresholds": prose.threshold_texts(),
        "score_text": prose.SCORE_TEXT,
        "bn_gap_text": prose.BN_GAP_LIMIT_TEXT,
        "window_share": f"{ins.WINDOW_SHARE:.0%}",
    }
