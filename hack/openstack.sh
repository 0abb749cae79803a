#!/usr/bin/env bash
# A minimal but real OpenStack compute API on loopback, for tests and the
# local stack: MariaDB, RabbitMQ, keystone, placement, glance, neutron-server
# (API only) and nova (api, conductor, scheduler, compute with the fake virt
# driver, which reports 2 fake GPUs). Debian 12 "Zed" packages; see
# ../../shared/notes/openstack-local.md for why each odd setting is there.
#
#   hack/openstack.sh install   apt packages + api-paste.ini files (once, as root)
#   hack/openstack.sh up        start everything (idempotent), then print `env`
#   hack/openstack.sh down      stop every process group this script started
#   hack/openstack.sh env       export lines for the operator and its tests
#   hack/openstack.sh status    which services run
#
# State (configs, databases, logs, pids) lives in $OPENSTACK_STATE_DIR,
# default /tmp/analysis-operator-openstack; nothing is written into the repo.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
STATE=${OPENSTACK_STATE_DIR:-/tmp/analysis-operator-openstack}
CACHE=${ANALYSIS_OPERATOR_CACHE:-$HOME/.cache/analysis-operator}/openstack-zed
# The services are Debian's python modules: always Debian's interpreter,
# whatever python3 is first on PATH (pyenv).
PY=/usr/bin/python3
CLOUD=analysis
ADMIN_PASSWORD=admin-local-only
SERVICE_PASSWORD=service-local-only
OPERATOR_PASSWORD=operator-local-only
DB_PASSWORD=db-local-only
GPU_TOTAL=${OPENSTACK_GPU_TOTAL:-2}
PACKAGES="python3-nova python3-keystone python3-placement python3-glance python3-neutron
  python3-gunicorn rabbitmq-server mariadb-server"
SERVICES="mariadb rabbitmq keystone placement glance neutron nova-conductor nova-scheduler
  nova-api nova-compute"

log() { echo "openstack.sh: $*" >&2; }

cmd_install() {
  # apt must not start any daemon: this script starts them itself, on loopback.
  local policy=/usr/sbin/policy-rc.d created_policy=
  if [ ! -x "$policy" ] || ! grep -q 'exit 101' "$policy"; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1
  fi
  local missing=
  for package in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' \
      || missing="$missing $package"
  done
  if [ -n "$missing" ]; then
    log "installing$missing"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
      --no-install-recommends $missing >/dev/null
  fi
  fetch_paste_files
  [ -n "$created_policy" ] && rm -f "$policy"
  log "installed"
}

# api-paste.ini ships in the *-common packages, which pull in daemons and
# dbconfig; unpack just the file instead of installing them.
fetch_paste_files() {
  mkdir -p "$CACHE"
  local component
  for component in nova glance neutron; do
    [ -s "$CACHE/$component-api-paste.ini" ] && continue
    local work; work=$(mktemp -d)
    chmod 755 "$work"  # apt downloads as the unprivileged _apt user
    (cd "$work" && apt-get download -qq "$component-common" >/dev/null \
      && dpkg-deb -x ./"$component"-common_*.deb root)
    local file
    file=$(find "$work/root" -name '*api-paste.ini' | head -1)
    [ -n "$file" ] || { log "no api-paste.ini in $component-common"; exit 1; }
    cp "$file" "$CACHE/$component-api-paste.ini"
    rm -rf "$work"
  done
}


DB_PORT=${OPENSTACK_DB_PORT:-13306}
RABBIT_PORT=${OPENSTACK_RABBIT_PORT:-5672}
DATABASES="keystone placement glance neutron nova_api nova nova_cell0"
DB_URL="mysql+pymysql://openstack:$DB_PASSWORD@127.0.0.1:$DB_PORT"
KEYSTONE_URL=http://127.0.0.1:5000/v3
TRANSPORT_URL="rabbit://guest:guest@127.0.0.1:$RABBIT_PORT/"

