#!/usr/bin/env bash
# Rehearse a deployment on one Linux host: the server and two hospitals each live
# in their own network namespace, joined by private veth links (10.77.x.0/24), so
# the hospitals reach the server only over its Fleet API address, as on a network.
# Nothing is reachable from outside the host: the namespaces have no route out.
#
# Usage (root, iproute2): deploy/netns-rehearsal.sh [WORKDIR] [ROUNDS]
# Needs the repository's .venv and the shared data (../shared/data).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(realpath -m "${1:-$REPO/runs/netns}")"
ROUNDS="${2:-2}"
BIN="$REPO/.venv/bin"
DATA="${NEPHROLITH_SHARED_DATA:-$REPO/../shared/data}/ct-kidney-islam-subset"
SRV=neph-srv
HOSPITALS=(neph-h1 neph-h2)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 2
    for ns in "$SRV" "${HOSPITALS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "run as root (ip netns needs CAP_NET_ADMIN)" >&2; exit 2; }
mkdir -p "$WORK"

# Namespaces and links: hospital i <-> server on 10.77.i.0/24.
ip netns add "$SRV"
ip -n "$SRV" link set lo up
for i in 1 2; do
    ns="${HOSPITALS[$((i - 1))]}"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add "veth-h$i" netns "$ns" type veth peer name "veth-s$i" netns "$SRV"
    ip -n "$ns" addr add "10.77.$i.2/24" dev "veth-h$i"
    ip -n "$SRV" addr add "10.77.$i.1/24" dev "veth-s$i"
    ip -n "$ns" link set "veth-h$i" up
    ip -n "$SRV" link set "veth-s$i" up
done

# Certificates for both server addresses, and two small hospitals from the real data.
"$BIN/nephrolith-server" certs --out "$WORK/certs" --host 10.77.1.1 --host 10.77.2.1 --overwrite
"$BIN/nephrolith-server" partition --data "$DATA" --out "$WORK/data" --hospitals 2 --partition iid

ip netns exec "$SRV" "$BIN/nephrolith-server" start --address 0.0.0.0:9092 \
    --certs "$WORK/certs" --run-dir "$WORK/run" --rounds "$ROUNDS" --tiny --image-size 32 \
    --batch-size 16 --min-clients 2 --no-console >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
sleep 15

# The control API is bound to the server's loopback: a hospital cannot open it.
CONTROL_PORT=$(sed -n 's/.*control 127.0.0.1:\([0-9]*\).*/\1/p' "$WORK/server.log" | head -1)
if ip netns exec neph-h1 timeout 5 bash -c "exec 3<>/dev/tcp/10.77.1.1/$CONTROL_PORT" 2>/dev/null; then
    echo "FAIL: control API reachable from a hospital" >&2; exit 1
fi
echo "control API (port $CONTROL_PORT) not reachable from a hospital: OK"

for i in 1 2; do
    ns="${HOSPITALS[$((i - 1))]}"
    ip netns exec "$ns" "$BIN/python" -m nephrolith.client.federation --server "10.77.$i.1:9092" \
        --ca "$WORK/certs/ca.pem" --data "$WORK/data/sites/site$i" --workdir "$WORK/node$i" \
        --threads 1 >"$WORK/client$i.log" 2>&1 &
    PIDS+=("$!")
done

wait "$SERVER_PID"
echo "server exit code $?; round log: $WORK/run/rounds.jsonl"
"$BIN/nephrolith-server" monitor "$WORK/run" --no-follow
