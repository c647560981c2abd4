"""Evaluation datasets (CounterFact, ZsRE, MQuAKE, kem edits as JSONL) -> kem edits and probes.

Every loader validates its records and raises :class:`kem.errors.DatasetFormatError` naming the
record index and the field. Nothing here imports torch: ``kem edit import FILE`` uses
:func:`edits_from_file` on machines without a model.

Formats (field names of one record):

- ``counterfact``: EasyEdit's flat CounterFact (``case_id, prompt, target_new, subject,
  ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth``).
- ``zsre``: EasyEdit's ZsRE eval file (``subject, src, alt, rephrase, loc, loc_ans`` and optional
  ``answers``, ``portability: {"New Question", "New Answer"}``).
- ``mquake``: MQuAKE (``case_id, requested_rewrite: [...], questions, new_answer, new_answer_alias``).
- ``kem``: one kem :class:`~kem.edit.Edit` per line (JSONL) or a JSON list of them.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kem.edit import Edit, LocalityProbe
from kem.errors import DatasetFormatError, ValidationError

log = logging.getLogger(__name__)

#: Dataset names -> file under the data folder (``../shared/data`` beside the repository by default).
KNOWN_DATASETS: dict[str, str] = {
    "counterfact": "counterfact/counterfact-edit.json",
    "zsre": "zsre/zsre_mend_eval_portability_gpt4.json",
    "mquake": "mquake/MQuAKE-hard.json",
}
FORMATS = ("counterfact", "zsre", "mquake", "kem")


@dataclass(frozen=True)
class Probe:
    """One question asked of the (edited) model.

    Attributes:
        text: The prompt: a cloze (``"The mother tongue of X is"``) or a question.
        target: The expected answer (the new target; for locality the dataset's answer).
        chat: Whether generation goes through the chat template (questions) or plain completion (clozes).
        aliases: Other accepted answers for the generation protocol.
    """

    text: str
    target: str
    chat: bool = False
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvalCase:
    """The edits of one dataset record and the probes that test them.

    Attributes:
        case_id: Stable id (``"counterfact:0"``).
        edits: The kem edits to apply (no probe text in them: paraphrases stay unseen).
        reliability: The edit prompts themselves (expect ``target_new``).
        generalization: Paraphrases (expect ``target_new``).
        locality: Unrelated prompts; scored against the pre-edit model's answer.
        portability: Questions whose answer follows from the edit (ZsRE portability, MQuAKE multi-hop).
        target_new: The new object of the (first) edit, for the probability tests.
        target_true: The old object, when known: enables the CounterFact probability tests.
    """

    case_id: str
    edits: tuple[Edit, ...]
    reliability: tuple[Probe, ...]
    generalization: tuple[Probe, ...] = ()
    locality: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    target_new: str = ""
    target_true: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# ---- record validation ---------------------------------------------------------------------------
def _err(where: str, i: int, fld: str, msg: str) -> DatasetFormatError:
    return DatasetFormatError(f"{where} record {i}: field {fld!r} {msg}", field=f"[{i}].{fld}")


def _str(rec: dict[str, Any], fld: str, where: str, i: int, *, required: bool = True) -> str | None:
    if fld not in rec or rec[fld] is None:
        if required:
            raise _err(where, i, fld, "is missing")
        return None
    v = rec[fld]
    if not isinstance(v, str) or not v.strip():
        raise _err(where, i, fld, f"must be a non-empty string (got {v!r:.80})")
    return v.strip()


def _dict(rec: Any, where: str, i: int) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise DatasetFormatError(f"{where} record {i}: must be a JSON object (got {type(rec).__name__})",
                                 field=f"[{i}]")
    return rec


def _edit(where: str, i: int, **kw: Any) -> Edit:
    try:
        return Edit.parse(kw)
    except ValidationError as exc:
        raise DatasetFormatError(f"{where} record {i}: {exc}", field=f"[{i}].{exc.field or ''}") from None


# ---- the formats ------------------------------------------------------------------------------------
def counterfact_case(rec: dict[str, Any], i: int, where: str = "counterfact") -> EvalCase:
    """One flat CounterFact record -> its case."""
    rec = _dict(rec, where, i)
    cid = rec.get("case_id", i)
    subject = _str(rec, "subject", where, i)
    prompt = _str(rec, "prompt", where, i)
    new = _str(rec, "target_new", where, i)
    true = _str(rec, "ground_truth", where, i)
    rephrase = _str(rec, "rephrase_prompt", where, i, required=False)
    loc = _str(rec, "locality_prompt", where, i, required=False)
    loc_ans = _str(rec, "locality_ground_truth", where, i, required=False) or true
    assert subject and prompt and new
    edit = _edit(where, i, id=f"cf-{cid}", subject=subject, prompt=prompt, target_new=new,
                 target_true=true, source=f"counterfact:{cid}")
    return EvalCase(
        case_id=f"counterfact:{cid}",
        edits=(edit,),
        reliability=(Probe(edit.rendered_prompt, new),),
        generalization=(Probe(rephrase, new),) if rephrase else (),
        locality=(Probe(loc, loc_ans or ""),) if loc else (),
        target_new=new,
        target_true=true,
    )


def zsre_case(rec: dict[str, Any], i: int, where: str = "zsre") -> EvalCase:
    """One EasyEdit ZsRE record -> its case (questions: generation uses the chat template)."""
    rec = _dict(rec, where, i)
    subject = _str(rec, "subject", where, i)
    src = _str(rec, "src", where, i)
    alt = _str(rec, "alt", where, i)
    rephrase = _str(rec, "rephrase", where, i, required=False)
    loc = _str(rec, "loc", where, i, required=False)
    loc_ans = _str(rec, "loc_ans", where, i, required=loc is not None)
    answers = rec.get("answers")
    if answers is not None and (not isinstance(answers, list) or not all(isinstance(a, str) for a in answers)):
        raise _err(where, i, "answers", f"must be a list of strings (got {answers!r:.80})")
    true = answers[0].strip() if answers and answers[0].strip() else None
    port: tuple[Probe, ...] = ()
    p = rec.get("portability")
    if p is not None:
        if not isinstance(p, dict):
            raise _err(where, i, "portability", f"must be an object (got {p!r:.80})")
        q = _str(p, "New Question", where, i)
        a = _str(p, "New Answer", where, i)
        assert q and a
        port = (Probe(q, a, chat=True),)
    assert subject and src and alt
    edit = _edit(where, i, id=f"zsre-{i}", subject=subject, prompt=src, target_new=alt, target_true=true,
                 source=f"zsre:{i}")
    return EvalCase(
        case_id=f"zsre:{i}",
        edits=(edit,),
        reliability=(Probe(src, alt, chat=True),),
        generalization=(Probe(rephrase, alt, chat=True),) if rephrase else (),
        locality=(Probe(loc, loc_ans or "", chat=True),) if loc else (),
        portability=port,
        target_new=alt,
        target_true=None,  # ZsRE has no counterfactual pair: no probability tests
    )


def _mq_obj(rw: Any, fld: str, where: str, i: int) -> str:
    v = rw.get(fld) if isinstance(rw, dict) else None
    s = v.get("str") if isinstance(v, dict) else None
    if not isinstance(s, str) or not s.strip():
        raise _err(where, i, f"requested_rewrite.{fld}.str", f"must be a non-empty string (got {v!r:.80})")
    return s.strip()


def mquake_case(rec: dict[str, Any], i: int, where: str = "mquake") -> EvalCase:
    """One MQuAKE record -> its case: every requested rewrite is an edit; the multi-hop questions
    (answer: ``new_answer`` or an alias) are the portability probes. MQuAKE has no locality probes."""
    rec = _dict(rec, where, i)
    cid = rec.get("case_id", i)
    rws = rec.get("requested_rewrite")
    if not isinstance(rws, list) or not rws:
        raise _err(where, i, "requested_rewrite", "must be a non-empty list")
    edits, rel, gen = [], [], []
    for j, rw in enumerate(rws):
        if not isinstance(rw, dict):
            raise _err(where, i, f"requested_rewrite[{j}]", "must be an object")
        subject = _str(rw, "subject", where, i)
        prompt = _str(rw, "prompt", where, i)
        new, true = _mq_obj(rw, "target_new", where, i), _mq_obj(rw, "target_true", where, i)
        q = _str(rw, "question", where, i, required=False)
        assert subject and prompt
        e = _edit(where, i, id=f"mq-{cid}-{j}", subject=subject, prompt=prompt, target_new=new,
                  target_true=true, relation=rw.get("relation_id") or None, source=f"mquake:{cid}")
        edits.append(e)
        rel.append(Probe(e.rendered_prompt, new))
        if q:
            gen.append(Probe(q, new, chat=True))
    questions = rec.get("questions")
    if not isinstance(questions, list) or not all(isinstance(q, str) and q.strip() for q in questions):
        raise _err(where, i, "questions", "must be a list of non-empty strings")
    answer = _str(rec, "new_answer", where, i)
    aliases = rec.get("new_answer_alias") or []
    if not isinstance(aliases, list):
        raise _err(where, i, "new_answer_alias", "must be a list of strings")
    assert answer
    port = tuple(Probe(q.strip(), answer, chat=True, aliases=tuple(str(a) for a in aliases)) for q in questions)
    return EvalCase(f"mquake:{cid}", tuple(edits), tuple(rel), tuple(gen), (), port,
                    target_new=edits[0].target_new, target_true=None)


def kem_case(rec: dict[str, Any], i: int, where: str = "kem") -> EvalCase:
    """A kem edit (JSON) -> a case: its prompt, paraphrases (generalization) and locality probes.
    The paraphrases are removed from the edit that is applied, so they stay unseen probes."""
    rec = _dict(rec, where, i)
    e = _edit(where, i, **rec)
    applied = e.model_copy(update={"paraphrases": [], "locality": []})
    return EvalCase(
        case_id=f"kem:{e.id}",
        edits=(applied,),
        reliability=(Probe(e.rendered_prompt, e.target_new),),
        generalization=tuple(Probe(p, e.target_new) for p in e.paraphrases),
        locality=tuple(Probe(p.prompt, p.answer or "") for p in e.locality),
        target_new=e.target_new,
        target_true=e.target_true,
    )


_CASE_FNS = {"counterfact": counterfact_case, "zsre": zsre_case, "mquake": mquake_case, "kem": kem_case}


# ---- files ------------------------------------------------------------------------------------------
def default_data_dir() -> Path:
    """Where named datasets live: ``$KEM_EVAL_DATA`` if set, else ``../shared/data`` (relative to the
    working directory, then to the repository), else ``shared/data``."""
    env = os.environ.get("KEM_EVAL_DATA")
    if env:
        return Path(env).expanduser()
    here = Path(__file__).resolve().parents[2]
    for cand in (Path("../shared/data"), here.parent / "shared" / "data", Path("shared/data")):
        if cand.is_dir():
            return cand
    return Path("../shared/data")


def resolve_dataset(name_or_path: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None) -> Path:
    """A dataset name (``counterfact``, ``zsre``, ``mquake``) or a file path -> the file."""
    key = str(name_or_path).lower()
    if key in KNOWN_DATASETS:
        path = Path(data_dir) if data_dir is not None else default_data_dir()
        path = path / KNOWN_DATASETS[key]
    else:
        path = Path(os.fspath(name_or_path)).expanduser()
    if not path.is_file():
        raise DatasetFormatError(
            f"dataset {str(name_or_path)!r}: no file at {path} (give one of {', '.join(KNOWN_DATASETS)} "
            "with the data folder in $KEM_EVAL_DATA, or the path of a file in one of those formats)",
            field="dataset")
    return path


def read_records(path: str | os.PathLike[str]) -> list[Any]:
    """Records of a JSON list or a JSONL file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{path}: not valid JSON ({exc})", field="file") from None
        return list(data)
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{path} line {n}: not valid JSON ({exc})", field=f"line {n}") from None
    return records


def detect_format(records: Sequence[Any], where: str = "dataset") -> str:
    """Guess the format from the first record's fields."""
    if not records:
        raise DatasetFormatError(f"{where} has no records", field="file")
    first = records[0]
    if not isinstance(first, dict):
        raise DatasetFormatError(f"{where} record 0: must be a JSON object", field="[0]")
    keys = set(first)
    if "requested_rewrite" in keys:
        return "mquake"
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"ground_truth", "target_new"} <= keys or "rephrase_prompt" in keys:
        return "counterfact"
    if {"subject", "prompt", "target_new"} <= keys:
        return "kem"
    raise DatasetFormatError(
        f"{where}: cannot tell the format from the fields of record 0 ({', '.join(sorted(keys))[:200]}); "
        f"expected one of {', '.join(FORMATS)}", field="[0]")


