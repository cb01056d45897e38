"""runner.stats: recorded values against a direct computation, step bookkeeping, hooks, filters, files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from runner import stats as stats_mod
from runner.models import build, is_attention_block, is_residual_block
from runner.spec import build_spec
from runner.stats import HIST_BINS, HIST_RANGE, ActivationStats, dead_share, load_stats, save_stats

LATENTS = Path(__file__).resolve().parents[1] / "data/lsun_bedroom_10k/latents_nonorm_f16.npy"


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    # default init (not zero conv2) so resnet outputs differ from their inputs; 1 layer per block: fast
    spec = build_spec({"id": "t", "model": {"init": "default", "layers_per_block": 1}}, "test")
    return build(spec)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    x0 = torch.from_numpy(np.load(LATENTS, mmap_mode="r")[:4].astype(np.float32)) * 0.2
    g = torch.Generator().manual_seed(0)
    return x0 + torch.randn(x0.shape, generator=g), torch.rand(4, generator=g)


def capture(model: nn.Module, names: list[str], *args: torch.Tensor) -> dict[str, torch.Tensor]:
    """Module outputs of one forward, caught with hooks of our own."""
    out: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    def keep(name: str):
        return lambda m, i, o: out.__setitem__(name, o.detach().clone())

    hs = [mods[n].register_forward_hook(keep(n)) for n in names]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hs:
            h.remove()
    return out


def histc(x: torch.Tensor) -> np.ndarray:
    """miniai's histogram, computed directly."""
    return torch.histc(x.float().abs(), HIST_BINS, *HIST_RANGE).numpy()


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_recorded_stats_equal_direct_computation(model, batch):
    with ActivationStats(model) as st, torch.no_grad():
        model(*batch)
    direct = capture(model, st.names, *batch)
    d = st.to_numpy()
    assert d["mean"].shape == d["std"].shape == (1, len(st.names))
    assert d["hist"].shape == (len(st.names), HIST_BINS, 1) and d["mean"].dtype == np.float32
    for j, name in enumerate(st.names):
        x = direct[name].float()
        assert d["mean"][0, j] == pytest.approx(x.mean().item(), abs=1e-5)
        assert d["std"][0, j] == pytest.approx(x.std().item(), abs=1e-5)
        np.testing.assert_array_equal(d["hist"][j, :, 0], histc(x))
    assert d["hist"].sum() > 0


@pytest.mark.parametrize("bincount", [True, False], ids=["bincount", "histc"])
def test_histogram_edges_match_histc(bincount, monkeypatch):
    monkeypatch.setattr(stats_mod, "_prefer_bincount", lambda device: bincount)  # False: the CUDA code path
    # 0.25-wide bins closed on the left, the last one closed at 10; above 10, NaN and inf are dropped.
    x = torch.tensor([0.0, -0.0, 0.2499, 0.25, -0.25, 9.75, 9.99, 10.0, -10.0, 10.001, 10.2, 10.25, 11.0,
                      float("inf"), float("-inf"), float("nan"), 3.3, -7.126])
    x = torch.cat([x, torch.linspace(-12, 12, 9601)])  # every edge, exactly
    net = nn.Sequential(nn.Identity())
    with ActivationStats(net, modules=["0"]) as st:
        net(x)
    hist = st.to_numpy()["hist"][0, :, 0]
    np.testing.assert_array_equal(hist, histc(x))
    assert hist[HIST_BINS - 1] > 0 and hist[0] > 0


def test_steps_follow_root_forwards_and_recording(model, batch):
    x, t = batch
    with ActivationStats(model) as st, torch.no_grad():
        model(x[:1], t[:1])
        st.recording = False
        model(x[:1], t[:1])  # validation: not recorded
        st.recording = True
        model(x[:1], t[:1])
        resnet = model.unet.down_blocks[0].resnets[0]
        resnet(torch.randn(1, 32, 32, 32), torch.randn(1, 128))  # a submodule alone: not a root forward
    assert st.steps == 2
    d = st.to_numpy()
    assert d["mean"].shape[0] == d["hist"].shape[2] == 2
    np.testing.assert_array_equal(d["mean"][0], d["mean"][1])  # the submodule call wrote nothing


def test_chunks_give_the_same_arrays(model, batch):
    x, t = batch
    results = []
    for chunk in (2, 256):
        with ActivationStats(model, chunk_size=chunk) as st, torch.no_grad():
            for i in range(5):  # chunk 2: two full chunks and a partial one
                model(x[i % 4:i % 4 + 1], t[i % 4:i % 4 + 1])
        results.append(st.to_numpy())
    small, one = results
    assert small["mean"].shape[0] == 5
    for k in ("mean", "std", "hist"):
        np.testing.assert_array_equal(small[k], one[k])


