"""Checkpoint integrity, end to end through `transxssm` (CPU, mock data, the tiny model, real dist_checkpointing).

A run saves iter_0000002 and iter_0000004; each test damages a copy of it. Every kind of file of a checkpoint
(`__0_0.distcp` shards, `.metadata` with the common state, megatron's `metadata.json`, our `COMPLETE` marker) is
truncated, deleted or overwritten with random bytes, and then:
- `--resume <the damaged one>` exits 2 with one line `error: <path>: <file and reason>`, trains nothing;
- `--resume auto` warns that it skipped it, naming the file, and trains on from iter_0000002 with exactly the
  losses of a run resumed from iter_0000002 directly.
Also: `checkpoint verify` / `list`, old markers without a file list, a resume path that is not a checkpoint,
cleaning of folders left by interrupted saves, `checkpoint.keep_last` retention around damaged checkpoints (and 0
keeping all), --debug / TRANSXSSM_DEBUG, and the hashing spread over two ranks.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from distributed import run_distributed

from transxssm_megatron.cli import main

REPO = Path(__file__).resolve().parents[2]

# One CPU core's worth: seconds per run. checkpoint.keep_last=3 keeps both checkpoints of the first run.
TINY = ["data.mode=mock", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.state_size=16",
        "model.vocab_size=256", "model.max_seq_length=32", "train.seq_length=32", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.eval_interval=0", "train.device=cpu", "train.deterministic=true",
        "logging.interval=1", "logging.tensorboard=false", "checkpoint.keep_last=3"]
NO_SAVES = ["checkpoint.interval=0", "checkpoint.save_at_end=false"]
GOOD, DAMAGED = "iter_0000002", "iter_0000004"


def _train(run_dir: Path, resume: str, *extra: str, steps: int = 4, cli_flags=()) -> int:
    return main([*cli_flags, "train", "--config", str(REPO / "configs" / "tiny.yaml"), "--resume", resume, *TINY,
                 f"train.steps={steps}", f"logging.run_dir={run_dir}", *extra])


def _metrics_lines(run_dir: Path) -> list[str]:
    path = run_dir / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def _losses(lines: list[str]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _error_line(stderr: str) -> str:
    """The one `error:` line; fails if there is another or a traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(run dir with intact iter_0000002 and iter_0000004, losses of steps 3-4 resumed from iter_0000002)."""
    run = tmp_path_factory.mktemp("pristine") / "run"
    assert _train(run, "none", "checkpoint.interval=2") == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [GOOD, DAMAGED]

    reference_run = tmp_path_factory.mktemp("reference") / "run"
    shutil.copytree(run, reference_run)
    before = len(_metrics_lines(reference_run))
    assert _train(reference_run, str(reference_run / "checkpoints" / GOOD), *NO_SAVES) == 0
    reference = _losses(_metrics_lines(reference_run)[before:])
    assert sorted(reference) == [3, 4]
    return run, reference


@pytest.fixture
def run_copy(pristine, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pristine[0], run)
    return run


# ---------------------------------------------------------------------------------------------- damage
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _randomize(path: Path) -> None:
    """Same size, other bytes: only the checksum can tell."""
    path.write_bytes(os.urandom(path.stat().st_size))


DAMAGE = {"truncated": _truncate, "deleted": Path.unlink, "random": _randomize}
FILES = ["__0_0.distcp", ".metadata", "metadata.json", "COMPLETE"]


def _expected_reason(name: str, damage: str, original_size: int) -> str:
    if name == "COMPLETE":
        return ("no COMPLETE marker: the save was interrupted" if damage == "deleted"
                else "the COMPLETE marker is not valid JSON (truncated or overwritten")
    return {"truncated": f"{name} is {original_size // 2} bytes, the checkpoint recorded {original_size} "
                         f"(truncated or overwritten)",
            "deleted": f"{name} is missing",
            "random": f"{name} checksum differs from the one recorded at save"}[damage]


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("name", FILES)
def test_damaged_checkpoint_is_refused_by_path_and_skipped_by_auto(run_copy, pristine, capsys, name, damage):
    damaged = run_copy / "checkpoints" / DAMAGED
    target = damaged / name
    reason = _expected_reason(name, damage, target.stat().st_size)
    DAMAGE[damage](target)
    trained_before = len(_metrics_lines(run_copy))

    # A path to the damaged checkpoint: refused, with the file and the fix; nothing trained.
    assert _train(run_copy, str(damaged), *NO_SAVES) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {damaged}: {reason}"), line
    assert "transxssm checkpoint list" in line
    assert len(_metrics_lines(run_copy)) == trained_before

    # auto: warns about the damaged one and continues from iter_0000002 exactly as a direct resume does.
    assert _train(run_copy, "auto", *NO_SAVES) == 0
    out = capsys.readouterr().out
    assert f"[train] warning: skipped checkpoint {damaged}: {reason}" in out, out[-3000:]
    assert f"resumed from {run_copy / 'checkpoints' / GOOD} at step 2" in out
    assert _losses(_metrics_lines(run_copy)[trained_before:]) == pristine[1]


def test_shard_overwritten_with_a_megabyte_of_random_bytes(run_copy, capsys):
    """Before the size and checksum check this loaded without error and trained to NaN."""
    shard = run_copy / "checkpoints" / DAMAGED / "__0_0.distcp"
    recorded = shard.stat().st_size
    shard.write_bytes(os.urandom(1 << 20))
    assert _train(run_copy, str(shard.parent), *NO_SAVES) == 2
    assert _error_line(capsys.readouterr().err) == (
        f"error: {shard.parent}: __0_0.distcp is 1048576 bytes, the checkpoint recorded {recorded} (truncated or "
        f"overwritten). Choose another checkpoint (transxssm checkpoint list {shard.parent.parent}) or start fresh "
        f"with --resume none")


def test_auto_refuses_when_every_checkpoint_is_damaged(run_copy, capsys):
    for name in (GOOD, DAMAGED):
        _truncate(run_copy / "checkpoints" / name / "__0_0.distcp")
    assert _train(run_copy, "auto", *NO_SAVES) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"error: {run_copy / 'checkpoints'}: no intact checkpoint ({DAMAGED}: __0_0.distcp is" in line
    assert "--resume none" in line


# ---------------------------------------------------------------------------------------------- not a checkpoint
def test_resume_from_a_folder_that_is_not_a_checkpoint(run_copy, tmp_path, capsys):
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "readme.txt").write_text("not a checkpoint")
    assert _train(run_copy, str(stranger), *NO_SAVES) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {stranger}: not a checkpoint folder (no COMPLETE marker, no .metadata)"), line

    checkpoints = run_copy / "checkpoints"  # the folder of checkpoints instead of one of them
    assert _train(run_copy, str(checkpoints), *NO_SAVES) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"not a checkpoint but a folder of checkpoints; pass one of them, e.g. {checkpoints / DAMAGED}" in line


def test_old_marker_without_file_list_loads_with_a_note(run_copy, pristine, capsys, caplog):
    marker = run_copy / "checkpoints" / GOOD / "COMPLETE"
    old = {k: v for k, v in json.loads(marker.read_text()).items() if k not in ("files", "checksum")}
    marker.write_text(json.dumps(old))
    before = len(_metrics_lines(run_copy))
    assert _train(run_copy, str(marker.parent), *NO_SAVES) == 0
    assert "cannot be verified; loading it as it is" in caplog.text  # a logging warning: stderr outside pytest
    assert _losses(_metrics_lines(run_copy)[before:]) == pristine[1]

    assert main(["checkpoint", "list", str(run_copy / "checkpoints")]) == 1
    assert "unverifiable (old format" in capsys.readouterr().out

    # Damage in an old checkpoint reaches dist_checkpointing (torch's CheckpointException, a BaseException):
    # still one line that names the files it was reading.
    _truncate(marker.parent / "__0_0.distcp")
    assert _train(run_copy, str(marker.parent), *NO_SAVES) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {marker.parent}: loading failed") and "__0_0.distcp" in line, line
    assert "no recorded checksums" in line


# ---------------------------------------------------------------------------------------------- verify / list
def test_verify_and_list_report_each_checkpoint(run_copy, capsys):
    checkpoints = run_copy / "checkpoints"
    assert main(["checkpoint", "list", str(checkpoints)]) == 0
    out = capsys.readouterr().out
    assert "2 checkpoint(s)" in out and "sizes and checksums checked" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("iter_")]
    assert [(r[0], r[1], r[-1]) for r in rows] == [(GOOD, "2", "ok"), (DAMAGED, "4", "ok")]
    assert rows[0][3] == "MiB" and float(rows[0][2]) > 1

    _randomize(checkpoints / DAMAGED / ".metadata")
    (checkpoints / "iter_0000006.tmp").mkdir()
    assert main(["checkpoint", "list", "--quick", str(run_copy)]) == 1  # a run dir stands for its checkpoints/
    out = capsys.readouterr().out
    assert "iter_0000004" in out and "bad" not in out.split("iter_0000004")[1].splitlines()[0]  # sizes only
    assert "incomplete: temporary folder of a save in progress or killed" in out

    assert main(["checkpoint", "verify", str(checkpoints)]) == 1
    out = capsys.readouterr().out
    assert "bad: .metadata checksum differs from the one recorded at save" in out
    assert main(["checkpoint", "verify", str(checkpoints / GOOD)]) == 0
    assert "1 checkpoint(s)" in capsys.readouterr().out

    assert main(["checkpoint", "verify", str(run_copy / "nowhere")]) == 2
    assert _error_line(capsys.readouterr().err) == (f"error: {run_copy / 'nowhere'}: does not exist; pass a "
                                                    f"checkpoint folder, a checkpoints dir or a run dir")


def test_checkpoint_commands_import_neither_torch_nor_megatron(run_copy):
    child = textwrap.dedent(f"""
        import sys
        from transxssm_megatron.cli import main
        code = main(["checkpoint", "verify", {str(run_copy)!r}])
        assert "torch" not in sys.modules and "megatron" not in sys.modules, "imported torch or megatron"
        sys.exit(code)
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(" ok") == 2


