"""Classification data for fine-tuning: the store reader, FPS supersets, augmentation, the
training set and the voting views.

Sampling follows the reference runner: every cloud (normalised first when the recipe says so)
is reduced once to an FPS superset (1200 points for 1024, 2400 for 2048, 4800 for 4096, all for
8192, capped by what is stored); training draws a random ``n_points`` subset of it each step;
the single-pass evaluation uses the first ``n_points`` FPS points (= FPS to ``n_points``); voting
averages the logits of ``votes`` passes over random subsets with the recipe's test augmentation.
Every random draw is seeded by (seed, epoch, row), so a resumed run continues exactly.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.store import open_store
from recon.downstream.recipes import Profile
from recon.network.pointops import fps_indices
from recon.pretraining.data import normalize, rotate_up

SUPERSET = {1024: 1200, 2048: 2400, 4096: 4800, 8192: 8192}


@dataclass
class ClsData:
    """Usable rows of a classification store (or a part of it)."""

    points: np.ndarray          # [N, P, 3] float32
    labels: np.ndarray          # [N] int64
    ids: np.ndarray             # [N] str
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: np.ndarray) -> ClsData:
        rows = np.asarray(rows, dtype=np.int64)
        return ClsData(self.points[rows], self.labels[rows], self.ids[rows], self.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_classification(path: str | Path, split: str | None = None) -> ClsData:
    """Ok rows of a classification store, optionally of one split; raises StoreError when the
    store is not one."""
    store = open_store(path, expect_arrays={"points": (-1, 3), "label": (), "split": ()})
    keep = store.ok.copy()
    splits = list(store.params.get("splits", []))
    if split is not None:
        if split not in splits:
            raise ValueError(f"{path} has no split {split!r} (splits: {splits})")
        keep &= np.asarray(store["split"][:]) == splits.index(split)
    rows = np.flatnonzero(keep)
    points = np.asarray(store["points"][:], dtype=np.float32)[rows] if rows.size else \
        np.zeros((0, *store["points"].shape[1:]), np.float32)
    labels = np.asarray(store["label"][:], dtype=np.int64)[rows]
    return ClsData(points, labels, store.ids[rows], list(store.params["class_names"]))


def superset_size(n_points: int, available: int) -> int:
    """Size of the FPS superset training subsets are drawn from (reference runner), capped."""
    return min(SUPERSET.get(n_points, math.ceil(n_points * 1.171875)), available)


#: FPS results by content: every fine-tuning seed, few-shot fold and study arm reuses the supersets
#: of the same clouds instead of recomputing them (bounded; least recently used dropped first)
FPS_MEMO_BYTES = 1 << 30
_FPS_MEMO: OrderedDict[tuple, np.ndarray] = OrderedDict()


def fps_order(points: np.ndarray, k: int, device: str | torch.device = "cpu", batch: int = 64) -> np.ndarray:
    """The first ``k`` farthest-point-sampled points of every cloud, in FPS order [N, k, 3].

    With ``k`` equal to the stored count the clouds are returned as they are: FPS from index 0
    picks the same groups whatever the order of the other points.
    """
    if k >= points.shape[1]:
        return np.ascontiguousarray(points, dtype=np.float32)
    key = (hashlib.blake2b(np.ascontiguousarray(points).view(np.uint8), digest_size=16).hexdigest(),
           points.shape, str(points.dtype), k)
    if key not in _FPS_MEMO:
        picks = fps_indices(points, k, device, batch)
        _FPS_MEMO[key] = np.ascontiguousarray(np.take_along_axis(points, picks[..., None], axis=1), dtype=np.float32)
        while sum(v.nbytes for v in _FPS_MEMO.values()) > FPS_MEMO_BYTES and len(_FPS_MEMO) > 1:
            _FPS_MEMO.popitem(last=False)
    _FPS_MEMO.move_to_end(key)
    return _FPS_MEMO[key].copy()


def prepare(data: ClsData, recipe: Profile, device: str | torch.device = "cpu") -> np.ndarray:
    """Normalise (when the recipe says so) and reduce to the FPS superset [N, S, 3]."""
    pts = data.points
    if recipe.normalize:
        pts = np.stack([normalize(c) for c in pts]).astype(np.float32) if len(pts) else pts
    return fps_order(pts, superset_size(recipe.n_points, pts.shape[1]), device)


def eval_clouds(data: ClsData, n_points: int, normalize_first: bool = True,
                device: str | torch.device = "cpu") -> np.ndarray:
    """Deterministic evaluation inputs: (normalised) clouds reduced by FPS to ``n_points``."""
    pts = data.points
    if normalize_first and len(pts):
        pts = np.stack([normalize(c) for c in pts]).astype(np.float32)
    return fps_order(pts, min(n_points, pts.shape[1]), device)


def augment(points: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """``rotate`` (about Y), ``scale`` (U(2/3, 3/2) per axis), ``scale_translate`` (+ U(-0.2, 0.2))."""
    if kind == "rotate":
        return rotate_up(points, rng.uniform(0.0, 2.0 * math.pi)).astype(np.float32)
    if kind == "scale":
        return (points * rng.uniform(2 / 3, 3 / 2, 3)).astype(np.float32)
    if kind == "scale_translate":
        return (points * rng.uniform(2 / 3, 3 / 2, 3) + rng.uniform(-0.2, 0.2, 3)).astype(np.float32)
    return points


def random_view(cloud: np.ndarray, n_points: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A random ``n_points`` subset of the superset (random order), augmented."""
    pick = rng.choice(cloud.shape[0], n_points, replace=False)
    return augment(cloud[pick], kind, rng)


class TrainSet(Dataset):
    """Items: a random, augmented subset of a superset cloud; draws seeded by (seed, epoch, row)."""

    def __init__(self, superset: np.ndarray, labels: np.ndarray, n_points: int, kind: str, seed: int):
        self.superset, self.labels, self.n_points, self.kind, self.seed = superset, labels, n_points, kind, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        pts = random_view(self.superset[index], self.n_points, self.kind, rng)
        return {"points": torch.from_numpy(np.ascontiguousarray(pts)), "label": torch.tensor(int(self.labels[index]))}


def vote_views(superset: np.ndarray, n_points: int, votes: int, kind: str, seed: int) -> Iterator[np.ndarray]:
    """The ``votes`` augmented inputs [N, n_points, 3] that voting averages over."""
    for v in range(votes):
        yield np.stack([random_view(c, n_points, kind, np.random.default_rng([seed, 1_000_003, v, i]))
                        for i, c in enumerate(superset)]).astype(np.float32)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): ``fraction`` of each class (at least one where a class has
    two or more shapes), seeded."""
    rng = np.random.default_rng([seed, 7])
    val = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n = round(fraction * len(rows))
        n = min(max(n, 1 if len(rows) >= 2 else 0), len(rows) - 1)
        val.extend(rows[:n].tolist())
    val_rows = np.sort(np.asarray(val, dtype=np.int64))
    return np.setdiff1d(np.arange(len(labels)), val_rows), val_rows
