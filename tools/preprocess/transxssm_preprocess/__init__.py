"""Corpus preprocessing for transxssm-megatron: text corpora -> megatron-core indexed datasets (.bin/.idx).

Public API (imported lazily so `import transxssm_preprocess.assets` stays cheap):
    preprocess(...)          tokenize inputs into PREFIX.bin/.idx + PREFIX.stats.json   (pipeline.py)
    validate_dataset(...)    check a .bin/.idx pair                                      (validate.py)
    check_dataset(...)       the structural checks training shares with validate          (integrity.py)
    build_blend(...)         weighted prefixes -> megatron blend format                  (blend.py)
    build_assets(...)        offline tokenizer / eval sets / sample corpus folder        (assets.py)
"""

__version__ = "0.1.0"

_LAZY = {
    "preprocess": "pipeline",
    "validate_dataset": "validate",
    "check_dataset": "integrity",
    "build_blend": "blend",
    "build_assets": "assets",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
