"""Sentences built from the health numbers of runner.insights: axis sentences, takeaways, the scale
note and the descriptions of measures, thresholds and the score (from their constants).

Every number in a sentence goes through `runner.text.fmt`, the format of the tables, so a sentence never
states a number its table shows differently; small counts are words, so every digit is a table number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from runner.bngap import RUNNING_GAP_LIMIT
from runner.insights import (
    COURSE_ID,
    LEVELS,
    MEASURE_NAMES,
    REFERENCE_ID,
    SPIKE_FACTOR,
    SPIKE_SMOOTH,
    THRESHOLDS,
    WINDOW_SHARE,
    Assessed,
    AxisTable,
    Health,
    Row,
    Threshold,
    loss_scale,
    ranking,
)
from runner.statsfile import BIN_WIDTH
from runner.text import DASH, count_word, fmt, join_words, plural

_WINDOW = f"{WINDOW_SHARE:.0%}"

MEASURES: dict[str, str] = {
    "max std": "The largest activation standard deviation of any watched module at any step, and the module.",
    "std growth": (
        f"For the module with the largest mean std over the last {_WINDOW} of steps, that mean "
        f"divided by its mean std over the first {_WINDOW} of steps."
    ),
    "mean drift": (
        "The largest absolute change of a module's mean activation between the first and last "
        f"{_WINDOW} of steps."
    ),
    "dead early / dead late": (
        f"The share of |activations| in the lowest histogram bin (below {fmt(BIN_WIDTH)}), "
        f"averaged over modules and over the first / last {_WINDOW} of steps."
    ),
    "loss spikes": (
        f"The number of steps after the first {_WINDOW} whose batch loss exceeds "
        f"{fmt(SPIKE_FACTOR)} times the running minimum, over all earlier steps, of the "
        f"{fmt(SPIKE_SMOOTH)}-step trailing median of the batch loss."
    ),
    "max loss ratio": (
        f"The largest ratio, after the first {_WINDOW} of steps, of a batch loss to that same "
        f"running minimum (a spike when above {fmt(SPIKE_FACTOR)})."
    ),
    "non-finite steps": (
        "The number of steps at which some module's activation std was infinite, or NaN "
        "although the module ran."
    ),
    "valid ÷ train": (
        "The final validation loss divided by the final train loss; with BatchNorm also with "
        "batch statistics instead of running statistics."
    ),
    "BatchNorm running gap": (
        "For models with BatchNorm, at each epoch end and for each BatchNorm layer: how far the running "
        "mean and variance it evaluates with are from the mean and variance of its own input on the "
        "validation batches in training mode. Mean gap: the root mean square over channels of the "
        "difference of the means in validation standard deviations; variance gap: the root mean square "
        "over channels of the natural log of the ratio of the variances. The measure is the largest "
        "gap, over layers and both statistics, at the last epoch that measured one."
    ),
    "valid running ÷ batch": (
        "For models with BatchNorm: the final validation loss with running statistics divided by the "
        "final validation loss with batch statistics."
    ),
    "diverged": "Whether training was stopped because the loss became non-finite or exceeded its limit.",
}

# The BatchNorm gap limit explained from its constant (runner.bngap.RUNNING_GAP_LIMIT), for the Method page.
BN_GAP_LIMIT_TEXT = (
    f"The BatchNorm running gap is judged against {fmt(RUNNING_GAP_LIMIT)}: a running mean "
    f"{fmt(RUNNING_GAP_LIMIT)} validation standard deviations off, or a running variance "
    f"e^{fmt(RUNNING_GAP_LIMIT)} = {fmt(math.exp(RUNNING_GAP_LIMIT))} times too large or too small, "
    "shifts or scales a layer's output at evaluation by a sizeable share of the layer's own spread. "
    "The limit is set by hand, not fitted: above it, the network is evaluated on inputs unlike those "
    "it trained on, a train/eval mismatch, and the run gets a warning."
)


def bn_gap_sentence(h: Health) -> str | None:
    """The experiment page's sentence on a run's BatchNorm mismatch (None: the run measured no gap)."""
    if h.bn_gap is None:
        return None
    side = "above" if h.bn_gap > RUNNING_GAP_LIMIT else "within"
    out = (
        f"The largest BatchNorm running gap at the last measured epoch was {fmt(h.bn_gap)}, in "
        f"{h.bn_gap_where}: {side} the limit of {fmt(RUNNING_GAP_LIMIT)}."
    )
    if h.valid_running_over_batch is not None:
        out += (
            f" The final validation loss with running statistics was {fmt(h.valid_running_over_batch)}× "
            "the one with batch statistics."
        )
    return out

SCORE_TEXT = (
    "Health score (lower is healthier): log10 of max std, plus log10 of std growth, plus dead late, "
    "plus log10 of max loss ratio, each floored at zero and skipped when missing; runs are ordered by "
    "verdict first, then by this score."
)


def threshold_text(t: Threshold) -> str:
    """The Method page's sentence for a threshold, with its limit from the constant."""
    return f"A run whose {MEASURE_NAMES[t.measure]} is above {fmt(t.limit)} {t.why}: {t.level}."


