"""Shared pytest setup. The tests/ directory is put on sys.path by pytest (this conftest lives here), so test
modules import the helpers directly: `from distributed import run_distributed`."""

_QUIET = [
    "ignore:.*Transformer Engine and Apex are not installed.*:UserWarning",
    "ignore:.*absl.logging is not installed.*:UserWarning",
    "ignore:.*Apex is not installed.*:UserWarning",
    "ignore:.*imports from `dynamic_context.py` will be removed.*:DeprecationWarning",
]


def pytest_configure(config):
    for line in _QUIET:
        config.addinivalue_line("filterwarnings", line)
