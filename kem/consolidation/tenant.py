"""A tenant's consolidated edits as a LoRA adapter: build it from the job's delta, judge it on the shared
weights with the adapter applied (as it will be served), publish it as the tenant's next version.

A tenant version folder (``models/tenants/<namespace>/vN``) holds ``adapter/`` (peft LoRA, see
:mod:`kem.consolidation.lora_export`), ``delta.safetensors`` (the exact delta, which the tenant's next job
extends) and, when an edit-follower is configured, ``adapter_with_follower/``: the adapter and the
follower's LoRA in one, for in-scope requests (one adapter per request serves both).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kem.consolidation.delta import WeightDelta
from kem.consolidation.lora_export import LoraExport, combine_loras, export_lora
from kem.settings import Settings
from kem.versions import ADAPTER, ADAPTER_WITH_FOLLOWER, DELTA, Manifest, VersionStore

log = logging.getLogger(__name__)


class TenantAdapter:
    """The adapter of one tenant job, in a temporary folder until :meth:`publish` copies it into the
    new version (:meth:`close` removes the temporary folder).

    Attributes:
        delta: The tenant's whole delta (earlier versions' it extends plus this job's).
        export: How it was factorised (ranks, truncation error, size).
        view: The shared model with the adapter switched on for its calls (``generate`` / ``__call__``),
            for the job's gates; the model's own weights are never changed.
        follower: The edit-follower folder combined at publish time (None: none configured).
    """

    def __init__(self, delta: WeightDelta, export: LoraExport, tmp: Path, view: Any, follower: Path | None,
                 base_model: str, max_rank: int) -> None:
        self.delta, self.export, self.tmp, self.view = delta, export, tmp, view
        self.follower, self.base_model, self.max_rank = follower, base_model, max_rank

    @classmethod
    def build(cls, delta: WeightDelta, model: Any, settings: Settings, max_rank: int) -> TenantAdapter:
        """Export ``delta`` as a LoRA folder and bind it to ``model`` (the shared weights, unchanged).

        Raises:
            ModelError: the configured edit-follower is missing or was trained on another base model.
        """
        from kem.consolidation.arch import arch_for
        from kem.follower.follower_registry import check_base, follower_for
        from kem.follower.lora import LoraHooks, WithLora

        follower = follower_for(settings)
        if follower is not None:
            check_base(follower, model)
        tmp = Path(tempfile.mkdtemp(prefix="kem-adapter-"))
        try:
            export = export_lora(delta, tmp / ADAPTER, base_model=str(settings.model), max_rank=max_rank,
                                    transposed=arch_for(model).transposed)
            view = WithLora(model, LoraHooks(model, tmp / ADAPTER))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(delta, export, tmp, view, follower, str(settings.model), max_rank)

    def summary(self) -> dict[str, Any]:
        """What the manifest records under ``adapter``: ranks, truncation error, bytes, the follower."""
        return {**self.export.summary(), "max_rank": self.max_rank,
                "follower": None if self.follower is None else str(self.follower)}

    def publish(self, versions: VersionStore, manifest: dict[str, Any],
                extra_files: dict[str, Callable[[Path], Any]] | None = None) -> Manifest:
        """Publish the tenant's next version through ``versions`` (atomic: temporary folder, rename)."""

        def write(folder: Path) -> None:
            shutil.copytree(self.tmp / ADAPTER, folder / ADAPTER)
            self.delta.save(folder / DELTA)
            if self.follower is not None:
                combine_loras([folder / ADAPTER, self.follower], folder / ADAPTER_WITH_FOLLOWER,
                                 base_model=self.base_model)
            for name, write_file in (extra_files or {}).items():
                write_file(folder / name)

        return versions.publish({**manifest, "adapter": self.summary()}, write)

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
