"""The consolidation job: write the pending edits into the weights, check the result, publish a version.

:func:`consolidate` validates the options (:class:`JobConfig`), resolves the method once, takes the job
lock (:func:`kem.stores.services.job_lock`), picks the target (:mod:`kem.consolidation.target`: the shared weights, or a
tenant's adapter; the only part that differs) and runs five steps on one job state (:class:`_Job`):

1. collect (:func:`_collect`): finish what a killed job left (``recover``), then take the pending edits of
   the store: ``active`` ones, plus ``consolidated`` ones whose version is not in the parent's ancestry
   (after a rollback those are no longer in the weights), oldest first, at most ``max_edits``;
2. compute (:func:`_compute`): load the parent (the ``current`` version, the one named, or the base
   model), record its greedy answers on the locality probes (the shipped ones plus the edits' own, minus
   any that mention an edit's subject), compute the method's :class:`~kem.consolidation.delta.WeightDelta`
   (in chunks of ``batch_size``, each computed on the model with the earlier chunks applied) and apply it;
3. judge (:func:`_judge`, asking through :mod:`kem.consolidation.judge`): ask the model as it will be
   served every form of each edit (reliability, generalization) and the probes (locality: answers
   identical to the parent's), measure perplexity, and check the :class:`Gates`; a refusal or
   ``dry_run`` stops here;
4. publish (:func:`_publish`): the new version atomically (``models/vN`` through
   :class:`kem.versions.VersionStore`), then point ``current`` at it;
5. mark (:func:`_mark`): the edits that passed every form ``consolidated`` in ``vN`` (one transaction).

Edits that failed reliability stay ``active``: the fast path keeps applying them on top of ``vN`` and
the next job takes them again. Nothing but ``recover`` touches the store or ``models/`` before step 4,
so a failure (or a kill) anywhere earlier leaves both as they were; a gate failure or ``dry_run``
publishes nothing.

A tenant namespace (not in ``KEM_SHARED_NAMESPACES``) never reaches the shared weights: its job computes
the delta on the shared version (plus the tenant's current adapter when that adapter was computed on
the same shared version: tenant versions are cumulative), exports the sum as a LoRA adapter
(:mod:`kem.consolidation.lora_export`), runs the gates on the shared weights with the adapter applied (as it
will be served), and publishes ``models/tenants/<namespace>/vN`` (``adapter/``, ``delta.safetensors``
and, when an edit-follower is configured, ``adapter_with_follower/``); the edits are marked
``consolidated_in = "<namespace>/vN"``.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from kem.consolidation.judge import ask_forms, forms_summary, greedy, perplexity, select_probes, unchanged
from kem.consolidation.method_registry import MethodSpec, get_method, method_specs
from kem.consolidation.target import SharedTarget, Target, TenantTarget
from kem.edit import Edit, EditStatus, utcnow
from kem.errors import ValidationError
from kem.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gates:
    """Thresholds a consolidated model must reach before it is published.

    Attributes:
        min_reliability: Fraction of the edits whose greedy answer contains the new target.
        min_locality: Fraction of held-out probes whose greedy answer equals the parent's.
        probe_tokens: Tokens generated per locality probe (answers are compared on these).
        min_generalization: Fraction of the edits' other forms (paraphrases and chat questions, see
            :func:`kem.consolidation.forms.forms_for`) whose greedy answer carries the target. 0 by
            default: an edit is retired only when it passes every form anyway, so a version weak on
            them publishes but retires few edits; raise it to refuse such versions outright.
        max_perplexity_increase: Largest relative rise of the perplexity on held-out WikiText-2
            paragraphs (``kem/data/perplexity_text.json``) against the parent; None: not measured.
        chat_tokens: Tokens generated per chat question.
    """

    min_reliability: float = 0.8
    min_locality: float = 0.85
    probe_tokens: int = 6
    min_generalization: float = 0.0
    max_perplexity_increase: float | None = 0.05
    chat_tokens: int = 32

    def __post_init__(self) -> None:
        if self.max_perplexity_increase is not None and self.max_perplexity_increase < 0:
            raise ValidationError(f"Gates.max_perplexity_increase must be >= 0 (got {self.max_perplexity_increase})",
                                  field="max_perplexity_increase")
        if self.chat_tokens < 1:
            raise ValidationError(f"Gates.chat_tokens must be >= 1 (got {self.chat_tokens})", field="chat_tokens")
        for name in ("min_reliability", "min_locality", "min_generalization"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValidationError(f"Gates.{name} must lie in [0, 1] (got {v})", field=name)
        if self.probe_tokens < 1:
            raise ValidationError(f"Gates.probe_tokens must be >= 1 (got {self.probe_tokens})", field="probe_tokens")


def _opt(text: str) -> dict[str, str]:
    """A :class:`JobConfig` field's metadata: its help text (``kem consolidate --help`` words it for the CLI)."""
    return {"help": text}


