#!/usr/bin/env bash
# A real single-node Slurm for development and tests: munged, slurmctld,
# slurmd and slurmrestd (JWT), started as root in the order that works (see
# ../shared/notes/slurm-local.md and slurm-current.md), with all state, config and
# logs in one directory outside the repo. Installs nothing: Slurm, munge and
# JupyterLab come from hack/install-deps.sh.
#
# Which Slurm (SLURM_VERSION):
#   25.05 (default) Slurm 25.05.8 built from the upstream source by hack/build-slurm.sh
#                   into /opt/analysis-operator/slurm-25.05.8 (SLURM_PREFIX); slurmrestd
#                   serves v0.0.40-v0.0.43 (-s openapi/slurmctld)
#   22.05           Debian 12's packages (/usr); slurmrestd serves v0.0.38
# The operator discovers the API version (env prints API_VERSION=auto). Switching
# versions restarts the stack (its configuration differs).
#
# The compute node has an address of its own, as a real one has (a gateway's
# EndpointSlice may not point at loopback): slurmd, and so every job, runs in a
# network namespace of this stack (SLURM_NODE_NETNS, default aenv-node-<hash of
# the state directory>) joined to the host by a veth pair, host side
# $SLURM_NODE_SUBNET.1/24, node side $SLURM_NODE_SUBNET.2/24 (the node's
# NodeAddr). slurmctld binds only to the host side of the pair (reachable from
# the host and the node, not from the host's other networks); slurmrestd stays
# on 127.0.0.1; munged's Unix socket is a file, so the node uses it too.
#
# Jobs start JupyterLab from the virtual environment hack/install-deps.sh makes
# under /opt/analysis-operator (readable by the job users; /root is not).
#
#   hack/slurm.sh up      start what is not running yet, wait until it answers
#   hack/slurm.sh down    cancel the jobs, stop what `up` started (by PID)
#   hack/slurm.sh env     print the operator's settings as `export` lines
#   hack/slurm.sh status  say what runs
#
# Jobs run as their owners' own Unix accounts: the stack creates the facility
# users SLURM_USERS (alice bob carol; useradd, idempotent), each with a working
# directory $STATE/jobs/<user> (mode 0700), and the operator mints per-user JWTs
# from the cluster's key ($STATE/jwt.key). The operator's own account is
# SlurmUser (slurm), which may list, cancel and raise time limits of any job.
#
# Environment: SLURM_VERSION (25.05 or 22.05), SLURM_PREFIX (where 25.05 is installed),
# SLURM_STATE_DIR (default /tmp/analysis-operator-slurm),
# SLURM_REST_PORT (6820), SLURM_CTLD_PORT (6817), SLURM_D_PORT (6818),
# SLURM_NODE_SUBNET (10.250.0: the node's /24; a stack beside another needs its own),
# SLURM_NODE_NETNS (aenv-node-<hash>), SLURM_JUPYTERLAB (the JupyterLab virtual
# environment, default /opt/analysis-operator/jupyterlab-<version in install-deps.sh>),
# SLURM_TOKEN_LIFESPAN seconds (30 days, the single-token mode's token),
# SLURM_USERS ("alice bob carol"), SLURMRESTD_USER (slurmrestd), SLURM_HOSTS_FILE (/etc/hosts:
# where the stack names its two addresses, see ensure_host_names).
set -euo pipefail

STATE=${SLURM_STATE_DIR:-/tmp/analysis-operator-slurm}
REST_PORT=${SLURM_REST_PORT:-6820}
CTLD_PORT=${SLURM_CTLD_PORT:-6817}
D_PORT=${SLURM_D_PORT:-6818}
TOKEN_LIFESPAN=${SLURM_TOKEN_LIFESPAN:-2592000}
USERS=${SLURM_USERS:-alice bob carol}
OPERATOR_USER=slurm
REST_USER=${SLURMRESTD_USER:-slurmrestd}
CONF=$STATE/slurm.conf
MUNGE_SOCKET=$STATE/munge/munge.socket
RUN=$STATE/run
export SLURM_CONF=$CONF

