"""The `transxssm` subcommands of the Hugging Face side: convert, generate, eval, niah.

    from transxssm_megatron.hf.cli import add_subcommands
    add_subcommands(sub)        # in transxssm_megatron.cli.build_parser, after the other sub.add_parser calls

Same conventions as transxssm_megatron/cli.py: each command sets `fn`, returns an exit code, and an error that
names its own cause (ConversionError, EvalError, NiahError, a checkpoint or config error) is printed as one line
`error: ...` on stderr with exit code 2 (`--debug` or TRANSXSSM_DEBUG=1 add the traceback). Heavy imports
(torch, transformers, lm-eval, megatron) happen inside the commands, so `transxssm --help` stays fast.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback

from transxssm_megatron.hf.evaluate import PAPER_TASKS


def _user_errors() -> tuple[type, ...]:
    from transxssm_megatron.config import ConfigError
    from transxssm_megatron.hf.evaluate import EvalError
    from transxssm_megatron.hf.names import ConversionError
    from transxssm_megatron.hf.niah import NiahError
    from transxssm_megatron.hf.offline_tasks import OfflineTaskError

    errors = [ConversionError, EvalError, NiahError, OfflineTaskError, ConfigError]
    if "transxssm_megatron.training.checkpoint_integrity" in sys.modules:
        errors.append(sys.modules["transxssm_megatron.training.checkpoint_integrity"].CheckpointError)
    return tuple(errors)


def _one_line_errors(fn):
    """Print our own errors as `error: ...` (exit 2) like the main CLI; anything else propagates."""
    @functools.wraps(fn)
    def call(args) -> int:
        logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
        for name in ("transxssm_megatron", "transformers_modules"):  # our progress lines, the SSD path line
            logging.getLogger(name).setLevel(logging.INFO)
        try:
            return fn(args)
        except _user_errors() as err:
            if getattr(args, "debug", False) or os.environ.get("TRANSXSSM_DEBUG", "") not in ("", "0"):
                traceback.print_exc()
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 2
    return call


@_one_line_errors
def cmd_convert(args) -> int:
    from transxssm_megatron.hf.convert import to_hf, to_megatron

    if args.to == "hf":
        out = to_hf(args.source, args.out, config=args.config, tokenizer=args.tokenizer, progress=not args.quiet,
                    llama="never" if args.no_llama else "auto")
        print(f"[convert] wrote {out}; try: transxssm generate --checkpoint {out} --prompt 'Once upon a time'")
    else:
        path = to_megatron(args.source, args.out)
        print(f"[convert] wrote {path} (model weights only); continue training from it with a fresh optimizer: "
              f"transxssm train --config CONFIG --resume {path}")
    return 0


@_one_line_errors
def cmd_generate(args) -> int:
    from transxssm_megatron.hf.generate import run

    return run(args)


@_one_line_errors
def cmd_eval(args) -> int:
    from transxssm_megatron.hf.evaluate import run

    return run(args)


@_one_line_errors
def cmd_niah(args) -> int:
    from transxssm_megatron.hf.niah import run

    return run(args)


def _device_args(parser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu) | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (as saved) | float32 | bfloat16 | float16")


def add_subcommands(sub) -> None:
    """Register `convert`, `generate`, `eval` and `niah` on the `transxssm` subparsers object."""
    convert = sub.add_parser("convert", help="megatron checkpoint <-> Hugging Face export folder (one CPU process)")
    convert.add_argument("--to", required=True, choices=("hf", "megatron"),
                         help="hf: SOURCE is a checkpoint (iter_XXXXXXX); megatron: SOURCE is an export folder")
    convert.add_argument("source", metavar="SOURCE")
    convert.add_argument("out", metavar="OUT", help="new folder (refused if it exists)")
    convert.add_argument("--config", default=None,
                         help="the run's config.yaml (default: found next to the checkpoints folder)")
    convert.add_argument("--tokenizer", default=None,
                         help="tokenizer.json to ship (default: .assets/tokenizer/gpt-neox-20b.json)")
    convert.add_argument("--no-llama", action="store_true",
                         help="export a `transformer` through the remote code even when it is a plain Llama")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(fn=cmd_convert)

    generate = sub.add_parser("generate", help="stream a continuation of --prompt (export folder or checkpoint)")
    generate.add_argument("--checkpoint", required=True,
                          help="export folder, or a megatron checkpoint / checkpoints dir (converted on the fly)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--config", default=None, help="run config.yaml for a checkpoint (default: found)")
    _device_args(generate)
    generate.set_defaults(fn=cmd_generate)

    evaluate = sub.add_parser("eval", help="lm-eval on the paper's tasks; Table 3 layout beside the paper")
    evaluate.add_argument("--model", required=True, help="export folder (transxssm convert --to hf)")
    evaluate.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS), choices=PAPER_TASKS, metavar="TASK",
                          help=f"default: all of {' '.join(PAPER_TASKS)}")
    evaluate.add_argument("--offline-assets", default=None,
                          help="run offline from this asset bundle (e.g. .assets/eval) instead of the hub")
    evaluate.add_argument("--limit", type=int, default=None, help="at most N items per task (MMLU: per subject)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--num-fewshot", type=int, default=None, help="default: zero-shot")
    evaluate.add_argument("--max-gen-toks", type=int, default=None, help="cap TriviaQA's generation length")
    evaluate.add_argument("--out", default=None, help="results folder (default runs/eval/<model folder name>)")
    _device_args(evaluate)
    evaluate.set_defaults(fn=cmd_eval)

    niah = sub.add_parser("niah", help="needle in a haystack: context lengths x depths, JSON + heatmap")
    niah.add_argument("--model", required=True, help="export folder, or a megatron checkpoint")
    niah.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    niah.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    niah.add_argument("--trials", type=int, default=3)
    niah.add_argument("--haystack", nargs="+", default=None,
                      help=".txt or .parquet files (default: the sample corpus in .assets/sample)")
    niah.add_argument("--seed", type=int, default=0)
    niah.add_argument("--out", default=None, help="results folder (default runs/niah/<model folder name>)")
    _device_args(niah)
    niah.set_defaults(fn=cmd_niah)
