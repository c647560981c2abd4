"""Weight-editing methods (issue 4) on the real SmolLM2-135M-Instruct, on CPU.

Each method: one CounterFact edit changes the greedy answer and leaves unrelated prompts alone;
computing leaves the model bit-identical; apply + revert restores it exactly; deltas round-trip
through safetensors. MEMIT and AlphaEdit: a batch of 20; AlphaEdit keeps earlier sequential
batches better than MEMIT. Covariance uses a few hundred WikiText-2 texts, cached on disk.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pydantic
import pytest
import torch

from kem.consolidation.arch import ARCHITECTURES, arch_for
from kem.consolidation.context import EditContext
from kem.consolidation.delta import WeightDelta, apply_delta, delta_hooks
from kem.consolidation.method_registry import get_method, list_methods, register_method
from kem.edit import Edit
from kem.errors import ConflictError, ModelError

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("../shared/data")
WIKITEXT = DATA / "wikitext-2" / "valid.txt"
COUNTERFACT = DATA / "counterfact" / "counterfact-edit.json"
COV_SAMPLES = 200  # small, cached: enough for the tests (docs/consolidation.md measures more)
UNRELATED = ["The capital of France is", "The largest planet in the solar system is", "Water boils at"]
METHODS = ["rome", "memit", "alphaedit", "ft-l"]
FTL_CONSERVATIVE = {"lr": 5e-4, "norm_constraint": 5e-3, "steps": 25}


def _edits(n: int, start: int = 0) -> list[Edit]:
    recs = json.loads(COUNTERFACT.read_text())[start : start + n]
    return [
        Edit(subject=r["subject"], prompt=r["prompt"], target_new=r["target_new"], target_true=r["ground_truth"])
        for r in recs
    ]


@torch.no_grad()
def _greedy(model, tok, prompts: list[str], n: int = 4) -> list[str]:
    side = tok.padding_side
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    tok.padding_side = side
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def _hit_rate(model, tok, edits: list[Edit]) -> float:
    outs = _greedy(model, tok, [e.rendered_prompt for e in edits])
    return sum(o.strip().startswith(e.target_new) for o, e in zip(outs, edits, strict=True)) / len(edits)


def _hparams(name: str, model, **extra):
    spec = get_method(name)
    return spec, spec.hparams_for(model, **({} if name == "ft-l" else {"mom2_samples": COV_SAMPLES}), **extra)


# Batch tests edit only the bare prompt (no generated context prefixes): ~4x cheaper, and what they
# check (batch reliability, sequential retention) does not depend on the prefixes.
BARE = {"context_templates": 0}


@torch.no_grad()
def _target_prob(model, tok, edits: list[Edit]) -> float:
    """Mean over edits of the teacher-forced probability of ``target_new`` (geometric mean per token)."""
    probs = []
    for e in edits:
        p = tok(e.rendered_prompt, add_special_tokens=False)["input_ids"]
        t = tok(e.target_completion, add_special_tokens=False)["input_ids"]
        logp = torch.log_softmax(model(torch.tensor([p + t])).logits[0, len(p) - 1 : -1].float(), -1)
        probs.append(float(logp.gather(1, torch.tensor(t)[:, None]).mean().exp()))
    return sum(probs) / len(probs)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Generation-heavy module: one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def ctx(lm_and_tok) -> EditContext:
    """Shared caches; covariance of every layer the methods use, in one pass, pinned to the base model."""
    from kem.settings import Settings

    model, tok = lm_and_tok
    c = EditContext.from_cache_dir(Settings().cache_dir, corpus=WIKITEXT)
    c.pin_covariance(model)
    layers = sorted({*get_method("memit").hparams_for(model).layers, get_method("rome").hparams_for(model).layer})
    c.second_moments(model, tok, layers, COV_SAMPLES, 128, c.cov_fingerprint)
    return c


@pytest.fixture(scope="module")
def pristine(lm_and_tok) -> dict[str, torch.Tensor]:
    model, _ = lm_and_tok
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---- tables and plumbing (fast) --------------------------------------------------------------------
def test_arch_table(lm_and_tok):
    model, _ = lm_and_tok
    assert {"llama", "qwen2", "mistral", "gemma3", "gpt2"} <= set(ARCHITECTURES)
    spec = arch_for(model)
    assert spec.mlp_out == "mlp.down_proj"
    assert model.get_submodule(spec.layers)[0].mlp.down_proj.weight.shape == (576, 1536)
    assert ARCHITECTURES["gpt2"].transposed
    with pytest.raises(ModelError, match="model_type"):
        arch_for(type("C", (), {"model_type": "nope"})())


def test_registry():
    from kem.consolidation.method_registry import default_method
    from kem.eval.eval_methods import eval_methods

    assert set(METHODS) <= set(list_methods())
    assert set(METHODS) <= set(eval_methods())  # each registered its eval factory too
    assert default_method() == "memit" and get_method(None).name == "memit"
    assert get_method("alphaedit").state_cls.file_name == "alphaedit_state.safetensors"  # type: ignore[union-attr]
    assert get_method("rome").state_cls is None
    spec = get_method("rome")
    with pytest.raises(ConflictError, match="already registered"):
        register_method("rome", spec.hparams_cls, spec.compute)
    assert get_method("rome") is spec
    with pytest.raises(Exception, match="layer"):
        spec.hparams_cls(layer=-1)
    hp = spec.hparams_cls()
    with pytest.raises(pydantic.ValidationError):  # frozen
        hp.layer = 3  # type: ignore[misc]


def test_delta_exact_revert_hooks_and_round_trip(lm_and_tok, pristine, tmp_path):
    model, tok = lm_and_tok
    model = copy.deepcopy(model)
    name = arch_for(model).mlp_out_param(2)
    g = torch.Generator().manual_seed(0)
    d = WeightDelta(method="test")
    d.add(name, torch.randn(576, 2, generator=g) * 1e-2, torch.randn(2, 1536, generator=g) * 1e-2)
    ids = tok("Hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        with delta_hooks(model, d):
            hooked = model(ids).logits
        assert _same(model, pristine)
        handle = apply_delta(model, d)
        applied = model(ids).logits
        assert not _same(model, pristine)
        assert torch.allclose(hooked, applied, atol=1e-4)
        handle.revert()
    assert _same(model, pristine)
    back = WeightDelta.load(d.save(tmp_path / "d.safetensors"))
    assert back.method == "test" and torch.equal(back.updates[name].dense(), d.updates[name].dense())


# ---- each method on CounterFact case 0 -------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_single_edit(name, lm_and_tok, ctx, pristine, tmp_path):
    model, tok = lm_and_tok
    edit = _edits(1)[0]
    assert edit.rendered_prompt == "The mother tongue of Danielle Darrieux is"
    before = _greedy(model, tok, [edit.rendered_prompt, *UNRELATED])
    assert not before[0].strip().startswith("English")
    # FT-L's SmolLM2 preset matches EasyEdit's (unconstrained) FT-L in quality and, like it, moves
    # neighbours ("The largest planet in the solar system is" -> " Earth."); the locality-preserving
    # setting of docs/consolidation.md is the one that must keep unrelated outputs.
    spec, hp = _hparams(name, model, **(FTL_CONSERVATIVE if name == "ft-l" else {}))

    delta = spec.compute(model, tok, [edit], hp, ctx)
    assert _same(model, pristine), "compute must not change the model"

    edited = copy.deepcopy(model)
    handle = apply_delta(edited, delta)
    after = _greedy(edited, tok, [edit.rendered_prompt, *UNRELATED])
    assert after[0].strip().startswith("English"), after[0]
    assert after[1:] == before[1:]
    handle.revert()
    assert _same(edited, pristine), "revert must restore the weights exactly"

    path = delta.save(tmp_path / f"{name}.safetensors")
    loaded = WeightDelta.load(path)
    assert loaded.method == delta.method and loaded.meta["edit_ids"] == [edit.id]
    assert set(loaded.updates) == set(delta.updates)
    for key, f in delta.updates.items():
        assert torch.equal(loaded.updates[key].a, f.a)
        assert (f.b is None and loaded.updates[key].b is None) or torch.equal(loaded.updates[key].b, f.b)
    apply_delta(edited, loaded)
    assert _greedy(edited, tok, [edit.rendered_prompt])[0].strip().startswith("English")


# ---- batches ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["memit", "alphaedit"])
def test_batch_of_20(name, lm_and_tok, ctx, pristine):
    model, tok = lm_and_tok
    edits = _edits(20)
    before = _greedy(model, tok, UNRELATED)
    spec, hp = _hparams(name, model, **BARE)
    local = EditContext(covariance=ctx.covariance, templates=ctx.templates, corpus=ctx.corpus, cov_fingerprint=ctx.cov_fingerprint)
    delta = spec.compute(model, tok, edits, hp, local)
    assert _same(model, pristine)
    edited = copy.deepcopy(model)
    apply_delta(edited, delta)
    assert _hit_rate(edited, tok, edits) >= 0.85
    assert _greedy(edited, tok, UNRELATED) == before


@pytest.mark.slow
def test_sequential_alphaedit_keeps_earlier_batches_better_than_memit(lm_and_tok, ctx):
    model, tok = lm_and_tok
    batches = [_edits(10, start=20 + 10 * i) for i in range(5)]
    earlier = [e for b in batches[:-1] for e in b]
    scores = {}
    for name in ("memit", "alphaedit"):
        spec, hp = _hparams(name, model, **BARE)
        local = EditContext(covariance=ctx.covariance, templates=ctx.templates, corpus=ctx.corpus, cov_fingerprint=ctx.cov_fingerprint)
        edited = copy.deepcopy(model)
        for batch in batches:
            apply_delta(edited, spec.compute(edited, tok, batch, hp, local))
        scores[name] = (_target_prob(edited, tok, earlier), _hit_rate(edited, tok, earlier), _hit_rate(edited, tok, batches[-1]))
    # measured: MEMIT p=0.83 hit=0.95, AlphaEdit p=0.89 hit=0.975 on the 40 earlier edits
    assert scores["alphaedit"][0] > scores["memit"][0] + 0.02, scores
    assert scores["alphaedit"][1] >= scores["memit"][1], scores
    assert scores["alphaedit"][1] >= 0.8 and scores["alphaedit"][2] >= 0.8, scores


def test_ftl_preset_makes_the_edit(lm_and_tok, ctx):
    """The FT-L preset (lr = norm = 1e-2, 5 steps) carries CounterFact case 0 on prompt and in greedy output."""
    model, tok = lm_and_tok
    edit = _edits(1)[0]
    spec, hp = _hparams("ft-l", model)
    assert (hp.lr, hp.norm_constraint, hp.steps) == (1e-2, 1e-2, 5)
    delta = spec.compute(model, tok, [edit], hp, ctx)
    assert delta.meta["target_probs"][0] > 0.5
    edited = copy.deepcopy(model)
    apply_delta(edited, delta)
    assert _greedy(edited, tok, [edit.rendered_prompt])[0].strip().startswith("English")


def test_alphaedit_state_forgets_edits_but_keeps_projectors(tmp_path):
    from kem.consolidation.alphaedit.state import AlphaEditState

    st = AlphaEditState(projectors={3: torch.eye(4)})
    st.add_keys(3, torch.ones(2, 4))
    st.edits = 2
    assert torch.equal(st.past[3], torch.full((4, 4), 2.0, dtype=torch.float64))
    back = AlphaEditState.load(st.save(tmp_path / "s.safetensors") or tmp_path / "s.safetensors")
    assert back.edits == 2 and torch.equal(back.past[3], st.past[3]) and torch.equal(back.projectors[3], torch.eye(4))
    ctx = EditContext(state={"alphaedit": st, "other": object()})
    ctx.forget_edits()  # what the eval and the benchmark call between independent edits
    assert set(ctx.state) == {"alphaedit"}
    assert st.past == {} and st.edits == 0 and torch.equal(st.projectors[3], torch.eye(4))


def test_hparams_overrides_parse_and_merge_into_presets(lm_and_tok):
    from kem.consolidation.method_registry import parse_hparams

    assert parse_hparams(["layer=18", "values.edit_batch=4", "lr=1e-3", "x=true", "name=abc"]) == {
        "layer": 18, "values": {"edit_batch": 4}, "lr": 0.001, "x": True, "name": "abc"}
    for bad in ("novalue", "=3", "values.=3"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_hparams([bad])
    model, _ = lm_and_tok
    spec = get_method("memit")
    preset = spec.hparams_for(model)
    hp = spec.hparams_for(model, **parse_hparams(["values.edit_batch=2"]))
    assert preset.values.edit_batch != 2 and hp.values.edit_batch == 2 and hp.values.model_dump(exclude={"edit_batch"}) == preset.values.model_dump(exclude={"edit_batch"})
    assert hp.layers == preset.layers


def test_the_shipped_covariance_text_is_the_default_and_held_out(lm_and_tok, tmp_path):
    """With no corpus, the statistics read the WikiText-2 text kem ships (forward passes only, no
    sampling), never the perplexity gate's paragraphs; asking for more texts than it holds names
    mom2_samples; "model" still samples from the model."""
    from kem.consolidation.covariance import CovarianceCache, compute_second_moments, corpus_id, shipped_texts
    from kem.consolidation.judge import perplexity_texts
    from kem.errors import ValidationError

    texts = shipped_texts()
    assert len(texts) == 1000 and len(set(texts)) == 1000
    assert all(40 <= len(t.split()) <= 80 and "<unk>" not in t and "@-@" not in t for t in texts)
    gate = " ".join(perplexity_texts())
    assert not any(t in gate or t[:60] in gate for t in texts)  # the gate's paragraphs stay held out
    assert corpus_id(None).startswith("kem-text-") and corpus_id("model") == "model-samples"

    model, tok = lm_and_tok
    cache = CovarianceCache(tmp_path)
    got = cache.get(model, tok, [2], None, n_samples=6, max_tokens=32, progress=False)[2]
    want = compute_second_moments(model, tok, [2], texts[:6], 32, 16, False)[0][2]
    assert torch.allclose(got, want) and not list((tmp_path / "covariance").glob("*samples*"))
    with pytest.raises(ValidationError) as exc:
        cache.get(model, tok, [2], None, n_samples=1001, max_tokens=32, progress=False)
    assert exc.value.field == "mom2_samples"
    sampled = cache.get(model, tok, [2], "model", n_samples=2, max_tokens=32, progress=False)[2]
    assert not torch.allclose(sampled, got) and list((tmp_path / "covariance").glob("*samples-n2.json"))
