"""What a method's compute function may use besides the model: caches, the corpus, and running state.

State is explicit: the caller builds one :class:`EditContext`, reuses it across calls, and owns it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kem.consolidation.covariance import CovarianceCache
from kem.consolidation.shared.templates import TemplateCache

if TYPE_CHECKING:
    from kem.settings import Settings


@dataclass
class EditContext:
    """Resources shared across compute calls.

    Attributes:
        covariance: Covariance statistics cache (disk-backed when given a root).
        templates: Context-template cache.
        corpus: Text corpus for covariance statistics; None reads the text kem ships, "model" samples texts from the model.
        state: Per-method running state, keyed by method name (AlphaEdit keeps its past keys here).
        progress: Show progress bars for long steps.
        cov_fingerprint: When set, covariance statistics are looked up under this model fingerprint.
        follower: The edit-follower adapter folder the fast path serves with (``distill``'s teacher);
            None: no follower (distill then labels forms with the target itself).
    """

    covariance: CovarianceCache = field(default_factory=lambda: CovarianceCache(None))
    templates: TemplateCache = field(default_factory=TemplateCache)
    corpus: str | os.PathLike[str] | None = None
    state: dict[str, Any] = field(default_factory=dict)
    progress: bool = False
    cov_fingerprint: str | None = None
    follower: Path | None = None

    def pin_covariance(self, model: Any) -> None:
        """Key covariance statistics by ``model``'s fingerprint from now on, even after edits change its
        weights (the papers keep the base model's statistics across sequential batches)."""
        from kem.consolidation.shared.prompts import model_fingerprint

        self.cov_fingerprint = model_fingerprint(model)

    def forget_edits(self) -> None:
        """The edits computed so far were reverted: drop the running state that describes them, and keep
        what only depends on the base model (a state object with ``forget_edits()``, e.g. AlphaEdit's
        projectors, is asked to forget its edits instead of being dropped)."""
        for key, value in list(self.state.items()):
            if callable(getattr(value, "forget_edits", None)):
                value.forget_edits()
            else:
                del self.state[key]

    @classmethod
    def from_cache_dir(cls, cache_dir: str | os.PathLike[str] | None, corpus: str | os.PathLike[str] | None = None) -> EditContext:
        """A context whose covariance statistics persist under ``cache_dir``."""
        return cls(covariance=CovarianceCache(cache_dir), corpus=corpus)

    def second_moments(self, model: Any, tok: Any, layers: list[int], n_samples: int, max_tokens: int, fingerprint: str | None = None) -> dict[int, Any]:
        """``{layer: E[k k^T]}`` from the cache (see :class:`CovarianceCache`)."""
        return self.covariance.get(
            model, tok, layers, self.corpus, n_samples, max_tokens, fingerprint=fingerprint, progress=self.progress
        )


def served_follower(settings: Settings) -> Path | None:
    """The edit-follower the fast path serves with (distill's teacher), or None."""
    from kem.errors import ModelError
    from kem.follower.follower_registry import follower_for

    try:
        return follower_for(settings)
    except ModelError:  # a bad KEM_FOLLOWER fails where it is served; methods without a teacher go on
        return None
