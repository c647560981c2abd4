"""The embedded default engine: a Hugging Face causal LM run in-process with transformers.

One model instance serves every caller. kem decodes step by step itself (KV cache, chunked prefill)
and every forward pass takes one turn of a fair turnstile (fewest tokens served first), so concurrent
requests interleave token by token: one long request cannot hold the model while a short one waits, and a cancelled or timed-out
request stops between two steps. Greedy decoding (``temperature == 0``) is deterministic, which the
tests and the out-of-scope "byte-identical" guarantee rely on.

With an edit-follower adapter (``follower=``), a request whose params name it
(``GenerationParams.lora``) runs with the LoRA on (:class:`kem.follower.lora.LoraHooks`, switched on
for that request's forward passes only); every other request runs on the bare base model. A request
whose params carry a :class:`~kem.protocols.LoraRef` (a tenant's adapter folder) runs with that
LoRA: adapters load on first use and stay resident in an LRU of ``max_adapters``
(:class:`kem.follower.lora.ResidentAdapters`); since every forward pass takes one turn of the
turnstile and switches its request's adapter on for that pass only, requests of different tenants
interleave step by step and each runs with its own adapter.
"""

from __future__ import annotations

import heapq
import inspect
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

from kem.adapters.base import cut_at_stop
from kem.errors import ContextLengthError, EngineError, KemError, ModelError
from kem.protocols import GenerationParams, LoraRef, Message

log = logging.getLogger(__name__)