def threshold_texts() -> list[dict[str, str]]:
    return [
        {
            "name": k,
            "level": t.level,
            "measure": MEASURE_NAMES[t.measure],
            "limit": fmt(t.limit),
            "text": threshold_text(t),
        }
        for k, t in THRESHOLDS.items()
    ]


# ---------------------------------------------------------------- axis sentences


def _fold(ratio: float) -> str:
    """A ratio in words (no digits, so the sentence's numbers stay those of the table)."""
    for limit, words in (
        (1000, "over a thousandfold lower"),
        (100, "over a hundredfold lower"),
        (10, "over tenfold lower"),
        (5, "under a fifth of it"),
        (4, "under a quarter of it"),
        (3, "under a third of it"),
        (2, "under half of it"),
        (1.25, "lower"),
    ):
        if ratio >= limit:
            return words
    return "slightly lower"


def _std_sentence(table: AxisTable) -> str | None:
    rows = [r for r in table.rows if r.health.max_std is not None]
    if len(rows) < 2:
        return None
    best = min(rows, key=lambda r: r.health.max_std)
    ref = next((r for r in rows if r.role == "reference" and r is not best), None)
    other = ref or max((r for r in rows if r is not best), key=lambda r: r.health.max_std)
    lead = f"Of the {count_word(len(table.rows))} runs on {table.axis}, {best.id} kept its largest std lowest"
    a, b = best.health.max_std, other.health.max_std
    if b <= a:
        return f"{lead} ({fmt(a)}), level with {other.id} ({fmt(b)})."
    return f"{lead} ({fmt(a)}, against {fmt(b)} for {other.id}: {_fold(b / a)})."


@dataclass(frozen=True)
class _Comparison:
    """A same-shape sentence: which runs share the lowest shown value of `measure`, against the highest."""

    measure: str  # a Health field
    same: str  # all runs equal; fields: {among}, {low}
    differ: str  # fields: {among}, {ids}, {low}, {high}, {high_id}, {high_module}


_COMPARISONS = (
    _Comparison(
        "std_growth",
        "Every run's largest std grew by the same factor ({low}).",
        "Std growth was lowest for {ids} ({low}) and highest for {high_id} ({high}, in {high_module}).",
    ),
    _Comparison(
        "dead_late",
        "All runs ended with the same dead share ({low}).",
        "Fewest dead activations late in training: {ids} (dead share {low}, against {high} for {high_id}).",
    ),
)
_LOSS = _Comparison(
    "valid_loss",
    "All runs{among} ended at the same final valid loss ({low}).",
    "Lowest final valid loss{among}: {ids} ({low}, against {high} for {high_id}).",
)


def _compare(rows: Sequence[Row], c: _Comparison, among: str = "") -> str | None:
    rows = [r for r in rows if getattr(r.health, c.measure) is not None]
    if len(rows) < 2:
        return None
    value: Callable[[Row], float] = lambda r: getattr(r.health, c.measure)  # noqa: E731
    low, high = min(rows, key=value), max(rows, key=value)
    ids = [r.id for r in rows if fmt(value(r)) == fmt(value(low))]  # ties as the table shows them
    if len(ids) == len(rows):
        return c.same.format(among=among, low=fmt(value(low)))
    module = getattr(high.health, f"{c.measure}_module", None) or DASH
    return c.differ.format(
        among=among,
        ids=join_words(ids),
        low=fmt(value(low)),
        high=fmt(value(high)),
        high_id=high.id,
        high_module=module,
    )


