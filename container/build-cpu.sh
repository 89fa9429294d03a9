#!/usr/bin/env bash
# Build the CPU image of megatron_lpreg with podman (`make image` runs this, then container/smoke.sh).
#
#   container/build-cpu.sh            build localhost/megatron-lpreg:cpu (and the base image, if missing)
#
# No registry base image is reachable on the test machines, so the base is made here: `debootstrap --variant=minbase
# bookworm` from the Debian mirror the host's apt uses, imported as localhost/mlpreg-base:bookworm (Python 3.11).
# pip inside the build uses the host's own package sources (`pip config list` and PIP_* variables: index URLs,
# find-links, constraint file, CA bundle): each local directory is mounted read-only at the same path for the
# build, each file under /run/mlpreg-pip/, and passed as a build argument; none of them is copied into the image.
# Runs as root (apt, debootstrap, rootful podman); installs podman, runc and debootstrap when they are missing.
#
# Environment (all optional):
#   MLPREG_IMAGE         image to build (default localhost/megatron-lpreg:cpu)
#   MLPREG_BASE_IMAGE    base image (default localhost/mlpreg-base:bookworm; made with debootstrap if missing)
#   MLPREG_DEBIAN_MIRROR mirror for debootstrap (default: the first URIs/deb line of the host's apt sources)
#   MLPREG_HOST_PYTHON   interpreter whose `pip config list` names the package sources (default .venv/bin/python,
#                        else python3)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${MLPREG_IMAGE:-localhost/megatron-lpreg:cpu}
BASE=${MLPREG_BASE_IMAGE:-localhost/mlpreg-base:bookworm}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$REPO/container/containers.conf}

log() { echo "build-cpu: $*" >&2; }
die() { log "error: $*"; exit 1; }

ensure_packages() {
  local missing=() bin
  for bin in podman runc debootstrap; do command -v "$bin" >/dev/null 2>&1 || missing+=("$bin"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]} and not root: install podman runc debootstrap"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install podman, runc, debootstrap"
  log "installing podman runc debootstrap (missing: ${missing[*]})"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >&2
}

debian_mirror() {
  [[ -n ${MLPREG_DEBIAN_MIRROR:-} ]] && { echo "$MLPREG_DEBIAN_MIRROR"; return; }
  local uri
  uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}')
  [[ -n $uri ]] || uri=$(awk '/^deb / && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

make_base() {   # debootstrap a minimal bookworm and import it as $BASE
  podman image exists "$BASE" && return 0
  local t0=$SECONDS rootfs mirror
  rootfs=$(mktemp -d /var/tmp/mlpreg-rootfs.XXXXXX)
  mirror=$(debian_mirror)
  log "making $BASE with debootstrap from $mirror"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 ||
    { tail -20 "$rootfs.log" >&2; die "debootstrap failed (log: $rootfs.log)"; }
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$mirror" "$mirror" >"$rootfs/etc/apt/sources.list"
  tar -C "$rootfs" -c . | podman import - "$BASE" >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
  log "base $BASE in $((SECONDS - t0)) s"
}

# Fills BUILD_ARGS with --build-arg PIP_*=... and -v PATH:PATH:ro for every local path they name.
pip_sources() {
  local py=${MLPREG_HOST_PYTHON:-}
  [[ -n $py ]] || { [[ -x $REPO/.venv/bin/python ]] && py=$REPO/.venv/bin/python || py=python3; }
  local config key var value token path
  config=$("$py" -m pip config list 2>/dev/null || true)
  BUILD_ARGS=()
  declare -A mounted=()
  for key in index-url extra-index-url find-links cert constraint; do
    var=PIP_$(tr 'a-z-' 'A-Z_' <<<"$key")
    value=${!var:-}
    [[ -n $value ]] || value=$(sed -n "s/^[^.]*\.$key='\(.*\)'$/\1/p" <<<"$config" | tail -n 1)
    [[ -n $value ]] || continue
    if [[ -f $value ]]; then
      # A file (CA bundle, constraint file) goes elsewhere: at its own path it would sit on files that packages
      # of the build install (ca-certificates cannot replace a mounted /etc/ssl/certs/ca-certificates.crt).
      BUILD_ARGS+=(-v "$value:/run/mlpreg-pip/${value##*/}:ro" --build-arg "$var=/run/mlpreg-pip/${value##*/}")
      continue
    fi
    BUILD_ARGS+=(--build-arg "$var=$value")
    for token in $value; do   # directories: index URLs (file://.../simple) and find-links
      path=${token#file://}
      [[ $path == /* && -d $path ]] || continue
      [[ $path == */simple || $path == */simple/ ]] && path=$(dirname "${path%/}")   # links point at ../../files
      [[ -n ${mounted[$path]:-} ]] && continue
      mounted[$path]=1
      BUILD_ARGS+=(-v "$path:$path:ro")
    done
  done
}

main() {
  ensure_packages
  local t0=$SECONDS
  make_base
  pip_sources
  log "building $IMAGE (${BUILD_ARGS[*]})"
  podman build --network=host --ignorefile "$REPO/container/containerignore" -f "$REPO/container/Containerfile.cpu" \
    --build-arg "BASE_IMAGE=$BASE" "${BUILD_ARGS[@]}" -t "$IMAGE" "$REPO" >&2
  local size
  size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
  log "built $IMAGE in $((SECONDS - t0)) s ($((size / 1000000)) MB)"
}

main "$@"
