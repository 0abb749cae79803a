#!/usr/bin/env bash
# Builds one of the Go programs the benchmarks measure the operator against (bench/goraw, the raw
# client bench/run.py races; bench/gowebhook, the webhook bench/budget_race.py --webhook go races)
# into the same cache outside the repo as hack/build.sh's binaries, keyed by a hash of its sources,
# and prints the binary's path and nothing else. Safe to run repeatedly: a build of the same
# sources is kept. Not part of hack/install-deps.sh: only those benchmarks need them, and build them.
#
#   hack/build-go-bench.sh goraw|gowebhook
set -euo pipefail
name=${1:?usage: $0 goraw|gowebhook}
here=$(cd "$(dirname "$0")" && pwd)
src=$(dirname "$here")/bench/$name
[ -f "$src/go.mod" ] || { echo "no Go program at bench/$name" >&2; exit 2; }
CACHE=${ANALYSIS_OPERATOR_CACHE:-$HOME/.cache/analysis-operator}
hash=$(cd "$src" && cat go.mod $(ls go.sum 2>/dev/null) $(ls *.go | sort) | sha256sum | cut -c1-16)
dir="$CACHE/$name-$hash"
if [ ! -x "$dir/$name" ]; then
  mkdir -p "$dir"
  exec 9>"$CACHE/.build.lock"   # hack/build.sh's lock: one Go build at a time
  flock 9
  if [ ! -x "$dir/$name" ]; then
    echo "building bench/$name ($hash; about 1 min cold)" >&2
    (cd "$src" && GOTOOLCHAIN=local CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "-s -w" \
        -o "$dir/$name.tmp" .)
    mv "$dir/$name.tmp" "$dir/$name"
  fi
fi
echo "$dir/$name"
