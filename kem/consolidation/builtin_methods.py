"""The built-in methods. Importing a method's folder registers it (hparams, compute, state, eval factory);
a new method is one folder plus one name on the import line below."""

from __future__ import annotations

from kem.consolidation import alphaedit, distill, ftl, memit, rome  # noqa: F401  each registers itself
from kem.consolidation.method_registry import set_default_method

set_default_method(memit.SPEC.name)  # `kem consolidate` without --method