def test_hooks_removed_on_exit_and_on_exception(model, batch):
    with ActivationStats(model) as st:
        assert model._forward_hooks and model._forward_pre_hooks
        assert st.attached
    assert no_hooks(model) and not st.attached
    with pytest.raises(RuntimeError, match="boom"), ActivationStats(model):
        raise RuntimeError("boom")
    assert no_hooks(model)
    with pytest.raises(RuntimeError), ActivationStats(model):
        model(torch.randn(1, 3, 32, 32), torch.rand(1))  # wrong channels: fails inside the forward
    assert no_hooks(model)


def test_module_filters(model):
    mods = dict(model.named_modules())
    res = ActivationStats(model).names
    att = ActivationStats(model, modules="attention").names
    both = ActivationStats(model, modules="resnets+attention").names
    assert res and att and not set(res) & set(att)
    assert all(is_residual_block(n, mods[n]) for n in res)
    assert all(is_attention_block(n, mods[n]) for n in att)
    order = [n for n in mods if n in set(res) | set(att)]
    assert both == order  # network order, not filter order
    pick = [res[2], att[0]]
    assert ActivationStats(model, modules=pick).names == [n for n in order if n in pick]
    assert ActivationStats(model, modules=lambda n, m: n == res[0]).names == [res[0]]
    with pytest.raises(ValueError, match=r"down_blocks\.0\.resnets\.0"):
        ActivationStats(model, modules=["unet.down_blocks.0.resnet.0"])
    with pytest.raises(ValueError, match="unknown kind"):
        ActivationStats(model, modules="resnet")


def test_save_load_round_trip(model, batch, tmp_path):
    with ActivationStats(model, modules="resnets+attention") as st, torch.no_grad():
        model(*batch)
        model(*batch)
    path = st.save(tmp_path / "stats.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["stats.npz"]  # no temp file left behind
    got, want = load_stats(path), st.to_numpy()
    assert list(got.names) == want["names"] and all(isinstance(n, str) for n in got.names)
    np.testing.assert_array_equal(got.steps, np.arange(len(want["mean"])))  # one row per optimiser step
    for k in ("mean", "std", "hist"):
        np.testing.assert_array_equal(getattr(got, k), want[k])
        assert getattr(got, k).dtype == want[k].dtype


def test_empty_stats_save(model, tmp_path):
    st = ActivationStats(model)
    d = load_stats(st.save(tmp_path / "s.npz"))
    assert d.mean.shape == (0, len(st.names)) and d.hist.shape == (len(st.names), HIST_BINS, 0)


def test_dead_share_is_bin_zero_over_total():
    hist = np.zeros((2, HIST_BINS, 3))
    hist[0, 0, :] = [1, 3, 0]
    hist[0, 5, :] = [3, 1, 0]
    hist[1, 39, :] = 2
    share = dead_share(hist)
    assert share.shape == (2, 3)
    np.testing.assert_allclose(share[0, :2], [0.25, 0.75])
    assert np.isnan(share[0, 2]) and (share[1] == 0).all()


def test_bf16_autocast_keeps_float32_stats(model, batch):
    with ActivationStats(model) as st, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(*batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct = capture(model, st.names, *batch)
    assert direct[st.names[0]].dtype == torch.bfloat16  # the outputs really are bf16
    d = st.to_numpy()
    assert d["mean"].dtype == d["std"].dtype == np.float32
    for j, name in enumerate(st.names):
        x = direct[name].float()
        assert d["mean"][0, j] == pytest.approx(x.mean().item(), abs=1e-5)
        assert d["std"][0, j] == pytest.approx(x.std().item(), abs=1e-5)
        np.testing.assert_array_equal(d["hist"][j, :, 0], histc(x))


def test_tuple_output_uses_first_element():
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * 2, x

    net = nn.Sequential(Pair())
    x = torch.arange(8.0)
    with ActivationStats(net, modules=["0"]) as st:
        net(x)
    assert st.to_numpy()["mean"][0, 0] == pytest.approx(7.0)


# ---------------------------------------------------------------- statistics by timestep bucket

# Samples in buckets [0, .25): 2, [.25, .5): 3, [.5, .75): none, [.75, 1]: 3 (edges and t = 1 included).
BUCKET_T = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.49, 0.75, 0.99, 1.0])


@pytest.fixture(scope="module")
def batch8() -> tuple[torch.Tensor, torch.Tensor]:
    x0 = torch.from_numpy(np.load(LATENTS, mmap_mode="r")[:8].astype(np.float32)) * 0.2
    return x0 + torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)), BUCKET_T


def by_bucket_numpy(acts: np.ndarray, t: np.ndarray, edges: np.ndarray) -> dict[str, np.ndarray]:
    """Independent oracle: cut the batch into buckets of t and reduce each bucket's elements in float64."""
    k = len(edges) - 1
    out = {key: np.full(k, np.nan) for key in ("mean", "std", "dead")}
    out["count"] = np.zeros(k, np.int64)
    for i in range(k):
        upper = t <= edges[i + 1] if i == k - 1 else t < edges[i + 1]
        sel = acts[(t >= edges[i]) & upper].astype(np.float64)
        out["count"][i] = len(sel)
        if len(sel):
            out["mean"][i], out["std"][i] = sel.mean(), sel.std(ddof=1)
            a = np.abs(sel)
            out["dead"][i] = (a < 0.25).sum() / (a <= 10).sum()
    return out


