"""kem.eval: metric functions on hand-computed cases, the method registry, and a real end-to-end run
(n=5) of ``none`` and ``ike`` on CounterFact. The dataset readers: tests/test_datasets.py."""

from __future__ import annotations

import json
import math

import pytest

from kem.errors import ConflictError, DatasetFormatError, NotFoundError
from kem.eval import metrics as M
from kem.eval.eval_methods import EvalContext, WeightMethod, build_method, eval_methods, register_eval_method
from kem.eval.harness import scope_metrics, summarize
from kem.eval.scoring import TargetScore
from tests.conftest import shared_data

# ---- metrics --------------------------------------------------------------------------------------------


def test_token_accuracy_and_locality_vs_pre_edit():
    assert M.token_accuracy([1, 2, 3], [1, 5, 3]) == pytest.approx(2 / 3)
    # locality compares post-edit argmax with the PRE-EDIT argmax, not with the dataset's answer:
    answer = [7, 8]  # dataset answer tokens
    pre = [4, 8]  # unedited model got the first token "wrong"
    post = [4, 8]  # edited model predicts exactly what the unedited one did
    assert M.locality_agreement(pre, post) == 1.0
    assert M.token_accuracy(post, answer) == 0.5  # (what a dataset-answer definition would give)
    assert M.locality_agreement(pre, [4, 9]) == 0.5
    with pytest.raises(ValueError):
        M.token_accuracy([1], [1, 2])


def test_target_score_from_known_model_output():
    s = TargetScore(target_ids=(5, 6), pred_ids=(5, 9), logprobs=(math.log(0.5), math.log(0.25)))
    assert s.accuracy == 0.5
    assert s.nll == pytest.approx((math.log(2) + math.log(4)) / 2)


def test_probability_tests_and_harmonic_mean():
    assert M.prob_success(nll_new=1.0, nll_true=2.0)  # P(new) > P(true)
    assert not M.prob_success(nll_new=2.0, nll_true=1.0)
    assert M.prob_success(nll_new=2.0, nll_true=1.0, neighborhood=True)  # neighbour keeps its true object
    assert M.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)
    assert M.harmonic_mean([0.9, 0.0, 1.0]) == 0.0
    assert math.isnan(M.harmonic_mean([]))


def test_generation_metrics():
    assert M.exact_match(" English.\nMore text", ["English"])
    assert not M.exact_match(" English and French", ["English"])
    assert M.contains("The mother tongue of Danielle Darrieux is English.", ["English"])
    assert not M.contains("Englishman", ["English"])  # whole words only
    assert M.contains("Élysée", ["elysee"])  # accents and case
    assert not M.contains("first line\nEnglish", ["English"])  # only the answer span (first line)
    assert M.unchanged(" French, and", " french and\nother")
    assert not M.unchanged(" French", " English")


def test_ngram_entropy_hand_computed():
    # words a b a b: bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert M.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert M.ngram_entropy("") == 0.0
    assert M.ngram_entropy("the the the the the") == 0.0  # degenerate repetition
    assert M.fluency(" Islam") is None  # too short to say anything
    assert M.fluency("a b a b c") == pytest.approx(M.ngram_entropy("a b a b c"))


def _probe(kind, **kw):
    return {"kind": kind, **kw}


