"""Frozen-feature probes of an encoder, shared by the pretraining monitor, `recon evaluate` and
the study: cosine k-NN, the reference linear SVM (``LinearSVC(C=0.075)``), batch-wise feature
extraction, and the same network at random init (the baseline a pretrained encoder must beat)."""

from __future__ import annotations

import numpy as np
import torch

from recon.network.model import ReConPretrain

SVM_C = 0.075
#: liblinear's iteration cap. The reference keeps sklearn's default (1,000), which stops before
#: convergence on some feature sets (and warns); the protocol means the optimum of C = 0.075.
SVM_MAX_ITER = 20_000


def random_init_like(model: ReConPretrain, seed: int = 0) -> ReConPretrain:
    """The same architecture and configuration at random init, seeded (the global RNG is left as it
    was): the baseline a pretrained encoder has to beat."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        baseline = type(model)(model.cfg).eval()
    baseline.target_stats = model.target_stats    # the same map back into teacher space (zero-shot)
    return baseline


@torch.no_grad()
def batched(fn, clouds: np.ndarray, batch: int, device: torch.device | str) -> list[np.ndarray]:
    """Apply ``fn`` (returning a tensor or a tuple of tensors) batch-wise; concatenated numpy outputs."""
    outs: list[list[np.ndarray]] = []
    for i in range(0, len(clouds), batch):
        res = fn(torch.from_numpy(np.ascontiguousarray(clouds[i:i + batch])).to(device))
        res = res if isinstance(res, tuple) else (res,)
        outs.append([r.float().cpu().numpy() for r in res])
    return [np.concatenate(parts) for parts in zip(*outs)]


def svm_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 C: float = SVM_C, seed: int = 0) -> tuple[float, float]:
    """(train accuracy, test accuracy) in % of ``LinearSVC(C)`` fitted on the train features."""
    from sklearn.svm import LinearSVC

    clf = LinearSVC(C=C, random_state=seed, max_iter=SVM_MAX_ITER)
    clf.fit(train_x, train_y)
    return (float((clf.predict(train_x) == train_y).mean() * 100),
            float((clf.predict(test_x) == test_y).mean() * 100))


def knn_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
              k: int = 5, center: bool = False) -> float:
    """Cosine k-NN accuracy (fraction) of test features against train features, majority vote;
    ``center`` subtracts the train features' mean first (a common offset then no longer dominates
    every cosine)."""
    if not len(test_y):
        return float("nan")
    if center:
        mean = train_x.mean(axis=0, keepdims=True)
        train_x, test_x = train_x - mean, test_x - mean
    sim = unit_rows(test_x) @ unit_rows(train_x).T
    nearest = np.argsort(-sim, axis=1)[:, :min(k, len(train_y))]
    pred = np.array([np.bincount(votes).argmax() for votes in train_y[nearest]])
    return float((pred == test_y).mean())


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