@dataclass(frozen=True)
class JobConfig:
    """What one job does: every option of :func:`consolidate` (and of ``kem consolidate``, which
    ``tests/test_job_options.py`` checks against these fields), declared once, each with its help text
    (``field.metadata["help"]``). Frozen, validated when built.

    Raises:
        ValidationError: a field out of range, or ``namespace`` not a valid namespace name.
    """

    method: str | MethodSpec | None = field(default=None, metadata=_opt(
        "A registered method (list_methods()), or its spec when the caller has looked it up already; None: "
        "the registry's default (default_method())."))
    namespace: str | None = field(default=None, metadata=_opt(
        "Only this namespace's edits (default: every namespace in settings.shared_namespaces). A tenant "
        "namespace (not shared) publishes the tenant's adapter version, never shared weights."))
    max_edits: int | None = field(default=None, metadata=_opt("At most this many edits (oldest first; None: all)."))
    dry_run: bool = field(default=False, metadata=_opt("Compute and evaluate, publish nothing, change nothing."))
    gates: Gates = field(default_factory=Gates, metadata=_opt("Publishing thresholds (Gates; None: the defaults)."))
    parent: str | None = field(default="current", metadata=_opt(
        "'current' (default), 'base' (or None) or 'vN': the model the edits are written into."))
    corpus: str | os.PathLike[str] | None = field(default=None, metadata=_opt(
        "Covariance corpus (text file, folder, JSONL); None reads the text kem ships, 'model' samples "
        "texts from the model."))
    hparams: Mapping[str, Any] = field(default_factory=dict, metadata=_opt(
        "Overrides of the method's hyperparameters (e.g. {'mom2_samples': 500})."))
    batch_size: int = field(default=64, metadata=_opt(
        "Edits per compute call; each chunk is computed on the model with the earlier chunks applied."))
    partial: bool = field(default=True, metadata=_opt(
        "Stay within the gates chunk by chunk: after each chunk the probes' locality and the perplexity are "
        "checked; a chunk that would break a gate is taken back and its halves tried, down to one edit; the "
        "edit that breaks it and the later ones stay on the fast path for a later job. False: all or nothing."))
    probes: tuple[str, ...] | None = field(default=None, metadata=_opt(
        "Held-out locality prompts (None: default_probes())."))
    progress: bool = field(default=False, metadata=_opt("Show progress bars."))
    max_rank: int = field(default=64, metadata=_opt(
        "A tenant adapter's per-module rank limit (the serving engine's max_lora_rank; larger updates are "
        "SVD-truncated, the gates then check the truncated adapter)."))

    def __post_init__(self) -> None:
        from kem.versions import check_namespace

        if self.namespace is not None:
            check_namespace(self.namespace)
        if self.max_rank < 1:
            raise ValidationError(f"max_rank must be >= 1 (got {self.max_rank})", field="max_rank")
        if self.batch_size < 1:
            raise ValidationError(f"batch_size must be >= 1 (got {self.batch_size})", field="batch_size")
        if self.max_edits is not None and self.max_edits < 1:
            raise ValidationError(f"max_edits must be >= 1 (got {self.max_edits})", field="max_edits")
        # the values the keyword API has always taken (None: the defaults; any sequence of probes)
        object.__setattr__(self, "gates", self.gates or Gates())
        object.__setattr__(self, "hparams", MappingProxyType(dict(self.hparams or {})))  # frozen all the way down
        if self.probes is not None:
            object.__setattr__(self, "probes", tuple(self.probes))


