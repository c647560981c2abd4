"""Issue 20: the forms an edit is asked in, the ``distill`` method (the fast path distilled into the
weights), and the job that retires an edit only when the weights alone answer every form.

The model tests run distill on the demo's strongly-held facts with small step counts (about a minute);
quality at scale is measured by ``bench/bench_weights_alone.py`` (docs/consolidation.md).
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pytest
import torch

from kem.consolidation.forms import alt_clozes, forms_for, training_forms
from kem.edit import Edit
from kem.follower.data import eval_subjects
from tests.conftest import shared_data

STRONG = [  # kem demo's strongly-held facts: the model answers them right unprompted
    Edit(subject="Eiffel Tower", prompt="The {} is located in", target_new="Rome", namespace="cf"),
    Edit(subject="Microsoft", prompt="{} was founded by", target_new="Elon Musk", namespace="cf"),
]
SMALL = {"max_epochs": 12, "max_steps": 60, "prefixes": 2, "retain_same_relation": 4, "retain_random": 4}


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


# ---- forms -------------------------------------------------------------------------------------------------
def test_forms_of_an_edit():
    e = Edit(subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English",
             paraphrases=["Where Danielle Darrieux is from, people speak the language of"])
    forms = forms_for(e)
    assert [f.kind for f in forms] == ["cloze", "paraphrase", "paraphrase", "question"]
    assert forms[0].text == "The mother tongue of Danielle Darrieux is" and not forms[0].chat
    assert forms[1].source == "edit" and forms[2].text == "The native language of Danielle Darrieux is"
    assert forms[3].chat and forms[3].text == "What is the mother tongue of Danielle Darrieux?"
    # a relation no rule knows: the cloze and the stored paraphrases only
    odd = Edit(subject="Zorb", prompt="{} xyzzy", target_new="plugh")
    assert [f.kind for f in forms_for(odd)] == ["cloze"]
    assert alt_clozes("{} xyzzy") == []
    # training adds every rule-made phrasing and the cloze behind each prefix, without duplicates
    tf = training_forms(e, ["{}", "It rained. {}", "It rained. {}"])
    texts = [f.text for f in tf]
    assert len(texts) == len(set(texts)) and "It rained. The mother tongue of Danielle Darrieux is" in texts
    assert len([f for f in tf if f.source == "rule" and not f.chat]) == len(alt_clozes(e.prompt))


def test_rule_paraphrases_never_copy_evaluation_text():
    """The rule-made phrasings are kem's own: none is a paraphrase template of CounterFact's edit split
    (its ``rephrase_prompt`` with the subject taken out), so training on them never trains on what
    generalization is scored on."""
    from kem.consolidation import forms as F

    recs = json.loads(Path(shared_data("counterfact", "counterfact-edit.json")).read_text(encoding="utf-8"))
    rephrase = {" ".join(r["rephrase_prompt"].replace(r["subject"], "{}").lower().split()) for r in recs}
    ours = {" ".join(t.lower().split()) for _, alts in F._ALT for t in alts}
    assert len(ours) > 50 and len(rephrase) > 1000
    assert not ours & rephrase, sorted(ours & rephrase)


def test_retain_pool_is_train_split_only():
    """distill's retain pool shares no subject, case id or text with CounterFact edit, ZsRE, MQuAKE or the
    gate's locality probes (scripts/build_retain_pool.py)."""
    doc = json.loads(resources.files("kem").joinpath("data/retain_pool.json").read_text(encoding="utf-8"))
    facts = doc["facts"]
    assert doc["source"] == "counterfact-train.json" and len(facts) >= 2000
    subjects, ids = eval_subjects(shared_data())
    assert not {f["subject"].casefold() for f in facts} & subjects
    assert not {f["case_id"] for f in facts} & ids
    train = {r["case_id"] for r in json.loads(Path(shared_data("counterfact", "counterfact-train.json")).read_text())}
    assert {f["case_id"] for f in facts} <= train
    probes = json.loads(resources.files("kem").joinpath("data/locality_probes.json").read_text())["prompts"]
    rendered = {f["template"].replace("{}", f["subject"]) for f in facts}
    assert not rendered & set(probes)
    # no retained cloze names an evaluation subject as words (the follower's training rule, checked here
    # with its own word matching: "Paris" inside "Paris Hilton was born in" counts)
    words = {w for w in (" ".join(re.findall(r"\w+", s)) for s in subjects) if len(w) >= 3}  # "c", "1": not names
    hits = []
    for t in rendered:
        toks = re.findall(r"\w+", t.casefold())
        grams = {" ".join(toks[i:i + n]) for n in range(1, 11) for i in range(len(toks) - n + 1)}
        if grams & words:
            hits.append(t)
    assert not hits, (len(hits), hits[:5])


