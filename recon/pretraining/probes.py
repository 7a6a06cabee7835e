"""Frozen-feature probes of an encoder, shared by the pretraining monitor, `recon evaluate` and
the study: cosine k-NN, the reference linear SVM (``LinearSVC(C=0.075)``), batch-wise feature
extraction, the same network at random init (the baseline a pretrained encoder must beat), the
BatchNorm treatments every probed network is measured under, and the verdict of a probe.

BatchNorm running statistics are a controlled variable: on a held-out real dataset they alone moved
a linear probe of the demo's student by up to 7 points either way, enough to decide whether
pretraining beat random init (issue #23). So every network a probe compares is measured under each
treatment (:data:`BN_TREATMENTS`, :func:`with_batchnorm`), and :func:`verdict` compares the
pretrained network's fixed treatment with the strongest random-init one."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from recon.network.model import ReConPretrain, recalibrate_batchnorm

#: what happens to a network's BatchNorm running statistics before a frozen probe:
#: ``saved`` as the checkpoint has them (a random init: as initialised, mean 0 / variance 1);
#: ``reset`` set to their initial values (mean 0, variance 1, no batches tracked), for a pretrained
#: network too; ``recalibrated`` re-estimated on seeded downstream train clouds in evaluation inputs
#: (:func:`recon.network.model.recalibrate_batchnorm`: the patch embedding and projection norms)
BN_TREATMENTS = ("saved", "reset", "recalibrated")
#: the treatment of the pretrained network's figure in a verdict: fixed, never chosen on test figures;
#: ``saved`` is the network as delivered, the one fine-tuning and export start from
PRETRAINED_TREATMENT = "saved"

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


def check_treatments(treatments: Sequence[str]) -> list[str]:
    """``treatments`` in :data:`BN_TREATMENTS` order; refuses unknown names and a list without
    :data:`PRETRAINED_TREATMENT` (the pretrained figure of every verdict)."""
    unknown = sorted(set(treatments) - set(BN_TREATMENTS))
    if unknown:
        raise ValueError(f"unknown BatchNorm treatment(s) {unknown}; choose from {list(BN_TREATMENTS)}")
    if PRETRAINED_TREATMENT not in treatments:
        raise ValueError(f"the BatchNorm treatments must include {PRETRAINED_TREATMENT!r}: the pretrained figure "
                         f"of every verdict (got {list(treatments)})")
    return [t for t in BN_TREATMENTS if t in treatments]


def batchnorms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def at_initial_statistics(model: torch.nn.Module) -> bool:
    """True when every BatchNorm's running statistics are their initial values (``reset`` would change nothing)."""
    return all(m.running_mean is None or (not m.running_mean.any() and bool((m.running_var == 1).all())
                                          and int(m.num_batches_tracked) == 0)
               for m in batchnorms(model))


def with_batchnorm(model: ReConPretrain, treatment: str, clouds: torch.Tensor | None = None,
                   batch: int = 32) -> ReConPretrain:
    """A deep copy of ``model`` (mode, device and ``target_stats`` kept) whose BatchNorm running
    statistics are treated as :data:`BN_TREATMENTS` says; weights and ``model`` itself are untouched.
    ``recalibrated`` needs ``clouds`` [N, n, 3] on the model's device (evaluation inputs)."""
    if treatment not in BN_TREATMENTS:
        raise ValueError(f"unknown BatchNorm treatment {treatment!r}; choose from {list(BN_TREATMENTS)}")
    if treatment == "recalibrated" and (clouds is None or not len(clouds)):
        raise ValueError("the recalibrated treatment needs train clouds")
    treated = copy.deepcopy(model)
    if treatment == "reset":
        for m in batchnorms(treated):
            m.reset_running_stats()
    elif treatment == "recalibrated":
        recalibrate_batchnorm(treated, clouds, batch)
    return treated


def per_treatment(model: ReConPretrain, treatments: Sequence[str], clouds: torch.Tensor | None,
                  measure: Callable[[ReConPretrain], Any], saved: Any = None) -> dict[str, Any]:
    """``{treatment: measure(model under it)}`` for each of ``treatments`` (``saved``'s result may be
    given). ``recalibrated`` is left out without ``clouds``; ``reset`` of a network whose statistics
    are still their initial values (a random init) is ``saved``'s result, not a recomputation."""
    results: dict[str, Any] = {}
    for t in check_treatments([*treatments, PRETRAINED_TREATMENT]):
        if t == "saved":
            results[t] = saved if saved is not None else measure(model)
        elif t == "reset" and at_initial_statistics(model):
            results[t] = copy.deepcopy(results["saved"])
        elif t == "recalibrated" and (clouds is None or not len(clouds)):
            continue
        else:
            results[t] = measure(with_batchnorm(model, t, clouds))
    return {t: r for t, r in results.items() if t in treatments}


def strongest(figures: dict[str, float]) -> str:
    """The treatment with the highest figure (the first of equals in :data:`BN_TREATMENTS` order; NaN never wins)."""
    finite = {t: v for t, v in figures.items() if v == v}
    return max(finite or figures, key=lambda t: (finite or figures)[t])


def verdict(pretrained: dict[str, float], random_init: dict[str, float]) -> dict[str, Any]:
    """One probe's verdict: the pretrained network's figure under :data:`PRETRAINED_TREATMENT` (a
    fixed treatment) against the **strongest** random-init variant, the max over treatments of the
    random-init figure (a mean over seeds where there are several). That max is a choice on test
    figures, but of the baseline: it can only make the baseline stronger, so the verdict is
    conservative (a pretrained network that wins, wins against every treatment of the baseline).
    ``margin`` > 0: pretraining helped on this probe."""
    best = strongest(random_init)
    mine = pretrained[PRETRAINED_TREATMENT]
    return {"pretrained": mine, "pretrained_treatment": PRETRAINED_TREATMENT, "random_init": random_init[best],
            "random_init_treatment": best, "margin": mine - random_init[best]}


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
