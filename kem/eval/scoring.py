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
import time
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
    stop: tuple[str, ...] = ()


class Scorer:
    """Runs jobs on causal LMs with memoisation.

    Args:
        tokenizer: The model's tokenizer (requests are encoded without added special tokens, as the
            engine does).
        batch_size: Requests per batch.
        min_shared_prefix: A batch whose requests share at least this many leading tokens (the IKE
            demonstrations, a chat template's system message) prefills them once and the rest per
            row; 0 turns this off. Same computation up to float rounding (``tests/test_eval.py``).
    """

    def __init__(self, tokenizer: Any, batch_size: int = 16, min_shared_prefix: int = 16) -> None:
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)
        self.min_shared_prefix = min_shared_prefix
        self._tf: dict[tuple[str, str, str], TargetScore] = {}
        self._gen: dict[tuple[str, str], list[_Gen]] = {}
        self._prefixes: dict[tuple[str, tuple[int, ...]], Any] = {}  # (model key, tokens) -> batch-1 cache
        self.stats: dict[str, float] = {"prefills": 0, "prefill_tokens": 0, "decode_steps": 0, "batches": 0,
                                        "prefill_s": 0.0, "teacher_force_s": 0.0, "decode_s": 0.0}

    # ---- memo ----------------------------------------------------------------------------------------
    def target_ids(self, target: str) -> list[int]:
        """Tokens of a target as it follows a prompt (with its leading space)."""
        return list(self.tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])

    def score(self, model_key: str, text: str, target: str) -> TargetScore:
        """A memoised teacher-forced result (run the job first)."""
        return self._tf[(model_key, text, target)]

    def generated(self, model_key: str, text: str, max_new_tokens: int, stop: Sequence[str] = ()) -> str | None:
        """A memoised greedy generation, or None when not computed for this budget and stops.

        Greedy decoding is deterministic, so a generation run with stop strings ``S`` serves a request
        whose stops include ``S``: its first ``max_new_tokens`` tokens, cut at the request's first stop.
        One that ended (eos or a stop of ``S``) before its budget serves any larger budget."""
        stop = tuple(stop)
        for g in self._gen.get((model_key, text), ()):
            if not set(g.stop) <= set(stop):
                continue
            if len(g.ids) >= max_new_tokens:
                ids = g.ids[:max_new_tokens]
            elif g.finished:
                ids = g.ids
            else:
                continue
            return cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), stop)[0]
        return None

    def _missing(self, model_key: str, job: Job) -> Job | None:
        targets = [t for t in dict.fromkeys(job.targets) if (model_key, job.text, t) not in self._tf]
        gen = job.max_new_tokens > 0 and self.generated(model_key, job.text, job.max_new_tokens, job.stop) is None
        if not targets and not gen:
            return None
        return Job(job.text, targets, job.max_new_tokens if gen else 0, job.stop)

    # ---- running -------------------------------------------------------------------------------------
    def run_many(self, model: Any, model_key: str, jobs: Sequence[Job]) -> None:
        """Compute whatever of ``jobs`` is not memoised yet, in batches of similar length."""
        merged: dict[str, Job] = {}  # one prefill per text: its targets, one decode serving every budget
        for j in jobs:
            m = self._missing(model_key, j)
            if m is None:
                continue
            old = merged.get(m.text)
            if old is None:
                merged[m.text] = m
                continue
            if old.max_new_tokens and m.max_new_tokens:  # stops common to both, the larger budget
                stop = tuple(x for x in old.stop if x in m.stop)
            else:
                stop = old.stop if old.max_new_tokens else m.stop
            merged[m.text] = Job(m.text, list(dict.fromkeys(old.targets + m.targets)),
                                 max(old.max_new_tokens, m.max_new_tokens), stop)
        todo = list(merged.values())
        if not todo:
            return
        encoded = [(self.tokenizer(j.text, add_special_tokens=False)["input_ids"], j) for j in todo]
        # requests that start alike (IKE demonstrations, a chat system message) batch together, by length
        groups: dict[tuple[int, ...], list[tuple[list[int], Job]]] = {}
        k = self.min_shared_prefix
        for x, j in encoded:
            groups.setdefault(tuple(x[:k]) if k and len(x) > 2 * k else (), []).append((x, j))
        for group in groups.values():
            group.sort(key=lambda x: (len(x[0]), x[1].max_new_tokens))
            for i in range(0, len(group), self.batch_size):
                chunk = group[i:i + self.batch_size]
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
        b = len(ids)
        shared = _common_prefix(ids) if b > 1 and self.min_shared_prefix > 0 else 0
        shared = min(shared, min(len(x) for x in ids) - 1)  # every row keeps a token of its own
        if shared < self.min_shared_prefix:
            shared = 0
        rest = [x[shared:] for x in ids]
        width = max(len(x) for x in rest)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        inp = torch.full((b, width), pad, dtype=torch.long)
        mask = torch.ones((b, shared + width), dtype=torch.long)
        for r, x in enumerate(rest):  # left padding (after the shared prefix, if any)
            inp[r, width - len(x):] = torch.tensor(x)
            mask[r, shared:shared + width - len(x)] = 0
        inp, mask = inp.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        self.stats["batches"] += 1
        self.stats["prefills"] += b
        self.stats["prefill_tokens"] += sum(len(x) for x in rest)
        with torch.inference_mode():
            t0 = time.perf_counter()
            cache = self._prefix_cache(model, model_key, ids[0][:shared]) if shared else None
            if cache is not None:
                cache.batch_repeat_interleave(b)
            out = model(input_ids=inp, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            cache, last = out.past_key_values, out.logits[:, -1].float()  # (b, vocab)
            nxt_pos = pos[:, -1] + 1  # (b,)
            t1 = time.perf_counter()
            self._teacher_force(model, model_key, cache, last, mask, nxt_pos, jobs)
            t2 = time.perf_counter()
            if any(j.max_new_tokens > 0 for j in jobs):
                self._greedy(model, model_key, cache, last, mask, nxt_pos, jobs)
            t3 = time.perf_counter()
        self.stats["prefill_s"] += t1 - t0
        self.stats["teacher_force_s"] += t2 - t1
        self.stats["decode_s"] += t3 - t2

    def _prefix_cache(self, model: Any, model_key: str, prefix: list[int]) -> Any:
        """A fresh batch-1 key/value cache of ``prefix``, built on the longest memoised prefix of it
        (the IKE demonstrations recur in every batch). Keeps the last few prefixes."""
        import copy

        import torch

        best: tuple[int, ...] = ()
        for key in self._prefixes:
            if key[0] == model_key and len(key[1]) > len(best) and tuple(prefix[:len(key[1])]) == key[1]:
                best = key[1]
        cache = copy.deepcopy(self._prefixes[(model_key, best)]) if best else None
        if len(best) < len(prefix):
            inp = torch.tensor([prefix[len(best):]], device=model.device)
            pos = torch.arange(len(best), len(prefix), device=model.device)[None]
            cache = model(input_ids=inp, position_ids=pos, past_key_values=cache, use_cache=True,
                          logits_to_keep=1).past_key_values
            self._prefixes[(model_key, tuple(prefix))] = copy.deepcopy(cache)
            while len(self._prefixes) > 8:
                del self._prefixes[next(iter(self._prefixes))]
        self.stats["prefill_tokens"] += len(prefix) - len(best)
        return cache

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
                gens = self._gen.setdefault((model_key, j.text), [])
                gens[:] = [g for g in gens  # drop what the new one serves too (fewer stops, as long)
                           if not (set(j.stop) <= set(g.stop) and (finished[r] or len(new[r]) >= len(g.ids)))]
                gens.append(_Gen(new[r], finished[r], j.stop))


def _common_prefix(ids: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every row."""
    first, n = ids[0], min(len(x) for x in ids)
    for i in range(n):
        t = first[i]
        if any(x[i] != t for x in ids):
            return i
    return n
