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

# Where JupyterLab listens: every IPv4 address of this node, so also the one
# Slurm knows for it (NodeAddr), where the operator and the gateway connect;
# and the port the operator chose (JUPYTER_PORT, in the job's environment).
# The operator reads the node from Slurm, so nothing this job writes tells it
# where to connect. JUPYTER_BASE_URL: the path it serves under, the same
# through the gateway and on the node (/env/<namespace>/<name>/).
if [ -z "${JUPYTER_PORT:-}" ]; then
  echo "analysis-operator: no JUPYTER_PORT in the job's environment" >&2
  exit 1
fi
JUPYTER_HOST=0.0.0.0
JUPYTER_BASE_URL=${JUPYTER_BASE_URL:-/}
export JUPYTER_HOST JUPYTER_PORT JUPYTER_BASE_URL

exec jupyter lab --no-browser --ip="$JUPYTER_HOST" --port="$JUPYTER_PORT" --ServerApp.port_retries=0 --ServerApp.base_url="$JUPYTER_BASE_URL" --ServerApp.allow_remote_access=True --ServerApp.trust_xheaders=True
