"""A sentence-transformers model as one ONNX graph (transformer + pooling + L2 normalisation), exported
once into kem's cache, plus its int8 twin (dynamic quantisation of the MatMul weights, per channel).

The graph takes ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model has them),
int64, shape ``(batch, seq)``, and returns ``embedding``, float32, shape ``(batch, dim)``, unit L2 norm.
The folder ``<cache_dir>/models/<name>-onnx/`` holds ``model.onnx``, ``model-int8.onnx``,
``tokenizer.json`` and ``meta.json``; it is written aside and renamed into place under a file lock (two
first runs cannot corrupt it) and re-exported when the source model's weights change. Nothing comes
from a model hub: the source is the local sentence-transformers folder (:func:`kem.models.resolve_model`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from kem.errors import ModelError
from kem.models import resolve_model

log = logging.getLogger(__name__)

EXPORT_VERSION = 1  # bump when the exported graph changes: cached exports are redone
FP32, INT8 = "model.onnx", "model-int8.onnx"


def _fingerprint(folder: Path) -> str:
    """What the export depends on, by content (two venvs holding the same model package agree): the
    config files whole, the weight files by size and their first and last MiB; and kem's format."""
    h = hashlib.sha1(f"kem-onnx-export {EXPORT_VERSION}".encode())
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".txt"):
            size = p.stat().st_size
            h.update(f"\n{p.relative_to(folder)} {size}\n".encode())
            with p.open("rb") as f:
                if size <= 2 << 20:
                    h.update(f.read())
                else:
                    h.update(f.read(1 << 20))
                    f.seek(-(1 << 20), os.SEEK_END)
                    h.update(f.read())
    return h.hexdigest()


def _st_config(folder: Path) -> tuple[str, int]:
    """The pooling mode (``"mean"`` or ``"cls"``) and max sequence length of a sentence-transformers folder."""
    pooling, max_len = "mean", 512
    modules = folder / "modules.json"
    if modules.is_file():
        for m in json.loads(modules.read_text()):
            if m.get("type", "").endswith("Pooling"):
                cfg_path = folder / m.get("path", "") / "config.json"
                cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
                if cfg.get("pooling_mode_cls_token"):
                    pooling = "cls"
                elif not cfg.get("pooling_mode_mean_tokens", True) or any(
                        cfg.get(k) for k in ("pooling_mode_max_tokens", "pooling_mode_weightedmean_tokens",
                                             "pooling_mode_lasttoken", "pooling_mode_mean_sqrt_len_tokens")):
                    raise ModelError(f"the ONNX embedder supports mean or CLS pooling only ({cfg_path}); "
                                     "use KEM_EMBEDDER_BACKEND=torch for this model")
    sb = folder / "sentence_bert_config.json"
    if sb.is_file():
        max_len = int(json.loads(sb.read_text()).get("max_seq_length") or max_len)
    return pooling, max_len


def exported(name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> Path:
    """The folder of the exported model (exporting it first if needed: MiniLM 5 s quiet, 20 s loaded).

    Args:
        name_or_path: A packaged embedder name or a local sentence-transformers folder.
        cache_dir: kem's cache dir.

    Raises:
        ModelError: the model cannot be found or exported.
    """
    from filelock import FileLock

    src = resolve_model(name_or_path, cache_dir)
    tag = str(name_or_path).lower() if not Path(os.fspath(name_or_path)).expanduser().is_dir() else \
        f"{src.name}-{hashlib.sha1(str(src).encode()).hexdigest()[:8]}"
    out = Path(cache_dir).expanduser() / "models" / f"{tag}-onnx"
    fp = _fingerprint(src)

    def ready() -> bool:
        meta = out / "meta.json"
        return meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fp

    if ready():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock", timeout=1800):
        if ready():  # another process exported it while we waited
            return out
        log.warning("Exporting the embedder %s to ONNX in %s, once (5-20 s)...", name_or_path, out)
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{tag}-onnx.", dir=out.parent))
        try:
            meta = _export(src, tmp)
            meta["fingerprint"] = fp
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            tmp.chmod(0o755)  # mkdtemp made it private; it is a cache like models/<name>
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except ModelError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelError(f"exporting the embedder at {src} to ONNX failed: {exc}") from exc
        log.warning("Exported the embedder in %.1f s", time.perf_counter() - t0)
    return out


def _export(src: Path, dst: Path) -> dict[str, Any]:
    import inspect

    import torch
    from transformers import AutoModel, AutoTokenizer

    pooling, max_len = _st_config(src)
    model = AutoModel.from_pretrained(src, attn_implementation="eager").eval()  # eager: a clean trace
    tok = AutoTokenizer.from_pretrained(src)
    if not getattr(tok, "is_fast", False) or not (src / "tokenizer.json").is_file():
        raise ModelError(f"the ONNX embedder needs a fast tokenizer (tokenizer.json) in {src}; "
                         "use KEM_EMBEDDER_BACKEND=torch for this model")
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in inspect.signature(model.forward).parameters and "token_type_ids" in tok.model_input_names:
        names.append("token_type_ids")

    class Sentence(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            kw = dict(zip(names, inputs, strict=True))
            h = self.m(**kw).last_hidden_state
            if pooling == "cls":
                v = h[:, 0]
            else:
                mask = kw["attention_mask"].unsqueeze(-1).to(h.dtype)
                v = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(v, p=2.0, dim=1)

    enc = tok(["a short text", "a somewhat longer text with more words"], padding=True, return_tensors="pt")
    dyn = {n: {0: "batch", 1: "seq"} for n in names} | {"embedding": {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Sentence(model), tuple(enc[n] for n in names), str(dst / FP32), input_names=names,
                          output_names=["embedding"], dynamic_axes=dyn, opset_version=17, dynamo=False)
        dim = int(Sentence(model)(*(enc[n] for n in names)).shape[1])
    _quantize(dst / FP32, dst / INT8)
    shutil.copy2(src / "tokenizer.json", dst / "tokenizer.json")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    return {"source": str(src), "inputs": names, "dim": dim, "max_seq_length": min(max_len, tok.model_max_length),
            "pooling": pooling, "pad_id": int(pad_id), "export_version": EXPORT_VERSION}


def _quantize(src: Path, dst: Path) -> None:
    """int8 weights for the MatMuls (per output channel), activations quantised on the fly; the rest fp32.

    Per-channel MatMul-only kept MiniLM's vectors at cosine ~0.993 to fp32 (docs/retrieval.md); the
    per-tensor default, which also quantises the embedding tables, fell to ~0.96.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser warns about pre-processing through the root logger
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         per_channel=True)
    finally:
        root.setLevel(level)