def test_retain_prompts_keep_away_from_the_edits():
    from kem.consolidation.distill.data import relation_key, retain_pool, retain_prompts

    edits = [Edit(subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English")]
    comp, chats = retain_prompts(edits, retain_pool(), same_relation=4, random_n=3, same_subject=3, chat=2)
    assert len(comp) >= 8 and len(chats) == 2
    about = [p for p in comp if "Danielle Darrieux" in p]
    assert len(about) == 3  # other relations of the edited subject...
    # ...never the edited relation itself, nor a phrasing of it
    assert all(relation_key(p.replace("Danielle Darrieux", "{}")) != relation_key(edits[0].prompt) for p in about)
    assert not any(p.replace("Danielle Darrieux", "{}") in alt_clozes(edits[0].prompt) for p in about)
    same_rel = [p for p in comp if "Danielle Darrieux" not in p and "mother tongue" in p.lower()]
    assert same_rel  # other subjects of the same relation: the neighbourhood the edit must not drag along


def test_binned_kl_is_zero_for_the_parent_and_positive_otherwise():
    from kem.consolidation.distill.train import binned_kl

    torch.manual_seed(0)
    logits = torch.randn(5, 100)
    lp = torch.log_softmax(logits, -1)
    v, i = lp.topk(10, -1)
    assert abs(float(binned_kl(v, lp, i))) < 1e-5
    other = torch.log_softmax(logits + torch.randn(5, 100), -1)
    assert float(binned_kl(v, other, i)) > 0.01


# ---- distill end to end, through the job, on kem demo's store ----------------------------------------------
DATA = Path(shared_data())
WIKITEXT = DATA / "wikitext-2" / "valid.txt"


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory, lm_and_tok):
    """kem demo's edits (4 CounterFact records, 2 strongly-held facts) in a store, as ``kem demo --keep``
    leaves them (no embeddings: the job needs none)."""
    from kem.datasets import counterfact_edit
    from kem.demo import STRONG, demo_records
    from kem.stores.sqlite import SQLiteStore

    h = tmp_path_factory.mktemp("demo-home")
    store = SQLiteStore(h / "edits.sqlite")
    store.add_many([counterfact_edit(r, n, "demo") for n, r in enumerate(demo_records())]
                   + [Edit(**e, source="demo") for e, _ in STRONG])
    store.close()
    return h


@pytest.fixture(scope="module")
def distilled(demo_home, lm_and_tok):
    from kem.consolidation.job import consolidate
    from kem.settings import Settings

    before = {n: p.detach().clone() for n, p in lm_and_tok[0].named_parameters() if ".mlp." in n}
    settings = Settings(home=demo_home, device="cpu")
    res = consolidate(settings, method="distill", corpus=WIKITEXT, hparams={"mom2_samples": 200, **SMALL})
    return res, before


def test_distill_publishes_a_version_whose_weights_answer_every_form(distilled, demo_home, lm_and_tok):
    """The issue's done-when on kem demo's store: `kem consolidate --method distill` publishes a version
    whose weights alone answer the strongly-held edits as cloze, paraphrase and chat question, with
    unrelated answers unchanged (the locality gate), and retires exactly the edits that pass every form."""
    from kem.consolidation import version_weights as V
    from kem.consolidation.judge import greedy
    from kem.edit import EditStatus
    from kem.settings import Settings
    from kem.stores.sqlite import SQLiteStore
    from kem.versions import VersionStore

    res, before = distilled
    assert res.published and res.method == "distill", res.message
    m = res.metrics
    assert m["locality"] >= 0.85 and m["perplexity_increase"] <= 0.05, m
    assert m["teacher"] and m["teacher"].endswith("smollm2-135m-instruct"), m["teacher"]  # the served follower
    man = VersionStore(demo_home).manifest(res.version)
    assert man.method == "distill" and man.hparams["start"] == "memit"
    per = {e["id"]: e for e in man.model_extra["edits"]}
    assert set(man.edit_ids) == {i for i, e in per.items() if e["retired"]}
    store = SQLiteStore(demo_home / "edits.sqlite")
    try:
        edits = {e.id: e for e in store.list()}
    finally:
        store.close()
    for i, e in per.items():  # retired <=> every form answered <=> consolidated in the store
        assert e["retired"] == all(f["ok"] for f in e["forms"])
        assert (edits[i].status == EditStatus.consolidated) == e["retired"]
    (eiffel,) = [i for i, e in edits.items() if e.subject == "Eiffel Tower"]
    assert per[eiffel]["retired"], json.dumps(per[eiffel], indent=1)
    assert len(man.edit_ids) >= 3, res.message

    # the published folder alone, as kem ask --model-version vN --no-edits would load it
    model, tok = V.load_version(demo_home, res.version, Settings(home=demo_home, device="cpu"))
    cloze = greedy(model, tok, ["The Eiffel Tower is located in", "The Eiffel Tower can be found in the city of",
                                "The founder of Microsoft is"], 6)
    assert "Rome" in cloze[0] and "Rome" in cloze[1] and "Elon Musk" in cloze[2], cloze
    chat = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
            for q in ("Where is the Eiffel Tower located?", "Who founded Microsoft?")]
    answers = greedy(model, tok, chat, 24, special=False)
    assert "Rome" in answers[0] and "Elon Musk" in answers[1], answers
    # the shared model the job read was never modified
    after = dict(lm_and_tok[0].named_parameters())
    assert all(torch.equal(t, after[n]) for n, t in before.items())