class TransformersGenerator:
    """Generator over a loaded ``(model, tokenizer)`` pair.

    Args:
        model: A ``PreTrainedModel`` for causal LM, already on its device and in eval mode.
        tokenizer: Its tokenizer (a chat template is needed for :meth:`chat`).
        name: The name this engine answers to.
    """

    # Prompt tokens per forward pass (a turn) during prefill. Alone, large chunks prefill fastest; with other
    # requests in flight (or seen in the last CONTENDED seconds) small ones bound how long another request
    # waits for a turn. Measured at 3.5k tokens of context on 1 CPU thread: 32 tokens 0.28 s a chunk
    # (prefill 30 s), 256 tokens 1.1 s a chunk (prefill 15 s).
    PREFILL_CHUNK = 256
    PREFILL_CHUNK_CONTENDED = 32
    CONTENDED = 2.0

    def __init__(self, model: Any, tokenizer: Any, name: str = "smollm2-135m-instruct",
                 follower: Any = None, max_adapters: int = 32) -> None:
        from kem.follower.lora import ResidentAdapters

        self.model = model
        self.adapters = ResidentAdapters(model, max_adapters)  # tenants' adapters, loaded on demand
        self.accepts_loras = True  # requests may carry a LoraRef
        self.tokenizer = tokenizer
        self.name = name
        self._turns = FairTurns()
        import torch

        self._tls = threading.local()  # per thread: whether a step has run on it (see _step_threads)
        self._halved = 0  # steps running now on half their thread's CPU threads
        self._clean_threads = torch.get_num_threads()
        self._inflight = 0  # requests decoding now
        self._contended_until = 0.0  # time.monotonic() until which prefill uses small chunks
        # the KV cache argument: ``cache`` in recent transformers, ``past_key_values`` before
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.lora: Any = None  # kem.follower.lora.LoraHooks of the edit-follower, if any
        self.follower: str | None = None  # the adapter name in-scope requests ask for
        if follower is not None:
            self.attach_follower(follower)

    @classmethod
    def load(cls, name_or_path: str, cache_dir: Any, device: str = "cpu", dtype: Any = None,
             follower: Any = None) -> TransformersGenerator:
        """Load a model (packaged name or folder); ``follower`` is an edit-follower adapter folder."""
        from kem.models import load_causal_lm

        model, tok = load_causal_lm(name_or_path, cache_dir, device=device, dtype=dtype)
        return cls(model, tok, name=str(name_or_path), follower=follower)

    def attach_follower(self, path: Any) -> None:
        """Bind the edit-follower adapter in ``path`` (checked against this model's fingerprint)."""
        from kem.follower.follower_registry import FOLLOWER_NAME, check_base
        from kem.follower.lora import LoraHooks

        check_base(path, self.model)
        self.lora = LoraHooks(self.model, path)
        self.follower = FOLLOWER_NAME

    def _hooks(self, params: GenerationParams) -> Any:
        """The LoRA the request runs with (None: the base weights): the edit-follower when
        ``params.lora`` names it, or the folder of a :class:`LoraRef` (loaded now if not resident)."""
        ref = params.lora
        if ref is None:
            return None
        if isinstance(ref, LoraRef):
            try:
                return self.adapters.get(ref.name, ref.path)
            except ModelError as exc:
                raise EngineError(f"the engine {self.name} cannot load adapter {ref.name!r}: {exc}",
                                  status_code=400) from None
        if self.lora is None or ref != self.follower:
            raise EngineError(f"the engine {self.name} has no adapter {ref!r}", status_code=400)
        return self.lora

    # ---- prompt text ---------------------------------------------------------------------------
    def chat_prompt(self, messages: Sequence[Message]) -> str:
        """The raw text the chat template makes of ``messages`` (generation prompt appended)."""
        try:
            return self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # no template, bad roles...
            raise EngineError(f"cannot apply the chat template of {self.name}: {exc}", status_code=400) from exc

    def _encode(self, text: str) -> Any:
        # Chat-template text already holds its special tokens; plain prompts get what the tokenizer adds.
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)

    # ---- decoding ------------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        """Tokens the model attends over (prompt + completion)."""
        cfg = self.model.config
        n: Any = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        return int(n or 2048)

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes as a prompt (what :meth:`generate` feeds the model)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, list | tuple) else ({int(eos)} if eos is not None else set())

    def _forward(self, ids: Any, past: Any, lora: Any, served: int, owner: object) -> tuple[Any, Any]:
        """One model step over ``ids`` (shape ``(1, n)``) that extends the KV cache ``past`` in place,
        taking a turn, with ``lora`` (a LoraHooks or None) on for this step only. Returns
        ``(next-token logits (vocab,), past)``."""
        import torch

        # inference mode is per thread and per step: a generator that yields inside it would leak the
        # mode into its consumer, and a stream resumed on another thread would run without it
        shareable = lora is None
        with torch.inference_mode(), self._turns.turn(served, owner, shareable=shareable) as beside, \
                (lora.active() if lora is not None else nullcontext()), \
                self._step_threads(beside, long_step=shareable and served >= FairTurns.LONG):
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: past})
        return out.logits[0, -1], past

    def _contended_locked(self) -> bool:
        """Whether other requests are in flight now or were within :attr:`CONTENDED` seconds (under
        ``self._turns._cond``)."""
        now = time.monotonic()
        if self._inflight > 1:
            self._contended_until = now + self.CONTENDED
        return now < self._contended_until

    @contextmanager
    def _step_threads(self, beside: bool, long_step: bool) -> Iterator[None]:
        """CPU threads for one step: the calling thread's torch setting, or half of it where the step
        shares the cores (it runs ``beside`` another step in the turnstile's second lane, or it is a
        shareable ``long_step`` while others are in flight, which a short step may join). Two steps at once
        then split the cores instead of both spinning on all of them, and a short request's step that
        runs alone gets them all. Torch's intra-op thread count is per thread (OpenMP), so this touches no
        other thread's steps; but a thread's first torch call copies torch's last global value, which a
        halved step has lowered for its duration, so a thread's first step here starts from the last
        value read while none was halved."""
        import torch

        with self._turns._cond:
            if not getattr(self._tls, "ready", False):
                if self._halved:
                    torch.set_num_threads(self._clean_threads)
                self._tls.ready = True
            total = torch.get_num_threads()
            if not self._halved:
                self._clean_threads = total
            share = beside or (long_step and self._contended_locked())
            n = max(1, total // 2) if share else total
            if n != total:
                torch.set_num_threads(n)
                self._halved += 1
        try:
            yield
        finally:
            if n != total:
                with self._turns._cond:
                    torch.set_num_threads(total)
                    self._halved -= 1

    @staticmethod
    def _pick(logits: Any, params: GenerationParams) -> int:
        import torch

        if params.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p  # the nucleus, first token always
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs / probs.sum(), 1))

    def _decode(self, prompt: str, params: GenerationParams) -> Iterator[str]:
        """Decode ``prompt`` step by step, yielding text as it becomes final.

        Every forward pass (a prefill chunk of :attr:`PREFILL_CHUNK` tokens, or one new token) takes
        one turn of the engine's turnstile (:class:`FairTurns`: the request served the fewest tokens
        goes first), so concurrent requests interleave token by token: a long request cannot hold the
        model while a short one waits. Between steps the request's deadline and
        cancel event are checked. Text ending in a partial character or in a prefix of a stop string is
        held back until it is final, so the pieces join to exactly what :meth:`generate` returns.
        """
        import torch

        lora = self._hooks(params)  # before any turn: an unknown adapter fails here, loading holds no turn
        ids = self._encode(prompt)["input_ids"]
        n = int(ids.shape[1])
        room = self.context_length - n
        if room <= 0:
            raise ContextLengthError(f"the prompt has {n} tokens; {self.name} attends over "
                                     f"{self.context_length} (prompt + completion)", field="messages")
        budget = min(params.max_new_tokens, room)
        eos = self._eos_ids()
        from transformers import DynamicCache

        past, logits = DynamicCache(config=self.model.config), None
        owner = object()  # this request, for the turnstile
        self._enter()
        try:
            i = 0
            while i < n:
                params.check_alive()
                step = self._prefill_chunk()
                logits, past = self._forward(ids[:, i:i + step], past, lora, i, owner)
                i += step
            out: list[int] = []
            sent = ""
            for _ in range(budget):
                tok = self._pick(logits, params)
                if tok in eos:
                    break
                out.append(tok)
                text = self.tokenizer.decode(out, skip_special_tokens=True)
                cut, stopped = cut_at_stop(text, params.stop)
                if stopped:
                    if len(cut) > len(sent):
                        yield cut[len(sent):]
                    return
                final = _settled(cut, params.stop)
                if len(final) > len(sent):
                    yield final[len(sent):]
                    sent = final
                if len(out) == budget:
                    break
                params.check_alive()
                logits, past = self._forward(torch.tensor([[tok]], device=ids.device), past, lora, n + len(out),
                                             owner)
            text = cut_at_stop(self.tokenizer.decode(out, skip_special_tokens=True), params.stop)[0]
            if len(text) > len(sent):
                yield text[len(sent):]
        except KemError:
            raise
        except Exception as exc:
            raise EngineError(f"generation failed: {exc}") from exc
        finally:
            self._turns.done(owner)
            self._leave()

    def _enter(self) -> None:
        with self._turns._cond:
            self._inflight += 1
            if self._inflight > 1:
                self._contended_until = time.monotonic() + self.CONTENDED

    def _leave(self) -> None:
        with self._turns._cond:
            self._inflight -= 1

    def _prefill_chunk(self) -> int:
        with self._turns._cond:
            contended = self._contended_locked()
        return self.PREFILL_CHUNK_CONTENDED if contended else self.PREFILL_CHUNK

    # ---- Generator protocol --------------------------------------------------------------------
    def generate(self, prompt: str, params: GenerationParams) -> str:
        return "".join(self._decode(prompt, params))

    def chat(self, messages: Sequence[Message], params: GenerationParams) -> str:
        return self.generate(self.chat_prompt(messages), params)

    def stream(self, prompt: str, params: GenerationParams) -> Iterator[str]:
        """Yield text pieces as they are decoded. No lock is held between pieces: a consumer that stops
        reading (or closes the iterator) holds nothing up."""
        return self._decode(prompt, params)

    def stream_chat(self, messages: Sequence[Message], params: GenerationParams) -> Iterator[str]:
        return self.stream(self.chat_prompt(messages), params)