@dataclass
class ConsolidationResult:
    """What a job did.

    Attributes:
        published: True when a version was written (and made current).
        version: The published version (or the one it would have been, for a dry run / gate failure);
            a tenant's version is numbered in that tenant's folder.
        parent: The shared version built on (None: the base model).
        namespace: The tenant whose adapter version this is (None: a shared version).
        tenant_parent: A tenant job only: the tenant's version the new adapter extends.
        edit_ids: Edits taken by the job.
        absorbed_ids: Edits marked ``consolidated`` in ``version``.
        failed_ids: Edits whose greedy answer did not carry the target (left active).
        deferred_ids: Edits of the chunks left out to stay within the gates (``partial``; left active, not
            judged: a later job takes them again).
        metrics: reliability, locality, per-probe / per-edit details.
        reasons: Why the gates refused (empty when they passed).
        timings: Seconds per step.
        message: One line for people.
    """

    published: bool
    method: str
    version: str | None = None
    parent: str | None = None
    namespace: str | None = None
    tenant_parent: str | None = None
    dry_run: bool = False
    edit_ids: list[str] = field(default_factory=list)
    absorbed_ids: list[str] = field(default_factory=list)
    failed_ids: list[str] = field(default_factory=list)
    deferred_ids: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    message: str = ""

    @property
    def gate_failed(self) -> bool:
        return bool(self.reasons)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the job ----------------------------------------------------------------------------------------
def pending_edits(store: Any, chain: frozenset[str], namespace: str | Sequence[str] | None = None,
                  max_edits: int | None = None) -> list[Edit]:
    """Edits not in the weights of a model whose absorbed versions are ``chain`` (oldest first), of
    ``namespace`` (one name, several, or None: every namespace). Superseded, pending and rejected edits
    never go in; nor do edits with a validity window that is not open-ended and started (a scheduled
    fact, a promotion until a date): weights cannot stop holding a fact on a date, so those stay on the
    fast path, which applies them only inside their window."""
    if isinstance(namespace, str) or namespace is None:
        rows = store.list(namespace, [EditStatus.active, EditStatus.consolidated])
    else:
        rows = sorted((e for ns in dict.fromkeys(namespace)
                       for e in store.list(ns, [EditStatus.active, EditStatus.consolidated])),
                      key=lambda e: (e.created_at, e.id))
    now = utcnow()
    todo = [e for e in rows if (e.status == EditStatus.active or e.consolidated_in not in chain)
            and e.valid_until is None and (e.valid_from is None or e.valid_from <= now)]
    return todo if max_edits is None else todo[:max_edits]


def consolidation_scope(settings: Settings, namespace: str | None) -> list[str]:
    """The namespaces a job takes edits from: the shared ones (``KEM_SHARED_NAMESPACES``, default
    ``default``; their edits go into the shared weights), or ``[namespace]``: a shared one, or a tenant's
    (see :func:`is_tenant`), whose edits go into that tenant's adapter only.

    Raises:
        ValidationError: ``namespace`` is not a valid namespace name.
    """
    from kem.versions import check_namespace

    if namespace is None:
        return settings.shared()
    return [check_namespace(namespace)]


def is_tenant(settings: Settings, namespace: str | None) -> bool:
    """Whether a job of ``namespace`` publishes a tenant adapter (it is not a shared namespace)."""
    return namespace is not None and namespace not in settings.shared()


