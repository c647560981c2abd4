"""Dataset and edit files -> kem edits and evaluation cases: the one reader behind ``kem edit import``,
``kem eval`` and the benchmarks. Imports no torch.

Formats (field names of one record):

- ``kem``: one kem :class:`~kem.edit.Edit` per line (JSONL) or a JSON list of them.
- ``counterfact``: EasyEdit's flat CounterFact (``case_id, prompt, target_new, subject,
  ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth``).
- ``zsre``: EasyEdit's ZsRE eval file (``subject, src, alt, rephrase, loc, loc_ans`` and optional
  ``answers``, ``portability: {"New Question", "New Answer"}``).
- ``mquake``: MQuAKE (``case_id, requested_rewrite: [...], questions, new_answer, new_answer_alias``).

A file is a JSON list, a JSON object ``{"records": [...]}`` or JSONL. Readers return :class:`Loaded`:
the good results plus one :class:`RecordError` (record index, field, message) per invalid record, so a
caller can skip bad records (what ``kem eval`` and ``kem edit import`` do by default) or refuse the
file (:meth:`Loaded.check`, ``--strict``). A problem with the file itself (missing, not JSON, format
unknown, no valid record at all) raises :class:`~kem.errors.DatasetFormatError`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from kem.edit import NAMESPACE_RE, Edit, LocalityProbe
from kem.errors import DatasetFormatError, ValidationError
from kem.settings import Settings

log = logging.getLogger(__name__)

#: Dataset names -> file under the data folder (``Settings.eval_data``, else ``../shared/data``).
KNOWN_DATASETS: dict[str, str] = {
    "counterfact": "counterfact/counterfact-edit.json",
    "zsre": "zsre/zsre_mend_eval_portability_gpt4.json",
    "mquake": "mquake/MQuAKE-hard.json",
}
FORMATS = ("counterfact", "zsre", "mquake", "kem")

T = TypeVar("T")


# ---- what the readers return ------------------------------------------------------------------------
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


@dataclass(frozen=True)
class RecordError:
    """Why one record was not used.

    Attributes:
        index: The record's position in the file (0-based; JSONL: the n-th non-empty line).
        field: The record's field at fault (``"alt"``, ``"requested_rewrite[0].target_new.str"``;
            ``""`` for the record as a whole).
        message: What is wrong, naming the field (``"field 'alt' must be a non-empty string (got '')"``).
    """

    index: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"record {self.index}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "field": self.field, "message": self.message}


@dataclass(frozen=True)
class Loaded(Generic[T]):
    """The result of reading a file: the good items and one error per invalid record.

    Attributes:
        items: Edits (:func:`read_edits`) or cases (:func:`read_cases`) of the valid records.
        errors: The invalid records among those read, in reading order.
        fmt: The file's format (one of :data:`FORMATS`).
        path: The file.
        records: How many records were read (valid and invalid).
    """

    items: list[T]
    errors: list[RecordError]
    fmt: str
    path: Path
    records: int

    def check(self) -> Loaded[T]:
        """``self`` when every record read was valid; else raise for the first invalid one.

        Raises:
            DatasetFormatError: naming the file, the record index and the field.
        """
        if self.errors:
            e = self.errors[0]
            more = f" ({len(self.errors) - 1} more invalid records)" if len(self.errors) > 1 else ""
            raise DatasetFormatError(f"{self.path} {e}{more}", field=f"[{e.index}].{e.field}".rstrip("."))
        return self

    def summary(self, reasons: int = 3) -> str:
        """One line for people: how many records were skipped and the first few reasons."""
        if not self.errors:
            return f"read {self.records} records of {self.path.name}"
        first = "; ".join(str(e) for e in self.errors[:reasons])
        rest = f"; and {len(self.errors) - reasons} more" if len(self.errors) > reasons else ""
        return (f"skipped {len(self.errors)} invalid of {self.records} records of {self.path.name}: "
                f"{first}{rest}")


# ---- record validation ------------------------------------------------------------------------------
class _Invalid(Exception):
    """A record is unusable: caught per record and turned into a :class:`RecordError`."""

    def __init__(self, fld: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = fld, message


def _bad(fld: str, msg: str) -> _Invalid:
    return _Invalid(fld, f"field {fld!r} {msg}")


@dataclass(frozen=True)
class _Unparsable:
    """A JSONL line that is not JSON (an invalid record, not a broken file)."""

    line: int
    msg: str


def _dict(rec: Any) -> dict[str, Any]:
    if isinstance(rec, _Unparsable):
        raise _Invalid("", f"line {rec.line} is not valid JSON ({rec.msg})")
    if not isinstance(rec, dict):
        raise _Invalid("", f"must be a JSON object (got {type(rec).__name__})")
    return rec


def _str(rec: dict[str, Any], fld: str, *, required: bool = True, label: str | None = None) -> str | None:
    label = label or fld
    if rec.get(fld) is None:
        if required:
            raise _bad(label, "is missing")
        return None
    v = rec[fld]
    if not isinstance(v, str) or not v.strip():
        raise _bad(label, f"must be a non-empty string (got {v!r:.80})")
    return v.strip()


def _need(rec: dict[str, Any], fld: str, label: str | None = None) -> str:
    v = _str(rec, fld, label=label)
    assert v is not None
    return v


def _edit(names: dict[str, str], **kw: Any) -> Edit:
    """``Edit.parse(kw)``; a refusal names the record's field (``names``: Edit field -> record field)."""
    try:
        return Edit.parse(kw)
    except ValidationError as exc:
        raise _Invalid(names.get(exc.field or "", exc.field or ""), str(exc)) from None


