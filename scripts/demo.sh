#!/usr/bin/env bash
# Set up (if needed) and run the main job on its embedded default. Extra arguments go to `transxssm demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/transxssm demo "$@"
