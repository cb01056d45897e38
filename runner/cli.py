"""`python -m runner`: the command line. Only argument parsing here; each command calls one stage."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runner.spec import PROFILES, SpecError, from_seed_name, load_spec

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
    try:
        spec = from_seed_name(args.name, args.profile)
    except SpecError as e:
        print(e, file=sys.stderr)
        return EXIT_BAD_INPUT
    print(spec.to_yaml(), end="")
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


def _encode(args: argparse.Namespace) -> int:
    from runner.encode import run_encode

    return run_encode(args)


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

    p = sub.add_parser("seed-name", help="print the spec an original notebook name describes")
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
    p.set_defaults(func=_site)

    p = sub.add_parser("encode", help="encode LSUN images into latents (needs the VAE; a GPU helps)")
    try:
        from runner.encode import add_encode_arguments

        add_encode_arguments(p)
    except ImportError:  # encode's optional pieces are imported lazily; the parser must still build
        pass
    p.set_defaults(func=_encode)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)
