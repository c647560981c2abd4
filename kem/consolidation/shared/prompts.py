"""Prompt rows: an edit rendered inside a context template, tokenised, with the subject's last token located."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kem.edit import Edit


@dataclass(frozen=True)
class Row:
    """One tokenised prompt.

    Attributes:
        ids: Token ids of the prompt (and teacher-forced target, when any).
        subject_pos: Index of the subject's last token in ``ids``.
        target: Target token ids predicted at positions ``len(prompt)-1 ...`` (empty for key rows).
        edit: Index of the edit in the batch it belongs to.
    """

    ids: list[int]
    subject_pos: int
    target: list[int]
    edit: int


def render(template: str, edit: Edit) -> tuple[str, str]:
    """``(text before the subject's end, full prompt text)`` for ``edit`` placed in ``template`` (``"... {}"``)."""
    prompt = template.replace("{}", edit.prompt)
    before, _, _ = prompt.partition("{}")
    return before + edit.subject, prompt.replace("{}", edit.subject)


def make_row(tok: Any, template: str, edit: Edit, index: int, with_target: bool) -> Row:
    """Tokenise ``edit`` in ``template``; with ``with_target`` append the target minus its last token."""
    head, text = render(template, edit)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    subject_pos = len(tok(head, add_special_tokens=False)["input_ids"]) - 1
    subject_pos = max(0, min(subject_pos, len(ids) - 1))
    target: list[int] = []
    if with_target:
        target = tok(edit.target_completion, add_special_tokens=False)["input_ids"]
        ids = ids + target[:-1]
    return Row(ids, subject_pos, target, index)


def make_rows(tok: Any, edits: Sequence[Edit], templates: Sequence[str], with_target: bool) -> list[Row]:
    """One row per (edit, template), edit-major."""
    return [make_row(tok, t, e, i, with_target) for i, e in enumerate(edits) for t in templates]


def pad(rows: Sequence[Row], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows into ``(input_ids, attention_mask)``, both ``(len(rows), max_len)``."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
        mask[i, : len(r.ids)] = 1
    return ids.to(device), mask.to(device)


def pad_id(tok: Any) -> int:
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def model_fingerprint(model: Any) -> str:
    """A short hash of the config and a strided sample of every parameter: changes when weights change."""
    h = hashlib.blake2b(digest_size=10)
    h.update(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            h.update(name.encode())
            h.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return h.hexdigest()
