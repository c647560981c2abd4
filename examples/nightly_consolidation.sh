#!/usr/bin/env bash
# Nightly: bake the pending edits into a new model version, then hot-swap `kem serve` to it.
#
# cron (03:00 every night):
#   0 3 * * * cd /srv/kem && KEM_ADMIN_KEY=sk-ops examples/nightly_consolidation.sh >> /var/log/kem-nightly.log 2>&1
#
# KEM_HOME       the data folder `kem serve --home` uses (default ./kem-data); versions go to $KEM_HOME/models/vN
# KEM_URL        the running server (default http://127.0.0.1:8000); unset KEM_URL="" to skip the swap
# KEM_ADMIN_KEY  an admin key from the keys file (a line `KEY *`), if auth is on
# METHOD         consolidation method (memit by default; see `kem consolidate --help`)
# CONSOLIDATE_ARGS  more options for `kem consolidate` (e.g. "--namespace default --cov-samples 200"; only shared namespaces, KEM_SHARED_NAMESPACES)
#
# `kem consolidate` publishes models/vN (parent: the current version), points models/current at it and
# marks the absorbed edits consolidated_in=vN; it exits 1 (and publishes nothing) when the reliability
# or locality gate fails. The server then loads vN (vLLM: weights reloaded in place; no request fails)
# and skips the edits of vN and its ancestors. Upstream mode: see docs/serving.md section 5.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
KEM_HOME="${KEM_HOME:-kem-data}"
KEM_URL="${KEM_URL-http://127.0.0.1:8000}"
METHOD="${METHOD:-memit}"

echo "$(date -u +%FT%TZ) consolidating the pending edits of $KEM_HOME with $METHOD"
OUT="$(mktemp)"
trap 'rm -f "$OUT"' EXIT
"$PY" -m kem consolidate --home "$KEM_HOME" --method "$METHOD" ${CONSOLIDATE_ARGS:-} --json > "$OUT"
VERSION="$("$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); print(r["version"] if r["published"] else "")' "$OUT")"
"$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["message"])' "$OUT"
if [ -z "$VERSION" ]; then
    echo "nothing published; the server keeps its model"
    exit 0
fi

if [ -n "$KEM_URL" ]; then
    AUTH=()
    [ -n "${KEM_ADMIN_KEY:-}" ] && AUTH=(-H "authorization: Bearer $KEM_ADMIN_KEY")
    curl -sf "${AUTH[@]}" -H 'content-type: application/json' "$KEM_URL/admin/reload" -d "{\"version\": \"$VERSION\"}"
    echo
fi