def consolidate(settings: Settings | None = None, config: JobConfig | None = None, *,
                home: str | os.PathLike[str] | None = None, **options: Any) -> ConsolidationResult:
    """Consolidate the pending edits of the edit store (``settings.store``; default ``<home>/edits.sqlite``)
    into a new model version.

    Args:
        settings: kem settings (home, model, cache_dir, device); default ``Settings()``.
        config: The job's options (:class:`JobConfig`; default: its defaults).
        home: Overrides ``settings.home``.
        **options: :class:`JobConfig` fields (overriding ``config``'s), e.g. ``method="memit"``,
            ``namespace="alice"``, ``gates=Gates(...)``, ``dry_run=True``; see each field's help.

    Raises:
        ConflictError: another job holds the lock. Any exception leaves store and versions untouched.
        ValidationError: an option out of range (before the lock, the store, the model).
        NotFoundError: no method of that name.
    """
    from dataclasses import replace

    from kem.stores.services import job_lock

    settings = settings or Settings()
    if home is not None:
        settings = settings.model_copy(update={"home": Path(home)})
    cfg = replace(config, **options) if config is not None else JobConfig(**options)  # validated here
    spec = cfg.method if isinstance(cfg.method, MethodSpec) else get_method(cfg.method)  # the one lookup
    with job_lock(settings) as held:  # one job at a time: a file lock, or PostgreSQL's advisory lock (kem.stores.services)
        return _run(settings, cfg, spec, held.check)


def _run(settings: Settings, cfg: JobConfig, spec: MethodSpec,
         still_held: Callable[[], None] = lambda: None) -> ConsolidationResult:
    """The job on the settings' versions (``KEM_MODELS_DIR``; with PostgreSQL, the versions recorded there):
    :func:`_collect`, :func:`_compute`, :func:`_judge`, :func:`_publish`, :func:`_mark`."""
    from kem.stores import open_store
    from kem.versions import versions_for

    with versions_for(settings) as shared:
        job = _Job.plan(settings, cfg, spec, shared, still_held)
        job.store = open_store(settings)  # settings.store: <home>/edits.sqlite by default, or PostgreSQL
        try:
            if _collect(job):
                _compute(job)
                if _judge(job):
                    _publish(job)
                    _mark(job)
            return job.result
        finally:
            job.target.close()
            job.store.close()


@dataclass
class _Job:
    """One job's state: what :func:`_Job.plan` decides up front, then what each step leaves for the next.

    Attributes:
        shared: The shared versions (:class:`kem.versions.VersionStore`).
        parent: The shared version the edits are written into (None: the base model).
        target: Where the new version goes (:class:`~kem.consolidation.target.Target`): the only part that
            differs between a shared job and a tenant's.
        still_held: Raises if the job lock was lost (checked right before publishing).
    """

    settings: Settings
    cfg: JobConfig
    spec: MethodSpec
    shared: Any
    parent: str | None
    parent_man: Any
    target: Target
    result: ConsolidationResult
    still_held: Callable[[], None]
    t_start: float
    timings: dict[str, float] = field(default_factory=dict)
    store: Any = None
    edits: list[Edit] = field(default_factory=list)  # _collect
    model: Any = None  # _compute: the parent's weights with the delta applied (loaded in place)
    tok: Any = None
    base_fp: str | None = None
    probes: list[str] = field(default_factory=list)
    before: list[str] = field(default_factory=list)  # the parent's answers on the probes
    ppl_parent: float | None = None
    ctx: Any = None
    states: dict[str, Any] = field(default_factory=dict)  # method name -> its state class
    hp: Any = None
    total: Any = None  # the WeightDelta of the new version
    applied: list[Any] = field(default_factory=list)
    teacher: Any = None
    deferred_because: str | None = None  # partial: why the chunks from there on were left for a later job

    @classmethod
    def plan(cls, settings: Settings, cfg: JobConfig, spec: MethodSpec, shared: Any,
             still_held: Callable[[], None]) -> _Job:
        """The parent version and the target (shared weights, or the tenant of ``cfg.namespace``)."""
        from kem.versions import BASE

        t_start = time.perf_counter()
        parent = cfg.parent
        if parent in (None, "current"):
            parent = shared.current()
        elif parent == BASE:
            parent = None
        parent_man = shared.manifest(parent) if parent else None
        target: Target
        if is_tenant(settings, cfg.namespace):
            assert cfg.namespace is not None
            target = TenantTarget(shared, cfg.namespace, parent, settings, cfg.max_rank)
        else:
            target = SharedTarget(shared, parent, consolidation_scope(settings, cfg.namespace))
        result = ConsolidationResult(published=False, method=spec.name, parent=parent, dry_run=cfg.dry_run,
                                     namespace=target.namespace, tenant_parent=target.extends)
        return cls(settings, cfg, spec, shared, parent, parent_man, target, result, still_held, t_start)

    def finish(self, message: str) -> None:
        self.result.timings = {**self.timings, "total": time.perf_counter() - self.t_start}
        self.result.message = message


