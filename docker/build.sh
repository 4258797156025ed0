#!/usr/bin/env bash
# Builds edgevit's container images; the build context is the repository root.
#
#   docker/build.sh [host|jetson|all] [--load | --push] [--cpu-torch] [--repo NAME] [--setup-qemu] [--dry-run]
#
#   host     edgevit/host:<version>            linux/amd64, docker/host.Dockerfile
#   jetson   edgevit/jetson:<version>-r32.7.1  linux/arm64, docker/jetson.Dockerfile (JetPack 4.6.1)
#   all      both (the default)
#
#   --load        load the result into the local docker image store (default)
#   --push        push to the registry instead (tag with --repo REGISTRY/NAMESPACE first)
#   --cpu-torch   host image with CPU-only torch wheels (download.pytorch.org/whl/cpu)
#   --repo NAME   image name prefix instead of "edgevit", e.g. ghcr.io/me/edgevit
#   --setup-qemu  register QEMU arm64 emulation first (a privileged container):
#                 docker run --privileged --rm tonistiigi/binfmt --install arm64
#   --dry-run     print the docker commands instead of running them
#
# <version> is [project] version in pyproject.toml. Building the Jetson image on an x86-64
# machine needs docker buildx and QEMU's arm64 binfmt handler (see --setup-qemu); on a Jetson
# itself it builds natively.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
L4T=r32.7.1

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2; exit "$1"; }
die() { echo "build.sh: error: $*" >&2; exit 2; }

target=all output=--load cpu_torch=0 repo=edgevit setup_qemu=0 dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    host|jetson|all) target=$1 ;;
    --load|--push) output=$1 ;;
    --cpu-torch) cpu_torch=1 ;;
    --repo) [ $# -ge 2 ] || die "--repo needs a value"; repo=$2; shift ;;
    --repo=*) repo=${1#--repo=} ;;
    --setup-qemu) setup_qemu=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage 0 ;;
    *) echo "build.sh: error: unknown argument: $1" >&2; usage 2 ;;
  esac
  shift
done

# The version from pyproject.toml's [project] table, checked before it goes into a tag.
version=$(awk '
  /^\[/ { in_project = ($0 == "[project]") ; next }
  in_project && /^version[[:space:]]*=/ { sub(/^[^=]*=[[:space:]]*"/, ""); sub(/".*$/, ""); print; exit }
' "$root/pyproject.toml")
[[ $version =~ ^[0-9A-Za-z][0-9A-Za-z._+-]*$ ]] || die "no usable [project] version in pyproject.toml (got '$version')"
version=${version//+/-}  # '+' is not allowed in a docker tag
[[ $repo =~ ^[a-z0-9]+([._/:-][a-z0-9]+)*$ ]] || die "--repo '$repo' is not a valid image name prefix"

run() {
  if [ "$dry_run" = 1 ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

need_buildx() {
  [ "$dry_run" = 1 ] && return 0
  docker buildx version >/dev/null 2>&1 || die "docker buildx is missing (install the docker-buildx plugin)"
}

build_host() {
  local tag="$repo/host:$version"
  local args=(--platform linux/amd64 -f "$root/docker/host.Dockerfile" --build-arg "EDGEVIT_VERSION=$version")
  if [ "$cpu_torch" = 1 ]; then
    args+=(--build-arg "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
  fi
  need_buildx
  run docker buildx build "${args[@]}" -t "$tag" "$output" "$root"
  echo "built $tag" >&2
}

build_jetson() {
  local tag="$repo/jetson:$version-$L4T"
  need_buildx
  if [ "$setup_qemu" = 1 ]; then
    run docker run --privileged --rm tonistiigi/binfmt --install arm64
  elif [ "$dry_run" = 0 ] && [ "$(uname -m)" != aarch64 ] && [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    die "no QEMU arm64 emulation registered on this $(uname -m) machine; run once:
  docker run --privileged --rm tonistiigi/binfmt --install arm64
(or pass --setup-qemu)"
  fi
  run docker buildx build --platform linux/arm64 -f "$root/docker/jetson.Dockerfile" \
    --build-arg "EDGEVIT_VERSION=$version" -t "$tag" "$output" "$root"
  echo "built $tag" >&2
}

case "$target" in
  host) build_host ;;
  jetson) build_jetson ;;
  all) build_host; build_jetson ;;
esac
