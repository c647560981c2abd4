"""Evaluation methods: a registry of factories, and the interface the harness drives.

A method is prepared with some edits (one case's in ``single`` mode, all N in ``batch`` mode) and
returns a :class:`Prepared` object that says, for each probe, which text the engine would see and
which model to score it with; ``close()`` undoes the preparation. The harness never branches on a
method's name. Built in:

- ``none``: the unedited model (plain prompts, chat template for questions);
- ``ike``: kem's fast path as served: :class:`~kem.editor.KnowledgeEditor` retrieval + scope +
  composition (``rewrite_prompt`` / ``rewrite_chat``), each case in its own namespace in single mode.
- ``adapter``: the same with the learned edit-follower (``kem.follower``): in-scope requests in its
  format, scored with its LoRA on; out-of-scope ones on the bare base model.

A weight-editing method plugs in with :class:`WeightMethod`: give it a function that applies the
edits to the model in place and returns a function that reverts them::

    def apply_mine(model, tokenizer, edits):
        delta = spec.compute(model, tokenizer, edits, spec.hparams_for(model), ctx)
        return apply_delta(model, delta).revert

    register_eval_method("mine", lambda ctx: WeightMethod("mine", ctx, apply_mine))

This module imports nothing of the packages that plug methods in: kem's consolidation methods register
here themselves (``kem.consolidation.register_method`` does it for each), and :mod:`kem.eval.run`
imports the ``kem.consolidation`` package to load them.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kem.edit import Edit
from kem.errors import ConflictError, NotFoundError
from kem.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """What a method sends to the engine for one probe.

    Attributes:
        text: The exact text the model sees (chat template already applied for chat requests).
        stop: Stop strings the method needs.
        applied: Ids of the edits the method put into this request (retrieval methods).
        considered: ``(edit id, score, in_scope)`` of every retrieved edit (retrieval methods).
        messages: The chat messages, for chat requests (kept in the per-case records).
        model_key, model, lora: Set when this request runs on its own model (the ``lora``
            method's in-scope requests: the base model with the edit-follower LoRA on).
    """

    text: str
    stop: tuple[str, ...] = ()
    applied: tuple[str, ...] = ()
    considered: tuple[tuple[str, float, bool], ...] = ()
    messages: list[dict[str, Any]] | None = None
    model_key: str | None = None  # this request runs on another model than the method's (None: the method's)
    model: Any = None  # ...this one (e.g. the base model with the edit-follower on)
    lora: str | None = None  # the LoRA a served engine must apply


class Prepared(Protocol):
    """A method with its edits in place.

    Attributes:
        model_key: Names the weights requests run on (results are memoised per key): ``"base"``
            when the model is the unedited one; a weight-editing method gives a key unique to its edits.
        model: The causal LM to score with.
        has_scope: Whether requests carry a scope decision (``applied`` / ``considered``).
    """

    model_key: str
    model: Any
    has_scope: bool

    def completion(self, prompt: str) -> Request: ...

    def chat(self, question: str) -> Request: ...

    def close(self) -> None: ...


class EvalMethod(Protocol):
    """A registered method, built once per run over the shared model (see :class:`EvalContext`).

    Attributes:
        name: Registry name.
        modifies_model: True when ``prepare`` changes the shared model's weights (the harness then
            finishes pending work on the unedited model first).
    """

    name: str
    modifies_model: bool

    def prepare(self, edits: Sequence[Edit]) -> Prepared: ...

    # Optional, for ``sequential`` mode: apply ``batches`` one after another, each on top of the
    # previous ones, and return the state after the last one.
    # def prepare_sequence(self, batches: Sequence[Sequence[Edit]]) -> Prepared: ...


@dataclass
class EvalContext:
    """Shared resources: one loaded generator (model + tokenizer) and one embedder for every method.

    Attributes:
        generator: A :class:`~kem.adapters.transformers.TransformersGenerator` (``.model``,
            ``.tokenizer``, ``.chat_prompt``).
        embedder: The retrieval embedder (None when no method retrieves).
        settings: kem settings (top_k, scope...) for editors built here.
        options: Free-form per-method options (``{"ike": {"scope": ScopeConfig(...)}}``).
    """

    generator: Any
    embedder: Any = None
    settings: Settings = field(default_factory=Settings)  # default: the environment's
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> Any:
        return self.generator.model

    @property
    def tokenizer(self) -> Any:
        return self.generator.tokenizer


MethodFactory = Callable[[EvalContext], EvalMethod]
_METHODS: dict[str, MethodFactory] = {}


def register_eval_method(name: str, factory: MethodFactory) -> None:
    """Register ``factory(ctx) -> EvalMethod`` under ``name``.

    Raises:
        ConflictError: ``name`` is already registered.
    """
    key = name.strip().lower()
    if not key:
        raise ValueError("an eval method needs a name")
    if key in _METHODS:
        raise ConflictError(f"eval method {key!r} is already registered")
    _METHODS[key] = factory


def unregister_eval_method(name: str) -> None:
    """Remove the method registered as ``name`` (no error when there is none)."""
    _METHODS.pop(name.strip().lower(), None)


def eval_methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_METHODS)


def build_method(name: str, ctx: EvalContext) -> EvalMethod:
    """Build the registered method ``name`` over ``ctx``."""
    key = name.strip().lower()
    if key not in _METHODS:
        raise NotFoundError(f"unknown eval method {name!r} (registered: {', '.join(eval_methods())})")
    return _METHODS[key](ctx)


# ---- none --------------------------------------------------------------------------------------------
class PlainPrepared:
    """Plain requests (the prompt itself; the chat template around a question) on a given model."""

    has_scope = False

    def __init__(self, ctx: EvalContext, model_key: str = "base", on_close: Callable[[], None] | None = None) -> None:
        self.ctx = ctx
        self.model = ctx.model
        self.model_key = model_key
        self._on_close = on_close

    def completion(self, prompt: str) -> Request:
        return Request(prompt)

    def chat(self, question: str) -> Request:
        msgs = [{"role": "user", "content": question}]
        return Request(self.ctx.generator.chat_prompt(msgs), messages=msgs)

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


class NoneMethod:
    """The unedited model."""

    name = "none"
    modifies_model = False

    def __init__(self, ctx: EvalContext) -> None:
        self.ctx = ctx

    def prepare(self, edits: Sequence[Edit]) -> Prepared:
        return PlainPrepared(self.ctx)

    def prepare_sequence(self, batches: Sequence[Sequence[Edit]]) -> Prepared:
        return PlainPrepared(self.ctx)


# ---- weight-editing methods ---------------------------------------------------------------------------
ApplyFn = Callable[..., Callable[[], None]]


class WeightMethod:
    """Adapter for weight-editing methods: ``apply(model, tokenizer, edits)`` edits the model in
    place and returns a revert function, called by ``close()``. Requests are plain (no retrieval).

    In ``sequential`` mode ``apply`` is called once per group on the already edited model; if it
    takes a ``fresh`` keyword it is told whether this is the first group (``fresh=True``: no earlier
    edits in the weights) so a method can keep state across groups (AlphaEdit's cache of past keys).
    The reverts run in reverse order at ``close()``.
    """

    modifies_model = True

    def __init__(self, name: str, ctx: EvalContext, apply: ApplyFn) -> None:
        self.name = name
        self.ctx = ctx
        self._apply = apply
        self._n = itertools.count()

    def prepare(self, edits: Sequence[Edit]) -> Prepared:
        return self.prepare_sequence([edits])

    def prepare_sequence(self, batches: Sequence[Sequence[Edit]]) -> Prepared:
        takes_fresh = "fresh" in inspect.signature(self._apply).parameters
        reverts: list[Callable[[], None]] = []

        def undo() -> None:
            while reverts:
                reverts.pop()()

        try:
            for k, batch in enumerate(batches):
                kw = {"fresh": k == 0} if takes_fresh else {}
                reverts.append(self._apply(self.ctx.model, self.ctx.tokenizer, list(batch), **kw))
        except BaseException:
            undo()
            raise
        return PlainPrepared(self.ctx, model_key=f"{self.name}:{next(self._n)}", on_close=undo)


# ---- ike (kem's fast path) ---------------------------------------------------------------------------
class IkePrepared:
    """Requests rewritten by a :class:`~kem.editor.KnowledgeEditor` in one namespace."""

    has_scope = True
    model_key = "base"

    def __init__(self, method: IkeMethod, namespace: str, ids: list[str]) -> None:
        self.method = method
        self.namespace = namespace
        self.ids = ids
        self.model = method.ctx.model

    def completion(self, prompt: str) -> Request:
        m = self.method
        rw = m.editor.rewrite_prompt(prompt, self.namespace, m.follower)
        assert isinstance(rw.request, str)
        return Request(rw.request, tuple(rw.stop), _ids(rw.applied), _considered(rw.considered), **m.runs_on(rw))

    def chat(self, question: str) -> Request:
        m = self.method
        rw = m.editor.rewrite_chat([{"role": "user", "content": question}], self.namespace, m.follower)
        msgs: list[Any] = list(rw.request)  # a chat rewrite: the messages
        return Request(m.ctx.generator.chat_prompt(msgs), tuple(rw.stop), _ids(rw.applied),
                       _considered(rw.considered), messages=[dict(x) for x in msgs], **m.runs_on(rw))

    def close(self) -> None:
        for i in self.ids:
            try:
                self.method.editor.remove(i, self.namespace)
            except NotFoundError:  # superseded and gone already
                pass


class IkeMethod:
    """kem's in-context fast path exactly as served. Each ``prepare`` adds the edits to a fresh
    namespace of one in-memory editor (so cases never see each other's edits in single mode)."""

    name = "ike"
    modifies_model = False
    follower: str | None = None  # IKE prompts, never the edit-follower

    def __init__(self, ctx: EvalContext) -> None:
        from kem.editor import KnowledgeEditor

        opts = dict(ctx.options.get(self.name, {}))
        opts.pop("path", None)
        self.ctx = ctx
        self.editor = KnowledgeEditor.in_memory(settings=ctx.settings, generator=ctx.generator,
                                                embedder=ctx.embedder, **opts)
        self._n = itertools.count()

    def runs_on(self, rw: Any) -> dict[str, Any]:
        """Where a rewritten request runs: the shared base model (IKE)."""
        return {}

    def prepare(self, edits: Sequence[Edit]) -> Prepared:
        return self.prepare_sequence([edits])

    def prepare_sequence(self, batches: Sequence[Sequence[Edit]]) -> Prepared:
        """Add the groups one after another to one namespace (a later edit of the same prompt
        supersedes an earlier one, as when a user adds them over time)."""
        ns = f"eval-{next(self._n)}"
        stored = [s for b in batches for s in self.editor.add_many([Edit.parse(e, namespace=ns) for e in b])]
        return IkePrepared(self, ns, [e.id for e in stored])


class AdapterMethod(IkeMethod):
    """kem's fast path with the learned edit-follower: retrieval and scope as served, in-scope requests
    in the follower's format and run with its LoRA on; out-of-scope requests on the bare base model.

    Options (``ctx.options["adapter"]``): ``path``, an adapter folder (default: ``KEM_FOLLOWER``, i.e.
    the adapter kem ships for the model); plus the editor's (``scope``...).
    """

    name = "adapter"

    def __init__(self, ctx: EvalContext) -> None:
        from kem.follower.follower_registry import FOLLOWER_NAME, resolve_follower
        from kem.follower.lora import WithLora
        super().__init__(ctx)
        s = ctx.settings
        path = ctx.options.get(self.name, {}).get("path") or resolve_follower(
            s.follower if s.follower != "none" else "auto", s.model)
        if path is None:
            raise NotFoundError(f"no edit-follower adapter for {s.model} (train one: kem follower train --out DIR, "
                                "then KEM_FOLLOWER=DIR)")
        gen = ctx.generator
        if getattr(gen, "lora", None) is None or str(gen.lora.path) != str(path):
            gen.attach_follower(path)
        self.follower = FOLLOWER_NAME
        self.view = WithLora(gen.model, gen.lora)
        self.key = f"adapter:{path}"

    def runs_on(self, rw: Any) -> dict[str, Any]:
        """In-scope requests run on the base model with the follower's LoRA on."""
        if not rw.lora:
            return {}
        return {"model_key": self.key, "model": self.view, "lora": rw.lora}


def _ids(applied: Sequence[Any]) -> tuple[str, ...]:
    return tuple(s.edit.id for s in applied)


def _considered(considered: Sequence[Any]) -> tuple[tuple[str, float, bool], ...]:
    return tuple((s.edit.id, float(s.score), bool(s.in_scope)) for s in considered)


register_eval_method("none", NoneMethod)
register_eval_method("ike", IkeMethod)
register_eval_method("adapter", AdapterMethod)