# ---------------------------------------------------------------------------------------------- cleaning
def test_cleaning_removes_only_unmarked_folders_older_than_an_intact_checkpoint(tmp_path):
    from transxssm_megatron.training.checkpointing import CheckpointManager

    for name in ("iter_0000010", "iter_0000020", "iter_0000005.tmp", "iter_0000015", "iter_0000012.trash",
                 "iter_0000025.tmp", "iter_0000030", "iter_0000020.tmp", "iter_0000003.tmp.trash"):
        (tmp_path / name).mkdir()
    for name in ("iter_0000010", "iter_0000020"):
        (tmp_path / name / "COMPLETE").write_text("{}")  # 10 is damaged beyond reading: still never removed
    (tmp_path / "iter_0000040").write_text("a file, not a checkpoint")
    manager = CheckpointManager(tmp_path)

    messages = manager.clean_stale(intact=None)  # no intact checkpoint known: only retired (.trash) folders go
    assert [m.split(":")[0] for m in messages] == [f"removed {tmp_path / 'iter_0000003.tmp.trash'}",
                                                    f"left {tmp_path / 'iter_0000005.tmp'} in place",
                                                    f"removed {tmp_path / 'iter_0000012.trash'}",
                                                    f"left {tmp_path / 'iter_0000020.tmp'} in place",
                                                    f"left {tmp_path / 'iter_0000025.tmp'} in place"]
    messages = manager.clean_stale(intact=tmp_path / "iter_0000020")
    assert [m.split(":")[0] for m in messages] == [f"removed {tmp_path / 'iter_0000005.tmp'}",
                                                    f"removed {tmp_path / 'iter_0000015'}",
                                                    f"left {tmp_path / 'iter_0000020.tmp'} in place",
                                                    f"left {tmp_path / 'iter_0000025.tmp'} in place"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000010", "iter_0000020", "iter_0000020.tmp",
                                                          "iter_0000025.tmp", "iter_0000030", "iter_0000040"]


