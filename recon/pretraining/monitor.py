"""Evidence while pretraining trains: is it helping yet?

Per epoch (and at the end), on fixed subsets of train and test shapes (fixed points, eval mode,
no gradient, every image/text target the trainer may draw), from **one** encoder pass per shape
with every group visible (as zero-shot and the downstream tasks see them):

- the distillation losses next to the **mean-target baseline**: the loss of always predicting the
  train split's mean target (for ``cosine``, its mean direction). A loss at its baseline means
  nothing shape-specific was learned from that teacher; the reconstruction loss of the test
  shapes under fixed masks;
- a **probe** of the features: k-NN (k=5, cosine) on concat[CLS, IMG, TXT, max over patches] and a
  linear SVM (``LinearSVC(C=0.075)``, raw and train-standardised) on the reference SVM feature,
  test shapes classified from train shapes, for the model being trained and for the same
  architecture at random init, side by side. The random-init figure is the mean over
  ``baseline_seeds`` seeded twins (the first is the trained model's own starting point), with their
  standard deviation: the spread a pretrained encoder has to beat, not just one lucky or unlucky init;
- BatchNorm statistics as a controlled variable: the probe runs for the model and for every twin
  under each of ``bn_treatments`` (saved, reset, recalibrated on ``bn_clouds`` of the train shapes;
  :func:`recon.pretraining.probes.with_batchnorm`, always on a copy). ``probe_<key>`` is the model as
  saved, ``probe_<key>_<treatment>`` the others; ``probe_<key>_random_init_<treatment>`` the twins'
  mean per treatment and ``probe_<key>_random_init`` the strongest of them (± the std over seeds of
  that treatment): the figure the verdict compares with (:func:`recon.pretraining.probes.verdict`).

Nothing here draws from the global RNG: monitoring does not change what training computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recon.network.losses import global_loss
from recon.network.model import ReConPretrain, head_input, svm_input
from recon.pretraining.data import PretrainStores, fixed_subset
from recon.pretraining.probes import (
    BN_TREATMENTS,
    PRETRAINED_TREATMENT,
    check_treatments,
    knn_probe,
    per_treatment,
    random_init_like,
    strongest,
    svm_accuracy,
    verdict,
)
from recon.pretraining.targets import TargetStats

SPLITS = ("train", "test")
PARTS = ("cls", "img", "txt", "pooled")
#: the probe's figures that get a random-init baseline and a verdict
PROBE_KEYS = ("knn", "svm", "svm_std")


@dataclass
class MonitorSet:
    """Fixed inputs of one split: clouds [N, n, 3], labels [N], masks [N, G] and every target the
    trainer may draw for each shape, in the loss's space: image [N, K, Di], text [N, T, Dt]."""

    rows: np.ndarray
    clouds: np.ndarray
    labels: np.ndarray
    masks: torch.Tensor
    img: torch.Tensor | None
    text: torch.Tensor | None