# ---- the formats: one record -> one case ---------------------------------------------------------------
_CF_NAMES = {"target_true": "ground_truth"}
_ZSRE_NAMES = {"prompt": "src", "target_new": "alt", "target_true": "answers"}


def _counterfact(rec: Any, i: int) -> EvalCase:
    rec = _dict(rec)
    cid = rec.get("case_id", i)
    subject, prompt, new = _need(rec, "subject"), _need(rec, "prompt"), _need(rec, "target_new")
    true = _need(rec, "ground_truth")
    rephrase = _str(rec, "rephrase_prompt", required=False)
    loc = _str(rec, "locality_prompt", required=False)
    loc_ans = _str(rec, "locality_ground_truth", required=False)
    edit = _edit(_CF_NAMES, id=f"cf-{cid}", subject=subject, prompt=prompt, target_new=new, target_true=true,
                 source=f"counterfact:{cid}")
    return EvalCase(
        case_id=f"counterfact:{cid}",
        edits=(edit,),
        reliability=(Probe(edit.rendered_prompt, new),),
        generalization=(Probe(rephrase, new),) if rephrase else (),
        locality=(Probe(loc, loc_ans or true),) if loc else (),
        target_new=new,
        target_true=true,
        meta={"locality_answer": loc_ans},
    )


def _zsre(rec: Any, i: int) -> EvalCase:
    rec = _dict(rec)
    subject, src, alt = _need(rec, "subject"), _need(rec, "src"), _need(rec, "alt")
    rephrase = _str(rec, "rephrase", required=False)
    loc = _str(rec, "loc", required=False)
    loc_ans = _str(rec, "loc_ans", required=loc is not None)
    answers = rec.get("answers")
    if answers is not None and (not isinstance(answers, list) or not all(isinstance(a, str) for a in answers)):
        raise _bad("answers", f"must be a list of strings (got {answers!r:.80})")
    true = answers[0].strip() if answers and answers[0].strip() else None
    port: tuple[Probe, ...] = ()
    p = rec.get("portability")
    if p is not None:
        if not isinstance(p, dict):
            raise _bad("portability", f"must be an object (got {p!r:.80})")
        q = _need(p, "New Question", "portability.New Question")
        a = _need(p, "New Answer", "portability.New Answer")
        port = (Probe(q, a, chat=True),)
    # ZsRE questions almost always name their subject; keep the few that don't usable.
    prompt = src if subject in src or "{}" in src else f"{src} ({{}})"
    edit = _edit(_ZSRE_NAMES, id=f"zsre-{i}", subject=subject, prompt=prompt, target_new=alt, target_true=true,
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
        meta={"locality_answer": loc_ans},
    )


