"""Metric functions for evaluation tasks, each small enough to check by hand.

* multiple choice: :func:`mc_correct` (accuracy, ties count as wrong) and length-normalised accuracy (log-likelihood
  divided by the UTF-8 bytes of each choice);
* generation: :func:`exact_match`, :func:`f1` (SQuAD-style token overlap), :func:`contains`, after :func:`normalize`;
* perplexity: :func:`bits_per_byte` from summed negative log-likelihood (nats) and bytes;
* :func:`bootstrap_ci` (percentile bootstrap of the mean, fixed seed) and :func:`centered` accuracy,
  ``(acc - chance) / (1 - chance)``, so tasks with different numbers of choices aggregate on one scale (0 = chance).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    """SQuAD answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference."""
    p = normalize(prediction)
    return float(any(p == normalize(r) for r in references))


def f1(prediction: str, references: Sequence[str]) -> float:
    """Best token-overlap F1 of the prediction against the references (SQuAD definition)."""
    best = 0.0
    pred = normalize(prediction).split()
    for ref in references:
        gold = normalize(ref).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common == 0:
            continue
        precision, recall = common / len(pred), common / len(gold)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def contains(prediction: str, references: Sequence[str]) -> float:
    """1.0 when any normalised reference occurs inside the normalised prediction."""
    p = f" {normalize(prediction)} "
    return float(any(normalize(r) and f" {normalize(r)} " in p for r in references))


GENERATION_METRICS = {"exact_match": exact_match, "f1": f1, "contains": contains}


def mc_correct(scores: Sequence[float], gold: int) -> float:
    """1.0 when the gold choice has the strictly highest score; a tie for the top counts as wrong."""
    s = np.asarray(scores, dtype=np.float64)
    best = s.max()
    return float(s[gold] == best and int((s == best).sum()) == 1)


def mc_scores(logliks: Sequence[float], choices: Sequence[str]) -> tuple[list[float], list[float]]:
    """``(raw, normalised)`` scores: log-likelihoods, and log-likelihoods per UTF-8 byte of each choice."""
    norm = [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(logliks, choices)]
    return list(logliks), norm


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    return nll_nats / math.log(2) / max(1, n_bytes)


def bootstrap_ci(values: Sequence[float], n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (deterministic for a seed)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    if len(x) == 1:
        return (float(x[0]), float(x[0]))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_resamples, len(x)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def bootstrap_ratio_ci(numerators: Sequence[float], denominators: Sequence[float], n_resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Bootstrap CI of ``sum(num) / sum(den)`` resampling items (documents) — used for bits per byte."""
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if len(num) < 2:
        v = float(num.sum() / max(1e-12, den.sum()))
        return (v, v)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n_resamples, len(num)))
    ratios = num[idx].sum(axis=1) / np.maximum(den[idx].sum(axis=1), 1e-12)
    alpha = (1 - confidence) / 2
    return (float(np.quantile(ratios, alpha)), float(np.quantile(ratios, 1 - alpha)))


def paired_bootstrap_diff_ci(num_a: Sequence[float], den_a: Sequence[float], num_b: Sequence[float],
                             den_b: Sequence[float], n_resamples: int = 1000, confidence: float = 0.95,
                             seed: int = 0) -> tuple[float, float]:
    """Bootstrap CI of ``sum(num_b)/sum(den_b) - sum(num_a)/sum(den_a)`` where a and b are scores of two models on
    the *same* items: items are resampled jointly, so the item-to-item spread that both share cancels out (much
    tighter than comparing two separate CIs).  Means are the case ``den = 1`` per item."""
    na, da = np.asarray(num_a, dtype=np.float64), np.asarray(den_a, dtype=np.float64)
    nb, db = np.asarray(num_b, dtype=np.float64), np.asarray(den_b, dtype=np.float64)
    if not len(na) == len(da) == len(nb) == len(db):
        raise ValueError(f"paired scores need the same items: got {len(na)}, {len(da)}, {len(nb)}, {len(db)}")
    if len(na) < 2:
        v = float(nb.sum() / max(1e-12, db.sum()) - na.sum() / max(1e-12, da.sum()))
        return (v, v)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(na), size=(n_resamples, len(na)))
    diffs = nb[idx].sum(axis=1) / np.maximum(db[idx].sum(axis=1), 1e-12) - \
        na[idx].sum(axis=1) / np.maximum(da[idx].sum(axis=1), 1e-12)
    alpha = (1 - confidence) / 2
    return (float(np.quantile(diffs, alpha)), float(np.quantile(diffs, 1 - alpha)))


def centered(acc: float, chance: float) -> float:
    """``(acc - chance) / (1 - chance)``: 0 at chance, 1 when perfect (nanochat's CORE aggregation)."""
    if not 0 <= chance < 1:
        raise ValueError(f"chance must be in [0, 1), got {chance}")
    return (acc - chance) / (1 - chance)