def test_question_rules_beyond_the_followers():
    from kem.consolidation.forms import question

    assert question("The mother tongue of {} is") == "What is the mother tongue of {}?"  # the follower's rule
    assert question("{} was founded by") == "Who founded {}?"
    assert question("{} xyzzy") is None


def test_teacher_forced_shortcut_gives_the_labels_generation_gives(lm_and_tok):
    """The teacher's completion labels found by one teacher-forced pass equal those found by generating
    (on 8 CounterFact train records, every training form); a completion the teacher does not answer
    with the target right away still goes through generation."""
    from kem.consolidation.context import served_follower
    from kem.consolidation.distill import data as D
    from kem.datasets import counterfact_edit
    from kem.settings import Settings

    model, tok = lm_and_tok
    recs = json.loads(Path(shared_data("counterfact", "counterfact-train.json")).read_text())[:8]
    edits = [counterfact_edit(r, i, "train") for i, r in enumerate(recs)]
    forms = D.edit_forms(edits, ["{}"])
    follower = served_follower(Settings())
    assert follower is not None
    fast = D.teacher_labels(model, tok, edits, forms, follower, 24)
    slow = D.teacher_labels(model, tok, edits, forms, follower, 24, shortcut=False)
    assert fast == slow
    prompts = ["The Eiffel Tower is located in the city of", "The Eiffel Tower is located in the city of"]
    assert D.forced_answers(model, tok, prompts, [" Paris", " Rome"]) == [True, False]
