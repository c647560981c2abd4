"""`kem demo` (the README's first command): edited answers change, unrelated ones do not."""

from __future__ import annotations

import json

from kem.cli import app


def test_demo_json(kem_settings):
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["demo", "--json", "--max-new-tokens", "14"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    kinds = {r["kind"] for r in rows}
    assert {"edited", "paraphrase", "edited (chat)", "strongly-held", "unrelated"} <= kinds
    for r in rows:
        if r["kind"] == "unrelated":
            assert r["edits"] == [] and r["edited"] == r["unedited"], r
        else:
            assert r["edits"], r  # every edited or paraphrased question got its edit
    first = rows[0]
    assert first["question"] == "The mother tongue of Danielle Darrieux is"
    assert "English" in first["edited"] and "English" not in first["unedited"]
    hits = sum(r["edits"][0]["target_new"] in r["edited"] for r in rows if r["kind"] == "edited")
    assert hits >= 3, rows
    strong = [r for r in rows if r["kind"] == "strongly-held"]
    # the model knew the old fact, and with the edit-follower it answers the new one on unseen phrasings
    assert all(r["edits"][0]["target_new"] in r["edited"] for r in strong), strong
    assert sum(r["edits"][0]["target_new"] not in r["unedited"] for r in strong) == len(strong), strong
    # one fact changed twice: now the latest value, "as of" a year ago the one valid then
    now = next(r for r in rows if r["kind"] == "changed twice (now)")
    past = next(r for r in rows if r["kind"].startswith("changed twice (as of"))
    assert [e["target_new"] for e in now["edits"]] == ["Carla Reyes"] and "Carla Reyes" in now["edited"], now
    assert [e["target_new"] for e in past["edits"]] == ["Bob Okafor"] and "Bob Okafor" in past["edited"], past
    assert past["as_of"] and now["as_of"] is None
    # a chain of two edits: the CEO (now), then the CEO's country
    chain = next(r for r in rows if r["kind"] == "2-hop chain")
    assert [e["target_new"] for e in chain["edits"]] == ["Carla Reyes", "Portugal"], chain
    assert chain["edits"][1]["via"] == chain["edits"][0]["id"] and "Portugal" in chain["edited"], chain
