#!/usr/bin/env bash
# The test command: set up (tools/setup.sh), then run the whole suite.  As root the network-
# namespace lab and strongSwan interoperability tests run too; in CI (CI=true) they are required.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