def subset_rows(rows: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` of ``rows``, a seeded choice, in ascending order."""
    if limit <= 0 or len(rows) <= limit:
        return np.asarray(rows)
    return np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))


def monitor_set(stores: PretrainStores, rows: np.ndarray, n_points: int, seed: int, num_group: int,
                num_mask: int, variants: range, stats: TargetStats | None) -> MonitorSet:
    clouds = np.stack([fixed_subset(stores.points[r], n_points, seed) for r in rows])
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(len(rows), num_group, generator=generator).argsort(1)[:, :num_mask]
    masks = torch.zeros(len(rows), num_group, dtype=torch.bool).scatter_(1, order, True)
    img = text = None
    if stores.image is not None:
        dim = stores.image.shape[-1]
        block = np.asarray(stores.image[rows])[:, :, variants.start:variants.stop]
        img = torch.from_numpy(block.reshape(len(rows), -1, dim).astype(np.float32))
        img = stats.normalize("img", img) if stats is not None else img
    if stores.text is not None:
        text = torch.from_numpy(np.asarray(stores.text, np.float32)[stores.category_index[rows]])
        text = stats.normalize("text", text) if stats is not None else text
    return MonitorSet(rows, clouds, stores.category_index[rows], masks, img, text)


def best_constant(targets: torch.Tensor, kind: str) -> torch.Tensor | None:
    """The constant prediction a loss of ``kind`` is compared with: the mean target (smooth_l1,
    l2), the mean direction (cosine); None for infonce (no constant is meaningful in-batch)."""
    flat = targets.reshape(-1, targets.shape[-1]).double()
    if kind in ("smooth_l1", "l2"):
        return flat.mean(0)
    if kind == "cosine":
        return torch.nn.functional.normalize(flat, dim=-1).mean(0)
    return None


def expected_loss(pred: torch.Tensor, targets: torch.Tensor, kind: str) -> float:
    """Mean over shapes and over each shape's targets of the loss of ``pred`` [N, D] (or one
    constant [D]) against ``targets`` [N, K, D]: the loss the trainer's random draw has on average."""
    n, k, dim = targets.shape
    pred = pred.expand(n, dim) if pred.ndim == 1 else pred
    pred = pred[:, None].expand(n, k, dim).reshape(-1, dim)
    return float(global_loss(pred.double(), targets.reshape(-1, dim).double(), kind))


@dataclass
class Encoded:
    """What one encoder pass gives for a monitor set (numpy, float32)."""

    features: np.ndarray      # [N, 4C] concat[CLS, IMG, TXT, max over patches]
    svm: np.ndarray           # [N, 2C] the reference SVM feature
    img: torch.Tensor         # [N, Di] img_proj(IMG)
    text: torch.Tensor        # [N, Dt] text_proj(TXT)


@torch.no_grad()
def encode(model: ReConPretrain, s: MonitorSet, batch: int, device) -> Encoded:
    was_training = model.training
    model.eval()
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    for i in range(0, len(s.rows), batch):
        tokens = model.encode(torch.from_numpy(s.clouds[i:i + batch]).to(device))
        k = model.cfg.img_queries
        for part, value in zip(parts, (head_input(tokens, k), svm_input(tokens, k), *model.project(tokens))):
            part.append(value.float().cpu())
    model.train(was_training)
    features, svm, img, text = (torch.cat(p) for p in parts)
    return Encoded(features.numpy(), svm.numpy(), img, text)


@torch.no_grad()
def reconstruction_loss(model: ReConPretrain, s: MonitorSet, batch: int, device) -> float:
    """Chamfer-L2 of the masked groups under the set's fixed masks (eval mode)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(s.rows), batch):
        points = torch.from_numpy(s.clouds[i:i + batch]).to(device)
        total += float(model(points, mask=s.masks[i:i + batch].to(device))["loss_rec"]) * points.shape[0]
    model.train(was_training)
    return total / len(s.rows)


def probe(train: Encoded, test: Encoded, train_labels: np.ndarray, test_labels: np.ndarray, width: int,
          seed: int = 0, by_part: bool = False) -> dict:
    """k-NN on the 4C features and a linear SVM (raw and standardised) on the 2C SVM features,
    test shapes classified from train shapes (accuracies in %)."""
    result = {"knn": 100 * knn_probe(train.features, train_labels, test.features, test_labels)}
    if len(np.unique(train_labels)) > 1:
        result["svm"] = svm_accuracy(train.svm, train_labels, test.svm, test_labels, seed=seed)[1]
        mean, std = train.svm.mean(0), train.svm.std(0) + 1e-6
        result["svm_std"] = svm_accuracy((train.svm - mean) / std, train_labels, (test.svm - mean) / std,
                                         test_labels, seed=seed)[1]
    if by_part:
        for key, center in (("knn_by_part", False), ("knn_by_part_centered", True)):
            result[key] = {part: 100 * knn_probe(train.features[:, k * width:(k + 1) * width], train_labels,
                                                 test.features[:, k * width:(k + 1) * width], test_labels,
                                                 center=center)
                           for k, part in enumerate(PARTS)}
        # the projections: what the distillation losses shape (the tokens above also carry what they ignore)
        for part, train_x, test_x in (("img_proj", train.img, test.img), ("text_proj", train.text, test.text)):
            result["knn_by_part"][part] = 100 * knn_probe(train_x.numpy(), train_labels, test_x.numpy(), test_labels)
        result["knn_centered"] = 100 * knn_probe(train.features, train_labels, test.features, test_labels, center=True)
        # the spread across shapes the raw SVM sees, per part of its feature (queries | patches)
        half = train.svm.shape[1] // 2
        result["svm_feature_spread"] = {"queries": float(train.svm[:, :half].std(0).mean()),
                                        "patches": float(train.svm[:, half:].std(0).mean()),
                                        "queries_offset": float(np.abs(train.svm[:, :half].mean(0)).mean()),
                                        "patches_offset": float(np.abs(train.svm[:, half:].mean(0)).mean())}
    return result


class PretrainMonitor:
    """Fixed train/test subsets, their baselines and the random-init probe under every BatchNorm
    treatment, computed once; :meth:`record` measures the model being trained against them."""

    def __init__(self, stores: PretrainStores, train_rows: np.ndarray, test_rows: np.ndarray, model: ReConPretrain,
                 kind: str, n_points: int, variants: range, stats: TargetStats | None, limit: int = 512,
                 seed: int = 0, batch: int = 32, device="cpu", baseline_seeds: int = 1,
                 bn_treatments=BN_TREATMENTS, bn_clouds: int = 64):
        if baseline_seeds < 1:
            raise ValueError(f"baseline_seeds must be >= 1, got {baseline_seeds}")
        self.kind, self.batch, self.device, self.seed = kind, batch, device, seed
        self.treatments = check_treatments(bn_treatments)
        cfg = model.cfg
        self.width = cfg.feature_dim   # one part of the probe features (two_tower: both streams, 2C)
        self.sets = {name: monitor_set(stores, subset_rows(rows, limit, seed + k), n_points, seed, cfg.num_group,
                                       cfg.num_mask, variants, stats)
                     for k, (name, rows) in enumerate((("train", train_rows), ("test", test_rows))) if len(rows)}
        self.baselines: dict[str, float] = {}
        train = self.sets.get("train")
        for term in ("img", "text"):
            targets = getattr(train, term) if train is not None else None
            constant = best_constant(targets, kind) if targets is not None else None
            if constant is None or term not in cfg.targets:
                continue
            for name, s in self.sets.items():
                self.baselines[f"{name}_loss_{term}_baseline"] = expected_loss(constant.float(), getattr(s, term), kind)
        # the recalibrated treatment's clouds: a seeded choice of the train set's (evaluation inputs)
        self.bn_clouds = None
        if "recalibrated" in self.treatments and train is not None and bn_clouds > 0:
            chosen = subset_rows(np.arange(len(train.rows)), bn_clouds, seed + 2)
            self.bn_clouds = torch.from_numpy(train.clouds[chosen]).to(device)
        # random-init twins at seeds seed, seed+1, ...: the first is the trained model's starting point,
        # the others give the spread of the baseline; only the first one's features are kept (final()).
        # random_probes[treatment][k]: twin k's probe under that treatment
        self.random_probes: dict[str, list[dict]] = {}
        for k in range(baseline_seeds):
            twin = random_init_like(model, seed + k).to(device)
            encoded = per_treatment(twin, self.treatments if self.can_probe else [PRETRAINED_TREATMENT],
                                    self.bn_clouds, self.encode)
            if k == 0:
                self.random_encoded = encoded[PRETRAINED_TREATMENT]
            if self.can_probe:
                for treatment, e in encoded.items():
                    self.random_probes.setdefault(treatment, []).append(self.probe(e))
        self.last_probes: dict[str, dict] = {}

    @property
    def can_probe(self) -> bool:
        return "train" in self.sets and "test" in self.sets

    def encode(self, model: ReConPretrain) -> dict[str, Encoded]:
        return {name: encode(model, s, self.batch, self.device) for name, s in self.sets.items()}

    def probe(self, encoded: dict[str, Encoded], by_part: bool = False) -> dict:
        return probe(encoded["train"], encoded["test"], self.sets["train"].labels, self.sets["test"].labels,
                     self.width, self.seed, by_part)

    def random_init(self, key: str) -> dict[str, float]:
        """{treatment: the twins' mean ``key`` figure} (the random-init variants a verdict takes the max of)."""
        return {t: float(np.mean([r[key] for r in probes])) for t, probes in self.random_probes.items()
                if all(key in r for r in probes)}

    def record(self, model: ReConPretrain, encoded: dict[str, Encoded] | None = None) -> dict[str, float]:
        """Flat numbers for one row of history.csv."""
        encoded = encoded or self.encode(model)
        out: dict[str, float] = {}
        active = set(model.cfg.targets)
        for name, s in self.sets.items():
            for term in ("img", "text"):
                targets = getattr(s, term)
                if term not in active or targets is None:
                    continue
                value = expected_loss(getattr(encoded[name], term), targets, self.kind)
                out[f"{name}_loss_{term}"] = value
                baseline = self.baselines.get(f"{name}_loss_{term}_baseline")
                if baseline is not None:
                    out[f"{name}_loss_{term}_baseline"] = baseline
                    out[f"{name}_loss_{term}_ratio"] = value / baseline if baseline > 0 else float("nan")
        if "rec" in active and "test" in self.sets:
            out["test_loss_rec"] = reconstruction_loss(model, self.sets["test"], self.batch, self.device)
        if self.can_probe:
            # the model as saved (already encoded), then under the other treatments: copies, training is unchanged
            self.last_probes = current = per_treatment(model, self.treatments, self.bn_clouds,
                                                       lambda net: self.probe(self.encode(net)), self.probe(encoded))
            for key in PROBE_KEYS:
                if key not in current[PRETRAINED_TREATMENT]:
                    continue
                out[f"probe_{key}"] = current[PRETRAINED_TREATMENT][key]
                out.update({f"probe_{key}_{t}": r[key] for t, r in current.items() if t != PRETRAINED_TREATMENT})
                means = self.random_init(key)
                out.update({f"probe_{key}_random_init_{t}": m for t, m in means.items()})
                # the strongest variant: a max over the baseline's test figures, which can only make it
                # stronger (a conservative verdict); its std is over the seeds of that treatment
                best = strongest(means)
                out[f"probe_{key}_random_init"] = means[best]
                out[f"probe_{key}_random_init_std"] = float(np.std([r[key] for r in self.random_probes[best]]))
        return out

    def verdicts(self) -> dict:
        """Per probe figure: the model as saved against the strongest random-init treatment, from the last record."""
        return {key: verdict({t: r[key] for t, r in self.last_probes.items()}, self.random_init(key))
                for key in PROBE_KEYS if key in self.last_probes.get(PRETRAINED_TREATMENT, {})}

    def final(self, model: ReConPretrain) -> dict:
        """The end-of-run section of metrics.json: the record, the probe per feature part and the
        feature spread behind the raw-SVM figure, for the model as saved and for random init (its first
        seed, as initialised), the probe under every BatchNorm treatment (the model's; every baseline
        seed's, with their mean and std) and the verdict per probe figure."""
        encoded = self.encode(model)
        out: dict = {"record": self.record(model, encoded), "shapes": {k: int(len(s.rows)) for k, s in self.sets.items()}}
        if self.can_probe:
            random_init = {}
            for t, probes in self.random_probes.items():
                keys = [k for k in PROBE_KEYS if all(k in r for r in probes)]
                random_init[t] = {"mean": {k: float(np.mean([r[k] for r in probes])) for k in keys},
                                  "std": {k: float(np.std([r[k] for r in probes])) for k in keys},
                                  "seeds": {str(self.seed + i): r for i, r in enumerate(probes)}}
            clouds = 0 if self.bn_clouds is None else len(self.bn_clouds)
            out["probe"] = {"pretrained": self.probe(encoded, by_part=True),
                            "random_init": self.probe(self.random_encoded, by_part=True),
                            "bn_treatments": {"pretrained": self.last_probes, "random_init": random_init,
                                              "recalibrated_clouds": clouds},
                            "verdict": self.verdicts()}
        return out
