"""The alignment metrics of the LMFlow paper's Table 5, on generated responses.

Words are lower-cased `\\w+` runs and single punctuation marks (`words`); n-grams never
cross responses. Definitions (as in the GEM benchmark's lexical-diversity metrics):
- msttr-100: mean segmental type-token ratio — all responses' words in order, cut into
  consecutive 100-word segments (a shorter tail is dropped), each segment's distinct
  words / 100, averaged. None when there are fewer than 100 words.
- distinct-n: distinct n-grams / all n-grams, over all responses.
- unique-n: the number of n-grams that occur exactly once over all responses.
- length: mean words per response.
- ppl (perplexity): exp of the mean negative log-likelihood of the response tokens given
  their prompts, under a causal LM (eval/run.py).
- reward: mean reward (RewardScorer).
"""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def msttr(texts: list[str], segment: int = 100) -> float | None:
    stream = [w for t in texts for w in words(t)]
    segments = [stream[i:i + segment] for i in range(0, len(stream) - segment + 1, segment)]
    if not segments:
        return None
    return sum(len(set(s)) / segment for s in segments) / len(segments)


def _counts(texts: list[str], n: int) -> Counter:
    c: Counter = Counter()
    for t in texts:
        c.update(ngrams(words(t), n))
    return c


def distinct(texts: list[str], n: int) -> float:
    c = _counts(texts, n)
    total = sum(c.values())
    return len(c) / total if total else 0.0


def unique(texts: list[str], n: int) -> int:
    return sum(1 for v in _counts(texts, n).values() if v == 1)


def mean_length(texts: list[str]) -> float:
    return sum(len(words(t)) for t in texts) / len(texts) if texts else 0.0


def diversity(texts: list[str]) -> dict:
    """msttr-100, distinct-1/2, unique-1/2 and mean length of a list of responses."""
    return {"msttr-100": msttr(texts), "distinct-1": distinct(texts, 1), "distinct-2": distinct(texts, 2),
            "unique-1": unique(texts, 1), "unique-2": unique(texts, 2), "length": mean_length(texts)}
