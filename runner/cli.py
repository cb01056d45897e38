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


def _encode(args: argparse.Namespace) -> int:
    from runner.encode import run_encode

    return run_encode(args)


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
