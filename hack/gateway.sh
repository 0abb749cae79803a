#!/usr/bin/env bash
# A real Gateway API gateway for the local stack: Traefik (built by hack/build.sh) as a process
# beside the API server of hack/cluster.sh, on 127.0.0.1 only, with its Gateway API provider and
# its CRD provider (Middleware, for forward-auth through an HTTPRoute's ExtensionRef filter).
# What was checked about it (routes, forward-auth, timings): hack/gateway.md.
#
#   hack/gateway.sh up      CRDs, RBAC, GatewayClass `traefik`, Gateway analysis-gateway/analysis;
#                           start Traefik, wait until the Gateway is Programmed
#   hack/gateway.sh down    stop Traefik (by PID); the Kubernetes objects stay
#   hack/gateway.sh env     the exports for the operator: eval "$(hack/gateway.sh env)"
#   hack/gateway.sh status  whether Traefik runs
#
# The cluster must be up (hack/cluster.sh up) with the same CLUSTER_STATE_DIR and PORT_OFFSET.
# State (token, PID, log) in $CLUSTER_STATE_DIR/gateway. GATEWAY_PORT (default 8000) + PORT_OFFSET.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
CLUSTER=${CLUSTER_STATE_DIR:-/tmp/analysis-operator-cluster}
STATE=$CLUSTER/gateway
PORT_OFFSET=${PORT_OFFSET:-0}
API_PORT=$((${API_PORT:-6443} + PORT_OFFSET))
GATEWAY_PORT=$((${GATEWAY_PORT:-8000} + PORT_OFFSET))
NAMESPACE=analysis-gateway
GATEWAY=analysis
# How long Traefik's ServiceAccount token lives (it reads it once, at start).
TOKEN_DURATION=${GATEWAY_TOKEN_DURATION:-8760h}

log() { printf '[gateway] %s\n' "$*" >&2; }

running() { [ -f "$STATE/traefik.pid" ] && kill -0 "$(cat "$STATE/traefik.pid")" 2>/dev/null; }

stop() {  # TERM Traefik's process group, then KILL
  local pid
  [ -f "$STATE/traefik.pid" ] || return 0
  pid=$(cat "$STATE/traefik.pid")
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$STATE/traefik.pid"
}

apply_objects() {
  local crds=$1
  # Gateway API's standard channel (the version Traefik is built against) and Traefik's own CRDs.
  kubectl apply --server-side --force-conflicts --field-manager=analysis-gateway \
    -f "$crds"/gateway.networking.k8s.io_gatewayclasses.yaml -f "$crds"/gateway.networking.k8s.io_gateways.yaml \
    -f "$crds"/gateway.networking.k8s.io_httproutes.yaml -f "$crds"/gateway.networking.k8s.io_grpcroutes.yaml \
    -f "$crds"/gateway.networking.k8s.io_referencegrants.yaml \
    -f "$crds"/gateway.networking.k8s.io_backendtlspolicies.yaml \
    -f "$crds"/kubernetes-crd-definition-v1.yml >/dev/null
  kubectl wait --for=condition=Established --timeout=60s crd/gatewayclasses.gateway.networking.k8s.io \
    crd/gateways.gateway.networking.k8s.io crd/httproutes.gateway.networking.k8s.io \
    crd/middlewares.traefik.io >/dev/null
  # RBAC: what Traefik's docs give its two providers (kubernetes-gateway-rbac.yml and
  # kubernetes-crd-rbac.yml in $crds), without Ingress (that provider is off) and pods (OTel only).
  # Both providers read Services, EndpointSlices, Secrets and ConfigMaps in every namespace.
  kubectl apply --server-side --force-conflicts --field-manager=analysis-gateway -f - >/dev/null <<YAML
apiVersion: v1
kind: Namespace
metadata: {name: $NAMESPACE}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: traefik, namespace: $NAMESPACE}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: analysis-gateway-traefik}
rules:
- apiGroups: [""]
  resources: [namespaces, nodes]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [services, secrets, configmaps]
  verbs: [get, list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
- apiGroups: [gateway.networking.k8s.io]
  resources: [gatewayclasses, gateways, httproutes, grpcroutes, tcproutes, tlsroutes, referencegrants,
              backendtlspolicies]
  verbs: [get, list, watch]
- apiGroups: [gateway.networking.k8s.io]
  resources: [gatewayclasses/status, gateways/status, httproutes/status, grpcroutes/status,
              tcproutes/status, tlsroutes/status, referencegrants/status, backendtlspolicies/status]
  verbs: [update]
- apiGroups: [traefik.io]
  resources: [middlewares, middlewaretcps, ingressroutes, traefikservices, ingressroutetcps,
              ingressrouteudps, tlsoptions, tlsstores, serverstransports, serverstransporttcps]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: analysis-gateway-traefik}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: analysis-gateway-traefik}
subjects:
- {kind: ServiceAccount, name: traefik, namespace: $NAMESPACE}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: traefik}
spec:
  controllerName: traefik.io/gateway-controller
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: $GATEWAY, namespace: $NAMESPACE}
spec:
  gatewayClassName: traefik
  listeners:
  - name: web
    protocol: HTTP
    port: $GATEWAY_PORT      # must equal the port of Traefik's entrypoint
    allowedRoutes:
      namespaces: {from: All}
YAML
}

