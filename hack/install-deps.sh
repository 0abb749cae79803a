#!/usr/bin/env bash
# Installs everything the local stack and the tests need, on Debian 12 as root:
# apt packages (Slurm 22.05, munge and what Slurm 25.05 builds with, OpenStack's Python services,
# MariaDB, RabbitMQ, Chromium and its WebDriver for the browser tests),
# the Python package with its test and dev extras in a virtual environment at
# <repo>/.venv (which hack/test.sh, hack/up.sh and hack/check.sh use), and the
# Go-built Kubernetes binaries and Traefik (cached in ~/.cache/analysis-operator), and Slurm
# 25.05 built from ../shared/vendor (hack/build-slurm.sh, into /opt/analysis-operator; about
# 7 minutes the first time; SLURM_TARBALL=<path> for a copy elsewhere).
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
          munge slurmctld slurmd slurm-client slurmrestd slurm-wlm-jwt-plugin
          build-essential pkg-config libmunge-dev libjwt-dev libjson-c-dev libhttp-parser-dev libyaml-dev
          chromium chromium-driver
          tigervnc-standalone-server novnc websockify    # the VM desktop's stand-in in the OPEN tests
          libjemalloc2)                                  # the allocator the operator's image runs with
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
"$here/build.sh" >/dev/null         # kube-apiserver & co., etcd, kubectl, KWOK, helm, Traefik
for module in "$here"/testcluster/k8s-v*.mod; do   # the oldest and newest supported releases (tests/versions/)
  version=$(basename "$module" .mod)
  K8S_VERSION=${version#k8s-} "$here/build.sh" >/dev/null
done
"$here/build-slurm.sh" >/dev/null   # Slurm 25.05 for hack/slurm.sh (the default SLURM_VERSION)

# JupyterLab for the local Slurm's jobs (hack/slurm.sh reads the version from here): a virtual
# environment the job users (alice, bob, carol) can read and run, so neither under /root (mode
# 0700) nor made with an interpreter from there: Debian's own python3. Made again only when
# absent or unfinished (.installed is written last).
jupyterlab_version=4.6.6
jupyterlab=/opt/analysis-operator/jupyterlab-$jupyterlab_version
if ! [ -e "$jupyterlab/.installed" ]; then
  if ! /usr/bin/python3 -c 'import ensurepip' 2>/dev/null; then
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends python3-venv >/dev/null
  fi
  (
    umask 022
    /usr/bin/python3 -m venv --clear "$jupyterlab"
    "$jupyterlab/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir \
      "jupyterlab==$jupyterlab_version"
    touch "$jupyterlab/.installed"
  )
fi
