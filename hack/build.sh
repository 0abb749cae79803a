#!/usr/bin/env bash
# Builds the Go test binaries the local stack needs into a cache outside the
# repo, keyed by version, and prints nothing else. Safe to run repeatedly:
# what is already built is kept.
#   testcluster (etcd 3.6, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl)
#   kwok        (simulated nodes)
#   helm        (the chart tests), in its own versioned directory, linked into BIN
#   traefik     (the Gateway API gateway, hack/gateway.sh) with the CRDs it needs, in its own
#               versioned directory, linked into BIN
# One build at a time (a lock in CACHE): two stacks started side by side do not
# build the same thing twice, nor two Go builds at once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
K8S_VERSION=${K8S_VERSION:-v1.36.2}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
HELM_VERSION=${HELM_VERSION:-v3.22.0}
TRAEFIK_VERSION=${TRAEFIK_VERSION:-v3.6.12}
# The Gateway API version Traefik is built against (its go.mod); its standard CRDs are installed.
GATEWAY_API_VERSION=${GATEWAY_API_VERSION:-v1.4.0}
CACHE=${ANALYSIS_OPERATOR_CACHE:-$HOME/.cache/analysis-operator}
# Bump STACK_REVISION when hack/testcluster changes, so caches rebuild.
STACK_REVISION=2
BIN="$CACHE/bin-r$STACK_REVISION-k8s-$K8S_VERSION-kwok-$KWOK_VERSION"
mkdir -p "$BIN"
exec 9>"$CACHE/.build.lock"
flock 9
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod

build_testcluster() {
  [ -x "$BIN/testcluster" ] && return
  echo "building kube-apiserver/controller-manager/scheduler/kubectl $K8S_VERSION (about 5 min cold)" >&2
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local pkg=k8s.io/component-base/version modfile=go.mod
  # Another Kubernetes release than go.mod's (the oldest and newest the project supports, for
  # tests/versions/): its own module file beside it, k8s-<version>.mod and .sum.
  if ! grep -q "^	k8s.io/kubernetes $K8S_VERSION$" "$here/testcluster/go.mod"; then
    modfile=k8s-$K8S_VERSION.mod
    [ -f "$here/testcluster/$modfile" ] || { echo "build.sh: no hack/testcluster/$modfile for $K8S_VERSION" >&2; exit 1; }
  fi
  (cd "$here/testcluster" && go build -modfile "$modfile" -trimpath -o "$BIN/testcluster.tmp" -ldflags "-s -w \
      -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor \
      -X $pkg.gitTreeState=clean" .)
  mv "$BIN/testcluster.tmp" "$BIN/testcluster"
}

build_kwok() {
  [ -x "$BIN/kwok" ] && return
  echo "building kwok $KWOK_VERSION" >&2
  GOBIN="$BIN" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
}

kwok_stages() {
  # KWOK's own "fast" stages (nodes Ready, pods Running and deleted at once),
  # taken from the module just built, for `kwok --config`.
  [ -s "$BIN/kwok-stages.yaml" ] && return
  local dir stage
  dir=$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  for stage in node/fast/node-initialize node/heartbeat/node-heartbeat pod/fast/pod-ready \
               pod/fast/pod-complete pod/fast/pod-delete; do
    echo "---"; cat "$dir/kustomize/stage/$stage.yaml"
  done >"$BIN/kwok-stages.yaml.tmp"
  mv "$BIN/kwok-stages.yaml.tmp" "$BIN/kwok-stages.yaml"
}

build_helm() {
  # Its own directory, so a new helm does not rebuild Kubernetes (and back).
  local dir="$CACHE/helm-$HELM_VERSION"
  if [ ! -x "$dir/helm" ]; then
    echo "building helm $HELM_VERSION (about 2 min cold)" >&2
    mkdir -p "$dir"
    GOBIN="$dir" go install -trimpath -ldflags "-s -w \
        -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  fi
  ln -sfn "$dir/helm" "$BIN/helm"
}

module_dir() {  # module_dir MODULE@VERSION: its read-only directory in the module cache
  go mod download -json "$1" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p'
}

build_traefik() {
  # Its own directory, like helm. `go install traefik@v` refuses Traefik's replace directives, so
  # it is built from a writable copy of the module. v3.7 cannot be built from the module proxy (its
  # go.mod replaces a nested module the zip leaves out); v3.6 can.
  # -qps: Traefik's Kubernetes client at 100 requests/s instead of client-go's 5 (not configurable by
  # flag): it writes each new route's status before using it, so at 5/s a burst of new routes waits
  # minutes (hack/gateway.md, e.). A facility's Traefik needs the same for bursts of environments.
  local dir="$CACHE/traefik-$TRAEFIK_VERSION-qps" src tmp
  if [ ! -x "$dir/traefik" ] || [ ! -s "$dir/crds/.complete" ]; then
    mkdir -p "$dir"; rm -rf "$dir"/src.*   # a copy left by an interrupted build (we hold the lock)
    src=$(module_dir "github.com/traefik/traefik/v3@$TRAEFIK_VERSION")
    tmp=$(mktemp -d "$dir/src.XXXXXX")
    cp -r "$src/." "$tmp/"
    chmod -R u+w "$tmp"
    local client="$tmp/pkg/provider/kubernetes/gateway/client.go"
    sed -i 's/^func createClientFromConfig(c \*rest.Config) (\*clientWrapper, error) {$/&\n\tc.QPS, c.Burst = 100, 200/' "$client"
    grep -q 'c.QPS, c.Burst = 100, 200' "$client" || { echo "build.sh: could not raise Traefik's client QPS" >&2; exit 1; }
    if [ ! -x "$dir/traefik" ]; then
      echo "building traefik $TRAEFIK_VERSION (about 5 min cold)" >&2
      (cd "$tmp" && go build -trimpath -ldflags "-s -w \
          -X github.com/traefik/traefik/v3/pkg/version.Version=$TRAEFIK_VERSION" \
          -o "$dir/traefik.tmp" ./cmd/traefik)
      mv "$dir/traefik.tmp" "$dir/traefik"
    fi
    # The CRDs and RBAC hack/gateway.sh applies: Gateway API's standard channel, Traefik's own
    # (Middleware, ...) and the ClusterRoles Traefik's docs give for its two Kubernetes providers.
    rm -rf "$dir/crds.tmp"; mkdir -p "$dir/crds.tmp"
    cp "$(module_dir "sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION")"/config/crd/standard/*.yaml "$dir/crds.tmp/"
    local ref="$tmp/docs/content/reference/dynamic-configuration"
    cp "$ref/kubernetes-crd-definition-v1.yml" "$ref/kubernetes-crd-rbac.yml" \
       "$ref/kubernetes-gateway-rbac.yml" "$dir/crds.tmp/"
    echo "gateway-api $GATEWAY_API_VERSION traefik $TRAEFIK_VERSION" >"$dir/crds.tmp/.complete"
    chmod -R u+w "$dir/crds.tmp"
    rm -rf "$dir/crds" "$tmp"; mv "$dir/crds.tmp" "$dir/crds"
  fi
  ln -sfn "$dir/traefik" "$BIN/traefik"
}

build_testcluster
build_kwok
kwok_stages
build_helm
build_traefik
for c in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  printf '#!/bin/sh\nexec "%s/testcluster" %s "$@"\n' "$BIN" "$c" > "$BIN/$c"
  chmod +x "$BIN/$c"
done
echo "$BIN"
