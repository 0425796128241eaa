#!/usr/bin/env bash
# Build clipline's container images with podman (or buildah) on a machine without Docker.
#
#   images/build.sh [runtime|ingest|all|base]      (default: all)
#
# Environment (all optional):
#   VERSION=0.1.0                 image tag
#   ENGINE=podman                 podman or buildah (both run RUN steps with --isolation chroot)
#   BASE_IMAGE=python:3.11-slim-bookworm
#                                 the base both Dockerfiles start FROM; any Debian bookworm image with python3.11,
#                                 the venv module and apt
#   LOCAL_BASE=auto               1: build a local base first (debootstrap + podman import) and use it;
#                                 0: use BASE_IMAGE as it is (pulled by the engine if missing);
#                                 auto: use BASE_IMAGE if it is in local storage or can be pulled, else the local base
#   LOCAL_BASE_TAG=localhost/clipline-base:bookworm-py311
#   DEBIAN_MIRROR=                mirror for debootstrap; default: the first `deb` URI in this machine's apt sources
#   APT_SOURCES=                  apt source file bind-mounted into the build at /etc/apt/sources.list.d/debian.sources
#                                 (default: this machine's /etc/apt/sources.list.d/debian.sources if it exists), so
#                                 RUN apt-get uses the same mirror as the host and no mirror is written into an image
#   CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
#                                 mounted read-only at /host-ca.crt during the build; the Dockerfiles point pip at it
#                                 (PIP_CERT) only while it is there, so it never ends up in the image
#
# Idempotent: an existing local base is reused (LOCAL_BASE_REBUILD=1 remakes it); rebuilding an image reuses the
# engine's layer cache and moves the tag.
set -euo pipefail
rootfs=""

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
target="${1:-all}"

VERSION="${VERSION:-0.1.0}"
ENGINE="${ENGINE:-podman}"
BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim-bookworm}"
LOCAL_BASE="${LOCAL_BASE:-auto}"
LOCAL_BASE_TAG="${LOCAL_BASE_TAG:-localhost/clipline-base:bookworm-py311}"
LOCAL_BASE_REBUILD="${LOCAL_BASE_REBUILD:-0}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
APT_SOURCES="${APT_SOURCES:-}"
if [[ -z "$APT_SOURCES" && -f /etc/apt/sources.list.d/debian.sources ]]; then
  APT_SOURCES=/etc/apt/sources.list.d/debian.sources
fi

log() { printf '== %s\n' "$*" >&2; }

image_exists() { "$ENGINE" image exists "$1" 2>/dev/null || "$ENGINE" inspect --type image "$1" >/dev/null 2>&1; }

host_mirror() {
  # The first Debian archive URI this machine's apt uses (deb822 "URIs:" or one-line "deb URI suite ...").
  local uri
  uri="$(grep -h -s -m1 -E '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | head -n1 || true)"
  if [[ -z "$uri" ]]; then
    uri="$(grep -h -s -E '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}' | head -n1 || true)"
  fi
  printf '%s' "$uri"
}

build_local_base() {
  # A minimal Debian bookworm with python3.11 + venv + CA certificates, imported as an image. Its apt sources are
  # left empty: builds mount the host's (APT_SOURCES), so the mirror is never written into an image.
  if image_exists "$LOCAL_BASE_TAG" && [[ "$LOCAL_BASE_REBUILD" != 1 ]]; then
    log "local base $LOCAL_BASE_TAG exists (LOCAL_BASE_REBUILD=1 remakes it)"
    return
  fi
  command -v debootstrap >/dev/null || { echo "debootstrap not found: apt-get install debootstrap" >&2; exit 1; }
  [[ "$(id -u)" == 0 ]] || { echo "debootstrap needs root" >&2; exit 1; }
  local mirror="${DEBIAN_MIRROR:-$(host_mirror)}"
  [[ -n "$mirror" ]] || { echo "no Debian mirror found; set DEBIAN_MIRROR" >&2; exit 1; }
  rootfs="$(mktemp -d /var/tmp/clipline-base.XXXXXX)"
  trap 'rm -rf "$rootfs"' EXIT
  log "debootstrap bookworm (minbase + python3 python3-venv ca-certificates) into $rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" >&2
  # no mirror, resolver or host name of this machine in the image (the engine provides resolv.conf and hostname)
  : > "$rootfs/etc/apt/sources.list"
  : > "$rootfs/etc/resolv.conf"
  : > "$rootfs/etc/hostname"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/log/* "$rootfs"/tmp/*
  log "podman import -> $LOCAL_BASE_TAG"
  tar --numeric-owner -C "$rootfs" -c . | podman import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    - "$LOCAL_BASE_TAG" >/dev/null
  rm -rf "$rootfs"
}

resolve_base() {
  case "$LOCAL_BASE" in
    1) build_local_base; BASE_IMAGE="$LOCAL_BASE_TAG" ;;
    0) ;;
    auto)
      if image_exists "$BASE_IMAGE"; then
        :
      elif timeout 120 "$ENGINE" pull "$BASE_IMAGE" >/dev/null 2>&1; then
        :
      else
        log "$BASE_IMAGE is not available (no registry?); using a local base"
        build_local_base
        BASE_IMAGE="$LOCAL_BASE_TAG"
      fi ;;
    *) echo "LOCAL_BASE must be 0, 1 or auto" >&2; exit 2 ;;
  esac
  log "base image: $BASE_IMAGE"
}

build_image() {
  local name="$1" file="$2"
  # --format docker: the OCI format drops SHELL (RUN would run under /bin/sh without pipefail)
  local args=(build --isolation chroot --format docker --layers -f "$file" -t "$name:$VERSION" --build-arg "BASE_IMAGE=$BASE_IMAGE")
  [[ -f "$CA_BUNDLE" ]] && args+=(-v "$CA_BUNDLE:/host-ca.crt:ro")
  [[ -n "$APT_SOURCES" ]] && args+=(-v "$APT_SOURCES:/etc/apt/sources.list.d/debian.sources:ro")
  # podman/buildah read <Containerfile>.dockerignore next to the file given with -f; pass it explicitly as well
  [[ -f "$file.dockerignore" ]] && args+=(--ignorefile "$file.dockerignore")
  log "$ENGINE ${args[*]} $root"
  local start=$SECONDS
  "$ENGINE" "${args[@]}" "$root"
  log "built $name:$VERSION in $((SECONDS - start)) s"
}

case "$target" in
  base) build_local_base ;;
  runtime) resolve_base; build_image clipline "$here/runtime.Dockerfile" ;;
  ingest) resolve_base; build_image clipline-ingest "$here/ingest.Dockerfile" ;;
  all)
    resolve_base
    build_image clipline-ingest "$here/ingest.Dockerfile"
    build_image clipline "$here/runtime.Dockerfile" ;;
  *) echo "usage: $0 [runtime|ingest|all|base]" >&2; exit 2 ;;
esac
"$ENGINE" images --filter "reference=clipline*" >&2 || true