def _collect(job: _Job) -> bool:
    """The pending edits of the target's namespaces (after finishing what a killed job left). False: none."""
    from kem.versions import recover

    recover(job.shared, job.store)  # a job killed between publish and marking: finish it first
    job.edits = pending_edits(job.store, job.target.chain, job.target.namespaces, job.cfg.max_edits)
    job.result.edit_ids = [e.id for e in job.edits]
    if not job.edits:
        job.result.message = job.target.nothing_to_do()
    return bool(job.edits)


def _compute(job: _Job) -> None:
    """Load the parent, record its answers on the locality probes, then compute the method's delta in
    chunks of ``batch_size`` (each on the model with the earlier chunks applied) and leave it applied."""
    from tqdm.auto import tqdm

    from kem.consolidation import version_weights as V
    from kem.consolidation.delta import WeightDelta, apply_delta
    from kem.consolidation.shared.prompts import model_fingerprint

    cfg, spec, gates, timings = job.cfg, job.spec, job.cfg.gates, job.timings
    t0 = time.perf_counter()
    model, tok = V.load_version(job.settings.home, job.parent, job.settings)
    job.model, job.tok = model, tok
    job.base_fp = job.parent_man.base_fingerprint if job.parent_man else model_fingerprint(model)
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    job.probes = select_probes(job.edits, cfg.probes)
    job.before = greedy(model, tok, job.probes, gates.probe_tokens, progress=cfg.progress, desc="probes (parent)")
    job.ppl_parent = perplexity(model, tok) if gates.max_perplexity_increase is not None else None
    timings["probes_parent"] = time.perf_counter() - t0

    ctx = job.ctx = _context(job)
    job.hp = spec.hparams_for(model, **cfg.hparams)

    t0 = time.perf_counter()
    job.total = WeightDelta(method=spec.name)
    job.applied = job.target.start(model, job.total)
    pending = [job.edits[i : i + cfg.batch_size] for i in range(0, len(job.edits), cfg.batch_size)]
    taken: list[Edit] = []
    first: tuple[Any, dict[str, Any], list[Edit]] | None = None  # the first chunk as computed, whole
    bar = tqdm(total=len(job.edits), desc=f"{spec.name} ({len(job.edits)} edits)", unit="edit",
               disable=not cfg.progress or len(pending) < 2 and not cfg.partial)
    while pending:
        chunk = pending.pop(0)
        state = copy.deepcopy(ctx.state) if cfg.partial else {}
        delta = spec.compute(model, tok, chunk, job.hp, ctx)
        applied = apply_delta(model, delta)  # the next chunk is computed on the updated model
        broken = _breaks_gates(job) if cfg.partial else None
        if broken:  # take it back with the methods' state; try its halves, down to one edit
            applied.revert()
            if first is None and not taken:
                first = (delta, dict(ctx.state), chunk)
            ctx.state.clear()
            ctx.state.update(state)
            if len(chunk) > 1:
                half = (len(chunk) + 1) // 2
                pending[:0] = [chunk[:half], chunk[half:]]
                continue
            job.deferred_because = f"one more edit: {broken}"
            job.result.deferred_ids = [e.id for e in chunk] + [e.id for c in pending for e in c]
            log.info("%d edits left for a later job (%s)", len(job.result.deferred_ids), broken)
            break
        job.teacher = job.teacher or delta.meta.get("teacher")
        job.applied.append(applied)
        taken += chunk
        bar.update(len(chunk))
        for name, f in delta.updates.items():
            job.total.add(name, f.a, f.b)
    bar.close()
    if not taken and first is not None:  # not one edit fits: the first chunk whole, for the gates to refuse
        delta, state, taken = first     # with every reason, as an all-or-nothing job would
        ctx.state.clear()
        ctx.state.update(state)
        job.applied.append(apply_delta(model, delta))
        for name, f in delta.updates.items():
            job.total.add(name, f.a, f.b)
        kept = {e.id for e in taken}
        job.result.deferred_ids = [e.id for e in job.edits if e.id not in kept]
    job.edits = taken
    job.result.edit_ids = [e.id for e in taken]
    timings["compute"] = time.perf_counter() - t0
    timings["covariance"] = ctx.covariance.last_compute_seconds
    job.total.meta = {"edit_ids": job.result.edit_ids, "hparams": job.hp.model_dump(mode="json"),
                      "parent": job.parent, **job.target.delta_meta()}


