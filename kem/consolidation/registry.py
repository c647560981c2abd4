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
        """Hyperparameters: class defaults, then the model's preset (if one matches), then ``overrides``
        (nested options merge: ``values={"steps": 10}`` keeps the preset's other value options)."""
        from kem.consolidation.presets import preset_name

        values: dict[str, Any] = self.hparams_cls().model_dump()  # nested defaults too (MEMIT's value options)
        name = preset_name(model) if model is not None else None
        if name and name in self.presets:
            _merge(values, self.presets[name])
        _merge(values, {k: v for k, v in overrides.items() if v is not None})
        return self.hparams_cls(**values)


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, BaseModel):
            value = value.model_dump()
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, dict) else value


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


def parse_hparams(items: Sequence[str]) -> dict[str, Any]:
    """``["layer=18", "values.edit_batch=4", "lr=1e-3"]`` -> ``{"layer": 18, "values": {"edit_batch": 4}, "lr": 0.001}``
    (the command lines' ``-H KEY=VALUE``; dots reach nested options; numbers and true/false are parsed).

    Raises:
        ValueError: an item is not ``KEY=VALUE``.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"expected KEY=VALUE (KEY may be dotted, e.g. values.steps=10), got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{key!r}: {part!r} is given a value and options at once")
        node[leaf] = _scalar(raw.strip())
    return out


def _scalar(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
