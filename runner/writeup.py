"""The writeup page (insights/summary.md): a report built from the Report and the snapshot manifests.

    Report (runner.report) + published/<name>/manifest.json --writeup()--> variables of writeup.md.j2

Sections: the question; what was run (from the snapshot manifests and the runs' metrics); the findings,
each with the figure that shows it (drawn through the `Figure` callable the site passes in); the
reproduction table; samples side by side; limitations and what to run next; then the ranking. Every
number comes from the runs; sentences come from runner.prose. Nothing here reads files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from runner import insights as ins
from runner import prose
from runner.charts import bucket_profile
from runner.insights import COURSE_ID, REFERENCE_ID
from runner.report import Report
from runner.results import Run
from runner.text import DASH, duration, fmt, join_words

# figure(name, runs, path relative to docs/, **options) -> None when drawn, else the error text.
Figure = Callable[..., "str | None"]
FIGURE_DIR = "insights/writeup"  # the writeup's figures, relative to docs/
MAX_OVERLAY = 8  # runs on one overlay figure: more lines are unreadable
SAMPLE_RUNS = 4  # runs whose samples the writeup shows side by side


def _figure(figure: Figure, name: str, runs: Sequence[Run], stem: str, caption: str, **options: Any
            ) -> dict[str, Any]:
    rel = f"{FIGURE_DIR}/{stem}.png"
    error = figure(name, list(runs), rel, **options)
    return {"src": f"writeup/{stem}.png", "alt": caption, "caption": caption, "error": error}


def _finding(title: str, sentences: Sequence[str], fig: dict[str, Any] | None, missing: str = ""
             ) -> dict[str, Any]:
    return {"title": title, "sentences": [s for s in sentences if s], "figure": fig, "missing": missing}


# ---------------------------------------------------------------- findings


def module_finding(report: Report, figure: Figure) -> dict[str, Any]:
    title = "One module across the variants"
    worst = max((i for i in report.assessed.values() if i.health.max_std is not None),
                key=lambda i: i.health.max_std, default=None)
    if worst is None or not worst.health.max_std_module:
        return _finding(title, [], None, "No run recorded activation statistics yet.")
    module = worst.health.max_std_module
    peers = [i for i in report.ranked if i.spec.group == worst.spec.group]
    peaks = [(i.id, p) for i in peers if (p := ins.module_peak(i, module)) is not None]
    shown = [i for i in peers if i.id in dict(peaks)][:MAX_OVERLAY]
    if worst not in shown:
        shown = [*shown[: MAX_OVERLAY - 1], worst]
    caption = f"Activation std of {module} over training, one line per {worst.spec.group} run."
    return _finding(title, [prose.module_sentence(module, worst, peaks)],
                    _figure(figure, "module", [i.run for i in shown], "module", caption, module=module))


def extremes_finding(report: Report, figure: Figure) -> dict[str, Any]:
    title = "The healthiest and the least healthy run"
    best, worst = report.examples(())
    if best is None or worst is None:
        return _finding(title, [], None, "Fewer than two runs have activation statistics to compare.")
    caption = f"Activation mean and std of every watched module: {best.id} (top) and {worst.id} (bottom)."
    return _finding(title, [prose.extremes_sentence(best, worst)],
                    _figure(figure, "stats", [best.run, worst.run], "extremes", caption))


def batchnorm_finding(report: Report, figure: Figure) -> dict[str, Any]:
    title = "BatchNorm: validation with running against batch statistics"
    items = [i for i in report.ranked if i.health.valid_gap_batch_stats is not None][:MAX_OVERLAY]
    if not items:
        return _finding(title, [], None, "No run with BatchNorm recorded its validation loss both ways.")
    caption = ("The BatchNorm runs' validation loss with running against batch statistics per epoch, and "
               "the gap between the layers' running statistics and the validation batches' own.")
    take = prose._batchnorm_takeaway(items)
    return _finding(title, [take.text] if take else [],
                    _figure(figure, "bn_gap", [i.run for i in items], "batchnorm", caption))


def precision_finding(report: Report, figure: Figure, not_run: Sequence[Any]) -> dict[str, Any]:
    title = "The precision ablation"
    axes = ins.precision_axes(list(report.assessed.values()))
    if not axes:
        commands = [f.command for f in not_run if "scaling" in f.path][:6]
        hint = f" Run it on a GPU: {'; '.join(commands)}." if commands else ""
        return _finding(title, [], None, "The precision ablation was not run here (fp16 needs a GPU, and "
                        "the quick and smoke profiles train in fp32)." + hint)
    members = [i for axis in axes for i in axis][:MAX_OVERLAY]
    caption = "Loss of the precision ablation's runs (fp32, fp16 with and without a gradient scaler)."
    return _finding(title, prose.precision_sentences(members),
                    _figure(figure, "loss", [i.run for i in members], "precision", caption))


def bucket_finding(report: Report, figure: Figure) -> dict[str, Any]:
    title = "Timestep buckets"
    items = [i for i in report.ranked if i.run.stats is not None and i.run.stats.buckets is not None]
    module = next((i.health.max_std_module for i in reversed(items) if i.health.max_std_module), None)
    if not items or module is None:
        return _finding(title, [], None, "No run recorded statistics per timestep bucket.")
    sentences = []
    for item in (items[0], items[-1]) if len(items) > 1 else (items[0],):
        profile = bucket_profile(item.run.stats, module)
        if profile is not None:
            sentences.append(prose.bucket_sentence(item, module, *map(list, profile)))
    caption = "Activation std per timestep bucket of every watched module, the runs compared."
    shown = [items[0], items[-1]] if len(items) > 1 else items  # the healthiest and least healthy
    return _finding(title, sentences, _figure(figure, "bucket_comparison_std", [i.run for i in shown],
                                              "buckets", caption))


# ---------------------------------------------------------------- reproduction, samples, what ran


def reproduction_section(report: Report) -> dict[str, Any]:
    """The reproduction table (runs beside the originals' printed losses). A small hook: the Reproduction
    page's view-model (issue 8) can replace it without touching the rest of the writeup."""
    rows = ins.reproductions(list(report.assessed.values()))
    return {
        "rows": [
            {"id": r.item.id, "notebook": r.notebook, "profile": r.item.spec.profile, "epoch": r.epoch,
             "ours": r.ours, "theirs": r.theirs, "relative": r.relative, "text": prose.reproduction_text(r),
             "reproduced": r.reproduced}
            for r in rows
        ],
        "within": fmt(ins.REPRODUCED_WITHIN * 100),
        "counts": {
            "reproduced": sum(r.reproduced is True for r in rows),
            "not_reproduced": sum(r.reproduced is False for r in rows),
            "not_judged": sum(r.reproduced is None for r in rows),
        },
    }


def samples_section(report: Report) -> list[dict[str, Any]]:
    """Grids of the healthiest and least healthy runs and the two references, beside real latents."""
    best, worst = report.examples(())
    picks = [best, worst, report.assessed.get(REFERENCE_ID), report.assessed.get(COURSE_ID)]
    out = []
    for item in dict.fromkeys(i for i in picks if i is not None):
        s = item.run.samples
        if s is None or s.status != "completed":
            continue
        out.append({
            "id": item.id,
            "grids": [(name, f"../experiments/{item.id}/samples/{file}") for name, file in s.grids.items()],
            "sentence": prose.samples_sentence(item),
        })
        if len(out) == SAMPLE_RUNS:
            break
    return out


def what_ran(report: Report, snapshots: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    sound = list(report.assessed.values())
    local = [r for r in report.runs if r.source == "local"]
    return {
        "snapshots": [
            {
                "name": name,
                "runs": len(m.get("runs") or []),
                "profile": m.get("profile", DASH),
                "device": m.get("device", DASH),
                "precision": m.get("precision", DASH),
                "wall": duration(m.get("wall_s")),
                "commit": (m.get("git_commit") or DASH)[:12],
                "date": m.get("date", DASH),
                "versions": ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items()),
                "left_out": len(m.get("left_out") or []),
            }
            for name, m in snapshots
        ],
        "local": len(local),
        "runs": [
            {
                "id": i.id,
                "title": i.spec.title or i.id,
                "group": i.spec.group,
                "axis": i.spec.axis,
                "profile": i.spec.profile,
                "steps": i.health.steps,
                "wall": duration(i.run.metrics.timings.total_s),
                "device": i.run.metrics.environment.device or DASH,
                "precision": i.run.metrics.environment.precision,
                "source": "local" if i.run.source == "local" else "published",
            }
            for i in sorted(sound, key=lambda i: (i.spec.group, i.spec.axis, i.id))
        ],
        "wall_total": duration(sum(i.run.metrics.timings.total_s for i in sound)),
    }


def limitations(report: Report, not_run: Sequence[Any]) -> dict[str, Any]:
    stopped = [i for i in report.assessed.values() if i.health.status != "completed"]
    decoders = {
        (s.decoder.name, s.decoder.r2_heldout)
        for i in report.assessed.values()
        if (s := i.run.samples) is not None and s.decoder is not None
    }
    r2 = [r for name, r in decoders if name == "preview" and r is not None]
    return {
        "scale_note": report.scale_note,
        "stopped": [f"{i.id} ({i.run.metrics.status_text})" for i in stopped],
        "damaged": [r.id for r in report.damaged],
        "decoder": (f"The pictures come from the preview decoder (held-out R² {fmt(min(r2))}): they show "
                    "layout and colour, not detail.") if r2 else "",
        "not_run": [{"id": f.id, "command": f.command} for f in not_run],
    }


# ---------------------------------------------------------------- the page


def writeup(report: Report, snapshots: Sequence[tuple[str, dict[str, Any]]], figure: Figure,
            files: Sequence[Any] = ()) -> dict[str, Any]:
    """Variables of writeup.md.j2. `snapshots`: (name, manifest) of each published snapshot shown;
    `files`: runner.views.SpecFile of every spec (those without a run are listed as not run)."""
    from runner.views import summary

    ran = {r.spec.id for r in report.runs if r.spec is not None} | {r.id for r in report.runs}
    not_run = [f for f in files if f.id not in ran]
    findings = [
        module_finding(report, figure),
        extremes_finding(report, figure),
        batchnorm_finding(report, figure),
        precision_finding(report, figure, not_run),
        bucket_finding(report, figure),
    ]
    profiles = sorted({i.spec.profile for i in report.assessed.values()})
    return {
        **summary(report),
        "what_ran": what_ran(report, snapshots),
        "findings": findings,
        "reproduction": reproduction_section(report),
        "samples": samples_section(report),
        "limits": limitations(report, not_run),
        "next": {
            "profiles": join_words(profiles) if profiles else DASH,
            "full": "full" not in profiles,
        },
    }
