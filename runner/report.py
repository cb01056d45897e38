"""The Report: every run analysed once (health, verdicts, axis tables, ranking, sentences, takeaways,
scale note). Pages (runner.views) and the notebook's verdict cell read it; nothing recomputes it.

    runs (runner.results.load_runs) -> Report.build(runs) -> view-models -> pages
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from runner import insights as ins
from runner import prose
from runner.insights import Assessed, AxisTable
from runner.prose import Takeaway
from runner.results import Run
from runner.text import DASH, fmt, slugs


@dataclass(frozen=True)
class Report:
    runs: tuple[Run, ...]  # every run folder, damaged ones included, by id
    assessed: dict[str, Assessed]  # the sound runs by id
    tables: tuple[AxisTable, ...]
    sentences: dict[tuple[str, str], tuple[str, ...]]  # (group, axis) -> sentences of its table
    axis_slugs: dict[tuple[str, str], str]  # (group, axis) -> heading anchor, distinct within the group
    ranked: tuple[Assessed, ...]  # healthiest first
    takeaways: tuple[Takeaway, ...]
    scale_note: str

    @classmethod
    def build(cls, runs: Sequence[Run]) -> Report:
        """Analyse `runs` once: each sound run's statistics are read here and nowhere again."""
        runs = tuple(runs)
        items = [ins.assess(r) for r in runs if not r.damaged]  # `damaged` reads stats.npz first
        tables = ins.axis_tables(items)
        anchors: dict[tuple[str, str], str] = {}
        for group in dict.fromkeys(t.group for t in tables):
            mine = slugs((t.axis for t in tables if t.group == group), default="axis")
            anchors.update({(group, axis): s for axis, s in mine.items()})
        return cls(
            runs=runs,
            assessed={i.id: i for i in items},
            tables=tuple(tables),
            sentences={(t.group, t.axis): tuple(prose.axis_sentences(t)) for t in tables},
            axis_slugs=anchors,
            ranked=tuple(ins.ranking(items)),
            takeaways=tuple(prose.takeaways(items)),
            scale_note=prose.scale_note(items),
        )

    @property
    def damaged(self) -> tuple[Run, ...]:
        return tuple(r for r in self.runs if r.damaged)

    def verdict_counts(self, ids: Sequence[str] | None = None) -> dict[str, int]:
        levels = [i.level for i in self.assessed.values() if ids is None or i.id in ids]
        return {"total": len(levels), **{level: levels.count(level) for level in ins.LEVELS}}

    def examples(self, need: Sequence[str]) -> tuple[Assessed | None, Assessed | None]:
        """(healthiest, least healthy) of the runs with a score and every chart kind in `need`; the least
        healthy is None with fewer than two such runs."""
        ranked = [i for i in self.ranked if i.score is not None and all(k in i.run.charts for k in need)]
        if not ranked:
            return None, None
        return ranked[0], (ranked[-1] if len(ranked) > 1 else None)

    def scale_note_for(self, ids: Sequence[str]) -> str:
        return prose.scale_note([self.assessed[i] for i in dict.fromkeys(ids)])

    def health_lines(self, run_id: str) -> list[str]:
        """The run's health measures, verdict and reasons as plain lines (the notebook's verdict cell)."""
        run = next(r for r in self.runs if r.id == run_id)
        if run.damaged:
            return [f"damaged: {run.damage}"]
        item = self.assessed[run_id]
        h = item.health
        lines = [f"{name}: {value}" for name, value in (
            ("max std", f"{fmt(h.max_std)} in {h.max_std_module or DASH} at step {fmt(h.max_std_step)}"),
            ("std growth", f"{fmt(h.std_growth)} in {h.std_growth_module or DASH}"),
            ("mean drift", f"{fmt(h.mean_drift)} in {h.mean_drift_module or DASH}"),
            ("dead early / late", f"{fmt(h.dead_early)} / {fmt(h.dead_late)}"),
            ("loss spikes", f"{fmt(h.loss_spikes)} (max loss ratio {fmt(h.max_loss_ratio)})"),
            ("non-finite steps", fmt(h.nonfinite_steps)),
            ("valid ÷ train", f"{fmt(h.valid_gap)} (batch statistics {fmt(h.valid_gap_batch_stats)})"),
            ("BatchNorm running gap", f"{fmt(h.bn_gap)} in {h.bn_gap_where or DASH} "
                                      f"(valid running ÷ batch {fmt(h.valid_running_over_batch)})"),
        )]
        lines.append(f"verdict: {item.level}")
        lines += [f"  - {reason}" for reason in item.verdict.reasons]
        return lines
