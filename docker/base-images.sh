#!/usr/bin/env bash
# Base images from Debian packages, for machines that reach a Debian mirror but no container registry.
#
#   docker/base-images.sh            # makes the three images below unless they exist (FORCE=1 remakes them)
#
#   robust-ensembles/debian:bookworm       debootstrap --variant=minbase, imported with `docker import`
#   robust-ensembles/python:3.11-bookworm  Debian's python3 (3.11), venv and pip: PYTHON_IMAGE of the project image
#   robust-ensembles/postgres:15           Debian's postgresql-15 behind an entrypoint that reads POSTGRES_USER,
#                                          POSTGRES_PASSWORD and POSTGRES_DB like the official image: POSTGRES_IMAGE
#
# Then put the two lines it prints into .env. Users with a registry need none of this: the compose file's
# defaults are the public python:3.11-slim-bookworm and postgres:15. Needs root (debootstrap) and `debootstrap`
# (apt-get install debootstrap). The mirror is the host's (DEBIAN_MIRROR overrides it); the base keeps the
# host's apt sources, so apt inside the images uses the same mirror. Nothing else of the host is copied.
set -euo pipefail
cd "$(dirname "$0")"
PREFIX=${BASE_PREFIX:-robust-ensembles}
DEBIAN_TAG=$PREFIX/debian:bookworm
PYTHON_TAG=$PREFIX/python:3.11-bookworm
POSTGRES_TAG=$PREFIX/postgres:15
SOURCES=/etc/apt/sources.list.d/debian.sources
MIRROR=${DEBIAN_MIRROR:-$(awk '/^URIs:/{print $2; exit}' "$SOURCES" 2>/dev/null || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

have() { [ "${FORCE:-0}" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }
stamp() { printf '[base-images %s] %s\n' "$(date +%T)" "$*"; }

if ! have "$DEBIAN_TAG"; then
  command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
  root=$(mktemp -d /var/tmp/re-debian.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  stamp "debootstrap bookworm from $MIRROR"
  debootstrap --variant=minbase bookworm "$root" "$MIRROR" >/dev/null
  if [ -f "$SOURCES" ]; then
    cp "$SOURCES" "$root/etc/apt/sources.list.d/debian.sources" && rm -f "$root/etc/apt/sources.list"
  fi
  # snapshot mirrors serve Release files past their Valid-Until date
  printf 'Acquire::Check-Valid-Until "false";\nAcquire::Check-Date "false";\n' > "$root/etc/apt/apt.conf.d/99no-date-check"
  printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d" && chmod 755 "$root/usr/sbin/policy-rc.d"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
  tar -C "$root" --numeric-owner -c . | docker import -c 'CMD ["bash"]' -c 'ENV LANG=C.UTF-8' - "$DEBIAN_TAG" >/dev/null
  rm -rf "$root"; trap - EXIT
  stamp "made $DEBIAN_TAG"
fi
if ! have "$PYTHON_TAG"; then
  docker build -q --network host --build-arg "DEBIAN_IMAGE=$DEBIAN_TAG" -f base/python.Dockerfile -t "$PYTHON_TAG" base >/dev/null
  stamp "made $PYTHON_TAG"
fi
if ! have "$POSTGRES_TAG"; then
  docker build -q --network host --build-arg "DEBIAN_IMAGE=$DEBIAN_TAG" -f base/postgres.Dockerfile -t "$POSTGRES_TAG" base >/dev/null
  stamp "made $POSTGRES_TAG"
fi
echo "PYTHON_IMAGE=$PYTHON_TAG"
echo "POSTGRES_IMAGE=$POSTGRES_TAG"
