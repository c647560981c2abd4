"""Build ``kem/data/covariance_text.json``: the text kem's key statistics (``C = E[k k^T]``) are read from
when no ``--corpus`` is given.

Source: WikiText-2's **test** split (``../shared/data/wikitext-2/test.txt``), then its validation split
without the paragraphs of the consolidation gate's perplexity check (``kem/data/perplexity_text.json``). Paragraphs of at
least 40 words once their sentences holding ``<unk>`` are dropped, detokenized (``@-@`` -> ``-``, spaces before punctuation removed),
cut into pieces of ``--words`` words (at least 40); the first ``--n`` in file order. Shipping text instead of sampling
it from the model makes a fresh install's first ROME / MEMIT / AlphaEdit / distill job a matter of
forward passes (no autoregressive sampling); ``--corpus model`` still samples from the model.

    .venv/bin/python scripts/build_covariance_text.py [--data ../shared/data] [--n 1000] [--words 80]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path


def detokenize(line: str) -> str:
    s = line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    s = re.sub(r" ([,.;:!?%)\]'])", r"\1", s)
    s = re.sub(r"([(\[$]) ", r"\1", s)
    s = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", s)
    s = s.replace('" ', '"', 1) if s.startswith('" ') else s
    return s


def _add(line: str, held_out: set[str], size: int, n: int, texts: list[str]) -> None:
    """Append ``line``'s pieces to ``texts``: a paragraph (not a heading, not one of the perplexity gate's),
    its sentences holding ``<unk>`` dropped, detokenized, cut into pieces of ``size`` words (>= 40)."""
    if not line or line.startswith("=") or " ".join(line.split()) in held_out:
        return
    kept = " ".join(x for x in re.split(r"(?<= [.!?]) ", line) if "<unk>" not in x)
    words = detokenize(kept).split()
    for i in range(0, len(words), size):  # a long paragraph gives several texts
        if len(words) - i >= 40 and len(texts) < n:
            texts.append(" ".join(words[i:i + size]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--words", type=int, default=80)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "kem" / "data" / "covariance_text.json"))
    args = ap.parse_args()
    gate = Path(__file__).resolve().parent.parent / "kem" / "data" / "perplexity_text.json"
    held_out = {" ".join(t.split()) for t in json.loads(gate.read_text(encoding="utf-8"))["texts"]}
    sources, texts = [], []
    for name in ("test.txt", "valid.txt"):
        src = Path(args.data) / "wikitext-2" / name
        if not src.is_file():
            raise SystemExit(f"{src} not found: the shared data folder is needed (--data)")
        raw = src.read_bytes()
        sources.append(f"{name} sha256 {hashlib.sha256(raw).hexdigest()[:16]}")
        for line in raw.decode("utf-8").splitlines():
            if len(texts) < args.n:
                _add(line.strip(), held_out, args.words, args.n, texts)
    if len(texts) < args.n:
        raise SystemExit(f"only {len(texts)} texts; asked for {args.n}")

    doc = {
        "_about": "Text for the key covariance statistics of ROME / MEMIT / AlphaEdit / distill when no --corpus is "
                  "given: paragraphs of WikiText-2's test split, then its validation split less the perplexity gate's paragraphs, "
                  f"detokenized, in pieces of 40-{args.words} words. Built by scripts/build_covariance_text.py.",
        "source": "pytorch/examples word_language_model/data/wikitext-2/ @ d5678bc8ac0cdd79dbd5e44d4130271018bcec4e: "
                  + ", then ".join(sources),
        "license": "WikiText (Merity et al., 2016): CC BY-SA 3.0",
        "texts": texts,
    }
    Path(args.out).write_text(json.dumps(doc, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"{len(texts)} texts, {sum(len(t) for t in texts):,} characters -> {args.out}")


if __name__ == "__main__":
    main()