def _loss_sentences(table: AxisTable) -> list[str]:
    """Lowest final valid loss within each noise/latent scale; never across scales (the loss of another
    schedule or latent scale is on another scale, so comparing it would mislead)."""
    done = [r for r in table.rows if r.health.status == "completed" and r.health.valid_loss is not None]
    left = [r.id for r in table.rows if r.health.status != "completed" and r.health.valid_loss is not None]
    scales: dict[str, list[Row]] = {}
    for r in done:
        scales.setdefault(loss_scale(r.item.spec), []).append(r)
    out = [
        s
        for scale, rows in scales.items()
        if (s := _compare(rows, _LOSS, f" among the runs with {scale}" if len(scales) > 1 else ""))
    ]
    if len(scales) > 1:
        main = max(scales, key=lambda k: len(scales[k]))
        others = [(scale, [r.id for r in rows]) for scale, rows in scales.items() if scale != main]
        parts = "; ".join(f"{join_words(ids)} ({scale})" for scale, ids in others)
        verb = "is" if len(others) == 1 and len(others[0][1]) == 1 else "are"
        out.append(
            f"Losses are not compared across noise schedules or latent scales, which change the scale "
            f"of the loss: {parts} {verb} not compared with the runs with {main}."
        )
    if left:
        out.append(
            f"{join_words(left)} stopped early, so {'its' if len(left) == 1 else 'their'} losses are "
            "left out of the loss comparison."
        )
    return out


def _failure_sentences(table: AxisTable) -> list[str]:
    out = []
    for r in table.rows:
        h = r.health
        if h.diverged:
            at = f" at step {fmt(h.diverged_at_step)}" if h.diverged_at_step is not None else ""
            out.append(f"{r.id} diverged{at}.")
        elif h.status not in ("completed", "diverged"):
            tail = "" if h.has_stats else " before recording activation statistics"
            out.append(f"{r.id} failed{tail}.")
    return out


def _gap_sentences(table: AxisTable) -> list[str]:
    rows = [
        r for r in table.rows if r.health.valid_gap is not None and r.health.valid_gap_batch_stats is not None
    ]
    return [
        f"With BatchNorm, {r.id}'s valid loss was {fmt(r.health.valid_gap)}× its train loss with running "
        f"statistics and {fmt(r.health.valid_gap_batch_stats)}× with batch statistics."
        for r in rows
    ]


def _verdict_sentence(table: AxisTable) -> str:
    parts = [
        f"{level}: {join_words(ids)}"
        for level in LEVELS
        if (ids := [r.id for r in table.rows if r.level == level])
    ]
    return "Verdicts: " + "; ".join(parts) + "."


def axis_sentences(table: AxisTable) -> list[str]:
    """Sentences generated from the table's numbers (each number as `fmt` shows it in the table)."""
    if not table.rows:
        return [f"No runs on {table.axis} yet: there is nothing to compare."]
    if len(table.rows) == 1:
        return [f"Only one run on {table.axis} so far ({table.rows[0].id}): there is nothing to compare."]
    out: list[str] = []
    profiles = sorted({r.item.spec.profile for r in table.rows})
    if len(profiles) > 1:
        out.append(
            f"These runs come from different profiles ({join_words(profiles)}), so their numbers are "
            "not directly comparable."
        )
    found = [_std_sentence(table), *(_compare(table.rows, c) for c in _COMPARISONS)]
    out += [s for s in found if s]
    out += _loss_sentences(table) + _gap_sentences(table) + _failure_sentences(table)
    out.append(_verdict_sentence(table))
    return out


# ---------------------------------------------------------------- takeaways and the scale note


@dataclass(frozen=True)
class Takeaway:
    text: str
    ids: tuple[str, ...]  # runs the sentence is about, to link


def _baseline_takeaway(by_id: dict[str, Assessed]) -> Takeaway | None:
    course, ref = by_id.get(COURSE_ID), by_id.get(REFERENCE_ID)
    if not course or not ref or course.health.max_std is None or ref.health.max_std is None:
        return None
    where = f" in {ref.health.max_std_module}" if ref.health.max_std_module else ""
    return Takeaway(
        f"The course UNet's largest activation std stayed at {fmt(course.health.max_std)} "
        f"({course.level}), while the Diffusers baseline reached "
        f"{fmt(ref.health.max_std)}{where} ({ref.level}).",
        (COURSE_ID, REFERENCE_ID),
    )


def _fix_takeaway(items: list[Assessed], by_id: dict[str, Assessed]) -> Takeaway | None:
    ref = by_id.get(REFERENCE_ID)
    if ref is None:
        return None
    variants = [i for i in items if i.spec.model.family == "diffusers" and i.id != REFERENCE_ID]
    if ref.level == "healthy":
        return Takeaway(
            f"The Diffusers baseline was judged healthy at this scale (largest std "
            f"{fmt(ref.health.max_std)}), so its variants had nothing to fix here.",
            (REFERENCE_ID,),
        )
    fixed = [i.id for i in variants if LEVELS.index(i.level) < LEVELS.index(ref.level)]
    if not fixed:
        return Takeaway(
            f"No Diffusers variant was judged healthier than the baseline ({ref.level}).", (REFERENCE_ID,)
        )
    return Takeaway(
        f"Judged healthier than the Diffusers baseline ({ref.level}): {join_words(fixed)}.",
        (REFERENCE_ID, *fixed),
    )


