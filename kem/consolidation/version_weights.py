"""The torch side of model versions: write a version's weights, load them back, serve them from a
:class:`~kem.editor.KnowledgeEditor`. The bookkeeping (names, manifests, ``current``, absorbed
versions, atomic publication) is :class:`kem.versions.VersionStore`'s.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from kem.settings import Settings
from kem.versions import BASE, DELTA, Manifest, VersionStore, versions_for

log = logging.getLogger(__name__)


def publish(versions: VersionStore | str | os.PathLike[str], model: Any, tok: Any, delta: Any,
            manifest: dict[str, Any], extra_files: dict[str, Any] | None = None, make_current: bool = True) -> Manifest:
    """Publish ``model`` as the next version (see :meth:`VersionStore.publish`): its weights with
    ``save_pretrained``, the tokenizer, ``delta.safetensors``, then ``extra_files`` (name -> ``fn(path)``).

    Args:
        versions: Where to publish (:func:`kem.versions.versions_for`), or a home (``<home>/models``, files only).
        manifest: Fields of :class:`~kem.versions.Manifest` except ``version`` and ``created_at``.
    """

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        delta.save(folder / DELTA)
        for name, write_file in (extra_files or {}).items():
            write_file(folder / name)

    vs = versions if isinstance(versions, VersionStore) else VersionStore(versions)
    return vs.publish(manifest, write, make_current=make_current)


def load_version(home: str | os.PathLike[str], version: str | None, settings: Settings,
                 device: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a version (``None`` / ``"base"``: the base model of ``settings``), from the
    settings' models folder (``KEM_MODELS_DIR``, default ``<home>/models``)."""
    from kem.models import load_causal_lm

    device = device or settings.resolved_device()
    if version in (None, BASE):
        return load_causal_lm(settings.model, settings.cache_dir, device=device, dtype=dtype)
    with versions_for(settings, home=home) as vs:
        path = vs.path(version)
    return load_causal_lm(path, settings.cache_dir, device=device, dtype=dtype)


def use_version(ke: Any, version: str) -> None:
    """Serve ``version`` (``vN``, ``"current"`` or ``"base"``) from a :class:`~kem.editor.KnowledgeEditor`:
    through :meth:`~kem.editor.KnowledgeEditor.serve_version`, its generator becomes a
    :class:`~kem.adapters.transformers.TransformersGenerator` over the version's weights and the fast
    path skips the edits of the version and its ancestors."""
    from kem.adapters.transformers import TransformersGenerator
    from kem.follower.follower_registry import follower_for

    with versions_for(ke.settings) as vs:
        served = vs.resolve(version)
    model, tok = load_version(ke.settings.home, served.version, ke.settings)
    gen = TransformersGenerator(model, tok, name=f"{ke.settings.model}@{served.version}",
                                follower=follower_for(ke.settings))  # the base model's follower
    ke.serve_version(served.absorbed, generator=gen)
