"""kem: knowledge-editing middleware for LLMs.

Fix facts in context now (edit memory + retrieval + IKE prompts), bake them into the weights later
(consolidation with ROME, MEMIT, FT-L, AlphaEdit).
"""

from kem.edit import Edit, EditStatus, LocalityProbe
from kem.editor import Answer, KnowledgeEditor, Rewrite
from kem.errors import KemError, NotFoundError, ValidationError
from kem.protocols import GenerationParams, ScoredEdit
from kem.scope import ScopeConfig
from kem.settings import Settings

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
