"""Where edit-follower adapters live and how an engine finds the one for its model.

kem ships a trained adapter for its default model under ``kem/data/adapters/<model name>/`` (fp16
safetensors, ``adapter_config.json``, ``manifest.json``). ``KEM_FOLLOWER`` names another folder, or
``none`` to serve without one. The manifest's ``base_model`` fingerprint must match the loaded model:
an adapter trained on other weights is refused (a consolidated version changes a few MLP matrices
only and keeps its base's fingerprint, see :func:`embedding_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kem.errors import ModelError

if TYPE_CHECKING:
    from kem.settings import Settings

log = logging.getLogger(__name__)

#: The name an in-scope request uses for the adapter (vLLM's LoRA name, peft's adapter name).
FOLLOWER_NAME = "kem-editor"


def default_adapter_dir(model: str) -> Path | None:
    """The adapter that ships with kem for the packaged model ``model`` (None for other models)."""
    key = Path(str(model)).name.lower()
    p = Path(str(resources.files("kem").joinpath("data/adapters").joinpath(key)))
    return p if (p / "adapter_config.json").exists() else None


def resolve_follower(setting: str | None, model: str) -> Path | None:
    """The adapter folder for ``model`` given the ``KEM_FOLLOWER`` setting (``auto`` | ``none`` | a folder)."""
    if setting in (None, "", "auto"):
        return default_adapter_dir(model)
    if setting == "none":
        return None
    p = Path(setting).expanduser()
    if not (p / "adapter_config.json").exists():
        raise ModelError(f"KEM_FOLLOWER={setting!r}: no adapter_config.json there (train one with kem follower train)")
    return p


def follower_for(settings: Settings) -> Path | None:
    """The edit-follower the engines of ``settings`` load: the ``KEM_FOLLOWER`` folder for the base model
    (``settings.model``, also when serving one of its consolidated versions), or None with
    ``KEM_FAST_PATH=ike``."""
    return resolve_follower(settings.follower, settings.model) if settings.fast_path == "adapter" else None


def read_manifest(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "manifest.json"
    return json.loads(f.read_text(encoding="utf-8")) if f.exists() else {}


def embedding_fingerprint(model: Any) -> str:
    """A short content hash of a model's token embeddings and architecture (the parts no kem
    consolidation changes), recorded in an adapter's manifest to check it is loaded on its base.
    Not :func:`kem.consolidation.shared.prompts.model_fingerprint`, which hashes every parameter and so
    changes with each consolidated version."""
    import torch

    h = hashlib.sha256()
    cfg = model.config
    h.update(f"{cfg.model_type}:{cfg.num_hidden_layers}:{cfg.hidden_size}:{cfg.vocab_size}".encode())
    emb = model.get_input_embeddings().weight.detach()
    h.update(emb[:: max(1, emb.shape[0] // 512)].to(torch.float32).cpu().numpy().tobytes())
    return f"{cfg.model_type}-{h.hexdigest()[:16]}"


def check_base(path: str | Path, model: Any) -> None:
    """Refuse an adapter trained on another base model (manifest fingerprint mismatch)."""
    want = read_manifest(path).get("base_model")
    if want:
        got = embedding_fingerprint(model)
        if want != got:
            raise ModelError(f"edit-follower {path} was trained on {want}, not on the loaded model ({got})")
