#!/usr/bin/env bash
# The demo: a server on a data dir inside the project, a volume written and read by
# qemu-io, shown by nbdinfo, then a clean stop.
set -euo pipefail
cd "$(dirname "$0")/.."
export DELTAVOL_DATA_DIR="$PWD/demo-data"
SOCK="$DELTAVOL_DATA_DIR/nbd.sock"
DV=.venv/bin/deltavol
rm -rf "$DELTAVOL_DATA_DIR"; mkdir -p "$DELTAVOL_DATA_DIR"

$DV serve --nbd-socket "$SOCK" 2>"$DELTAVOL_DATA_DIR/server.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ -S "$DELTAVOL_DATA_DIR/api.sock" ] && break; sleep 0.1; done

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
URI="nbd+unix:///prod?socket=$SOCK"
step $DV volume create prod --size 256MiB
step qemu-io -f raw -c 'write -P 0xa5 0 4M' -c 'write -P 0x5a 100M 1M' "$URI"
step qemu-io -f raw -c 'read -P 0xa5 0 4M' -c 'read -P 0x5a 100M 1M' -c 'read -P 0 50M 1M' "$URI"
step nbdinfo "$URI"
step nbdinfo --map "$URI"
step $DV volume list

kill -TERM $SERVER; wait $SERVER
trap - EXIT
echo; echo "demo: ok (server stopped cleanly; log in $DELTAVOL_DATA_DIR/server.log)"
