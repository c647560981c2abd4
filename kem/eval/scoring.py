"""Teacher-forced scoring and greedy generation on one model, one prefill per request.

A request (the exact text the engine sees) is run once through the model; its key/value cache is
then extended with each target (teacher forcing: argmax tokens and log-probabilities), cropped back,
and extended by greedy decoding. Greedy decoding here is the same computation as the engine's
``generate`` with ``temperature == 0`` (prefill, then one token at a time on the cache, stopping at
an end-of-sequence token, a stop string or ``max_new_tokens``); ``tests/test_eval.py`` checks that
the texts agree with :class:`~kem.adapters.transformers.TransformersGenerator`.

Results are memoised by ``(model_key, text, ...)``: the unedited model's answers are computed once
and shared by every method that sends the same text to the same weights (``none``, and ``ike`` on
requests where no edit is in scope; the pre-edit locality reference).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
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


def _crop(cache: Any, length: int) -> None:
    """Cut a transformers cache back to ``length`` positions (``crop(-n)`` means the same in the
    transformers versions kem supports)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class Scorer:
    """Runs requests on a causal LM with memoisation.

    Args:
        tokenizer: The model's tokenizer (requests are encoded without added special tokens, as the
            engine does).
        max_cache: Memoised results kept (oldest dropped first).
    """

    def __init__(self, tokenizer: Any, max_cache: int = 200_000) -> None:
        self.tokenizer = tokenizer
        self._tf: dict[tuple[str, str, str], TargetScore] = {}
        self._gen: dict[tuple[str, str, int, tuple[str, ...]], str] = {}
        self.max_cache = max_cache
        self.prefills = 0
        self.prefill_tokens = 0
        self.decode_steps = 0

    def target_ids(self, target: str) -> list[int]:
        """Tokens of a target as it follows a prompt (with its leading space)."""
        return list(self.tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])

    def _eos(self, model: Any) -> set[int]:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = eos if isinstance(eos, (list, tuple)) else [eos]
        return {int(i) for i in ids if i is not None}

    def run(self, model: Any, model_key: str, text: str, targets: Sequence[str] = (),
            max_new_tokens: int = 0, stop: Sequence[str] = ()) -> tuple[dict[str, TargetScore], str | None]:
        """Teacher-force each target after ``text`` and (when ``max_new_tokens > 0``) decode greedily.

        Args:
            model: The causal LM to run (already in the state the method wants).
            model_key: Identifies the weights (results are memoised per key): ``"base"`` for the unedited model.
            text: The exact request text.
            targets: Answers to teacher-force (each with a leading space).
            max_new_tokens: Greedy decoding budget (0: no generation).
            stop: Stop strings; the text is cut at the first one.

        Returns:
            ``({target: TargetScore}, generated text or None)``.
        """
        stop_t = tuple(stop)
        todo = [t for t in dict.fromkeys(targets) if (model_key, text, t) not in self._tf]
        gen_key = (model_key, text, max_new_tokens, stop_t)
        need_gen = max_new_tokens > 0 and gen_key not in self._gen
        if todo or need_gen:
            scores, gen = self._compute(model, text, todo, max_new_tokens if need_gen else 0, stop_t)
            if len(self._tf) + len(self._gen) > self.max_cache:
                self._tf.clear()
                self._gen.clear()
            for t, s in scores.items():
                self._tf[(model_key, text, t)] = s
            if need_gen:
                self._gen[gen_key] = gen or ""
        out = {t: self._tf[(model_key, text, t)] for t in targets}
        return out, (self._gen[gen_key] if max_new_tokens > 0 else None)

    def _compute(self, model: Any, text: str, targets: Sequence[str], max_new_tokens: int,
                 stop: tuple[str, ...]) -> tuple[dict[str, TargetScore], str | None]:
        import torch
        device = model.device
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("cannot score an empty request")
        prefix = torch.tensor([ids], device=device)
        scores: dict[str, TargetScore] = {}
        with torch.inference_mode():
            out = model(input_ids=prefix, use_cache=True, logits_to_keep=1)
            self.prefills += 1
            self.prefill_tokens += len(ids)
            last = out.logits[0, -1].float()
            cache = out.past_key_values
            n = len(ids)
            for t in targets:
                tids = self.target_ids(t)
                ext = model(input_ids=torch.tensor([tids], device=device), past_key_values=cache, use_cache=True)
                logits = torch.cat([last[None], ext.logits[0, :-1].float()], 0)  # (m, vocab)
                logp = torch.log_softmax(logits, -1)
                tt = torch.tensor(tids, device=device)
                scores[t] = TargetScore(tuple(tids), tuple(int(x) for x in logits.argmax(-1).tolist()),
                                        tuple(float(x) for x in logp[torch.arange(len(tids)), tt].tolist()))
                _crop(cache, n)
            gen = self._greedy(model, cache, last, max_new_tokens, stop) if max_new_tokens > 0 else None
        return scores, gen

    def _greedy(self, model: Any, cache: Any, last: Any, max_new_tokens: int, stop: tuple[str, ...]) -> str:
        import torch

        eos = self._eos(model)
        new: list[int] = []
        logits = last
        for step in range(max_new_tokens):
            tok = int(logits.argmax(-1))
            if tok in eos:
                break
            new.append(tok)
            if stop and cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), stop)[1]:
                break
            if step + 1 == max_new_tokens:
                break
            out = model(input_ids=torch.tensor([[tok]], device=model.device), past_key_values=cache, use_cache=True)
            self.decode_steps += 1
            logits = out.logits[0, -1].float()
            cache = out.past_key_values
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return cut_at_stop(text, stop)[0]

