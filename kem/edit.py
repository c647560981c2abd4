"""The typed edit: one fact change, validated and normalised once, here.

An edit says: for ``subject``, the completion of ``prompt`` (a template with ``{}`` where the
subject goes) is now ``target_new``. Everything else in kem (stores, retrieval, prompt composition,
consolidation, evaluation) takes an :class:`Edit` and never re-normalises its text.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError

from kem.errors import ValidationError

NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:\-]{0,127}$")
_WS = re.compile(r"\s+")
MAX_TEXT = 2000
MAX_PARAPHRASES = 32
NEW_INPUT = "new_input"  # validation context key set by Edit.parse: checks that only new input must pass


def _clean(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return _WS.sub(" ", text).strip()


def utcnow() -> datetime:
    return datetime.now(UTC)


class EditStatus(StrEnum):
    """Lifecycle of an edit. ``active`` edits are applied in context (inside their validity window);
    ``consolidated`` ones live in a published model version (and are still applied to older versions);
    ``superseded`` ones were replaced by a newer edit of the same fact (``superseded_by``) and apply
    only to "as of" requests before ``superseded_at``; ``pending`` ones wait for an admin's review and
    never reach a prompt; ``rejected`` ones were refused in review; ``retired`` ones were taken out by
    hand (or superseded before kem kept ``superseded`` apart) and are kept only in the history."""

    active = "active"
    consolidated = "consolidated"
    retired = "retired"
    superseded = "superseded"
    pending = "pending"
    rejected = "rejected"


class LocalityProbe(BaseModel):
    """A prompt the edit must NOT change, with its expected (pre-edit) answer when known."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_TEXT)
    answer: str | None = Field(None, max_length=MAX_TEXT)

    @field_validator("prompt", "answer")
    @classmethod
    def _norm(cls, v: str | None) -> str | None:
        return None if v is None else _clean(v)


