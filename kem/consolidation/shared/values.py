"""Target values: the vector ``delta`` that, added to the MLP output at the subject's last token of a
given layer, makes the model say the new target (ROME's v*, MEMIT's z, step "compute_v" / "compute_z").

All edits of a batch are optimised together in one padded forward pass per step (their losses are
independent sums, and Adam is element-wise, so this equals optimising them one by one). Logits are
computed only at the target positions, and the loss stops early once every edit's target is likely.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from kem.consolidation.arch import layer_module, mlp_out_module
from kem.consolidation.shared.prompts import Row, make_rows, pad, pad_id
from kem.edit import Edit

log = logging.getLogger(__name__)


class ValueOptions(BaseModel):
    """How the target value is optimised (shared by ROME, MEMIT and AlphaEdit)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(25, ge=1, le=500, description="Maximum Adam steps.")
    lr: float = Field(1.0, gt=0, description="Adam learning rate on delta.")
    stop_prob: float = Field(0.9, gt=0, le=1.0, description="Stop once every edit's mean target probability exceeds this.")
    kl_factor: float = Field(0.0625, ge=0, description="Weight of the KL term that keeps '<subject> is a' unchanged.")
    weight_decay: float = Field(1e-3, ge=0, description="Penalty on ||delta||^2 / ||reference||^2.")
    clamp_factor: float = Field(4.0, gt=0, description="||delta|| is clamped to this times the reference norm.")
    norm_ref: str = Field("mlp", pattern="^(mlp|block)$", description="Reference norm: MLP output or block output.")
    # MEMIT, 16 CounterFact edits, one thread: 4 -> 68 CPU-s / 1.4 GB peak; 16 -> 90 CPU-s / 2.8 GB
    # (an edit leaves its chunk when done, so small chunks waste less on padding and finished rows).
    edit_batch: int = Field(4, ge=1, description="Edits optimised together in one forward pass.")
    prefix_cache: bool = Field(True, description="Run the tokens before the subject once (key/value cache), not every step.")


@dataclass
class ValueResult:
    """Optimised deltas for a batch of edits.

    Attributes:
        delta: ``(n_edits, d_model)`` float32, added at the subject's last token of ``layer``.
        probs: ``(n_edits,)`` mean target probability over the templates at the end.
        steps: Steps taken per edit chunk.
    """

    delta: torch.Tensor
    probs: torch.Tensor
    steps: list[int]


def optimise_values(
    model: Any, tok: Any, edits: Sequence[Edit], layer: int, templates: Sequence[str], opts: ValueOptions
) -> ValueResult:
    """Optimise one delta per edit at ``layer`` (see module docstring); the model is not modified."""
    deltas, probs, steps = [], [], []
    for start in range(0, len(edits), opts.edit_batch):
        d, p, s = _optimise_chunk(model, tok, edits[start : start + opts.edit_batch], layer, templates, opts)
        deltas.append(d)
        probs.append(p)
        steps.append(s)
    return ValueResult(torch.cat(deltas), torch.cat(probs), steps)


def _kl_rows(tok: Any, edits: Sequence[Edit]) -> list[Row]:
    rows = []
    for i, e in enumerate(edits):
        subj = tok(e.subject, add_special_tokens=False)["input_ids"]
        ids = tok(f"{e.subject} is a", add_special_tokens=False)["input_ids"]
        rows.append(Row(ids, min(len(subj), len(ids)) - 1, [], i))
    return rows


