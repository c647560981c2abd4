"""distill step 3: train a LoRA on the parent, without context, then hand it back as a weight delta.

The LoRA lives in forward hooks (:class:`HookLora`), so the parent's parameters are never renamed or
changed, and with the hooks off the model is the parent itself. Loss, per sequence: cross-entropy on
the edit rows' answer tokens (only those whose probability is still below ``stop_prob``) plus
``kl_weight`` x KL(parent || student) summed over the retain rows' answer tokens, plus ``change_weight``
x how much the LoRA moves each module's output on the retain rows (every token, relative to the
module's own output): the update should act on the edited subjects and be silent elsewhere. The parent's
distributions are computed once, with the hooks off, before training, and kept as their top-k tokens
plus the remaining mass (:func:`binned_kl`). Logits are computed only where a loss is taken (hidden
states gathered first). Early stopping: once every edit example was answered right (teacher-forced
argmax on every answer token) the last time it was seen, at least ``min_epochs`` passes were made, and a check of every
example on the final weights (:func:`verify`) agrees; else training goes on.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import torch

from kem.consolidation.arch import arch_for
from kem.consolidation.delta import WeightDelta
from kem.consolidation.distill.data import Item
from kem.consolidation.distill.hparams import DistillHParams
from kem.errors import ModelError, ValidationError
from kem.models import linear_dims

log = logging.getLogger(__name__)


def default_layers(model: Any) -> tuple[int, ...]:
    """The lower-middle third of the decoder: layers ``L//15 .. L//3`` (2..10 of SmolLM2's 30)."""
    n = int(model.config.num_hidden_layers)
    lo, hi = max(1, n // 15), max(2, n // 3)
    return tuple(range(lo, min(hi + 1, n)))


class HookLora:
    """LoRA factors on ``modules`` (name -> ``nn.Linear``), applied through forward hooks while ``on``."""

    def __init__(self, modules: dict[str, torch.nn.Linear], rank: int, alpha: float, seed: int = 0,
                 fixed_a: dict[str, torch.Tensor] | None = None) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.scale = alpha / rank if fixed_a is None else 1.0
        self.modules = modules
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        self.trainable: list[torch.Tensor] = []
        self.transposed: dict[str, bool] = {}  # the weight is stored (in, out): GPT-2's Conv1D
        for name, m in modules.items():
            dev = m.weight.device
            d_in, d_out, self.transposed[name] = linear_dims(m)
            if fixed_a is not None:  # keys chosen beforehand: only the values B are learnt
                self.a[name] = fixed_a[name].to(dev).float()
            else:
                bound = 1.0 / math.sqrt(d_in)
                self.a[name] = ((torch.rand(rank, d_in, generator=gen) * 2 - 1) * bound).to(dev).requires_grad_()
                self.trainable.append(self.a[name])
            self.b[name] = torch.zeros(d_out, self.a[name].shape[0], device=dev, requires_grad=True)
            self.trainable.append(self.b[name])
        self.on = True
        self.measure = False  # add each module's relative output change to ``penalty``
        self.penalty: torch.Tensor | float = 0.0
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str) -> Any:
        a, b, scale = self.a[name], self.b[name], self.scale

        def hook(module: Any, inputs: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            if not self.on:
                return out
            x = inputs[0]
            extra = (x.to(a.dtype) @ a.T) @ b.T * scale
            if self.measure:  # how much the LoRA moves this module's output, relative to the output itself
                self.penalty = self.penalty + extra.pow(2).mean() / out.detach().float().pow(2).mean().clamp_min(1e-12)
            return out + extra.to(out.dtype)

        return hook

    def parameters(self) -> list[torch.Tensor]:
        return list(self.trainable)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def delta(self, method: str) -> WeightDelta:
        """The LoRA as a low-rank delta in each weight's layout: ``delta_W = (scale B) @ A``, transposed
        (``A^T @ (scale B)^T``) for a weight stored ``(in, out)``."""
        d = WeightDelta(method=method)
        for name in self.modules:
            b, a = self.b[name].detach() * self.scale, self.a[name].detach()
            if self.transposed[name]:
                d.add(f"{name}.weight", a.T.contiguous(), b.T.contiguous())
            else:
                d.add(f"{name}.weight", b, a)
        return d


def target_modules(model: Any, hp: DistillHParams) -> dict[str, torch.nn.Linear]:
    """The ``nn.Linear`` modules named ``hp.targets`` inside ``hp.layers``.

    Raises:
        ValidationError: a layer is out of range, or no module matches.
    """
    n = int(model.config.num_hidden_layers)
    layers = hp.layers if hp.layers is not None else default_layers(model)
    bad = [x for x in layers if not 0 <= x < n]
    if bad:
        raise ValidationError(f"distill layers must lie in 0..{n - 1} (got {bad})", field="layers")
    root = arch_for(model).layers
    out: dict[str, torch.nn.Linear] = {}
    for layer in layers:
        prefix = f"{root}.{layer}."
        for name, m in model.named_modules():
            if name.startswith(prefix) and name.rsplit(".", 1)[-1] in hp.targets and _is_linear(m):
                out[name] = m
    if not out:
        raise ValidationError(f"no nn.Linear named {list(hp.targets)} in layers {list(layers)} of this model "
                              "(distill trains Linear or Conv1D modules; set targets)", field="targets")
    return out


def _is_linear(m: Any) -> bool:
    try:
        linear_dims(m)
    except ModelError:
        return False
    return True


def subject_keys(model: Any, tok: Any, edits: Sequence[Any], layers: Sequence[int], templates: Sequence[str],
                 covs: dict[int, torch.Tensor], ridge: float) -> dict[str, torch.Tensor]:
    """``A`` per MLP output matrix of ``layers``: one row per edit, ``C^-1 k / (k^T C^-1 k)``, where ``k`` is
    the matrix's input at the subject's last token (averaged over ``templates``) and ``C``
    the inputs' second moment (ROME's key direction): ``A x`` is 1 on the edit's subject and small on
    typical inputs, so what ``B`` learns acts on the edited subjects."""
    from kem.consolidation.arch import arch_for
    from kem.consolidation.rome.compute_key import compute_keys

    spec = arch_for(model)
    out: dict[str, torch.Tensor] = {}
    # a subject that opens the prompt sits on the first token, whose key is unlike the same subject's
    # anywhere else; a direction for it (tried) fired on the first token of unrelated prompts too
    # (locality 0.79 on the demo store), so such clozes are left to the fast path by retirement
    for layer in layers:
        k = compute_keys(model, tok, edits, layer, templates).float()  # (n, d_mlp)
        c = covs[layer].float().to(k.device)
        c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], device=c.device)
        ck = torch.linalg.solve(c, k.T).T  # C^-1 k
        out[f"{spec.layers}.{layer}.{spec.mlp_out}"] = ck / (ck * k).sum(1, keepdim=True)
    return out


