"""``kem serve``: the Typer command that builds the editor, the engine and the app, then runs uvicorn.

The main CLI mounts it with ``app.command("serve")(kem.server.serve_cli.serve)``; it also runs on its own as
``python -m kem.server serve ...``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from kem.errors import KemError
from kem.server.engines import ENGINES, build_engine, make_reloader
from kem.settings import Settings

log = logging.getLogger(__name__)

SERVE_STORE_TIMEOUT = 3.0  # seconds; Settings.store_timeout when unset

def create(*, home: Path | None = None, upstream: str | None = None, upstream_key: str | None = None,
           engine: str = "transformers", keys: Path | None = None, model: str | None = None,
           served_name: str | None = None, model_version: str | None = None, settings: Settings | None = None,
           upstream_adapter: str | None = None, store: str | None = None) -> Any:
    """Build the app ``kem serve`` runs (also useful to embed kem in another ASGI server).

    ``model_version`` (``vN``, ``current`` or ``base``): a version consolidation published under
    ``<home>/models``. In-process engines load its folder; in upstream mode the upstream is taken to
    serve it. Either way the edits it (and its ancestors) absorbed are skipped.
    """
    from kem.editor import KnowledgeEditor
    from kem.server.app import build_app
    from kem.server.auth import KeyRing
    from kem.settings import Settings
    from kem.versions import recover, versions_for

    settings = settings or Settings()
    if home is not None:
        settings = settings.model_copy(update={"home": Path(home)})
    if store is not None:  # the edit store (kem.stores.open_store); the FAISS index stays under home
        settings = settings.model_copy(update={"store": store})
    if settings.store_timeout is None:  # a request during a database outage: a 503 after 3 s, not 10
        settings = settings.model_copy(update={"store_timeout": SERVE_STORE_TIMEOUT})
    ring = KeyRing.from_settings(keys, settings)
    with versions_for(settings) as versions:  # KEM_MODELS_DIR; with PostgreSQL, the versions recorded there
        served = versions.resolve(model_version) if model_version else None
    reloader = None
    if upstream:
        from kem.adapters.openai_http import OpenAIHTTPGenerator

        upstream_key = upstream_key or settings.upstream_api_key
        eng: Any = OpenAIHTTPGenerator(upstream, model=model, api_key=upstream_key, lora=upstream_adapter,
                                       runtime_lora=settings.upstream_runtime_lora, max_adapters=settings.max_adapters)
        reloader = make_reloader("upstream", settings, eng.name, upstream_key, upstream_adapter)
    else:
        if model:
            settings = settings.model_copy(update={"model": model})
        if served is not None and served.path is not None:
            eng = build_engine(engine, str(served.path), settings, name=f"{settings.model}@{served.version}")
            reloader = make_reloader(engine, settings, served_name or settings.model)
        else:
            eng = build_engine(engine, settings.model, settings)
            reloader = make_reloader(engine, settings, served_name or eng.name)
    editor = KnowledgeEditor.open(settings.home, settings=settings, generator=eng)
    with versions_for(settings) as versions:
        recover(versions, editor.store)  # what a killed consolidation job left half done
    if served is not None:
        editor.serve_version(served.absorbed)
    return build_app(settings, editor, eng, keys=ring, served_name=served_name, reloader=reloader,
                     follow_current=model_version == "current")  # PostgreSQL: hot swap when current moves


def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    home: Path | None = typer.Option(None, help="Edit store folder (default: KEM_HOME or ./kem-data)."),
    store: str | None = typer.Option(
        None, "--store", help="Edit store: 'sqlite' (<home>/edits.sqlite, the default), sqlite:///PATH or "
        "postgresql://user:pass@host:port/db[?schema=NAME], shared by several replicas (default: $KEM_STORE). "
        "The FAISS index stays local under --home."),
    upstream: str | None = typer.Option(
        None, help="An OpenAI-compatible server to forward to (e.g. a running `vllm serve`): http://host:port"),
    upstream_key: str | None = typer.Option(None, help="API key for the upstream (or KEM_UPSTREAM_API_KEY)."),
    engine: str = typer.Option("transformers", help="In-process engine when no --upstream: transformers | vllm."),
    keys: Path | None = typer.Option(
        None, help="API keys file: lines 'KEY NAMESPACE', 'sha256:HEX NAMESPACE', NAMESPACE '*' or a trailing 'admin' for admins (or KEM_API_KEYS_FILE); none: auth off."),
    model: str | None = typer.Option(
        None, help="Model name or folder for the in-process engine; with --upstream, the upstream's model name."),
    served_name: str | None = typer.Option(None, help="Model name clients use (default: the engine's)."),
    threads: int | None = typer.Option(
        None, help="Torch threads for kem's own work (query embeddings; the model with an in-process engine). "
        "Default: 1 with --upstream (one short query gains nothing from a second thread, and on a machine "
        "shared with the engine that thread waits for the engine's busy cores: measured 500 ms vs 50 ms "
        "per embedding), torch's default otherwise."),
    model_version: str | None = typer.Option(
        None, help="Serve a version consolidation published under KEM_MODELS_DIR (default <home>/models): vN, "
        "'current' or 'base'. In-process engines load it; with --upstream, say which version the upstream "
        "serves. Its absorbed edits are skipped. With 'current' on a PostgreSQL store, the replica hot-swaps "
        "when a version is published or rolled back anywhere."),
    upstream_adapter: str | None = typer.Option(
        None, help="With --upstream: the name under which the upstream serves kem's edit-follower LoRA "
        "(vllm serve --enable-lora --lora-modules kem-editor=PATH); in-scope requests are sent to it. "
        "Without it, in-scope requests use IKE prompting (/healthz says which)."),
    log_level: str = typer.Option("info", help="uvicorn/kem log level."),
) -> None:
    """Serve the OpenAI-compatible API with the edits applied (chat, completions, edits, metrics)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kem").setLevel(log_level.upper())  # also when the main CLI configured logging first
    if engine not in ENGINES:
        raise typer.BadParameter(f"must be one of {', '.join(ENGINES)}", param_hint="--engine")
    if threads is None and upstream:
        threads = 1
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter("must be >= 1", param_hint="--threads")
        import torch

        torch.set_num_threads(threads)
    try:
        app = create(home=home, store=store, upstream=upstream, upstream_key=upstream_key, engine=engine, keys=keys,
                     model=model, served_name=served_name, model_version=model_version,
                     upstream_adapter=upstream_adapter)
    except KemError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), timeout_graceful_shutdown=5)


def main() -> None:
    """Entry point of ``python -m kem.server``."""
    from kem.runtime import own_process

    own_process()  # before torch loads (kem/runtime.py)
    cli = typer.Typer(add_completion=False, help="kem's OpenAI-compatible server.")
    cli.callback()(lambda: None)
    cli.command("serve")(serve)
    cli()


if __name__ == "__main__":
    main()
