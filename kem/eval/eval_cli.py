"""``kem eval``: the Typer command. Mount it in ``kem/cli.py`` with
``app.command("eval")(eval_command)``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

log = logging.getLogger(__name__)


def eval_command(
    method: str = typer.Option("ike", "--method", "-m",
                               help="Method(s), comma-separated: none, ike, adapter, rome, memit, alphaedit, ft-l, distill (several share the model)."),
    dataset: str = typer.Option("counterfact", "--dataset", "-d",
                                help="counterfact, zsre, mquake, or the path of a file in one of those formats."),
    n: int = typer.Option(200, "--n", "-n", min=1, help="Number of cases."),
    seed: int | None = typer.Option(None, "--seed", help="Sample cases with this seed (default: the first N)."),
    mode: str = typer.Option("single", "--mode", help="single: each case's edits alone; batch: all N edits at once; "
                             "sequential: the edits applied --seq-batch cases at a time, each on top of the last, scored at the end."),
    seq_batch: int = typer.Option(1, "--seq-batch", min=1, help="Cases per group in sequential mode."),
    hparams: list[str] = typer.Option([], "--hparams", "-H", help="KEY=VALUE overrides of the weight-editing "
                                      "methods' hyperparameters (repeatable; dots reach nested ones), e.g. -H layer=18 -H values.steps=10."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder for results.json, results.md and plots "
                                    "(default: KEM_HOME/eval/<time>-<methods>-<dataset>-n<N>-<mode>, where the "
                                    "console's Evaluation page lists runs)."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Folder of the named datasets "
                                         "(default: $KEM_EVAL_DATA, i.e. Settings.eval_data, or ../shared/data)."),
    cloze_tokens: int = typer.Option(16, help="Greedy budget for cloze prompts (stops at a newline)."),
    chat_tokens: int = typer.Option(32, help="Greedy budget for chat answers."),
    fluency_cases: int = typer.Option(50, help="Cases whose reliability continuation is scored for fluency."),
    engine: str = typer.Option("cached", help="cached (one prefill per request) or served (the generator's generate)."),
    adapter: Path | None = typer.Option(None, "--adapter", help="Edit-follower folder for --method adapter "
                                        "(default: $KEM_FOLLOWER, i.e. the one kem ships for the model)."),
    strict: bool = typer.Option(False, "--strict", help="Refuse a dataset with an invalid record "
                                "(default: skip invalid records, say how many and why, evaluate the rest)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Evaluate knowledge-editing methods: generation, EasyEdit and CounterFact protocols, scope.

    Invalid dataset records are skipped and reported (record index, field, reason) unless --strict.
    Errors print ``error: ...`` and exit 2 (``kem.cli_support.run_app``)."""
    from kem.datasets import read_cases
    from kem.errors import KemError

    if mode not in ("single", "batch", "sequential"):
        raise typer.BadParameter("must be single, batch or sequential", param_hint="--mode")
    if out is None:
        out = default_out(method, dataset, n, mode)
    loaded = read_cases(dataset, n=n, seed=seed, data_dir=data_dir)  # before the models: bad data fails fast
    if strict:
        loaded.check()
    if loaded.errors:
        typer.secho(loaded.summary(), fg=typer.colors.YELLOW, err=True)
    # kem/__init__.py sets OMP_WAIT_POLICY=PASSIVE before torch loads. Measured here on 2 busy cores:
    # one SmolLM2-135M decode step at batch 16 took 7.0 s with spinning OpenMP threads, 0.39 s passive.
    from kem.consolidation.method_registry import parse_hparams
    from kem.eval.harness import EvalConfig
    from kem.eval.report import markdown_table
    from kem.eval.run import run_eval

    try:
        overrides = parse_hparams(hparams)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--hparams") from None
    try:
        cfg = EvalConfig(mode=mode, seq_batch=seq_batch, cloze_tokens=cloze_tokens, chat_tokens=chat_tokens,
                         fluency_cases=fluency_cases, engine=engine)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    options: dict[str, Any] = {}
    if overrides:
        options["consolidation"] = {"hparams": overrides}
    if adapter is not None:
        options["adapter"] = {"path": adapter}
    try:
        res = run_eval(method, dataset, n=n, seed=seed, mode=mode, out=out, cases=loaded, config=cfg,
                       progress=not quiet, options=options or None)
    except ValueError as exc:  # a method's hyperparameters refused (pydantic): one message, not a traceback
        if isinstance(exc, KemError):
            raise
        raise KemError(str(exc)) from exc
    typer.echo(markdown_table(res["summary"], f"{dataset} n={res['config']['n']} {mode}"))
    edit_s = ", ".join(f"{m} {v:.0f} s" for m, v in res.get("edit_s", {}).items())
    typer.echo(f"wall time {res['wall_s']:.0f} s (CPU {res['cpu_s']:.0f} s; editing: {edit_s}); wrote {out / 'results.json'}")
    if loaded.errors:
        typer.echo(f"evaluated {len(loaded.items)} cases; skipped {len(loaded.errors)} invalid records "
                   "(listed under 'skipped' in results.json)")


def default_out(method: str, dataset: str, n: int, mode: str) -> Path:
    """``KEM_HOME/eval/<UTC time>-<methods>-<dataset>-n<N>-<mode>`` (a dataset path by its file name)."""
    import re
    from datetime import UTC, datetime

    from kem.settings import Settings

    name = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{method.replace(',', '+')}-{Path(dataset).stem}-n{n}-{mode}"
    return Path(Settings().home) / "eval" / re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def main() -> None:  # pragma: no cover - `python -m kem.eval.eval_cli`
    from kem.cli_support import run_app

    app = typer.Typer(add_completion=False)
    app.command()(eval_command)
    run_app(app)


if __name__ == "__main__":  # pragma: no cover
    main()
