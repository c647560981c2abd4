"""Weight deltas as peft LoRA adapters (issue 15, items 1 and 3) on the real SmolLM2-135M-Instruct:
the adapter loaded by peft on the base model gives the merged weights' logits and greedy answers, on
the edited prompts and on unrelated ones; truncation reports its true error; the tenant's adapter and the
shipped edit-follower combine into one adapter that computes exactly their sum."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from kem.consolidation.context import EditContext
from kem.consolidation.delta import Factors, WeightDelta, apply_delta
from kem.consolidation.lora_export import combine_loras, export_lora, lora_factors, read_lora
from kem.consolidation.method_registry import get_method
from kem.edit import Edit

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("../shared/data")
WIKITEXT = DATA / "wikitext-2" / "valid.txt"
COUNTERFACT = DATA / "counterfact" / "counterfact-edit.json"
UNRELATED = ["The capital of France is", "The largest planet in the solar system is", "Water boils at"]
FAST = {"mom2_samples": 200, "context_templates": 0}  # the cached statistics of tests/test_consolidation.py


def _edits(idx: list[int]) -> list[Edit]:
    recs = json.loads(COUNTERFACT.read_text())
    return [Edit(subject=recs[i]["subject"], prompt=recs[i]["prompt"], target_new=recs[i]["target_new"],
                 target_true=recs[i]["ground_truth"]) for i in idx]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Generation-heavy module: one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def deltas(lm_and_tok) -> dict[str, tuple[WeightDelta, list[Edit]]]:
    """ROME on CounterFact case 0, MEMIT on cases 0-2 (bare prompts, cached covariance)."""
    from kem.settings import Settings

    model, tok = lm_and_tok
    ctx = EditContext.from_cache_dir(Settings().cache_dir, corpus=WIKITEXT)
    ctx.pin_covariance(model)
    out = {}
    for name, idx in (("rome", [0]), ("memit", [0, 1, 2])):
        spec = get_method(name)
        edits = _edits(idx)
        out[name] = (spec.compute(model, tok, edits, spec.hparams_for(model, **FAST), ctx), edits)
    return out


@torch.no_grad()
def _logits_and_greedy(model, tok, prompts: list[str], n: int = 6) -> tuple[list[torch.Tensor], list[str]]:
    logits, answers = [], []
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        logits.append(model(**ids).logits[0].float())
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        answers.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return logits, answers


@pytest.mark.parametrize("name", ["rome", "memit"])
def test_adapter_on_the_base_model_reproduces_the_merged_weights(name, deltas, lm_and_tok, tmp_path):
    from peft import PeftModel

    model, tok = lm_and_tok
    delta, edits = deltas[name]
    exp = export_lora(delta, tmp_path / "adapter", base_model="smollm2-135m-instruct", max_rank=16)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and sorted(cfg["target_modules"]) == sorted(n[: -len(".weight")] for n in delta.updates)
    want_rank = 1 if name == "rome" else len(edits)
    assert {m.rank for m in exp.modules} == {want_rank} and not exp.truncated and exp.max_rel_error < 1e-6
    assert exp.nbytes < 2e-3 * sum(p.numel() * 4 for p in model.parameters())  # well under 1% of the checkpoint

    prompts = [e.rendered_prompt for e in edits] + UNRELATED
    merged = copy.deepcopy(model)
    apply_delta(merged, delta)
    ref_logits, ref_answers = _logits_and_greedy(merged, tok, prompts)
    del merged
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "adapter")).eval()
    logits, answers = _logits_and_greedy(peft_model, tok, prompts)
    diff = max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits, strict=True))
    assert diff < 2e-3, diff
    assert answers == ref_answers
    assert all(e.target_new in a for e, a in zip(edits, answers[: len(edits)], strict=True)), answers
    # the tiny-model's own behaviour: some probes do move under the edit, the same with both (above)
    assert not any(m._forward_hooks for m in model.modules())  # the shared model stays bare


def test_truncation_reports_its_true_error_and_dense_updates_factorise(deltas):
    delta, edits = deltas["memit"]
    name, f = next(iter(sorted(delta.updates.items())))
    dense = f.dense().double()
    b, a, full, err = lora_factors(f, max_rank=1)
    assert full == len(edits) and a.shape == (1, dense.shape[1]) and b.shape == (dense.shape[0], 1)
    measured = float((dense - (b @ a).double()).norm() / dense.norm())
    assert 0.0 < err < 1.0 and abs(measured - err) < 1e-4 * max(err, 1e-3), (err, measured)
    # a dense update (FT-L's form) of rank 3: exact at rank >= 3, and its factors are balanced
    b3, a3, full3, err3 = lora_factors(Factors(f.dense()), max_rank=8)
    assert full3 == len(edits) and err3 < 1e-6 and torch.allclose(b3 @ a3, f.dense(), atol=1e-6)
    assert torch.allclose(b3.norm(dim=0), a3.norm(dim=1), rtol=1e-3)
    with pytest.raises(Exception, match="max_rank"):
        lora_factors(f, max_rank=0)
    bad = WeightDelta({"model.norm.bias": Factors(torch.zeros(3))})
    with pytest.raises(Exception, match="module weights only"):
        export_lora(bad, "/nonexistent", base_model="x")


def test_combined_adapter_answers_consolidated_and_pending_edits(deltas, lm_and_tok, tmp_path):
    """The tenant's ROME adapter (Danielle Darrieux -> English, consolidated) and the shipped edit-follower
    in one LoRA: exactly their sum (peft over the base == the follower's hooks over the merged weights),
    the consolidated fact answered with no edit in the prompt, a pending one through the fast path's prompt."""
    from peft import PeftModel

    from kem.compose import follower_completion
    from kem.follower.follower_registry import default_adapter_dir
    from kem.follower.lora import LoraHooks

    model, tok = lm_and_tok
    follower = default_adapter_dir("smollm2-135m-instruct")
    assert follower is not None
    delta, (edit,) = deltas["rome"]
    export_lora(delta, tmp_path / "tenant", base_model="smollm2-135m-instruct")
    both = combine_loras([tmp_path / "tenant", follower], tmp_path / "combined", base_model="smollm2-135m-instruct")
    parts = read_lora(both)
    f_parts, t_parts = read_lora(follower), read_lora(tmp_path / "tenant")
    assert set(parts) == set(f_parts) | set(t_parts)  # the union of target modules (layer 5 + layers 10-29)
    # a module in both parts gets the ranks concatenated: the adapter twice is twice the update
    twice = read_lora(combine_loras([tmp_path / "tenant"] * 2, tmp_path / "twice", base_model="m"))
    ((mod, (b2, a2)),) = twice.items()
    assert a2.shape[0] == 2 and torch.allclose(b2 @ a2, 2 * delta.updates[mod + ".weight"].dense(), atol=1e-6)

    pending = follower_completion("The Eiffel Tower is located in", ["The Eiffel Tower is located in Rome."])
    prompts = [edit.rendered_prompt, pending]
    merged = copy.deepcopy(model)
    apply_delta(merged, delta)
    with LoraHooks(merged, follower).active():
        ref_logits, ref_answers = _logits_and_greedy(merged, tok, prompts)
    del merged
    served = PeftModel.from_pretrained(copy.deepcopy(model), str(both)).eval()
    logits, answers = _logits_and_greedy(served, tok, prompts)
    diff = max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits, strict=True))
    assert diff < 2e-3, diff
    assert answers == ref_answers
    assert "English" in answers[0] and "Rome" in answers[1], answers


def test_adapter_rank_reads_the_largest_module_rank(tmp_path):
    """The vLLM engine refuses an adapter above its max_lora_rank by this rank (combined adapters carry
    per-module ranks in rank_pattern, above ``r``)."""
    from kem.adapters.vllm import adapter_rank

    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"r": 8, "rank_pattern": {"model.layers.29.mlp.down_proj": 72, "model.layers.3.mlp.down_proj": 1}}))
    assert adapter_rank(tmp_path) == 72
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 16}))
    assert adapter_rank(tmp_path) == 16
