#!/usr/bin/env bash
# Static checks from the project's virtual environment (.venv, made by hack/install-deps.sh):
# lint, formatting, types, and the import contract (handlers -> backends -> ... never upward).
# Each tool reads its own configuration from pyproject.toml. Stops at the first failing check
# and names it. Extra arguments are not taken: the checks cover the whole project.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
if ! [ -x "$bin/ruff" ] || ! [ -x "$bin/mypy" ] || ! [ -x "$bin/lint-imports" ]; then
  echo "hack/check.sh: the tools are not in .venv; run hack/install-deps.sh first" >&2
  exit 2
fi

check() {
  local name=$1; shift
  echo "== $name: $*"
  if ! "$@"; then
    echo "hack/check.sh: FAILED: $name ($*)" >&2
    exit 1
  fi
}

check "ruff check" "$bin/ruff" check .
check "ruff format" "$bin/ruff" format --check .
# mypy's targets: those its configuration names (files/packages/modules), else the package.
mypy_targets=$("$bin/python" - <<'PY'
import tomllib
mypy = tomllib.load(open("pyproject.toml", "rb")).get("tool", {}).get("mypy", {})
print("" if any(key in mypy for key in ("files", "packages", "modules")) else "operator/analysis_operator")
PY
)
check "mypy" "$bin/mypy" $mypy_targets
check "import contract" "$bin/lint-imports"
echo "hack/check.sh: all checks passed"
