#!/usr/bin/env bash
# Installs everything the local stack and the tests need, on Debian 12 as root:
# apt packages (Slurm, munge, OpenStack's Python services, MariaDB, RabbitMQ),
# the Python package with its test and dev extras in a virtual environment at
# <repo>/.venv (which hack/test.sh, hack/up.sh and hack/check.sh use), and the
# Go-built Kubernetes binaries (cached in ~/.cache/analysis-operator).
# Safe to run again: it skips what is there.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
export DEBIAN_FRONTEND=noninteractive

# apt must not start the daemons it installs; the project's scripts start them.
if [ ! -x /usr/sbin/policy-rc.d ] || ! grep -q "exit 101" /usr/sbin/policy-rc.d; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
fi

packages=(openssl curl ca-certificates
          munge slurmctld slurmd slurm-client slurmrestd slurm-wlm-jwt-plugin)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
"$here/openstack.sh" install       # OpenStack Zed from Debian (skips what is installed)

# The project's Python in its own virtual environment, never the system's site-packages
# (whatever else is installed there cannot conflict with it). Made with the same python3;
# reinstalled when pyproject.toml changes.
venv="$repo/.venv"
if ! "$venv/bin/python" -c '' 2>/dev/null; then   # absent, or its interpreter is gone
  python3 -m venv --clear "$venv"
fi
stamp="$venv/.installed-pyproject"
if ! [ -x "$venv/bin/analysis-operator" ] || ! cmp -s "$repo/pyproject.toml" "$stamp"; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$repo[test,dev]"
  cp "$repo/pyproject.toml" "$stamp"
fi
"$here/build.sh" >/dev/null         # kube-apiserver & co., etcd, kubectl, KWOK, helm