def load_cases(dataset: str | os.PathLike[str], n: int | None = None, seed: int | None = None,
               data_dir: str | os.PathLike[str] | None = None, fmt: str | None = None) -> list[EvalCase]:
    """Load evaluation cases.

    Args:
        dataset: A name (``counterfact``, ``zsre``, ``mquake``) or the path of a file in one of the formats.
        n: How many cases (all when None).
        seed: None: the first ``n`` records in file order (CounterFact case ids 0.. as in the papers);
            an int: a seeded random sample of ``n`` records.
        data_dir: Folder for named datasets (default :func:`default_data_dir`).
        fmt: Force a format instead of detecting it.
    """
    path = resolve_dataset(dataset, data_dir)
    records = read_records(path)
    fmt = fmt or detect_format(records, str(path))
    if fmt not in _CASE_FNS:
        raise DatasetFormatError(f"unknown dataset format {fmt!r} (known: {', '.join(FORMATS)})", field="format")
    idx = list(range(len(records)))
    if seed is not None:
        random.Random(seed).shuffle(idx)
    if n is not None:
        if n < 1:
            raise ValidationError(f"n must be >= 1 (got {n})", field="n")
        idx = idx[:n]
    fn = _CASE_FNS[fmt]
    cases = [fn(records[i], i, str(path)) for i in idx]
    log.info("loaded %d %s cases from %s", len(cases), fmt, path)
    return cases


