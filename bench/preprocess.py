"""Tokens/s of `transxssm-preprocess run` against Megatron-LM's own tools/preprocess_data.py.

Same input (JSON lines built from the .assets sample corpus), same tokenizer (the GPT-NeoX tokenizer.json; Megatron
loads it through its HuggingFaceTokenizer, i.e. transformers' AutoTokenizer on the same file), same CPU cores
(`taskset`), same worker count, EOD appended by both. Both are timed end to end as a user runs them (process start
to exit), alternating runs, and the median is reported. Their .bin/.idx must be byte-identical, or the benchmark
fails.

Megatron-LM is run from a snapshot outside this repository (nothing of it is copied here):

    git -C /path/to/Megatron-LM-mirror archive HEAD tools/preprocess_data.py megatron | tar -x -C /tmp/megatron-lm
    python -m venv /tmp/bench-venv   # + a .pth pointing at .venv's site-packages, + pip install transformers
    .venv/bin/python bench/preprocess.py --megatron-lm /tmp/megatron-lm --baseline-python /tmp/bench-venv/bin/python

Writes bench/results/preprocess-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / ".assets" / "tokenizer" / "gpt-neox-20b.json"
SAMPLE = REPO / ".assets" / "sample"


def build_corpus(path: Path, target_mb: float) -> dict:
    """JSON lines of the sample corpus's documents (all three subsets), repeated until ``target_mb`` of text."""
    import pyarrow.parquet as pq

    texts = []
    for f in sorted(SAMPLE.glob("*/*.parquet")):
        texts += pq.read_table(f, columns=["text"]).column(0).to_pylist()
    docs = text_bytes = 0
    with open(path, "w", encoding="utf-8") as out:
        while text_bytes < target_mb * 1e6:
            for t in texts:
                out.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
                docs += 1
                text_bytes += len(t.encode())
    return {"path": str(path), "documents": docs, "text_bytes": text_bytes, "file_bytes": path.stat().st_size}


def hf_tokenizer_dir(root: Path) -> Path:
    """A folder AutoTokenizer can load: the same tokenizer.json plus a minimal tokenizer_config.json."""
    d = root / "neox-hf"
    d.mkdir(exist_ok=True)
    shutil.copy(TOKENIZER, d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "model_max_length": 10**9}))
    return d


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of a command and all its (waited-for) worker processes."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu


def version_of(python: str, distribution: str) -> str:
    """Installed version of a distribution, as the given interpreter sees it."""
    code = f"import importlib.metadata as m; print(m.version({distribution!r}))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return out.stdout.strip() or "n/a"