write_default_certificate() {
  # Without a default certificate Traefik generates a 2048-bit RSA key pair on every configuration
  # change (its TLS manager, even with no TLS entrypoint): 0.1-1 s of CPU per route change on this
  # machine, which made a burst of 30 route changes take ~2 s. A self-signed ECDSA one, made once.
  [ -s "$STATE/default.crt" ] || {
    (umask 077; openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
      -subj /CN=analysis-gateway-default -keyout "$STATE/default.key" -out "$STATE/default.crt.tmp" 2>/dev/null)
    mv "$STATE/default.crt.tmp" "$STATE/default.crt"
  }
  cat >"$STATE/dynamic.yaml" <<YAML
tls:
  stores:
    default:
      defaultCertificate: {certFile: "$STATE/default.crt", keyFile: "$STATE/default.key"}
YAML
}

up() {
  if running; then log "already up on 127.0.0.1:$GATEWAY_PORT"; return; fi
  [ -f "$CLUSTER/bin" ] && [ -f "$CLUSTER/kubeconfig" ] || { log "the cluster is not up (hack/cluster.sh up)"; exit 1; }
  local bin; bin=$(cat "$CLUSTER/bin")
  [ -x "$bin/traefik" ] || "$here/build.sh" >/dev/null
  local crds; crds=$(dirname "$(readlink -f "$bin/traefik")")/crds
  export PATH="$bin:$PATH" KUBECONFIG=$CLUSTER/kubeconfig
  kubectl get --raw /readyz >/dev/null 2>&1 || { log "the cluster is not up (hack/cluster.sh up)"; exit 1; }
  # Traefik keeps running when it cannot bind its entrypoint; the readiness check below must not
  # be answered by whatever else listens there.
  if curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$GATEWAY_PORT/"; then
    log "127.0.0.1:$GATEWAY_PORT is in use (another stack? set PORT_OFFSET or GATEWAY_PORT)"; exit 1
  fi
  mkdir -p "$STATE"
  apply_objects "$crds"
  # A fresh token each start (a new cluster has a new ServiceAccount). Traefik reads the file named
  # by --providers.*.token (a path or the token itself), so the token is not on its command line.
  (umask 077; kubectl -n "$NAMESPACE" create token traefik --duration="$TOKEN_DURATION" >"$STATE/token.tmp")
  mv "$STATE/token.tmp" "$STATE/token"
  write_default_certificate

  local k8s=(--endpoint="https://127.0.0.1:$API_PORT" --token="$STATE/token"
             --certAuthFilePath="$CLUSTER/pki/ca.crt" --throttleDuration=0s)
  local args=(--global.checkNewVersion=false --global.sendAnonymousUsage=false --log.level="${GATEWAY_LOG_LEVEL:-INFO}" --log.noColor=true
              --entryPoints.web.address="127.0.0.1:$GATEWAY_PORT"
              # Apply a provider's new configuration at most every 100 ms (default 2 s): a new route
              # is served within about a second of its HTTPRoute (hack/gateway.md).
              --providers.providersThrottleDuration=100ms
              --providers.file.filename="$STATE/dynamic.yaml" --providers.file.watch=false
              --providers.kubernetesgateway=true
              --providers.kubernetesgateway.statusAddress.ip=127.0.0.1
              --providers.kubernetescrd=true)
  local a
  for a in "${k8s[@]}"; do args+=("--providers.kubernetesgateway.${a#--}" "--providers.kubernetescrd.${a#--}"); done
  printf '%q ' "$bin/traefik" "${args[@]}" >"$STATE/traefik.cmd"
  # With KUBECONFIG (or the in-cluster variables) set, Traefik would use those instead of the token.
  env -u KUBECONFIG -u KUBERNETES_SERVICE_HOST -u KUBERNETES_SERVICE_PORT \
    setsid "$bin/traefik" "${args[@]}" >>"$STATE/traefik.log" 2>&1 </dev/null &
  echo $! >"$STATE/traefik.pid"

  local deadline=$((SECONDS + 60))
  until kubectl -n "$NAMESPACE" get gateway "$GATEWAY" \
          -o jsonpath='{.status.conditions[?(@.type=="Programmed")].status}' 2>/dev/null | grep -qx True &&
        [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$GATEWAY_PORT/")" = 404 ]; do
    if ! running; then log "traefik exited (log: $STATE/traefik.log)"; exit 1; fi
    if ((SECONDS > deadline)); then log "timed out waiting for the Gateway (log: $STATE/traefik.log)"; exit 1; fi
    sleep 0.2
  done
  log "up: Gateway $NAMESPACE/$GATEWAY on http://127.0.0.1:$GATEWAY_PORT (eval \"\$(hack/gateway.sh env)\")"
}

case "${1:-}" in
  up) up ;;
  down) stop; log "down" ;;
  env)
    echo "export ANALYSIS_OPERATOR_GATEWAY_NAME=$GATEWAY"
    echo "export ANALYSIS_OPERATOR_GATEWAY_NAMESPACE=$NAMESPACE"
    echo "export ANALYSIS_OPERATOR_GATEWAY_URL=http://127.0.0.1:$GATEWAY_PORT"
    echo "export ANALYSIS_OPERATOR_GATEWAY_PROBE_URL=http://127.0.0.1:$GATEWAY_PORT" ;;
  status) running && echo "traefik running" || echo "traefik stopped" ;;
  *) echo "usage: $0 up|down|env|status" >&2; exit 2 ;;
esac
