#!/usr/bin/env bash
# Put kem in front of a running OpenAI-compatible server and watch an edit change the answer.
#
#   UPSTREAM=http://127.0.0.1:8000 examples/wrap_chat_assistant.sh   # your `vllm serve` (see docs/serving.md)
#   examples/wrap_chat_assistant.sh                                  # no upstream: an embedded SmolLM2 stands in
#
# Your chat assistant then talks to http://127.0.0.1:$KEM_PORT/v1 instead of the upstream: nothing else
# changes for it (same OpenAI API; out-of-scope requests reach the upstream byte-for-byte).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
KEM="${KEM:-$PY -m kem.server}"          # or `kem` once the main CLI mounts `serve`
KEM_PORT="${KEM_PORT:-8100}"
WORK="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

wait_up() { for _ in $(seq 300); do curl -sf "$1" >/dev/null && return 0; sleep 1; done; echo "not up: $1" >&2; exit 1; }

if [ -z "${UPSTREAM:-}" ]; then
    UPSTREAM="http://127.0.0.1:8101"
    echo "no UPSTREAM given: starting an embedded engine on $UPSTREAM" >&2
    $KEM serve --port 8101 --home "$WORK/engine" --log-level warning & PIDS+=($!)
    wait_up "$UPSTREAM/healthz"
fi

$KEM serve --port "$KEM_PORT" --home "$WORK/kem" --upstream "$UPSTREAM" --log-level warning & PIDS+=($!)
wait_up "http://127.0.0.1:$KEM_PORT/healthz"

# 1. Add an edit (Edit schema field names; the namespace comes from the API key when auth is on).
curl -s "http://127.0.0.1:$KEM_PORT/v1/edits" -H 'content-type: application/json' \
  -d '{"subject": "Kem Corporation", "prompt": "The CEO of {} is", "target_new": "Alice Zhang"}' >/dev/null

# 2. Ask with the official openai client, as any chat assistant would.
KEM_URL="http://127.0.0.1:$KEM_PORT/v1" "$PY" - <<'PY'
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ["KEM_URL"], api_key="none")
for q in ("Who is the CEO of Kem Corporation?", "What is the capital of Japan?"):
    raw = client.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": q}], max_tokens=16, temperature=0)
    resp = raw.parse()
    print(f"Q: {q}\nA: {resp.choices[0].message.content}\n   x-kem-edits: {raw.headers['x-kem-edits'] or '-'}")
PY