def _fake_checkpoint(save_dir: Path, step: int, marker: str = "files") -> Path:
    """A marked folder with one 1 KiB shard; `marker`: files (the current format), old (no file list)."""
    from transxssm_megatron.training.checkpoint_integrity import file_checksum, write_marker

    path = save_dir / f"iter_{step:07d}"
    path.mkdir(parents=True)
    shard = path / "__0_0.distcp"
    shard.write_bytes(os.urandom(1024))
    size, digest = file_checksum(shard)
    write_marker(path, {"step": step}, {shard.name: {"size": size, "checksum": digest}})
    if marker == "old":
        (path / "COMPLETE").write_text(json.dumps({"step": step}))
    return path


def test_retention_counts_only_intact_checkpoints(tmp_path):
    from transxssm_megatron.training.checkpoint_integrity import retire_old

    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 4, marker="old")          # unverifiable, but loadable: counts
    _truncate(tmp_path / "iter_0000003" / "__0_0.distcp")
    newest = _fake_checkpoint(tmp_path, 5)              # just saved
    (tmp_path / "iter_0000006").mkdir()                  # unmarked: cleaning's business, not retention's

    # keep_last=2 once counted iter_4 and iter_5 and removed the intact iter_2 while keeping the damaged iter_3.
    messages = retire_old(tmp_path, keep_last=3, intact=newest)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000002", "iter_0000003", "iter_0000004", "iter_0000005", "iter_0000006"]
    assert messages == [f"kept damaged checkpoint {tmp_path / 'iter_0000003'} (__0_0.distcp is 512 bytes, the "
                        f"checkpoint recorded 1024 (truncated or overwritten)) for inspection; it does not count "
                        f"towards checkpoint.keep_last=3 and is removed once 3 newer intact checkpoint(s) exist"]

    (tmp_path / "iter_0000002" / "COMPLETE").write_text("{trunc")  # an unreadable marker is damage too
    newest = _fake_checkpoint(tmp_path, 7)
    messages = retire_old(tmp_path, keep_last=2, intact=newest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000005", "iter_0000006", "iter_0000007"]
    assert [m.split(" (")[0] for m in messages] == [f"removed damaged checkpoint {tmp_path / 'iter_0000003'}",
                                                    f"removed damaged checkpoint {tmp_path / 'iter_0000002'}"]


def test_keep_last_zero_keeps_every_checkpoint(tmp_path):
    from transxssm_megatron.training.checkpoint_integrity import retire_old
    from transxssm_megatron.training.checkpointing import CheckpointManager

    for step in range(1, 6):
        _fake_checkpoint(tmp_path, step)
    _truncate(tmp_path / "iter_0000001" / "__0_0.distcp")
    assert CheckpointManager(tmp_path, keep_last=0).keep_last is None
    assert retire_old(tmp_path, keep_last=0) == retire_old(tmp_path, keep_last=None) == []
    assert len(list(tmp_path.iterdir())) == 5


def test_run_start_reports_and_cleans_leftovers(run_copy, capsys):
    checkpoints = run_copy / "checkpoints"
    (checkpoints / "iter_0000001.tmp").mkdir()
    shutil.copytree(checkpoints / GOOD, checkpoints / "iter_0000003")
    (checkpoints / "iter_0000003" / "COMPLETE").unlink()     # unmarked, older than the intact iter_0000004
    (checkpoints / "iter_0000009.tmp").mkdir()               # newer: perhaps another job's save in progress
    assert _train(run_copy, "auto", *NO_SAVES) == 0           # resumes at step 4 of 4: nothing to train
    out = capsys.readouterr().out
    assert f"[train] checkpoints: removed {checkpoints / 'iter_0000001.tmp'}: temporary folder" in out
    assert f"[train] checkpoints: removed {checkpoints / 'iter_0000003'}: folder without a COMPLETE marker" in out
    assert f"[train] checkpoints: left {checkpoints / 'iter_0000009.tmp'} in place" in out
    assert sorted(p.name for p in checkpoints.iterdir()) == [GOOD, DAMAGED, "iter_0000009.tmp"]


# ---------------------------------------------------------------------------------------------- errors and --debug
def test_debug_flag_and_environment_show_the_traceback(run_copy, capsys, monkeypatch):
    bad = run_copy / "checkpoints" / DAMAGED
    (bad / "metadata.json").unlink()
    assert _train(run_copy, str(bad), *NO_SAVES, cli_flags=["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "CheckpointError" in err
    assert err.rstrip().splitlines()[-1].startswith(f"error: {bad}: metadata.json is missing")

    monkeypatch.setenv("TRANSXSSM_DEBUG", "1")
    assert main(["checkpoint", "verify", str(run_copy / "nowhere")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_checkpoint_error_on_a_rank_of_a_multi_process_run_exits_at_once():
    child = textwrap.dedent("""
        import atexit, sys, time
        import transxssm_megatron.cli as cli
        import transxssm_megatron.training.loop as loop
        from transxssm_megatron.training.checkpointing import CheckpointError

        atexit.register(time.sleep, 600)   # teardown blocked on a collective the other ranks are in

        def failing_train(cfg):
            raise CheckpointError("runs/x/checkpoints/iter_0000004: __0_0.distcp is missing")

        loop.train = failing_train
        sys.exit(cli.main(["train", "--config", "configs/tiny.yaml"]))
    """)
    env = dict(os.environ, WORLD_SIZE="2", RANK="1")
    proc = subprocess.run([sys.executable, "-c", child], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert _error_line(proc.stderr) == "error: runs/x/checkpoints/iter_0000004: __0_0.distcp is missing"


# ---------------------------------------------------------------------------------------------- two ranks
def _save_damage_verify(save_dir: str):
    """Both ranks save (TP=2: each writes its shard file), rank 0 damages one file, both verify."""
    import torch
    from checkpoint_cases import build_trainable as _build

    from transxssm_megatron.training.checkpointing import CheckpointManager

    chunks, opt, sched = _build(seed=1)
    manager = CheckpointManager(save_dir)
    path = manager.save(1, chunks, opt, sched, {"step": 1})
    before = manager.verify(path)
    if torch.distributed.get_rank() == 0:
        _randomize(path / "__1_0.distcp")
    torch.distributed.barrier()
    return before.state, manager.verify(path), sorted(json.loads((path / "COMPLETE").read_text())["files"])


def test_hashing_is_shared_by_the_ranks_and_all_agree_on_damage(tmp_path):
    results = run_distributed(_save_damage_verify, 2, str(tmp_path / "ckpt"), tp=2, timeout_s=240)
    (state0, after0, files), (state1, after1, _) = results
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "metadata.json"]
    assert state0 == state1 == "ok"
    assert after0 == after1 and after0.state == "bad"
    assert after0.problems == ("__1_0.distcp checksum differs from the one recorded at save (the file was changed "
                               "or corrupted)",)
