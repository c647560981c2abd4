"""Context templates: short model-generated prefixes (``"<text>. {}"``) the edit is averaged over.

Generated once per (model fingerprint, count, length) and kept in a :class:`TemplateCache` object.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kem.consolidation.shared.prompts import model_fingerprint, pad_id

log = logging.getLogger(__name__)

SEEDS = ("The", "Therefore", "Because", "I", "You", "It", "In", "A")


class TemplateCache:
    """Context templates keyed by ``(model fingerprint, n, length)``; ``"{}"`` (no prefix) always comes first."""

    def __init__(self) -> None:
        self._store: dict[tuple[str, int, int], list[str]] = {}

    def get(self, model: Any, tok: Any, n: int, length: int = 8, fingerprint: str | None = None) -> list[str]:
        """``["{}", *n generated prefixes]``.

        Args:
            n: Number of generated prefixes (0 gives ``["{}"]``).
            length: New tokens per prefix.
            fingerprint: The model's fingerprint, when the caller already has it.
        """
        if n <= 0:
            return ["{}"]
        key = (fingerprint or model_fingerprint(model), n, length)
        if key not in self._store:
            self._store[key] = ["{}", *generate_prefixes(model, tok, n, length)]
        return self._store[key]


@torch.no_grad()
def generate_prefixes(model: Any, tok: Any, n: int, length: int, seed: int = 0) -> list[str]:
    """``n`` sampled continuations of seed words, turned into ``"<text>. {}"`` templates."""
    device = next(model.parameters()).device
    seeds = [SEEDS[i % len(SEEDS)] for i in range(n)]
    enc = [tok(s, add_special_tokens=False)["input_ids"] for s in seeds]
    width = max(len(e) for e in enc)
    ids = torch.full((n, width), pad_id(tok), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(enc):  # left padding for generation
        ids[i, width - len(e) :] = torch.tensor(e)
        mask[i, width - len(e) :] = 1
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=length,
            do_sample=True,
            top_k=5,
            pad_token_id=pad_id(tok),
        )
    texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    result = []
    for s, t in zip(seeds, texts, strict=True):
        clean = f"{s}{t}".replace("{", " ").replace("}", " ").replace("\n", " ").strip()
        result.append(f"{clean}. {{}}")
    log.debug("context templates: %s", result)
    return result
