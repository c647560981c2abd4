"""kem.datasets: every format read from the shared benchmark files; invalid records named (index, field)
and skipped, or refused with ``strict``; ``kem edit import`` and ``kem eval`` on a file with one bad
record, in real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kem.datasets import (
    RecordError,
    default_data_dir,
    detect_format,
    edits_from_file,
    load_cases,
    read_cases,
    read_edits,
    resolve_dataset,
)
from kem.errors import DatasetFormatError, ValidationError
from kem.settings import Settings
from tests.conftest import shared_data

ZSRE = ("zsre", "zsre_mend_eval_portability_gpt4.json")


def zsre_with_bad_alt(folder: Path, n: int = 6, bad: int = 2) -> Path:
    """The first ``n`` real ZsRE records, record ``bad`` with an empty ``alt``."""
    records = json.loads(Path(shared_data(*ZSRE)).read_text())[:n]
    records[bad]["alt"] = ""
    path = folder / "zsre-bad.json"
    path.write_text(json.dumps(records))
    return path


def test_import_kem_datasets_loads_no_torch():
    code = "import kem.datasets, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the formats ---------------------------------------------------------------------------------------


def test_cases_from_the_shared_data():
    cf = load_cases(shared_data("counterfact", "counterfact-edit.json"), n=2)
    c = cf[0]
    assert c.case_id == "counterfact:0" and c.edits[0].prompt == "The mother tongue of {} is"
    assert c.target_true == "French" and c.generalization[0].text.startswith("Where Danielle Darrieux")
    assert c.edits[0].paraphrases == []  # probes stay unseen by the method
    zs = load_cases(shared_data(*ZSRE), n=1)[0]
    assert zs.reliability[0].chat and zs.portability and zs.target_true is None
    mq = load_cases(shared_data("mquake", "MQuAKE-hard.json"), n=1)[0]
    assert len(mq.edits) == 4 and len(mq.portability) == 3 and mq.portability[0].aliases
    sample = [c.case_id for c in load_cases(shared_data("counterfact", "counterfact-edit-1k.json"), n=3, seed=1)]
    assert sample == [c.case_id for c in load_cases(shared_data("counterfact", "counterfact-edit-1k.json"), n=3, seed=1)]
    assert sample != [c.case_id for c in load_cases(shared_data("counterfact", "counterfact-edit-1k.json"), n=3)]


def test_edits_of_every_format(tmp_path):
    cf = edits_from_file(shared_data("counterfact", "counterfact-edit-1k.json"))
    assert len(cf) == 1000 and cf[0].locality and cf[0].target_true and cf[0].source.startswith("counterfact:")
    assert not cf[0].paraphrases  # probes are not retrieval keys unless asked
    assert edits_from_file(shared_data("counterfact", "counterfact-edit-1k.json"), with_paraphrases=True)[0].paraphrases
    assert len({e.id for e in cf}) == 1000 and not cf[0].id.startswith("cf-")  # fresh ids: importable twice
    zs = read_edits(shared_data(*ZSRE), limit=5, namespace="z")
    assert len(zs.items) == 5 and zs.fmt == "zsre" and {e.namespace for e in zs.items} == {"z"}
    mq = edits_from_file(shared_data("mquake", "MQuAKE-hard.json"))
    assert len(mq) == 4 * 429 and mq[0].relation == "P175"
    demo = edits_from_file(Path(__file__).parents[1] / "kem" / "data" / "counterfact_demo.json")  # {"records": [...]}
    assert len(demo) == 4
    # kem's own edits, JSONL: the namespace fills in records that name none
    path = tmp_path / "mine.jsonl"
    rows = [{"subject": f"S{i}", "prompt": "{} lives in", "target_new": "Oslo"} for i in range(3)]
    rows[2]["namespace"] = "team-b"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    mine = edits_from_file(path, namespace="team-a")
    assert [e.subject for e in mine] == ["S0", "S1", "S2"] and [e.namespace for e in mine] == ["team-a"] * 2 + ["team-b"]
    assert detect_format([{"src": 1, "alt": 2}]) == "zsre"
    with pytest.raises(DatasetFormatError, match="cannot tell the format"):
        detect_format([{"foo": 1}])


# ---- invalid records: named, skipped, or refused with strict ---------------------------------------------------


@pytest.mark.parametrize("records,fmt,index,field,needle", [
    ([{"case_id": 0, "prompt": "The capital of France is", "subject": "France", "target_new": "Rome",
       "ground_truth": "Paris", "rephrase_prompt": "x"},
      {"case_id": 1, "prompt": "The capital of Spain is", "subject": "Spain", "ground_truth": "Madrid",
       "rephrase_prompt": "x"}], "counterfact", 1, "target_new", "field 'target_new' is missing"),
    ([{"subject": "X", "src": "Who made X?", "alt": "Y", "loc": "q", "loc_ans": "a"},
      {"subject": "Z", "src": "Who made Z?", "alt": "", "loc": "q", "loc_ans": "a"}], "zsre", 1, "alt",
     "field 'alt' must be a non-empty string"),
    ([{"subject": "X", "src": "Who made X?", "alt": "Y"},
      {"subject": "X", "src": "Who made X?", "alt": "Y", "portability": {"New Question": "q?"}}], "zsre", 1,
     "portability.New Answer", "field 'portability.New Answer' is missing"),
    ([{"case_id": 2, "requested_rewrite": [{"prompt": "{} is in", "subject": "A", "target_new": {"str": "B"},
                                             "target_true": {"str": "C"}}], "questions": ["q"], "new_answer": "B"},
      {"case_id": 3, "requested_rewrite": [{"prompt": "{} is in", "subject": "A", "target_new": {"str": "B"},
                                             "target_true": {}}], "questions": ["q"], "new_answer": "B"}],
     "mquake", 1, "requested_rewrite[0].target_true.str", "field 'requested_rewrite[0].target_true.str'"),
    ([{"subject": "Paris", "prompt": "{} is the capital of", "target_new": "Italy"},
      {"subject": "Paris", "prompt": "no subject here", "target_new": "Italy"}], "kem", 1, "prompt",
     "Edit.prompt must contain"),
    ([{"subject": "X", "src": "Who made X?", "alt": "Y"}, "just a string"], "zsre", 1, "",
     "must be a JSON object (got str)"),
])
def test_an_invalid_record_is_named_and_skipped(tmp_path, records, fmt, index, field, needle):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    for loaded in (read_cases(path, fmt=fmt), read_edits(path, fmt=fmt)):
        assert loaded.fmt == fmt and loaded.records == len(records) and len(loaded.items) >= 1
        (err,) = loaded.errors
        assert (err.index, err.field) == (index, field) and needle in err.message
        assert f"skipped 1 invalid of {len(records)} records" in loaded.summary() and f"record {index}" in loaded.summary()
        with pytest.raises(DatasetFormatError) as strict:
            loaded.check()
        assert f"record {index}: " in str(strict.value) and needle in str(strict.value)
        assert strict.value.field == f"[{index}].{field}".rstrip(".")
    with pytest.raises(DatasetFormatError, match=f"record {index}: "):
        load_cases(path, fmt=fmt)
    with pytest.raises(DatasetFormatError, match=f"record {index}: "):
        edits_from_file(path, fmt=fmt)


def test_a_zsre_file_with_one_empty_alt_among_a_thousand(tmp_path):
    """The case issue 11 names: record 534 of 1,000 has an empty ``alt``. Everything else is read."""
    path = zsre_with_bad_alt(tmp_path, n=1000, bad=534)
    loaded = read_cases(path)
    assert len(loaded.items) == 999 and loaded.errors == [
        RecordError(534, "alt", "field 'alt' must be a non-empty string (got '')")]
    assert "zsre:534" not in {c.case_id for c in loaded.items}
    assert len(read_cases(path, n=600).items) == 600  # the next record takes the bad one's place
    assert read_cases(path, n=10).errors == []  # only the records read are checked
    assert len(read_edits(path).items) == 999


def test_a_jsonl_line_that_is_not_json_is_one_invalid_record(tmp_path):
    path = tmp_path / "edits.jsonl"
    good = json.dumps({"subject": "Paris", "prompt": "{} is the capital of", "target_new": "Italy"})
    path.write_text(f"{good}\n{{not json\n\n{good.replace('Paris', 'Rome')}\n")
    loaded = read_edits(path)
    assert [e.subject for e in loaded.items] == ["Paris", "Rome"]
    (err,) = loaded.errors
    assert err.index == 1 and "line 2 is not valid JSON" in err.message


def test_problems_with_the_file_itself_raise(tmp_path):
    with pytest.raises(DatasetFormatError, match="no file at") as err:
        read_edits(tmp_path / "missing.json")
    assert err.value.field == "file"
    with pytest.raises(DatasetFormatError, match="no file at") as err:
        read_cases(tmp_path / "missing.json")
    assert err.value.field == "dataset"
    (tmp_path / "broken.json").write_text('[{"src": "x",')
    with pytest.raises(DatasetFormatError, match="not valid JSON"):
        read_edits(tmp_path / "broken.json")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetFormatError, match="no records"):
        read_cases(tmp_path / "empty.jsonl")
    (tmp_path / "all-bad.json").write_text(json.dumps([{"subject": "X", "src": "Who made X?", "alt": ""}] * 3))
    with pytest.raises(DatasetFormatError, match=r"none of its 3 records is valid; first: record 0: field 'alt'"):
        read_cases(tmp_path / "all-bad.json")
    with pytest.raises(ValidationError, match="namespace"):
        read_edits(shared_data(*ZSRE), namespace="no spaces")
    with pytest.raises(ValidationError, match="n must be >= 1"):
        read_cases(shared_data(*ZSRE), n=0)


def test_named_datasets_come_from_the_eval_data_setting(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    (folder / "zsre").mkdir(parents=True)
    zsre_with_bad_alt(folder / "zsre").rename(folder / "zsre" / ZSRE[1])
    assert resolve_dataset("zsre", settings=Settings(eval_data=folder)) == folder / "zsre" / ZSRE[1]
    monkeypatch.setenv("KEM_EVAL_DATA", str(folder))  # the environment reaches it through Settings
    assert default_data_dir() == folder
    assert len(read_cases("zsre").items) == 5
    assert resolve_dataset("zsre", data_dir=Path(shared_data("zsre")).parent) == Path(shared_data(*ZSRE))
    with pytest.raises(DatasetFormatError, match="no file at") as err:
        resolve_dataset("counterfact")
    assert "KEM_EVAL_DATA" in str(err.value)


# ---- the CLI: kem edit import, kem eval -------------------------------------------------------------------------


def kem(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KEM_HOME": str(tmp_path / "kem-data"), "KEM_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kem", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)


def test_kem_edit_import_skips_the_bad_record_or_refuses_with_strict(tmp_path):
    path = zsre_with_bad_alt(tmp_path)
    p = kem(tmp_path, "edit", "import", str(path), "--strict")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "record 2: field 'alt' must be a non-empty string" in p.stderr
    assert not (tmp_path / "kem-data").exists() or json.loads(kem(tmp_path, "edit", "list", "--json").stdout) == []
    p = kem(tmp_path, "edit", "import", str(path), "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["imported"] == 5 and out["skipped"] == [
        {"index": 2, "field": "alt", "message": "field 'alt' must be a non-empty string (got '')"}]
    assert "skipped 1 invalid of 6 records" in p.stderr and "record 2: field 'alt'" in p.stderr
    listed = json.loads(kem(tmp_path, "edit", "list", "--json").stdout)
    assert sorted(e["id"] for e in listed) == sorted(out["ids"]) and {e["source"] for e in listed} == {
        f"zsre:{i}" for i in (0, 1, 3, 4, 5)}


def test_kem_eval_skips_the_bad_record_or_refuses_with_strict(tmp_path):
    path = zsre_with_bad_alt(tmp_path, n=4, bad=1)
    p = kem(tmp_path, "eval", "--dataset", str(path), "--strict", "--method", "none")
    assert p.returncode == 2 and "record 1: field 'alt'" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = kem(tmp_path, "eval", "--dataset", str(path), "--method", "none", "-n", "2", "--fluency-cases", "0",
            "--chat-tokens", "4", "--out", str(tmp_path / "out"), "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "skipped 1 invalid of 3 records of zsre-bad.json: record 1: field 'alt'" in p.stderr
    assert "evaluated 2 cases; skipped 1 invalid records" in p.stdout
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [c["case_id"] for c in res["cases"]["none"]] == ["zsre:0", "zsre:2"]
    assert [e["index"] for e in res["skipped"]] == [1]
