"""Knowledge over time: a fact changed three times, supersede however it is phrased, "as of" answers.

From the CounterFact edit split (``../shared/data/counterfact/counterfact-edit.json``, 10,000 records):
``--n-seq`` records (default 1,000) are each written three times in sequence (u1: the record itself,
valid from 2021-01-01; u2 and u3: other phrasings of the same relation, from 2023-01-01 and
2025-01-01, with other targets of the relation), interleaved at random with the other records' single
edits, and imported in batches of 1,000 as ``kem edit import`` does. No relation ids are given: kem
must find the relation from the words. The relation labels (``bench/data/counterfact_record_relations.json``,
per record) are the ground truth; they never reach kem.

Measured:
- the prompt now holds only the latest target (u3), and "as of" 2022 / 2024 only u1 / u2 (retrieval
  and scope, every sequence whose subject has no other record of the same relation);
- with ``--answers N``: the follower's answer (batch: every edit stored) is the latest / the one valid
  then, on N sequences;
- false supersedes (same subject, another relation) and missed supersedes (same subject and relation,
  consecutive writes) over every write, sequences and the split's own pairs apart;
- unseen phrasings: the same pairs decided with each template held out of the relation vocabulary;
- superseded edits whose history and audit log name who and when;
- import throughput with these checks against the exact-key rule alone (``supersede_threshold`` None:
  kem before this bench), same data, same process.

    .venv/bin/python bench/bench_time.py [--n-seq 1000] [--answers 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
STARTS = [datetime(2021, 1, 1, tzinfo=UTC), datetime(2023, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC)]
AS_OF = [datetime(2022, 1, 1, tzinfo=UTC), datetime(2024, 1, 1, tzinfo=UTC), None]  # None: now


def template(r: dict) -> str:
    return r["prompt"].replace(r["subject"], "{}", 1)


def build(records: list[dict], labels: dict[str, str], tlabels: dict, n_seq: int, seed: int, pool: list[dict]):
    """The write order: ``[(edit dict, group key, kind)]`` and the sequences ``{case_id: [u1, u2, u3] ids}``."""
    from kem.relations import normalise_template

    rng = random.Random(seed)
    rel_of = {r["case_id"]: labels[str(r["case_id"])] for r in records}
    ambiguous = set(tlabels["ambiguous"])
    templates: dict[str, list[str]] = collections.defaultdict(list)
    for t, rel in sorted(tlabels["templates"].items()):
        if t not in ambiguous:
            templates[rel].append(t)
    targets: dict[str, list[str]] = collections.defaultdict(list)
    for r in pool:  # other targets of each relation, from the whole file
        targets[labels[str(r["case_id"])]].append(r["target_new"])
    seq = set(rng.sample([r["case_id"] for r in records], n_seq))
    events: list[tuple[int, int]] = [(r["case_id"], 0) for r in records if r["case_id"] not in seq]
    events += [(cid, -1) for cid in sorted(seq) for _ in range(3)]
    rng.shuffle(events)
    seen: collections.Counter[int] = collections.Counter()
    by_id = {r["case_id"]: r for r in records}
    plan, sequences = [], {}
    for cid, k in events:
        r, rel = by_id[cid], rel_of[cid]
        base = {"subject": r["subject"], "target_true": r["ground_truth"], "source": f"counterfact:{cid}"}
        if k == 0:
            plan.append(({**base, "id": f"cf{cid}", "prompt": template(r), "target_new": r["target_new"]},
                         (r["subject"].casefold(), rel), "single"))
            continue
        u = seen[cid]
        seen[cid] += 1
        if u == 0:
            others = [t for t in templates[rel] if normalise_template(t) != normalise_template(template(r))]
            picks = rng.sample(others, 2) if len(others) >= 2 else [rng.choice(others or [template(r)])] * 2
            pool = sorted({t for t in targets[rel] if t not in (r["target_new"], r["ground_truth"])})
            tgts = [r["target_new"], *rng.sample(pool, 2)]
            sequences[cid] = {"templates": [template(r), *picks], "targets": tgts,
                              "ids": [f"cf{cid}-u{i + 1}" for i in range(3)]}
        s = sequences[cid]
        plan.append(({**base, "id": s["ids"][u], "prompt": s["templates"][u], "target_new": s["targets"][u],
                      "valid_from": STARTS[u].isoformat()}, (r["subject"].casefold(), rel), f"seq{u + 1}"))
    return plan, sequences


def import_all(plan, threshold, settings, embedder, home: Path):
    from kem.editor import KnowledgeEditor

    s = settings.model_copy(update={"supersede_threshold": threshold, "home": home})
    ke = KnowledgeEditor.open(home, settings=s, embedder=embedder)
    t0 = time.perf_counter()
    stored = ke.add_many([p[0] for p in plan], batch_size=1000)
    return ke, stored, time.perf_counter() - t0


def supersede_counts(plan, ke):
    """False supersedes (an edit superseded by one of another relation) and missed ones: in each group
    of writes with one subject and relation, every write but one should end superseded (by the later
    one, or, for a value dated before the live one, by it), so each extra live edit is a miss."""
    group = {p[0]["id"]: (p[1], p[2]) for p in plan}
    false = events = 0
    examples = []
    for e in ke.list(status="superseded"):
        events += 1
        if group[e.id][0] != group[e.superseded_by][0]:
            false += 1
            n = ke.get(e.superseded_by)
            examples.append(f"{e.prompt!r} {e.target_new!r} ({group[e.id][0][1]}) by {n.prompt!r} {n.target_new!r} "
                            f"({group[n.id][0][1]})")
    members: dict[tuple, list[str]] = collections.defaultdict(list)
    for p in plan:
        members[p[1]].append(p[0]["id"])
    should = collections.Counter()
    missed = collections.Counter()
    for ids in members.values():
        kind = "sequence" if len(ids) == 3 and all(group[i][1].startswith("seq") for i in ids) else "split"
        if len(ids) < 2:
            continue
        should[kind] += len(ids) - 1
        missed[kind] += max(0, sum(ke.get(i).status.value == "active" for i in ids) - 1)
    return events, false, should, missed, examples


def unseen_phrasings(tlabels, embedder):
    """Pairs of templates decided with each one held out of the vocabulary in turn."""
    from kem.edit import Edit
    from kem.relations import RelationMatcher, normalise_template, vocabulary

    vocab = vocabulary()
    amb = set(tlabels["ambiguous"])
    ts = sorted(t for t in tlabels["templates"] if t not in amb)
    same = diff = same_hit = diff_hit = 0
    for held in ts:
        key = normalise_template(held)
        m = RelationMatcher(embedder, vocab={k: v for k, v in vocab.items() if k != key})
        a = Edit(subject="S", prompt=held, target_new="x")
        others = [Edit(subject="S", prompt=t, target_new="y") for t in ts if t != held]
        verdicts = m.decide([(a, o) for o in others])
        for o, v in zip(others, verdicts, strict=True):
            if tlabels["templates"][o.prompt] == tlabels["templates"][held]:
                same += 1
                same_hit += v
            else:
                diff += 1
                diff_hit += v
    return same, same_hit, diff, diff_hit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-seq", type=int, default=1000)
    ap.add_argument("--answers", type=int, default=200, help="sequences answered by the follower (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=DATA / "counterfact" / "counterfact-edit.json")
    ap.add_argument("--records", type=int, default=None, help="use the first N records only (a quick run)")
    a = ap.parse_args()
    from kem.editor import default_embedder
    from kem.settings import Settings

    every = json.loads(a.data.read_text())
    records = every[:a.records]
    labels = json.loads((ROOT / "bench/data/counterfact_record_relations.json").read_text())["edit"]
    tlabels = json.loads((ROOT / "bench/data/counterfact_relations.json").read_text())
    plan, sequences = build(records, labels, tlabels, a.n_seq, a.seed, every)
    settings = Settings()
    embedder = default_embedder(settings)
    embedder.embed(["warm up"])
    out: dict = {"writes": len(plan), "sequences": len(sequences)}
    with tempfile.TemporaryDirectory(prefix="kem-bench-time-") as tmp:
        base_ke, _, base_s = import_all(plan, None, settings, embedder, Path(tmp) / "exact")
        base_ke.close()
        ke, stored, s = import_all(plan, settings.supersede_threshold, settings, embedder, Path(tmp) / "kem")
        out["import_s"], out["import_exact_s"] = round(s, 1), round(base_s, 1)
        events, false, pairs, missed, examples = supersede_counts(plan, ke)
        out.update(supersedes=events, false_supersedes=false, false_examples=examples, should_supersede=dict(pairs),
                   missed=dict(missed))
        # superseded versions readable with who and when
        # the row that made each edit superseded: a "supersede" (a later edit took over), or its own "add"
        # (a value dated before the live one)
        made = {r.edit_id: r for r in ke.audit() if r.op == "supersede" or
                (r.op == "add" and (r.snapshot or {}).get("status") == "superseded")}
        sup = ke.list(status="superseded")
        ok = sum(1 for e in sup if (r := made.get(e.id)) and r.actor and r.at and r.snapshot
                 and r.snapshot.get("superseded_by") == e.superseded_by
                 and any(h.seq == r.seq for h in ke.history(e.id)))
        out["superseded_with_who_and_when"] = f"{ok}/{len(sup)}"
        # retrieval: only the version valid at the time reaches the prompt
        groups = collections.Counter(p[1] for p in plan)
        group_of = {p[0]["id"]: p[1] for p in plan}
        key_of = {cid: group_of[s_["ids"][0]] for cid, s_ in sequences.items()}
        clean = [cid for cid in sequences if groups[key_of[cid]] == 3]
        out["clean_sequences"] = len(clean)
        by_id = {r["case_id"]: r for r in records}
        only = collections.Counter()
        for cid in clean:
            prompt = by_id[cid]["prompt"]
            ids = sequences[cid]["ids"]
            for u, when in enumerate(AS_OF):
                applied = {x.edit.id for x in ke.retrieve(prompt, as_of=when) if x.in_scope}
                only[u] += applied & set(ids) == {ids[u]}
        out["only_valid_version_in_prompt"] = {("now" if w is None else w.date().isoformat()): f"{only[u]}/{len(clean)}"
                                               for u, w in enumerate(AS_OF)}
        if a.answers:
            rng = random.Random(a.seed + 1)
            sample = rng.sample(clean, min(a.answers, len(clean)))
            right = collections.Counter()
            wrong = []
            for cid in sample:
                for u, when in enumerate(AS_OF):
                    text = ke.generate(by_id[cid]["prompt"], max_new_tokens=8, as_of=when).text.strip()
                    hit = text.casefold().startswith(sequences[cid]["targets"][u].casefold())
                    right[u] += hit
                    if not hit:
                        wrong.append(f"{by_id[cid]['prompt']!r} as of {when or 'now'}: {text!r}, wanted "
                                     f"{sequences[cid]['targets'][u]!r}")
            out["follower_misses"] = wrong
            out["follower_answers"] = {("now" if w is None else w.date().isoformat()): f"{right[u]}/{len(sample)}"
                                       for u, w in enumerate(AS_OF)}
        ke.close()
    same, same_hit, diff, diff_hit = unseen_phrasings(tlabels, embedder)
    out["unseen_phrasings"] = {"same_relation_pairs": same, "matched": same_hit,
                               "other_relation_pairs": diff, "matched_wrongly": diff_hit}
    print(json.dumps(out, indent=1))
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| latest target only, in the prompt (now) | {out['only_valid_version_in_prompt']['now']} |")
    for k in ("2022-01-01", "2024-01-01"):
        print(f"| as of {k}: only the version valid then, in the prompt | {out['only_valid_version_in_prompt'][k]} |")
    if "follower_answers" in out:
        for k, v in out["follower_answers"].items():
            print(f"| follower answers the version valid {k} | {v} |")
    print(f"| false supersedes (another relation) | {false} of {events} supersedes |")
    for k, what in (("sequence", "three-write sequences"), ("split", "groups with the split's own records")):
        print(f"| missed supersedes, {what} | {missed[k]} of {pairs[k]} |")
    print(f"| unseen phrasing (held out of the vocabulary): same-relation pairs matched | {same_hit} of {same} |")
    print(f"| unseen phrasing: other-relation pairs matched | {diff_hit} of {diff} |")
    print(f"| superseded versions with who and when in history and audit | {out['superseded_with_who_and_when']} |")
    print(f"| import of {len(plan)} writes, s (exact keys only / kem) | {base_s:.1f} / {s:.1f} "
          f"(throughput ratio {base_s / s:.2f}) |")


if __name__ == "__main__":
    main()