def git_commit(path: Path) -> str:
    out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatron-lm", required=True, help="Megatron-LM snapshot holding tools/preprocess_data.py")
    p.add_argument("--megatron-lm-commit", help="its commit (default: git rev-parse in --megatron-lm)")
    p.add_argument("--baseline-python", default=sys.executable, help="python with transformers for Megatron-LM")
    p.add_argument("--input-mb", type=float, default=20.0, help="MB of text in the benchmark corpus")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus", default="0,1", help="taskset CPU list both tools are pinned to")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="result JSON (default bench/results/preprocess-<date>.json)")
    args = p.parse_args()

    if not TOKENIZER.is_file():
        sys.exit(f"{TOKENIZER} missing: run `bash scripts/setup.sh` first")
    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    corpus = build_corpus(work / "corpus.jsonl", args.input_mb)
    hf_dir = hf_tokenizer_dir(work)
    pin = ["taskset", "-c", args.cpus] if shutil.which("taskset") else []
    env = dict(os.environ, PYTHONWARNINGS="ignore")

    ours_prefix, theirs_prefix = work / "ours", work / "megatron"
    ours_cmd = pin + [sys.executable, "-m", "transxssm_preprocess.cli", "run", "--input", corpus["path"],
                      "--output-prefix", str(ours_prefix), "--tokenizer", str(TOKENIZER),
                      "--workers", str(args.workers), "--no-progress", "--overwrite", "--restart"]
    theirs_cmd = pin + [args.baseline_python, str(Path(args.megatron_lm) / "tools" / "preprocess_data.py"),
                        "--input", corpus["path"], "--output-prefix", str(theirs_prefix),
                        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(hf_dir),
                        "--append-eod", "--workers", str(args.workers)]
    load_before = os.getloadavg()
    times = {"transxssm-preprocess": [], "megatron-lm preprocess_data.py": []}
    cpu = {name: [] for name in times}
    for r in range(args.repeats):
        for name, cmd in (("megatron-lm preprocess_data.py", theirs_cmd), ("transxssm-preprocess", ours_cmd)):
            wall, used = timed(cmd, env)
            times[name].append(wall)
            cpu[name].append(used)
        print(f"[bench] repeat {r + 1}: " + ", ".join(f"{n}: {times[n][-1]:.2f} s wall, {cpu[n][-1]:.2f} s CPU"
                                                     for n in times), file=sys.stderr)
    load_after = os.getloadavg()

    theirs_bin, theirs_idx = Path(f"{theirs_prefix}_text_document.bin"), Path(f"{theirs_prefix}_text_document.idx")
    identical = (Path(f"{ours_prefix}.bin").read_bytes() == theirs_bin.read_bytes()
                 and Path(f"{ours_prefix}.idx").read_bytes() == theirs_idx.read_bytes())
    stats = json.loads(Path(f"{ours_prefix}.stats.json").read_text())
    tokens = stats["tokens"]
    results = {}
    for name, ts in times.items():
        med, med_cpu = statistics.median(ts), statistics.median(cpu[name])
        results[name] = {"seconds": [round(t, 3) for t in ts], "median_seconds": round(med, 3),
                         "tokens_per_second": round(tokens / med),
                         "text_mb_per_second": round(corpus["text_bytes"] / med / 1e6, 3),
                         "cpu_seconds": [round(t, 3) for t in cpu[name]], "median_cpu_seconds": round(med_cpu, 3),
                         "tokens_per_cpu_second": round(tokens / med_cpu)}
    ours, theirs = results["transxssm-preprocess"], results["megatron-lm preprocess_data.py"]
    speedup = theirs["median_seconds"] / ours["median_seconds"]
    cpu_speedup = theirs["median_cpu_seconds"] / ours["median_cpu_seconds"]
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "benchmark": "preprocess: transxssm-preprocess vs Megatron-LM tools/preprocess_data.py",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "megatron_lm_commit": args.megatron_lm_commit or git_commit(Path(args.megatron_lm)),
        "cpu": cpu_model(), "cpus_used": args.cpus, "machine_cpus": os.cpu_count(),
        "load_average_before_after": [load_before, load_after],
        "note": "shared CI machine: other jobs ran at the same time; runs alternate so both tools see the same load",
        "versions": {"python": platform.python_version(), "tokenizers": version_of(sys.executable, "tokenizers"),
                     "numpy": version_of(sys.executable, "numpy"), "pyarrow": version_of(sys.executable, "pyarrow"),
                     "megatron_core (ours)": version_of(sys.executable, "megatron-core"),
                     "transformers (baseline)": version_of(args.baseline_python, "transformers")},
        "input": corpus | {"path": "corpus.jsonl (sample corpus texts as JSON lines, repeated)"},
        "tokens": tokens, "workers": args.workers,
        "commands": {"transxssm-preprocess": " ".join(ours_cmd), "megatron-lm preprocess_data.py": " ".join(theirs_cmd)},
        "results": results,
        "speedup": round(speedup, 3),
        "speedup_definition": "Megatron median wall seconds / ours, end to end (start-up included), same cores",
        "cpu_efficiency_ratio": round(cpu_speedup, 3),
        "cpu_efficiency_definition": "Megatron median CPU seconds (all processes) / ours: load-independent",
        "identical_output": identical,
    }
    out = Path(args.out or REPO / "bench" / "results" / f"preprocess-{dt.date.today().isoformat()}.json")
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("results", "speedup", "cpu_efficiency_ratio", "identical_output")},
                     indent=1))
    shutil.rmtree(work)
    if not identical:
        print("error: outputs differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
