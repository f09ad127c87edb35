"""`transxssm` command line.

    transxssm train --config configs/320m.yaml [section.key=value ...] [--resume auto|none|PATH]
    transxssm demo  [--out runs/demo] [--steps N]        # the README's main job, on the embedded sample
    transxssm config --config configs/320m.yaml [...]    # print the resolved config and exit

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transxssm", description="TransXSSM pretraining on megatron-core")
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
    return parser


def main(argv=None) -> int:
    _quiet_imports()
    args = build_parser().parse_args(argv)
    from transxssm_megatron.config import ConfigError
    from transxssm_megatron.training.loop import TrainingError
    from transxssm_megatron.training.parallel import discover_ranks

    if hasattr(signal, "SIGUSR2") and sys.__stderr__ is not None:
        faulthandler.register(signal.SIGUSR2, file=sys.__stderr__, all_threads=True)  # the process's own fd 2
    rank, world_size, _ = discover_ranks()
    distributed = args.command == "train" and world_size > 1
    try:
        return args.fn(args)
    except (ConfigError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 2
    except Exception:
        if not distributed:
            raise
        print(f"[rank {rank}] failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        code = 1
    if distributed:
        sys.stdout.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
