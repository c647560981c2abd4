"""Where a consolidation job publishes: the shared weights (``models/vN``) or a tenant's adapter
(``models/tenants/<namespace>/vN``). The one place the job's steps (:mod:`kem.consolidation.job`)
differ between the two; :func:`kem.consolidation.job.consolidate` picks the target once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kem.versions import BASE, DELTA, Manifest, VersionStore

if TYPE_CHECKING:
    from kem.consolidation.delta import AppliedDelta, WeightDelta
    from kem.consolidation.tenant import TenantAdapter
    from kem.settings import Settings


class Target(Protocol):
    """What a job's steps ask of where its version goes.

    Attributes:
        versions: Where the new version is numbered and published.
        namespace: The tenant whose adapter version this is (None: a shared version).
        namespaces: The namespaces whose edits the job takes.
        extends: A tenant's version the new adapter extends (None: none, or a shared job).
        chain: Versions whose edits are already in the model the job starts from.
        state_from: The version folder the methods' running state is loaded from (None: start afresh).
    """

    versions: VersionStore
    namespace: str | None
    namespaces: tuple[str, ...]
    extends: str | None
    chain: frozenset[str]
    state_from: Path | None

    def nothing_to_do(self) -> str:
        """The result's message when no edit is pending."""

    def start(self, model: Any, total: WeightDelta) -> list[AppliedDelta]:
        """Apply to ``model`` (and add to ``total``) what the new edits are computed on top of."""

    def delta_meta(self) -> dict[str, Any]:
        """Fields added to the delta's ``meta``."""

    def judged(self, model: Any, applied: Sequence[AppliedDelta], total: WeightDelta,
               timings: dict[str, float]) -> Any:
        """The model the gates ask: the edited ``model`` itself, or what will be served in its place."""

    def metrics(self) -> dict[str, Any]:
        """Fields added to the result's metrics (after the gates' own)."""

    def publish(self, model: Any, tok: Any, total: WeightDelta, manifest: dict[str, Any],
                extra_files: dict[str, Callable[[Path], Any]]) -> Manifest:
        """Publish the next version (atomic) and make it current."""

    def published(self) -> str:
        """What was published, for the result's message (after ``parent vN``)."""

    def close(self) -> None:
        """Remove what the job left in temporary folders."""


class SharedTarget:
    """The shared weights: ``models/vN`` holds the edited model's full weights and the delta."""

    namespace: str | None = None
    extends: str | None = None

    def __init__(self, shared: VersionStore, parent: str | None, namespaces: Sequence[str]) -> None:
        self.versions = shared
        self.namespaces = tuple(namespaces)
        self.chain = shared.absorbed(parent)
        self.state_from = shared.path(parent) if parent else None

    def nothing_to_do(self) -> str:
        return (f"nothing to consolidate: no pending edits in the shared namespace(s) "
                f"{', '.join(self.namespaces) or '(none)'} (a tenant's edits go into its own adapter: "
                "kem consolidate --namespace NAME)")

    def start(self, model: Any, total: WeightDelta) -> list[AppliedDelta]:
        return []

    def delta_meta(self) -> dict[str, Any]:
        return {}

    def judged(self, model: Any, applied: Sequence[AppliedDelta], total: WeightDelta,
               timings: dict[str, float]) -> Any:
        return model

    def metrics(self) -> dict[str, Any]:
        return {}

    def publish(self, model: Any, tok: Any, total: WeightDelta, manifest: dict[str, Any],
                extra_files: dict[str, Callable[[Path], Any]]) -> Manifest:
        from kem.consolidation import version_weights as V

        return V.publish(self.versions, model, tok, total, manifest, extra_files=extra_files)

    def published(self) -> str:
        return ""

    def close(self) -> None:
        pass


class TenantTarget:
    """A tenant's adapter: the delta is computed on the shared version (plus the tenant's current
    adapter when it was computed on that same shared version: tenant versions are cumulative), exported
    as a LoRA adapter, judged on the shared weights with the adapter applied (as it will be served), and
    published as ``models/tenants/<namespace>/vN`` (:class:`kem.consolidation.tenant.TenantAdapter`)."""

    def __init__(self, shared: VersionStore, namespace: str, parent: str | None, settings: Settings,
                 max_rank: int) -> None:
        self.versions = shared.of(namespace)
        self.namespace: str | None = namespace
        self.namespaces: tuple[str, ...] = (namespace,)
        served = self.versions.adapter_on(parent)
        self.extends = served.version if served is not None and served.version != BASE else None
        self.chain = self.versions.absorbed(self.extends)
        self.state_from = (self.versions.path(self.extends) if self.extends else
                           shared.path(parent) if parent else None)
        self.settings, self.max_rank = settings, max_rank
        self.lora: TenantAdapter | None = None

    def nothing_to_do(self) -> str:
        return f"nothing to consolidate: no pending edits in the tenant namespace {self.namespace}"

    def start(self, model: Any, total: WeightDelta) -> list[AppliedDelta]:
        """The tenant's current adapter: the new edits are computed on top of it, and kept."""
        from kem.consolidation.delta import WeightDelta, apply_delta

        if not self.extends:
            return []
        prev = WeightDelta.load(self.versions.path(self.extends) / DELTA)
        applied = [apply_delta(model, prev)]
        for name, f in prev.updates.items():
            total.add(name, f.a, f.b)
        return applied

    def delta_meta(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "tenant_parent": self.extends}

    def judged(self, model: Any, applied: Sequence[AppliedDelta], total: WeightDelta,
               timings: dict[str, float]) -> Any:
        """The shared weights (``applied`` reverted) with ``total`` as a LoRA adapter."""
        import time

        from kem.consolidation.tenant import TenantAdapter

        t0 = time.perf_counter()
        for handle in reversed(applied):
            handle.revert()
        self.lora = TenantAdapter.build(total, model, self.settings, self.max_rank)
        timings["export_adapter"] = time.perf_counter() - t0  # the manifest's key since 2026-11
        return self.lora.view

    def metrics(self) -> dict[str, Any]:
        return {} if self.lora is None else {"adapter": self.lora.summary()}

    def publish(self, model: Any, tok: Any, total: WeightDelta, manifest: dict[str, Any],
                extra_files: dict[str, Callable[[Path], Any]]) -> Manifest:
        assert self.lora is not None, "judged() builds the adapter before publish()"
        return self.lora.publish(self.versions, {**manifest, "tenant_parent": self.extends},
                                    extra_files=extra_files)

    def published(self) -> str:
        return f", an adapter extending {self.versions.label(self.extends)}" if self.extends else ", an adapter"

    def close(self) -> None:
        if self.lora is not None:
            self.lora.close()
