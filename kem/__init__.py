"""kem: knowledge-editing middleware for LLMs.

Fix facts in context now (edit memory + retrieval + IKE prompts), bake them into the weights later
(consolidation with ROME, MEMIT, FT-L, AlphaEdit).
"""

import os as _os
import sys as _sys

# Idle OpenMP threads sleep instead of spinning unless the user chose a policy. It only takes effect
# before torch is imported. Measured on 2 shared cores: spinning threads that wait for a descheduled
# sibling made each SmolLM2 forward pass 10-30x slower (kem/eval/cli.py). OMP_WAIT_POLICY=ACTIVE
# restores spinning.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from kem.edit import Edit, EditStatus, LocalityProbe  # noqa: E402
from kem.editor import Answer, KnowledgeEditor, Rewrite  # noqa: E402
from kem.errors import KemError, NotFoundError, ValidationError  # noqa: E402
from kem.protocols import GenerationParams, ScoredEdit  # noqa: E402
from kem.scope import ScopeConfig  # noqa: E402
from kem.settings import Settings  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Answer",
    "Edit",
    "EditStatus",
    "GenerationParams",
    "KemError",
    "KnowledgeEditor",
    "LocalityProbe",
    "NotFoundError",
    "Rewrite",
    "ScopeConfig",
    "ScoredEdit",
    "Settings",
    "ValidationError",
    "__version__",
]