def edits_from_file(path: str | os.PathLike[str], fmt: str | None = None, namespace: str | None = None,
                    with_paraphrases: bool = False) -> list[Edit]:
    """Every edit of a CounterFact / ZsRE / MQuAKE file, or of a JSONL (or JSON list) of kem edits.

    Imported dataset edits carry the dataset's locality probes (a consolidation gate can use them).
    The dataset's paraphrases are generalization *probes*: they become the edit's ``paraphrases``
    (which are retrieval keys) only with ``with_paraphrases=True``; do not evaluate generalization
    on edits imported that way.

    Raises:
        DatasetFormatError: naming the record index and field of the first malformed record.
    """
    path = Path(path)
    records = read_records(path)
    fmt = fmt or detect_format(records, str(path))
    out: list[Edit] = []
    for i, rec in enumerate(records):
        if fmt == "kem":
            e = _edit(str(path), i, **_dict(rec, str(path), i))
        else:
            case = _CASE_FNS[fmt](rec, i, str(path))
            for e in case.edits[:-1]:
                out.append(e)
            e = case.edits[-1]
            if len(case.edits) == 1:
                e = e.model_copy(update={
                    "paraphrases": [p.text for p in case.generalization][:32] if with_paraphrases else [],
                    "locality": [LocalityProbe(prompt=p.text, answer=p.target or None) for p in case.locality][:32],
                })
        if namespace is not None:
            e = _edit(str(path), i, **{**e.model_dump(), "namespace": namespace})
        out.append(e)
    return out
