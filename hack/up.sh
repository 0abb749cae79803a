#!/usr/bin/env bash
# The local stack with the operator, and an environment going Ready.
#
#   hack/up.sh            Kubernetes (built from source, KWOK nodes) + Slurm + the gateway + operator
#   hack/up.sh --vm       ... and OpenStack (about 30 s more, 2 GB of RAM)
#   hack/up.sh down       stop everything it started
#
# Afterwards: eval "$(hack/cluster.sh env)"; kubectl get aenv -A
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
STATE=${OPERATOR_STATE_DIR:-/tmp/analysis-operator-run}
mkdir -p "$STATE"

if [ "${1:-}" = down ]; then
  [ -f "$STATE/operator.pid" ] && kill "$(cat "$STATE/operator.pid")" 2>/dev/null || true
  rm -f "$STATE/operator.pid"
  "$here/openstack.sh" down >/dev/null 2>&1 || true
  "$here/slurm.sh" down >/dev/null 2>&1 || true
  "$here/gateway.sh" down >/dev/null 2>&1 || true
  "$here/cluster.sh" down
  exit 0
fi

"$here/install-deps.sh"
"$here/cluster.sh" up
eval "$("$here/cluster.sh" env)"
"$here/slurm.sh" up >/dev/null
eval "$("$here/slurm.sh" env)"
# OPEN: Traefik as the Gateway API gateway on 127.0.0.1:8000, and a stand-in for the facility's
# identity provider (hack/identity.py) whose keys the operator verifies sessions against.
"$here/gateway.sh" up >/dev/null
eval "$("$here/gateway.sh" env)"
"$repo/.venv/bin/python" "$here/identity.py" init "$STATE/identity"
eval "$("$repo/.venv/bin/python" "$here/identity.py" env "$STATE/identity")"
export ANALYSIS_OPERATOR_GATEWAY_ENABLED=true ANALYSIS_OPERATOR_GATEWAY_AUTH_LISTEN_ADDRESS=127.0.0.1 \
  ANALYSIS_OPERATOR_GATEWAY_AUTH_PORT=9100 ANALYSIS_OPERATOR_GATEWAY_AUTH_URL=http://127.0.0.1:9100/authorize
if [ "${1:-}" = --vm ]; then
  "$here/openstack.sh" up >/dev/null
  eval "$("$here/openstack.sh" env)"
  export ANALYSIS_OPERATOR_OPENSTACK_ENABLED=true
fi

kubectl apply --server-side --force-conflicts -f "$repo/crds" >/dev/null
kubectl wait --for=condition=Established --timeout=60s crd --all >/dev/null
kubectl apply -f "$repo/deploy/authorization" >/dev/null   # who may change or delete environments
# The catalogue: flavors (portal cards), experiment teams and datasets, budgets (alice has one).
kubectl apply -f "$repo/examples/flavors.yaml" -f "$repo/examples/datasets.yaml" -f "$repo/examples/budgets.yaml" >/dev/null
kubectl apply -f "$repo/examples/users.yaml" >/dev/null   # the directory: POSIX identities (FacilityUser)
kubectl get environmentflavors

if ! { [ -f "$STATE/operator.pid" ] && kill -0 "$(cat "$STATE/operator.pid")" 2>/dev/null; }; then
  # Webhooks on loopback, registered by the operator itself with a CA it makes in $STATE.
  # Python on jemalloc, as the image runs it (Dockerfile). This checkout's code, whatever
  # checkout the virtual environment's editable install points at (as the tests run it).
  PYTHONMALLOC=malloc LD_PRELOAD=libjemalloc.so.2 PYTHONPATH="$repo/operator" \
  ANALYSIS_OPERATOR_LIVENESS_ENDPOINT=http://127.0.0.1:8080/healthz ANALYSIS_OPERATOR_METRICS_ADDRESS=127.0.0.1 \
  ANALYSIS_OPERATOR_ADMISSION_HOST=127.0.0.1 ANALYSIS_OPERATOR_ADMISSION_LISTEN_ADDRESS=127.0.0.1 \
  ANALYSIS_OPERATOR_ADMISSION_PORT=9443 ANALYSIS_OPERATOR_ADMISSION_CERT_DIR="$STATE/webhook-tls" \
    setsid "$repo/.venv/bin/analysis-operator" --log-format json >"$STATE/operator.log" 2>&1 < /dev/null &
  echo $! >"$STATE/operator.pid"
  until curl -sf http://127.0.0.1:8080/healthz >/dev/null; do sleep 0.2; done
  until kubectl get validatingwebhookconfiguration analysis.panosc.eu -o jsonpath='{.webhooks[*].name}' 2>/dev/null \
      | grep -q environment-admission; do sleep 0.2; done
  echo "operator running (pid $(cat "$STATE/operator.pid"), logs in $STATE/operator.log)"
fi

kubectl apply -f "$repo/examples/environment.yaml"
kubectl wait --for=jsonpath='{.status.phase}'=Ready --timeout=120s analysisenvironment/demo >/dev/null
kubectl get analysisenvironments
kubectl get pods,services,secrets -l app.kubernetes.io/managed-by=analysis-operator
events=$(kubectl get events --field-selector involvedObject.kind=AnalysisEnvironment 2>/dev/null || true)
echo "${events:-No Events: an environment Ready within 15 s has none, its status says it all (README, \"What the operator writes back\")}"
cat <<TXT

The local stack is up. In your shell:  eval "\$(hack/cluster.sh env)"
Try:  kubectl apply -f examples/environment-cluster.yaml   (JupyterLab in a Slurm job)
      kubectl get aenv -w
OPEN it as alice (the URL column of kubectl get aenv), signed in as the facility's SSO would:
      curl -H "Authorization: Bearer \$(.venv/bin/python hack/identity.py token $STATE/identity alice)" \\
           "\$(kubectl get aenv demo-cluster -o jsonpath='{.status.connection.url}' | sed 's#/lab\$#/api/status#')"
  In a browser: set the cookie aenv_session to that token for http://127.0.0.1:8000, then open the URL.
Stop: hack/up.sh down
TXT
