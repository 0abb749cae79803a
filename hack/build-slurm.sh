#!/usr/bin/env bash
# Builds Slurm from its upstream source tarball into a versioned directory outside
# the repo (cached like hack/build.sh's Kubernetes binaries) and prints the installed
# prefix, nothing else on stdout. Safe to run repeatedly: a finished build is kept.
#
#   hack/build-slurm.sh [TARBALL]
#
# TARBALL (or SLURM_TARBALL): an upstream slurm-<version>.tar.{gz,bz2}; default
# ../shared/vendor/slurm-25.05.8.tar.gz beside the repository. A copy of a version
# this script knows (25.05.8) must have the known sha256; another version is built
# as it is, into its own directory, with a note that nothing checked it.
#
# Result: $SLURM_INSTALL_ROOT/slurm-<version>, default /opt/analysis-operator (bin, sbin,
# lib with the plugins; binaries stripped; no static archives, headers or manuals: about
# 16 MB instead of 408). Not under ~/.cache like the Go binaries: the daemons drop to their
# own users (slurmctld to SlurmUser before it loads a plugin, slurmrestd to its -u user)
# and must read the tree, and root's home is mode 0700; the jobs' JupyterLab lives in
# /opt/analysis-operator for the same reason. The prefix is compiled in, so it is the
# place the daemons run from. Built in a temporary directory beside it, installed with
# DESTDIR and moved into place last, so an interrupted build leaves nothing that looks
# finished. One build at a time: the lock hack/build.sh takes (ANALYSIS_OPERATOR_CACHE,
# default ~/.cache/analysis-operator, /.build.lock). About 7 minutes on 2 cores.
# Build dependencies (apt): hack/install-deps.sh.
set -euo pipefail
umask 022
here=$(cd "$(dirname "$0")" && pwd)
CACHE=${ANALYSIS_OPERATOR_CACHE:-$HOME/.cache/analysis-operator}
INSTALL_ROOT=${SLURM_INSTALL_ROOT:-/opt/analysis-operator}
# The release the local stack runs (hack/slurm.sh reads it from here).
DEFAULT_RELEASE=25.05.8
# Default: the project's shared vendor folder beside the clone, or where this kind of machine keeps it.
default_tarball() {
  local candidate
  for candidate in "$here/../../shared/vendor" /work/shared/vendor; do
    [ -f "$candidate/slurm-$DEFAULT_RELEASE.tar.gz" ] && { echo "$candidate/slurm-$DEFAULT_RELEASE.tar.gz"; return; }
  done
  echo "$here/../../shared/vendor/slurm-$DEFAULT_RELEASE.tar.gz"
}
TARBALL=${1:-${SLURM_TARBALL:-$(default_tarball)}}
# Versions whose upstream tarball this script knows: version -> sha256.
declare -A KNOWN_SHA256=(
  [25.05.8]=beac66e778b75aaab2e480065e2ff3b167da0a9aafea678c791804889108d09f
)
# Bump when the configure options or what is kept change, so caches rebuild.
BUILD_REVISION=1

log() { echo "build-slurm.sh: $*" >&2; }
die() { log "$*"; exit 1; }

[ -f "$TARBALL" ] || die "no Slurm source tarball at $TARBALL: pass its path (or SLURM_TARBALL)"
TARBALL=$(cd "$(dirname "$TARBALL")" && pwd)/$(basename "$TARBALL")

# The version from the tarball's name (slurm-25.05.8.tar.gz, slurm-25.05.8-1.tar.bz2).
name=$(basename "$TARBALL")
[[ $name =~ ^slurm-([0-9]+\.[0-9]+\.[0-9]+)(-[0-9]+)?\.tar\.(gz|bz2)$ ]] ||
  die "$name: expected an upstream Slurm tarball named slurm-<major>.<minor>.<patch>.tar.gz or .tar.bz2"
VERSION=${BASH_REMATCH[1]}
PREFIX=$INSTALL_ROOT/slurm-$VERSION
STAMP=$PREFIX/.complete

finished() { [ -s "$STAMP" ] && [ "$(sed -n 's/^revision=//p' "$STAMP")" = "$BUILD_REVISION" ] &&
  [ -x "$PREFIX/sbin/slurmctld" ] && [ -x "$PREFIX/sbin/slurmrestd" ]; }

