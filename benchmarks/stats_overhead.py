"""Cost of recording activation statistics during a CPU training step.

Four conditions on the default model (diffusers UNet2DModel (32, 64, 64, 128), DAAA, batch 32,
real latents x 0.2, cosine noise, AdamW, forward + backward + step), alternated round by round so
that drifting machine load hits them alike:

- none:    no hooks
- ours:    ``runner.stats.ActivationStats`` (default modules: the resnets), without timesteps
- buckets: the same, handed each batch's t (``set_timesteps``) as training does: also the
           statistics by timestep bucket (``TIMESTEP_BUCKETS`` buckets)
- naive:   a miniai-style hook that moves every activation to the host with ``.cpu()``, takes
           ``histc`` there and appends ``.item()`` means/stds to lists, every batch

Then, on one batch's captured activations, the statistics alone are timed per step: our
bincount histogram against ``torch.histc`` inside the same recorder, with and without the
timestep buckets, and the naive hook's work. The target: buckets/none at most 1.05.

    .venv/bin/python benchmarks/stats_overhead.py [--rounds 5 --steps 4 --warmup 2]

Measured 2026-12-01 on a 2-core CPU machine shared with other work, --threads 1 --rounds 6 --steps 2
--conditions ours,buckets, three runs: buckets/none 0.997, 1.035, 1.032 (median step), 1.032,
1.076, 1.042 (fastest step); single rounds ranged 0.79-1.44 (load noise). The statistics alone with
buckets took 72-95 ms per step, 1.7-2.0 % of the fastest no-stats step (without buckets 1.4-1.5 %).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.stats import (  # noqa: E402
    HIST_BINS,
    HIST_RANGE,
    TIMESTEP_BUCKETS,
    ActivationStats,
    _DeviceBuffers,
)

LATENTS = Path(__file__).resolve().parents[1] / "data/lsun_bedroom_10k/latents_nonorm_f16.npy"
BATCH = 32


def build_model() -> nn.Module:
    """runner.models.build on a default spec, or the same UNet2DModel directly if models.py is absent."""
    try:
        from runner.models import build
        from runner.spec import build_spec
    except ImportError:
        from diffusers import UNet2DModel

        class Denoiser(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.unet = UNet2DModel(
                    sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64, 128),
                    down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * 3,
                    up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",),
                )

            def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return self.unet(x, t).sample

        return Denoiser()
    return build(build_spec({"id": "bench"}, "bench"))


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`n` fixed (x_t, t, noise) batches: real latents x 0.2 under cosine noise."""
    g = torch.Generator().manual_seed(seed)
    lat = np.load(LATENTS, mmap_mode="r")
    out = []
    for i in range(n):
        x0 = torch.from_numpy(np.asarray(lat[i * BATCH:(i + 1) * BATCH], dtype=np.float32)) * 0.2
        t = torch.rand(BATCH, generator=g).clamp(max=0.999)
        noise = torch.randn(x0.shape, generator=g)
        ab = (t * math.pi / 2).cos().pow(2).view(-1, 1, 1, 1)
        out.append((ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t, noise))
    return out


