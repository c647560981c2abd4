"""The method registry: a method registers everything it needs from its own folder's ``__init__``.

``register_method(name, hparams_cls, compute_fn, presets, state_cls=..., eval_factory=...)`` records
the method for the consolidation job and, through :mod:`kem.eval.eval_methods`, for ``kem eval``. Nothing
outside a method's folder branches on its name; callers look it up here. The built-in methods are
imported by :mod:`kem.consolidation.builtin_methods` (one line per method).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from kem.edit import Edit
from kem.errors import ConflictError, NotFoundError, ValidationError


class ComputeFn(Protocol):
    """``compute(model, tokenizer, edits, hparams, ctx) -> WeightDelta``; must not mutate the model."""

    def __call__(self, model: Any, tok: Any, edits: Sequence[Edit], hparams: Any, ctx: Any) -> Any: ...


class MethodState(Protocol):
    """Running state a method keeps in ``EditContext.state[<method name>]`` across batches, and that the
    job carries from one model version to the next (AlphaEdit's projectors and past keys).

    Attributes:
        file_name: The state's file name inside a version folder (e.g. ``"alphaedit_state.safetensors"``).
    """

    file_name: ClassVar[str]

    def forget_edits(self) -> None:
        """Drop what describes edits that were reverted; keep what depends only on the base model."""

    def save(self, path: str | Path) -> Any:
        """Write the state to the file ``path``."""

    @classmethod
    def load(cls, path: str | Path) -> MethodState:
        """Read a state written by :meth:`save`."""


EvalFactory = Callable[[Any], Any]  # EvalContext -> EvalMethod (kem.eval.eval_methods)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: Registry key, e.g. ``"my-method"``.
        hparams_cls: Frozen pydantic model of its hyperparameters.
        compute: The compute function.
        presets: Preset name -> numbers overriding the class defaults (see :mod:`kem.consolidation.presets`).
        state_cls: Class of the running state it keeps in ``ctx.state[name]`` (None: stateless); the job
            loads it from the parent version and saves it with the new one.
        eval_factory: ``factory(EvalContext) -> EvalMethod`` for ``kem eval --method <name>``.
    """

    name: str
    hparams_cls: type[BaseModel]
    compute: ComputeFn
    presets: dict[str, dict[str, Any]]
    state_cls: type[MethodState] | None = None
    eval_factory: EvalFactory | None = None

    def hparams_for(self, model: Any = None, **overrides: Any) -> Any:
        """Hyperparameters: class defaults, then the model's preset (if one matches), then ``overrides``
        (nested options merge: ``values={"steps": 10}`` keeps the preset's other value options)."""
        from kem.consolidation.presets import preset_name

        values: dict[str, Any] = self.hparams_cls().model_dump()  # nested defaults too (MEMIT's value options)
        name = preset_name(model) if model is not None else None
        if name and name in self.presets:
            _merge(values, self.presets[name])
        _merge(values, {k: v for k, v in overrides.items() if v is not None})
        hp = self.hparams_cls(**values)
        if model is not None:
            _check_layers(self.name, hp, model, preset=bool(name and name in self.presets))
        return hp


def _check_layers(method: str, hp: Any, model: Any, preset: bool) -> None:
    """A clear error when the blocks ``hp`` edits are beyond the model's (a model with no preset gets the
    class defaults, written for SmolLM2's 30 blocks)."""
    from kem.consolidation.arch import num_layers

    field = "layers" if "layers" in type(hp).model_fields else "layer" if "layer" in type(hp).model_fields else None
    value = getattr(hp, field) if field else None
    if value is None:
        return
    n = num_layers(model)
    wanted = (value,) if isinstance(value, int) else tuple(value)
    if any(i >= n for i in wanted):
        why = "" if preset else " (no preset for this model: the defaults are SmolLM2-135M's)"
        raise ValidationError(f"{method} edits block(s) {list(wanted)} but the model has {n} (0..{n - 1}){why}; "
                              f"choose them with -H {field}={'[1,2]' if field == 'layers' else n // 2}",
                              field=field)


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, BaseModel):
            value = value.model_dump()
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, dict) else value


