"""Aggregate optimiser steps per second of one suite at several Dask layouts, as ratios to the first.

The same specs (copies of one spec with different seeds) run through the real path (local
cluster, template notebook, run folders returned and installed) once per layout:

- on a GPU machine: N = 1, 2, 4, 8 workers sharing the visible GPUs (`--layouts` to change);
- on a CPU: 1 worker x all cores' threads against one 1-thread worker per core.

Throughput is the optimiser steps the suite completed over the wall time from the first submit
to the last installed run (the cluster's start-up is not counted; each experiment's own notebook
start, data loading and validation are, as in a real suite). Also printed: the mean training
step time inside the runs (metrics.json `timings.step_s`).

    python benchmarks/suite_throughput.py                       # CPU: 4 smoke copies
    python benchmarks/suite_throughput.py --profile full --copies 16 --spec experiments/...yaml
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner import cluster, execute  # noqa: E402
from runner.files import read_json  # noqa: E402
from runner.spec import load_spec  # noqa: E402

DEFAULT_SPEC = ROOT / "experiments" / "architecture" / "diffusers_baseline.yaml"


def copies(spec_path: Path, profile: str, n: int, folder: Path) -> list:
    """n copies of a spec, differing only in seed (so no run is a cache hit of another)."""
    base = load_spec(spec_path, profile)
    out = []
    for k in range(n):
        raw = base.model_dump(mode="json")
        raw.update(id=f"bench_{k}", train={**raw["train"], "seed": k})
        out.append(type(base).model_validate(raw))
    return out


def measure(specs: list, workers: int, folder: Path) -> dict:
    results = folder / f"results-{workers}"
    timing: dict[str, float] = {}

    def dispatch(pending, res, device, done):
        with cluster.open_client(workers, None, len(pending)) as client:
            tic = time.perf_counter()
            cluster.run_on_cluster(pending, res, device, client, done)
            timing["wall"] = time.perf_counter() - tic

    outcomes = execute.run_suite(specs, results, force=True, dispatch=dispatch)
    metrics = [read_json(results / o.id / "metrics.json") for o in outcomes]
    steps = sum(m["steps_completed"] for m in metrics)
    step_s = [m["timings"]["step_s"] for m in metrics if m["timings"]["step_s"]]
    return {
        "workers": workers,
        "threads": cluster.plan_workers(workers, cluster.cpu_cores(), cluster.visible_gpus())[0].threads,
        "failed": sum(o.status != "completed" for o in outcomes),
        "wall": timing["wall"],
        "steps": steps,
        "rate": steps / timing["wall"],
        "step_s": sum(step_s) / len(step_s) if step_s else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=DEFAULT_SPEC)
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--copies", type=int, help="experiments per layout (default 4 on a CPU, 16 on a GPU)")
    ap.add_argument("--layouts", type=int, nargs="+", help="worker counts (default 1 2 4 8 / 1 and cores)")
    args = ap.parse_args()
    cores, gpus = cluster.cpu_cores(), cluster.visible_gpus()
    layouts = args.layouts or ([1, 2, 4, 8] if gpus else [1, cores])
    n = args.copies or (16 if gpus else 4)
    where = f"{len(gpus)} GPU(s), {cores} cores" if gpus else f"CPU only, {cores} cores"
    print(f"{n} x {args.spec.name} ({args.profile} profile) per layout; {where}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="suite-throughput-") as tmp:
        specs = copies(args.spec, args.profile, n, Path(tmp))
        for workers in layouts:
            rows.append(measure(specs, workers, Path(tmp)))
    base = rows[0]["rate"]
    print(f"\n{'layout':>22} {'wall s':>8} {'steps':>6} {'steps/s':>8} {'ratio':>6} {'step s (in run)':>16}")
    for r in rows:
        layout = f"{r['workers']} worker(s) x {r['threads']} thr"
        bad = f"  ({r['failed']} not completed)" if r["failed"] else ""
        print(
            f"{layout:>22} {r['wall']:8.1f} {r['steps']:6d} {r['rate']:8.3f} {r['rate'] / base:6.2f}"
            f" {r['step_s']:16.4f}{bad}"
        )


if __name__ == "__main__":
    main()