class Edit(BaseModel):
    """One fact edit.

    Attributes:
        id: Stable identifier (a uuid4 hex unless given).
        namespace: Tenant; edits of one namespace are never seen from another.
        subject: The entity the fact is about, e.g. ``"Danielle Darrieux"`` (new edits: no ``"{}"`` in it).
        prompt: Template with ``{}`` where the subject goes, e.g. ``"The mother tongue of {} is"``.
            A prompt that contains the subject verbatim instead is accepted and templated here.
        target_new: The new completion, e.g. ``"English"`` (stored without a leading space; use
            :attr:`target_completion` when a tokenizer needs the space).
        target_true: The old completion, when known.
        relation: Optional relation id (e.g. Wikidata ``"P103"``). Two active edits with the same
            subject and relation cannot coexist: the newer supersedes the older. Without a relation,
            the prompt template stands for the relation.
        paraphrases: Other phrasings of the same question (full text, subject included).
        locality: Probes the edit must leave unchanged.
        source: Free-form provenance (``"counterfact:0"``, ``"api"``, a user name...).
        evidence: Why the fact is true: a URL or a quoted text (optional).
        created_by: Who wrote the edit (the API key's principal, ``cli:<user>``...); set by kem.
        valid_from: When the fact starts to hold (ISO 8601; None: always did). Before it the edit does
            not apply. An edit that supersedes another without one starts when it is written.
        valid_until: When the fact stops holding (None: until superseded).
        status: See :class:`EditStatus`.
        supersedes: Ids of the edits this one replaced.
        superseded_by: Id of the edit that replaced this one (status ``superseded``).
        superseded_at: When that edit took over: this edit applies only before it.
        consolidated_in: Model version that absorbed this edit (when status is ``consolidated``).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=128)
    namespace: str = "default"
    subject: str = Field(min_length=1, max_length=MAX_TEXT)
    prompt: str = Field(min_length=1, max_length=MAX_TEXT)
    target_new: str = Field(min_length=1, max_length=MAX_TEXT)
    target_true: str | None = Field(None, max_length=MAX_TEXT)
    relation: str | None = Field(None, max_length=128)
    paraphrases: list[str] = Field(default_factory=list, max_length=MAX_PARAPHRASES)
    locality: list[LocalityProbe] = Field(default_factory=list, max_length=MAX_PARAPHRASES)
    source: str | None = Field(None, max_length=MAX_TEXT)
    evidence: str | None = Field(None, max_length=MAX_TEXT)
    created_by: str | None = Field(None, max_length=256)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    status: EditStatus = EditStatus.active
    supersedes: list[str] = Field(default_factory=list)
    superseded_by: str | None = None
    superseded_at: datetime | None = None
    consolidated_in: str | None = None

    # ---- normalisation (the only place it happens) -------------------------------------------
    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        v = v.strip()
        if not re.fullmatch(r"[A-Za-z0-9_.:\-]{1,128}", v):
            raise ValueError(f"must be 1-128 characters of letters, digits, _ . : - (got {v!r})")
        return v

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        v = v.strip()
        if not NAMESPACE_RE.fullmatch(v):
            raise ValueError(
                "must start with a letter or digit and use only letters, digits, _ . @ : - "
                f"(at most 128 characters; got {v!r})"
            )
        return v

    @field_validator("supersedes", mode="before")
    @classmethod
    def _supersedes(cls, v: Any) -> Any:
        """Records written before an edit could supersede several hold one id (or None)."""
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator("valid_from", "valid_until", "superseded_at", "created_at", "updated_at")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        """Times without a zone are UTC; every time is kept in UTC."""
        if v is None:
            return None
        return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)

    @field_validator("subject", "target_new", "target_true", "source", "relation", "evidence")
    @classmethod
    def _text(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return None
        v = _clean(v)
        if not v and info.field_name in ("subject", "target_new"):
            raise ValueError("must not be empty or only whitespace")
        if info.field_name == "subject" and "{}" in v and (info.context or {}).get(NEW_INPUT):
            raise ValueError(
                f'must not contain "{{}}", which marks where the subject goes in the prompt; write the '
                f"subject without it (got {v!r})"
            )
        return v or None

    @field_validator("paraphrases")
    @classmethod
    def _paraphrases(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for i, p in enumerate(v):
            p = _clean(p)
            if not p:
                raise ValueError(f"item {i} is empty")
            if len(p) > MAX_TEXT:
                raise ValueError(f"item {i} is longer than {MAX_TEXT} characters")
            if p not in out:
                out.append(p)
        return out

    @model_validator(mode="after")
    def _template(self) -> Edit:
        prompt = _clean(self.prompt)
        if "{}" not in prompt:
            if self.subject not in prompt:
                raise ValueError(
                    f'prompt must contain "{{}}" where the subject goes, or the subject '
                    f"{self.subject!r} verbatim (got {prompt!r})"
                )
            prompt = prompt.replace(self.subject, "{}", 1)
        if prompt.count("{}") != 1:
            raise ValueError(f'prompt must contain "{{}}" exactly once (got {prompt!r})')
        if prompt.strip() == "{}":
            raise ValueError(f"prompt must say something besides the subject (got {prompt!r})")
        self.prompt = prompt
        if self.status == EditStatus.consolidated and not self.consolidated_in:
            raise ValueError("consolidated_in must name the model version when status is 'consolidated'")
        if self.valid_from is not None and self.valid_until is not None and self.valid_until <= self.valid_from:
            raise ValueError(f"valid_until must be later than valid_from (got {self.valid_from.isoformat()} "
                             f"and {self.valid_until.isoformat()})")
        return self

    # ---- time ------------------------------------------------------------------------------------
    @property
    def ends_at(self) -> datetime | None:
        """When the edit stops applying: the earlier of ``valid_until`` and ``superseded_at`` (None: never)."""
        ends = [t for t in (self.valid_until, self.superseded_at) if t is not None]
        return min(ends) if ends else None

    def applies_at(self, when: datetime) -> bool:
        """Whether the fact held at ``when``: inside ``[valid_from, ends_at)``, and the edit is one that
        can apply at all (``active``, ``consolidated`` or ``superseded``; never ``pending``, ``rejected``
        or ``retired``)."""
        if self.status not in (EditStatus.active, EditStatus.consolidated, EditStatus.superseded):
            return False
        if self.valid_from is not None and when < self.valid_from:
            return False
        end = self.ends_at
        return end is None or when < end

    # ---- derived text ---------------------------------------------------------------------------
    @property
    def rendered_prompt(self) -> str:
        """The prompt with the subject filled in: ``"The mother tongue of Danielle Darrieux is"``."""
        return self.prompt.replace("{}", self.subject)

    @property
    def target_completion(self) -> str:
        """``target_new`` with the leading space a tokenizer expects after the prompt."""
        return " " + self.target_new

    @property
    def fact(self) -> str:
        """The edit as one statement: ``"The mother tongue of Danielle Darrieux is English."``."""
        return fact_sentence(self.rendered_prompt, self.target_new)

    @property
    def relation_key(self) -> str:
        """What "the same relation" means for superseding: the relation id, else the template."""
        return (self.relation or self.prompt).casefold()

    @property
    def subject_key(self) -> str:
        return self.subject.casefold()

    def retrieval_keys(self) -> list[str]:
        """Texts embedded for retrieval: the rendered prompt, the fact, then the paraphrases."""
        keys = [self.rendered_prompt, self.fact, *self.paraphrases]
        return keys[:16]

    # ---- construction with kem's own error type ------------------------------------------------
    @classmethod
    def parse(cls, data: dict[str, Any] | Edit, **overrides: Any) -> Edit:
        """Validate ``data`` (plus ``overrides``) into an Edit, raising :class:`kem.errors.ValidationError`
        whose message names every bad field.

        This is the gate for new input (every store write goes through it), so it also refuses what
        only new edits must not have (a subject containing ``"{}"``); records stored before such a
        check was added still load with ``model_validate``.
        """
        if isinstance(data, Edit):
            data = data.model_dump()
        payload = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        try:
            return cls.model_validate(payload, context={NEW_INPUT: True})
        except PydanticValidationError as exc:
            raise validation_error("Edit", exc) from None


def validation_error(model_name: str, exc: PydanticValidationError) -> ValidationError:
    """Turn pydantic's error into kem's, naming each field: ``Edit.prompt must contain ...``."""
    parts = []
    first_field = None
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ())) or "(record)"
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        head = msg.split(" ", 1)[0]
        if loc == "(record)" and head in Edit.model_fields:  # a model-level check about one field
            loc, msg = head, msg.split(" ", 1)[1]
        first_field = first_field or loc
        parts.append(f"{model_name}.{loc} {msg}" if loc != "(record)" else f"{model_name}: {msg}")
    return ValidationError("; ".join(parts), field=first_field)


def fact_sentence(prompt: str, target: str) -> str:
    """``prompt`` completed by ``target`` as one sentence (a final period added when it has none)."""
    text = f"{prompt} {target}"
    return text if text[-1] in ".!?" else text + "."


def parse_time(value: str | None, field: str) -> datetime | None:
    """An ISO 8601 time (a date alone is its midnight UTC; no zone: UTC), or None when absent."""
    if value is None or not str(value).strip():
        return None
    try:
        t = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(f"{field} must be an ISO 8601 time such as 2025-01-01 or 2025-01-01T12:00:00Z "
                              f"(got {value!r})", field=field) from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t