def _breaks_gates(job: _Job) -> str | None:
    """Why the model as it stands would fail the locality or perplexity gate (None: within both): the check
    between two chunks of a ``partial`` job."""
    gates = job.cfg.gates
    t0 = time.perf_counter()
    after = greedy(job.model, job.tok, job.probes, gates.probe_tokens)
    locality = sum(unchanged(after, job.before)) / max(len(after), 1)
    why = None
    if locality < gates.min_locality:
        why = f"locality {locality:.3f} < {gates.min_locality}"
    elif job.ppl_parent and gates.max_perplexity_increase is not None:
        rise = perplexity(job.model, job.tok) / job.ppl_parent - 1.0
        if rise > gates.max_perplexity_increase:
            why = f"perplexity {rise:+.1%} > +{gates.max_perplexity_increase:.0%}"
    job.timings["chunk_checks"] = job.timings.get("chunk_checks", 0.0) + time.perf_counter() - t0
    return why


def _context(job: _Job) -> Any:
    """The methods' :class:`~kem.consolidation.context.EditContext`, with every method's running state
    loaded from the version the target starts from (``ctx.state[name]`` <-> its file): a later job of a
    method still sees it after versions made by other methods; a tenant's adapter versions carry their
    own, started from the shared parent's."""
    from kem.consolidation.context import EditContext, served_follower

    ctx = EditContext.from_cache_dir(job.settings.cache_dir, corpus=job.cfg.corpus)
    ctx.cov_fingerprint = job.base_fp  # covariance of the base weights serves every version built on it
    ctx.progress = job.cfg.progress
    ctx.follower = served_follower(job.settings)  # distill's teacher: the fast path as it is served
    job.states = {m.name: m.state_cls for m in method_specs() if m.state_cls is not None}
    if job.target.state_from is not None:
        for key, cls in job.states.items():
            path = job.target.state_from / cls.file_name
            if path.is_file():
                ctx.state[key] = cls.load(path)
    return ctx


def _judge(job: _Job) -> bool:
    """Ask the model as it will be served every form of each edit and the probes; score against the
    gates. False: refused or a dry run (the message says which), nothing to publish."""
    cfg, gates, edits, tok, result = job.cfg, job.cfg.gates, job.edits, job.tok, job.result
    t0 = time.perf_counter()
    judged = job.target.judged(job.model, job.applied, job.total, job.timings)
    asked = ask_forms(judged, tok, edits, gates.chat_tokens, progress=cfg.progress)
    after = greedy(judged, tok, job.probes, gates.probe_tokens, progress=cfg.progress, desc="probes (edited)")
    same = unchanged(after, job.before)
    ppl_new = perplexity(judged, tok) if job.ppl_parent is not None else None
    job.timings["evaluate"] = time.perf_counter() - t0 - job.timings.get("export_adapter", 0.0)

    retired = [all(f["ok"] for f in fs) for fs in asked]
    result.absorbed_ids = [e.id for e, ok in zip(edits, retired, strict=True) if ok]
    result.failed_ids = [e.id for e, ok in zip(edits, retired, strict=True) if not ok]
    result.metrics = _metrics(job, asked, retired, after, same, ppl_new)
    result.metrics.update(job.target.metrics())
    result.reasons = _refusals(gates, result.metrics, len(same) - sum(same), job.ppl_parent, ppl_new)
    result.version = job.target.versions.next_version()
    if result.reasons or cfg.dry_run:
        what = "gates failed: " + "; ".join(result.reasons) if result.reasons else "dry run"
        job.finish(f"{what}; nothing published ({len(edits)} edits, method {job.spec.name}; "
                   f"{_scores(result.metrics)}; {_retire_line(result.metrics)})")
        return False
    return True


