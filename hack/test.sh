#!/usr/bin/env bash
# The whole test suite: unit tests, then integration tests against the real
# servers (Kubernetes, Slurm, OpenStack), which the pytest fixtures start and
# stop. Extra arguments go to pytest (e.g. hack/test.sh tests/unit).
# pytest runs from the project's virtual environment (.venv, made by install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
hack/install-deps.sh
exec .venv/bin/python -m pytest -p no:cacheprovider -q "${@:-tests}"
