#!/usr/bin/env bash
# The local Kubernetes stack: etcd, kube-apiserver (RBAC on),
# kube-controller-manager, kube-scheduler and KWOK (simulated nodes, one with
# GPUs), all on 127.0.0.1, built from source by hack/build.sh.
#
#   hack/cluster.sh up      build what is missing, start everything, wait until ready
#   hack/cluster.sh down    stop everything this script started (by PID)
#   hack/cluster.sh env     print the exports (KUBECONFIG, PATH) for a shell: eval "$(hack/cluster.sh env)"
#   hack/cluster.sh status  what runs
#   hack/cluster.sh restart kube-apiserver   stop one component and start it again, state kept (chaos runs)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
STATE=${CLUSTER_STATE_DIR:-/tmp/analysis-operator-cluster}
ETCD_PORT=${ETCD_PORT:-23790}
API_PORT=${API_PORT:-6443}
# A second cluster side by side: set CLUSTER_STATE_DIR and PORT_OFFSET (e.g. 100).
PORT_OFFSET=${PORT_OFFSET:-0}
ETCD_PORT=$((ETCD_PORT + PORT_OFFSET)) API_PORT=$((API_PORT + PORT_OFFSET))
COMPONENTS="etcd kube-apiserver kube-controller-manager kube-scheduler kwok"

log() { printf '[cluster] %s\n' "$*" >&2; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then log "timed out waiting for $what (logs in $STATE/logs)"; exit 1; fi
    sleep 0.2
  done
}

running() { [ -f "$STATE/pids/$1" ] && kill -0 "$(cat "$STATE/pids/$1")" 2>/dev/null; }

start() {  # start NAME COMMAND...: in its own process group, logs and PID in $STATE
  local name=$1; shift
  mkdir -p "$STATE/cmd"
  printf '%q ' "$@" >"$STATE/cmd/$name"   # for `restart NAME` (chaos runs)
  setsid "$@" >>"$STATE/logs/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE/pids/$name"
}

stop_one() {  # stop_one NAME: TERM its process group, then KILL
  local name=$1 pid
  [ -f "$STATE/pids/$name" ] || return 0
  pid=$(cat "$STATE/pids/$name")
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$STATE/pids/$name"
}

restart_one() {  # restart NAME: the same command line again, state kept (e.g. kube-apiserver on its etcd)
  local name=$1
  [ -f "$STATE/cmd/$name" ] || { log "no recorded command for $name"; exit 1; }
  stop_one "$name"
  export PATH="$(cat "$STATE/bin"):$PATH" KUBE_FEATURE_WatchListClient=false
  eval "start $name $(cat "$STATE/cmd/$name")"
  if [ "$name" = kube-apiserver ]; then
    wait_for 60 kube-apiserver curl -sf --cacert "$STATE/pki/ca.crt" --cert "$STATE/pki/admin.crt" \
      --key "$STATE/pki/admin.key" "https://127.0.0.1:$API_PORT/readyz"
  fi
  log "restarted $name"
}

make_certs() {
  local pki=$STATE/pki
  [ -f "$pki/admin.crt" ] && return
  mkdir -p "$pki"; cd "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=analysis-operator-test-ca \
    -keyout ca.key -out ca.crt 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout apiserver.key -out apiserver.csr 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n' > san.ext
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile san.ext -out apiserver.crt 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=admin" -keyout admin.key -out admin.csr 2>/dev/null
  openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -out admin.crt 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  cd - >/dev/null
}

make_webhook_client_certs() {
  # The API server proves itself to the operator's webhooks with a client certificate from a CA of
  # its own (not the cluster CA, whose client certificates every user of the cluster holds).
  # ECDSA P-256: the API server signs with this key in every new connection to a webhook, which a
  # burst opens many of; an RSA-2048 key made that 8 % of its CPU (bench/logs/g6-profiles-stop31.md).
  local pki=$STATE/pki ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1)
  [ -f "$pki/webhook-client.crt" ] && return
  cd "$pki"
  openssl req -x509 "${ec[@]}" -nodes -days 3650 -subj /CN=analysis-operator-webhook-client-ca \
    -keyout webhook-client-ca.key -out webhook-client-ca.crt 2>/dev/null
  openssl req "${ec[@]}" -nodes -subj /CN=kube-apiserver-webhook-client \
    -keyout webhook-client.key -out webhook-client.csr 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' > client.ext
  openssl x509 -req -in webhook-client.csr -CA webhook-client-ca.crt -CAkey webhook-client-ca.key \
    -CAcreateserial -days 3650 -extfile client.ext -out webhook-client.crt 2>/dev/null
  cd - >/dev/null
}

write_admission_config() {
  # kube-apiserver's --admission-control-config-file: which client certificate it presents to webhooks.
  local pki=$STATE/pki dir=$STATE/admission
  mkdir -p "$dir"
  cat >"$dir/webhook-kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
users:
- name: "*"
  user: {client-certificate: "$pki/webhook-client.crt", client-key: "$pki/webhook-client.key"}
KUBECONFIG
  cat >"$dir/admission-config.yaml" <<CONFIG
apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
- name: ValidatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: "$dir/webhook-kubeconfig"
- name: MutatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: "$dir/webhook-kubeconfig"
CONFIG
}