class NaiveStats:
    """miniai's ``append_stats`` as first written: host copy, histc and .item() per module per batch."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.modules = [m for n, m in model.named_modules() if n in set(names)]
        self.stats: list[tuple[list, list, list]] = [([], [], []) for _ in self.modules]
        self.handles: list = []

    def __enter__(self) -> NaiveStats:
        for mod, st in zip(self.modules, self.stats, strict=True):
            self.handles.append(mod.register_forward_hook(self._hook(st)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    @staticmethod
    def _hook(st: tuple[list[float], list[float], list[torch.Tensor]]) -> Callable:
        def hook(mod: nn.Module, inp: object, out: torch.Tensor) -> None:
            acts = out.detach().cpu().float()
            st[0].append(acts.mean().item())
            st[1].append(acts.std().item())
            st[2].append(acts.abs().histc(HIST_BINS, *HIST_RANGE))

        return hook


def train_steps(
    model: nn.Module, opt: torch.optim.Optimizer, data: list, k: int, offset: int, recorder: object = None
) -> list[float]:
    """Time `k` steps; the "buckets" recorder gets each batch's t first, as runner.train hands it over."""
    times = []
    for i in range(k):
        xt, t, noise = data[(offset + i) % len(data)]
        tic = time.perf_counter()
        if isinstance(recorder, WithTimesteps):
            recorder.set_timesteps(t)  # cosine t in [0, 0.999]: already normalised
        loss = F.mse_loss(model(xt, t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - tic)
    return times


class WithTimesteps(ActivationStats):
    """The "buckets" condition: the recorder that train_steps hands each batch's t."""


def condition(name: str, model: nn.Module, names: list[str]) -> contextlib.AbstractContextManager:
    if name == "ours":
        return ActivationStats(model)  # never handed a t: no bucket work
    if name == "buckets":
        return WithTimesteps(model)
    if name == "naive":
        return NaiveStats(model, names)
    return contextlib.nullcontext()


def stats_only(
    model: nn.Module, names: list[str], xt: torch.Tensor, t: torch.Tensor, reps: int
) -> dict[str, float]:
    """Seconds per step (fastest of `reps`) of the statistics alone, on one forward's captured activations."""
    acts: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    hs = [mods[n].register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o.detach())) for n in names]
    with torch.no_grad():
        model(xt, t)
    for h in hs:
        h.remove()
    outs = [acts[n] for n in names]

    def ours(use_bincount: bool, buckets: bool) -> Callable[[], None]:
        buf = _DeviceBuffers(1, len(outs), torch.device("cpu"), np.linspace(0, 1, TIMESTEP_BUCKETS + 1))
        buf.use_bincount = use_bincount

        def step() -> None:
            if buckets:
                buf.begin_buckets(t)
            for j, o in enumerate(outs):
                buf.record(o, 0, j)
            buf.end_buckets(0)

        return step

    def naive() -> None:
        for o in outs:
            acts = o.cpu().float()
            acts.mean().item(), acts.std().item(), acts.abs().histc(HIST_BINS, *HIST_RANGE)

    fns = {"ours (bincount)": ours(True, False), "ours + buckets": ours(True, True),
           "ours (histc)": ours(False, False), "naive": naive}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            tic = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - tic)
    return {k: min(v) for k, v in times.items()}


def alternate(rounds: int, conds: list[str]) -> Iterator[tuple[int, str]]:
    """Round-robin order, rotated each round so no condition always runs first."""
    for r in range(rounds):
        for i in range(len(conds)):
            yield r, conds[(i + r) % len(conds)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per condition per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per condition first")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--conditions", default="none,ours,buckets,naive",
                    help="comma-separated subset of none,ours,buckets,naive (none is always timed)")
    args = ap.parse_args()
    conds = ["none"] + [c for c in args.conditions.split(",") if c and c != "none"]
    unknown = set(conds) - {"none", "ours", "buckets", "naive"}
    if unknown:
        ap.error(f"--conditions: unknown {sorted(unknown)}; expected none, ours, buckets, naive")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-5)
    data = batches(4)
    names = ActivationStats(model).names
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, "
          f"{len(names)} modules watched", flush=True)

    for c in conds:
        with condition(c, model, names) as rec:
            train_steps(model, opt, data, args.warmup, 0, rec)
    times: dict[str, list[float]] = {c: [] for c in conds}
    per_round: dict[str, list[float]] = {c: [] for c in conds}  # median step of each round
    step = 0
    for r, c in alternate(args.rounds, conds):
        with condition(c, model, names) as rec:
            got = train_steps(model, opt, data, args.steps, step, rec)
        times[c] += got
        per_round[c].append(statistics.median(got))
        step += args.steps
        print(f"round {r + 1} {c:7s} " + " ".join(f"{s:.3f}" for s in got), flush=True)

    med = {c: statistics.median(v) for c, v in times.items()}
    best = {c: min(v) for c, v in times.items()}  # least disturbed by other load on the machine
    print("\nmedian training step (s): " + ", ".join(f"{c} {med[c]:.3f}" for c in conds))
    print("fastest training step (s): " + ", ".join(f"{c} {best[c]:.3f}" for c in conds))
    for c in conds[1:]:
        rounds = [a / b for a, b in zip(per_round[c], per_round["none"], strict=True)]
        print(f"ratio {c}/none: {med[c] / med['none']:.3f} (median), {best[c] / best['none']:.3f} (fastest); "
              f"per round {min(rounds):.3f}..{max(rounds):.3f}")

    only = stats_only(model, names, *data[0][:2], reps=9)
    print("\nstatistics alone per step (ms, fastest of 9; share of the fastest no-stats step):")
    for k, s in only.items():
        print(f"  {k:16s} {s * 1e3:7.1f}  {s / best['none']:.1%}")


if __name__ == "__main__":
    main()