class TargetBatch:
    """Teacher-forced target rows (edit x template) plus one ``"<subject> is a"`` KL row per edit.

    With ``prefix=True`` each row is cut before its subject's last token: the tokens before it do
    not depend on a delta added there (causal attention), so their keys/values are computed once
    (:meth:`prepare`) and every optimisation step runs only the short suffixes (several times
    fewer tokens). Prefixes are right-padded so no query is fully masked.

    Attributes:
        ids, mask: ``(rows, width)`` suffix ids and mask (whole rows without a prefix).
        sel, pos, owner: per row: its index, the subject position in the suffix, its edit.
    """

    def __init__(
        self, tok: Any, edits: Sequence[Edit], templates: Sequence[str], device: Any, kl: bool = True, prefix: bool = True
    ) -> None:
        self.n = len(edits)
        self.rows = make_rows(tok, edits, templates, with_target=True)
        kl_rows = _kl_rows(tok, edits) if kl else []
        all_rows = self.rows + kl_rows
        pid = pad_id(tok)
        use_prefix = prefix and all(r.subject_pos >= 1 for r in all_rows)
        cut = [r.subject_pos if use_prefix else 0 for r in all_rows]
        self.prefix_len = max(cut)
        suffix = [Row(r.ids[c:], r.subject_pos - c, r.target, r.edit) for r, c in zip(all_rows, cut, strict=True)]
        self.ids, smask = pad(suffix, pid, device)
        self.cache: Any = None
        if self.prefix_len:
            pre = [Row(r.ids[:c], 0, [], r.edit) for r, c in zip(all_rows, cut, strict=True)]
            self.prefix_ids, pmask = pad(pre, pid, device)
            self.prefix_mask = pmask
            self.mask = torch.cat([pmask, smask], 1)
            width = self.ids.shape[1]
            self.position_ids = torch.tensor(cut, device=device)[:, None] + torch.arange(width, device=device)[None]
        else:
            self.mask = smask
            self.position_ids = None  # type: ignore[assignment]
        self.sel = torch.arange(len(all_rows), device=device)
        self.pos = torch.tensor([r.subject_pos for r in suffix], device=device)
        self.owner = torch.tensor([r.edit for r in all_rows], device=device)
        t_row, t_pos, t_id = [], [], []
        for i, r in enumerate(suffix[: len(self.rows)]):
            start = len(r.ids) - len(r.target)
            for j, tid in enumerate(r.target):
                t_row.append(i)
                t_pos.append(start + j)
                t_id.append(tid)
        self.t_row = torch.tensor(t_row, device=device)
        self.t_pos = torch.tensor(t_pos, device=device)
        self.t_id = torch.tensor(t_id, device=device)
        self.tok_count = torch.bincount(self.t_row, minlength=len(self.rows)).float()
        self.row_owner = self.owner[: len(self.rows)]
        self.rows_per_edit = torch.bincount(self.row_owner, minlength=self.n).float()
        self.kl_last = torch.tensor([len(r.ids) - 1 for r in suffix[len(self.rows) :]], device=device, dtype=torch.long)
        self.kl_sel = torch.arange(len(self.rows), len(all_rows), device=device)
        self.first_row = torch.arange(self.n, device=device) * len(templates)

    @torch.no_grad()
    def prepare(self, base: Any) -> None:
        """Compute the prefixes' key/value cache (call with editing hooks disabled)."""
        if self.prefix_len and self.cache is None:
            out = base(input_ids=self.prefix_ids, attention_mask=self.prefix_mask, use_cache=True)
            self.cache = out.past_key_values

    def hidden(self, base: Any) -> torch.Tensor:
        """Final hidden states of the suffixes, ``(rows, width, d_model)``."""
        if not self.prefix_len:
            return base(input_ids=self.ids, attention_mask=self.mask, use_cache=False).last_hidden_state
        try:
            out = base(
                input_ids=self.ids,
                attention_mask=self.mask,
                position_ids=self.position_ids,
                past_key_values=self.cache,
                use_cache=True,
            )
        finally:
            extra = self.cache.get_seq_length() - self.prefix_len
            if extra > 0:
                self.cache.crop(-extra)
            for layer in self.cache.layers:  # cut the link to this step's graph
                layer.keys = layer.keys.detach()
                layer.values = layer.values.detach()
        return out.last_hidden_state

    def nll(self, hidden: torch.Tensor, head: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-edit mean target NLL ``(n,)`` (differentiable) and mean target probability ``(n,)`` (detached).

        Args:
            hidden: ``(rows, width, d_model)`` final hidden states.
            head: The LM head (applied only at target positions).
        """
        logp = F.log_softmax(head(hidden[self.t_row, self.t_pos]).float(), -1)
        tok_nll = -logp.gather(1, self.t_id[:, None])[:, 0]
        row_nll = torch.zeros(len(self.rows), device=hidden.device).index_add(0, self.t_row, tok_nll) / self.tok_count
        edit_nll = torch.zeros(self.n, device=hidden.device).index_add(0, self.row_owner, row_nll) / self.rows_per_edit
        row_prob = torch.exp(-row_nll.detach())
        probs = torch.zeros(self.n, device=hidden.device).index_add(0, self.row_owner, row_prob) / self.rows_per_edit
        return edit_nll, probs

    def kl_logp(self, hidden: torch.Tensor, head: Any) -> torch.Tensor:
        """Next-token log-probabilities after ``"<subject> is a"``, ``(n, vocab)``."""
        return F.log_softmax(head(hidden[self.kl_sel, self.kl_last]).float(), -1)


def _optimise_chunk(
    model: Any, tok: Any, edits: Sequence[Edit], layer: int, templates: Sequence[str], opts: ValueOptions
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Optimise the deltas of ``edits``; an edit whose target is likely leaves the batch (its rows are
    no longer run), so late steps only pay for the edits still learning."""
    device = next(model.parameters()).device
    n = len(edits)
    delta = torch.zeros(n, model.config.hidden_size, device=device, requires_grad=True)
    probs = torch.zeros(n)
    kl_ref = torch.empty(0)
    ref_norm = torch.zeros(n, device=device)
    base = model.base_model
    head = model.get_output_embeddings()
    opt = torch.optim.Adam([delta], lr=opts.lr)
    active = list(range(n))
    state: dict[str, Any] = {}

    def add_delta(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        tb: TargetBatch = state["tb"]
        if state.get("prefix"):
            return out
        if "mlp" not in state:
            state["mlp"] = out[tb.sel, tb.pos].detach().float()
        rows_delta = delta[state["idx"][tb.owner]].to(out.dtype)
        return torch.index_put(out, (tb.sel, tb.pos), rows_delta, accumulate=True)

    def read_block(module: Any, args: Any, out: Any) -> None:
        if "block" not in state and not state.get("prefix"):
            h = out[0] if isinstance(out, tuple) else out
            state["block"] = h[state["tb"].sel, state["tb"].pos].detach().float()

    handles = [
        mlp_out_module(model, layer).register_forward_hook(add_delta),
        layer_module(model, layer).register_forward_hook(read_block),
    ]
    step = 0
    try:
        for step in range(opts.steps + 1):
            if "tb" not in state or state["active"] != active:
                state["tb"] = TargetBatch(tok, [edits[i] for i in active], templates, device, prefix=opts.prefix_cache)
                state["prefix"] = True
                try:
                    state["tb"].prepare(base)
                finally:
                    state["prefix"] = False
                state["idx"] = torch.tensor(active, device=device)
                state["active"] = list(active)
            tb, idx = state["tb"], state["idx"]
            hidden = tb.hidden(base)
            edit_nll, p = tb.nll(hidden, head)
            probs[idx.cpu()] = p.cpu()
            kl_logp = tb.kl_logp(hidden, head)
            if step == 0:  # all edits active, delta == 0: the references
                kl_ref = kl_logp.detach()
                ref_norm = state[opts.norm_ref][tb.first_row].norm(dim=-1)
            done = p.cpu() >= opts.stop_prob
            if bool(done.all()) or step == opts.steps:
                break
            kl = F.kl_div(kl_logp, kl_ref[idx], log_target=True, reduction="none").sum(-1)
            wd = opts.weight_decay * delta[idx].norm(dim=-1) ** 2 / ref_norm[idx] ** 2
            learning = (~done).to(device).float()
            loss = ((edit_nll + opts.kl_factor * kl + wd) * learning).sum()
            (grad,) = torch.autograd.grad(loss, [delta])
            opt.zero_grad()
            delta.grad = grad
            keep = torch.ones(n, dtype=torch.bool, device=device)
            keep[idx[~done.to(device)]] = False  # rows that must not move (finished earlier or now)
            saved = delta.detach()[keep].clone()
            opt.step()
            with torch.no_grad():
                delta[keep] = saved
                limit = opts.clamp_factor * ref_norm
                scale = (limit / delta.norm(dim=-1).clamp(min=1e-12)).clamp(max=1.0)
                delta.mul_(scale[:, None])
            active = [i for i, d in zip(active, done.tolist(), strict=True) if not d]
    finally:
        for h in handles:
            h.remove()
    log.debug("values at layer %d: %d steps, target probs %s", layer, step, [round(x, 3) for x in probs.tolist()])
    return delta.detach(), probs, step
