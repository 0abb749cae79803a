#!/usr/bin/env bash
# Builds bench/goraw (the Go raw client bench/run.py measures the operator against) into the
# same cache outside the repo as hack/build.sh's binaries, keyed by a hash of its sources, and
# prints the binary's path and nothing else. Safe to run repeatedly: a build of the same sources
# is kept. Not part of hack/install-deps.sh: only bench/run.py --go-raw needs it, and builds it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src=$(dirname "$here")/bench/goraw
CACHE=${ANALYSIS_OPERATOR_CACHE:-$HOME/.cache/analysis-operator}
hash=$(cd "$src" && cat go.mod go.sum $(ls *.go | sort) | sha256sum | cut -c1-16)
dir="$CACHE/goraw-$hash"
if [ ! -x "$dir/goraw" ]; then
  mkdir -p "$dir"
  exec 9>"$CACHE/.build.lock"   # hack/build.sh's lock: one Go build at a time
  flock 9
  if [ ! -x "$dir/goraw" ]; then
    echo "building bench/goraw ($hash; about 1 min cold)" >&2
    (cd "$src" && GOTOOLCHAIN=local CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "-s -w" \
        -o "$dir/goraw.tmp" .)
    mv "$dir/goraw.tmp" "$dir/goraw"
  fi
fi
echo "$dir/goraw"
