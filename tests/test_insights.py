"""Health measures, verdicts, generated sentences and the insight templates, on constructed statistics."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape

from runner import insights as ins
from runner.spec import Spec, build_spec

TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "site"
NAMES = ["down_blocks.0.resnets.0", "down_blocks.1.resnets.0", "mid_block.resnets.0"]
NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?")


@dataclass
class FakeRun:
    spec: Spec
    metrics: dict[str, Any]
    stats: dict[str, Any] | None

    @property
    def id(self) -> str:
        return self.spec.id


def make_stats(std_curve: np.ndarray, modules: int = 3, dead: tuple[float, float] = (0.1, 0.1),
               mean_shift: float = 0.0) -> dict[str, Any]:
    """Module m has std std_curve * (1 + 0.1 m); the dead share goes linearly from dead[0] to dead[1]."""
    steps = len(std_curve)
    std = np.outer(std_curve, 1 + 0.1 * np.arange(modules))
    mean = np.outer(np.linspace(0, mean_shift, steps), np.ones(modules))
    share = np.linspace(dead[0], dead[1], steps)
    hist = np.zeros((modules, 40, steps))
    hist[:, 0, :] = share * 1000
    hist[:, 1, :] = (1 - share) * 1000
    return {"mean": mean, "std": std, "hist": hist, "names": np.array(NAMES[:modules])}


def make_metrics(loss: list[float | None], status: str = "completed", train: float | None = 0.2,
                 valid: float | None = 0.21, valid_bs: float | None = None, diverged_at: int | None = None,
                 error: str | None = None) -> dict[str, Any]:
    return {
        "status": status, "diverged_at_step": diverged_at, "error": error, "steps_completed": len(loss),
        "batches": {"loss": loss},
        "final": {"train_loss": train, "valid_loss": valid, "valid_loss_batch_stats": valid_bs},
    }


def smooth_loss(n: int = 100, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(0.3 + 0.7 * np.exp(-np.arange(n) / 15) + rng.normal(0, 0.02, n))


def spec(run_id: str, group: str = "architecture", axis: str = "norm", **sections: Any) -> Spec:
    return build_spec({"id": run_id, "group": group, "axis": axis, "title": run_id, **sections}, "test",
                      profile="smoke")


def run(run_id: str, std_curve: np.ndarray | None, **kw: Any) -> FakeRun:
    sections = {k: kw.pop(k) for k in ("group", "axis", "model", "noise", "data") if k in kw}
    dead = kw.pop("dead", (0.1, 0.1))
    stats = None if std_curve is None else make_stats(std_curve, dead=dead)
    loss = kw.pop("loss", None) or smooth_loss()
    return FakeRun(spec(run_id, **sections), make_metrics(loss, **kw), stats)


FLAT = np.ones(100)
CLIMB = np.geomspace(1, 300, 100)
MEDIUM = np.linspace(1, 6, 100)


# ---------------------------------------------------------------- measures and verdicts


def test_fmt_is_three_significant_digits() -> None:
    assert [ins.fmt(x) for x in (1.8, 312.4, 1234.5, 0.02134, 0.5, 12, 1e-6, None, float("nan"))] == [
        "1.8", "312", "1230", "0.0213", "0.5", "12", "1.00e-06", ins.DASH, ins.DASH]


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
    stats["hist"][:, 0, -10:] = 100  # last tenth: 100 of 100 + (1 - 0.5) * 1000 = 1/6 dead
    stats["hist"][:, 1, -10:] = 500
    h = ins.measure(make_metrics(smooth_loss()), stats)
    assert h.dead_early == pytest.approx(0.5) and h.dead_late == pytest.approx(1 / 6)
    assert ins.verdict(h).level == "healthy"  # 0.5 is the limit, not above it
    dying = ins.measure(make_metrics(smooth_loss()), make_stats(FLAT, dead=(0.2, 0.9)))
    assert ins.verdict(dying).level == "warning"


def test_nonfinite_std_counts_only_where_the_module_ran() -> None:
    stats = make_stats(FLAT)
    stats["std"][5, 0] = np.nan  # module 0 did not run at step 5: NaN and an empty histogram
    stats["hist"][0, :, 5] = 0
    assert ins.measure(make_metrics(smooth_loss()), stats).nonfinite_steps == 0
    stats["std"][7, 1] = np.inf
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
    failed = ins.measure({"status": "failed", "error": "RuntimeError: out of memory\ntraceback", "final": {}},
                         None)
    assert failed.max_std is failed.train_loss is failed.loss_spikes is None
    v = ins.verdict(failed)
    assert v.level == "unhealthy" and v.reasons == ("the run failed: RuntimeError: out of memory",)


def test_valid_gap_from_batchnorm_running_statistics() -> None:
    h = ins.measure(make_metrics(smooth_loss(), train=0.1, valid=0.31, valid_bs=0.105), make_stats(FLAT))
    assert h.valid_gap == pytest.approx(3.1) and h.valid_gap_batch_stats == pytest.approx(1.05)
    assert ins.verdict(h).reasons == ("valid ÷ train loss 3.1 (threshold 2)",)


def test_stats_are_loaded_from_the_run_folder(tmp_path) -> None:
    s = make_stats(CLIMB)
    np.savez_compressed(tmp_path / "stats.npz", **s)

    @dataclass
    class Record:  # the shape of runner.site.RunRecord
        id: str
        spec: Spec
        metrics: dict[str, Any]
        run_dir: Path

    [item] = ins.assess([Record("x", spec("x"), make_metrics(smooth_loss()), tmp_path)])
    assert item.health.max_std == pytest.approx(360) and item.verdict.level == "unhealthy"


# ---------------------------------------------------------------- tables and sentences


def norm_runs() -> list[FakeRun]:
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
    [table] = ins.axis_tables(norm_runs())
    assert [r.id for r in table.rows][:2] == ["diffusers_baseline", "course_baseline"]
    assert table.rows[0].role == "reference"
    strip = [r.id for r in table.rows] + [ins._short(n) for n in NAMES] + [table.axis]
    cell_numbers = set().union(*(sentence_numbers(" ".join(r.cells), strip) for r in table.rows))
    sentences = ins.axis_sentences(table)
    text = " ".join(sentences)
    assert "course_baseline kept its largest std lowest (1.08, against 360 for diffusers_baseline" in text
    assert "With BatchNorm, batchnorm_resnets's valid loss was 3.1× its train loss" in text
    assert "Lowest final valid loss: course_baseline (0.22, against 0.31 for batchnorm_resnets)." in text
    assert "Fewest dead activations late in training: diffusers_baseline, course_baseline and " in text
    for s in sentences:
        assert sentence_numbers(s, strip) <= cell_numbers, s


def test_single_run_axis_has_nothing_to_compare() -> None:
    tables = ins.axis_tables([run("init_default", FLAT, group="other", axis="init")])
    assert ins.axis_sentences(tables[0]) == [
        "Only one run on init so far (init_default): there is nothing to compare."]


def test_hyperparameter_axis_gets_the_reference_row() -> None:
    runs = [run("diffusers_baseline", CLIMB),
            run("lr_1e-4", FLAT, group="hyperparameters", axis="learning rate")]
    hyper = [t for t in ins.axis_tables(runs) if t.group == "hyperparameters"]
    assert [(r.id, r.role) for r in hyper[0].rows] == [("diffusers_baseline", "reference"), ("lr_1e-4", "")]
    assert "nothing to compare" not in " ".join(ins.axis_sentences(hyper[0]))


def test_no_loss_comparison_across_noise_schedules() -> None:
    noise = {"group": "hyperparameters", "axis": "noise schedule"}
    ddim = run("noise_ddim", FLAT, noise={"schedule": "ddim", "beta_end": 0.01}, data={"scale": 0.18215},
               valid=0.05, **noise)
    runs = [run("diffusers_baseline", CLIMB, valid=0.3), ddim]
    table = [t for t in ins.axis_tables(runs) if t.axis == "noise schedule"][0]
    text = " ".join(ins.axis_sentences(table))
    assert "final valid loss" not in text.lower()
    assert "Losses are not compared across noise schedules" in text
    assert "noise_ddim (ddim β_end 0.01, latents ×0.182)" in text
    # With a second cosine run the comparison is made, but only between the cosine runs.
    runs.append(run("noise_cosine_scaled_t", FLAT, noise={"timestep_input": "scaled"}, valid=0.25, **noise))
    table = [t for t in ins.axis_tables(runs) if t.axis == "noise schedule"][0]
    [loss] = [s for s in ins.axis_sentences(table) if "Lowest final valid loss" in s]
    assert "noise_ddim" not in loss and "noise_cosine_scaled_t" in loss and "diffusers_baseline" in loss


def test_ranking_examples_takeaways_and_scale() -> None:
    runs = norm_runs() + [run("diverged_one", None, status="diverged", diverged_at=40, loss=smooth_loss(40))]
    ranked = ins.ranking(runs)
    assert [r.verdict.level for r in ranked] == ["healthy", "healthy", "warning", "unhealthy", "unhealthy"]
    assert ranked[0].id == "course_baseline" and ranked[-1].id == "diverged_one"  # no score: last
    best, worst = ins.examples(runs)
    assert (best.id, worst.id) == ("course_baseline", "diffusers_baseline")
    texts = [t.text for t in ins.takeaways(runs)]
    assert ("The course UNet's largest activation std stayed at 1.08 (healthy), while the Diffusers baseline "
            "reached 360 in mid.res0 (unhealthy).") in texts
    assert any("batchnorm_resnets 3.1× vs 1.05×" in t for t in texts)
    assert "Diverged: diverged_one (step 40)." in texts
    note = ins.scale_note(runs)
    assert "smoke profile on 160 latents (144 for training), 1 epoch, 40 to 100 optimiser steps" in note


# ---------------------------------------------------------------- templates


def md_filter(value: Any) -> Markup:
    return Markup(escape(re.sub(r"([\\`*_{}\[\]()#+\-.!|])", r"\\\1", " ".join(str(value).split()))))


def environments() -> list[Environment]:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), undefined=StrictUndefined, autoescape=True,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["md"] = md_filter
    envs = [env]
    try:  # the environment runner.site really renders with, when it imports
        from runner.site import environment
    except ImportError:
        return envs
    return [*envs, environment(TEMPLATES)]


def test_templates_render_strictly_and_escape() -> None:
    evil = "<script>alert(1)</script>"
    runs = norm_runs()
    runs[0] = run("layernorm_layernorm", FLAT, axis=evil)
    runs[0].spec = runs[0].spec.model_copy(update={"title": evil})
    runs.append(run("failed_one", None, status="failed", error=evil, valid=None, train=None))
    charts = {"norm": [("stats", "../comparisons/stats/norm.png")]}
    run_charts = {r.id: {"stats": f"../experiments/{r.id}/stats.png"} for r in runs}
    pages = {
        "insights_axis.md.j2": ins.axis_page_context(runs, "architecture", charts),
        "insights_reading.md.j2": ins.reading_context(runs, run_charts),
        "insights_summary.md.j2": ins.summary_context(runs),
        "method_measures.md.j2": ins.method_context(),
    }
    for env in environments():
        for name, context in pages.items():
            out = env.get_template(name).render(**context)
            assert "<script>" not in out, name
        axis = env.get_template("insights_axis.md.j2").render(**pages["insights_axis.md.j2"])
        assert "&lt;script&gt;" in axis and "../comparisons/stats/norm.png" in axis
        assert 'href="../experiments/diffusers_baseline/index.html"' in axis
        summary = env.get_template("insights_summary.md.j2").render(**pages["insights_summary.md.j2"])
        assert "the run failed: &lt;script&gt;" in summary
        reading = env.get_template("insights_reading.md.j2").render(**pages["insights_reading.md.j2"])
        assert "../experiments/course_baseline/stats.png" in reading
        method = env.get_template("method_measures.md.j2").render(**pages["method_measures.md.j2"])
        assert all(str(escape(t.text)) in method for t in ins.THRESHOLDS.values())
    empty = environments()[0].get_template("insights_reading.md.j2").render(**ins.reading_context([]))
    assert "No examples yet" in empty


def test_axis_slugs_are_safe_distinct_and_anchor_the_summary() -> None:
    slugs = ins.axis_slugs(["learning rate", "Learning-Rate", "<b>", "noise schedule", "learning rate"])
    assert slugs == {"learning rate": "learning-rate", "Learning-Rate": "learning-rate-2", "<b>": "b",
                     "noise schedule": "noise-schedule"}
    assert ins.axis_slugs(["%%%"]) == {"%%%": "axis"}
    runs = [run("diffusers_baseline", CLIMB),
            run("lr_1e-4", FLAT, group="hyperparameters", axis="learning rate"),
            run("elsewhere", FLAT, group="other", axis="x")]
    rows = {r["id"]: r for r in ins.summary_context(runs)["ranking"]}
    assert rows["lr_1e-4"]["axis_anchor"] == ("hyperparameters", "learning-rate")
    assert rows["diffusers_baseline"]["axis_anchor"] == ("architecture", "norm")
    assert rows["elsewhere"]["axis_anchor"] is None  # its group has no insight page
    page = ins.axis_page_context(runs, "hyperparameters")
    assert [(a["name"], a["slug"]) for a in page["axes"]] == [("learning rate", "learning-rate")]


def test_empty_group_page_states_no_scale() -> None:
    page = ins.axis_page_context([run("a", FLAT)], "hyperparameters")
    assert page["axes"] == [] and page["scale_note"] == "No runs yet, so no statements."
    assert ins.summary_context([])["ranking"] == [] and ins.summary_context([])["counts"]["healthy"] == 0
