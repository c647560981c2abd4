"""The evaluation loop: cases x methods -> per-probe records -> a summary keyed by protocol.

For each case the unedited model's answers are computed first (the locality reference, memoised and
shared by every method), then each method is prepared with the case's edit(s) (``single`` mode) or
with all N edits at once (``batch`` mode), every probe is scored, and the method is closed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kem.eval import metrics as M
from kem.eval.datasets import EvalCase, Probe
from kem.eval.methods import EvalContext, Prepared, Request, build_method
from kem.eval.scoring import Scorer

log = logging.getLogger(__name__)

KINDS = ("reliability", "generalization", "locality", "portability")
MODES = ("single", "batch")


@dataclass(frozen=True)
class EvalConfig:
    """Knobs of a run (recorded in ``results.json``).

    Attributes:
        mode: ``single`` (each case's edits alone) or ``batch`` (all N edits live at once).
        cloze_tokens: Greedy budget for cloze (plain completion) probes; generation also stops at a newline.
        chat_tokens: Greedy budget for questions answered through the chat template.
        fluency_tokens: Budget of the continuation whose n-gram entropy is the fluency metric.
        fluency_cases: Fluency is measured on the reliability prompt of the first this-many cases
            (cloze datasets; chat answers are measured directly).
        engine: ``cached`` (one prefill per request, greedy on the cache) or ``served`` (the
            generator's own ``generate`` on the same request text, as ``KnowledgeEditor.generate`` calls it).
    """

    mode: str = "single"
    cloze_tokens: int = 16
    chat_tokens: int = 32
    fluency_tokens: int = 32
    fluency_cases: int = 50
    engine: str = "cached"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} (got {self.mode!r})")
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
    seconds: float = 0.0


class Evaluator:
    """Scores probes for the methods of one run over one shared model.

    Args:
        ctx: The shared generator / embedder.
        config: See :class:`EvalConfig`.
        scorer: A :class:`~kem.eval.scoring.Scorer` to share memoised results between runs.
    """

    def __init__(self, ctx: EvalContext, config: EvalConfig | None = None, scorer: Scorer | None = None) -> None:
        self.ctx = ctx
        self.config = config or EvalConfig()
        self.scorer = scorer or Scorer(ctx.tokenizer)

    # ---- one probe ---------------------------------------------------------------------------------
    def _targets(self, case: EvalCase, kind: str, probe: Probe) -> list[str]:
        ts = [probe.target] if probe.target.strip() else []
        if case.target_true and kind in ("reliability", "generalization", "locality"):
            ts += [case.target_new, case.target_true]
        return list(dict.fromkeys(ts))

    def _generate(self, prep: Prepared, req: Request, max_new: int, stop: tuple[str, ...]) -> str:
        if self.config.engine == "served":
            from kem.adapters.base import cut_at_stop
            from kem.protocols import GenerationParams

            text = self.ctx.generator.generate(req.text, GenerationParams(max_new_tokens=max_new, stop=stop))
            return cut_at_stop(text, stop)[0]
        return self.scorer.run(prep.model, prep.model_key, req.text, (), max_new, stop)[1] or ""

    def probe(self, prep: Prepared, case: EvalCase, kind: str, probe: Probe, *, fluency: bool = False) -> dict[str, Any]:
        """Score one probe under ``prep``: teacher forcing on the completion request, generation on the
        completion (cloze) or chat (question) request."""
        c = self.config
        req = prep.completion(probe.text)
        targets = self._targets(case, kind, probe)
        scores, _ = self.scorer.run(prep.model, prep.model_key, req.text, targets)
        if probe.chat:
            greq = prep.chat(probe.text)
            gen = self._generate(prep, greq, c.chat_tokens, greq.stop)
        else:
            greq = req
            gen = self._generate(prep, req, c.cloze_tokens, tuple(dict.fromkeys(req.stop + ("\n",))))
        rec: dict[str, Any] = {
            "kind": kind, "prompt": probe.text, "expected": probe.target, "generated": gen,
            "rewritten": req.text != probe.text, "applied": list(req.applied),
        }
        if greq.messages is not None and greq.messages != [{"role": "user", "content": probe.text}]:
            rec["messages"] = greq.messages
        answers = [probe.target, *probe.aliases]
        if probe.target.strip():
            rec["tf_accuracy"] = scores[probe.target].accuracy
            rec["tf_pred"] = list(scores[probe.target].pred_ids)
        if kind != "locality":
            rec["exact_match"] = M.exact_match(gen, answers)
            rec["contains"] = M.contains(gen, answers)
        if case.target_true and kind in ("reliability", "generalization", "locality"):
            nn, nt = scores[case.target_new].nll, scores[case.target_true].nll
            rec.update(nll_new=nn, nll_true=nt, prob_success=M.prob_success(nn, nt, neighborhood=kind == "locality"))
        if prep.has_scope:
            own = {e.id for e in case.edits}
            own_scores = [s for i, s, _ in req.considered if i in own]
            rec["scope"] = {
                "own_score": max(own_scores) if own_scores else None,
                "max_score": max((s for _, s, _ in req.considered), default=None),
                "own_applied": bool(own & set(req.applied)),
                "n_applied": len(req.applied),
                "n_wrong": len(set(req.applied) - own),
            }
        if fluency:
            if probe.chat:
                rec["fluency"] = M.ngram_entropy(gen)
            else:
                text = self._generate(prep, req, c.fluency_tokens, req.stop)
                rec["fluency_text"] = text
                rec["fluency"] = M.ngram_entropy(text)
        return rec

    def reference(self, case: EvalCase) -> dict[str, Any]:
        """The unedited model on the locality probes: answer tokens (teacher forced) and generation."""
        from kem.eval.methods import PlainPrepared

        base = PlainPrepared(self.ctx)
        out = []
        for p in case.locality:
            out.append(self.probe(base, case, "locality", p))
        return {"locality": out}

    # ---- one case under one prepared method -----------------------------------------------------------
    def case(self, prep: Prepared, case: EvalCase, ref: dict[str, Any], index: int) -> dict[str, Any]:
        probes = []
        for kind in KINDS:
            for j, p in enumerate(getattr(case, kind)):
                fl = kind == "reliability" and j == 0 and (p.chat or index < self.config.fluency_cases)
                rec = self.probe(prep, case, kind, p, fluency=fl)
                if kind == "locality":
                    pre = ref["locality"][j]
                    rec["pre_generated"] = pre["generated"]
                    rec["unchanged"] = M.unchanged(pre["generated"], rec["generated"])
                    if "tf_pred" in rec:
                        rec["tf_locality"] = M.locality_agreement(pre["tf_pred"], rec["tf_pred"])
                probes.append(rec)
        return {"case_id": case.case_id, "edits": [_edit_view(e) for e in case.edits], "probes": probes}

    # ---- a whole run ---------------------------------------------------------------------------------
    def run(self, methods: Sequence[str], cases: Sequence[EvalCase], progress: bool = True) -> list[MethodRun]:
        """Evaluate ``methods`` on ``cases`` in the configured mode."""
        from tqdm.auto import tqdm

        built = [build_method(m, self.ctx) for m in methods]
        runs = [MethodRun(m.name) for m in built]
        bar = tqdm(total=len(cases) * (len(built) + 1), desc=f"eval ({self.config.mode})", unit="case",
                   disable=not progress)
        t0 = time.perf_counter()
        refs = []
        for case in cases:  # before any method touches the model
            refs.append(self.reference(case))
            bar.update(1)
        ref_s = time.perf_counter() - t0
        if self.config.mode == "single":
            for i, case in enumerate(cases):
                for m, r in zip(built, runs, strict=True):
                    t = time.perf_counter()
                    prep = m.prepare(case.edits)
                    try:
                        r.cases.append(self.case(prep, case, refs[i], i))
                    finally:
                        prep.close()
                    r.seconds += time.perf_counter() - t
                    bar.update(1)
        else:
            all_edits = [e for c in cases for e in c.edits]
            for m, r in zip(built, runs, strict=True):
                t = time.perf_counter()
                prep = m.prepare(all_edits)
                try:
                    for i, case in enumerate(cases):
                        r.cases.append(self.case(prep, case, refs[i], i))
                        bar.update(1)
                finally:
                    prep.close()
                r.seconds += time.perf_counter() - t
        bar.close()
        for r in runs:
            r.summary = summarize(r.cases)
            r.summary["runtime.method_s"] = r.seconds
            r.summary["runtime.reference_s"] = ref_s
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
