"""`python -m runner`: the command line. Only argument parsing here; each command calls one stage."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runner.spec import PROFILES, SpecError, from_seed_name, load_spec, seed_spec_fields, seed_spec_yaml

EXIT_BAD_INPUT = 2


def _validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            spec = load_spec(path, args.profile)
        except SpecError as e:
            print(e, file=sys.stderr)
            failed += 1
            continue
        m = spec.model
        arch = m.blocks if m.family == "diffusers" else f"attention from level {m.attention_start}"
        print(
            f"{path}: ok  id={spec.id} family={m.family} channels={list(m.block_out_channels)} {arch} "
            f"norm={m.resnet_norm}/{m.attention_norm} init={m.init} noise={spec.noise.schedule} "
            f"bs={spec.train.batch_size} lr={spec.train.lr:g} epochs={spec.train.epochs} "
            f"size={spec.data.size} hash={spec.content_hash()}"
        )
    return EXIT_BAD_INPUT if failed else 0


def _seed_name(args: argparse.Namespace) -> int:
    # Printed as a spec file (no id, no profile), validated first: saved as <id>.yaml it loads as is.
    try:
        from_seed_name(args.name, args.profile)
        spec_id, fields = seed_spec_fields(args.name)
    except SpecError as e:
        print(e, file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"# Save as {spec_id}.yaml: the file name is the spec's id.")
    print(seed_spec_yaml(fields), end="")
    return 0


def _train(args: argparse.Namespace) -> int:
    from runner.train import train  # torch import is slow: only for commands that train

    try:
        spec = load_spec(args.spec, args.profile)
    except SpecError as e:
        print(e, file=sys.stderr)
        return EXIT_BAD_INPUT
    out = Path(args.out) if args.out else Path("results") / spec.id
    result = train(spec, out, device=args.device)
    print(f"{spec.id}: {result.status}; metrics in {out / 'metrics.json'}")
    return 0 if result.status == "completed" else 1


def _run(args: argparse.Namespace) -> int:
    from runner.execute import main as execute_main

    return execute_main(args)


def _site(args: argparse.Namespace) -> int:
    from runner.site import main as site_main

    return site_main(args)


def _publish(args: argparse.Namespace) -> int:
    from runner.publish import main as publish_main

    return publish_main(args)


def _encode(argv: list[str]) -> int:
    # encode's options come from runner.encode, which imports torch: they are parsed here, only for this
    # command, so that the others (validate, seed-name, site) never import torch.
    from runner.encode import add_encode_arguments, run_encode

    ap = argparse.ArgumentParser(prog="python -m runner encode",
                                 description="encode LSUN images into latents")
    add_encode_arguments(ap)
    return run_encode(ap.parse_args(argv))


def _fit_decoder(argv: list[str]) -> int:
    from runner.decode import add_fit_arguments, run_fit  # imports torch: only for this command

    ap = argparse.ArgumentParser(prog="python -m runner fit-decoder",
                                 description="fit the preview decoder (latent -> 64x64 RGB) on bundled pairs")
    add_fit_arguments(ap)
    return run_fit(ap.parse_args(argv))


def _samples(args: argparse.Namespace) -> int:
    from runner.decode import DecoderError
    from runner.sample import SampleError, render

    try:
        record = render(args.run, vae=args.vae)
    except (DecoderError, SampleError, SpecError, FileNotFoundError) as e:
        print(e, file=sys.stderr)
        return EXIT_BAD_INPUT
    grids = ", ".join(record["grids"].values())
    print(f"{args.run}: {grids} drawn with the {record['decoder']['name']} decoder")
    return 0


def _workers(text: str) -> int | str:
    if text == "auto" or (text.isdigit() and int(text) > 0):
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"expected a positive number of workers or 'auto', got {text!r}")


def _profile(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--profile", choices=sorted(PROFILES), default=default, help=f"scale profile (default {default})"
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runner", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate spec files; exit 2 if any is invalid")
    p.add_argument("files", nargs="+")
    _profile(p, "full")
    p.set_defaults(func=_validate)

    p = sub.add_parser("seed-name", help="print the spec file an original notebook name describes")
    p.add_argument("name")
    _profile(p, "full")
    p.set_defaults(func=_seed_name)

    p = sub.add_parser("train", help="train one spec in this process (no notebook)")
    p.add_argument("spec")
    p.add_argument("--out", help="output folder (default results/<id>)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    _profile(p, "quick")
    p.set_defaults(func=_train)

    p = sub.add_parser("run", help="run specs through the notebook into results/ (cached)")
    p.add_argument("specs", nargs="+", help="spec files or folders")
    p.add_argument("--results", default="results")
    p.add_argument("--force", action="store_true", help="rerun even when the cache is current")
    p.add_argument(
        "--device", help="cpu, cuda ... for every experiment (default: cuda where the run has one)"
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--workers",
        type=_workers,
        help="run on a local Dask cluster of N worker processes, one experiment each at a time; "
        "'auto': one 1-thread worker per CPU core, or one per GPU (default: in turn, in this process)",
    )
    where.add_argument(
        "--scheduler", metavar="ADDRESS", help="submit to a running Dask cluster, e.g. tcp://host:8786"
    )
    _profile(p, "quick")
    p.set_defaults(func=_run)

    p = sub.add_parser("site", help="render pages from results/ and build the site")
    p.add_argument("--results", default="results")
    p.add_argument("--no-build", action="store_true", help="render Markdown only, skip mkdocs build")
    p.add_argument(
        "--published", action="append", metavar="auto|none|FOLDER",
        help="published snapshots to show beside the local runs: 'auto' (default: every snapshot under "
        "published/), 'none', or a snapshot folder such as published/quick (repeatable)",
    )
    p.add_argument("--config", help="the project's mkdocs.yml (default: this project's); docs_dir and "
                   "site_dir are read from it, experiments/ is beside it")
    p.set_defaults(func=_site)

    p = sub.add_parser("publish", help="write a compact snapshot of results/ into published/NAME/")
    p.add_argument("--name", required=True, help="snapshot name (a folder name), e.g. the profile")
    p.add_argument("--results", default="results")
    p.add_argument("--out", default="published", help="folder of snapshots (default published/)")
    p.add_argument("--charts", choices=("auto", "copy", "none"), default="auto",
                   help="each run's charts: copied when the snapshot fits the size limit with them "
                   "(auto, the default), always, or never")
    p.add_argument("--max-mb", type=float, default=20.0, help="refuse a snapshot larger than this")
    p.add_argument("--max-rows", type=int, default=300,
                   help="statistics rows kept per run (evenly spaced, first and last included)")
    p.set_defaults(func=_publish)

    # Listed for --help only: main() hands `encode ...` and `fit-decoder ...` to their own parsers.
    sub.add_parser("encode", help="encode LSUN images into latents (needs the VAE; a GPU helps)")
    sub.add_parser("fit-decoder", help="fit the preview decoder (latent -> 64x64 RGB) on bundled pairs")

    p = sub.add_parser("samples", help="redraw a run's sample grids from its saved latents (no resampling)")
    p.add_argument("run", help="a run folder, e.g. results/diffusers_baseline")
    p.add_argument("--vae", help="folder of Stable Diffusion VAE weights (AutoencoderKL); default: preview")
    p.set_defaults(func=_samples)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Commands whose options come from torch-importing modules parse them themselves (see _encode).
    own_parsers = {"encode": _encode, "fit-decoder": _fit_decoder}
    if argv[:1] and argv[0] in own_parsers:
        return own_parsers[argv[0]](argv[1:])
    args = parser().parse_args(argv)
    return args.func(args)