def _mq_obj(rw: dict[str, Any], fld: str, j: int) -> str:
    v = rw.get(fld)
    s = v.get("str") if isinstance(v, dict) else None
    if not isinstance(s, str) or not s.strip():
        raise _bad(f"requested_rewrite[{j}].{fld}.str", f"must be a non-empty string (got {v!r:.80})")
    return s.strip()


def _mquake(rec: Any, i: int) -> EvalCase:
    """Every requested rewrite is an edit; the multi-hop questions (answer: ``new_answer`` or an
    alias) are the portability probes. MQuAKE has no locality probes."""
    rec = _dict(rec)
    cid = rec.get("case_id", i)
    rws = rec.get("requested_rewrite")
    if not isinstance(rws, list) or not rws:
        raise _bad("requested_rewrite", "must be a non-empty list")
    edits, rel, gen = [], [], []
    for j, rw in enumerate(rws):
        at = f"requested_rewrite[{j}]"
        if not isinstance(rw, dict):
            raise _bad(at, "must be an object")
        subject, prompt = _need(rw, "subject", f"{at}.subject"), _need(rw, "prompt", f"{at}.prompt")
        new, true = _mq_obj(rw, "target_new", j), _mq_obj(rw, "target_true", j)
        q = _str(rw, "question", required=False, label=f"{at}.question")
        names = {"subject": f"{at}.subject", "prompt": f"{at}.prompt", "target_new": f"{at}.target_new.str",
                 "target_true": f"{at}.target_true.str", "relation": f"{at}.relation_id"}
        e = _edit(names, id=f"mq-{cid}-{j}", subject=subject, prompt=prompt, target_new=new, target_true=true,
                  relation=rw.get("relation_id") or None, source=f"mquake:{cid}")
        edits.append(e)
        rel.append(Probe(e.rendered_prompt, new))
        if q:
            gen.append(Probe(q, new, chat=True))
    questions = rec.get("questions")
    if not isinstance(questions, list) or not all(isinstance(q, str) and q.strip() for q in questions):
        raise _bad("questions", "must be a list of non-empty strings")
    answer = _need(rec, "new_answer")
    aliases = rec.get("new_answer_alias") or []
    if not isinstance(aliases, list):
        raise _bad("new_answer_alias", "must be a list of strings")
    port = tuple(Probe(q.strip(), answer, chat=True, aliases=tuple(str(a) for a in aliases)) for q in questions)
    return EvalCase(f"mquake:{cid}", tuple(edits), tuple(rel), tuple(gen), (), port,
                    target_new=edits[0].target_new, target_true=None)


def _kem(rec: Any, i: int) -> EvalCase:
    """A kem edit -> a case: its prompt, paraphrases (generalization) and locality probes. The
    paraphrases are removed from the edit that is applied, so they stay unseen probes."""
    e = _edit({}, **{"id": f"kem-{i}", **_dict(rec)})
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


_CASE_FNS: dict[str, Callable[[Any, int], EvalCase]] = {
    "counterfact": _counterfact, "zsre": _zsre, "mquake": _mquake, "kem": _kem,
}


def _record_edits(fmt: str, rec: Any, i: int, namespace: str | None, with_paraphrases: bool) -> list[Edit]:
    """The edits to import from one record. A kem record keeps its id and its own namespace
    (``namespace`` fills it in when the record names none); dataset records get fresh ids (the
    provenance is in ``source``), the namespace, and their locality probes; their paraphrases become
    retrieval keys only with ``with_paraphrases``."""
    if fmt == "kem":
        rec = _dict(rec)
        return [_edit({}, **({"namespace": namespace, **rec} if namespace is not None else rec))]
    case = _CASE_FNS[fmt](rec, i)
    extra: dict[str, Any] = {}
    if namespace is not None:
        extra["namespace"] = namespace
    if len(case.edits) == 1:
        extra["paraphrases"] = [p.text for p in case.generalization][:32] if with_paraphrases else []
        extra["locality"] = [LocalityProbe(prompt=p.text, answer=case.meta.get("locality_answer"))
                             for p in case.locality][:32]
    return [_edit({}, **{**e.model_dump(exclude={"id"}), **extra}) for e in case.edits]


