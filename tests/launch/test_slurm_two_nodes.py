"""The multi-node path of the SLURM launchers, on a real two-node cluster on this machine: one slurmctld and two
slurmd (`scripts/slurm_local.sh start --nodes 2`: node1 and node2, both at 127.0.0.1, each on its own port).
`sbatch -N 2 launch/slurm/train_320m.sbatch`: srun starts one torchrun per node, each with 2 gloo ranks.

(slow) One job, end to end: two nodes allocated; the rendezvous store hosted by the first node's torchrun at the
address the launcher derived for it; world size 4 with two ranks on each node; SIGUSR1 to the batch shell makes
every rank save the same step and the job requeue itself; the second start resumes from that checkpoint and
trains to the last step, whose checkpoint it writes.
What one host cannot show: that an address is right for *another* machine (every node is 127.0.0.1 here).
"""

import json
import re
import subprocess
from pathlib import Path

import psutil
import pytest
from slurm_cases import complete, free_port, job_state, local_cluster, sbatch, wait

NODES, RANKS_PER_NODE, STEPS = 2, 2, 40


@pytest.fixture(scope="module")
def slurm2(tmp_path_factory):
    """A private two-node cluster for this module."""
    with local_cluster(tmp_path_factory.mktemp("slurm2"), nodes=NODES) as env:
        yield env


def _scontrol(env, *args: str) -> str:
    return subprocess.run(["scontrol", *args], env=env, capture_output=True, text=True, check=True).stdout


def _field(text: str, name: str) -> str:
    match = re.search(rf"\b{name}=(\S+)", text)
    assert match, f"{name}= not in:\n{text}"
    return match.group(1)


def _rank_environments(job: str) -> dict[int, dict[str, str]]:
    """RANK -> environment of each running training rank of `job` (the workers torchrun started)."""
    ranks = {}
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if env.get("SLURM_JOB_ID") == job and "RANK" in env and "TORCHELASTIC_RUN_ID" in env:
            ranks[int(env["RANK"])] = env
    return ranks


