#!/usr/bin/env bash
# Installs what deltavol needs on a fresh Debian machine: the NBD peers it is tested
# against (Debian packages) and a virtual environment from pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(qemu-utils nbdkit libnbd-bin nbdfuse python3-libnbd fio fuse3 e2fsprogs util-linux
    gcc pkg-config libfuse3-dev  # these three build tests/powercut/cutfs.c
    gnutls-bin  # certtool: the TLS tests' certificates
    prometheus chromium chromium-driver  # tests/obs: a real scraper and a real browser
    qemu-system-common)  # qemu-storage-daemon, the bench's copy-before-write peer
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.installed
if [ ! -x .venv/bin/python ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: building .venv from pyproject.toml"
    "$PY" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi
