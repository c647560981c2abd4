"""The engines ``kem serve`` runs in process (transformers, vLLM), and the hook that builds the next one on
``/admin/reload``: used by the command (:mod:`kem.server.serve_cli`) and by :class:`~kem.server.serving.Serving`
(the playground's other version)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kem.errors import ValidationError
from kem.protocols import Reloadable
from kem.settings import Settings

ENGINES = ("transformers", "vllm")


def build_engine(kind: str, model: str, settings: Settings, name: str | None = None) -> Any:
    """Load an in-process engine: ``transformers`` (the embedded default) or ``vllm`` (``vllm.LLM``)."""
    from kem.follower.follower_registry import follower_for

    follower = follower_for(settings)  # the base model's, also when ``model`` is a version folder
    if kind == "transformers":
        from kem.adapters.transformers import TransformersGenerator

        gen = TransformersGenerator.load(model, settings.cache_dir, device=settings.resolved_device(),
                                         follower=follower)
        gen.adapters.capacity = settings.max_adapters
    elif kind == "vllm":
        from kem.adapters.vllm import VLLMGenerator
        from kem.models import resolve_model

        lora: dict[str, Any] = {}
        if settings.vllm_max_loras:  # tenants' adapters: LoRA on, an adapter cache of max_cpu_loras
            lora = {"max_loras": settings.vllm_max_loras, "max_lora_rank": settings.vllm_max_lora_rank,
                    "max_cpu_loras": max(settings.vllm_max_cpu_loras, settings.vllm_max_loras),
                    "lora_target_modules": [m.strip() for m in settings.vllm_lora_target_modules.split(",")
                                            if m.strip()] or None}
        if settings.vllm_max_num_batched_tokens:  # vLLM's chunked-prefill budget per step
            lora["max_num_batched_tokens"] = settings.vllm_max_num_batched_tokens
        gen = VLLMGenerator.load(str(resolve_model(model, settings.cache_dir)), follower=follower, **lora)
    else:
        raise ValidationError(f"--engine must be one of {', '.join(ENGINES)} (got {kind!r})", field="engine")
    if name:
        gen.name = name
    return gen


def make_reloader(kind: str, settings: Settings, base_name: str, upstream_key: str | None = None,
                  upstream_adapter: str | None = None) -> Any:
    """The ``/admin/reload`` hook ``(request, current engine) -> engine``.

    In-process engines: ``vllm`` loads the new weights into the running engine when the folder has the
    same architecture and tokenizer (requests wait in its queue for the few seconds it takes), else it
    starts a fresh engine beside the old one; ``transformers`` loads a fresh model. Upstream mode
    (``kind == "upstream"``): connect to the new ``upstream`` URL. Requests keep running on the old
    engine meanwhile; the caller swaps."""

    def reload(req: Any, current: Any = None) -> Any:
        if kind == "upstream":
            if req.upstream is None:
                raise ValidationError("upstream mode: send {\"upstream\": \"http://host:port\"} (the server "
                                      "that serves the new version)", field="upstream")
            from kem.adapters.openai_http import OpenAIHTTPGenerator

            return OpenAIHTTPGenerator(req.upstream, model=req.name, api_key=upstream_key, lora=upstream_adapter,
                                       runtime_lora=settings.upstream_runtime_lora, max_adapters=settings.max_adapters)
        if req.path is None:
            raise ValidationError("send {\"path\": \"/the/new/model/folder\"}", field="path")
        path = Path(req.path).expanduser()
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ValidationError(f"path {req.path!r} is not a model folder (a Hugging Face folder with a "
                                  "config.json, e.g. one consolidation published)", field="path")
        name = req.name or (f"{base_name}@{req.version}" if req.version else str(path))
        if kind == "vllm" and isinstance(current, Reloadable) and current.can_reload_in_place(path):
            current.reload_weights(path, name=name)
            return current
        return build_engine(kind, str(path), settings, name=name)

    return reload
