"""Read edits from files: CounterFact and ZsRE JSON (as in ../shared/data) and JSONL of kem edits.

Every record is validated; a malformed one raises :class:`kem.errors.DatasetFormatError` naming the
file, the record number and the field, and nothing is imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kem.edit import Edit
from kem.errors import DatasetFormatError, ValidationError


def _need(rec: Any, n: int, where: str, *fields: str) -> None:
    if not isinstance(rec, dict):
        raise DatasetFormatError(f"{where} record {n}: expected an object, got {type(rec).__name__}")
    for f in fields:
        if not isinstance(rec.get(f), str) or not rec[f].strip():
            raise DatasetFormatError(f"{where} record {n}: field {f!r} must be a non-empty string", field=f)


def counterfact_edit(rec: dict[str, Any], n: int = 0, where: str = "counterfact", namespace: str = "default",
                     with_paraphrase: bool = False) -> Edit:
    """One flat CounterFact record -> an Edit (the rephrase prompt is a probe, not a key, unless asked)."""
    _need(rec, n, where, "prompt", "subject", "target_new")
    data = {
        "subject": rec["subject"], "prompt": rec["prompt"], "target_new": rec["target_new"],
        "target_true": rec.get("ground_truth"), "namespace": namespace,
        "source": f"counterfact:{rec.get('case_id', n)}",
        "paraphrases": [rec["rephrase_prompt"]] if with_paraphrase and rec.get("rephrase_prompt") else [],
    }
    if rec.get("locality_prompt"):
        data["locality"] = [{"prompt": rec["locality_prompt"], "answer": rec.get("locality_ground_truth")}]
    return _edit(data, n, where)


def zsre_edit(rec: dict[str, Any], n: int = 0, where: str = "zsre", namespace: str = "default",
              with_paraphrase: bool = False) -> Edit:
    """One ZsRE record (``src`` -> ``alt``) -> an Edit; the question is the prompt."""
    _need(rec, n, where, "src", "subject", "alt")
    prompt = rec["src"]
    if rec["subject"] not in prompt and "{}" not in prompt:
        # ZsRE questions almost always name their subject; keep the few that don't usable.
        prompt = f"{prompt} ({{}})"
    data = {
        "subject": rec["subject"], "prompt": prompt, "target_new": rec["alt"], "namespace": namespace,
        "target_true": (rec.get("answers") or [None])[0] if isinstance(rec.get("answers"), list) else None,
        "source": f"zsre:{n}",
        "paraphrases": [rec["rephrase"]] if with_paraphrase and rec.get("rephrase") else [],
    }
    if rec.get("loc"):
        data["locality"] = [{"prompt": rec["loc"], "answer": rec.get("loc_ans")}]
    return _edit(data, n, where)


def _edit(data: dict[str, Any], n: int, where: str) -> Edit:
    try:
        return Edit.parse(data)
    except ValidationError as exc:
        raise DatasetFormatError(f"{where} record {n}: {exc}", field=exc.field) from None


def detect_format(records: list[Any]) -> str:
    first = records[0] if records else {}
    if isinstance(first, dict):
        if "src" in first and "alt" in first:
            return "zsre"
        if "target_new" in first and "prompt" in first and "subject" in first:
            return "kem" if "rephrase_prompt" not in first and "ground_truth" not in first else "counterfact"
    raise DatasetFormatError("cannot tell the file's format: expected CounterFact (prompt, subject, target_new, "
                             "ground_truth), ZsRE (src, subject, alt) or kem edits (subject, prompt, target_new)")


def edits_from_file(path: str | Path, namespace: str = "default", limit: int | None = None) -> list[Edit]:
    """Read every record of ``path`` into Edits (all validated before any is returned)."""
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"file {str(path)!r} does not exist", field="file")
    text = path.read_text(encoding="utf-8")
    where = path.name
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DatasetFormatError(f"{where} line {n}: not JSON ({exc.msg})") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{where}: not JSON ({exc.msg} at line {exc.lineno})") from None
        if isinstance(records, dict) and isinstance(records.get("records"), list):
            records = records["records"]
        if not isinstance(records, list):
            raise DatasetFormatError(f"{where}: expected a list of records")
    if not records:
        raise DatasetFormatError(f"{where}: no records")
    records = records[:limit] if limit is not None else records
    fmt = detect_format(records)
    if fmt == "counterfact":
        return [counterfact_edit(r, n, where, namespace) for n, r in enumerate(records)]
    if fmt == "zsre":
        return [zsre_edit(r, n, where, namespace) for n, r in enumerate(records)]
    out = []
    for n, r in enumerate(records):
        if not isinstance(r, dict):
            raise DatasetFormatError(f"{where} record {n}: expected an object")
        out.append(_edit({"namespace": namespace, **r}, n, where))
    return out
