#!/usr/bin/env bash
# The demo: a server on a data dir inside the project; a volume written by qemu-io; a
# session that copies it to a second volume with a full update, then an incremental one;
# each result compared byte for byte (qemu-img compare, qemu-io -P, session verify).
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
COPY="nbd+unix:///copy?socket=$SOCK"
step $DV volume create prod --size 256MiB
step $DV volume create copy --size 256MiB
step qemu-io -f raw -c 'write -P 0xa5 0 4M' -c 'write -P 0x5a 100M 1M' "$URI"
step nbdinfo --map "$URI"

step $DV session create nightly --source prod --target copy
step $DV session update nightly --full --wait
step qemu-img compare -f raw -F raw "$URI" "$COPY"

# change a little, then copy only what changed
step qemu-io -f raw -c 'write -P 0xc3 8M 192K' -c 'write -P 0x3c 200M 64K' "$URI"
step $DV session update nightly --wait
step $DV session status nightly
step qemu-img compare -f raw -F raw "$URI" "$COPY"
step qemu-io -r -f raw -c 'read -P 0xc3 8M 192K' -c 'read -P 0x3c 200M 64K' -c 'read -P 0xa5 0 4M' "$COPY"
step $DV session verify nightly
step $DV volume list

kill -TERM $SERVER; wait $SERVER
trap - EXIT
echo; echo "demo: ok (server stopped cleanly; log in $DELTAVOL_DATA_DIR/server.log)"
