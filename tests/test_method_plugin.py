"""A consolidation method registered from this file alone (issue 11: method plug-ins).

The toy method adds a tiny rank-one update to one MLP matrix and keeps a running state (the number of
edits it has made). Registered here, it runs through the consolidation job (its state is saved with the
published version and loaded by the next job) and through ``kem eval``'s method lookup, without a line
of kem changed; a name taken twice is refused.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from kem.consolidation.arch import arch_for
from kem.consolidation.delta import WeightDelta
from kem.consolidation.job import Gates, JobConfig, consolidate
from kem.consolidation.method_registry import (
    get_method,
    list_methods,
    method_specs,
    register_method,
    unregister_method,
)
from kem.edit import Edit
from kem.errors import ConflictError, NotFoundError, ValidationError
from kem.eval.eval_methods import EvalContext, build_method, eval_methods

NAME = "toy-plugin"
BREAK = "a target whose update wrecks the model"
SEEN: list[int] = []  # the state's edit count each compute call found (before adding its own)


class ToyHParams(BaseModel):
    """One matrix, one scale."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layer: int = Field(3, ge=0, description="Block whose MLP output matrix gets the update.")
    scale: float = Field(1e-4, description="Every entry of the update.")


@dataclass
class ToyState:
    """Edits made so far (a method's running state, like AlphaEdit's past keys)."""

    file_name: ClassVar[str] = "toy_state.json"
    edits: int = 0

    def forget_edits(self) -> None:
        self.edits = 0

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"edits": self.edits}))

    @classmethod
    def load(cls, path: str | Path) -> ToyState:
        return cls(**json.loads(Path(path).read_text()))


def compute_toy(model: Any, tok: Any, edits: Sequence[Edit], hparams: ToyHParams, ctx: Any) -> WeightDelta:
    """``scale * ones`` on layer ``layer``'s MLP output matrix; the model is not touched."""
    state = ctx.state.setdefault(NAME, ToyState())
    SEEN.append(state.edits)
    state.edits += len(edits)
    name = arch_for(model).mlp_out_param(hparams.layer)
    rows, cols = dict(model.named_parameters())[name].shape
    delta = WeightDelta(method=NAME, meta={"edit_ids": [e.id for e in edits]})
    scale = 1.0 if any(e.target_new == BREAK for e in edits) else hparams.scale  # BREAK: wrecks the model
    delta.add(name, torch.full((rows, 1), scale), torch.ones(1, cols))
    return delta


@pytest.fixture(scope="module")
def toy():
    """The toy method, registered for this module only."""
    spec = register_method(NAME, ToyHParams, compute_toy, {"smollm2-135m": {"layer": 4}}, state_cls=ToyState)
    yield spec
    unregister_method(NAME)
    assert NAME not in list_methods() and NAME not in eval_methods()


def _edit(namespace: str = "default", target: str = "English") -> Edit:
    return Edit(subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new=target,
                namespace=namespace)


def test_registered_everywhere_and_duplicates_refused(toy):
    assert get_method(NAME) is toy and toy in method_specs() and NAME in eval_methods()
    assert toy.state_cls is ToyState and toy.eval_factory is not None
    with pytest.raises(ConflictError, match=f"{NAME!r} is already registered"):
        register_method(NAME, ToyHParams, compute_toy)
    with pytest.raises(ConflictError, match="already registered as a kem eval method"):
        register_method("ike", ToyHParams, compute_toy)  # an eval method's name: refused, nothing half-registered
    assert "ike" not in list_methods()

    class NoFile:
        pass

    with pytest.raises(ValidationError, match="file_name"):
        register_method("toy-without-file", ToyHParams, compute_toy, state_cls=NoFile)  # type: ignore[arg-type]
    with pytest.raises(NotFoundError, match="toy-without-file"):
        get_method("toy-without-file")
    with pytest.raises(NotFoundError):
        unregister_method("toy-without-file")


def test_eval_lookup_applies_and_reverts(toy, lm_and_tok):
    model, tok = lm_and_tok
    ctx = EvalContext(generator=SimpleNamespace(model=copy.deepcopy(model), tokenizer=tok))
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    method = build_method(NAME, ctx)
    assert method.name == NAME and method.modifies_model
    prepared = method.prepare_sequence([[_edit()], [_edit()]])  # type: ignore[attr-defined]
    param = arch_for(model).mlp_out_param(4)  # the model's preset picked layer 4
    assert not torch.equal(ctx.model.state_dict()[param], before[param])
    prepared.close()
    assert all(torch.equal(v, before[k]) for k, v in ctx.model.state_dict().items())


