"""Reading part-segmentation stores for training, and the reference's training-time sampling.

The reference (``segmentation/dataset.py`` ``PartNormalDataset``, ``segmentation/main.py``):

- trains on ``trainval`` (train + val lists) and scores on ``test``; here ``load_partseg(path,
  ["train", "val"])`` and ``load_partseg(path, "test")``;
- redraws ``npoints`` (2,048) points with replacement from the whole source cloud at every access,
  test items included (so its test score is itself random); a store holds one fixed draw, and
  :func:`random_points` redraws from it, seeded by (seed, epoch, row);
- augments each training batch with ``provider.random_scale_point_cloud`` (one isotropic scale
  U(0.8, 1.25) per cloud) then ``provider.shift_point_cloud`` (a shift U(-0.1, 0.1) per axis, per
  cloud): :func:`scale_and_translate`. Not the classification's ``PointcloudScaleAndTranslate``
  (per-axis scale U(2/3, 3/2), shift U(-0.2, 0.2)). No rotation, no jitter; test items are not
  augmented. Normals are not used (``--normal`` is off in ``seg.sh``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.store import StoreError, open_store

SCALE_RANGE = (0.8, 1.25)     # provider.random_scale_point_cloud: one factor per cloud
SHIFT_RANGE = (-0.1, 0.1)     # provider.shift_point_cloud: one offset per axis, per cloud


@dataclass
class SegData:
    """Usable rows of a part-segmentation store (or a part of it)."""

    points: np.ndarray                 # [N, P, 3] float32, unit sphere
    part: np.ndarray                   # [N, P] int64, global part ids
    label: np.ndarray                  # [N] int64, category index into class_names
    ids: np.ndarray                    # [N] str
    class_names: list[str]
    category_parts: list[list[int]]    # global part ids of each category, aligned with class_names
    num_parts: int

    def __len__(self) -> int:
        return len(self.label)

    def subset(self, rows: np.ndarray) -> SegData:
        rows = np.asarray(rows, dtype=np.int64)
        return SegData(self.points[rows], self.part[rows], self.label[rows], self.ids[rows],
                       self.class_names, self.category_parts, self.num_parts)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _read_rows(array, rows: np.ndarray, dtype) -> np.ndarray:
    """``array[rows]`` reading only the span the rows cover (a split is a contiguous block)."""
    if rows.size == 0:
        return np.zeros((0, *array.shape[1:]), dtype=dtype)
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    return np.asarray(array[lo:hi], dtype=dtype)[rows - lo]


def load_partseg(path: str | Path, splits: str | list[str]) -> SegData:
    """The ok rows of ``splits`` (one name or several, e.g. ``["train", "val"]``) of a store
    written by ``pipeline.partseg_store``, in store order. StoreError when the store is not a
    part-segmentation store, ValueError when a split is not in it."""
    store = open_store(path)
    if store.params.get("task") != "partseg":
        raise StoreError(f"{path} is not a part-segmentation store (task {store.params.get('task')!r}); "
                         "write one with `recon convert shapenetpart`, `demo-parts` or `labeled-psb-parts`")
    store = open_store(path, expect_arrays={"points": (-1, 3), "part": (-1,), "label": (), "split": ()})
    wanted = [splits] if isinstance(splits, str) else list(splits)
    known = list(store.params["splits"])
    unknown = [s for s in wanted if s not in known]
    if not wanted or unknown:
        raise ValueError(f"{path} has no split {unknown or wanted!r} (splits: {known})")
    keep = store.ok & np.isin(np.asarray(store["split"][:]), [known.index(s) for s in wanted])
    rows = np.flatnonzero(keep)
    return SegData(points=_read_rows(store["points"], rows, np.float32),
                   part=_read_rows(store["part"], rows, np.int64),
                   label=np.asarray(store["label"][:], dtype=np.int64)[rows],
                   ids=store.ids[rows],
                   class_names=list(store.params["class_names"]),
                   category_parts=[list(p) for p in store.params["category_parts"]],
                   num_parts=int(store.params["num_parts"]))


def scale_and_translate(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The reference's segmentation training augmentation on [..., P, 3]: every cloud times one
    factor U(0.8, 1.25), plus one offset U(-0.1, 0.1) per axis (scales drawn first, as the
    reference draws the batch's scales before its shifts). float32."""
    lead = points.shape[:-2]
    scale = rng.uniform(*SCALE_RANGE, (*lead, 1, 1))
    shift = rng.uniform(*SHIFT_RANGE, (*lead, 1, 3))
    return (points * scale + shift).astype(np.float32)


def random_points(n_points: int, available: int, seed: int, epoch: int, index: int) -> np.ndarray:
    """Indices of ``n_points`` draws with replacement out of ``available`` stored points, a pure
    function of (seed, epoch, row): the reference's per-access ``np.random.choice(n, npoints,
    replace=True)``, reproducible and resumable."""
    return np.random.default_rng([seed, epoch, index]).choice(available, n_points, replace=True)


class SegTrainSet(Dataset):
    """Training items ``{points [n, 3], part [n], label}``: the stored points (or, with
    ``resample``, :func:`random_points` of them), then :func:`scale_and_translate` when
    ``augment``; every draw seeded by (seed, epoch, row)."""

    def __init__(self, data: SegData, n_points: int, seed: int, resample: bool = True, augment: bool = True):
        if not resample and n_points != data.points.shape[1]:
            raise ValueError(f"without resampling n_points must be the stored {data.points.shape[1]}, got {n_points}")
        self.data, self.n_points, self.seed, self.resample, self.augment = data, n_points, seed, resample, augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pts, part = self.data.points[index], self.data.part[index]
        if self.resample:
            pick = random_points(self.n_points, pts.shape[0], self.seed, self.epoch, index)
            pts, part = pts[pick], part[pick]
        if self.augment:
            pts = scale_and_translate(pts, np.random.default_rng([self.seed, self.epoch, index, 1]))
        return {"points": torch.from_numpy(np.ascontiguousarray(pts, dtype=np.float32)),
                "part": torch.from_numpy(np.ascontiguousarray(part, dtype=np.int64)),
                "label": torch.tensor(int(self.data.label[index]))}
