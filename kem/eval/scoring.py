"""Teacher-forced scoring and greedy generation, batched, one prefill per request.

A *job* is a request text (exactly what the engine sees) with targets to teacher-force and a greedy
budget. Jobs are run in batches: the requests are left-padded and prefilled once; the key/value
cache is extended with each target (argmax tokens and log-probabilities at the target positions)
and cropped back; then greedy decoding continues on the same cache, one token per step for the
whole batch, a row finishing at an end-of-sequence token, a stop string or its budget. This is the
computation of the engine's ``generate`` with ``temperature == 0``; a batch of one is exactly it,
larger batches differ only by padding numerics (``tests/test_eval.py`` compares texts with
:class:`~kem.adapters.transformers.TransformersGenerator`).

Results are memoised per ``model_key``: the unedited model's answers are computed once and shared
by every method that sends the same text to the same weights (``none``; ``ike`` where no edit is
in scope; the pre-edit locality reference).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kem.adapters.base import cut_at_stop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetScore:
    """Teacher-forced result for one target after one request.

    Attributes:
        target_ids: The target's tokens, shape ``(m,)``.
        pred_ids: Argmax token at each target position (``pred_ids[i]`` predicts ``target_ids[i]``).
        logprobs: ``log P(target_ids[i] | request, target_ids[:i])`` per token.
    """

    target_ids: tuple[int, ...]
    pred_ids: tuple[int, ...]
    logprobs: tuple[float, ...]

    @property
    def accuracy(self) -> float:
        from kem.eval.metrics import token_accuracy

        return token_accuracy(self.pred_ids, self.target_ids)

    @property
    def nll(self) -> float:
        from kem.eval.metrics import mean_nll

        return mean_nll(self.logprobs)


@dataclass
class Job:
    """Work on one request: teacher-force ``targets``; decode up to ``max_new_tokens`` (0: none),
    stopping at ``stop``."""

    text: str
    targets: list[str] = field(default_factory=list)
    max_new_tokens: int = 0
    stop: tuple[str, ...] = ()


@dataclass
class _Gen:
    ids: list[int]
    finished: bool  # stopped by eos or a stop string (not by the budget)


class Scorer:
    """Runs jobs on causal LMs with memoisation.

    Args:
        tokenizer: The model's tokenizer (requests are encoded without added special tokens, as the
            engine does).
        batch_size: Requests per batch.
    """

    def __init__(self, tokenizer: Any, batch_size: int = 8) -> None:
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)
        self._tf: dict[tuple[str, str, str], TargetScore] = {}
        self._gen: dict[tuple[str, str, tuple[str, ...]], _Gen] = {}
        self.stats = {"prefills": 0, "prefill_tokens": 0, "decode_steps": 0, "batches": 0}

    # ---- memo ----------------------------------------------------------------------------------------
    def target_ids(self, target: str) -> list[int]:
        """Tokens of a target as it follows a prompt (with its leading space)."""
        return list(self.tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])

    def score(self, model_key: str, text: str, target: str) -> TargetScore:
        """A memoised teacher-forced result (run the job first)."""
        return self._tf[(model_key, text, target)]

    def generated(self, model_key: str, text: str, max_new_tokens: int, stop: Sequence[str] = ()) -> str | None:
        """A memoised greedy generation, or None when not computed for this budget. A generation that
        ended before its budget serves any larger budget; a longer one serves a smaller budget."""
        g = self._gen.get((model_key, text, tuple(stop)))
        if g is None:
            return None
        if len(g.ids) >= max_new_tokens:
            ids = g.ids[:max_new_tokens]
        elif g.finished:
            ids = g.ids
        else:
            return None
        return cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), tuple(stop))[0]

    def _missing(self, model_key: str, job: Job) -> Job | None:
        targets = [t for t in dict.fromkeys(job.targets) if (model_key, job.text, t) not in self._tf]
        gen = job.max_new_tokens > 0 and self.generated(model_key, job.text, job.max_new_tokens, job.stop) is None
        if not targets and not gen:
            return None
        return Job(job.text, targets, job.max_new_tokens if gen else 0, job.stop)

    # ---- running -------------------------------------------------------------------------------------
    def run_many(self, model: Any, model_key: str, jobs: Sequence[Job]) -> None:
        """Compute whatever of ``jobs`` is not memoised yet, in batches of similar length."""
        merged: dict[tuple[str, tuple[str, ...]], Job] = {}
        for j in jobs:
            m = self._missing(model_key, j)
            if m is None:
                continue
            k = (m.text, m.stop if m.max_new_tokens else ())
            if k in merged:
                old = merged[k]
                merged[k] = Job(m.text, list(dict.fromkeys(old.targets + m.targets)),
                                max(old.max_new_tokens, m.max_new_tokens), m.stop)
            else:
                merged[k] = m
        by_text = {j.text: k for k, j in merged.items() if j.max_new_tokens}
        for k, j in list(merged.items()):  # teacher forcing rides along with a generation of the same text
            if not j.max_new_tokens and j.text in by_text:
                g = merged[by_text[j.text]]
                g.targets = list(dict.fromkeys(g.targets + j.targets))
                del merged[k]
        todo = list(merged.values())
        if not todo:
            return
        encoded = [(self.tokenizer(j.text, add_special_tokens=False)["input_ids"], j) for j in todo]
        encoded.sort(key=lambda x: (len(x[0]), x[1].max_new_tokens))
        for i in range(0, len(encoded), self.batch_size):
            chunk = encoded[i:i + self.batch_size]
            self._batch(model, model_key, [c[0] for c in chunk], [c[1] for c in chunk])

    def _eos(self, model: Any) -> set[int]:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = eos if isinstance(eos, (list, tuple)) else [eos]
        return {int(i) for i in ids if i is not None}

    def _batch(self, model: Any, model_key: str, ids: list[list[int]], jobs: list[Job]) -> None:
        import torch

        if any(not x for x in ids):
            raise ValueError("cannot score an empty request")
        dev = model.device
        b, width = len(ids), max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        inp = torch.full((b, width), pad, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for r, x in enumerate(ids):  # left padding
            inp[r, width - len(x):] = torch.tensor(x)
            mask[r, width - len(x):] = 1
        inp, mask = inp.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        self.stats["batches"] += 1
        self.stats["prefills"] += b
        self.stats["prefill_tokens"] += sum(len(x) for x in ids)
        with torch.inference_mode():
            out = model(input_ids=inp, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
            cache, last = out.past_key_values, out.logits[:, -1].float()  # (b, vocab)
            nxt_pos = pos[:, -1] + 1  # (b,)
            self._teacher_force(model, model_key, cache, last, mask, nxt_pos, jobs)
            if any(j.max_new_tokens > 0 for j in jobs):
                self._greedy(model, model_key, cache, last, mask, nxt_pos, jobs)

    def _teacher_force(self, model: Any, model_key: str, cache: Any, last: Any, mask: Any, nxt_pos: Any,
                       jobs: list[Job]) -> None:
        import torch

        dev = model.device
        width = mask.shape[1]
        for slot in range(max(len(j.targets) for j in jobs)):
            rows = [(r, self.target_ids(j.targets[slot])) for r, j in enumerate(jobs) if slot < len(j.targets)]
            m = max(len(t) for _, t in rows)
            ext = torch.zeros((len(jobs), m), dtype=torch.long)
            for r, t in rows:
                ext[r, :len(t)] = torch.tensor(t)
            ext = ext.to(dev)
            emask = torch.cat([mask, torch.ones((len(jobs), m), dtype=mask.dtype, device=dev)], 1)
            epos = nxt_pos[:, None] + torch.arange(m, device=dev)[None]
            out = model(input_ids=ext, attention_mask=emask, position_ids=epos, past_key_values=cache, use_cache=True)
            logits = torch.cat([last[:, None], out.logits[:, :-1].float()], 1)  # (b, m, vocab)
            logp = torch.log_softmax(logits, -1)
            for r, t in rows:
                tt = torch.tensor(t, device=dev)
                lp = logp[r, torch.arange(len(t), device=dev), tt]
                self._tf[(model_key, jobs[r].text, jobs[r].targets[slot])] = TargetScore(
                    tuple(t), tuple(int(x) for x in logits[r, :len(t)].argmax(-1).tolist()),
                    tuple(float(x) for x in lp.tolist()))
            cache.crop(-m)  # back to the prefix (crop(-n) removes n positions in every supported version)
            if cache.get_seq_length() != width:
                raise RuntimeError(f"cache crop failed: {cache.get_seq_length()} != {width}")

    def _greedy(self, model: Any, model_key: str, cache: Any, last: Any, mask: Any, nxt_pos: Any,
                jobs: list[Job]) -> None:
        import torch

        dev = model.device
        eos = self._eos(model)
        rows = list(range(len(jobs)))  # original row of each live batch row
        new: list[list[int]] = [[] for _ in jobs]
        done = [j.max_new_tokens <= 0 for j in jobs]
        finished = [False] * len(jobs)
        logits = last
        step = 0
        while True:
            toks = logits.argmax(-1).tolist()
            for k, r in enumerate(rows):
                if done[r]:
                    continue
                tok = int(toks[k])
                if tok in eos:
                    done[r] = finished[r] = True
                    continue
                new[r].append(tok)
                if jobs[r].stop and cut_at_stop(self.tokenizer.decode(new[r], skip_special_tokens=True),
                                                jobs[r].stop)[1]:
                    done[r] = finished[r] = True
                elif len(new[r]) >= jobs[r].max_new_tokens:
                    done[r] = True
            keep = [k for k, r in enumerate(rows) if not done[r]]
            if not keep:
                break
            if len(keep) < len(rows) and hasattr(cache, "batch_select_indices"):
                idx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(idx)
                mask, nxt_pos = mask[idx], nxt_pos[idx]
                rows = [rows[k] for k in keep]
                toks = [toks[k] for k in keep]
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=dev)], 1)
            inp = torch.tensor([[int(t)] for t in toks], device=dev)
            out = model(input_ids=inp, attention_mask=mask, position_ids=nxt_pos[:, None], past_key_values=cache,
                        use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1].float()
            nxt_pos = nxt_pos + 1
            step += 1
        self.stats["decode_steps"] += step
        for r, j in enumerate(jobs):
            if j.max_new_tokens > 0:
                self._gen[(model_key, j.text, j.stop)] = _Gen(new[r], finished[r])
