#!/usr/bin/env bash
# The demo command: set up (tools/setup.sh), then run the live lab demo in network namespaces
# (as root) or, without root, the same handover in mipsec's in-memory network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/mipsec demo "$@"
