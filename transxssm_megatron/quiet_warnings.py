"""Known third-party warnings that ask nothing of a user of `transxssm`, hidden at start (TRANSXSSM_SHOW_WARNINGS=1
shows them). Each is matched by its own text, so that a new or changed message still shows; our own messages never
go through these filters."""

from __future__ import annotations

import logging
import os
import warnings

_KNOWN_WARNINGS = [  # (category, message regex, regex of the module that warns)
    # megatron-core: optional packages we do not use, at import
    (UserWarning, r".*(Apex|Transformer Engine|absl).* (is|are) not installed", r"megatron\."),
    (UserWarning, r"MimoModelConfig is experimental", r"megatron\."),
    # megatron-core: its TransformerConfig's own default for cuda_graph_scope, at every model build
    (UserWarning, r"full scope is deprecated", r"megatron\."),
    # megatron-core's deprecations of its own internals (shown only under -W; one per layer and step)
    (DeprecationWarning, r".*", r"megatron\."),
    (FutureWarning, r".*", r"megatron\."),
    # torch.distributed.checkpoint, on every resume through megatron's dist_checkpointing loader
    (UserWarning, r"torch\.distributed is (disabled, )?unavailable or uninitialized, assuming the intent is to "
                  r"load in a single process", r"torch\.distributed\.checkpoint"),
    (UserWarning, r"The argument order of load has been changed", r"torch\.distributed\.checkpoint"),
]
_KNOWN_LOG_MESSAGES = {  # logger -> message prefixes
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),   # CPU machines, at import
    "megatron.core.dist_checkpointing.strategies.torch": ("MCore's async save is deprecated",),  # at save
    "megatron.core.datasets.gpt_dataset": ("Unable to save MockGPTDataset indexes",),  # data.mode=mock
}


class _DropKnownMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_LOG_FILTERS = {name: _DropKnownMessages(prefixes) for name, prefixes in _KNOWN_LOG_MESSAGES.items()}


def quiet_third_party_warnings() -> None:
    """Hide the known third-party warnings above for this process (and the workers it forks), unless
    TRANSXSSM_SHOW_WARNINGS=1."""
    if os.environ.get("TRANSXSSM_SHOW_WARNINGS", "") not in ("", "0"):
        return
    for category, message, module in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, log_filter in _LOG_FILTERS.items():
        logging.getLogger(name).addFilter(log_filter)  # the same object each call: added once
