#!/usr/bin/env bash
# A real single-node Slurm on loopback for development and tests:
# munged, slurmctld, slurmd and slurmrestd (JWT), started as root in the order
# that works (see ../shared/notes/slurm-local.md), with all state, config and
# logs in one directory outside the repo. Installs nothing: the packages come
# from hack/install-deps.sh.
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
# Environment: SLURM_STATE_DIR (default /tmp/analysis-operator-slurm),
# SLURM_REST_PORT (6820), SLURM_CTLD_PORT (6817), SLURM_D_PORT (6818),
# SLURM_TOKEN_LIFESPAN seconds (30 days, the single-token mode's token),
# SLURM_USERS ("alice bob carol"), SLURMRESTD_USER (slurmrestd).
set -euo pipefail

STATE=${SLURM_STATE_DIR:-/tmp/analysis-operator-slurm}
REST_PORT=${SLURM_REST_PORT:-6820}
CTLD_PORT=${SLURM_CTLD_PORT:-6817}
D_PORT=${SLURM_D_PORT:-6818}
TOKEN_LIFESPAN=${SLURM_TOKEN_LIFESPAN:-2592000}
USERS=${SLURM_USERS:-alice bob carol}
OPERATOR_USER=slurm
REST_USER=${SLURMRESTD_USER:-slurmrestd}
API_VERSION=v0.0.38
CONF=$STATE/slurm.conf
MUNGE_SOCKET=$STATE/munge/munge.socket
RUN=$STATE/run
export SLURM_CONF=$CONF

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
  for tool in munged munge unmunge slurmctld slurmd slurmrestd scontrol sinfo squeue scancel curl; do
    command -v "$tool" >/dev/null || die "$tool not found: run hack/install-deps.sh"
  done
  [ "$(id -u)" = 0 ] || die "must run as root (the daemons switch to their own users)"
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

write_slurm_conf() {
  cat >"$CONF.tmp" <<EOF
# Written by hack/slurm.sh: a one-node test cluster on loopback.
ClusterName=aenv
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
AuthAltTypes=auth/jwt
AuthAltParameters=jwt_key=$STATE/jwt.key
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
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
NodeName=localhost NodeAddr=127.0.0.1 CPUs=8 RealMemory=32000 Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
# Any job asking for more than one minute waits here: reason PartitionTimeLimit.
PartitionName=tiny Nodes=ALL MaxTime=1 State=UP
EOF
  mv "$CONF.tmp" "$CONF"
  cat >"$STATE/gres.conf" <<EOF
AutoDetect=off
NodeName=localhost Name=gpu File=$STATE/dev/gpu[0-3]
EOF
  chmod 0644 "$CONF" "$STATE/gres.conf"
}

prepare_state() {
  install -d -m 0755 "$STATE" "$RUN"
  install -d -m 0755 -o slurm -g slurm "$STATE/log"
  install -d -m 0700 -o slurm -g slurm "$STATE/ctld"
  install -d -m 0755 "$STATE/slurmd"
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
node_ready() { sinfo -h -n localhost -o %T | grep -Eq '^(idle|mixed|allocated)$'; }
rest_answers() {
  # The token goes to curl on stdin (printf is a builtin), never on a command
  # line that ps would show.
  printf 'header = "X-SLURM-USER-TOKEN: %s"\n' "$(<"$STATE/token")" |
    curl -fsS -o /dev/null -K - -H "X-SLURM-USER-NAME: $OPERATOR_USER" \
      "http://127.0.0.1:$REST_PORT/slurm/$API_VERSION/ping"
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
  slurmctld -c -f "$CONF"
  wait_for 20 "slurmctld (scontrol ping)" controller_answers
}

start_slurmd() {
  pid_alive "$RUN/slurmd.pid" && return
  # Only after the controller answers: a slurmd that starts first backs off
  # for minutes and ignores SIGTERM meanwhile.
  slurmd -f "$CONF" -N localhost
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
  SLURM_JWT=daemon setsid slurmrestd -f "$CONF" -u "$REST_USER" -a rest_auth/jwt \
    -s "openapi/$API_VERSION" "127.0.0.1:$REST_PORT" \
    </dev/null >>"$STATE/log/slurmrestd.log" 2>&1 &
  echo $! >"$RUN/slurmrestd.pid"
  wait_for 15 "slurmrestd (GET ping)" rest_answers
}

jupyter_command() {
  # JupyterLab where it is installed; otherwise a tiny real HTTP server, so
  # the connection URL still answers.
  if command -v jupyter-lab >/dev/null; then
    echo 'jupyter lab --no-browser --ip="$JUPYTER_HOST" --port="$JUPYTER_PORT"'
  else
    echo 'python3 -m http.server --bind "$JUPYTER_HOST" "$JUPYTER_PORT"'
  fi
}

write_env_file() {
  {
    printf 'export SLURM_CONF=%q\n' "$CONF"
    printf 'export ANALYSIS_OPERATOR_SLURM_ENABLED=true\n'
    printf 'export ANALYSIS_OPERATOR_SLURM_URL=%q\n' "http://127.0.0.1:$REST_PORT"
    printf 'export ANALYSIS_OPERATOR_SLURM_API_VERSION=%q\n' "$API_VERSION"
    printf 'export ANALYSIS_OPERATOR_SLURM_USER=%q\n' "$OPERATOR_USER"
    # Per-user mode; unset JWT_KEY_FILE for the single-token mode (every job as slurm).
    printf 'export ANALYSIS_OPERATOR_SLURM_JWT_KEY_FILE=%q\n' "$STATE/jwt.key"
    printf 'export ANALYSIS_OPERATOR_SLURM_TOKEN_FILE=%q\n' "$STATE/token"
    printf 'export ANALYSIS_OPERATOR_SLURM_WORKING_DIRECTORY=%q\n' "$STATE/jobs/{user}"
    printf 'export ANALYSIS_OPERATOR_SLURM_JUPYTER_COMMAND=%q\n' "$(jupyter_command)"
  } >"$STATE/env"
}

cmd_up() {
  require_tools
  ensure_users
  prepare_state
  start_munged
  start_slurmctld
  start_slurmd
  start_slurmrestd
  write_env_file
  log "up: slurmrestd on http://127.0.0.1:$REST_PORT (source <(hack/slurm.sh env))"
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

cmd_down() {
  cancel_jobs
  stop_daemons slurmrestd slurmd
  # slurmd reports its last jobs to the controller while it shuts down, and
  # every daemon talks to munged until it is gone.
  stop_daemons slurmctld
  stop_daemons munged
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
