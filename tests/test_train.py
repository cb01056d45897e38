"""The training loop on tiny real inputs: repeatability, divergence, precision, BatchNorm validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from runner.results import read_metrics
from runner.spec import build_spec
from runner.statsfile import Stats, load_stats
from runner.train import (
    DivergenceGuard,
    PrecisionError,
    autocast_dtype,
    batch_statistics,
    train,
    train_loader,
)

# Two levels, 96 latents (86 train) -> 6 steps per epoch at batch 16 (5 full batches and one of 6 rows).
TINY_MODEL = {"block_out_channels": [32, 64], "blocks": "DA", "layers_per_block": 1}


def tiny(name: str, **sections) -> object:
    raw = {
        "id": name,
        "data": {"size": 96},
        "model": {**TINY_MODEL, **sections.pop("model", {})},
        "train": {"batch_size": 16, "epochs": 1, **sections.pop("train", {})},
        **sections,
    }
    return build_spec(raw, "test")


def test_two_cpu_runs_with_one_seed_give_identical_losses(tmp_path):
    spec = tiny("same", train={"epochs": 2})
    a = train(spec, tmp_path / "a", device="cpu", progress=False)
    b = train(spec, tmp_path / "b", device="cpu", progress=False)
    assert a.status == b.status == "completed"
    assert a.metrics["batches"]["loss"] == b.metrics["batches"]["loss"]
    assert len(a.metrics["batches"]["loss"]) == 12 == a.metrics["steps_total"]
    other = train(tiny("other", train={"epochs": 2, "seed": 1}), tmp_path / "c", device="cpu", progress=False)
    assert other.metrics["batches"]["loss"] != a.metrics["batches"]["loss"]


def test_run_folder_holds_metrics_stats_and_resolved_spec(tmp_path):
    spec = tiny("files", model={"resnet_norm": "batch"})
    result = train(spec, tmp_path, device="cpu", progress=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["spec_hash"] == spec.content_hash()
    assert (tmp_path / "spec.yaml").read_text() == spec.to_yaml()
    epoch = metrics["epochs"][-1]
    assert epoch["valid_loss"] > 0 and epoch["valid_loss_batch_stats"] > 0, (
        "BatchNorm model: both valid losses"
    )
    assert len(metrics["batches"]["lr"]) == len(metrics["batches"]["grad_norm"]) == metrics["steps_completed"]
    stats = load_stats(tmp_path / "stats.npz")
    # One recorded step per training batch; validation forwards are not recorded.
    assert stats.mean.shape[0] == metrics["steps_completed"] == 6
    assert stats.hist.shape[2] == 6 and len(stats.names) == stats.mean.shape[1] > 0
    assert result.metrics["final"]["valid_loss"] == epoch["valid_loss"]
    # The reporting side's strict contract reads exactly what training wrote (gaps of a BatchNorm run too).
    contract = read_metrics(tmp_path)
    assert contract.schedule_steps == metrics["schedule_steps"] == 6
    gaps = contract.epochs[-1].bn_running_gap
    assert gaps and set(gaps) == set(epoch["bn_running_gap"])


def test_group_norm_model_has_no_batch_stats_validation(tmp_path):
    result = train(tiny("gn"), tmp_path, device="cpu", progress=False)
    assert result.metrics["epochs"][0]["valid_loss_batch_stats"] is None


def test_huge_learning_rate_is_marked_diverged_and_keeps_its_stats(tmp_path):
    spec = tiny("boom", train={"lr": 1e4, "epochs": 4})
    result = train(spec, tmp_path, device="cpu", progress=False)
    m = result.metrics
    assert result.status == "diverged" and m["diverged_at_step"] is not None
    assert m["steps_completed"] == m["diverged_at_step"] + 1 < m["steps_total"]
    bad = m["batches"]["loss"][m["diverged_at_step"]]
    assert (
        bad is None
        or not math.isfinite(bad)
        or bad > spec.train.divergence_factor * min(m["batches"]["loss"][:1])
    )
    stats = load_stats(tmp_path / "stats.npz")
    assert stats.mean.shape[0] == m["steps_completed"]
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "diverged"


def test_guard_flags_non_finite_and_explosions_only():
    guard = DivergenceGuard(factor=10)
    assert guard.first_bad([1.0, 0.8, 0.9, 5.0], 0) is None
    assert guard.first_bad([0.7, 8.5], 4) == 5, "8.5 > 10 x the early minimum 0.7"
    assert DivergenceGuard(10).first_bad([1.0, math.nan], 0) == 1
    assert DivergenceGuard(10).first_bad([math.inf], 7) == 7


def test_precision_the_device_cannot_run_is_a_clear_error(tmp_path):
    for mode in ("fp16", "fp16_unscaled"):
        with pytest.raises(PrecisionError, match=f"{mode} .*CUDA"):
            autocast_dtype(mode, torch.device("cpu"))
    assert autocast_dtype("fp32", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    for mode in ("fp16", "fp16_unscaled"):
        with pytest.raises(PrecisionError):
            train(tiny(mode, train={"precision": mode}), tmp_path / mode, device="cpu", progress=False)
        assert not (tmp_path / mode / "metrics.json").exists(), "refused before any work"


class SpyScaler(torch.amp.GradScaler):
    """The real GradScaler, counting how many were created and how often one stepped."""

    created = 0
    steps = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        SpyScaler.created += 1

    def step(self, optimizer, *args, **kwargs):
        SpyScaler.steps += 1
        return super().step(optimizer, *args, **kwargs)


@pytest.mark.parametrize("mode, scalers", [("fp16_unscaled", 0), ("fp16", 1), ("fp32", 0)])
def test_only_scaled_fp16_creates_and_steps_a_gradient_scaler(tmp_path, monkeypatch, mode, scalers):
    # On CPU the fp16 modes are refused; here the device check is replaced by bfloat16 autocast (which a
    # CPU runs), so the whole loop runs with the fp16 modes' scaler decisions.
    monkeypatch.setattr("runner.train.autocast_dtype", lambda p, d: None if p == "fp32" else torch.bfloat16)
    monkeypatch.setattr(torch.amp, "GradScaler", SpyScaler)
    monkeypatch.setattr(SpyScaler, "created", 0)
    monkeypatch.setattr(SpyScaler, "steps", 0)
    result = train(tiny(mode, train={"precision": mode}), tmp_path, device="cpu", progress=False)
    assert result.status == "completed" and result.metrics["steps_completed"] == 6
    assert (SpyScaler.created, SpyScaler.steps) == (scalers, 6 * scalers)
    assert result.metrics["environment"]["precision"] == mode


def test_batch_statistics_leaves_running_statistics_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.BatchNorm2d(8))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 4, 8, 8) * 3 + 2
    with batch_statistics(model):
        out = model(x)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model[1].training
    # Normalised with this batch's own statistics: per-channel mean ~0, std ~1.
    np.testing.assert_allclose(out.mean((0, 2, 3)).detach().numpy(), 0, atol=1e-5)
    assert not torch.allclose(model(x), out)


def test_too_many_latents_is_refused_before_training(tmp_path):
    from runner.data import DataError

    # data_root=None skips the spec stage's own check, so the data stage's guard is what refuses it.
    spec = build_spec({"id": "big", "data": {"size": 100_000}}, "test", data_root=None)
    with pytest.raises(DataError, match="encode"):
        train(spec, tmp_path, device="cpu", progress=False)


def test_batched_divergence_check_trims_the_steps_after_the_bad_one(tmp_path, monkeypatch):
    """Checked every 4 steps (as on CUDA), the record equals a run checked at every step."""
    import runner.train

    spec = tiny("boom", train={"lr": 1e4, "epochs": 4})
    every_step = train(spec, tmp_path / "every", device="cpu", progress=False).metrics
    monkeypatch.setattr(runner.train, "CPU_CHECK_EVERY", 4)
    batched = train(spec, tmp_path / "batched", device="cpu", progress=False).metrics
    assert every_step["status"] == batched["status"] == "diverged"
    assert batched["diverged_at_step"] == every_step["diverged_at_step"]
    assert batched["steps_completed"] == batched["diverged_at_step"] + 1
    assert (batched["diverged_at_step"] + 1) % 4, "the oracle must diverge inside a batch of 4 checks"
    for key in ("loss", "lr", "grad_norm"):
        np.testing.assert_array_equal(batched["batches"][key], every_step["batches"][key], err_msg=key)
    a, b = load_stats(tmp_path / "every" / "stats.npz"), load_stats(tmp_path / "batched" / "stats.npz")
    assert b.mean.shape[0] == b.hist.shape[-1] == batched["steps_completed"]
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.hist, b.hist)


def test_non_finite_validation_loss_is_divergence_at_that_step(tmp_path, monkeypatch):
    import runner.train

    monkeypatch.setattr(runner.train, "evaluate", lambda *a, **k: math.nan)
    result = train(tiny("nanvalid", train={"epochs": 3}), tmp_path, device="cpu", progress=False)
    m = result.metrics
    assert result.status == m["status"] == "diverged"
    assert m["steps_completed"] == m["steps_per_epoch"] < m["steps_total"], "stopped after epoch 1"
    assert m["diverged_at_step"] == m["steps_per_epoch"] - 1
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"][0]["valid_loss"] is None


def test_last_partial_batch_is_kept_by_default_as_the_originals_did():
    rows = torch.arange(9000.0)
    keep = train_loader(rows, build_spec({"id": "k"}, "test").train)
    sizes = [len(b) for b in keep]
    assert len(keep) == len(sizes) == 282 and sizes[-1] == 9000 - 281 * 32 == 8
    assert sorted(torch.cat(list(keep)).tolist()) == rows.tolist(), "every row once per epoch"
    drop = train_loader(rows, build_spec({"id": "d", "train": {"last_batch": "drop"}}, "test").train)
    assert len(drop) == len(list(drop)) == 281


def test_last_batch_option_sets_the_steps_the_loop_runs(tmp_path):
    drop = train(tiny("drop", train={"last_batch": "drop"}), tmp_path, device="cpu", progress=False)
    assert drop.metrics["steps_per_epoch"] == drop.metrics["steps_completed"] == 5


def test_a_last_batch_of_one_item_with_batchnorm_is_refused(tmp_path):
    # 90 latents -> 81 train rows: five batches of 16 and one of a single item.
    spec = tiny("one", data={"size": 90}, model={"resnet_norm": "batch"})
    with pytest.raises(ValueError, match="last batch of one item.*last_batch: drop"):
        train(spec, tmp_path, device="cpu", progress=False)


def test_stopping_after_k_epochs_follows_the_full_schedule_exactly(tmp_path):
    full = train(tiny("full", train={"epochs": 2}), tmp_path / "full", device="cpu", progress=False)
    part_spec = tiny("part", train={"epochs": 2, "stop_after_epochs": 1})
    part = train(part_spec, tmp_path / "part", device="cpu", progress=False)
    steps = part.metrics["steps_per_epoch"]
    assert part.status == "completed"
    assert part.metrics["steps_completed"] == part.metrics["steps_total"] == steps == 6
    assert part.metrics["schedule_steps"] == full.metrics["schedule_steps"] == 2 * steps
    assert part.metrics["batches"]["lr"] == full.metrics["batches"]["lr"][:steps]
    assert part.metrics["batches"]["loss"] == full.metrics["batches"]["loss"][:steps]
    # Not a one-epoch schedule: OneCycle over 1 epoch would already be past its peak by now.
    short = train(tiny("short", train={"epochs": 1}), tmp_path / "short", device="cpu", progress=False)
    assert part.metrics["batches"]["lr"] != short.metrics["batches"]["lr"]
    assert len(part.metrics["epochs"]) == 1


def _step_stats_and_losses(tmp_path, name: str, compile_mode: str) -> tuple[Stats, list[float]]:
    result = train(tiny(name, train={"compile": compile_mode}), tmp_path / name, device="cpu", progress=False)
    assert result.status == "completed"
    return load_stats(tmp_path / name / "stats.npz"), result.metrics["batches"]["loss"]


def test_compiled_training_step_keeps_the_statistics_of_eager(tmp_path, monkeypatch, one_thread):
    """train.compile traces the training forward with the statistics hooks left eager (graph breaks
    around each watched module): the same statistics as eager, and no recompile per step (the hooks'
    step counters would otherwise become guards). The "eager" backend runs the very graphs dynamo
    hands to inductor, without the minutes of kernel generation (inductor's own numerics and CUDA
    graphs are checked on a GPU below)."""
    import runner.train as train_module

    monkeypatch.setattr(train_module, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, eager_losses = _step_stats_and_losses(tmp_path, "eager", "none")
    compiled, losses = _step_stats_and_losses(tmp_path, "compiled", "default")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 0 < graphs <= 2 * (len(compiled.names) + 2), f"{graphs} graphs: recompiled per step"
    assert compiled.names == eager.names and compiled.mean.shape == eager.mean.shape == (6, 8)
    # Step 0 sees the same weights and batch: identical statistics. Later steps follow weights
    # updated by a traced backward, equal up to float rounding.
    for key in ("mean", "std"):
        assert np.array_equal(getattr(compiled, key)[0], getattr(eager, key)[0])
        np.testing.assert_allclose(getattr(compiled, key), getattr(eager, key), rtol=1e-4, atol=1e-6)
    assert np.array_equal(compiled.hist[..., 0], eager.hist[..., 0])
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_step_keeps_the_statistics_of_eager(tmp_path):
    def run(name: str, mode: str):
        spec = tiny(name, train={"compile": mode})
        result = train(spec, tmp_path / name, device="cuda", progress=False)
        assert result.status == "completed"
        return load_stats(tmp_path / name / "stats.npz")

    eager, graphed = run("eager", "none"), run("graphed", "reduce-overhead")
    # Fused kernels round differently from eager ones: equal to float rounding, histograms to a
    # handful of values sitting on a bin edge.
    np.testing.assert_allclose(graphed.mean, eager.mean, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(graphed.std, eager.std, rtol=1e-3, atol=1e-5)
    moved = np.abs(graphed.hist.astype(np.int64) - eager.hist).sum()
    assert moved <= 1e-3 * eager.hist.sum()