write_kubeconfig() {
  local pki=$STATE/pki
  cat >"$STATE/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority: "$pki/ca.crt"}
users:
- name: admin
  user: {client-certificate: "$pki/admin.crt", client-key: "$pki/admin.key"}
contexts:
- name: local
  context: {cluster: local, user: admin, namespace: default}
current-context: local
KUBECONFIG
}

up() {
  if running kube-apiserver; then log "already up"; return; fi
  BIN=$("$here/build.sh")
  rm -rf "$STATE/etcd" "$STATE/logs" "$STATE/pids"
  mkdir -p "$STATE/logs" "$STATE/pids"
  echo "$BIN" >"$STATE/bin"
  make_certs
  make_webhook_client_certs
  write_admission_config
  write_kubeconfig
  local pki=$STATE/pki kubeconfig=$STATE/kubeconfig
  export PATH="$BIN:$PATH"
  # etcd 3.4 cannot serve watch-list streams; without this the clients wait for a fallback.
  export KUBE_FEATURE_WatchListClient=false

  start etcd etcd --name test --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls http://127.0.0.1:$((ETCD_PORT + 10)) --initial-advertise-peer-urls http://127.0.0.1:$((ETCD_PORT + 10)) \
    --initial-cluster test=http://127.0.0.1:$((ETCD_PORT + 10)) --unsafe-no-fsync
  wait_for 30 etcd curl -sf "http://127.0.0.1:$ETCD_PORT/health"

  start kube-apiserver kube-apiserver --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --secure-port="$API_PORT" --advertise-address=127.0.0.1 \
    --cert-dir="$STATE/pki" --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" --service-account-key-file="$pki/sa.pub" \
    --service-account-signing-key-file="$pki/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range=10.0.0.0/16 --authorization-mode=Node,RBAC --allow-privileged=true \
    --endpoint-reconciler-type=none --max-requests-inflight=1000 --max-mutating-requests-inflight=500 \
    --admission-control-config-file="$STATE/admission/admission-config.yaml"
  wait_for 60 kube-apiserver curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "https://127.0.0.1:$API_PORT/readyz"

  # No cloud here: its controllers off where the release still has them (1.37 dropped them).
  local controllers='*' known name
  known=$(kube-controller-manager --help 2>&1 | sed -n 's/.*All controllers: //p')
  for name in node-ipam-controller cloud-node-lifecycle-controller service-lb-controller node-route-controller; do
    case ", $known," in *", $name,"*) controllers="$controllers,-$name" ;; esac
  done
  start kube-controller-manager kube-controller-manager --kubeconfig="$kubeconfig" \
    --authentication-kubeconfig="$kubeconfig" --authorization-kubeconfig="$kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --secure-port=$((10257 + PORT_OFFSET)) \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --use-service-account-credentials=false \
    --controllers="$controllers" \
    --concurrent-gc-syncs=20 --kube-api-qps=200 --kube-api-burst=400
  start kube-scheduler kube-scheduler --kubeconfig="$kubeconfig" \
    --authentication-kubeconfig="$kubeconfig" --authorization-kubeconfig="$kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --secure-port=$((10259 + PORT_OFFSET))
  start kwok kwok --kubeconfig="$kubeconfig" --config="$BIN/kwok-stages.yaml" --manage-all-nodes=true \
    --server-address=127.0.0.1:$((10247 + PORT_OFFSET)) --cidr=10.10.0.0/16 --node-ip=127.0.0.1

  kubectl --kubeconfig="$kubeconfig" apply -f "$here/nodes.yaml" >/dev/null
  wait_for 60 "nodes Ready" sh -c "[ \$(kubectl --kubeconfig='$kubeconfig' get nodes --no-headers | grep -c ' Ready') -ge 3 ]"
  wait_for 60 "default ServiceAccount" kubectl --kubeconfig="$kubeconfig" -n default get serviceaccount default
  log "up: export KUBECONFIG=$kubeconfig (or: eval \"\$(hack/cluster.sh env)\")"
}

down() {
  local name
  for name in $(echo "$COMPONENTS" | tr ' ' '\n' | tac); do
    stop_one "$name"
  done
  log "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env)
    echo "export KUBECONFIG=$STATE/kubeconfig"
    # The operator's webhooks accept only the API server's client certificate.
    echo "export ANALYSIS_OPERATOR_ADMISSION_CLIENT_CA_FILE=$STATE/pki/webhook-client-ca.crt"
    [ -f "$STATE/bin" ] && echo "export PATH=$(cat "$STATE/bin"):\$PATH" ;;
  status) for name in $COMPONENTS; do running "$name" && echo "$name running" || echo "$name stopped"; done ;;
  restart) restart_one "${2:?usage: $0 restart COMPONENT}" ;;
  *) echo "usage: $0 up|down|env|status|restart COMPONENT" >&2; exit 2 ;;
esac