def _settled(text: str, stop: Sequence[str]) -> str:
    """The part of ``text`` no later token can change: without a trailing partial character (byte-level
    BPE decodes a split character as U+FFFD) or a trailing prefix of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text.endswith(s[:k], 0, end):
                hold = max(hold, k)
                break
    return text[:end - hold]


class FairTurns:
    """The turnstile over one model: each forward step takes a turn, and among the callers waiting for a
    turn the one whose request has been served the fewest tokens so far goes first (ties: arrival
    order). A new short request therefore overtakes a long one at the long one's next step instead of
    queueing behind it (fair queueing on tokens served; a plain ``Lock`` lets one thread re-acquire it
    forever).

    Between two steps a request does a little work of its own (sampling, decoding text). For
    :attr:`GRACE` seconds after a step, the turn stays reserved for that request against waiters
    served more tokens than it, so a short request runs its steps back to back instead of letting a
    long one's step in between each of them. :meth:`done` ends the reservation early.

    A second lane: a step of a long request (served at least :attr:`LONG` tokens: a long prompt's
    prefill chunk, which cannot be interrupted) does not make a short request (served fewer than
    :attr:`SHORT`) wait; the short one's step runs beside it, when neither runs with a LoRA (adapters
    are hooks on the shared modules, so their steps stay alone). At most two steps run at once.
    """

    GRACE = 0.005
    LONG = 512
    SHORT = 256

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: list[tuple[int, int]] = []  # a heap of (tokens served, arrival number)
        self._arrivals = 0
        self._running: list[tuple[int, bool]] = []  # (tokens served, shareable) of the steps running now
        self._held: tuple[object, int, float] | None = None  # (owner, served, until): the grace reservation

    @property
    def _busy(self) -> bool:
        return bool(self._running)

    def _blocked_by_grace(self, owner: object, served: int) -> float:
        """Seconds to wait for another request's reservation (0: not blocked)."""
        h = self._held
        if h is None or h[0] is owner or served <= h[1]:
            return 0.0
        return max(0.0, h[2] - time.monotonic())

    def _second_lane(self, served: int, shareable: bool) -> bool:
        """Whether a short step may run beside the one running now."""
        if not shareable or served >= self.SHORT or len(self._running) != 1:
            return False
        other_served, other_shareable = self._running[0]
        return other_shareable and other_served >= self.LONG

    @contextmanager
    def turn(self, served: int = 0, owner: object = None, shareable: bool = False) -> Iterator[bool]:
        """Hold the model for one step of ``owner``'s request, served ``served`` tokens so far
        (``shareable``: the step runs with no LoRA, so it may take the second lane). Yields whether the
        step runs beside another one (the second lane)."""
        with self._cond:
            me = (served, self._arrivals)
            self._arrivals += 1
            heapq.heappush(self._waiting, me)
            while True:
                if self._waiting[0] == me and (not self._running or self._second_lane(served, shareable)):
                    wait = self._blocked_by_grace(owner, served) if not self._running else 0.0
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                else:
                    self._cond.wait()
            heapq.heappop(self._waiting)
            mine = (served, shareable)
            beside = bool(self._running)
            self._running.append(mine)
            self._held = None
            self._cond.notify_all()  # the next waiter may fit the second lane
        try:
            yield beside
        finally:
            with self._cond:
                self._running.remove(mine)
                self._held = (owner, served, time.monotonic() + self.GRACE) if owner is not None else None
                self._cond.notify_all()

    def done(self, owner: object) -> None:
        """``owner``'s request needs no more turns: drop its reservation."""
        with self._cond:
            if self._held is not None and self._held[0] is owner:
                self._held = None
                self._cond.notify_all()
