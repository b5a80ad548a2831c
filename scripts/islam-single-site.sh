#!/usr/bin/env bash
# Single-site baselines for the federated comparison: each hospital of the Dirichlet
# partition trains alone with the centralised run's configuration and is evaluated on
# the same held-out test groups (runs/fedreal/server-test).
# Usage: scripts/islam-single-site.sh SITE...   (for example site1 site3)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
for site in "$@"; do
    out="runs/fedreal/single-${site}"
    "$bin/nephrolith-client" train-local "runs/fedreal/sites/${site}" --out "$out" \
        --config configs/islam-compact128.json --cache-dir runs/cache
    "$bin/nephrolith-client" evaluate "$out/checkpoint" runs/fedreal/server-test \
        --out "$out/report-test" --cache-dir runs/cache
done
