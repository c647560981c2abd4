"""The metric functions of the three protocols, on plain numbers and strings (no model here).

- EasyEdit teacher-forced token accuracy (:func:`token_accuracy`, :func:`locality_agreement`);
- ROME/MEMIT CounterFact probability tests (:func:`prob_success`, :func:`harmonic_mean`);
- generation (:func:`answer_span`, :func:`exact_match`, :func:`contains`, :func:`unchanged`);
- fluency (:func:`ngram_entropy`, ROME's weighted 2/3-gram entropy) and scope precision/recall.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def token_accuracy(pred: Sequence[int], target: Sequence[int]) -> float:
    """EasyEdit's teacher-forced accuracy: the fraction of target tokens that are the argmax
    prediction at their position (``pred[i]`` is the argmax predicting ``target[i]``)."""
    if len(pred) != len(target):
        raise ValueError(f"pred and target must have the same length ({len(pred)} != {len(target)})")
    if not target:
        return float("nan")
    return sum(int(p == t) for p, t in zip(pred, target, strict=True)) / len(target)


def locality_agreement(pre: Sequence[int], post: Sequence[int]) -> float:
    """EasyEdit's locality: the fraction of the locality answer's positions where the post-edit
    argmax token equals the pre-edit model's argmax token (not the dataset's answer)."""
    return token_accuracy(post, pre)


def mean_nll(logprobs: Sequence[float]) -> float:
    """Mean negative log-probability per target token (ROME compares these)."""
    if not logprobs:
        return float("nan")
    return -sum(logprobs) / len(logprobs)


def prob_success(nll_new: float, nll_true: float, *, neighborhood: bool = False) -> bool:
    """ROME's test: efficacy/paraphrase succeed when P(new) > P(true), i.e. ``nll_new < nll_true``;
    neighborhood succeeds in the reverse case (the neighbour keeps its true object)."""
    return nll_true < nll_new if neighborhood else nll_new < nll_true


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean (ROME's "Score" of ES, PS, NS); 0 when any value is 0, NaN when empty."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan")
    if any(v <= 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


# ---- generation ------------------------------------------------------------------------------------
def normalize(text: str) -> str:
    """Case-, accent-, punctuation- and article-insensitive form of an answer (SQuAD-style)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    text = _PUNCT.sub(" ", text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_span(generated: str) -> str:
    """The answer part of a generation: its first non-empty line."""
    for line in generated.splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(generated: str, targets: Sequence[str]) -> bool:
    """The answer span, normalised, equals one of ``targets`` (also normalised)."""
    got = normalize(answer_span(generated))
    return any(got == normalize(t) for t in targets if t.strip())


def contains(generated: str, targets: Sequence[str]) -> bool:
    """One of ``targets`` appears as whole words in the normalised answer span."""
    got = f" {normalize(answer_span(generated))} "
    return any(f" {normalize(t)} " in got for t in targets if normalize(t))


def unchanged(pre: str, post: str) -> bool:
    """Generation locality: the post-edit answer span equals the unedited model's (normalised)."""
    return normalize(answer_span(pre)) == normalize(answer_span(post))


# ---- fluency -----------------------------------------------------------------------------------------
def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency: weighted mean of the n-gram entropies (bits) of ``text``'s words.

    ``mean(w_n * H_n for n in ns)`` with ``H_n = -sum p log2 p`` over the n-gram frequency
    distribution (ROME ``compute_n_gram_entropy``; words by a regex instead of nltk). 0 for text
    with fewer words than ``n``.
    """
    words = _WORD.findall(text.casefold())
    hs = []
    for n in ns:
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        hs.append(-sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0)
    return sum(h * w for h, w in zip(hs, weights, strict=True)) / len(hs)


def fluency(text: str, min_words: int = 5) -> float | None:
    """:func:`ngram_entropy` of ``text``, or None when it has fewer than ``min_words`` words (a
    one-word answer has no bigrams: its entropy says nothing about fluency)."""
    if len(_WORD.findall(text)) < min_words:
        return None
    return ngram_entropy(text)


# ---- scope -------------------------------------------------------------------------------------------
def precision_recall(tp: int, fp: int, fn: int) -> tuple[float, float]:
    """``(precision, recall)``; NaN where the denominator is 0."""
    p = tp / (tp + fp) if tp + fp else float("nan")
    r = tp / (tp + fn) if tp + fn else float("nan")
    return p, r


def mean(values: Iterable[float | bool | None]) -> float:
    """Mean of the non-missing values (bools count 1/0); NaN when none."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")