def _batch(items: Sequence[Item], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask, plus (row, position) of every predicted answer token and its id."""
    width = max(len(it.prompt) + len(it.answer) for it in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    rows, cols, labels = [], [], []
    for r, it in enumerate(items):
        seq = list(it.prompt) + list(it.answer)
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        for k, t in enumerate(it.answer):
            rows.append(r)
            cols.append(len(it.prompt) + k - 1)
            labels.append(t)
    return ids.to(device), mask.to(device), torch.tensor(rows, device=device), torch.tensor([cols, labels], device=device)


def parent_distributions(body: Any, head: Any, items: Sequence[Item], pad: int, device: Any, k: int,
                         progress: bool = False, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The parent's next-token distributions at every answer position of ``items``, as the ``k`` most
    likely tokens' ``(ids, log-probs)`` per position (computed once, before any training step)."""
    from tqdm.auto import tqdm

    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.inference_mode():
        for s in tqdm(range(0, len(items), batch), desc="retain (parent distributions)", disable=not progress,
                      leave=False):
            rows = items[s:s + batch]
            ids, mask, rr, cl = _batch(rows, pad, device)
            lp = torch.log_softmax(head(body(input_ids=ids, attention_mask=mask).last_hidden_state[rr, cl[0]]).float(), -1)
            v, i = lp.topk(k, -1)
            for r in range(len(rows)):
                sel = rr == r
                out.append((i[sel].cpu(), v[sel].cpu()))
    return out


def verify(body: Any, head: Any, items: Sequence[Item], pad: int, device: Any, batch: int = 32) -> list[bool]:
    """Whether each item's answer is the argmax at every answer token (teacher-forced), on the model as it is."""
    out: list[bool] = []
    with torch.no_grad():
        for s in range(0, len(items), batch):
            rows = items[s:s + batch]
            ids, mask, rr, cl = _batch(rows, pad, device)
            ok = (head(body(input_ids=ids, attention_mask=mask).last_hidden_state[rr, cl[0]]).argmax(-1) == cl[1]).cpu()
            rr = rr.cpu()
            out += [bool(ok[rr == r].all()) for r in range(len(rows))]
    return out


def binned_kl(parent_lp: torch.Tensor, student_lp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """KL(parent || student) summed over positions, on the parent's top-k tokens plus one bin for the rest.

    Args:
        parent_lp: ``(n, k)`` the parent's log-probs of its top-k tokens.
        student_lp: ``(n, vocab)`` the student's log-probs.
        ids: ``(n, k)`` those tokens' ids.
    """
    q = student_lp.gather(1, ids)
    p_rest = (1 - parent_lp.exp().sum(1)).clamp_min(1e-8)
    q_rest = (1 - q.exp().sum(1)).clamp_min(1e-8)
    kl = (parent_lp.exp() * (parent_lp - q)).sum(1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.sum()


def train(model: Any, tok: Any, edit_items: Sequence[Item], retain_items: Sequence[Item], hp: DistillHParams,
          progress: bool = False, fixed_a: dict[str, torch.Tensor] | None = None,
          start: WeightDelta | None = None) -> tuple[WeightDelta, dict[str, Any]]:
    """Train the LoRA; returns ``(delta, stats)``. The model's weights and flags come back unchanged.

    Args:
        fixed_a: Module name -> ``A`` (rows: input directions) kept fixed; only ``B`` is trained, on
            exactly those modules (see :func:`subject_keys`). None: a plain LoRA on :func:`target_modules`.
        start: A delta the LoRA is trained on top of (applied after the parent's distributions are
            taken, reverted at the end); the result includes it.
    """
    from tqdm.auto import tqdm

    from kem.consolidation.delta import apply_delta

    if not edit_items:
        raise ValidationError("distill needs at least one edit example", field="edits")
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    rng = random.Random(hp.seed)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    per_epoch = math.ceil(len(edit_items) / hp.edit_batch)
    max_steps = min(hp.max_steps, max(1, hp.min_steps, math.ceil(hp.max_epochs * per_epoch)))
    stop_after = min(max_steps, math.ceil(hp.min_epochs * per_epoch))
    right = [False] * len(edit_items)
    order: list[int] = []
    r_order: list[int] = []
    losses: list[tuple[float, float, float]] = []
    step = 0
    lora: HookLora | None = None
    started = None
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        modules = target_modules(model, hp) if fixed_a is None else {n: model.get_submodule(n) for n in fixed_a}
        lora = HookLora(modules, hp.rank, hp.alpha, hp.seed, fixed_a)
        body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        head = model.get_output_embeddings()
        opt = torch.optim.AdamW(lora.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))  # 5 warm-up steps
        lora.on = False  # the parent itself
        parent_top = parent_distributions(body, head, retain_items, pad, device, hp.kl_top_k, progress)
        lora.on = True
        if start is not None:
            started = apply_delta(model, start)
        bar = tqdm(total=max_steps, desc=f"distill ({len(edit_items)} edit / {len(retain_items)} retain examples)",
                   unit="step", disable=not progress, leave=False)
        while step < max_steps:
            if len(order) < hp.edit_batch:
                fresh = list(range(len(edit_items)))
                rng.shuffle(fresh)
                order += fresh
            idx, order = order[: hp.edit_batch], order[hp.edit_batch:]
            r_idx: list[int] = []
            if retain_items and hp.retain_batch:
                while len(r_order) < hp.retain_batch:
                    fresh = list(range(len(retain_items)))
                    rng.shuffle(fresh)
                    r_order += fresh
                r_idx, r_order = r_order[: hp.retain_batch], r_order[hp.retain_batch:]
            e_rows = [edit_items[i] for i in idx]
            r_rows = [retain_items[i] for i in r_idx]
            loss_kl = torch.zeros((), device=device)
            loss_change = torch.zeros((), device=device)
            if r_rows:
                ids, mask, rr, cl = _batch(r_rows, pad, device)
                lora.measure, lora.penalty = hp.change_weight > 0, 0.0
                h = body(input_ids=ids, attention_mask=mask).last_hidden_state
                lora.measure = False
                loss_change = lora.penalty if isinstance(lora.penalty, torch.Tensor) else torch.zeros((), device=device)
                student = torch.log_softmax(head(h[rr, cl[0]]).float(), -1)
                top_i = torch.cat([parent_top[i][0] for i in r_idx]).to(device)
                top_lp = torch.cat([parent_top[i][1] for i in r_idx]).to(device)
                loss_kl = binned_kl(top_lp, student, top_i) / len(r_rows)
            ids, mask, rr, cl = _batch(e_rows, pad, device)
            h = body(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = head(h[rr, cl[0]]).float()
            tok_nll = torch.nn.functional.cross_entropy(logits, cl[1], reduction="none")
            live = (tok_nll.detach() > -math.log(hp.stop_prob)).float()  # tokens not yet learnt
            loss_ce = (tok_nll * live).sum() / max(1, len(e_rows))
            with torch.no_grad():
                ok = (logits.argmax(-1) == cl[1]).cpu()
                for r, i in enumerate(idx):
                    right[i] = bool(ok[rr.cpu() == r].all())
            loss = loss_ce + hp.kl_weight * loss_kl + hp.change_weight * loss_change
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append((float(loss_ce.detach()), float(loss_kl.detach()), float(loss_change.detach())))
            bar.update(1)
            bar.set_postfix(ce=f"{losses[-1][0]:.3f}", kl=f"{losses[-1][1]:.4f}", change=f"{losses[-1][2]:.4f}", right=f"{sum(right)}/{len(right)}")
            if step >= stop_after and all(right):
                # every example was right when last seen; check them all on the current weights
                right = verify(body, head, edit_items, pad, device)
                if all(right):
                    break
        bar.close()
        delta = lora.delta("distill")
        if start is not None:
            for name, f in start.updates.items():
                delta.add(name, f.a, f.b)
    finally:
        if started is not None:
            started.revert()
        if lora is not None:
            lora.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    stats = {"steps": step, "max_steps": max_steps, "examples_right": sum(right), "examples": len(right),
             "final_ce": losses[-1][0] if losses else None, "final_kl": losses[-1][1] if losses else None,
             "final_change": losses[-1][2] if losses else None,
             "modules": len(lora.modules) if lora is not None else 0}
    log.info("distill: %d steps, %d/%d edit examples right, ce %.4f kl %.5f", step, sum(right), len(right),
             stats["final_ce"] or 0.0, stats["final_kl"] or 0.0)
    return delta, stats
