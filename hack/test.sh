#!/usr/bin/env bash
# The whole test suite: the checks (hack/check.sh: ruff lint and format, mypy,
# the import contract), then unit tests and integration tests against the real
# servers (Kubernetes, Slurm, OpenStack), which the pytest fixtures start and
# stop. Extra arguments go to pytest (e.g. hack/test.sh tests/unit).
# pytest runs from the project's virtual environment (.venv, made by install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
hack/install-deps.sh
hack/check.sh
exec .venv/bin/python -m pytest -p no:cacheprovider -q "${@:-tests}"