# Each service runs in its own session (setsid), so its pid is also its
# process group id: `down` signals the whole group (neutron forks workers).
start_service() {
  local name=$1; shift
  if is_running "$name"; then return; fi
  setsid "$@" >>"$STATE/log/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/pid/$name.pid"
}

is_running() {
  local file="$STATE/pid/$1.pid"
  [ -s "$file" ] && kill -0 "$(cat "$file")" 2>/dev/null
}

stop_service() { stop_services "$1"; }

# TERM every group at once (nova's graceful shutdown takes seconds each),
# then KILL whatever is left after 10 s. Only groups recorded in pid files.
stop_services() {
  local name groups=()
  for name in "$@"; do
    local file="$STATE/pid/$name.pid"
    [ -s "$file" ] || continue
    local pgid; pgid=$(cat "$file")
    kill -TERM -- "-$pgid" 2>/dev/null && groups+=("$pgid")
    rm -f "$file"
  done
  local deadline=$((SECONDS + 10)) pgid
  for pgid in "${groups[@]}"; do
    while kill -0 -- "-$pgid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    kill -KILL -- "-$pgid" 2>/dev/null || true
  done
}

wait_for() {  # description, timeout seconds, command...
  local what=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      log "timed out after ${timeout}s waiting for $what; logs in $STATE/log"; exit 1
    fi
    sleep 0.3
  done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

sql() { mariadb --socket="$STATE/run/mysqld.sock" -uroot -N -B -e "$1"; }

run_main() {
  local module=$1; shift
  "$PY" -c "import sys; sys.argv[0] = '$module'; from $module import main; sys.exit(main())" "$@"
}

authtoken() {  # [keystone_authtoken] for a service user
  cat <<EOF
[keystone_authtoken]
www_authenticate_uri = http://127.0.0.1:5000
auth_url = http://127.0.0.1:5000
memcached_servers =
auth_type = password
project_domain_name = Default
user_domain_name = Default
project_name = service
username = $1
password = $SERVICE_PASSWORD
EOF
}

service_auth() {  # a [section] letting nova call another service
  cat <<EOF
[$1]
auth_type = password
auth_url = $KEYSTONE_URL
project_domain_name = Default
user_domain_name = Default
project_name = service
username = nova
password = $SERVICE_PASSWORD
region_name = RegionOne
EOF
}

write_configs() {
  local etc=$STATE/etc
  mkdir -p "$etc"/{keystone,placement,glance,neutron/plugins/ml2,nova/provider_config} \
    "$STATE"/{log,pid,run,locks,images,nova/instances,neutron}
  cat >"$etc/keystone/keystone.conf" <<EOF
[DEFAULT]
log_file = $STATE/log/keystone-app.log
[database]
connection = $DB_URL/keystone
[token]
provider = fernet
[fernet_tokens]
key_repository = $etc/keystone/fernet-keys
[credential]
key_repository = $etc/keystone/credential-keys
EOF
  { cat <<EOF
[DEFAULT]
log_file = $STATE/log/placement-app.log
[api]
auth_strategy = keystone
[placement_database]
connection = $DB_URL/placement
EOF
    authtoken placement; } >"$etc/placement/placement.conf"
  { cat <<EOF
[DEFAULT]
bind_host = 127.0.0.1
bind_port = 9292
workers = 1
log_file = $STATE/log/glance-app.log
[database]
connection = $DB_URL/glance
[glance_store]
stores = file
default_store = file
filesystem_store_datadir = $STATE/images
[paste_deploy]
flavor = keystone
config_file = $CACHE/glance-api-paste.ini
[oslo_concurrency]
lock_path = $STATE/locks
EOF
    authtoken glance; } >"$etc/glance/glance-api.conf"
  { cat <<EOF
[DEFAULT]
bind_host = 127.0.0.1
bind_port = 9696
core_plugin = ml2
service_plugins = router,port_forwarding
auth_strategy = keystone
api_paste_config = $CACHE/neutron-api-paste.ini
api_workers = 1
rpc_workers = 0
rpc_state_report_workers = 0
notify_nova_on_port_status_changes = false
notify_nova_on_port_data_changes = false
transport_url = $TRANSPORT_URL
state_path = $STATE/neutron
log_file = $STATE/log/neutron-app.log
[database]
connection = $DB_URL/neutron
[oslo_concurrency]
lock_path = $STATE/locks
EOF
    authtoken neutron; } >"$etc/neutron/neutron.conf"
  cat >"$etc/neutron/plugins/ml2/ml2_conf.ini" <<EOF
[ml2]
type_drivers = flat,vlan
tenant_network_types =
mechanism_drivers =
extension_drivers =
EOF
  write_nova_config
}

write_nova_config() {
  local etc=$STATE/etc
  { cat <<EOF
[DEFAULT]
compute_driver = fake.FakeDriver
enabled_apis = osapi_compute
osapi_compute_listen = 127.0.0.1
osapi_compute_listen_port = 8774
osapi_compute_workers = 1
host = analysis-fake-compute
my_ip = 127.0.0.1
transport_url = $TRANSPORT_URL
state_path = $STATE/nova
graceful_shutdown_timeout = 2
instances_path = $STATE/nova/instances
[api]
auth_strategy = keystone
[api_database]
connection = $DB_URL/nova_api
[database]
connection = $DB_URL/nova
[conductor]
workers = 1
[scheduler]
workers = 1
discover_hosts_in_cells_interval = -1
[compute]
provider_config_location = $etc/nova/provider_config
[service_user]
send_service_user_token = false
[wsgi]
api_paste_config = $CACHE/nova-api-paste.ini
[oslo_concurrency]
lock_path = $STATE/locks
[oslo_messaging_notifications]
driver = noop
[glance]
region_name = RegionOne
EOF
    authtoken nova; echo; service_auth placement; echo; service_auth neutron; } >"$etc/nova/nova.conf"
  # The fake driver has no GPUs; a provider config adds GPU_TOTAL of them to
  # the compute node so GPU flavors schedule and then run out, as on a real cloud.
  cat >"$etc/nova/provider_config/gpus.yaml" <<EOF
meta:
  schema_version: '1.0'
providers:
  - identification:
      uuid: \$COMPUTE_NODE
    inventories:
      additional:
        - CUSTOM_GPU:
            total: $GPU_TOTAL
            max_unit: $GPU_TOTAL
    traits:
      additional:
        - CUSTOM_ANALYSIS_GPU
EOF
}

up_mariadb() {
  if [ ! -d "$STATE/mysql/mysql" ]; then
    mariadb-install-db --datadir="$STATE/mysql" --user=root --skip-test-db \
      --auth-root-authentication-method=socket >>"$STATE/log/mariadb.log" 2>&1
  fi
  start_service mariadb /usr/sbin/mariadbd --no-defaults --datadir="$STATE/mysql" --user=root \
    --socket="$STATE/run/mysqld.sock" --port="$DB_PORT" --bind-address=127.0.0.1 \
    --pid-file="$STATE/run/mysqld.pid" --max-connections=500 --skip-log-bin
  wait_for mariadb 60 sql "SELECT 1"
  local database
  for database in $DATABASES; do sql "CREATE DATABASE IF NOT EXISTS $database"; done
  sql "CREATE USER IF NOT EXISTS 'openstack'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
       GRANT ALL ON *.* TO 'openstack'@'127.0.0.1'"
}

up_rabbitmq() {
  mkdir -p "$STATE/rabbitmq"
  echo "loopback_users = none" >"$STATE/rabbitmq/rabbitmq.conf"
  # Its own HOME (erlang cookie), node name and loopback-only listeners, so it
  # neither clashes with nor exposes anything on the machine.
  start_service rabbitmq env HOME="$STATE/rabbitmq" RABBITMQ_NODENAME=rabbit@localhost \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$RABBIT_PORT" ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_MNESIA_BASE="$STATE/rabbitmq/mnesia" RABBITMQ_LOG_BASE="$STATE/log/rabbitmq" \
    RABBITMQ_CONFIG_FILE="$STATE/rabbitmq/rabbitmq" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$STATE/rabbitmq/enabled_plugins" \
    RABBITMQ_SERVER_START_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    /usr/lib/rabbitmq/bin/rabbitmq-server  # not the wrapper, which would su to rabbitmq
}

keystone_manage() { run_main keystone.cmd.manage --config-file "$STATE/etc/keystone/keystone.conf" "$@"; }

gunicorn() {  # name, port, wsgi module in hack/openstack/
  start_service "$1" env OS_KEYSTONE_CONFIG_DIR="$STATE/etc/keystone" \
    OS_KEYSTONE_CONFIG_FILES=keystone.conf OS_PLACEMENT_CONFIG_DIR="$STATE/etc/placement" \
    "$PY" -m gunicorn -w1 --threads 8 -k gthread -b "127.0.0.1:$2" --chdir "$here/openstack" \
    --timeout 120 "$3:application"
}

up_keystone() {
  if [ ! -e "$STATE/done-keystone" ]; then
    keystone_manage db_sync
    keystone_manage fernet_setup --keystone-user root --keystone-group root
    keystone_manage credential_setup --keystone-user root --keystone-group root
    keystone_manage bootstrap --bootstrap-password "$ADMIN_PASSWORD" \
      --bootstrap-admin-url "$KEYSTONE_URL" --bootstrap-public-url "$KEYSTONE_URL" \
      --bootstrap-internal-url "$KEYSTONE_URL" --bootstrap-region-id RegionOne
    touch "$STATE/done-keystone"
  fi >>"$STATE/log/setup.log" 2>&1
  gunicorn keystone 5000 keystone_wsgi
}

db_syncs() {  # placement, glance, neutron: independent, so in parallel
  [ -e "$STATE/done-dbsync" ] && return
  local syncs=()
  run_main placement.cmd.manage --config-dir "$STATE/etc/placement" db sync & syncs+=($!)
  run_main glance.cmd.manage --config-file "$STATE/etc/glance/glance-api.conf" db_sync & syncs+=($!)
  run_main neutron.db.migration.cli --config-file "$STATE/etc/neutron/neutron.conf" \
    --config-file "$STATE/etc/neutron/plugins/ml2/ml2_conf.ini" upgrade heads & syncs+=($!)
  nova_manage api_db sync
  nova_manage cell_v2 map_cell0
  nova_manage cell_v2 list_cells | grep -q ' cell1 ' || nova_manage cell_v2 create_cell --name=cell1
  nova_manage db sync
  local sync  # not a bare `wait`: that would also wait for the services started in background
  for sync in "${syncs[@]}"; do wait "$sync"; done
  touch "$STATE/done-dbsync"
}

nova_manage() { run_main nova.cmd.manage --config-file "$STATE/etc/nova/nova.conf" "$@"; }

nova_service() {  # name, module
  start_service "$1" "$PY" -c "import sys; sys.argv[0] = '$1'; from $2 import main; sys.exit(main())" \
    --config-file "$STATE/etc/nova/nova.conf" --log-file "$STATE/log/$1-app.log"
}

up_services() {
  gunicorn placement 8778 placement_wsgi
  start_service glance "$PY" -c "import sys; from glance.cmd.api import main; sys.exit(main())" \
    --config-file "$STATE/etc/glance/glance-api.conf"
  start_service neutron "$PY" -c "import sys; from neutron.cmd.eventlet.server import main; sys.exit(main())" \
    --config-file "$STATE/etc/neutron/neutron.conf" \
    --config-file "$STATE/etc/neutron/plugins/ml2/ml2_conf.ini"
  # Rows in nova.services outlive the processes, so "registered" means
  # heartbeat newer than this start (nova stores UTC).
  since=$(sql "SELECT UTC_TIMESTAMP()")
  local conductor_was_up=; is_running nova-conductor && conductor_was_up=1
  nova_service nova-conductor nova.cmd.conductor
  nova_service nova-scheduler nova.cmd.scheduler
  nova_service nova-api nova.cmd.api_os_compute
  if is_running nova-compute; then return; fi
  # nova-compute gives up if no conductor answers yet: wait for its heartbeat.
  [ -n "$conductor_was_up" ] || wait_for "nova-conductor" 120 service_seen conductor
  nova_service nova-compute nova.cmd.compute
  # The compute service reports in after its node and GPU inventory are in placement.
  wait_for "nova-compute" 120 service_seen compute
  # Automatic host discovery would take up to a minute; do it now.
  nova_manage cell_v2 discover_hosts >>"$STATE/log/setup.log" 2>&1
}

service_seen() {
  [ -n "$(sql "SELECT id FROM nova.services WHERE topic='$1' AND deleted=0 AND COALESCE(updated_at, created_at) >= '$since'")" ]
}

cmd_up() {
  [ -s "$CACHE/nova-api-paste.ini" ] || { log "run '$0 install' first"; exit 1; }
  local started=$SECONDS
  write_configs
  up_mariadb
  up_rabbitmq
  up_keystone
  wait_for keystone 90 port_open 5000
  db_syncs >>"$STATE/log/setup.log" 2>&1
  wait_for rabbitmq 90 port_open "$RABBIT_PORT"
  OS_STATE_DIR="$STATE" "$PY" "$here/openstack/bootstrap.py" identity >>"$STATE/log/setup.log" 2>&1 \
    || { log "keystone bootstrap failed, see $STATE/log/setup.log"; exit 1; }
  up_services
  local port
  for port in 8778 9292 9696 8774; do wait_for "port $port" 90 port_open $port; done
  OS_STATE_DIR="$STATE" OS_GPU_TOTAL="$GPU_TOTAL" "$PY" "$here/openstack/bootstrap.py" resources \
    >>"$STATE/log/setup.log" 2>&1 || { log "bootstrap failed, see $STATE/log/setup.log"; exit 1; }
  log "up in $((SECONDS - started))s"
  cmd_env
}

cmd_down() {
  # epmd is started by rabbitmq on demand and detaches into its own group; it
  # may serve other Erlang nodes on the machine, so it is left running.
  # The OpenStack services first, while their database and broker still
  # answer (their shutdown otherwise waits on reconnects), then those two.
  stop_services $(echo $SERVICES | tr ' ' '\n' | grep -vx 'mariadb\|rabbitmq')
  stop_services rabbitmq mariadb
}

cmd_env() {
  echo "export OS_CLIENT_CONFIG_FILE=$STATE/clouds.yaml"
  echo "export ANALYSIS_OPERATOR_OPENSTACK_CLOUDS_YAML=$STATE/clouds.yaml"
  echo "export ANALYSIS_OPERATOR_OPENSTACK_CLOUD=$CLOUD"
}

cmd_status() {
  local service
  for service in $SERVICES; do
    if is_running "$service"; then echo "$service running (pgid $(cat "$STATE/pid/$service.pid"))"
    else echo "$service stopped"; fi
  done
}

case "${1:-}" in
  install) cmd_install ;;
  up) cmd_up ;;
  down) cmd_down ;;
  env) cmd_env ;;
  status) cmd_status ;;
  # stop/start one service, e.g. to test how the operator copes with nova-api down
  stop) stop_service "${2:?service name}" ;;
  *) echo "usage: $0 install|up|down|env|status|stop SERVICE" >&2; exit 2 ;;
esac