# ---- files ------------------------------------------------------------------------------------------
def default_data_dir(settings: Settings | None = None) -> Path:
    """Where named datasets live: ``settings.eval_data`` (``$KEM_EVAL_DATA``) if set, else
    ``../shared/data`` (relative to the working directory, then to the repository), else ``shared/data``."""
    if settings is None:  # the environment's (KEM_EVAL_DATA)
        settings = Settings()
    if settings.eval_data is not None:
        return Path(settings.eval_data).expanduser()
    repo = Path(__file__).resolve().parents[1]
    for cand in (Path("../shared/data"), repo.parent / "shared" / "data", Path("shared/data")):
        if cand.is_dir():
            return cand
    return Path("../shared/data")


def resolve_dataset(name_or_path: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None,
                    settings: Settings | None = None) -> Path:
    """A dataset name (``counterfact``, ``zsre``, ``mquake``) or a file path -> the file.

    Raises:
        DatasetFormatError: when there is no such file (``field="dataset"``).
    """
    key = str(name_or_path).lower()
    if key in KNOWN_DATASETS:
        folder = Path(data_dir) if data_dir is not None else default_data_dir(settings)
        path = folder / KNOWN_DATASETS[key]
    else:
        path = Path(os.fspath(name_or_path)).expanduser()
    if not path.is_file():
        raise DatasetFormatError(
            f"dataset {str(name_or_path)!r}: no file at {path} (give one of {', '.join(KNOWN_DATASETS)} "
            "with the data folder in $KEM_EVAL_DATA or --data-dir, or the path of a file in one of the "
            f"formats {', '.join(FORMATS)})", field="dataset")
    return path


