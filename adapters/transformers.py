"""The embedded default engine: a Hugging Face causal LM run in-process with transformers.

One model instance serves every caller; a lock queues requests so concurrent callers never
interleave on it. Greedy decoding (``temperature == 0``) is deterministic, which the tests and the
out-of-scope "byte-identical" guarantee rely on.

With an edit-follower adapter (``follower=``), a request whose params name it
(``GenerationParams.adapter``) runs with the LoRA on (:class:`kem.follower.lora.LoraHooks`, attached
under the lock for that request only); every other request runs on the bare base model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from kem.adapters.base import cut_at_stop

from kem.errors import EngineError
from kem.protocols import GenerationParams, Message

log = logging.getLogger(__name__)


class TransformersGenerator:
    """Generator over a loaded ``(model, tokenizer)`` pair.

    Args:
        model: A ``PreTrainedModel`` for causal LM, already on its device and in eval mode.
        tokenizer: Its tokenizer (a chat template is needed for :meth:`chat`).
        name: The name this engine answers to.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str = "smollm2-135m-instruct",
                 follower: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self._lock = threading.Lock()
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
        from kem.follower.lora import LoraHooks
        from kem.follower.registry import FOLLOWER_NAME, check_base

        check_base(path, self.model)
        self.lora = LoraHooks(self.model, path)
        self.follower = FOLLOWER_NAME

    def _adapter(self, params: GenerationParams) -> Any:
        """The context the request runs in: the LoRA on when ``params.adapter`` names the follower."""
        import contextlib

        if params.adapter is None:
            return contextlib.nullcontext()
        if self.lora is None or params.adapter != self.follower:
            raise EngineError(f"the engine {self.name} has no adapter {params.adapter!r}", status_code=400)
        return self.lora.active()

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

    def _gen_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if params.temperature > 0:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.stop:
            kw.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        return kw

    # ---- Generator protocol --------------------------------------------------------------------
    def generate(self, prompt: str, params: GenerationParams) -> str:
        import torch

        enc = self._encode(prompt)
        with self._lock, self._adapter(params), torch.inference_mode():
            try:
                out = self.model.generate(**enc, **self._gen_kwargs(params))
            except Exception as exc:
                raise EngineError(f"generation failed: {exc}") from exc
        text = self.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return cut_at_stop(text, params.stop)[0]

    def chat(self, messages: Sequence[Message], params: GenerationParams) -> str:
        return self.generate(self.chat_prompt(messages), params)

    def stream(self, prompt: str, params: GenerationParams) -> Iterator[str]:
        """Yield text pieces as they are decoded (the lock is held for the whole stream)."""
        import torch
        from transformers import TextIteratorStreamer

        enc = self._encode(prompt)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**enc, **self._gen_kwargs(params), streamer=streamer)
            except BaseException as exc:  # surfaced to the consumer below
                errors.append(exc)
                streamer.end()

        with self._lock, self._adapter(params):
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            sent = ""
            for piece in streamer:
                sent_before = sent
                sent += piece
                cut, stopped = cut_at_stop(sent, params.stop)
                if len(cut) > len(sent_before):
                    yield cut[len(sent_before) :]
                if stopped:
                    break
            worker.join()
        if errors:
            raise EngineError(f"generation failed: {errors[0]}")

    def stream_chat(self, messages: Sequence[Message], params: GenerationParams) -> Iterator[str]:
        return self.stream(self.chat_prompt(messages), params)