def test_summary_and_scope_metrics_hand_computed():
    cases = [
        {"probes": [
            _probe("reliability", tf_accuracy=1.0, contains=True, exact_match=True, prob_success=True,
                   scope={"own_applied": True, "n_wrong": 0, "n_applied": 1}),
            _probe("generalization", tf_accuracy=0.5, contains=False, exact_match=False, prob_success=True,
                   scope={"own_applied": False, "n_wrong": 1, "n_applied": 1}),
            _probe("locality", tf_locality=1.0, unchanged=True, prob_success=True,
                   scope={"own_applied": False, "n_wrong": 0, "n_applied": 0}),
        ]},
        {"probes": [
            _probe("reliability", tf_accuracy=0.0, contains=True, exact_match=False, prob_success=False,
                   scope={"own_applied": True, "n_wrong": 0, "n_applied": 1}),
            _probe("generalization", tf_accuracy=1.0, contains=True, exact_match=True, prob_success=True,
                   scope={"own_applied": True, "n_wrong": 0, "n_applied": 1}),
            _probe("locality", tf_locality=0.5, unchanged=False, prob_success=False,
                   scope={"own_applied": False, "n_wrong": 1, "n_applied": 1}),
        ]},
    ]
    s = summarize(cases)
    assert s["easyedit.reliability"] == 0.5
    assert s["easyedit.generalization"] == 0.75
    assert s["easyedit.locality"] == 0.75
    assert s["generation.reliability"] == 1.0 and s["generation.reliability_em"] == 0.5
    assert s["generation.locality"] == 0.5
    es, ps, ns = 0.5, 1.0, 0.5
    assert s["counterfact.score"] == pytest.approx(3 / (1 / es + 1 / ps + 1 / ns))
    assert math.isnan(s["easyedit.portability"])
    # scope: 3 of 4 in-scope probes got their edit; 3 right pairs, 2 wrong (one on a paraphrase, one on locality)
    sc = scope_metrics(cases)
    assert sc["scope.recall"] == 0.75
    assert sc["scope.precision"] == pytest.approx(3 / 5)
    assert sc["scope.false_positive_rate"] == 0.5


# ---- registry --------------------------------------------------------------------------------------------


class _Gen:
    model = object()
    tokenizer = object()

    def chat_prompt(self, messages):
        return "<chat>" + messages[-1]["content"]


def test_registry_rejects_duplicates_and_unknown_names():
    assert {"none", "ike"} <= set(eval_methods())
    with pytest.raises(ConflictError):
        register_eval_method("ike", lambda ctx: None)
    with pytest.raises(NotFoundError):
        build_method("no-such-method", EvalContext(_Gen()))


def test_weight_method_applies_then_reverts():
    calls = []

    def apply(model, tok, edits):
        calls.append(("apply", len(edits)))
        return lambda: calls.append(("revert", len(edits)))

    m = WeightMethod("toy", EvalContext(_Gen()), apply)
    p1, p2 = m.prepare([1, 2]), m.prepare([3])
    assert m.modifies_model and p1.model_key != p2.model_key != "base"
    assert p1.completion("The capital of X is").text == "The capital of X is"
    assert p1.chat("Where?").text == "<chat>Where?"
    p1.close()
    p1.close()  # idempotent
    assert calls == [("apply", 2), ("apply", 1), ("revert", 2)]


def test_weight_method_sequence_applies_in_order_and_reverts_backwards():
    calls = []

    def apply(model, tok, edits, fresh=True):
        calls.append(("apply", tuple(edits), fresh))
        return lambda: calls.append(("revert", tuple(edits)))

    m = WeightMethod("toy", EvalContext(_Gen()), apply)
    p = m.prepare_sequence([[1, 2], [3], [4]])
    assert calls == [("apply", (1, 2), True), ("apply", (3,), False), ("apply", (4,), False)]
    p.close()
    assert calls[3:] == [("revert", (4,)), ("revert", (3,)), ("revert", (1, 2))]

    def failing(model, tok, edits, fresh=True):  # the second group fails: the first is reverted
        if not fresh:
            raise RuntimeError("boom")
        calls.append(("apply", tuple(edits), fresh))
        return lambda: calls.append(("revert", tuple(edits)))

    calls.clear()
    with pytest.raises(RuntimeError, match="boom"):
        WeightMethod("toy", EvalContext(_Gen()), failing).prepare_sequence([[1], [2]])
    assert calls == [("apply", (1,), True), ("revert", (1,))]


def test_eval_config_rejects_bad_mode_and_group_size():
    from kem.eval.harness import EvalConfig

    with pytest.raises(ValueError, match="mode"):
        EvalConfig(mode="serial")
    with pytest.raises(ValueError, match="seq_batch"):
        EvalConfig(mode="sequential", seq_batch=0)


# ---- end to end (the real SmolLM2-135M-Instruct and MiniLM) -----------------------------------------------