def _listener_environment(port: int) -> dict[str, str] | None:
    """Environment of the process listening on 127.0.0.1:`port`, or None."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            try:
                return psutil.Process(conn.pid).environ()
            except psutil.Error:
                return None
    return None


def _metrics_segments(run_dir: Path) -> tuple[list[list[int]], list[dict]]:
    """metrics.jsonl in file order -> (logged training steps of each start, the resume markers between them)."""
    segments, markers = [[]], []
    for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if "resumed_at_step" in record:
            markers.append(record)
            segments.append([])
        elif "loss" in record:
            segments[-1].append(record["step"])
    return segments, markers


def _checkpoint_info(path: Path) -> dict:
    return json.loads((path / "COMPLETE").read_text())


@pytest.mark.slow
def test_two_nodes_train_preempt_requeue_resume(slurm2, tmp_path):
    from transxssm_megatron.training.metrics import read_metrics

    run_dir, port = tmp_path / "run", free_port()
    world = NODES * RANKS_PER_NODE
    job, out = sbatch(slurm2, run_dir, f"train.steps={STEPS}", "checkpoint.interval=0",
                       f"train.global_batch_size={2 * world}", nodes=NODES, master_port=port)

    # Two nodes allocated; the batch shell runs on the first.
    wait(lambda: job_state(slurm2, job) == "RUNNING", "the job to start", out)
    shown = _scontrol(slurm2, "show", "job", job)
    assert _field(shown, "NumNodes") == str(NODES), shown
    nodes = _scontrol(slurm2, "show", "hostnames", _field(shown, "NodeList")).split()
    assert nodes == ["node1", "node2"] and _field(shown, "BatchHost") == "node1", shown
    first_addr = _field(_scontrol(slurm2, "show", "node", "node1"), "NodeAddr")

    # While it trains: 4 ranks, two on each node, world size and node count from SLURM; the rendezvous store is
    # served by the torchrun of the first node.
    wait(lambda: len(read_metrics(run_dir / "metrics.jsonl")[0]) >= 2, "two training steps", out)
    ranks = _rank_environments(job)
    listener = _listener_environment(port)
    assert sorted(ranks) == list(range(world)), {r: e.get("SLURMD_NODENAME") for r, e in ranks.items()}
    assert {e["WORLD_SIZE"] for e in ranks.values()} == {str(world)}
    assert {e["SLURM_NNODES"] for e in ranks.values()} == {str(NODES)}
    per_node = {n: sorted(r for r, e in ranks.items() if e["SLURMD_NODENAME"] == n) for n in nodes}
    assert all(len(r) == RANKS_PER_NODE for r in per_node.values()), per_node
    assert listener is not None, f"nothing listens on the rendezvous port {port}"
    assert (listener.get("SLURMD_NODENAME"), listener.get("SLURM_NODEID")) == ("node1", "0")

    # What SLURM does 120 s before the time limit (--signal=B:USR1@120), now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm2, check=True)
    wait(lambda: job_state(slurm2, job) == "PENDING", "the job to requeue itself", out)
    saved = complete(run_dir)
    assert len(saved) == 1 and int(saved[0][5:]) < STEPS, saved
    preempted_at = int(saved[0][5:])
    info = _checkpoint_info(run_dir / "checkpoints" / saved[0])
    # One checkpoint of one step, with a shard from every rank of both nodes.
    assert info["step"] == preempted_at and info["layout"]["world_size"] == world, info
    assert {f"__{r}_0.distcp" for r in range(world)} <= set(info["files"]), sorted(info["files"])
    assert not (run_dir / "PREEMPTED").exists()

    # A requeued job waits for a begin time; release it now instead of minutes later.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm2, check=True)
    wait(lambda: job_state(slurm2, job) in ("COMPLETED", "FAILED", "CANCELLED"), "the resumed job to end", out)
    text = out.read_text()
    assert job_state(slurm2, job) == "COMPLETED", text[-4000:]
    shown = _scontrol(slurm2, "show", "job", job)
    assert _field(shown, "Restarts") == "1" and _field(shown, "NumNodes") == str(NODES), shown

    # Both starts: two nodes, the rendezvous on the first at its NodeAddr, one torchrun per node.
    for start in (1, 2):
        assert (f"start {start}: {NODES} node(s) x {RANKS_PER_NODE} ranks, rendezvous on node1 at "
                f"{first_addr}:{port}") in text, text[-4000:]
    assert text.count(f"node node1 (0 of {NODES}): torchrun hosts the rendezvous") == 2
    assert text.count(f"node node2 (1 of {NODES}): torchrun joins the rendezvous") == 2
    assert text.count(f"world {world} (tp 1, pp 1, dp {world})") == 2
    assert "batch shell got SIGUSR1: forwarding to the training step" in text and "requeueing job" in text
    assert f"resumed from {run_dir / 'checkpoints' / saved[0]} at step {preempted_at}" in text

    # Steps: 1..k before the signal, then k+1..STEPS after one resume marker; nothing trained twice.
    segments, markers = _metrics_segments(run_dir)
    assert [m["resumed_at_step"] for m in markers] == [preempted_at], markers
    assert markers[0]["checkpoint"] == str(run_dir / "checkpoints" / saved[0])
    assert segments == [list(range(1, preempted_at + 1)), list(range(preempted_at + 1, STEPS + 1))], segments
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")[0]] == list(range(1, STEPS + 1))

    # The last step's checkpoint, again with every rank's shard.
    final = complete(run_dir)[-1]
    assert final == f"iter_{STEPS:07d}"
    info = _checkpoint_info(run_dir / "checkpoints" / final)
    assert info["step"] == STEPS and info["layout"]["world_size"] == world
    assert {f"__{r}_0.distcp" for r in range(world)} <= set(info["files"])
