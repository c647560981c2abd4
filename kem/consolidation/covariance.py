"""Second-moment statistics ``C = E[k k^T]`` of the MLP keys (inputs of the edited matrix) over a corpus.

The corpus is a text file (one text per non-empty line), a folder of ``.txt`` files, or a JSONL file
(a ``"text"`` field per line). With no corpus, kem reads the text it ships (``kem/data/covariance_text.json``:
1,000 WikiText-2 paragraphs, forward passes only); ``"model"`` samples texts from the model itself. Texts are
truncated to ``max_tokens``, run in batches (memory stays bounded by the batch), every needed layer is
read in the same truncated forward pass, and results are cached on disk by :class:`CovarianceCache`,
keyed by (model fingerprint, layer, corpus, sample count, dtype).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from kem.consolidation.arch import mlp_out_module
from kem.consolidation.shared.prompts import model_fingerprint, pad_id
from kem.errors import ValidationError

log = logging.getLogger(__name__)

MODEL_SAMPLES = "model-samples"
SHIPPED_TEXT = Path(__file__).resolve().parent.parent / "data" / "covariance_text.json"


def shipped_texts() -> list[str]:
    """The covariance text kem ships (scripts/build_covariance_text.py)."""
    return [str(t) for t in json.loads(SHIPPED_TEXT.read_text(encoding="utf-8"))["texts"]]


def is_model_samples(corpus: str | os.PathLike[str] | None) -> bool:
    """``corpus`` asks for texts sampled from the model (``"model"`` or ``"model-samples"``)."""
    return corpus is not None and str(corpus) in ("model", MODEL_SAMPLES)


def iter_corpus(corpus: str | os.PathLike[str], min_chars: int = 40) -> Iterator[str]:
    """Texts of a corpus: a ``.txt`` file (non-empty lines), a folder of ``.txt`` files, or ``.jsonl``."""
    path = Path(corpus).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt")) + sorted(path.rglob("*.jsonl"))
        if not files:
            raise ValidationError(f"corpus folder {path} holds no .txt or .jsonl files", field="corpus")
        for f in files:
            yield from iter_corpus(f, min_chars)
        return
    if not path.is_file():
        raise ValidationError(f"corpus {path} is neither a file nor a folder", field="corpus")
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if path.suffix == ".jsonl":
                line = line.strip()
                if not line:
                    continue
                text = str(json.loads(line).get("text", ""))
            else:
                text = line.strip()
            if len(text) >= min_chars and not text.startswith("="):
                yield text


def corpus_id(corpus: str | os.PathLike[str] | None) -> str:
    """A cache key for a corpus: path, size and mtime of its files; ``kem-text-<hash>`` for the shipped
    text (None), ``model-samples`` for texts sampled from the model."""
    if corpus is None:
        return "kem-text-" + hashlib.blake2b(SHIPPED_TEXT.read_bytes(), digest_size=6).hexdigest()
    if is_model_samples(corpus):
        return MODEL_SAMPLES
    path = Path(corpus).expanduser().resolve()
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    h = hashlib.blake2b(digest_size=8)
    for f in files:
        if f.is_file():
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}".encode())
    return f"{path.name}-{h.hexdigest()}"


@torch.no_grad()
def sample_texts(model: Any, tok: Any, n: int, length: int = 64, batch_size: int = 64, seed: int = 0,
                 progress: bool = False) -> list[str]:
    """``n`` texts sampled from the model (``--corpus model``), ``batch_size`` at a time."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    bar = tqdm(total=n, desc="sampling covariance texts from the model", unit="text", disable=not progress)
    start = tok.bos_token_id if tok.bos_token_id is not None else pad_id(tok)
    texts: list[str] = []
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        while len(texts) < n:
            b = min(batch_size, n - len(texts))
            ids = torch.full((b, 1), start, dtype=torch.long, device=device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=length,
                do_sample=True,
                top_k=50,
                pad_token_id=pad_id(tok),
            )
            texts.extend(tok.batch_decode(out[:, 1:], skip_special_tokens=True))
            bar.update(b)
    bar.close()
    return texts


class _Stop(Exception):
    pass