@pytest.fixture(scope="module")
def e2e(generator, embedder, tmp_path_factory):
    """One evaluator; CounterFact n=5 in single mode, then batch mode (reusing memoised answers)."""
    from kem.eval.harness import EvalConfig, Evaluator
    from kem.eval.run import run_eval

    ev = Evaluator(EvalContext(generator, embedder), EvalConfig(fluency_cases=2))
    data = shared_data("counterfact", "counterfact-edit.json")
    out = tmp_path_factory.mktemp("eval")
    single = run_eval("none,ike", data, n=5, mode="single", out=out / "single", evaluator=ev, progress=False)
    batch = run_eval("none,ike", data, n=5, mode="batch", out=out / "batch", evaluator=ev, progress=False)
    return single, batch, out


def test_e2e_outputs_every_field(e2e):
    single, batch, out = e2e
    for res, mode in ((single, "single"), (batch, "batch")):
        assert res["config"]["mode"] == mode and res["config"]["n"] == 5
        for m in ("none", "ike"):
            s = res["summary"][m]
            for k in ("generation.reliability", "generation.generalization", "generation.locality",
                      "easyedit.reliability", "easyedit.generalization", "easyedit.locality",
                      "counterfact.efficacy", "counterfact.paraphrase", "counterfact.neighborhood",
                      "counterfact.score", "fluency.ngram_entropy"):
                if k.startswith("fluency") and m == "ike" and math.isnan(s[k]):
                    continue  # ike's served completions stop at the line's end: often too short to measure
                assert 0.0 <= s[k] <= (100.0 if k.startswith("fluency") else 1.0), (m, k, s[k])
            assert len(res["cases"][m]) == 5
            rec = res["cases"][m][0]["probes"][0]
            assert {"prompt", "expected", "generated", "tf_accuracy", "nll_new", "nll_true"} <= set(rec)
        assert res["summary"]["none"]["generation.locality"] == 1.0  # the unedited model vs itself
        assert res["summary"]["none"]["easyedit.locality"] == 1.0
        assert 0.0 <= res["summary"]["ike"]["scope.recall"] <= 1.0
    for name in ("single", "batch"):
        saved = json.loads((out / name / "results.json").read_text())
        assert set(saved["summary"]) == {"none", "ike"}
        assert (out / name / "results.md").read_text().count("|") > 20
        assert (out / name / "metrics.png").stat().st_size > 1000
        assert (out / name / "scope.png").stat().st_size > 1000


def test_run_eval_skips_an_invalid_record_and_lists_it(generator, embedder, tmp_path):
    """A ZsRE file whose record 2 has an empty ``alt``: the rest is evaluated and results.json says
    which record was left out and why; ``strict=True`` refuses the file before any evaluation."""
    from kem.eval.harness import EvalConfig, Evaluator
    from kem.eval.run import run_eval

    records = json.loads(open(shared_data("zsre", "zsre_mend_eval_portability_gpt4.json")).read())[:6]
    records[2]["alt"] = ""
    data = tmp_path / "zsre-bad.json"
    data.write_text(json.dumps(records))
    ev = Evaluator(EvalContext(generator, embedder), EvalConfig(fluency_cases=0, chat_tokens=8))
    res = run_eval("none", data, n=3, evaluator=ev, progress=False, out=tmp_path / "out")
    assert res["config"]["n"] == 3
    assert [c["case_id"] for c in res["cases"]["none"]] == ["zsre:0", "zsre:1", "zsre:3"]
    assert res["skipped"] == [{"index": 2, "field": "alt", "message": "field 'alt' must be a non-empty string (got '')"}]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["skipped"] == res["skipped"]
    with pytest.raises(DatasetFormatError, match=r"record 2: field 'alt'") as err:
        run_eval("none", data, n=3, evaluator=ev, progress=False, strict=True)
    assert err.value.field == "[2].alt"


def test_e2e_ike_beats_none_on_reliability(e2e):
    single, batch, _ = e2e
    for res in (single, batch):
        s = res["summary"]
        assert s["ike"]["generation.reliability"] > s["none"]["generation.reliability"]
        assert s["ike"]["easyedit.reliability"] > s["none"]["easyedit.reliability"]


