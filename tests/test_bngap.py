"""BatchNorm running-statistics gap: hand-computed distances, the hooks' lifetime, the health measure,
and both diagnostics (gap per epoch, statistics by timestep bucket) in a real tiny training run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from runner.bngap import RUNNING_GAP_LIMIT, LargestGap, gap_series, largest_running_gap, running_gap
from runner.spec import build_spec
from runner.stats import load_stats
from runner.train import BatchNormInputs, batch_statistics, train


def constructed_bn() -> nn.BatchNorm1d:
    """Two channels, eps ~0 (training refuses 0), running statistics chosen against the validation data.

    Validation batches (rows = samples, columns = channels):
      A = [[1, 0], [3, 4]]          per channel mean [2, 2],  unbiased var [2, 8]
      B = [[0, 1], [0, 1], [4, 1], [4, 1]]   mean [2, 1],  unbiased var [16/3, 0]
    Weighted by samples (2 and 4): validation mean [2, 4/3], var [(2*2 + 4*16/3)/6, (2*8)/6] = [38/9, 8/3].
    Running mean [2, 4/3 + 2*sqrt(8/3)]: channel 1 is 2 validation stds off, channel 0 exact
      -> mean gap sqrt((0 + 2^2) / 2) = sqrt(2).
    Running var [38/9 * e, 8/3]: log-ratios [1, 0] -> var gap sqrt((1 + 0) / 2) = 1/sqrt(2).
    """
    bn = nn.BatchNorm1d(2, eps=1e-12)
    bn.running_mean.copy_(torch.tensor([2.0, 4 / 3 + 2 * math.sqrt(8 / 3)]))
    bn.running_var.copy_(torch.tensor([38 / 9 * math.e, 8 / 3]))
    return bn.eval()


VALID_A = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
VALID_B = torch.tensor([[0.0, 1.0], [0.0, 1.0], [4.0, 1.0], [4.0, 1.0]])


def test_gap_on_a_constructed_batchnorm_equals_the_hand_computation():
    model = nn.Sequential(nn.Identity(), constructed_bn())
    with batch_statistics(model), BatchNormInputs(model) as inputs:
        model(VALID_A)
        model(VALID_B)
    gaps = inputs.gaps()
    assert list(gaps) == ["1"]
    assert gaps["1"]["mean"] == pytest.approx(math.sqrt(2), rel=1e-6)
    assert gaps["1"]["var"] == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    # Hooks gone, running statistics untouched by the batch-statistics pass.
    assert not model[1]._forward_pre_hooks
    assert model[1].running_var[1].item() == pytest.approx(8 / 3)


def test_gap_is_zero_when_running_statistics_match_and_scale_free():
    rng = np.random.default_rng(0)
    mean, var = rng.normal(size=5), rng.uniform(0.5, 2, size=5)
    assert running_gap(mean, var, mean, var, 1e-5) == {"mean": 0.0, "var": 0.0}
    one = running_gap(mean + 0.3, var * 2, mean, var, 0.0)
    scaled = running_gap((mean + 0.3) * 7, var * 2 * 49, mean * 7, var * 49, 0.0)
    assert one == pytest.approx(scaled)
    assert one["var"] == pytest.approx(math.log(2))


def test_hooks_removed_when_the_block_raises():
    model = nn.Sequential(nn.BatchNorm2d(3))
    with pytest.raises(RuntimeError, match="boom"), BatchNormInputs(model):
        assert model[0]._forward_pre_hooks
        raise RuntimeError("boom")
    assert not model[0]._forward_pre_hooks


def test_largest_gap_takes_the_last_epoch_with_a_finite_gap():
    epochs = [
        {"epoch": 1, "bn_running_gap": {"a": {"mean": 3.0, "var": 0.1}}},
        {"epoch": 2, "bn_running_gap": {"a": {"mean": 0.2, "var": 0.1}, "b": {"mean": 0.1, "var": 0.7}}},
        {"epoch": 3, "bn_running_gap": {"a": {"mean": None, "var": None}}},  # NaN, written as null
    ]
    got = largest_running_gap(epochs)
    assert got == LargestGap(0.7, "b", "var", 2) and got.mismatch and 0.7 > RUNNING_GAP_LIMIT
    healthy = [{"epoch": 1, "bn_running_gap": {"a": {"mean": 0.1, "var": 0.2}}}]
    assert not largest_running_gap(healthy).mismatch
    assert largest_running_gap([{"epoch": 1, "bn_running_gap": None}]) is None
    assert largest_running_gap([]) is None
    numbers, series = gap_series([*epochs, {"epoch": 4, "bn_running_gap": None}])
    assert numbers == [1, 2, 3] and list(series) == ["a", "b"]
    assert series["a"]["mean"][:2] == [3.0, 0.2] and math.isnan(series["a"]["mean"][2])
    assert math.isnan(series["b"]["var"][0]) and series["b"]["var"][1] == 0.7


def test_training_run_records_gaps_per_epoch_and_timestep_buckets(tmp_path, one_thread):
    # Two levels, 96 latents (86 train) -> 5 steps of 16 and one of 6 per epoch (the last batch is kept).
    spec = build_spec({
        "id": "bn", "data": {"size": 96},
        "model": {"block_out_channels": [32, 64], "blocks": "DA", "layers_per_block": 1,
                  "resnet_norm": "batch"},
        "train": {"batch_size": 16, "epochs": 2},
    }, "test")
    result = train(spec, tmp_path, device="cpu", progress=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert result.status == "completed"
    bn_layers = [n for n, m in result_model_layers(spec)]
    for entry in metrics["epochs"]:
        gap = entry["bn_running_gap"]
        assert sorted(gap) == sorted(bn_layers) and bn_layers
        assert all(v[k] >= 0 and math.isfinite(v[k]) for v in gap.values() for k in ("mean", "var"))
    assert any(v["mean"] > 0 for v in metrics["epochs"][0]["bn_running_gap"].values())
    stats = load_stats(tmp_path / "stats.npz")
    steps = metrics["steps_completed"]
    assert stats.buckets.count.shape == (steps, 4)
    assert stats.buckets.mean.shape == (steps, len(stats.names), 4)
    # Every sample of every step lands in one bucket.
    assert stats.buckets.count.sum(axis=1).tolist() == ([16] * 5 + [86 - 5 * 16]) * 2


def result_model_layers(spec) -> list[tuple[str, nn.Module]]:
    from runner.models import build

    return [(n, m) for n, m in build(spec).named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_group_norm_run_has_no_gap(tmp_path, one_thread):
    spec = build_spec({
        "id": "gn", "data": {"size": 96},
        "model": {"block_out_channels": [32, 64], "blocks": "DA", "layers_per_block": 1},
        "train": {"batch_size": 16, "epochs": 1},
    }, "test")
    assert train(spec, tmp_path, device="cpu", progress=False).metrics["epochs"][0]["bn_running_gap"] is None
