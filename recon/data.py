"""Datasets over the stores: points plus cached teacher targets.

Every random choice of an item (point subset, rotation, view/augmentation, prompt template) is
drawn from ``np.random.default_rng([seed, epoch, index])``: the same whatever the number of
DataLoader workers or ranks, and exactly reproducible after a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch.utils.data import Dataset

from pipeline.store import StoreError, open_store

PRELOAD_LIMIT_BYTES = 2 << 30


def normalize(points: np.ndarray) -> np.ndarray:
    """Centre on the mean and scale to max norm 1."""
    points = points - points.mean(axis=0, keepdims=True)
    scale = np.linalg.norm(points, axis=1).max()
    return points / max(scale, 1e-12)


def rotate_up(points: np.ndarray, angle: float) -> np.ndarray:
    """Rotate about the up (Y) axis."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=points.dtype)
    return points @ rot.T


@dataclass
class PretrainStores:
    """Validated, aligned inputs of pretraining."""

    shapes: pl.DataFrame
    rows: np.ndarray            # usable rows (points ok and image features ok)
    points: object              # np.ndarray or zarr.Array [N, P, 3]
    image: np.ndarray | None    # [N, V, A, Di] float16
    text: np.ndarray | None     # [C, T, Dt] float16
    category_index: np.ndarray  # [N] row -> index into text categories
    categories: list[str]
    excluded: int
    fingerprint: dict           # params of the stores read, for checkpoint compatibility

    @property
    def image_dim(self) -> int:
        return int(self.image.shape[-1]) if self.image is not None else 0

    @property
    def text_dim(self) -> int:
        return int(self.text.shape[-1]) if self.text is not None else 0


def open_pretrain_stores(cache: Path, use_image: bool = True, use_text: bool = True,
                         split: str | None = None) -> PretrainStores:
    """Open points + teacher stores, check they are aligned with shapes.parquet, drop failed rows.

    Raises StoreError with the reason when ids, dims or categories do not match.
    """
    shapes_path = cache / "shapes.parquet"
    if not shapes_path.exists():
        raise StoreError(f"{shapes_path} not found: run the index stage first")
    shapes = pl.read_parquet(shapes_path)
    ids = shapes["id"].to_list()
    points = open_store(cache / "points.zarr", expect_ids=ids, expect_arrays={"points": (-1, 3)})
    ok = points.ok.copy()
    fingerprint = {"points": points.params}
    image = text = None
    if use_image:
        image_store = open_store(cache / "teachers" / "image.zarr", expect_ids=ids,
                                 expect_arrays={"features": (-1, -1, -1)})
        image = np.asarray(image_store["features"][:])
        ok &= image_store.ok
        fingerprint["image"] = image_store.params
    categories = sorted(shapes["category"].unique().to_list())
    if use_text:
        text_store = open_store(cache / "teachers" / "text.zarr", expect_arrays={"features": (-1, -1)})
        missing = sorted(set(categories) - set(text_store.ids.tolist()))
        if missing:
            raise StoreError(f"{text_store.path} has no prompts for categories {missing}: rerun embed")
        text = np.asarray(text_store["features"][:])
        categories = text_store.ids.tolist()
        fingerprint["text"] = text_store.params
    lookup = {c: i for i, c in enumerate(categories)}
    category_index = np.array([lookup[c] for c in shapes["category"].to_list()])
    if split is not None:
        ok &= (shapes["split"] == split).to_numpy()
    array = points["points"]
    nbytes = int(np.prod(array.shape)) * array.dtype.itemsize
    data = np.asarray(array[:]) if nbytes <= PRELOAD_LIMIT_BYTES else array
    return PretrainStores(shapes=shapes, rows=np.flatnonzero(ok), points=data, image=image, text=text,
                          category_index=category_index, categories=categories,
                          excluded=int(len(ids) - ok.sum()), fingerprint=fingerprint)


IMAGE_VARIANTS = ("augmented", "all")


def variant_choices(variants: int, image_variants: str = "augmented") -> range:
    """The stored variants a training step may draw: with A > 1, the augmented ones 1..A-1 (the
    reference re-augments every step; the clean variant 0 is one more view of the same image),
    or all of them with ``image_variants='all'``; with A = 1, the clean view."""
    if image_variants not in IMAGE_VARIANTS:
        raise ValueError(f"unknown image_variants {image_variants!r}; choose from {IMAGE_VARIANTS}")
    return range(1, variants) if variants > 1 and image_variants == "augmented" else range(variants)


class PretrainDataset(Dataset):
    """Items: a random ``n_points`` subset, re-normalised and rotated about Y, with one random
    (view, variant) image target (variants from :func:`variant_choices`) and one random
    prompt-template text target."""

    def __init__(self, stores: PretrainStores, n_points: int = 1024, rotate: bool = True, seed: int = 0,
                 image_variants: str = "augmented"):
        self.s, self.n_points, self.rotate, self.seed = stores, n_points, rotate, seed
        self.variants = variant_choices(stores.image.shape[2], image_variants) if stores.image is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.s.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        row = int(self.s.rows[index])
        cloud = np.asarray(self.s.points[row], dtype=np.float32)
        pick = rng.choice(cloud.shape[0], self.n_points, replace=False)
        pts = normalize(cloud[pick])
        if self.rotate:
            pts = rotate_up(pts, rng.uniform(0.0, 2.0 * math.pi))
        item = {"points": torch.from_numpy(pts.astype(np.float32)),
                "label": torch.tensor(int(self.s.category_index[row])),
                "index": torch.tensor(row)}
        if self.s.image is not None:
            view = rng.integers(self.s.image.shape[1])
            variant = self.variants[rng.integers(len(self.variants))]
            item["img"] = torch.from_numpy(self.s.image[row, view, variant].astype(np.float32))
        if self.s.text is not None:
            templates = self.s.text.shape[1]
            item["text"] = torch.from_numpy(self.s.text[self.s.category_index[row], rng.integers(templates)].astype(np.float32))
        return item


def fixed_subset(cloud: np.ndarray, n_points: int, seed: int = 0) -> np.ndarray:
    """A deterministic, evaluation-time subset (same points for every model compared)."""
    pick = np.random.default_rng(seed).permutation(cloud.shape[0])[:n_points]
    return normalize(np.asarray(cloud, dtype=np.float32)[np.sort(pick)]).astype(np.float32)
