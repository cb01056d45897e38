"""Health measures, verdicts, generated sentences and the insight templates, on constructed statistics."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from markupsafe import escape

from runner import insights as ins
from runner import prose, views
from runner.report import Report
from runner.results import Metrics, Run, load_runs, write_metrics
from runner.spec import Spec, build_spec
from runner.statsfile import Stats, save_stats
from runner.text import DASH, fmt, slugs
from runner.text import slug as make_slug

TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "site"
NAMES = ["down_blocks.0.resnets.0", "down_blocks.1.resnets.0", "mid_block.resnets.0"]
NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def make_stats(std_curve: np.ndarray, modules: int = 3, dead: tuple[float, float] = (0.1, 0.1),
               mean_shift: float = 0.0) -> Stats:
    """Module m has std std_curve * (1 + 0.1 m); the dead share goes linearly from dead[0] to dead[1]."""
    steps = len(std_curve)
    std = np.outer(std_curve, 1 + 0.1 * np.arange(modules))
    mean = np.outer(np.linspace(0, mean_shift, steps), np.ones(modules))
    share = np.linspace(dead[0], dead[1], steps)
    hist = np.zeros((modules, 40, steps))
    hist[:, 0, :] = share * 1000
    hist[:, 1, :] = (1 - share) * 1000
    return Stats(mean, std, hist, tuple(NAMES[:modules]), np.arange(steps))


def make_metrics(loss: list[float | None], status: str = "completed", train: float | None = 0.2,
                 valid: float | None = 0.21, valid_bs: float | None = None, diverged_at: int | None = None,
                 error: str | None = None, run_id: str = "x") -> Metrics:
    """A metrics record as runner.train writes it (the real contract type)."""
    n = len(loss)
    return Metrics.model_validate({
        "id": run_id, "title": run_id, "spec_hash": "0" * 16, "profile": "smoke", "status": status,
        "diverged_at_step": diverged_at, "error": error, "params": 1, "steps_per_epoch": n,
        "steps_completed": n, "steps_total": n, "schedule_steps": n,
        "batches": {"loss": [None if v is None else float(v) for v in loss], "lr": [1e-3] * n,
                    "grad_norm": [1.0] * n},
        "epochs": [], "final": {"train_loss": train, "valid_loss": valid, "valid_loss_batch_stats": valid_bs},
        "timings": {"total_s": 1.0, "step_s": 0.01},
        "environment": {"device": "cpu", "precision": "fp32", "torch": "t", "diffusers": "d", "python": "3",
                        "runner": "r"},
    })


def smooth_loss(n: int = 100, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(0.3 + 0.7 * np.exp(-np.arange(n) / 15) + rng.normal(0, 0.02, n))


def spec(run_id: str, group: str = "architecture", axis: str = "norm", **sections: Any) -> Spec:
    sections.setdefault("title", run_id)
    return build_spec({"id": run_id, "group": group, "axis": axis, **sections}, "test",
                      profile="smoke")


def run(run_id: str, std_curve: np.ndarray | None, **kw: Any) -> Run:
    """A sound run whose statistics are already in memory (no folder is read)."""
    sections = {k: kw.pop(k) for k in ("group", "axis", "model", "noise", "data", "title") if k in kw}
    dead = kw.pop("dead", (0.1, 0.1))
    stats = None if std_curve is None else make_stats(std_curve, dead=dead)
    loss = kw.pop("loss", None) or smooth_loss()
    return Run(run_id, Path("/nonexistent") / run_id, spec(run_id, **sections),
               make_metrics(loss, run_id=run_id, **kw), _stats=stats, _stats_read=True)


def assessed(runs: list[Run]) -> list[ins.Assessed]:
    return [ins.assess(r) for r in runs]


FLAT = np.ones(100)
CLIMB = np.geomspace(1, 300, 100)
MEDIUM = np.linspace(1, 6, 100)


# ---------------------------------------------------------------- measures and verdicts


def test_fmt_is_three_significant_digits() -> None:
    assert [fmt(x) for x in (1.8, 312.4, 1234.5, 0.02134, 0.5, 12, 1e-6, None, float("nan"))] == [
        "1.8", "312", "1,230", "0.0213", "0.5", "12", "1.00e-06", DASH, DASH]


def test_flat_std_near_one_is_healthy() -> None:
    h = ins.measure(make_metrics(smooth_loss()), make_stats(FLAT))
    assert h.max_std == pytest.approx(1.2) and h.max_std_module == "mid.res0"
    assert h.std_growth == pytest.approx(1.0) and h.loss_spikes == 0
    assert ins.verdict(h) == ins.Verdict("healthy", ())


def test_std_climbing_into_the_hundreds_is_unhealthy() -> None:
    h = ins.measure(make_metrics(smooth_loss()), make_stats(CLIMB))
    assert h.max_std == pytest.approx(360) and h.std_growth > 100
    v = ins.verdict(h)
    assert v.level == "unhealthy"
    # One reason per measure: the unhealthy limit, not also the warning limit it necessarily crossed.
    assert v.reasons == ("max std 360 in mid.res0 (threshold 50)",
                         "std growth 179 in mid.res0 (threshold 20)")  # mean of last tenth / first tenth


def test_std_growth_and_mean_drift_use_first_and_last_tenth() -> None:
    curve = np.r_[np.full(10, 1.0), np.full(80, 5.0), np.full(10, 3.0)]
    h = ins.measure(make_metrics(smooth_loss()), make_stats(curve, mean_shift=4.0))
    assert h.std_growth == pytest.approx(3.0)  # late mean 3 x 1.2 over early mean 1 x 1.2
    assert h.max_std == pytest.approx(6.0) and h.max_std_step == 11
    early, late = np.linspace(0, 4, 100)[:10].mean(), np.linspace(0, 4, 100)[-10:].mean()
    assert h.mean_drift == pytest.approx(late - early)


def test_dead_shares_early_and_late() -> None:
    stats = make_stats(FLAT, dead=(0.5, 0.5))
    stats.hist[:, 0, -10:] = 100  # last tenth: 100 of 100 + (1 - 0.5) * 1000 = 1/6 dead
    stats.hist[:, 1, -10:] = 500
    h = ins.measure(make_metrics(smooth_loss()), stats)
    assert h.dead_early == pytest.approx(0.5) and h.dead_late == pytest.approx(1 / 6)
    assert ins.verdict(h).level == "healthy"  # 0.5 is the limit, not above it
    dying = ins.measure(make_metrics(smooth_loss()), make_stats(FLAT, dead=(0.2, 0.9)))
    assert ins.verdict(dying).level == "warning"


def test_nonfinite_std_counts_only_where_the_module_ran() -> None:
    stats = make_stats(FLAT)
    stats.std[5, 0] = np.nan  # module 0 did not run at step 5: NaN and an empty histogram
    stats.hist[0, :, 5] = 0
    assert ins.measure(make_metrics(smooth_loss()), stats).nonfinite_steps == 0
    stats.std[7, 1] = np.inf
    h = ins.measure(make_metrics(smooth_loss()), stats)
    assert h.nonfinite_steps == 1 and h.max_std == pytest.approx(1.2)  # the largest finite std
    assert ins.verdict(h).reasons == ("non-finite steps 1 (threshold 0)",)


def test_loss_spike_is_flagged_and_noise_is_not() -> None:
    loss = smooth_loss()
    assert ins.loss_spikes(loss)[0] == 0
    spiky = list(loss)
    spiky[60:63] = [3.0, 2.5, 2.0]
    count, ratio = ins.loss_spikes(spiky)
    assert count == 3 and ratio > 5
    v = ins.verdict(ins.measure(make_metrics(spiky), make_stats(FLAT)))
    assert v.level == "unhealthy" and any(r.startswith("max loss ratio") for r in v.reasons)
    # The first tenth (falling from the initial loss) never counts, and None entries are skipped.
    assert ins.loss_spikes([5.0, 1.0, None, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8])[0] == 0


def test_diverged_and_failed_runs_are_unhealthy_with_reasons() -> None:
    diverged = ins.measure(make_metrics(smooth_loss(40) + [None], status="diverged", diverged_at=41), None)
    assert diverged.diverged and diverged.max_std is None and not diverged.has_stats
    assert "training diverged at step 41" in ins.verdict(diverged).reasons
    failed = ins.measure(make_metrics([], status="failed", error="RuntimeError: out of memory\ntraceback",
                                      train=None, valid=None), None)
    assert failed.max_std is failed.train_loss is failed.loss_spikes is None
    v = ins.verdict(failed)
    assert v.level == "unhealthy" and v.reasons == ("the run failed: RuntimeError: out of memory",)


def test_valid_gap_from_batchnorm_running_statistics() -> None:
    h = ins.measure(make_metrics(smooth_loss(), train=0.1, valid=0.31, valid_bs=0.105), make_stats(FLAT))
    assert h.valid_gap == pytest.approx(3.1) and h.valid_gap_batch_stats == pytest.approx(1.05)
    assert ins.verdict(h).reasons == ("valid ÷ train loss 3.1 (threshold 2)",)


def write_run(folder: Path, stats: Stats, name: str = "x") -> None:
    folder.mkdir(parents=True)
    save_stats(stats, folder / "stats.npz")
    (folder / "spec.yaml").write_text(spec(name).to_yaml())
    write_metrics(folder, make_metrics(smooth_loss(), run_id=name))


def test_stats_are_loaded_from_the_run_folder(tmp_path) -> None:
    write_run(tmp_path / "x", make_stats(CLIMB))
    [item] = Report.build(load_runs(tmp_path)).assessed.values()
    assert item.health.max_std == pytest.approx(360) and item.verdict.level == "unhealthy"


# ---------------------------------------------------------------- tables and sentences


def norm_runs() -> list[Run]:
    return [
        run("layernorm_layernorm", FLAT, model={"resnet_norm": "layer", "attention_norm": "layer"},
            valid=0.25),
        run("diffusers_baseline", CLIMB, valid=0.3),
        run("batchnorm_resnets", MEDIUM, model={"resnet_norm": "batch"}, train=0.1, valid=0.31,
            valid_bs=0.105, dead=(0.1, 0.6)),
        run("course_baseline", FLAT * 0.9, model={"family": "course"}, valid=0.22),
    ]


def sentence_numbers(text: str, strip: list[str]) -> set[str]:
    for word in sorted(strip, key=len, reverse=True):
        text = text.replace(word, " ")
    return set(NUMBER.findall(text))


def test_sentence_numbers_are_table_numbers() -> None:
    [table] = ins.axis_tables(assessed(norm_runs()))
    assert [r.id for r in table.rows][:2] == ["diffusers_baseline", "course_baseline"]
    assert table.rows[0].role == "reference"
    strip = [r.id for r in table.rows] + [ins.short_name(n) for n in NAMES] + [table.axis]
    cell_numbers = set().union(*(sentence_numbers(" ".join(r.cells), strip) for r in table.rows))
    sentences = prose.axis_sentences(table)
    text = " ".join(sentences)
    assert "course_baseline kept its largest std lowest (1.08, against 360 for diffusers_baseline" in text
    assert "With BatchNorm, batchnorm_resnets's valid loss was 3.1× its train loss" in text
    assert "Lowest final valid loss: course_baseline (0.22, against 0.31 for batchnorm_resnets)." in text
    assert "Fewest dead activations late in training: diffusers_baseline, course_baseline and " in text
    for s in sentences:
        assert sentence_numbers(s, strip) <= cell_numbers, s


def test_single_run_axis_has_nothing_to_compare() -> None:
    tables = ins.axis_tables(assessed([run("init_default", FLAT, group="other", axis="init")]))
    assert prose.axis_sentences(tables[0]) == [
        "Only one run on init so far (init_default): there is nothing to compare."]


def test_hyperparameter_axis_gets_the_reference_row() -> None:
    runs = [run("diffusers_baseline", CLIMB),
            run("lr_1e-4", FLAT, group="hyperparameters", axis="learning rate")]
    hyper = [t for t in ins.axis_tables(assessed(runs)) if t.group == "hyperparameters"]
    assert [(r.id, r.role) for r in hyper[0].rows] == [("diffusers_baseline", "reference"), ("lr_1e-4", "")]
    assert "nothing to compare" not in " ".join(prose.axis_sentences(hyper[0]))


def test_no_loss_comparison_across_noise_schedules() -> None:
    noise = {"group": "hyperparameters", "axis": "noise schedule"}
    ddim = run("noise_ddim", FLAT, noise={"schedule": "ddim", "beta_end": 0.01}, data={"scale": 0.18215},
               valid=0.05, **noise)
    runs = [run("diffusers_baseline", CLIMB, valid=0.3), ddim]
    table = [t for t in ins.axis_tables(assessed(runs)) if t.axis == "noise schedule"][0]
    text = " ".join(prose.axis_sentences(table))
    assert "final valid loss" not in text.lower()
    assert "Losses are not compared across noise schedules" in text
    assert "noise_ddim (ddim β_end 0.01, latents ×0.182)" in text
    # With a second cosine run the comparison is made, but only between the cosine runs.
    runs.append(run("noise_cosine_scaled_t", FLAT, noise={"timestep_input": "scaled"}, valid=0.25, **noise))
    table = [t for t in ins.axis_tables(assessed(runs)) if t.axis == "noise schedule"][0]
    [loss] = [s for s in prose.axis_sentences(table) if "Lowest final valid loss" in s]
    assert "noise_ddim" not in loss and "noise_cosine_scaled_t" in loss and "diffusers_baseline" in loss


def test_ranking_examples_takeaways_and_scale() -> None:
    runs = norm_runs() + [run("diverged_one", None, status="diverged", diverged_at=40, loss=smooth_loss(40))]
    ranked = ins.ranking(assessed(runs))
    assert [r.verdict.level for r in ranked] == ["healthy", "healthy", "warning", "unhealthy", "unhealthy"]
    assert ranked[0].id == "course_baseline" and ranked[-1].id == "diverged_one"  # no score: last
    best, worst = Report.build(runs).examples(need=())
    assert (best.id, worst.id) == ("course_baseline", "diffusers_baseline")
    texts = [t.text for t in prose.takeaways(assessed(runs))]
    assert ("The course UNet's largest activation std stayed at 1.08 (healthy), while the Diffusers baseline "
            "reached 360 in mid.res0 (unhealthy).") in texts
    assert any("batchnorm_resnets 3.1× vs 1.05×" in t for t in texts)
    assert "Diverged: diverged_one (step 40)." in texts
    note = prose.scale_note(assessed(runs))
    assert "smoke profile on 160 latents, 1 epoch, 40 to 100 optimiser steps" in note


# ---------------------------------------------------------------- templates


def drawn(runs, kind, rel) -> None:
    return None  # a chart drawer that "drew" every chart


def test_templates_render_strictly_and_escape() -> None:
    from runner.templating import environment

    env = environment(TEMPLATES)
    evil = "<script>alert(1)</script>"
    runs = norm_runs()
    runs[0] = run("layernorm_layernorm", FLAT, axis=evil, title=evil)
    runs.append(run("failed_one", None, status="failed", error=evil, valid=None, train=None))
    report = Report.build(runs)
    pages = {
        "insights_axis.md.j2": views.axis_page(report, "architecture", drawn),
        "insights_reading.md.j2": views.reading(report),
        "insights_summary.md.j2": views.summary(report),
        "method_measures.md.j2": views.method(report, {}, None),
    }
    for name, context in pages.items():
        out = env.get_template(name).render(**context)
        assert "<script>" not in out, name
    axis = env.get_template("insights_axis.md.j2").render(**pages["insights_axis.md.j2"])
    assert "&lt;script&gt;" in axis and "](charts/architecture-norm-stats.png)" in axis
    assert 'href="../experiments/diffusers_baseline/index.html"' in axis
    summary = env.get_template("insights_summary.md.j2").render(**pages["insights_summary.md.j2"])
    assert "the run failed: &lt;script&gt;" in summary
    method = env.get_template("method_measures.md.j2").render(**pages["method_measures.md.j2"])
    assert all(str(escape(prose.threshold_text(t))) in method for t in ins.THRESHOLDS.values())
    assert "above 50 has exploding activations: unhealthy" in method  # the limit from its constant
    reading = env.get_template("insights_reading.md.j2").render(**views.reading(Report.build([])))
    assert "No examples yet" in reading


def test_slugs_are_safe_distinct_and_anchor_the_summary() -> None:
    assert slugs(["learning rate", "Learning-Rate", "<b>", "noise schedule", "learning rate"], "axis") == {
        "learning rate": "learning-rate", "Learning-Rate": "learning-rate-2", "<b>": "b",
        "noise schedule": "noise-schedule"}
    assert slugs(["%%%"], "axis") == {"%%%": "axis"} and make_slug("A b") == "a-b"
    runs = [run("diffusers_baseline", CLIMB),
            run("lr_1e-4", FLAT, group="hyperparameters", axis="learning rate"),
            run("elsewhere", FLAT, group="other", axis="x")]
    report = Report.build(runs)
    rows = {r["id"]: r for r in views.summary(report)["ranking"]}
    assert rows["lr_1e-4"]["axis_anchor"] == ("hyperparameters", "learning-rate")
    assert rows["diffusers_baseline"]["axis_anchor"] == ("architecture", "norm")
    assert rows["elsewhere"]["axis_anchor"] is None  # its group has no insight page
    page = views.axis_page(report, "hyperparameters", drawn)
    assert [(a["name"], a["slug"]) for a in page["axes"]] == [("learning rate", "learning-rate")]


def test_empty_group_page_states_no_scale() -> None:
    page = views.axis_page(Report.build([run("a", FLAT)]), "hyperparameters", drawn)
    assert page["axes"] == [] and page["scale_note"] == "No runs yet, so no statements."
    empty = views.summary(Report.build([]))
    assert empty["ranking"] == [] and empty["counts"]["healthy"] == 0


def test_report_reads_each_statistics_file_once(monkeypatch, tmp_path) -> None:
    import runner.results as results

    reads = []
    real = results.load_stats
    monkeypatch.setattr(results, "load_stats", lambda path: reads.append(Path(path)) or real(path))
    for name in ("a", "b"):
        write_run(tmp_path / name, make_stats(FLAT), name)
    report = Report.build(load_runs(tmp_path))
    views.summary(report), views.axis_page(report, "architecture", drawn), views.reading(report)
    assert sorted(p.parent.name for p in reads) == ["a", "b"]