# The source first, even when built already: a copy that is not what it says is an error.
sha=$(sha256sum "$TARBALL" | cut -d' ' -f1)
if [ -n "${KNOWN_SHA256[$VERSION]:-}" ]; then
  [ "$sha" = "${KNOWN_SHA256[$VERSION]}" ] ||
    die "$TARBALL has sha256 $sha, not the upstream slurm-$VERSION's ${KNOWN_SHA256[$VERSION]}: refusing it"
elif ! finished; then
  log "slurm-$VERSION is not a version this script knows (${!KNOWN_SHA256[*]}): building it unchecked (sha256 $sha)"
fi
if finished; then echo "$PREFIX"; exit 0; fi

mkdir -p "$CACHE"
install -d -m 0755 "$INSTALL_ROOT"
exec 9>"$CACHE/.build.lock"
flock 9
if finished; then echo "$PREFIX"; exit 0; fi   # built by whoever held the lock before us


for header in munge.h jwt.h json-c/json.h http_parser.h; do
  [ -e "/usr/include/$header" ] || die "/usr/include/$header missing: run hack/install-deps.sh (Slurm's build dependencies)"
done

# Whatever an interrupted build left (we hold the lock, so nobody else is building).
rm -rf "$INSTALL_ROOT/slurm-$VERSION.build."* "$PREFIX.old"
work=$(mktemp -d "$INSTALL_ROOT/slurm-$VERSION.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

started=$SECONDS
log "building Slurm $VERSION from $TARBALL into $PREFIX (about 7 min on 2 cores)"
tar -xf "$TARBALL" -C "$work"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'slurm-*' | head -n1)
[ -n "$src" ] && [ -x "$src/configure" ] || die "$TARBALL holds no slurm-*/configure"
(
  cd "$src"
  # The prefix is compiled in (plugins, rpath): configure for the final place, install into DESTDIR.
  ./configure --prefix="$PREFIX" --sysconfdir="$PREFIX/etc" \
    --enable-slurmrestd --with-jwt --with-json --with-http-parser --with-yaml --with-munge \
    --disable-sview --without-hdf5 --disable-debug >"$work/configure.log" 2>&1 ||
    { tail -n 30 "$work/configure.log" >&2; exit 1; }
  grep -q 'whether to compile slurmrestd... yes' "$work/configure.log" ||
    { log "configure will not build slurmrestd:"; grep -i -A3 'slurmrestd' "$work/configure.log" >&2; exit 1; }
  make -j"$(nproc)" >"$work/make.log" 2>&1 || { tail -n 40 "$work/make.log" >&2; exit 1; }
  make install DESTDIR="$work/root" >"$work/install.log" 2>&1 || { tail -n 40 "$work/install.log" >&2; exit 1; }
)
staged=$work/root$PREFIX
# What runs stays: binaries, shared libraries, plugins. Static archives, libtool files,
# headers and manuals go (325 of the 408 MB are .a files).
find "$staged" \( -name '*.a' -o -name '*.la' \) -delete
rm -rf "$staged/include" "$staged/share"
find "$staged/bin" "$staged/sbin" -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
find "$staged/lib" -name '*.so*' -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
LD_LIBRARY_PATH="$staged/lib/slurm:$staged/lib" "$staged/sbin/slurmctld" -V >/dev/null ||
  die "the built slurmctld does not run"
printf 'version=%s\nsha256=%s\nrevision=%s\nseconds=%s\n' \
  "$VERSION" "$sha" "$BUILD_REVISION" "$((SECONDS - started))" >"$staged/.complete"
# Readable by everyone: the daemons switch to their own users, jobs run as the facility's.
chmod -R go+rX "$staged"

if [ -e "$PREFIX" ]; then mv "$PREFIX" "$PREFIX.old"; fi
mv "$staged" "$PREFIX"
rm -rf "$PREFIX.old"
log "built Slurm $VERSION in $((SECONDS - started)) s: $PREFIX ($(du -sh "$PREFIX" | cut -f1))"
echo "$PREFIX"