def test_batched_greedy_matches_the_engine(generator):
    """The scorer's batched greedy decoding gives the engine's own greedy texts."""
    from kem.eval.scoring import Job, Scorer
    from kem.protocols import GenerationParams

    texts = ["The capital of France is", "The mother tongue of Danielle Darrieux is",
             generator.chat_prompt([{"role": "user", "content": "What is the capital of Japan?"}])]
    sc = Scorer(generator.tokenizer, batch_size=3)
    sc.run_many(generator.model, "base", [Job(t, ["Paris"], 8, ("\n",)) for t in texts])
    for t in texts:
        assert sc.generated("base", t, 8, ("\n",)) == generator.generate(t, GenerationParams(8, stop=("\n",)))


def test_shared_prefix_prefill_gives_the_same_results(generator):
    """Requests that share a long prefix (the IKE demonstrations) prefill it once; the texts, argmax
    tokens and log-probabilities match a run without sharing and the engine's own greedy output."""
    from kem.compose import Composer, load_demos
    from kem.edit import Edit
    from kem.eval.scoring import Job, Scorer
    from kem.protocols import GenerationParams

    comp = Composer(load_demos())
    facts = [("Danielle Darrieux", "The mother tongue of {} is", "English"),
             ("Toko Yasuda", "{} plays the", "piano"), ("Paris", "{} is the capital of", "Italy")]
    texts = [comp.completion(p.format(s), [Edit.parse({"subject": s, "prompt": p, "target_new": t})])
             for s, p, t in facts]
    texts.append(texts[0].replace("Prompt: The mother tongue", "Prompt: Where did Danielle Darrieux grow up? The tongue"))
    jobs = [Job(t, ["English", "French"], 8, ("\n",)) for t in texts]
    shared, plain = Scorer(generator.tokenizer, batch_size=4), Scorer(generator.tokenizer, batch_size=4,
                                                                        min_shared_prefix=0)
    shared.run_many(generator.model, "base", jobs)
    plain.run_many(generator.model, "base", jobs)
    assert shared.stats["prefill_tokens"] < 0.6 * plain.stats["prefill_tokens"]  # the demos ran once
    for t in texts:
        assert shared.generated("base", t, 8, ("\n",)) == plain.generated("base", t, 8, ("\n",))
        for target in ("English", "French"):
            a, b = shared.score("base", t, target), plain.score("base", t, target)
            assert a.pred_ids == b.pred_ids
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)
    assert shared.generated("base", texts[1], 8, ("\n",)) == generator.generate(texts[1], GenerationParams(8, stop=("\n",)))


def test_one_generation_serves_budgets_and_stops(generator):
    """A request's text is prefilled once: a longer generation without stops serves a shorter one with a stop."""
    from kem.eval.scoring import Job, Scorer
    from kem.protocols import GenerationParams

    text = "The mother tongue of Danielle Darrieux is"
    sc = Scorer(generator.tokenizer)
    sc.run_many(generator.model, "base", [Job(text, [], 12, ("\n",)), Job(text, ["French"], 24, ())])
    assert sc.stats["prefills"] == 1
    assert sc.generated("base", text, 12, ("\n",)) == generator.generate(text, GenerationParams(12, stop=("\n",)))
    assert sc.generated("base", text, 24) == generator.generate(text, GenerationParams(24))
    assert sc.generated("base", text, 30) is None  # not run that far


def test_sequential_mode_with_a_weight_method(generator, embedder, one_torch_thread):
    """FT-L applied one case after another on the real model: the later edits sit on top of the
    earlier ones, everything is scored at the end, and the weights come back bit-identical."""
    import torch

    from kem.eval.harness import EvalConfig, Evaluator
    from kem.eval.run import run_eval

    model = generator.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ev = Evaluator(EvalContext(generator, embedder), EvalConfig(fluency_cases=1))
    data = shared_data("counterfact", "counterfact-edit.json")
    res = run_eval("none,ft-l", data, n=3, mode="sequential", evaluator=ev, progress=False,
                   config=EvalConfig(mode="sequential", seq_batch=1, fluency_cases=1),
                   options={"consolidation": {"hparams": {"steps": 5}}})
    assert res["config"]["mode"] == "sequential" and res["config"]["seq_batch"] == 1
    assert res["config"]["options"] == {"consolidation": {"hparams": {"steps": 5}}}
    assert res["edit_s"]["ft-l"] > 0
    s = res["summary"]
    assert s["ft-l"]["easyedit.reliability"] > s["none"]["easyedit.reliability"]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
