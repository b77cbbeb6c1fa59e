#!/usr/bin/env bash
# The whole fault and abuse suite (docs/RELIABILITY.md): installs schemathesis from PyPI
# into a virtualenv under ~/.cache/herald-faults (never system-wide), then runs
# tests/faults/ with HERALD_FULL_FAULTS=1 (24 SIGKILL rounds, 10x the fuzz cases)
# and --include-ignored (etcd outage, the 10-minute soak, schemathesis) through
# tests/run.sh, which starts and stops the control plane.
#   tests/faults/run-all.sh                 # everything, about 25 minutes on 2 cores
#   HERALD_FAULTS_SEED=7 tests/faults/run-all.sh soak   # extra args: a test name filter
# Environment: HERALD_FAULTS_SEED (replay a seed), HERALD_SOAK_SECONDS (default 600),
# HERALD_SCHEMATHESIS (a schemathesis binary to use instead of the virtualenv's).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

if [ -z "${HERALD_SCHEMATHESIS:-}" ]; then
  venv=${XDG_CACHE_HOME:-$HOME/.cache}/herald-faults/venv
  if [ ! -x "$venv/bin/schemathesis" ]; then
    echo "installing schemathesis into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet 'schemathesis>=4,<5'
  fi
  export HERALD_SCHEMATHESIS=$venv/bin/schemathesis
fi

export HERALD_FULL_FAULTS=1
exec tests/run.sh --test faults -- --include-ignored --nocapture "$@"
