#!/usr/bin/env bash
# Nightly: bake the day's edits into a new model version, then hot-swap `kem serve` to it.
#
# cron (03:00 every night):
#   0 3 * * * cd /srv/kem && KEM_ADMIN_KEY=sk-ops examples/nightly_consolidation.sh >> /var/log/kem-nightly.log 2>&1
#
# KEM_HOME       the edit store kem serve uses (default ./kem-data)
# KEM_URL        the running server (default http://127.0.0.1:8000)
# KEM_ADMIN_KEY  an admin key from the keys file (a line `KEY *`), if auth is on
# METHOD         consolidation method (memit by default)
set -euo pipefail
cd "$(dirname "$0")/.."
KEM="${KEM:-.venv/bin/kem}"
KEM_HOME="${KEM_HOME:-kem-data}"
KEM_URL="${KEM_URL:-http://127.0.0.1:8000}"
METHOD="${METHOD:-memit}"
VERSION="v$(date -u +%Y%m%d)"
OUT="$KEM_HOME/versions/$VERSION"

echo "$(date -u +%FT%TZ) consolidating into $OUT with $METHOD"
# `kem consolidate` writes the new model folder and marks the edits it absorbed as consolidated_in=$VERSION
# (see `kem consolidate --help` for its options).
"$KEM" consolidate --home "$KEM_HOME" --method "$METHOD" --version "$VERSION" --out "$OUT"

# Hot swap: kem loads the folder beside the running model, swaps atomically (no request fails), and
# from now on skips the edits $VERSION absorbed.
AUTH=()
[ -n "${KEM_ADMIN_KEY:-}" ] && AUTH=(-H "authorization: Bearer $KEM_ADMIN_KEY")
curl -sf "${AUTH[@]}" -H 'content-type: application/json' "$KEM_URL/admin/reload" \
     -d "{\"path\": \"$(cd "$OUT" && pwd)\", \"version\": \"$VERSION\"}"
echo