_METHODS: dict[str, MethodSpec] = {}
_default: str | None = None  # set by kem.consolidation.builtin_methods


def register_method(
    name: str,
    hparams_cls: type[BaseModel],
    compute_fn: ComputeFn | Callable[..., Any],
    presets: dict[str, dict[str, Any]] | None = None,
    *,
    state_cls: type[MethodState] | None = None,
    eval_factory: EvalFactory | None = None,
) -> MethodSpec:
    """Register a method for the consolidation job and for ``kem eval``.

    Args:
        name: Registry key (case-insensitive), e.g. ``"my-method"``.
        hparams_cls: Frozen pydantic model of the hyperparameters (every field has a default).
        compute_fn: ``compute(model, tok, edits, hparams, ctx) -> WeightDelta``.
        presets: Per-model numbers (see :mod:`kem.consolidation.presets`).
        state_cls: A :class:`MethodState` the method keeps in ``ctx.state[name]`` (None: stateless).
        eval_factory: ``factory(EvalContext) -> EvalMethod``; default: compute, apply and revert the
            delta (:func:`kem.consolidation.weight_eval.weight_method_factory`).

    Raises:
        ConflictError: ``name`` is taken (here or among the eval methods); nothing is registered.
        ValidationError: ``name`` is empty or ``state_cls`` has no ``file_name``.
    """
    from kem.consolidation.weight_eval import weight_method_factory
    from kem.eval.eval_methods import eval_methods, register_eval_method

    key = name.strip().lower()
    if not key:
        raise ValidationError("register_method needs a name (got an empty one)", field="name")
    if key in _METHODS:
        raise ConflictError(f"consolidation method {key!r} is already registered "
                            f"(by {_METHODS[key].compute.__module__}); pick another name")
    if key in eval_methods():
        raise ConflictError(f"{key!r} is already registered as a kem eval method; pick another name")
    if state_cls is not None and not getattr(state_cls, "file_name", None):
        raise ValidationError(f"{state_cls.__name__}.file_name must name the state's file in a version folder",
                              field="state_cls")
    spec = MethodSpec(key, hparams_cls, compute_fn, dict(presets or {}), state_cls)
    factory = eval_factory or weight_method_factory(spec)
    register_eval_method(key, factory)
    spec = replace(spec, eval_factory=factory)
    _METHODS[key] = spec
    return spec


def unregister_method(name: str) -> None:
    """Remove a registered method (and its eval method); for tests and plug-ins that unload.

    Raises:
        NotFoundError: ``name`` is not registered.
    """
    from kem.eval.eval_methods import unregister_eval_method

    key = name.strip().lower()
    if key not in _METHODS:
        raise NotFoundError(f"consolidation method {name!r} is not registered")
    del _METHODS[key]
    unregister_eval_method(key)
    global _default
    if _default == key:
        _default = None


def get_method(name: str | None = None) -> MethodSpec:
    """The registered method called ``name`` (None: :func:`default_method`).

    Raises:
        NotFoundError: no method of that name; the message lists the known ones.
    """
    key = (name if name is not None else default_method()).strip().lower()
    if key not in _METHODS:
        raise NotFoundError(f"unknown consolidation method {name!r} (known: {', '.join(sorted(_METHODS))})")
    return _METHODS[key]


def list_methods() -> list[str]:
    """Names of all registered methods."""
    return sorted(_METHODS)


def method_specs() -> list[MethodSpec]:
    """Every registered method, by name."""
    return [_METHODS[k] for k in sorted(_METHODS)]


def set_default_method(name: str) -> None:
    """Make ``name`` (registered) what ``kem consolidate`` uses without ``--method``."""
    global _default
    _default = get_method(name).name


def default_method() -> str:
    """The method used when none is named (:mod:`kem.consolidation.builtin_methods` sets it).

    Raises:
        NotFoundError: none was set.
    """
    if _default is None:
        raise NotFoundError("no default consolidation method is set; name one (known: "
                            f"{', '.join(sorted(_METHODS)) or 'none'})")
    return _default


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
