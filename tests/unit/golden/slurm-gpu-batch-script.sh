#!/bin/bash
# Rendered by analysis-operator from templates/sbatch.sh.j2. The access token,
# port and dataset paths arrive through the job's environment, so nothing a
# user typed is part of this text. The job runs as its owner's Unix account.
set -euo pipefail
umask 077

token_variable=JUPYTER_TOKEN
if [ -z "${!token_variable:-}" ]; then
  echo "analysis-operator: no access token in \$$token_variable; refusing to start a server without one" >&2
  exit 1
fi
# JupyterLab reads its token from JUPYTER_TOKEN, never from its command line
# (where every user on the node could read it in ps).
export JUPYTER_TOKEN="${!token_variable}"

# Environment modules need the login profile; their scripts trip `set -u`.
command -v module >/dev/null 2>&1 || . /etc/profile
set +u
module load cuda/12.2
module load anaconda3/2024.02
set -u

# The datasets granted to this environment, and only those, linked into one
# directory; their paths arrive through the job's environment (AENV_DATASET_*).
if [ "${AENV_DATASET_COUNT:-0}" -gt 0 ]; then
  mkdir -p "$AENV_DATA_DIR"
  for ((i = 0; i < AENV_DATASET_COUNT; i++)); do
    path_variable="AENV_DATASET_${i}_PATH" link_variable="AENV_DATASET_${i}_LINK"
    link="$AENV_DATA_DIR/${!link_variable}"
    mkdir -p "$(dirname "$link")"
    ln -sfn "${!path_variable}" "$link"
  done
  export AENV_DATA_DIR
fi

# Where JupyterLab listens: this node, as Slurm names it, and the port the
# operator chose (JUPYTER_PORT, in the job's environment). The operator reads
# the node from Slurm, so nothing this job writes tells it where to connect.
if [ -z "${JUPYTER_PORT:-}" ]; then
  echo "analysis-operator: no JUPYTER_PORT in the job's environment" >&2
  exit 1
fi
JUPYTER_HOST=$(hostname --fqdn 2>/dev/null || hostname)
export JUPYTER_HOST JUPYTER_PORT

exec jupyter lab --no-browser --ip="$JUPYTER_HOST" --port="$JUPYTER_PORT" --ServerApp.port_retries=0
