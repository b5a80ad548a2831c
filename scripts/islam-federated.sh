#!/usr/bin/env bash
# Federated training on the real Islam et al. kidney CT subset: three hospitals made
# by a Dirichlet (alpha 0.5) label-skewed partition over scan groups, a real server
# and three real clients on 127.0.0.1 over TLS. The test groups of the manifest are
# held out as the server's evaluation folder, the same groups the centralised and
# single-site baselines are evaluated on.
#
# Usage: scripts/islam-federated.sh STRATEGY [ROUNDS]   (STRATEGY: fedavg or fedprox)
# Needs runs/islam/manifest.csv from:
#   nephrolith-client check-data ../shared/data/ct-kidney-islam-subset \
#       --write-manifest runs/islam/manifest.csv --seed 0
set -euo pipefail
cd "$(dirname "$0")/.."
strategy="${1:?usage: $0 fedavg|fedprox [rounds]}"
rounds="${2:-5}"
bin=.venv/bin
run="runs/fedreal/${strategy}"
port="${PORT:-19092}"

test -d runs/fedreal/sites || "$bin/nephrolith-server" partition --data runs/islam/manifest.csv \
    --out runs/fedreal --hospitals 3 --partition dirichlet --alpha 0.5 --seed 0
test -f runs/fedreal/certs/ca.pem || "$bin/nephrolith-server" certs --out runs/fedreal/certs

rm -rf "$run"
mkdir -p "$run"
"$bin/nephrolith-server" start --address "127.0.0.1:${port}" --certs runs/fedreal/certs \
    --run-dir "$run" --strategy "$strategy" --mu 0.01 --rounds "$rounds" --min-clients 3 \
    --local-epochs 1 --batch-size 32 --lr 5e-4 \
    --model-config configs/islam-compact128.model.json \
    --preprocess-config configs/islam-compact128.preprocess.json \
    --train-config configs/islam-compact128.train.json \
    --server-data runs/fedreal/server-test --server-split test --no-console \
    > "$run/server.out" 2>&1 &
server=$!
sleep 15
clients=()
for site in site1 site2 site3; do
    "$bin/nephrolith-client" join --server "127.0.0.1:${port}" --ca runs/fedreal/certs/ca.pem \
        --data "runs/fedreal/sites/${site}" --name "$site" --workdir "$run/nodes/${site}" \
        --threads 1 > "$run/${site}.out" 2>&1 &
    clients+=($!)
done
wait "$server"
kill "${clients[@]}" 2>/dev/null || true
wait || true
echo "run folder: $run"