def _metrics(job: _Job, asked: list[list[dict[str, Any]]], retired: list[bool], after: list[str],
             same: list[bool], ppl_new: float | None) -> dict[str, Any]:
    """The result's metrics: the forms' scores, locality (``same``: per probe, answered as by the parent),
    perplexity, the gates, the details."""
    edits, gates, ppl_parent = job.edits, job.cfg.gates, job.ppl_parent
    ppl_rise = None if ppl_new is None or not ppl_parent else ppl_new / ppl_parent - 1.0
    return {
        **forms_summary(edits, asked),
        "locality": sum(same) / len(same) if same else 1.0,
        "edits": len(edits),
        "deferred": len(job.result.deferred_ids),
        "deferred_because": job.deferred_because,
        "retired": sum(retired),
        "kept": len(retired) - sum(retired),
        "probes": len(job.probes),
        "teacher": job.teacher,  # distill: the fast path's edit-follower its labels came from
        "perplexity_parent": ppl_parent,
        "perplexity": ppl_new,
        "perplexity_increase": ppl_rise,
        "min_reliability": gates.min_reliability,
        "min_generalization": gates.min_generalization,
        "min_locality": gates.min_locality,
        "max_perplexity_increase": gates.max_perplexity_increase,
        "changed_probes": [{"prompt": p, "parent": b, "edited": a}
                           for p, b, a, s in zip(job.probes, job.before, after, same, strict=True) if not s][:20],
        "failed_edits": [{"id": e.id, "prompt": e.rendered_prompt, "target_new": e.target_new,
                          "missed": [{"kind": f["kind"], "text": f["text"], "answer": f["answer"]}
                                     for f in fs if not f["ok"]]}
                         for e, fs, ok in zip(edits, asked, retired, strict=True) if not ok][:20],
        "per_edit": [{"id": e.id, "retired": ok, "forms": [{"kind": f["kind"], "text": f["text"], "ok": f["ok"],
                                                             "answer": f["answer"][:120]} for f in fs]}
                     for e, fs, ok in zip(edits, asked, retired, strict=True)],
    }


def _refusals(gates: Gates, m: dict[str, Any], changed: int, ppl_parent: float | None,
              ppl_new: float | None) -> list[str]:
    """Why ``gates`` refuse the metrics ``m`` (``changed``: probes answered otherwise than by the parent;
    empty: they pass)."""
    out = []
    rel, gen, loc, rise = m["reliability"], m["generalization"], m["locality"], m["perplexity_increase"]
    if rel < gates.min_reliability:
        out.append(f"reliability {rel:.3f} < {gates.min_reliability} "
                   f"({m['cloze_missed']} of {m['edits']} edits' own prompts not carried by greedy answers)")
    if gen < gates.min_generalization:
        out.append(f"generalization {gen:.3f} < {gates.min_generalization} "
                   "(paraphrases and chat questions answered without the target)")
    if loc < gates.min_locality:
        out.append(f"locality {loc:.3f} < {gates.min_locality} "
                   f"({changed} of {m['probes']} held-out probes changed their answer)")
    if rise is not None and gates.max_perplexity_increase is not None and rise > gates.max_perplexity_increase:
        out.append(f"perplexity +{rise:.1%} > +{gates.max_perplexity_increase:.1%} "
                   f"({ppl_parent:.2f} -> {ppl_new:.2f} on held-out WikiText-2)")
    return out


