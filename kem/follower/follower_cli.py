"""``kem follower ...``: train and inspect the edit-follower adapter."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

follower_app = typer.Typer(no_args_is_help=True, help="Train and inspect the edit-follower (a LoRA on the served model).")


@follower_app.command("train")
def train(
    out: Annotated[Path, typer.Option("--out", help="Adapter folder to write.")],
    data: Annotated[Path, typer.Option("--data", help="CounterFact TRAIN split (flat format).")] = Path(
        "../shared/data/counterfact/counterfact-train.json"),
    model: Annotated[str | None, typer.Option("--model", help="Base model (default: $KEM_MODEL).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimiser steps (0: one pass over the examples).")] = 0,
    records: Annotated[int, typer.Option("--records", help="Training records used.")] = 1200,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 16,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank.")] = 8,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads (default: all cores).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore a checkpoint left by an interrupted run.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Train the edit-follower on the CounterFact train split; resumes an interrupted run with the same options."""
    import torch

    from kem.follower.follower_registry import embedding_fingerprint
    from kem.follower.train import TrainConfig, train_follower
    from kem.models import load_causal_lm
    from kem.settings import Settings

    if threads:
        torch.set_num_threads(threads)
    s = Settings()
    name = model or s.model
    cfg = TrainConfig(records=records, steps=steps, batch_size=batch_size, lr=lr, rank=rank, seed=seed)
    lm, tok = load_causal_lm(name, s.cache_dir, device=s.resolved_device())
    res = train_follower(lm, tok, data, out, cfg, base_model_id=embedding_fingerprint(lm),
                         command=shlex.join(["kem", *sys.argv[1:]]), progress=not as_json, resume=not fresh)
    row = {"out": str(res.out), "steps": res.steps, "examples": res.examples, "seconds": round(res.seconds, 1),
           "final_loss": round(sum(res.losses[-10:]) / max(1, len(res.losses[-10:])), 4)}
    if as_json:
        typer.echo(json.dumps(row))
    else:
        typer.echo(f"wrote {res.out}: {res.examples} examples, {res.steps} steps, {res.seconds:.0f} s, "
                   f"final loss {row['final_loss']}")


@follower_app.command("show")
def show(
    path: Annotated[Path | None, typer.Argument(help="Adapter folder (default: the one for $KEM_MODEL).")] = None,
) -> None:
    """Print an adapter's manifest."""
    from kem.errors import NotFoundError
    from kem.follower.follower_registry import default_adapter_dir
    from kem.settings import Settings

    p = path or default_adapter_dir(Settings().model)
    if p is None or not (Path(p) / "manifest.json").exists():
        raise NotFoundError(f"no edit-follower adapter at {p} (train one: kem follower train --out DIR)")
    typer.echo((Path(p) / "manifest.json").read_text(encoding="utf-8"))
