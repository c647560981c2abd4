"""Consolidation: write accumulated edits into the weights (ROME, MEMIT, AlphaEdit, FT-L, distill).

Each method computes a :class:`~kem.consolidation.delta.WeightDelta` without touching the model;
:func:`~kem.consolidation.delta.apply_delta` applies it (and reverts exactly). Methods register
themselves in :mod:`kem.consolidation.method_registry` (for the job and for ``kem eval``); importing this
package registers the built-in ones (:mod:`.builtin_methods`). Module paths come from :mod:`kem.consolidation.arch`.
:func:`consolidate` is the periodic job (:mod:`.job`) that publishes model versions (:mod:`.version_weights`).
"""

from __future__ import annotations

from kem.consolidation import builtin_methods  # noqa: F401  the built-in methods register themselves
from kem.consolidation.context import EditContext
from kem.consolidation.covariance import CovarianceCache
from kem.consolidation.delta import AppliedDelta, WeightDelta, apply_delta, delta_hooks
from kem.consolidation.job import ConsolidationResult, Gates, JobConfig, consolidate
from kem.consolidation.method_registry import (
    MethodSpec,
    get_method,
    list_methods,
    register_method,
    unregister_method,
)

__all__ = [
    "AppliedDelta",
    "ConsolidationResult",
    "CovarianceCache",
    "EditContext",
    "Gates",
    "JobConfig",
    "MethodSpec",
    "WeightDelta",
    "apply_delta",
    "consolidate",
    "delta_hooks",
    "get_method",
    "list_methods",
    "register_method",
    "unregister_method",
]
