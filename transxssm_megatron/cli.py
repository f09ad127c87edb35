"""`transxssm` command line.

    transxssm train --config configs/320m.yaml [section.key=value ...] [--resume auto|none|PATH]
    transxssm demo  [--out runs/demo] [--steps N]        # the README's main job, on the embedded sample
    transxssm config --config configs/320m.yaml [...]    # print the resolved config and exit
    transxssm checkpoint list runs/x/checkpoints          # step, size, status of every checkpoint
    transxssm checkpoint verify PATH                     # a checkpoint, a checkpoints dir or a run dir
    transxssm --debug ...  (or TRANSXSSM_DEBUG=1)         # errors with their Python traceback

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
import logging
import os
import signal
import sys
import traceback
import warnings


def _quiet_imports() -> None:
    """megatron-core warns about optional packages we do not use (TE, apex, absl) and its own deprecations;
    none of it is actionable for a user of this CLI."""
    for category in (UserWarning, DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"megatron\.")
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|absl).* not installed.*")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"


def _load_config(args):
    from transxssm_megatron.training.run_config import RunConfig

    overrides = list(args.overrides)
    if getattr(args, "resume", None) is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    return RunConfig.load(args.config, overrides)


def cmd_train(args) -> int:
    from transxssm_megatron.training.loop import train

    cfg = _load_config(args)
    summary = train(cfg)
    if summary["status"] == "preempted":
        print(f"[train] preempted at step {summary['step']}; resume with --resume auto", flush=True)
    return 0


def cmd_config(args) -> int:
    import yaml

    cfg = _load_config(args)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
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
    from transxssm_megatron.training.checkpointing import checkpoint_folders, inspect_checkpoint

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
    parser = argparse.ArgumentParser(prog="transxssm", description="TransXSSM pretraining on megatron-core")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of errors (also: TRANSXSSM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="pretrain a model from a YAML run config")
    train.add_argument("--config", required=True, help="YAML run config, e.g. configs/320m.yaml")
    train.add_argument("--resume", default=None, help="auto (latest complete checkpoint) | none | PATH")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    train.set_defaults(fn=cmd_train)

    config = sub.add_parser("config", help="print the resolved run config (YAML) and exit")
    config.add_argument("--config", default=None, help="YAML run config (default: built-in defaults)")
    config.add_argument("overrides", nargs="*")
    config.set_defaults(fn=cmd_config, resume=None)

    demo = sub.add_parser("demo", help="end-to-end demo: preprocess the embedded sample, train tiny, resume")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--steps", type=int, default=None, help="total training steps (default 300)")
    demo.add_argument("--keep", action="store_true", help="keep an existing --out folder (resume into it)")
    demo.set_defaults(fn=cmd_demo)

    checkpoint = sub.add_parser("checkpoint", help="inspect checkpoints (no GPU, no process group)")
    actions = checkpoint.add_subparsers(dest="action", required=True)
    verify = actions.add_parser("verify", help="check a checkpoint's files against the sizes and checksums it "
                                               "recorded; PATH: a checkpoint, a checkpoints dir or a run dir")
    verify.add_argument("path")
    verify.set_defaults(fn=cmd_checkpoint, quick=False)
    listing = actions.add_parser("list", help="step, size and status of every checkpoint in DIR")
    listing.add_argument("path", metavar="DIR")
    listing.add_argument("--quick", action="store_true", help="check sizes only, not checksums")
    listing.set_defaults(fn=cmd_checkpoint)
    return parser


# Errors whose message is the whole story (it names the file or field and the fix): printed as one line.
_USER_ERRORS = {"transxssm_megatron.config": "ConfigError",
                "transxssm_megatron.training.loop": "TrainingError",
                "transxssm_megatron.training.checkpointing": "CheckpointError"}


def _user_error_types() -> tuple[type, ...]:
    """Looked up among the modules already imported: one that was never imported raised nothing, and importing
    the training loop here would cost `checkpoint verify` its torch- and megatron-free start."""
    return tuple(getattr(sys.modules[module], name) for module, name in _USER_ERRORS.items()
                 if module in sys.modules)


def _debug(args) -> bool:
    return args.debug or os.environ.get("TRANSXSSM_DEBUG", "") not in ("", "0")


def main(argv=None) -> int:
    _quiet_imports()
    args = build_parser().parse_args(argv)

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
