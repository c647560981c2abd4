"""The consolidation job's options are declared once (issue 24): :class:`JobConfig` (and :class:`Gates` for
the thresholds) holds every option with its default and help; ``kem consolidate`` is checked against it
here (each option a field with the same default, each forwarded to that field); ``consolidate(...)``
takes the fields as they are and looks the method up once. No model is loaded.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

import kem.consolidation.job as job
from kem.consolidation.consolidate_cli import consolidate as cli_consolidate
from kem.consolidation.job import ConsolidationResult, Gates, JobConfig
from kem.consolidation.method_registry import MethodSpec, get_method
from kem.errors import ValidationError

#: ``kem consolidate`` options that are not job options: settings, output, and a shortcut for one
#: hyperparameter (``--cov-samples N`` is ``-H mom2_samples=N``).
CLI_ONLY = {"cov_samples", "home", "store", "as_json"}
#: Job options the CLI does not offer (progress bars follow ``--json``).
NOT_ON_CLI = {"probes", "progress", "gates.probe_tokens", "gates.chat_tokens"}

CONFIG = {f.name: f for f in fields(JobConfig)}
GATES = {f.name for f in fields(Gates)}


def _cli_defaults() -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(cli_consolidate).parameters.items()}


def test_every_cli_option_is_a_job_option_with_the_same_default():
    defaults = _cli_defaults()
    stray = set(defaults) - set(CONFIG) - GATES - CLI_ONLY
    assert not stray, f"kem consolidate options that are neither JobConfig nor Gates fields nor CLI-only: {stray}"
    covered = {n for n in defaults if n in CONFIG} | {f"gates.{n}" for n in defaults if n in GATES}
    declared = (set(CONFIG) - {"gates"}) | {f"gates.{n}" for n in GATES}
    assert declared - NOT_ON_CLI == covered, "a job option is missing from kem consolidate (or from NOT_ON_CLI)"
    # the CLI's defaults, read as the job reads them (None hparams: no overrides), are the declared ones
    from_cli = JobConfig(**{n: v for n, v in defaults.items() if n in CONFIG},
                         gates=Gates(**{n: v for n, v in defaults.items() if n in GATES}))
    for name in CONFIG:
        assert getattr(from_cli, name) == getattr(JobConfig(), name), f"kem consolidate's default for {name}"


def test_every_job_option_has_help():
    assert [n for n, f in CONFIG.items() if not f.metadata.get("help")] == []


def test_cli_forwards_each_option_to_its_field(tmp_path, monkeypatch):
    got: dict[str, Any] = {}

    def fake(settings: Any, config: JobConfig | None = None, **options: Any) -> ConsolidationResult:
        got.update(options)
        return ConsolidationResult(published=False, method="memit", message="not run")

    monkeypatch.setattr(job, "consolidate", fake)
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command()(cli_consolidate)
    r = CliRunner().invoke(app, ["--method", "memit", "--namespace", "alice", "--max-edits", "3", "--dry-run",
                                 "--from", "v2", "--min-reliability", "0.5", "--min-locality", "0.6",
                                 "--min-generalization", "0.1", "--max-perplexity-increase", "0.2",
                                 "--corpus", "x.txt", "--cov-samples", "100", "--batch-size", "8", "--max-rank", "4",
                                 "--all-or-nothing", "-H", "values.steps=3", "--home", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["message"] == "not run"
    cfg = JobConfig(**got)
    assert isinstance(cfg.method, MethodSpec) and cfg.method.name == "memit"  # looked up once, by the CLI
    assert (cfg.namespace, cfg.max_edits, cfg.dry_run, cfg.parent) == ("alice", 3, True, "v2")
    assert cfg.gates == Gates(0.5, 0.6, min_generalization=0.1, max_perplexity_increase=0.2)
    assert cfg.corpus == Path("x.txt") and (cfg.batch_size, cfg.max_rank, cfg.partial) == (8, 4, False)
    assert dict(cfg.hparams) == {"values": {"steps": 3}, "mom2_samples": 100}
    changed = {n for n in CONFIG if getattr(cfg, n) != getattr(JobConfig(), n)}
    assert changed == set(CONFIG) - NOT_ON_CLI, "an option of kem consolidate does not reach its JobConfig field"

    got.clear()  # a negative perplexity rise: not measured
    r = CliRunner().invoke(app, ["--max-perplexity-increase", "-1", "--home", str(tmp_path), "--json"])
    assert r.exit_code == 0 and JobConfig(**got).gates.max_perplexity_increase is None, r.output


def test_consolidate_takes_the_fields_and_looks_the_method_up_once(tmp_path, monkeypatch):
    from kem.settings import Settings

    settings = Settings(home=tmp_path, device="cpu")
    lookups: list[Any] = []
    ran: list[tuple[JobConfig, MethodSpec]] = []

    def counted(name: Any = None) -> MethodSpec:
        lookups.append(name)
        return get_method(name)

    monkeypatch.setattr(job, "get_method", counted)
    monkeypatch.setattr(job, "_run", lambda s, cfg, spec, still_held: ran.append((cfg, spec)))
    job.consolidate(settings, method="memit", namespace="alice", probes=["p"], hparams=None, gates=None)
    cfg, spec = ran[-1]
    assert lookups == ["memit"] and spec.name == "memit"
    assert cfg.probes == ("p",) and dict(cfg.hparams) == {} and cfg.gates == Gates()  # the API's old inputs
    job.consolidate(settings, JobConfig(method=spec, max_edits=2), dry_run=True)  # a config, plus overrides
    assert lookups == ["memit"] and ran[-1] == (JobConfig(method=spec, max_edits=2, dry_run=True), spec)

    with pytest.raises(ValidationError, match="max_rank"):
        job.consolidate(settings, max_rank=0)
    with pytest.raises(ValidationError, match="namespace"):
        job.consolidate(settings, namespace="no spaces")
    with pytest.raises(TypeError, match="nope"):
        job.consolidate(settings, nope=1)
    assert len(ran) == 2
