"""Sanity statistics of cached teacher features: do they separate the categories?"""

from __future__ import annotations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine_within_between(features: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean cosine similarity over pairs of the same label (excluding self) and of different labels."""
    u = _unit(features)
    sim = u @ u.T
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    diff = labels[:, None] != labels[None, :]
    within = float(sim[same].mean()) if same.any() else float("nan")
    between = float(sim[diff].mean()) if diff.any() else float("nan")
    return within, between


def knn_accuracy(features: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-nearest-neighbour (cosine) accuracy; majority vote, ties to the nearest."""
    n = len(labels)
    if n < 2:
        return float("nan")
    u = _unit(features)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    k = min(k, n - 1)
    nearest = np.argsort(-sim, axis=1)[:, :k]
    correct = 0
    for i in range(n):
        votes = labels[nearest[i]]
        values, counts = np.unique(votes, return_counts=True)
        best = values[counts == counts.max()]
        pick = next(v for v in votes if v in best)  # ties: the nearer neighbour's label
        correct += pick == labels[i]
    return correct / n


def feature_report(features: np.ndarray, labels: np.ndarray, k: int = 5) -> dict[str, float]:
    """Norms, within/between-category cosine and kNN accuracy of one row per item."""
    norms = np.linalg.norm(features.astype(np.float64), axis=1)
    within, between = cosine_within_between(features, labels)
    return {"items": int(len(labels)), "categories": int(len(np.unique(labels))),
            "norm_mean": float(norms.mean()), "norm_std": float(norms.std()),
            "cosine_within": within, "cosine_between": between,
            f"knn{k}_accuracy": knn_accuracy(features, labels, k),
            "chance_accuracy": float(np.bincount(np.unique(labels, return_inverse=True)[1]).max() / len(labels))}