@pytest.mark.parametrize("bincount", [True, False], ids=["bincount", "histc"])
def test_buckets_equal_an_independent_per_sample_computation(
    model, batch8, bincount, monkeypatch, one_thread
):
    monkeypatch.setattr(stats_mod, "_prefer_bincount", lambda device: bincount)  # False: the CUDA code path
    x, t = batch8
    with ActivationStats(model, modules="resnets+attention") as st, torch.no_grad():
        st.set_timesteps(t)
        model(x, t)
    direct = capture(model, st.names, x, t)
    d = st.to_numpy()
    k = 4
    np.testing.assert_array_equal(d["bucket_edges"], [0.0, 0.25, 0.5, 0.75, 1.0])
    assert d["bucket_edges"].dtype == np.float64
    assert d["bucket_mean"].shape == d["bucket_std"].shape == d["bucket_dead"].shape == (1, len(st.names), k)
    assert d["bucket_mean"].dtype == np.float32 and d["bucket_count"].shape == (1, k)
    np.testing.assert_array_equal(d["bucket_count"][0], [2, 3, 0, 3])
    dead_seen = []
    for j, name in enumerate(st.names):
        want = by_bucket_numpy(direct[name].numpy(), t.numpy(), d["bucket_edges"])
        np.testing.assert_array_equal(d["bucket_count"][0], want["count"])
        for key in ("mean", "std", "dead"):
            got = d[f"bucket_{key}"][0, j]
            np.testing.assert_allclose(got, want[key], rtol=1e-4, atol=1e-5, err_msg=name)
        dead_seen.append(want["dead"][0])
    assert np.isnan(d["bucket_mean"][0, :, 2]).all()  # the empty bucket
    assert np.nanmax(dead_seen) > 0  # the dead share really was exercised
    # The buckets differ from each other (noise level matters), and the plain arrays are unchanged.
    assert not np.allclose(d["bucket_std"][0, :, 0], d["bucket_std"][0, :, 3])
    for j, name in enumerate(st.names):
        assert d["mean"][0, j] == pytest.approx(direct[name].mean().item(), abs=1e-5)


def test_timesteps_apply_to_one_recorded_forward_only(model, batch8, one_thread):
    x, t = batch8
    with ActivationStats(model, chunk_size=2) as st, torch.no_grad():
        st.set_timesteps(t)
        model(x, t)
        model(x, t)  # no set_timesteps: this step has no buckets
        st.recording = False
        st.set_timesteps(t)
        model(x, t)  # validation uses up the timesteps
        st.recording = True
        model(x, t)
        st.set_timesteps(t[:3])
        model(x[:3], t[:3])  # third step, in the second chunk
    d = st.to_numpy()
    assert d["bucket_count"].tolist() == [[2, 3, 0, 3], [0, 0, 0, 0], [0, 0, 0, 0], [2, 1, 0, 0]]
    assert np.isnan(d["bucket_mean"][1:3]).all() and not np.isnan(d["bucket_mean"][0, :, 0]).any()


def test_buckets_survive_chunks_and_files(model, batch8, tmp_path, one_thread):
    x, t = batch8
    results = []
    for chunk in (2, 256):
        with ActivationStats(model, chunk_size=chunk) as st, torch.no_grad():
            for i in range(5):
                st.set_timesteps(t.roll(i))
                model(x, t.roll(i))
        results.append(st.to_numpy())
    small, one = results
    for key in ("bucket_mean", "bucket_std", "bucket_dead", "bucket_count"):
        np.testing.assert_array_equal(small[key], one[key])
    assert small["bucket_count"].sum() == 5 * 8
    got = load_stats(save_stats(one, tmp_path / "stats.npz"))
    for key in ("bucket_edges", "bucket_mean", "bucket_std", "bucket_dead", "bucket_count"):
        saved = getattr(got.buckets, key.removeprefix("bucket_"))
        np.testing.assert_array_equal(saved, one[key])
        assert saved.dtype == one[key].dtype
    partial = {k: v for k, v in one.items() if k != "bucket_dead"}
    with pytest.raises(ValueError, match="all or none"):
        save_stats(partial, tmp_path / "bad.npz")


def test_without_timesteps_no_bucket_arrays(model, batch8, tmp_path):
    x, t = batch8
    with ActivationStats(model) as st, torch.no_grad():
        model(x, t)
    assert not set(st.to_numpy()) & {"bucket_mean", "bucket_edges"}
    assert load_stats(st.save(tmp_path / "s.npz")).buckets is None


def test_set_timesteps_rejects_unnormalised_or_misshapen_t(model):
    st = ActivationStats(model)
    with pytest.raises(ValueError, match=r"normalised to \[0, 1\].*999"):
        st.set_timesteps(torch.tensor([0.5, 999.0]))
    with pytest.raises(ValueError, match="1-D float"):
        st.set_timesteps(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="1-D float"):
        st.set_timesteps(torch.rand(2, 2))
