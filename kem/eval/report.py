"""Writing a run out: ``results.json`` (summary + every per-case record), ``results.md`` (tables),
and PNG plots (metric bars per method; scope-score histograms in vs out of scope)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Rows of the markdown table, by protocol: (summary key, label).
TABLE: dict[str, list[tuple[str, str]]] = {
    "Generation (greedy; headline)": [
        ("generation.reliability", "reliability (contains new)"),
        ("generation.reliability_em", "reliability (exact match)"),
        ("generation.generalization", "generalization (contains)"),
        ("generation.generalization_em", "generalization (exact match)"),
        ("generation.locality", "locality (answer unchanged)"),
        ("generation.portability", "portability (contains)"),
    ],
    "EasyEdit teacher-forced token accuracy": [
        ("easyedit.reliability", "reliability"),
        ("easyedit.generalization", "generalization"),
        ("easyedit.locality", "locality (vs. pre-edit argmax)"),
        ("easyedit.portability", "portability"),
    ],
    "ROME/MEMIT CounterFact probability tests": [
        ("counterfact.efficacy", "efficacy success (ES)"),
        ("counterfact.paraphrase", "paraphrase success (PS)"),
        ("counterfact.neighborhood", "neighborhood success (NS)"),
        ("counterfact.score", "score (harmonic mean)"),
    ],
    "Scope decision": [
        ("scope.precision", "precision"),
        ("scope.recall", "recall"),
        ("scope.false_positive_rate", "false-positive rate (locality probes)"),
    ],
    "Fluency": [("fluency.ngram_entropy", "n-gram entropy (bits, ROME weights)"),
                ("fluency.measured", "continuations long enough to measure (>= 5 words)")],
}
_RAW = {"fluency.ngram_entropy"}  # not a percentage


def _clean(v: Any) -> Any:
    """JSON-safe: NaN -> None, recursively."""
    if isinstance(v, float):
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def fmt(key: str, v: float | None) -> str:
    """A table cell: percent with one decimal (raw for fluency); ``n/a`` when missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.2f}" if key in _RAW else f"{100 * v:.1f}"


def markdown_table(summary: dict[str, dict[str, float | None]], title: str = "") -> str:
    """One table per protocol section, one column per method (percent unless noted)."""
    methods = list(summary)
    lines = [f"### {title}", ""] if title else []
    header = "| metric | " + " | ".join(methods) + " |"
    sep = "|---|" + "---:|" * len(methods)
    for section, rows in TABLE.items():
        present = [(k, lbl) for k, lbl in rows if any(fmt(k, summary[m].get(k)) != "n/a" for m in methods)]
        if not present:
            continue
        lines += [f"**{section}**", "", header, sep]
        for k, lbl in present:
            lines.append(f"| {lbl} | " + " | ".join(fmt(k, summary[m].get(k)) for m in methods) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_metrics(summary: dict[str, dict[str, float | None]], path: Path, title: str = "") -> None:
    """Grouped bars: the headline metrics of each protocol, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for rows in list(TABLE.values())[:3] for k, _ in rows
            if not k.endswith("_em") and any(summary[m].get(k) is not None and not
                                             math.isnan(float(summary[m][k])) for m in summary)]  # type: ignore[arg-type]
    methods = list(summary)
    fig, ax = plt.subplots(figsize=(min(13.0, max(6.0, 0.3 * len(keys) * max(1, len(methods)) + 2)), 4.2))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        vals = [100 * float(summary[m].get(k) or 0.0) if summary[m].get(k) is not None else 0.0 for k in keys]
        ax.bar([i + j * width for i in range(len(keys))], vals, width, label=m)
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(keys))])
    ax.set_xticklabels(keys, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 120)  # room for the legend above the 100% bars
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=min(len(methods), 6), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scope(scope: dict[str, tuple[Sequence[float], Sequence[float]]], path: Path, title: str = "") -> bool:
    """Histograms of retrieval scores: own edit on in-scope probes vs best edit on locality probes.
    Returns False (no file) when no method has a scope decision."""
    scope = {m: v for m, v in scope.items() if v[0] or v[1]}
    if not scope:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scope), figsize=(5.0 * len(scope), 3.6), squeeze=False)
    bins = [i / 40 for i in range(-8, 41)]
    for ax, (m, (ins, outs)) in zip(axes[0], scope.items(), strict=True):
        ax.hist(list(ins), bins=bins, alpha=0.6, label=f"in scope (n={len(ins)})")
        ax.hist(list(outs), bins=bins, alpha=0.6, label=f"out of scope (n={len(outs)})")
        ax.set_xlabel("cosine similarity")
        ax.set_title(f"{m} {title}".strip(), fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(results: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md``, ``metrics.png`` and ``scope.png`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = results["config"]
    title = f"{cfg['dataset']} n={cfg['n']} {cfg['mode']}"
    paths = {"json": out / "results.json", "md": out / "results.md", "metrics_png": out / "metrics.png"}
    paths["json"].write_text(json.dumps(_clean(results), indent=1, ensure_ascii=False), encoding="utf-8")
    summary = {m: r for m, r in results["summary"].items()}
    md = [f"# kem eval: {title}", "", f"model: `{cfg['model']}`; methods: {', '.join(summary)}; "
          f"wall time {results['wall_s']:.0f} s", "", markdown_table(summary)]
    paths["md"].write_text("\n".join(md) + "\n", encoding="utf-8")
    plot_metrics(summary, paths["metrics_png"], title)
    scope = {m: (v["in"], v["out"]) for m, v in results["scope_scores"].items()}
    if plot_scope(scope, out / "scope.png", title):
        paths["scope_png"] = out / "scope.png"
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths
