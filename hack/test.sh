#!/usr/bin/env bash
# The whole test suite: unit tests, then integration tests against the real
# servers (Kubernetes, Slurm, OpenStack), which the pytest fixtures start and
# stop. Extra arguments go to pytest (e.g. hack/test.sh tests/unit).
set -euo pipefail
cd "$(dirname "$0")/.."
hack/install-deps.sh
exec python3 -m pytest -p no:cacheprovider -q "${@:-tests}"
