"""Scoring one prediction against its reference(s): exact match, multiple choice, ROUGE-L
and BLEU.

Owns the text normalisation and the four metrics, written out here (about 150 lines)
rather than pulled from `rouge-score`/`sacrebleu`: those bring nltk/regex/portalocker and
their own tokenisers for what is a few loops, and the tests recompute every figure by hand
from the definitions below. Does not own reading task files or calling models
(`pipeline.evaluate`).

Definitions:
- normalise: lower-case, drop punctuation, drop the articles a/an/the, collapse spaces
  (SQuAD's answer normalisation).
- exact match: 1 if the normalised prediction equals any normalised reference, else 0.
- contains: 1 if a normalised reference occurs as a run of whole tokens inside the
  normalised prediction ("The capital is Paris." contains "Paris"), else 0.
- multiple choice: the letter the prediction picks (`pick_choice`) equals the answer letter.
- ROUGE-L: F1 of the longest common subsequence of normalised tokens (β = 1), the best over
  the references.
- BLEU: corpus BLEU-4 over normalised tokens: clipped n-gram precisions summed over the
  corpus (multi-reference clipping), geometric mean with equal weights, brevity penalty
  against the closest reference length (ties: the shorter). An order n > 1 with no match
  counts as 1 / (its n-gram total + 1) instead of 0 (add-one on that order only), so a
  small corpus without a single matching 4-gram scores low rather than 0; no matching
  unigram at all scores 0.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

__all__ = [
    "contains",
    "corpus_bleu",
    "exact_match",
    "normalise",
    "pick_choice",
    "rouge_l",
    "tokens",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalise(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def tokens(text: str) -> list[str]:
    return normalise(text).split()


def exact_match(prediction: str, references: Sequence[str]) -> float:
    p = normalise(prediction)
    return 1.0 if any(p == normalise(r) for r in references) else 0.0


def contains(prediction: str, references: Sequence[str]) -> float:
    p = f" {normalise(prediction)} "
    return 1.0 if any(normalise(r) and f" {normalise(r)} " in p for r in references) else 0.0


_LETTER = re.compile(r"(?:^|[\s(\[*])([A-Z])(?:$|[\s).\]:,*])")


def pick_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The letter (A, B, …) a free-text answer picks among `choices`, or None.

    In order: a standalone capital letter within range as the first such token ("B",
    "(B)", "B.", "Answer: B"); else the one choice whose normalised text appears in the
    normalised prediction (if exactly one does)."""
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    for m in _LETTER.finditer(prediction.strip()):
        if m.group(1) in letters:
            return m.group(1)
    said = f" {normalise(prediction)} "
    hits = [
        letters[i] for i, c in enumerate(choices) if normalise(c) and f" {normalise(c)} " in said
    ]
    return hits[0] if len(hits) == 1 else None


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F1 (β = 1), the best over the references."""
    p = tokens(prediction)
    best = 0.0
    for ref in references:
        r = tokens(ref)
        lcs = _lcs(p, r)
        if lcs:
            prec, rec = lcs / len(p), lcs / len(r)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def _ngrams(toks: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))


def corpus_bleu(
    predictions: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4
) -> float:
    """Corpus BLEU in [0, 1] (see the module docstring for the exact definition)."""
    if len(predictions) != len(references):
        raise ValueError("one list of references per prediction")
    matches = [0] * max_n
    totals = [0] * max_n
    hyp_len = ref_len = 0
    for pred, refs in zip(predictions, references, strict=True):
        h = tokens(pred)
        rs = [tokens(r) for r in refs]
        hyp_len += len(h)
        if rs:
            # Closest reference length; ties go to the shorter one.
            ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            hc = _ngrams(h, n)
            best: Counter[tuple[str, ...]] = Counter()
            for r in rs:
                best |= _ngrams(r, n)
            matches[n - 1] += sum(min(c, best[g]) for g, c in hc.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0 or matches[0] == 0:
        return 0.0
    log_p = 0.0
    for n in range(max_n):
        m, t = matches[n], totals[n]
        if n > 0 and m == 0:
            m, t = 1, t + 1
        log_p += math.log(m / t) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(log_p)
