"""The evaluation loop: cases x methods -> per-probe records -> a summary keyed by protocol.

For each case the unedited model's answers are computed first (the locality reference, memoised and
shared by every method), then each method is prepared with the case's edit(s) (``single`` mode),
with all N edits at once (``batch`` mode), or with the N edits applied one group after another, each
on top of the last, and scored at the end (``sequential`` mode, groups of ``seq_batch`` cases); every
probe is scored, and the method is closed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kem.datasets import EvalCase, Probe
from kem.eval import metrics as M
from kem.eval.eval_methods import EvalContext, Prepared, Request, build_method
from kem.eval.scoring import Job, Scorer

log = logging.getLogger(__name__)

KINDS = ("reliability", "generalization", "locality", "portability")
MODES = ("single", "batch", "sequential")


@dataclass(frozen=True)
class EvalConfig:
    """Knobs of a run (recorded in ``results.json``).

    Attributes:
        mode: ``single`` (each case's edits alone), ``batch`` (all N edits live at once) or
            ``sequential`` (the edits applied ``seq_batch`` cases at a time, each group on top of the
            previous ones, everything scored after the last group: how much earlier edits survive).
        seq_batch: Cases per group in ``sequential`` mode.
        cloze_tokens: Greedy budget for cloze (plain completion) probes; generation also stops at a newline.
        chat_tokens: Greedy budget for questions answered through the chat template.
        fluency_tokens: Budget of the continuation whose n-gram entropy is the fluency metric.
        fluency_cases: Fluency is measured on the reliability prompt of the first this-many cases
            (cloze datasets; chat answers are measured directly).
        engine: ``cached`` (one prefill per request, greedy on the cache) or ``served`` (the
            generator's own ``generate`` on the same request text, as ``KnowledgeEditor.generate`` calls it).
    """

    mode: str = "single"
    seq_batch: int = 1
    cloze_tokens: int = 16
    chat_tokens: int = 32
    fluency_tokens: int = 32
    fluency_cases: int = 50
    engine: str = "cached"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        if self.seq_batch < 1:
            raise ValueError(f"seq_batch must be >= 1 (got {self.seq_batch})")
        if self.engine not in ("cached", "served"):
            raise ValueError(f"engine must be 'cached' or 'served' (got {self.engine!r})")


@dataclass
class MethodRun:
    """Everything measured for one method."""

    method: str
    cases: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    scope_in: list[float] = field(default_factory=list)
    scope_out: list[float] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole run (methods of one run share the model's work)
    reference_seconds: float = 0.0  # of which: the unedited model's locality reference
    edit_seconds: float = 0.0  # of which: this method's prepare/close (computing and applying edits)


@dataclass
class _Pending:
    """A probe whose requests are built and whose jobs are queued, waiting for the batch to run."""

    model_key: str  # the completion request's model (teacher forcing, cloze generation, fluency)
    case: EvalCase
    kind: str
    probe: Probe
    req: Request  # completion request (teacher forcing; generation for clozes)
    greq: Request  # generation request
    gen: tuple[int, tuple[str, ...]]  # budget, stop
    flu: tuple[int, tuple[str, ...]] | None  # fluency continuation: budget, stop
    has_scope: bool
    gen_key: str = ""  # the generation request's model (a chat request may run on another than the cloze)


class Evaluator:
    """Scores probes for the methods of one run over one shared model.

    Requests are built per probe (retrieval, scope, composition run as served); the model work is
    queued and run in batches (:class:`~kem.eval.scoring.Scorer`), then the records are filled in.

    Args:
        ctx: The shared generator / embedder.
        config: See :class:`EvalConfig`.
        scorer: A :class:`~kem.eval.scoring.Scorer` to share memoised results between runs.
        flush_jobs: Queued jobs that trigger a batch run.
    """

    def __init__(self, ctx: EvalContext, config: EvalConfig | None = None, scorer: Scorer | None = None,
                 flush_jobs: int = 128) -> None:
        self.ctx = ctx
        self.config = config or EvalConfig()
        self.scorer = scorer or Scorer(ctx.tokenizer)
        self.flush_jobs = flush_jobs
        self._jobs: dict[str, tuple[Any, list[Job]]] = {}
        self._waiting: list[tuple[MethodRun | None, int, list[_Pending]]] = []
        self._refs: dict[int, list[dict[str, Any]]] = {}

    # ---- queueing ------------------------------------------------------------------------------------
    def _targets(self, case: EvalCase, kind: str, probe: Probe) -> list[str]:
        ts = [probe.target] if probe.target.strip() else []
        if case.target_true and kind in ("reliability", "generalization", "locality"):
            ts += [case.target_new, case.target_true]
        return list(dict.fromkeys(ts))

    def _job(self, prep: Prepared, job: Job, req: Request) -> str:
        """Queue ``job`` on the model the request runs on (a request may name its own, e.g. the
        edit-follower for in-scope requests); returns that model's key."""
        key = req.model_key or prep.model_key
        self._jobs.setdefault(key, (req.model if req.model is not None else prep.model, []))[1].append(job)
        return key

    def _queue(self, prep: Prepared, case: EvalCase, kind: str, probe: Probe, fluency: bool) -> _Pending:
        c = self.config
        served = c.engine == "served"
        req = prep.completion(probe.text)
        key = self._job(prep, Job(req.text, self._targets(case, kind, probe)), req)
        if probe.chat:
            greq = prep.chat(probe.text)
            gen = (c.chat_tokens, greq.stop)
        else:
            greq, gen = req, (c.cloze_tokens, tuple(dict.fromkeys(req.stop + ("\n",))))
        gen_key = greq.model_key or prep.model_key
        if not served:
            self._job(prep, Job(greq.text, [], *gen), greq)
        flu = None
        if fluency and not probe.chat:
            flu = (c.fluency_tokens, req.stop)
            if not served:
                self._job(prep, Job(req.text, [], *flu), req)
        return _Pending(key, case, kind, probe, req, greq, gen, flu, prep.has_scope, gen_key)

    def _queue_case(self, run: MethodRun | None, prep: Prepared, case: EvalCase, index: int) -> None:
        """Queue every probe of ``case`` (``run`` None: the pre-edit reference, locality only)."""
        pend = []
        for kind in (KINDS if run is not None else ("locality",)):
            for j, p in enumerate(getattr(case, kind)):
                fl = run is not None and kind == "reliability" and j == 0 and (p.chat or index < self.config.fluency_cases)
                pend.append(self._queue(prep, case, kind, p, fl))
        self._waiting.append((run, index, pend))
        if sum(len(v[1]) for v in self._jobs.values()) >= self.flush_jobs:
            self.flush()

    # ---- running and filling in ------------------------------------------------------------------------
    def flush(self) -> None:
        """Run the queued jobs, then fill in the waiting records (references first: they are queued first)."""
        for key, (model, jobs) in self._jobs.items():
            self.scorer.run_many(model, key, jobs)
        self._jobs = {}
        waiting, self._waiting = self._waiting, []
        for run, index, pend in waiting:
            recs = [self._record(p) for p in pend]
            if run is None:
                self._refs[index] = recs
                continue
            ref = self._refs[index]
            for rec in recs:
                if rec["kind"] != "locality":
                    continue
                pre = ref[rec.pop("_j")]
                rec["pre_generated"] = pre["generated"]
                rec["unchanged"] = M.unchanged(pre["generated"], rec["generated"])
                if "tf_pred" in rec and "tf_pred" in pre:
                    rec["tf_locality"] = M.locality_agreement(pre["tf_pred"], rec["tf_pred"])
            case = pend[0].case if pend else None
            run.cases.append({"case_id": case.case_id if case else "?", "index": index,
                              "edits": [_edit_view(e) for e in case.edits] if case else [], "probes": recs})

    def _gen_text(self, key: str, req: Request, budget: int, stop: tuple[str, ...]) -> str:
        if self.config.engine == "served":
            from kem.adapters.base import cut_at_stop
            from kem.protocols import GenerationParams

            text = self.ctx.generator.generate(req.text, GenerationParams(max_new_tokens=budget, stop=stop,
                                                                          lora=req.lora))
            return cut_at_stop(text, stop)[0]
        out = self.scorer.generated(key, req.text, budget, stop)
        if out is None:
            raise RuntimeError(f"generation for {req.text[-60:]!r} was not run")
        return out

    def _record(self, p: _Pending) -> dict[str, Any]:
        probe, case, kind, req, key = p.probe, p.case, p.kind, p.req, p.model_key
        gen = self._gen_text(p.gen_key or key, p.greq, *p.gen)
        rec: dict[str, Any] = {
            "kind": kind, "prompt": probe.text, "expected": probe.target, "generated": gen,
            "rewritten": req.text != probe.text, "applied": list(req.applied),
        }
        if kind == "locality":
            rec["_j"] = case.locality.index(probe)
        if p.greq.messages is not None and p.greq.messages != [{"role": "user", "content": probe.text}]:
            rec["messages"] = p.greq.messages
        if probe.target.strip():
            ts = self.scorer.score(key, req.text, probe.target)
            rec["tf_accuracy"], rec["tf_pred"] = ts.accuracy, list(ts.pred_ids)
        if kind != "locality":
            answers = [probe.target, *probe.aliases]
            rec["exact_match"] = M.exact_match(gen, answers)
            rec["contains"] = M.contains(gen, answers)
        if case.target_true and kind in ("reliability", "generalization", "locality"):
            nn = self.scorer.score(key, req.text, case.target_new).nll
            nt = self.scorer.score(key, req.text, case.target_true).nll
            rec.update(nll_new=nn, nll_true=nt, prob_success=M.prob_success(nn, nt, neighborhood=kind == "locality"))
        if p.has_scope:
            own = {e.id for e in case.edits}
            own_scores = [s for i, s, _ in req.considered if i in own]
            rec["scope"] = {
                "own_score": max(own_scores) if own_scores else None,
                "max_score": max((s for _, s, _ in req.considered), default=None),
                "own_applied": bool(own & set(req.applied)),
                "n_applied": len(req.applied),
                "n_wrong": len(set(req.applied) - own),
            }
        if probe.chat and kind == "reliability" and case.reliability.index(probe) == 0:
            rec["fluency"] = M.fluency(gen)
        elif p.flu is not None:
            text = self._gen_text(key, req, *p.flu)
            rec["fluency_text"], rec["fluency"] = text, M.fluency(text)
        return rec

    # ---- a whole run ---------------------------------------------------------------------------------
    def run(self, methods: Sequence[str], cases: Sequence[EvalCase], progress: bool = True) -> list[MethodRun]:
        """Evaluate ``methods`` on ``cases`` in the configured mode."""
        from tqdm.auto import tqdm

        from kem.eval.eval_methods import PlainPrepared

        built = [build_method(m, self.ctx) for m in methods]
        runs = [MethodRun(m.name) for m in built]
        self._refs = {}
        bar = tqdm(total=len(cases) * (len(built) + 1), desc=f"eval ({self.config.mode})", unit="case",
                   disable=not progress)
        t0 = time.perf_counter()
        base = PlainPrepared(self.ctx)
        for i, case in enumerate(cases):  # the unedited model, before any method touches it
            self._queue_case(None, base, case, i)
            bar.update(1)
        self.flush()
        ref_s = time.perf_counter() - t0

        def one(m: Any, r: MethodRun, batches: Sequence[Sequence[Any]], todo: Sequence[tuple[int, EvalCase]]) -> None:
            if getattr(m, "modifies_model", False):
                self.flush()
            t = time.perf_counter()
            if len(batches) == 1:
                prep = m.prepare(batches[0])
            elif hasattr(m, "prepare_sequence"):
                bar.set_postfix_str(f"{m.name}: applying {len(batches)} groups in sequence")
                prep = m.prepare_sequence(batches)
            else:
                raise ValueError(f"eval method {m.name!r} has no sequential mode (prepare_sequence)")
            r.edit_seconds += time.perf_counter() - t
            try:
                for i, case in todo:
                    self._queue_case(r, prep, case, i)
                    bar.update(1)
                if prep.model_key != "base":
                    self.flush()  # before the weights change back
            finally:
                t = time.perf_counter()
                prep.close()
                r.edit_seconds += time.perf_counter() - t

        if self.config.mode == "single":
            for i, case in enumerate(cases):
                for m, r in zip(built, runs, strict=True):
                    one(m, r, [case.edits], [(i, case)])
        else:
            k = len(cases) if self.config.mode == "batch" else self.config.seq_batch
            groups = [[e for c in cases[j : j + k] for e in c.edits] for j in range(0, len(cases), k)]
            for m, r in zip(built, runs, strict=True):
                one(m, r, groups, list(enumerate(cases)))
                self.flush()
        self.flush()
        bar.close()
        for r in runs:
            r.cases.sort(key=lambda c: c["index"])
            r.summary = summarize(r.cases)
            r.seconds = time.perf_counter() - t0
            r.reference_seconds = ref_s
            r.scope_in, r.scope_out = scope_scores(r.cases)
        return runs


def _edit_view(e: Any) -> dict[str, Any]:
    return {"id": e.id, "subject": e.subject, "prompt": e.prompt, "target_new": e.target_new,
            "target_true": e.target_true}


# ---- aggregation ------------------------------------------------------------------------------------
def _case_mean(cases: Sequence[dict[str, Any]], kinds: Sequence[str], key: str) -> float:
    """Mean over cases of the per-case mean of ``key`` over the case's probes of ``kinds``."""
    per_case = [M.mean(p.get(key) for p in c["probes"] if p["kind"] in kinds) for c in cases]
    return M.mean(v for v in per_case if not math.isnan(v))


def summarize(cases: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Summary metrics keyed ``protocol.metric`` (fractions in [0, 1]; NaN when not applicable)."""
    s: dict[str, float] = {"n": float(len(cases))}
    s["easyedit.reliability"] = _case_mean(cases, ["reliability"], "tf_accuracy")
    s["easyedit.generalization"] = _case_mean(cases, ["generalization"], "tf_accuracy")
    s["easyedit.locality"] = _case_mean(cases, ["locality"], "tf_locality")
    s["easyedit.portability"] = _case_mean(cases, ["portability"], "tf_accuracy")
    es = _case_mean(cases, ["reliability"], "prob_success")
    ps = _case_mean(cases, ["generalization"], "prob_success")
    ns = _case_mean(cases, ["locality"], "prob_success")
    s.update({"counterfact.efficacy": es, "counterfact.paraphrase": ps, "counterfact.neighborhood": ns,
              "counterfact.score": M.harmonic_mean([es, ps, ns]) if not any(map(math.isnan, (es, ps, ns)))
              else float("nan")})
    for kind in ("reliability", "generalization", "portability"):
        s[f"generation.{kind}"] = _case_mean(cases, [kind], "contains")
        s[f"generation.{kind}_em"] = _case_mean(cases, [kind], "exact_match")
    s["generation.locality"] = _case_mean(cases, ["locality"], "unchanged")
    s["fluency.ngram_entropy"] = _case_mean(cases, ["reliability"], "fluency")
    flu = [p for c in cases for p in c["probes"] if p["kind"] == "reliability" and "fluency" in p]
    s["fluency.measured"] = M.mean(p["fluency"] is not None for p in flu) if flu else float("nan")
    s.update(scope_metrics(cases))
    return s


def scope_metrics(cases: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Scope decision quality. In-scope probes: reliability and generalization (their case's edits
    should be applied); out-of-scope: locality (nothing should be applied).

    - ``scope.recall``: in-scope probes whose own edit was applied;
    - ``scope.precision``: applied (probe, edit) pairs that are right (an own edit on an in-scope probe);
    - ``scope.false_positive_rate``: out-of-scope probes that got any edit.
    """
    tp = fn = wrong = fp_probes = n_out = 0
    seen = False
    for c in cases:
        for p in c["probes"]:
            sc = p.get("scope")
            if sc is None:
                continue
            seen = True
            if p["kind"] in ("reliability", "generalization"):
                tp += sc["own_applied"]
                fn += not sc["own_applied"]
                wrong += sc["n_wrong"]
            elif p["kind"] == "locality":
                n_out += 1
                wrong += sc["n_applied"]
                fp_probes += sc["n_applied"] > 0
    if not seen:
        return {"scope.precision": float("nan"), "scope.recall": float("nan"),
                "scope.false_positive_rate": float("nan")}
    prec, rec = M.precision_recall(tp, wrong, fn)
    return {"scope.precision": prec, "scope.recall": rec,
            "scope.false_positive_rate": fp_probes / n_out if n_out else float("nan")}


def scope_scores(cases: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Retrieval scores for the histograms: own-edit score on in-scope probes, best score on locality probes."""
    ins, outs = [], []
    for c in cases:
        for p in c["probes"]:
            sc = p.get("scope")
            if sc is None:
                continue
            if p["kind"] in ("reliability", "generalization") and sc["own_score"] is not None:
                ins.append(float(sc["own_score"]))
            elif p["kind"] == "locality" and sc["max_score"] is not None:
                outs.append(float(sc["max_score"]))
    return ins, outs
