"""`transxssm niah`: needle in a haystack over context lengths x needle depths, on a local haystack.

    transxssm niah --model exports/x --lengths 1024 2048 4096 --depths 0 0.25 0.5 0.75 1 --trials 5 --out runs/niah/x

Haystack: the text of the offline sample corpus (.assets/sample/*/*.parquet, column `text`, documents joined with
blank lines), or --haystack FILE (.txt or .parquet). Each trial hides one needle sentence, "The special magic number
is NNNNNNN." (a fresh 7-digit number), at the given fraction of the context (moved to the next sentence end, so that
no sentence is cut), then asks "What is the special magic number mentioned in the text above? The special magic
number is" and decodes greedily (12 tokens). A trial scores 1 when the answer contains the number. Context length
counts every token of the prompt (haystack + needle + question). Trials of a cell start at different haystack
offsets and numbers (seeded, so runs repeat).

Writes OUT/niah.json (grid of accuracies, every trial's answer) and OUT/niah.png (heatmap; needs matplotlib,
otherwise a log line says it was skipped).
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Optional, Sequence

import torch

logger = logging.getLogger(__name__)

NEEDLE = " The special magic number is {number}."
QUESTION = "\n\nWhat is the special magic number mentioned in the text above? The special magic number is"
ANSWER_TOKENS = 12


class NiahError(ValueError):
    """Bad arguments or inputs for `transxssm niah`; one line naming the fix."""


def default_haystack_files() -> list[Path]:
    from transxssm_megatron.hf.convert import HERE

    for root in (os.environ.get("TRANSXSSM_ASSETS"), ".assets", str(HERE.parents[1] / ".assets")):
        if root and (Path(root) / "sample").is_dir():
            files = sorted((Path(root) / "sample").glob("*/*.parquet"))
            if files:
                return files
    raise NiahError("no haystack: .assets/sample holds no parquet files; run `transxssm-preprocess assets --out "
                    ".assets` or pass --haystack FILE")


def read_haystack(files: Sequence[str | Path]) -> str:
    """The haystack text: .txt files as they are, the `text` column of .parquet files, joined by blank lines."""
    parts = []
    for file in map(Path, files):
        if not file.is_file():
            raise NiahError(f"--haystack {file}: no such file")
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            parts.extend(t for t in pq.read_table(file, columns=["text"]).column("text").to_pylist() if t)
        else:
            parts.append(file.read_text())
    return "\n\n".join(parts)


def build_prompt(haystack_ids: list[int], needle_ids: list[int], question_ids: list[int], length: int, depth: float,
                 offset: int, sentence_ends: set[int]) -> list[int]:
    """Token ids of one trial: `length` tokens in all, the needle at fraction `depth` of the haystack part (moved
    forward to just after the next sentence end within 64 tokens, when there is one)."""
    room = length - len(needle_ids) - len(question_ids)
    if room < 1:
        raise NiahError(f"--lengths {length}: too short for the needle and question ({length - room + 1} tokens)")
    if len(haystack_ids) < room:
        raise NiahError(f"--lengths {length}: the haystack has only {len(haystack_ids)} tokens; use shorter "
                        f"lengths or a larger --haystack")
    start = offset % (len(haystack_ids) - room + 1)
    context = haystack_ids[start:start + room]
    cut = round(depth * room)
    if 0 < cut < room:
        cut = next((k for k in range(cut, min(cut + 64, room)) if context[k - 1] in sentence_ends), cut)
    return context[:cut] + needle_ids + context[cut:] + question_ids


def run_niah(model, tokenizer, *, lengths: Sequence[int], depths: Sequence[float], trials: int = 3,
             haystack: Optional[str] = None, seed: int = 0, out: Optional[str | Path] = None,
             progress: bool = True) -> dict:
    """Accuracy grid: result["accuracy"][i][j] for lengths[i], depths[j]."""
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise NiahError(f"--depths {list(depths)}: each must lie in [0, 1] (0 = start of the context, 1 = end)")
    if trials < 1:
        raise NiahError("--trials: must be >= 1")
    text = haystack if haystack is not None else read_haystack(default_haystack_files())
    haystack_ids = tokenizer(text, verbose=False).input_ids  # longer than the model: cut below, no warning
    question_ids = tokenizer(QUESTION).input_ids
    sentence_ends = {i for tok, i in tokenizer.get_vocab().items() if tok.rstrip("Ċ").endswith((".", "!", "?"))}
    device = next(model.parameters()).device
    rng = random.Random(seed)
    grid, details = [], []
    total = len(lengths) * len(depths) * trials
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="niah", unit="trial")
    for length in lengths:
        row = []
        for depth in depths:
            hits = 0
            for trial in range(trials):
                number = str(rng.randrange(1_000_000, 10_000_000))
                needle_ids = tokenizer(NEEDLE.format(number=number)).input_ids
                prompt = build_prompt(haystack_ids, needle_ids, question_ids, length, depth,
                                      rng.randrange(len(haystack_ids)), sentence_ends)
                ids = torch.tensor([prompt], device=device)
                with torch.no_grad():
                    out_ids = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER_TOKENS,
                                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
                answer = tokenizer.decode(out_ids[0, len(prompt):], skip_special_tokens=True)
                found = number in answer
                hits += found
                details.append({"length": length, "depth": depth, "trial": trial, "number": number,
                                "answer": answer, "found": found})
                if bar is not None:
                    bar.update(1)
            row.append(hits / trials)
        grid.append(row)
    if bar is not None:
        bar.close()
    result = {"lengths": list(lengths), "depths": list(depths), "trials": trials, "seed": seed, "accuracy": grid,
              "mean_accuracy": sum(map(sum, grid)) / (len(lengths) * len(depths)), "details": details}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "niah.json").write_text(json.dumps(result, indent=1) + "\n")
        result["heatmap"] = str(heatmap(result, out / "niah.png")) if _has_matplotlib() else None
        if result["heatmap"] is None:
            logger.warning("matplotlib is not installed: no heatmap (pip install matplotlib); the grid is in %s",
                           out / "niah.json")
    return result


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def heatmap(result: dict, path: Path) -> Path:
    """Accuracy heatmap: context length (x) by needle depth (y), as in the usual NIAH figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.tensor(result["accuracy"]).T.numpy()  # (depths, lengths)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(result["lengths"]), 1.0 + 0.5 * len(result["depths"])))
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
    ax.set_yticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(f"needle in a haystack ({result['trials']} trials per cell)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args) -> int:
    from transxssm_megatron.hf.loading import load_causal_lm

    model, tokenizer, folder = load_causal_lm(args.model, device=args.device, dtype=args.dtype)
    haystack = read_haystack(args.haystack) if args.haystack else None
    out = Path(args.out) if args.out else Path("runs") / "niah" / Path(args.model).resolve().name
    result = run_niah(model, tokenizer, lengths=args.lengths, depths=args.depths, trials=args.trials,
                      haystack=haystack, seed=args.seed, out=out)
    width = max(len(str(n)) for n in result["lengths"]) + 2
    print("depth \\ length".ljust(16) + "".join(str(n).rjust(width) for n in result["lengths"]))
    for j, depth in enumerate(result["depths"]):
        print(f"{depth:>14.0%}  " + "".join(f"{result['accuracy'][i][j]:>{width}.2f}"
                                              for i in range(len(result["lengths"]))))
    print(f"[niah] mean accuracy {result['mean_accuracy']:.3f}; {out / 'niah.json'}"
          + (f", {result['heatmap']}" if result.get("heatmap") else " (no heatmap: matplotlib missing)"))
    return 0