def _batchnorm_takeaway(items: list[Assessed]) -> Takeaway | None:
    both = [i for i in items if i.health.valid_gap is not None and i.health.valid_gap_batch_stats is not None]
    if not both:
        return None
    parts = [f"{i.id} {fmt(i.health.valid_gap)}× vs {fmt(i.health.valid_gap_batch_stats)}×" for i in both]
    return Takeaway(
        "BatchNorm, valid loss as a multiple of train loss with running statistics vs with batch "
        f"statistics: {'; '.join(parts)}.",
        tuple(i.id for i in both),
    )


def _misleading_loss_takeaway(items: list[Assessed]) -> Takeaway | None:
    """The pair, within one loss scale, where the lower valid loss came with the larger std ratio."""
    done = [
        i
        for i in items
        if i.health.status == "completed" and i.health.valid_loss is not None and i.health.max_std
    ]
    best: tuple[float, Assessed, Assessed] | None = None
    for a in done:
        for b in done:
            if (
                loss_scale(a.spec) == loss_scale(b.spec)
                and a.health.valid_loss < b.health.valid_loss
                and a.health.max_std > b.health.max_std
            ):
                ratio = a.health.max_std / b.health.max_std
                if best is None or ratio > best[0]:
                    best = (ratio, a, b)
    if best is None:
        return None
    _, a, b = best
    return Takeaway(
        f"Loss alone misleads: {a.id} reached a lower valid loss than {b.id} "
        f"({fmt(a.health.valid_loss)} vs {fmt(b.health.valid_loss)}) while its largest std was "
        f"{fmt(a.health.max_std)} against {fmt(b.health.max_std)}.",
        (a.id, b.id),
    )


def _group_takeaways(items: list[Assessed]) -> list[Takeaway]:
    out = []
    for group in dict.fromkeys(i.spec.group for i in items):
        members = [i for i in ranking(i for i in items if i.spec.group == group) if i.score is not None]
        if len(members) < 2:
            continue
        top = members[0]
        out.append(
            Takeaway(
                f"Healthiest in {group}: {top.id} ({top.level}, largest std "
                f"{fmt(top.health.max_std)}, dead share late {fmt(top.health.dead_late)}).",
                (top.id,),
            )
        )
    return out


def _diverged_takeaway(items: list[Assessed]) -> Takeaway | None:
    div = [i for i in items if i.health.diverged]
    if not div:
        return None
    parts = [
        i.id + (f" (step {fmt(i.health.diverged_at_step)})" if i.health.diverged_at_step else "") for i in div
    ]
    return Takeaway(f"Diverged: {join_words(parts)}.", tuple(i.id for i in div))


def takeaways(items: list[Assessed]) -> list[Takeaway]:
    """Measured takeaways for the summary page, each with the ids of the runs it is about."""
    by_id = {i.id: i for i in items}
    found = [
        _baseline_takeaway(by_id),
        _fix_takeaway(items, by_id),
        *_group_takeaways(items),
        _batchnorm_takeaway(items),
        _misleading_loss_takeaway(items),
        _diverged_takeaway(items),
    ]
    return [t for t in found if t is not None]


def _span(values: Sequence[float | int | None]) -> str:
    vals = sorted({v for v in values if v is not None})
    if not vals:
        return DASH
    return fmt(vals[0]) if len(vals) == 1 else f"{fmt(vals[0])} to {fmt(vals[-1])}"


def scale_note(items: list[Assessed]) -> str:
    """The scale the statements hold at: profile(s), data size, epochs and optimiser steps of the runs."""
    if not items:
        return "No runs yet, so no statements."
    parts = []
    for profile in dict.fromkeys(i.spec.profile for i in items):
        members = [i for i in items if i.spec.profile == profile]
        sizes = [i.spec.data.size for i in members]
        epochs = [i.spec.train.epochs for i in members]
        steps = [i.health.steps for i in members]
        parts.append(
            f"{plural(len(members), 'run', count_word(len(members)))} of the {profile} profile on "
            f"{_span(sizes)} latents, {plural(max(epochs), 'epoch', _span(epochs))}, "
            f"{plural(max((s for s in steps if s), default=0), 'optimiser step', _span(steps))}, "
            f"batch size {_span([i.spec.train.batch_size for i in members])}"
        )
    return (
        "Measured on " + "; ".join(parts) + ". The statements hold at this scale; effects that need "
        "longer training or more data may not show."
    )