@torch.no_grad()
def compute_second_moments(
    model: Any,
    tok: Any,
    layers: Sequence[int],
    texts: Sequence[str],
    max_tokens: int = 128,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict[int, torch.Tensor], int]:
    """``E[k k^T]`` of each layer's MLP key over every non-pad token of ``texts``.

    Returns:
        ``({layer: (d_mlp, d_mlp) float32}, number of tokens)``; summed per batch in float32 and over batches in float64.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    acc: dict[int, torch.Tensor] = {}
    last = max(layers)
    mask_box: dict[str, torch.Tensor] = {}
    tokens = 0

    def hook(layer: int) -> Any:
        def fn(module: Any, args: tuple[Any, ...]) -> None:
            k = args[0][mask_box["m"]].float()  # (tokens, d_mlp); the batch sum in float32, the total in float64
            if layer not in acc:
                acc[layer] = torch.zeros(k.shape[1], k.shape[1], dtype=torch.float64, device=k.device)
            acc[layer] += (k.T @ k).double()
            if layer == last:
                raise _Stop

        return fn

    handles = [mlp_out_module(model, layer).register_forward_pre_hook(hook(layer)) for layer in layers]
    old_side = tok.padding_side
    tok.padding_side = "right"
    try:
        bar = tqdm(total=len(texts), desc=f"covariance layers {list(layers)}", unit="text", disable=not progress)
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens, add_special_tokens=False)
            ids = enc["input_ids"].to(device)
            mask = enc["attention_mask"].to(device)
            mask_box["m"] = mask.bool()
            tokens += int(mask.sum())
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
            bar.update(len(chunk))
        bar.close()
    finally:
        tok.padding_side = old_side
        for h in handles:
            h.remove()
    if tokens == 0:
        raise ValidationError("the covariance corpus produced no tokens", field="corpus")
    return {layer: (a / tokens).float().cpu() for layer, a in acc.items()}, tokens


class CovarianceCache:
    """Covariance statistics kept in memory and on disk under ``<root>/covariance/``.

    Args:
        root: Cache folder (``Settings().cache_dir``); None keeps them in memory only.
    """

    def __init__(self, root: str | os.PathLike[str] | None) -> None:
        self.root = None if root is None else Path(root).expanduser() / "covariance"
        self._mem: dict[str, torch.Tensor] = {}
        self.last_compute_seconds: float = 0.0
        self.last_tokens: int = 0

    def _key(self, fp: str, layer: int, corpus: str, n: int, max_tokens: int, dtype: str) -> str:
        return f"{fp}-L{layer}-{corpus}-n{n}-t{max_tokens}-{dtype}"

    def get(
        self,
        model: Any,
        tok: Any,
        layers: Sequence[int],
        corpus: str | os.PathLike[str] | None = None,
        n_samples: int = 1000,
        max_tokens: int = 128,
        batch_size: int = 16,
        fingerprint: str | None = None,
        progress: bool = True,
    ) -> dict[int, torch.Tensor]:
        """``{layer: E[k k^T]}`` (float32, CPU), computing only the layers not cached yet."""
        import time

        fp = fingerprint or model_fingerprint(model)
        cid = corpus_id(corpus)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        keys = {layer: self._key(fp, layer, cid, n_samples, max_tokens, dtype) for layer in layers}
        out: dict[int, torch.Tensor] = {}
        missing = []
        for layer, key in keys.items():
            t = self._load(key)
            if t is None:
                missing.append(layer)
            else:
                out[layer] = t
        if missing:
            t0 = time.perf_counter()
            if is_model_samples(corpus):
                texts = self._samples(model, tok, fp, n_samples, progress)
            elif corpus is None:
                texts = shipped_texts()
                if n_samples > len(texts):
                    raise ValidationError(f"kem's covariance text holds {len(texts)} texts; mom2_samples asks for "
                                          f"{n_samples}: give a larger corpus (--corpus) or fewer samples",
                                          field="mom2_samples")
                texts = texts[:n_samples]
            else:
                texts = []
                for text in iter_corpus(corpus):
                    texts.append(text)
                    if len(texts) >= n_samples:
                        break
            stats, tokens = compute_second_moments(model, tok, missing, texts, max_tokens, batch_size, progress)
            self.last_compute_seconds = time.perf_counter() - t0
            self.last_tokens = tokens
            log.info("covariance of layers %s over %d texts (%d tokens) in %.1f s", missing, len(texts), tokens, self.last_compute_seconds)
            for layer, cov in stats.items():
                self._save(keys[layer], cov)
                out[layer] = cov
        return out

    def _samples(self, model: Any, tok: Any, fp: str, n: int, progress: bool) -> list[str]:
        """The model-sampled corpus, sampled once per (model fingerprint, n) and kept on disk beside the
        statistics: a later job that needs other layers (another method) reuses the texts and pays only
        for the forward passes."""
        path = None if self.root is None else self.root / f"{fp}-samples-n{n}.json"
        if path is not None and path.is_file():
            try:
                texts = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(texts, list) and len(texts) == n:
                    return [str(t) for t in texts]
            except (OSError, ValueError):
                pass  # unreadable: sample again
        texts = sample_texts(model, tok, n, progress=progress)
        if path is not None:
            from kem.files import write_atomic

            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(texts, ensure_ascii=False), new_mode=0o644)
        return texts

    def _load(self, key: str) -> torch.Tensor | None:
        if key in self._mem:
            return self._mem[key]
        if self.root is None:
            return None
        path = self.root / f"{key}.safetensors"
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        t = load_file(str(path))["cov"]
        self._mem[key] = t
        return t

    def _save(self, key: str, cov: torch.Tensor) -> None:
        self._mem[key] = cov
        if self.root is None:
            return
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        os.close(fd)
        save_file({"cov": cov.contiguous()}, tmp)
        os.replace(tmp, self.root / f"{key}.safetensors")
