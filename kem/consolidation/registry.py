"""The method registry: each method registers ``(name, hparams class, compute function)`` from its own ``__init__``.

Nothing outside a method's folder branches on its name; callers look it up here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel

from kem.edit import Edit
from kem.errors import ConflictError, NotFoundError


class ComputeFn(Protocol):
    """``compute(model, tokenizer, edits, hparams, ctx) -> WeightDelta``; must not mutate the model."""

    def __call__(self, model: Any, tok: Any, edits: Sequence[Edit], hparams: Any, ctx: Any) -> Any: ...


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: Registry key, e.g. ``"rome"``.
        hparams_cls: Frozen pydantic model of its hyperparameters.
        compute: The compute function.
        presets: Preset name -> numbers overriding the class defaults (see :mod:`kem.consolidation.presets`).
    """

    name: str
    hparams_cls: type[BaseModel]
    compute: ComputeFn
    presets: dict[str, dict[str, Any]]

    def hparams_for(self, model: Any = None, **overrides: Any) -> Any:
        """Hyperparameters: class defaults, then the model's preset (if one matches), then ``overrides``."""
        from kem.consolidation.presets import preset_name

        values: dict[str, Any] = {}
        name = preset_name(model) if model is not None else None
        if name and name in self.presets:
            values.update(self.presets[name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return self.hparams_cls(**values)


_METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    hparams_cls: type[BaseModel],
    compute_fn: ComputeFn | Callable[..., Any],
    presets: dict[str, dict[str, Any]] | None = None,
) -> MethodSpec:
    """Register a method. Raises :class:`ConflictError` when ``name`` is taken."""
    key = name.lower()
    if key in _METHODS:
        raise ConflictError(f"consolidation method {key!r} is already registered")
    spec = MethodSpec(key, hparams_cls, compute_fn, dict(presets or {}))
    _METHODS[key] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name`` (after importing the built-in ones)."""
    _load_builtins()
    key = name.lower()
    if key not in _METHODS:
        raise NotFoundError(f"unknown consolidation method {name!r} (known: {', '.join(sorted(_METHODS))})")
    return _METHODS[key]


def list_methods() -> list[str]:
    """Names of all registered methods."""
    _load_builtins()
    return sorted(_METHODS)


def _load_builtins() -> None:
    import importlib

    for mod in ("rome", "memit", "alphaedit", "ftl"):
        importlib.import_module(f"kem.consolidation.{mod}")