def test_job_runs_it_and_carries_its_state(toy, tmp_path):
    from kem.settings import Settings
    from kem.stores.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "edits.sqlite")
    store.add_many([_edit()])
    store.close()
    settings = Settings(home=tmp_path, device="cpu")
    kw: dict[str, Any] = {"method": NAME, "probes": ["The capital of France is"],
                          "gates": Gates(min_reliability=0.0, min_locality=0.0, probe_tokens=2)}
    SEEN.clear()
    first = consolidate(settings, **kw)
    assert first.published and first.version == "v1" and first.method == NAME, first.message
    second = consolidate(settings, dry_run=True, **kw)  # builds on v1: its saved state is loaded
    assert not second.published and second.parent == "v1"
    assert SEEN == [0, 1]  # v1's job started from nothing; the next one found v1's edit in the state


def test_job_config_is_frozen_and_validated():
    cfg = JobConfig(method=NAME, hparams={"layer": 2})
    with pytest.raises(FrozenInstanceError):
        cfg.batch_size = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.hparams["layer"] = 5  # type: ignore[index]
    with pytest.raises(ValidationError, match="batch_size"):
        JobConfig(batch_size=0)
    with pytest.raises(ValidationError, match="max_edits"):
        JobConfig(max_edits=0)


@pytest.mark.parametrize(("partial", "batch_size"), [(True, 1), (True, 3), (False, 1)])
def test_a_chunk_that_breaks_the_gates_waits_for_a_later_job(toy, tmp_path, partial, batch_size):
    """partial (the default): chunk by chunk within the gates; a chunk that would break locality is taken
    back with its state and its halves tried (batch 3: [ok, BREAK] + [ok] -> [ok] + [BREAK] + [ok]); the
    edit that breaks it and the later ones stay active. --all-or-nothing: the job is refused."""
    from kem.edit import EditStatus
    from kem.settings import Settings
    from kem.stores.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "edits.sqlite")
    first, breaking, last = store.add_many([_edit(), _edit(target=BREAK), _edit(target="French")],
                                           on_conflict="keep")
    settings = Settings(home=tmp_path, device="cpu")
    probes = ["The capital of France is", "The largest planet is", "Water is made of"]
    res = consolidate(settings, method=NAME, probes=probes, batch_size=batch_size, partial=partial, max_edits=3,
                      gates=Gates(min_reliability=0.0, min_locality=0.9, probe_tokens=3, max_perplexity_increase=None))
    if not partial:
        assert not res.published and any("locality" in r for r in res.reasons), res.message
        return
    assert res.published and res.version == "v1", res.message
    assert res.edit_ids == [first.id] and res.deferred_ids == [breaking.id, last.id]
    assert res.metrics["locality"] == 1.0 and res.metrics["deferred"] == 2
    assert res.metrics["deferred_because"].startswith("one more edit: locality")
    assert "2 more left for a later job (one more edit: locality" in res.message
    saved = json.loads((tmp_path / "models" / "v1" / ToyState.file_name).read_text())
    assert saved == {"edits": 1}  # the taken-back chunk's state went with it
    manifest = json.loads((tmp_path / "models" / "v1" / "manifest.json").read_text())
    assert manifest["deferred_edit_ids"] == [breaking.id, last.id]
    assert {store.get(i).status for i in (breaking.id, last.id)} == {EditStatus.active}
    store.close()


def test_when_not_one_edit_fits_the_gates_refuse_with_every_reason(toy, tmp_path):
    """Every edit breaks locality: the first chunk is judged whole, and the refusal names the gate."""
    from kem.settings import Settings
    from kem.stores.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "edits.sqlite")
    store.add_many([_edit(target=BREAK), _edit(target=BREAK)], on_conflict="keep")
    store.close()
    res = consolidate(Settings(home=tmp_path, device="cpu"), method=NAME, probes=["The capital of France is"],
                      batch_size=2, gates=Gates(min_reliability=0.0, min_locality=0.9, probe_tokens=3,
                                                max_perplexity_increase=None))
    assert not res.published and any(r.startswith("locality") for r in res.reasons), res.message
    assert len(res.edit_ids) == 2 and res.deferred_ids == []


def test_eval_loads_the_plugins_settings_name(tmp_path, monkeypatch, caplog):
    """KEM_METHOD_PLUGINS: a module named there registers its methods when kem eval starts; one that cannot
    load is a warning, not a silent gap."""
    import logging
    import sys

    from kem.eval.eval_methods import unregister_eval_method
    from kem.eval.run import register_optional_methods
    from kem.settings import Settings

    (tmp_path / "my_kem_plugin.py").write_text(
        "from kem.eval.eval_methods import NoneMethod, register_eval_method\n"
        "register_eval_method('my-plugin-method', NoneMethod)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("KEM_METHOD_PLUGINS", "kem.consolidation.builtin_methods, my_kem_plugin, no_such_plugin_here")
    try:
        with caplog.at_level(logging.WARNING, logger="kem.eval.run"):
            register_optional_methods(Settings())
        assert "my-plugin-method" in eval_methods() and "memit" in eval_methods()
        assert any("no_such_plugin_here" in r.getMessage() for r in caplog.records)
    finally:
        unregister_eval_method("my-plugin-method")
        sys.modules.pop("my_kem_plugin", None)