def _publish(job: _Job) -> None:
    """Write the version (atomic: a temporary folder renamed) and make it current, still holding the lock."""
    result, edits = job.result, job.edits
    job.still_held()  # the job lock is still ours (a PostgreSQL one can be lost with its connection)
    t0 = time.perf_counter()
    unchanged = _unchanged(job.store, [e for e in edits if e.id in set(result.absorbed_ids)])
    if len(unchanged) < len(result.absorbed_ids):
        log.warning("%d absorbed edits were changed or deleted during the job; they stay as they are",
                    len(result.absorbed_ids) - len(unchanged))
        result.absorbed_ids = unchanged
    extra = {cls.file_name: job.ctx.state[key].save for key, cls in job.states.items() if key in job.ctx.state}
    namespaces = job.target.namespaces
    manifest = {
        "base": job.parent_man.base if job.parent_man else str(job.settings.model),
        "base_fingerprint": job.base_fp,
        "parent": job.parent,
        "method": job.spec.name,
        "hparams": job.hp.model_dump(mode="json"),
        "edit_ids": result.absorbed_ids,
        "failed_edit_ids": result.failed_ids,
        "deferred_edit_ids": result.deferred_ids,
        "namespace": namespaces[0] if len(namespaces) == 1 else None,
        "namespaces": sorted({e.namespace for e in edits}),
        "metrics": {k: v for k, v in result.metrics.items() if k not in ("changed_probes", "failed_edits", "per_edit")},
        "edits": result.metrics["per_edit"],
        "timings": {**job.timings, "total": time.perf_counter() - job.t_start},
        "corpus": None if job.cfg.corpus is None else str(job.cfg.corpus),
    }
    man = job.target.publish(job.model, job.tok, job.total, manifest, extra)
    job.timings["publish"] = time.perf_counter() - t0
    result.version = man.version
    result.published = True


def _mark(job: _Job) -> None:
    """Mark the absorbed edits consolidated in the new version (one transaction); edits changed since the
    job read them stay as they are. A kill before this is repaired by ``recover`` (the manifest lists them)."""
    result, vs = job.result, job.target.versions
    assert result.version is not None
    result.absorbed_ids = _unchanged(job.store, [e for e in job.edits if e.id in set(result.absorbed_ids)])
    if result.absorbed_ids:
        job.store.mark_consolidated(result.absorbed_ids, vs.label(result.version))
    job.finish(f"published {vs.label(result.version)} (parent {job.parent or 'base'}{job.target.published()}): "
               f"{_retire_line(result.metrics, len(result.absorbed_ids))}; {_scores(result.metrics)}")
    log.info(result.message)


def _scores(m: dict[str, Any]) -> str:
    ppl = m.get("perplexity_increase")
    return (f"reliability {m['reliability']:.3f}, paraphrase {m['paraphrase']:.3f}, question {m['question']:.3f}, "
            f"locality {m['locality']:.3f}" + ("" if ppl is None else f", perplexity {ppl:+.1%}"))


def _retire_line(m: dict[str, Any], retired: int | None = None) -> str:
    n = m["edits"]
    r = m["retired"] if retired is None else retired
    why = [f"{k} missed by {m[f'{k}_missed']}" for k in ("cloze", "paraphrase", "question") if m.get(f"{k}_missed")]
    return (f"{r} of {n} edits retired (answered in every form by the weights alone)"
            + (f", {n - r} kept on the fast path ({', '.join(why)})" if n - r else "")
            + (f"; {m['deferred']} more left for a later job ({m['deferred_because']})" if m.get("deferred") else ""))


def _unchanged(store: Any, edits: Sequence[Edit]) -> list[str]:
    """Ids of ``edits`` still stored exactly as the job read them (not updated or deleted meanwhile)."""
    out = []
    for e in edits:
        try:
            now = store.get(e.id, e.namespace)
        except (KeyError, LookupError):
            continue
        if now.updated_at == e.updated_at and now.status == e.status:
            out.append(e.id)
    return out
