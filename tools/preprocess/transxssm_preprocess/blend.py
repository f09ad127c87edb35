"""Weighted dataset prefixes -> megatron-core's blend format.

megatron-core's BlendedMegatronDatasetConfig takes ``blend=(prefixes, weights)`` (weights None = by size) or
``blend_per_split=[train_blend, valid_blend, test_blend]``; Megatron-LM's command line spells the same thing as a
flat list ``["30", "path/a", "70", "path/b"]``. This module accepts either spelling, or a mapping, checks that
every prefix has its .bin and .idx, and returns the tuple megatron expects.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

Blend = tuple[list[str], list[float] | None]


class BlendError(ValueError):
    """A blend entry is malformed; the message names it."""


def _weights_from_tokens(prefixes: list[str]) -> list[float]:
    weights = []
    for prefix in prefixes:
        stats = Path(f"{prefix}.stats.json")
        if not stats.is_file():
            raise BlendError(f"weight 'tokens' for {prefix}: no {stats} (written by `transxssm-preprocess run`)")
        weights.append(float(json.loads(stats.read_text())["tokens"]))
    return weights


def build_blend(spec, *, check_files: bool = True, normalize: bool = True) -> Blend:
    """Return ``(prefixes, weights)`` for megatron's ``blend`` argument.

    spec: one of
      - a mapping {prefix: weight}
      - a sequence of (prefix, weight) pairs or {"prefix": ..., "weight": ...} dicts
      - Megatron-LM's flat list ["w1", "prefix1", "w2", "prefix2", ...], or a list of prefixes (weights None)
    A weight may be the string "tokens": the token count from PREFIX.stats.json (natural proportions).
    Weights must be finite and > 0; with ``normalize`` they are scaled to sum to 1.
    """
    pairs: list[tuple[str, object]]
    if isinstance(spec, Mapping):
        pairs = list(spec.items())
    elif isinstance(spec, (str, os.PathLike)):
        pairs = [(os.fspath(spec), None)]
    elif isinstance(spec, Sequence):
        items = list(spec)
        if items and all(isinstance(x, Mapping) for x in items):
            try:
                pairs = [(x["prefix"], x.get("weight")) for x in items]
            except KeyError as e:
                raise BlendError(f"blend entry without 'prefix': {e}") from e
        elif items and all(isinstance(x, (tuple, list)) and len(x) == 2 for x in items):
            pairs = [(os.fspath(p), w) for p, w in items]
        elif items and len(items) % 2 == 0 and all(_is_weight(items[i]) for i in range(0, len(items), 2)):
            pairs = [(os.fspath(items[i + 1]), items[i]) for i in range(0, len(items), 2)]
        else:
            pairs = [(os.fspath(p), None) for p in items]
    else:
        raise BlendError(f"unsupported blend spec of type {type(spec).__name__}")
    if not pairs:
        raise BlendError("empty blend")
    prefixes = [str(p) for p, _ in pairs]
    if len(set(prefixes)) != len(prefixes):
        raise BlendError(f"a prefix appears twice in the blend: {prefixes}")
    if check_files:
        for prefix in prefixes:
            missing = [s for s in (".bin", ".idx") if not Path(prefix + s).is_file()]
            if missing:
                raise BlendError(f"blend prefix {prefix}: missing {' and '.join(prefix + s for s in missing)}; "
                                 "run `transxssm-preprocess run` first")
    raw = [w for _, w in pairs]
    if all(w is None for w in raw):
        return prefixes, None
    if any(w is None for w in raw):
        raise BlendError("give a weight for every prefix or for none")
    weights: list[float] = []
    token_weights = None
    for prefix, w in pairs:
        if w == "tokens":
            token_weights = token_weights or dict(zip(prefixes, _weights_from_tokens(prefixes)))
            value = token_weights[prefix]
        else:
            try:
                value = float(w)
            except (TypeError, ValueError) as e:
                raise BlendError(f"blend prefix {prefix}: weight {w!r} is not a number") from e
        if not math.isfinite(value) or value <= 0:
            raise BlendError(f"blend prefix {prefix}: weight {w!r} must be finite and > 0")
        weights.append(value)
    if normalize:
        total = sum(weights)
        weights = [w / total for w in weights]
    return prefixes, weights


def _is_weight(x) -> bool:
    if x == "tokens":
        return True
    try:
        float(x)
        return not isinstance(x, bool)
    except (TypeError, ValueError):
        return False


def to_megatron_args(blend: Blend) -> list[str]:
    """The flat ``--data-path`` list Megatron-LM's command line takes for the same blend."""
    prefixes, weights = blend
    if weights is None:
        return list(prefixes)
    return [x for w, p in zip(weights, prefixes) for x in (repr(float(w)), p)]
