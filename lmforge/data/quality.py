"""A small quality classifier: hashed word 1-2-grams → logistic regression ("good" reference text vs. raw web text).

    metrics = train_quality(good_texts, bad_texts, "runs/quality")   # held-out precision / recall / AUC
    model = QualityModel.load("runs/quality")
    model.score(["some text", ...])                                   # P(good) per text

The model is two small files, no pickle: ``quality_model.npz`` (weights) and ``quality_model.json`` (vectorizer
settings, metrics).  The ``quality_v1`` step scores every document into ``meta.quality`` and drops those below a
threshold (``quality_low``).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.artifacts import atomic_path, write_json
from lmforge.data.documents import Document
from lmforge.data.steps import BatchStep

MODEL_NPZ = "quality_model.npz"
MODEL_JSON = "quality_model.json"


def _vectorizer(n_features: int):
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(n_features=n_features, ngram_range=(1, 2), alternate_sign=False, norm="l2",
                             lowercase=True, token_pattern=r"(?u)\b\w+\b|[^\w\s]")


def chunk_words(texts: list[str], rng: random.Random, min_words: int = 20, max_words: int = 300) -> list[str]:
    """Cut texts into pieces of a random number of words (same distribution for every class, so length alone does not
    tell the classes apart)."""
    out = []
    for text in texts:
        words = text.split()
        i = 0
        while i < len(words):
            n = rng.randint(min_words, max_words)
            piece = words[i : i + n]
            if len(piece) >= min_words:
                out.append(" ".join(piece))
            i += n
    return out


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


class QualityModel:
    def __init__(self, coef: np.ndarray, intercept: float, n_features: int, meta: dict[str, Any] | None = None) -> None:
        self.coef = coef.astype(np.float32)
        self.intercept = float(intercept)
        self.n_features = n_features
        self.meta = meta or {}
        self._vec = _vectorizer(n_features)

    def score(self, texts: list[str]) -> np.ndarray:
        """P(good) for each text."""
        x = self._vec.transform(texts)
        z = x @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))

    def save(self, out_dir: str | os.PathLike) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / MODEL_NPZ) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, coef=self.coef, intercept=np.array([self.intercept]))
        write_json(out / MODEL_JSON, {"n_features": self.n_features, "ngram_range": [1, 2], **self.meta})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QualityModel":
        p = Path(path)
        if not (p / MODEL_NPZ).is_file():
            raise FileNotFoundError(f"{p}: no {MODEL_NPZ} here (train one with train_quality / "
                                    "`lmforge data train-quality`)")
        meta = json.loads((p / MODEL_JSON).read_text())
        with np.load(p / MODEL_NPZ) as z:
            return cls(z["coef"], float(z["intercept"][0]), int(meta["n_features"]), meta)


def train_quality(good: list[str], bad: list[str], out_dir: str | os.PathLike | None = None, *,
                  n_features: int = 1 << 18, held_out: float = 0.2, seed: int = 0, c: float = 4.0) -> dict[str, Any]:
    """Train on word-chunks of ``good`` vs ``bad`` texts; returns held-out metrics (and a length-only baseline's AUC);
    saves the model to ``out_dir`` if given."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import precision_score, recall_score

    rng = random.Random(seed)
    g, b = chunk_words(good, rng), chunk_words(bad, rng)
    if len(g) < 10 or len(b) < 10:
        raise ValueError(f"too little training text: {len(g)} good and {len(b)} bad pieces (need 10 of each)")
    texts = g + b
    labels = np.array([1] * len(g) + [0] * len(b))
    order = list(range(len(texts)))
    rng.shuffle(order)
    n_test = max(2, int(len(order) * held_out))
    test, train = order[:n_test], order[n_test:]
    vec = _vectorizer(n_features)
    x = vec.transform(texts)
    clf = LogisticRegression(C=c, max_iter=1000, class_weight="balanced")
    clf.fit(x[train], labels[train])
    model = QualityModel(clf.coef_[0], float(clf.intercept_[0]), n_features)
    p = model.score([texts[i] for i in test])
    y = labels[test]
    lengths = np.log1p([[len(t)] for t in texts])
    base = LogisticRegression().fit(lengths[train], labels[train])
    metrics = {
        "train_pieces": len(train), "test_pieces": n_test, "good_pieces": len(g), "bad_pieces": len(b),
        "precision": round(float(precision_score(y, p >= 0.5)), 4),
        "recall": round(float(recall_score(y, p >= 0.5)), 4),
        "auc": round(auc(y, p), 4),
        "length_baseline_auc": round(auc(y, base.predict_proba(lengths[test])[:, 1]), 4),
    }
    model.meta = {"metrics": metrics}
    if out_dir is not None:
        model.save(out_dir)
    return metrics


class QualityScore(BatchStep):
    """``meta.quality`` = P(good) from a trained :class:`QualityModel`; drops ``quality_low`` below ``threshold``."""

    name = "quality_v1"

    def __init__(self, model_dir: str | os.PathLike, threshold: float = 0.0) -> None:
        super().__init__()
        self.model = QualityModel.load(model_dir)
        self.threshold = threshold

    def process_batch(self, docs: list[Document]) -> list[Document | str]:
        scores = self.model.score([d.text for d in docs])
        out: list[Document | str] = []
        for doc, s in zip(docs, scores):
            doc.meta["quality"] = round(float(s), 4)
            out.append("quality_low" if s < self.threshold else doc)
        return out