def read_records(path: str | os.PathLike[str]) -> list[Any]:
    """The records of a JSON list, a JSON ``{"records": [...]}`` object or a JSONL file. A JSONL line
    that is not JSON stays in the list as an invalid record (the readers report and skip it).

    Raises:
        DatasetFormatError: the file is missing, unreadable, or a JSON document of another shape.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"no file at {path}", field="file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"{path}: cannot read it ({exc})", field="file") from None
    head = text.lstrip()[:1]
    if head in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if head == "[":
                raise DatasetFormatError(f"{path}: not valid JSON ({exc})", field="file") from None
        else:
            if isinstance(data, list):
                return data
            if isinstance(data, dict):
                return list(data["records"]) if isinstance(data.get("records"), list) else [data]
    records: list[Any] = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                records.append(_Unparsable(n, exc.msg))
    return records


def detect_format(records: Sequence[Any], where: str = "dataset") -> str:
    """Guess the format from the fields of the first record that is a JSON object.

    Raises:
        DatasetFormatError: no records, or fields of no known format.
    """
    first = next((r for r in records if isinstance(r, dict)), None)
    if first is None:
        raise DatasetFormatError(f"{where} has no records (JSON objects)", field="file")
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
        f"{where}: cannot tell the format from the fields of the first record ({', '.join(sorted(keys))[:200]}); "
        f"expected one of {', '.join(FORMATS)}", field="file")


def _read(path: Path, records: list[Any], fmt: str | None, order: Iterable[int] | None, want: int | None,
          build: Callable[[str, Any, int], list[T]]) -> Loaded[T]:
    """Build items from ``records`` (of ``path``) in ``order``, skipping (and noting) invalid records,
    until ``want`` records were used."""
    fmt = fmt or detect_format(records, str(path))
    if fmt not in _CASE_FNS:
        raise DatasetFormatError(f"unknown dataset format {fmt!r} (known: {', '.join(FORMATS)})", field="format")
    items: list[T] = []
    errors: list[RecordError] = []
    used = read = 0
    for i in order if order is not None else range(len(records)):
        if want is not None and used >= want:
            break
        read += 1
        try:
            items.extend(build(fmt, records[i], i))
            used += 1
        except _Invalid as exc:
            errors.append(RecordError(i, exc.field, exc.message))
    if not items:
        why = f"; first: {errors[0]}" if errors else ""
        raise DatasetFormatError(f"{path}: none of its {read} records is valid{why}",
                                 field=f"[{errors[0].index}].{errors[0].field}".rstrip(".") if errors else "file")
    log.info("read %d %s records of %s (%d invalid)", read, fmt, path, len(errors))
    return Loaded(items, errors, fmt, path, read)


def read_cases(dataset: str | os.PathLike[str], n: int | None = None, seed: int | None = None, *,
               data_dir: str | os.PathLike[str] | None = None, fmt: str | None = None,
               settings: Settings | None = None) -> Loaded[EvalCase]:
    """Evaluation cases of a dataset, and the invalid records skipped on the way.

    Args:
        dataset: A name (``counterfact``, ``zsre``, ``mquake``) or the path of a file in one of the formats.
        n: How many cases (all when None); invalid records are skipped and the next ones taken.
        seed: None: records in file order (CounterFact case ids 0.. as in the papers); an int: a
            seeded random order.
        data_dir: Folder for named datasets (default :func:`default_data_dir`).
        fmt: Force a format instead of detecting it.
        settings: :class:`kem.settings.Settings` for the default data folder.
    """
    if n is not None and n < 1:
        raise ValidationError(f"n must be >= 1 (got {n})", field="n")
    path = resolve_dataset(dataset, data_dir, settings)

    def build(f: str, rec: Any, i: int) -> list[EvalCase]:
        return [_CASE_FNS[f](rec, i)]

    records = read_records(path)
    order: list[int] | None = None
    if seed is not None:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
    return _read(path, records, fmt, order, n, build)


def load_cases(dataset: str | os.PathLike[str], n: int | None = None, seed: int | None = None,
               data_dir: str | os.PathLike[str] | None = None, fmt: str | None = None) -> list[EvalCase]:
    """:func:`read_cases`, refusing invalid records.

    Raises:
        DatasetFormatError: naming the record index and field of the first invalid record.
    """
    return read_cases(dataset, n, seed, data_dir=data_dir, fmt=fmt).check().items


def read_edits(path: str | os.PathLike[str], *, fmt: str | None = None, namespace: str | None = None,
               limit: int | None = None, with_paraphrases: bool = False) -> Loaded[Edit]:
    """The edits of a CounterFact / ZsRE / MQuAKE file, or of a JSONL (or JSON list) of kem edits,
    and the invalid records skipped on the way.

    Dataset edits carry the dataset's locality probes (a consolidation gate can use them). The
    dataset's paraphrases are generalization *probes*: they become the edit's ``paraphrases`` (which
    are retrieval keys) only with ``with_paraphrases=True``; do not evaluate generalization on edits
    imported that way.

    Args:
        path: The file.
        fmt: Force a format instead of detecting it.
        namespace: Namespace of the edits (a kem record that names its own keeps it).
        limit: Use at most this many valid records (all when None).
        with_paraphrases: Store dataset paraphrases as retrieval keys.
    """
    if limit is not None and limit < 1:
        raise ValidationError(f"limit must be >= 1 (got {limit})", field="limit")
    if namespace is not None and not NAMESPACE_RE.fullmatch(namespace):
        raise ValidationError("namespace must start with a letter or digit and use only letters, digits, "
                              f"_ . @ : - (at most 128 characters; got {namespace!r})", field="namespace")

    def build(f: str, rec: Any, i: int) -> list[Edit]:
        return _record_edits(f, rec, i, namespace, with_paraphrases)

    return _read(Path(path), read_records(path), fmt, None, limit, build)


def edits_from_file(path: str | os.PathLike[str], fmt: str | None = None, namespace: str | None = None,
                    with_paraphrases: bool = False, limit: int | None = None) -> list[Edit]:
    """:func:`read_edits`, refusing invalid records.

    Raises:
        DatasetFormatError: naming the record index and field of the first invalid record.
    """
    return read_edits(path, fmt=fmt, namespace=namespace, limit=limit, with_paraphrases=with_paraphrases).check().items


def counterfact_edit(rec: dict[str, Any], i: int = 0, where: str = "counterfact",
                     namespace: str | None = None) -> Edit:
    """One CounterFact record -> the Edit ``kem edit import`` would store (for ``kem demo``).

    Raises:
        DatasetFormatError: naming ``where``, the record index and the field.
    """
    try:
        return _record_edits("counterfact", rec, i, namespace, False)[0]
    except _Invalid as exc:
        raise DatasetFormatError(f"{where} {RecordError(i, exc.field, exc.message)}",
                                 field=f"[{i}].{exc.field}".rstrip(".")) from None