# The node's network: one namespace and one veth pair per state directory.
SUBNET=${SLURM_NODE_SUBNET:-10.250.0}
HOST_ADDR=$SUBNET.1
NODE_ADDR=$SUBNET.2
STACK_ID=$(printf '%s' "$STATE" | sha256sum | cut -c1-8)
NETNS=${SLURM_NODE_NETNS:-aenv-node-$STACK_ID}
HOST_IF=aenv-$STACK_ID   # interface names have at most 15 characters
NODE_IF=eth0             # inside the namespace
NODE_NAME=localhost      # slurmd -N; a test stack keeps the name every test knows
HOSTS_FILE=${SLURM_HOSTS_FILE:-/etc/hosts}
HOSTS_MARK="# hack/slurm.sh $NETNS"   # ends each line this stack adds to $HOSTS_FILE

# Which Slurm: its binaries first on PATH (the commands this script runs, scontrol token, ...).
SLURM_VERSION=${SLURM_VERSION:-25.05}
case $SLURM_VERSION in
  25.05)
    # The release hack/build-slurm.sh builds by default (one place for the version).
    SLURM_RELEASE=$(sed -n 's/^DEFAULT_RELEASE=//p' "$(dirname "$0")/build-slurm.sh")
    PREFIX=${SLURM_PREFIX:-${SLURM_INSTALL_ROOT:-/opt/analysis-operator}/slurm-$SLURM_RELEASE}
    REST_PLUGINS=openapi/slurmctld   # v0.0.40-v0.0.43; the default set also wants slurmdbd
    PING_VERSION=v0.0.43 ;;
  22.05)
    SLURM_RELEASE=22.05 PREFIX=/usr REST_PLUGINS=openapi/v0.0.38 PING_VERSION=v0.0.38 ;;
  *) echo "slurm.sh: SLURM_VERSION=$SLURM_VERSION: expected 25.05 or 22.05" >&2; exit 2 ;;
esac
SBIN=$PREFIX/sbin
BIN=$PREFIX/bin
export PATH="$BIN:$SBIN:$PATH"
# The jobs' PATH (the operator's job_path setting): this Slurm's commands, then the system's.
JOB_PATH=$([ "$PREFIX" = /usr ] || printf '%s:' "$BIN")/usr/local/bin:/usr/bin:/bin

# JupyterLab for the jobs, pinned in hack/install-deps.sh (one place for the version).
JUPYTERLAB_VERSION=$(sed -n 's/^jupyterlab_version=//p' "$(dirname "$0")/install-deps.sh")
JUPYTERLAB=${SLURM_JUPYTERLAB:-/opt/analysis-operator/jupyterlab-$JUPYTERLAB_VERSION}

