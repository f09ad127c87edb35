"""`transxssm` command line.

    transxssm train --config configs/320m.yaml [--resume auto|none|PATH] [section.key=value ...]
    transxssm demo  [--out runs/demo] [--steps 200]      # the README's main job, on the embedded sample
    transxssm config [--config FILE] [--resume ...] [section.key=value ...]   # print the resolved config
    transxssm checkpoint list runs/x/checkpoints          # step, size, status of every checkpoint
    transxssm checkpoint verify PATH                     # a checkpoint, a checkpoints dir or a run dir
    transxssm --debug ...  (or TRANSXSSM_DEBUG=1)         # errors with their Python traceback

Overrides may stand anywhere among the options (`--resume auto train.steps=5` and `train.steps=5 --resume auto`
alike). Known warnings of megatron-core and torch that ask nothing of the user are hidden at start;
TRANSXSSM_SHOW_WARNINGS=1 shows them.

Errors that name their own cause (a config field, a checkpoint file) are printed as one line `error: ...` on
stderr with exit code 2; `--debug` adds the traceback. `checkpoint list/verify` exit 0 when every checkpoint
checked is intact, 1 otherwise; they need no GPU, no process group, and import neither torch nor megatron-core.

`train` runs as one process per device under torchrun or srun (ranks from RANK/WORLD_SIZE/LOCAL_RANK or
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) or as a single process.

A hung job: `kill -USR2 <pid of a rank>` prints every thread's Python stack of that rank to its stderr and lets it
run on. In a run of several processes, a rank that fails prints its error and exits at once (no interpreter
teardown, which can block on a collective the other ranks are still in), so torchrun/srun stop the job.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import traceback

from transxssm_megatron.quiet_warnings import quiet_third_party_warnings


def _load_config(args, need_data: bool = True):
    from transxssm_megatron.training.run_config import RunConfig

    overrides = list(args.overrides)
    if getattr(args, "resume", None) is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    return RunConfig.load(args.config, overrides, need_data=need_data)


def cmd_train(args) -> int:
    from transxssm_megatron.config import ConfigError
    from transxssm_megatron.training import loop
    from transxssm_megatron.training.demo import missing_demo_data
    from transxssm_megatron.training.parallel import discover_ranks
    from transxssm_megatron.training.run_dir import NewRunDir

    cfg = _load_config(args)
    guard = NewRunDir(cfg.run_dir, owner=discover_ranks()[0] == 0)
    try:
        summary = loop.train(cfg)
    except ConfigError as err:
        guard.remove_if_unused()
        missing = missing_demo_data(cfg.data.prefixes)
        if missing and str(err).startswith("data.prefixes:"):
            raise ConfigError(f"data.prefixes: {missing[0]} is the demo's data and the demo has not made it yet; "
                              f"run `transxssm demo` first (from this folder), or give your own prefixes "
                              f"(data.prefixes=[...])") from None
        raise
    except BaseException:
        guard.remove_if_unused()
        raise
    if summary["status"] == "preempted":
        print(f"[train] preempted at step {summary['step']}; resume with --resume auto", flush=True)
    return 0


def cmd_config(args) -> int:
    import yaml

    cfg = _load_config(args, need_data=False)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    if cfg.data.mode == "gpt" and not cfg.data.prefixes:
        print("note: data.prefixes is empty; `transxssm train` needs preprocessed prefixes "
              "(data.prefixes=[...]) or data.mode=mock", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from transxssm_megatron.training.demo import run_demo

    return run_demo(out=args.out, steps=args.steps, fresh=not args.keep)


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def cmd_checkpoint(args) -> int:
    """Print name, step, size and status of each checkpoint `args.path` stands for; 0 if all are ok, else 1."""
    from transxssm_megatron.training.checkpoint_integrity import checkpoint_folders, inspect_checkpoint

    folders = checkpoint_folders(args.path)
    if not folders:
        print(f"{args.path}: no checkpoints (iter_XXXXXXX folders) found")
        return 1
    checks = "sizes" if args.quick else "sizes and checksums"
    print(f"{len(folders)} checkpoint(s) in {folders[0].parent} ({checks} checked):")
    print(f"  {'folder':<18} {'step':>9} {'size':>10}  status")
    all_ok = True
    for folder in folders:
        status = inspect_checkpoint(folder, checksums=not args.quick)
        all_ok &= status.state == "ok"
        step = "" if status.step is None else str(status.step)
        print(f"  {folder.name:<18} {step:>9} {_human_size(status.size()):>10}  {status.describe()}", flush=True)
    return 0 if all_ok else 1


def build_parser() -> argparse.ArgumentParser:
    from transxssm_megatron.training.demo import DEFAULT_OUT, DEFAULT_STEPS

    parser = argparse.ArgumentParser(prog="transxssm", description="TransXSSM pretraining on megatron-core")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of errors (also: TRANSXSSM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    overrides_help = "section.key=value overrides, anywhere among the options, e.g. train.steps=100"

    train = sub.add_parser("train", help="pretrain a model from a YAML run config")
    train.add_argument("--config", required=True, help="YAML run config, e.g. configs/320m.yaml")
    resume_help = ("auto (newest intact checkpoint of the run, if any) | none | PATH; default: the config's "
                   "checkpoint.resume (auto unless set)")
    train.add_argument("--resume", default=None, help=resume_help)
    train.add_argument("overrides", nargs="*", help=overrides_help)
    train.set_defaults(fn=cmd_train)

    config = sub.add_parser("config", help="print the resolved run config (YAML) and exit")
    config.add_argument("--config", default=None, help="YAML run config (default: the built-in defaults)")
    config.add_argument("--resume", default=None, help=resume_help)
    config.add_argument("overrides", nargs="*", help=overrides_help)
    config.set_defaults(fn=cmd_config)

    demo = sub.add_parser("demo", help="end-to-end demo: tokenize the embedded sample, train tiny, checkpoint, "
                                       "resume in a fresh trainer")
    demo.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    demo.add_argument("--steps", type=int, default=None,
                      help=f"total training steps, half before the checkpoint and half after the resume "
                           f"(default {DEFAULT_STEPS})")
    demo.add_argument("--keep", action="store_true",
                      help="keep the run in an existing --out folder and resume it (default: start it afresh; "
                           "the tokenized data is reused either way)")
    demo.set_defaults(fn=cmd_demo)

    checkpoint = sub.add_parser("checkpoint", help="inspect checkpoints (no GPU, no process group)")
    actions = checkpoint.add_subparsers(dest="action", required=True)
    verify = actions.add_parser("verify", help="check a checkpoint's files against the sizes and checksums it "
                                               "recorded; PATH: a checkpoint, a checkpoints dir or a run dir")
    verify.add_argument("path", metavar="PATH")
    verify.set_defaults(fn=cmd_checkpoint, quick=False)
    listing = actions.add_parser("list", help="step, size and status of every checkpoint in DIR (a checkpoints "
                                              "dir or a run dir)")
    listing.add_argument("path", metavar="DIR")
    listing.add_argument("--quick", action="store_true", help="check sizes only, not checksums")
    listing.set_defaults(fn=cmd_checkpoint)

    from transxssm_megatron.hf.cli import add_subcommands   # convert, generate, eval, niah

    add_subcommands(sub)
    return parser


def _is_override(arg: str) -> bool:
    key, sep, _ = arg.partition("=")
    return bool(sep) and not arg.startswith("-") and "." in key


def parse_args(argv=None) -> argparse.Namespace:
    """argparse takes the positional overrides in one run only, so `--config X a.b=1 --resume auto c.d=2` would
    leave `c.d=2` unrecognized: the overrides after an option come back as leftovers and join the others, in
    command-line order. (parse_intermixed_args does this for a parser without subcommands.)"""
    parser = build_parser()
    args, leftovers = parser.parse_known_args(argv)
    if args.command in ("train", "config"):
        args.overrides = [*args.overrides, *(a for a in leftovers if _is_override(a))]
        leftovers = [a for a in leftovers if not _is_override(a)]
    if leftovers:
        parser.error(f"unrecognized arguments: {' '.join(leftovers)}")
    return args


# Errors whose message is the whole story (it names the file or field and the fix): printed as one line.
_USER_ERRORS = {"transxssm_megatron.config": "ConfigError",
                "transxssm_megatron.training.loop": "TrainingError",
                "transxssm_megatron.training.checkpoint_integrity": "CheckpointError",
                "transxssm_megatron.hf.names": "ConversionError"}


def _user_error_types() -> tuple[type, ...]:
    """Looked up among the modules already imported: one that was never imported raised nothing, and importing
    the training loop here would cost `checkpoint verify` its torch- and megatron-free start."""
    return tuple(getattr(sys.modules[module], name) for module, name in _USER_ERRORS.items()
                 if module in sys.modules)


def _debug(args) -> bool:
    return args.debug or os.environ.get("TRANSXSSM_DEBUG", "") not in ("", "0")


def main(argv=None) -> int:
    quiet_third_party_warnings()
    args = parse_args(argv)

    if hasattr(signal, "SIGUSR2") and sys.__stderr__ is not None:
        faulthandler.register(signal.SIGUSR2, file=sys.__stderr__, all_threads=True)  # the process's own fd 2
    rank, distributed = 0, False
    if args.command == "train":
        from transxssm_megatron.training.parallel import discover_ranks

        rank, world_size, _ = discover_ranks()
        distributed = world_size > 1
    try:
        return args.fn(args)
    except Exception as err:
        if isinstance(err, _user_error_types()):
            if _debug(args):
                traceback.print_exc()
            print(f"error: {err}", file=sys.stderr, flush=True)
            code = 2
        elif not distributed:
            raise
        else:
            print(f"[rank {rank}] failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            code = 1
    if distributed:
        sys.stdout.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