log() { echo "slurm.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds.
wait_for() {
  local seconds=$1 description=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      die "timed out after ${seconds}s waiting for $description (logs in $STATE/log)"
    fi
    sleep 0.2
  done
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

require_tools() {
  local tool
  if [ "$SLURM_VERSION" != 22.05 ] && ! [ -x "$SBIN/slurmctld" ]; then
    die "Slurm $SLURM_RELEASE is not built at $PREFIX: run hack/build-slurm.sh (about 7 min) or hack/install-deps.sh"
  fi
  for tool in slurmctld slurmd slurmrestd; do
    [ -x "$SBIN/$tool" ] || die "$SBIN/$tool not found: run hack/install-deps.sh"
  done
  for tool in scontrol sinfo squeue scancel; do
    [ -x "$BIN/$tool" ] || die "$BIN/$tool not found: run hack/install-deps.sh"
  done
  for tool in munged munge unmunge curl; do
    command -v "$tool" >/dev/null || die "$tool not found: run hack/install-deps.sh"
  done
  [ "$(id -u)" = 0 ] || die "must run as root (the daemons switch to their own users)"
  for tool in ip nsenter unshare; do
    command -v "$tool" >/dev/null || die "$tool not found (iproute2, util-linux)"
  done
  [[ $SUBNET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] ||
    die "SLURM_NODE_SUBNET=$SUBNET: expected the first three octets of a /24, e.g. 10.250.0"
}

require_jupyterlab() {
  # No stand-in: the jobs run the real JupyterLab, from a place the job users can read.
  [ -x "$JUPYTERLAB/bin/jupyter-lab" ] && [ -e "$JUPYTERLAB/.installed" ] ||
    die "JupyterLab not found at $JUPYTERLAB (SLURM_JUPYTERLAB): run hack/install-deps.sh"
  local user
  for user in $USERS; do
    runuser -u "$user" -- test -x "$JUPYTERLAB/bin/jupyter-lab" ||
      die "$user cannot run $JUPYTERLAB/bin/jupyter-lab: it must be readable by the job users"
  done
}

ensure_users() {
  # slurmrestd refuses to run as root; jobs run as the facility users.
  id -u "$REST_USER" >/dev/null 2>&1 ||
    useradd --system --no-create-home --shell /usr/sbin/nologin "$REST_USER"
  # The same uid and gid as their FacilityUser in examples/users.yaml: the operator refuses a job
  # whose Unix account disagrees with the facility's directory (UnixAccountMismatch).
  local user id
  for user in $USERS; do
    id=$(uid_of "$user")
    if [ -z "$id" ]; then
      id -u "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
    elif ! id -u "$user" >/dev/null 2>&1; then
      getent group "$user" >/dev/null || groupadd --gid "$id" "$user"
      useradd --create-home --shell /bin/bash --uid "$id" --gid "$id" "$user"
    elif [ "$(id -u "$user")" != "$id" ]; then   # made by an earlier version of this script
      groupmod --gid "$id" "$user" 2>/dev/null || true
      usermod --uid "$id" --gid "$id" "$user"
    fi
  done
}

uid_of() {  # uid_of USER: the uid examples/users.yaml gives the user, or nothing
  awk -v user="$1" '/^  name:/ {name = $2} /^spec:/ && name == user {
    match($0, /uid: *[0-9]+/); print substr($0, RSTART + 5, RLENGTH - 5) + 0; exit }' \
    "$(dirname "$0")/../examples/users.yaml"
}

# ---------------------------------------------------------------- the node's network

netns_exists() { [ -e "/run/netns/$NETNS" ]; }

ensure_node_network() {
  # Idempotent: whatever part is missing is made, what is there is kept.
  local owner
  owner=$(ip -o -4 addr show to "$HOST_ADDR/32" 2>/dev/null | awk '{print $2; exit}')
  if [ -n "$owner" ] && [ "$owner" != "$HOST_IF" ]; then
    die "$HOST_ADDR is already on $owner (another stack?): choose another SLURM_NODE_SUBNET"
  fi
  netns_exists || ip netns add "$NETNS"
  if ! ip link show "$HOST_IF" >/dev/null 2>&1; then
    ip -n "$NETNS" link del "$NODE_IF" 2>/dev/null || true
    ip link add "$HOST_IF" type veth peer name "$NODE_IF" netns "$NETNS"
  fi
  ip addr replace "$HOST_ADDR/24" dev "$HOST_IF"
  ip link set "$HOST_IF" up
  ip -n "$NETNS" link set lo up
  ip -n "$NETNS" addr replace "$NODE_ADDR/24" dev "$NODE_IF"
  ip -n "$NETNS" link set "$NODE_IF" up
}

remove_node_network() {
  # The host's end first: deleting it deletes the pair at once. Deleting the
  # namespace first would leave the kernel to remove the pair later, in the
  # background, so a check for the host's end could see it and the delete then
  # find it gone. A link that vanishes between the check and the delete is fine.
  if ip link show "$HOST_IF" >/dev/null 2>&1; then
    ip link del "$HOST_IF" 2>/dev/null || ! ip link show "$HOST_IF" >/dev/null 2>&1 \
      || die "could not delete $HOST_IF"
  fi
  if netns_exists; then ip netns del "$NETNS"; fi
}

# The pair's addresses by name, in $HOSTS_FILE. slurmctld and slurmd name every connection they
# accept by its peer's host name (getnameinfo), and cache only the names found. An address no
# file names costs a DNS query per connection, and this machine's resolver drops 2.5-3.6 % of
# them: that connection then waits out the resolver's 5 s (the p99 of a request to slurmrestd
# was 5 s; bench/logs/slurm-names-stop43.md). A facility's DNS names its nodes; this stack names its two addresses.
ensure_host_names() {
  if [ ! -w "$HOSTS_FILE" ]; then
    log "$HOSTS_FILE is not writable: $HOST_ADDR and $NODE_ADDR stay unnamed (a connection may wait 5 s for DNS)"
    return 0
  fi
  remove_host_names
  printf '%s %s-ctld %s\n%s %s %s\n' "$HOST_ADDR" "$NETNS" "$HOSTS_MARK" "$NODE_ADDR" "$NETNS" "$HOSTS_MARK" \
    >>"$HOSTS_FILE"
}

remove_host_names() {
  # Rewritten in place (the file may be a mount point, which a rename cannot replace).
  local kept
  [ -w "$HOSTS_FILE" ] || return 0
  kept=$(grep -vF -- "$HOSTS_MARK" "$HOSTS_FILE" || true)
  printf '%s\n' "$kept" >"$HOSTS_FILE"
}

in_node() { nsenter --net="/run/netns/$NETNS" -- "$@"; }

# in_node_netns PIDFILE: does that daemon run in the node's current namespace?
in_node_netns() {
  netns_exists && [ "$(stat -L -c %i "/proc/$(cat "$1")/ns/net" 2>/dev/null)" = "$(stat -L -c %i "/run/netns/$NETNS")" ]
}

write_munge_key() {
  install -d -m 0755 -o munge -g munge "$STATE/munge"
  if [ ! -s "$STATE/munge/munge.key" ]; then
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
  fi
  chown munge:munge "$STATE/munge/munge.key"
  chmod 0400 "$STATE/munge/munge.key"
}

write_jwt_key() {
  if [ ! -s "$STATE/jwt.key" ]; then
    dd if=/dev/urandom of="$STATE/jwt.key" bs=32 count=1 status=none
  fi
  chown slurm:slurm "$STATE/jwt.key"
  chmod 0600 "$STATE/jwt.key"
}

make_gpu_devices() {
  # Slurm accepts only character or block devices as GPU files; these alias
  # /dev/null, which is all a test needs.
  install -d -m 0755 "$STATE/dev"
  local index
  for index in 0 1 2 3; do
    [ -c "$STATE/dev/gpu$index" ] || mknod -m 0666 "$STATE/dev/gpu$index" c 1 3
  done
}

render_slurm_conf() {
  cat <<EOF
# Written by hack/slurm.sh: a one-node test cluster of Slurm $SLURM_RELEASE ($PREFIX);
# the node in network namespace $NETNS.
ClusterName=aenv
# The controller at the host's end of the node's veth pair: every client (the node, the
# commands, slurmrestd) connects there, and slurmctld binds only there (NoCtldInAddrAny
# binds to what its host name resolves to: slurm.sh starts it with that address as host name).
SlurmctldHost=localhost($HOST_ADDR)
CommunicationParameters=NoCtldInAddrAny
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
AuthAltTypes=auth/jwt
AuthAltParameters=jwt_key=$STATE/jwt.key
CredType=cred/munge
StateSaveLocation=$STATE/ctld-$SLURM_VERSION
SlurmdSpoolDir=$STATE/slurmd-$SLURM_VERSION
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No cgroups: the node is simulated, its CPUs and GPUs are advertised.
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.log
MinJobAge=300
MailProg=/bin/true
# Partition limits are checked when scheduling, not at submit, so a job over
# a limit stays PENDING with a reason (what the tests need).
EnforcePartLimits=NO
NodeName=$NODE_NAME NodeAddr=$NODE_ADDR NodeHostname=$NODE_NAME CPUs=8 RealMemory=32000 Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
# Any job asking for more than one minute waits here: reason PartitionTimeLimit.
PartitionName=tiny Nodes=ALL MaxTime=1 State=UP
EOF
}

# Is the configuration on disk what this script writes now? (No: a stack of an earlier version.)
conf_is_current() { render_slurm_conf | cmp -s - "$CONF"; }

write_slurm_conf() {
  render_slurm_conf >"$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
  cat >"$STATE/gres.conf" <<EOF
AutoDetect=off
NodeName=$NODE_NAME Name=gpu File=$STATE/dev/gpu[0-3]
EOF
  chmod 0644 "$CONF" "$STATE/gres.conf"
}

prepare_state() {
  install -d -m 0755 "$STATE" "$RUN"
  install -d -m 0755 -o slurm -g slurm "$STATE/log"
  install -d -m 0700 -o slurm -g slurm "$STATE/ctld-$SLURM_VERSION"
  install -d -m 0755 "$STATE/slurmd-$SLURM_VERSION"
  # One working directory per user: job output and the datasets' links, private to its owner.
  install -d -m 0755 -o root -g root "$STATE/jobs"
  local user
  for user in $USERS; do
    install -d -m 0700 -o "$user" -g "$(id -gn "$user")" "$STATE/jobs/$user"
  done
  # slurmctld writes its pid file after dropping to SlurmUser.
  chown slurm:slurm "$RUN"
  write_munge_key
  write_jwt_key
  make_gpu_devices
  write_slurm_conf
}

munge_answers() { munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET"; }
controller_answers() { scontrol ping | grep -q UP; }
node_ready() { sinfo -h -n "$NODE_NAME" -o %T | grep -Eq '^(idle|mixed|allocated)$'; }
rest_answers() {
  # The token goes to curl on stdin (printf is a builtin), never on a command
  # line that ps would show. By content: slurmrestd 25.05 answers 200 also when slurmctld
  # does not respond to it (or refuses the token), with `responding: false` inside.
  printf 'header = "X-SLURM-USER-TOKEN: %s"\n' "$(<"$STATE/token")" |
    curl -fsS -K - -H "X-SLURM-USER-NAME: $OPERATOR_USER" \
      "http://127.0.0.1:$REST_PORT/slurm/$PING_VERSION/ping" |
    grep -Eq '"responding": *true|"ping": *"UP"'
}

start_munged() {
  pid_alive "$RUN/munged.pid" && munge_answers >/dev/null 2>&1 && return
  runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCKET" \
    --key-file="$STATE/munge/munge.key" --pid-file="$STATE/munge/munged.pid" \
    --seed-file="$STATE/munge/munged.seed" --log-file="$STATE/munge/munged.log"
  wait_for 10 munged munge_answers
  # munged writes its PID inside its own directory; mirror it for down.
  cp "$STATE/munge/munged.pid" "$RUN/munged.pid"
}

start_slurmctld() {
  pid_alive "$RUN/slurmctld.pid" && return
  # -c: a fresh queue on each start; a test stack should not resurrect old jobs.
  # Its own UTS namespace with the veth's host address as host name: NoCtldInAddrAny makes
  # it bind to what gethostname() resolves to, so it listens on $HOST_ADDR only.
  unshare --uts -- sh -c 'hostname "$1" && exec "$2" -c -f "$3"' slurmctld "$HOST_ADDR" "$SBIN/slurmctld" "$CONF"
  wait_for 20 "slurmctld (scontrol ping)" controller_answers
}

start_slurmd() {
  if pid_alive "$RUN/slurmd.pid"; then
    in_node_netns "$RUN/slurmd.pid" && return
    log "slurmd runs outside the node's network namespace $NETNS: restarting it"
    stop_daemons slurmd
  fi
  # Only after the controller answers: a slurmd that starts first backs off
  # for minutes and ignores SIGTERM meanwhile. In the node's namespace: its jobs too.
  in_node "$SBIN/slurmd" -f "$CONF" -N "$NODE_NAME"
  wait_for 30 "slurmd (node idle)" node_ready
}

write_token() {
  local line
  line=$(scontrol token username="$OPERATOR_USER" lifespan="$TOKEN_LIFESPAN")
  (umask 077 && printf '%s\n' "${line#SLURM_JWT=}" >"$STATE/token.tmp")
  mv "$STATE/token.tmp" "$STATE/token"
}

start_slurmrestd() {
  write_token
  pid_alive "$RUN/slurmrestd.pid" && rest_answers && return
  # Foreground process: its PID is $!. SLURM_JWT=daemon makes it pass each
  # request's token on to slurmctld instead of using munge.
  SLURM_JWT=daemon setsid "$SBIN/slurmrestd" -f "$CONF" -u "$REST_USER" -a rest_auth/jwt \
    -s "$REST_PLUGINS" "127.0.0.1:$REST_PORT" \
    </dev/null >>"$STATE/log/slurmrestd.log" 2>&1 &
  echo $! >"$RUN/slurmrestd.pid"
  wait_for 15 "slurmrestd (GET ping)" rest_answers
}

jupyter_command() {
  # The site's command is the program alone: the operator adds where JupyterLab listens,
  # its base URL and the proxy settings (backends/slurm.py, build_jupyter_command).
  echo "$JUPYTERLAB/bin/jupyter-lab"
}

write_env_file() {
  {
    printf 'export SLURM_CONF=%q\n' "$CONF"
    printf 'export ANALYSIS_OPERATOR_SLURM_ENABLED=true\n'
    printf 'export ANALYSIS_OPERATOR_SLURM_URL=%q\n' "http://127.0.0.1:$REST_PORT"
    # auto: the operator asks slurmrestd what it serves (GET /openapi/v3) and speaks the newest it knows.
    printf 'export ANALYSIS_OPERATOR_SLURM_API_VERSION=auto\n'
    printf 'export ANALYSIS_OPERATOR_SLURM_USER=%q\n' "$OPERATOR_USER"
    # Per-user mode; unset JWT_KEY_FILE for the single-token mode (every job as slurm).
    printf 'export ANALYSIS_OPERATOR_SLURM_JWT_KEY_FILE=%q\n' "$STATE/jwt.key"
    printf 'export ANALYSIS_OPERATOR_SLURM_TOKEN_FILE=%q\n' "$STATE/token"
    printf 'export ANALYSIS_OPERATOR_SLURM_WORKING_DIRECTORY=%q\n' "$STATE/jobs/{user}"
    printf 'export ANALYSIS_OPERATOR_SLURM_JUPYTER_COMMAND=%q\n' "$(jupyter_command)"
    printf 'export ANALYSIS_OPERATOR_SLURM_JOB_PATH=%q\n' "$JOB_PATH"
  } >"$STATE/env"
}

any_daemon_alive() {
  local name
  for name in munged slurmctld slurmd slurmrestd; do pid_alive "$RUN/$name.pid" && return 0; done
  return 1
}

cmd_up() {
  require_tools
  ensure_users
  require_jupyterlab
  if [ -s "$CONF" ] && any_daemon_alive && ! conf_is_current; then
    log "the running stack has another configuration (an earlier slurm.sh?): restarting it"
    stop_stack
  fi
  ensure_node_network
  ensure_host_names
  prepare_state
  start_munged
  start_slurmctld
  start_slurmd
  start_slurmrestd
  write_env_file
  log "up: Slurm $SLURM_RELEASE, slurmrestd on http://127.0.0.1:$REST_PORT, node $NODE_NAME at $NODE_ADDR (netns $NETNS) (source <(hack/slurm.sh env))"
}

# stop_daemons NAME...: TERM them together (each takes about 2 s to exit),
# then KILL whatever ignores TERM for 10 s.
stop_daemons() {
  local name pids=()
  for name in "$@"; do
    if pid_alive "$RUN/$name.pid"; then
      pids+=("$(cat "$RUN/$name.pid")")
      kill -TERM "${pids[-1]}" 2>/dev/null || true
    fi
  done
  local deadline=$((SECONDS + 10)) pid
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid ignored SIGTERM, killing"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for name in "$@"; do rm -f "$RUN/$name.pid"; done
}

no_jobs_left() { [ -z "$(squeue -h -o %i)" ]; }

cancel_jobs() {
  # Job processes belong to slurmstepd, not to slurmd: stopping slurmd would
  # leave them running, so the queue is emptied while the controller is up.
  pid_alive "$RUN/slurmctld.pid" || return 0
  # Every user's jobs (this cluster is the stack's own): by id, as root.
  local ids
  ids=$(squeue -h -o %i 2>/dev/null || true)
  # shellcheck disable=SC2086  # one word per job id
  [ -z "$ids" ] || scancel $ids 2>/dev/null || true
  if ! wait_for_quietly 20 "an empty queue" no_jobs_left; then
    log "jobs still listed after scancel; stopping anyway"
  fi
}

wait_for_quietly() { (wait_for "$@") 2>/dev/null; }

stop_stack() {
  cancel_jobs
  stop_daemons slurmrestd slurmd
  # slurmd reports its last jobs to the controller while it shuts down, and
  # every daemon talks to munged until it is gone.
  stop_daemons slurmctld
  stop_daemons munged
}

cmd_down() {
  stop_stack
  remove_node_network
  remove_host_names
  rm -f "$STATE/env"
  log "down"
}

cmd_env() {
  [ -s "$STATE/env" ] || die "not up: run hack/slurm.sh up"
  cat "$STATE/env"
}

cmd_status() {
  local name state=0
  for name in munged slurmctld slurmd slurmrestd; do
    if pid_alive "$RUN/$name.pid"; then
      echo "$name running (pid $(cat "$RUN/$name.pid"))"
    else
      echo "$name stopped"; state=1
    fi
  done
  if netns_exists; then
    echo "node network: netns $NETNS, $HOST_IF $HOST_ADDR <-> $NODE_IF $NODE_ADDR"
  else
    echo "node network: netns $NETNS absent"; state=1
  fi
  ((state == 0)) && sinfo
  return "$state"
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  env) cmd_env ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|env|status" >&2; exit 2 ;;
esac
