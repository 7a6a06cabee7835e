"""Datasets over the stores: points plus cached teacher targets.

Every random choice of an item (point subset, rotation, view/augmentation, prompt template) is
drawn from ``np.random.default_rng([seed, epoch, index])``: the same whatever the number of
DataLoader workers or ranks, and exactly reproducible after a resume. Unpaired image targets
(``image_pairing: unpaired``, the paper's Table 14) come from a per-epoch shuffle within each
category, itself a function of (seed, epoch) alone (:func:`image_partners`). Data scaling pretrains on a
stratified, seeded, nested share of the shapes (:func:`fraction_positions`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from pipeline import layout
from pipeline.store import StoreError, content_key, decompress_to_npy, open_store

#: share of the RAM available at start-up that preloaded arrays may take (the rest: memory-mapped)
PRELOAD_FRACTION = 0.25


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


def normalize_batch(points: np.ndarray) -> np.ndarray:
    """:func:`normalize` of every cloud of a [B, n, 3] batch at once (in place)."""
    # the mean as a product with ones: numpy reduces a middle axis ~30x slower than BLAS does
    points -= (np.ones((1, points.shape[1]), dtype=points.dtype) @ points) / points.shape[1]
    scale = np.sqrt(np.einsum("bni,bni->bn", points, points).max(axis=1))
    points /= np.maximum(scale, 1e-12)[:, None, None]
    return points


def rotate_up_batch(points: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """:func:`rotate_up` of every cloud of a [B, n, 3] batch by its own angle."""
    c, s = np.cos(angles), np.sin(angles)
    rot = np.zeros((len(angles), 3, 3), dtype=points.dtype)
    rot[:, 0, 0], rot[:, 0, 2], rot[:, 1, 1], rot[:, 2, 0], rot[:, 2, 2] = c, s, 1.0, -s, c
    return points @ rot.transpose(0, 2, 1)


def preload_budget(processes: int = 1) -> int:
    """Bytes this process may preload: ``PRELOAD_FRACTION`` of the RAM available now, shared by the
    ``processes`` on this machine that each hold their own copy (``$RECON_PRELOAD_BYTES`` overrides)."""
    if os.environ.get("RECON_PRELOAD_BYTES"):
        return int(os.environ["RECON_PRELOAD_BYTES"])
    import psutil

    return int(psutil.virtual_memory().available * PRELOAD_FRACTION) // max(processes, 1)


def local_dir(cache: Path) -> Path:
    """Where decompressed arrays are memory-mapped from: ``$RECON_LOCAL_DIR`` (e.g. a node-local
    disk when the cache is on a shared filesystem), else ``<cache>/local``."""
    return Path(os.environ.get("RECON_LOCAL_DIR") or Path(cache) / "local")


def local_array(store, name: str, folder: Path, budget: int, log=None) -> np.ndarray:
    """A store's array ready for random access: read into RAM when it fits ``budget``, otherwise
    decompressed once into ``folder`` and memory-mapped (the page cache is then shared by loader
    workers and DDP ranks, and nothing is copied per process)."""
    array = store[name]
    nbytes = int(np.prod(array.shape)) * array.dtype.itemsize
    label = f"{store.path.name}/{name} ({nbytes / 2**30:.2f} GiB)"
    if nbytes <= budget:
        if log:
            log(f"pretrain: {label} preloaded into RAM (budget {budget / 2**30:.2f} GiB)")
        return np.asarray(array[:])
    target = folder / f"{store.path.name}.{name}.{content_key(store.path)}.npy"
    decompress_to_npy(array, target, log=log)
    for stale in folder.glob(f"{store.path.name}.{name}.*.npy"):  # earlier versions of this store
        if stale != target:
            stale.unlink(missing_ok=True)
    if log:
        log(f"pretrain: {label} memory-mapped from {target} (over the preload budget of {budget / 2**30:.2f} GiB)")
    return np.load(target, mmap_mode="r")


@dataclass
class PretrainStores:
    """Validated, aligned inputs of pretraining."""

    shapes: pl.DataFrame
    rows: np.ndarray            # usable rows (points ok and image features ok)
    points: np.ndarray          # [N, P, 3] float32, in RAM or memory-mapped
    image: np.ndarray | None    # [N, V, A, Di] float16, in RAM or memory-mapped
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
                         split: str | None = None, log=None, processes: int | None = None) -> PretrainStores:
    """Open points + teacher stores, check they are aligned with shapes.parquet, drop failed rows.

    Points and image features are preloaded while they fit :func:`preload_budget` (for the
    ``processes`` on this machine, default ``$LOCAL_WORLD_SIZE``), else memory-mapped from a local
    decompressed copy (:func:`local_array`); ``log`` says which. Raises StoreError with the reason
    when ids, dims or categories do not match.
    """
    shapes_path = layout.CacheLayout(cache).shapes
    if not shapes_path.exists():
        raise StoreError(f"{shapes_path} not found: run the index stage first")
    shapes = pl.read_parquet(shapes_path)
    ids = shapes["id"].to_list()
    points = open_store(layout.CacheLayout(cache).points, expect_ids=ids, expect_arrays={"points": (-1, 3)})
    ok = points.ok.copy()
    fingerprint = {"points": points.params}
    budget = preload_budget(processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    folder = local_dir(cache)
    image = text = None
    if use_image:
        image_store = open_store(layout.CacheLayout(cache).image_features, expect_ids=ids,
                                 expect_arrays={"features": (-1, -1, -1)})
        ok &= image_store.ok
        fingerprint["image"] = image_store.params
    categories = sorted(shapes["category"].unique().to_list())
    if use_text:
        text_store = open_store(layout.CacheLayout(cache).text_features, expect_arrays={"features": (-1, -1)})
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
    data = local_array(points, "points", folder, budget, log)
    budget -= data.nbytes if not isinstance(data, np.memmap) else 0
    if use_image:
        image = local_array(image_store, "features", folder, budget, log)
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


IMAGE_PAIRINGS = ("paired", "unpaired")


def image_partners(categories: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """For items with categories ``categories`` [N], the item whose image targets each one takes in
    ``epoch`` under ``image_pairing: unpaired``: within every category a seeded shuffle of its items,
    each taking the next one's images in that order (cyclically). So every image is used once per
    epoch, always a shape of the same category, never the shape's own when its category has two or
    more shapes (a lone shape keeps its own). A function of (seed, epoch) only, drawn from a stream of
    its own (spawn key 1), apart from the items' draws: reproducible, resumable, and the same on every
    rank and loader worker."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch], spawn_key=(1,)))
    partners = np.arange(len(categories))
    for category in np.unique(categories):          # sorted: a fixed order of draws
        order = rng.permutation(np.flatnonzero(categories == category))
        partners[order] = np.roll(order, -1)
    return partners


def check_fraction(fraction: float) -> float:
    """``fraction`` as a float in (0, 1], or a ValueError naming it."""
    value = float(fraction)
    if not 0.0 < value <= 1.0:   # also refuses nan
        raise ValueError(f"data_fraction must be in (0, 1] (1 = every pretraining shape), got {fraction!r}")
    return value


def fraction_positions(ids: list[str], categories: list[str], fraction: float, seed: int) -> np.ndarray:
    """The data-scaling subset (``PretrainParams.data_fraction``): sorted positions into ``ids`` of a
    stratified, seeded share of them. Each category keeps ``max(1, ⌊fraction · n_c + ½⌋)`` of its n_c
    shapes: the first ones of a permutation of its ids (sorted) drawn from ``(seed, category)`` (a stream
    of its own, spawn key 2). A pure function of (ids, categories, fraction, seed), independent of row
    order; the permutation does not depend on the fraction, so the subsets are nested (a smaller
    fraction's shapes lie inside a larger one's, for the same seed), and fraction 1 keeps every shape."""
    fraction = check_fraction(fraction)
    by_category: dict[str, list[tuple[str, int]]] = {}
    for position, (shape_id, category) in enumerate(zip(ids, categories)):
        by_category.setdefault(str(category), []).append((str(shape_id), position))
    keep: list[int] = []
    for category, members in sorted(by_category.items()):
        members.sort()
        rng = np.random.default_rng(np.random.SeedSequence([seed, *category.encode()], spawn_key=(2,)))
        order = rng.permutation(len(members))
        count = max(1, math.floor(fraction * len(members) + 0.5))
        keep.extend(members[i][1] for i in order[:count])
    return np.sort(np.asarray(keep, dtype=np.int64))


def fraction_of_stores(stores: PretrainStores, fraction: float, seed: int) -> tuple[PretrainStores, dict]:
    """``stores`` restricted to the :func:`fraction_positions` subset of its rows, and what was kept
    (``{data_fraction, data_seed, shapes, of, per_category}``); fraction 1 returns ``stores`` itself."""
    fraction = check_fraction(fraction)
    shapes = stores.shapes
    categories = shapes["category"].to_numpy()[stores.rows]
    rows = stores.rows
    if fraction != 1.0:
        rows = rows[fraction_positions(shapes["id"].to_numpy()[rows].tolist(), categories.tolist(), fraction, seed)]
        stores = dataclasses.replace(stores, rows=rows)
    kept = shapes["category"].to_numpy()[rows]
    per_category = {str(c): int((kept == c).sum()) for c in np.unique(categories)}
    return stores, {"data_fraction": fraction, "data_seed": seed, "shapes": int(len(rows)),
                    "of": int(len(categories)), "per_category": per_category}


class PretrainDataset(Dataset):
    """Items: a random ``n_points`` subset, re-normalised and rotated about Y, with one random
    (view, variant) image target (variants from :func:`variant_choices`) and one random
    prompt-template text target. With ``all_views`` (ReCon++'s K image queries matched to the
    views, docs/reconpp.md) the image target is every stored view, [V, D], each in one random variant. With ``image_pairing='unpaired'`` the image target is drawn the same
    way from another shape of the same category (:func:`image_partners`; label and text stay the shape's own).

    :meth:`batch` builds a whole micro-batch at once (what the trainer's loader asks for); each
    item's draws still come from its own ``default_rng([seed, epoch, index])``, so a batch holds
    exactly the items ``dataset[i]`` gives."""

    def __init__(self, stores: PretrainStores, n_points: int = 1024, rotate: bool = True, seed: int = 0,
                 image_variants: str = "augmented", image_pairing: str = "paired", all_views: bool = False):
        if image_pairing not in IMAGE_PAIRINGS:
            raise ValueError(f"unknown image_pairing {image_pairing!r}; choose from {IMAGE_PAIRINGS}")
        self.s, self.n_points, self.rotate, self.seed = stores, n_points, rotate, seed
        self.all_views = all_views and stores.image is not None
        self.variants = variant_choices(stores.image.shape[2], image_variants) if stores.image is not None else None
        self.image_pairing = image_pairing
        self.epoch = 0
        self._partners: tuple[int, np.ndarray] | None = None   # (epoch, image_partners of that epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.s.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch([index]).items()}

    def image_rows(self, indices, epoch: int) -> np.ndarray:
        """The store rows whose image targets items ``indices`` get in ``epoch``: their own (paired), or
        their :func:`image_partners`' (unpaired, partners among this dataset's shapes)."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.image_pairing == "paired":
            return self.s.rows[indices]
        if self._partners is None or self._partners[0] != epoch:
            self._partners = (epoch, image_partners(self.s.category_index[self.s.rows], self.seed, epoch))
        return self.s.rows[self._partners[1][indices]]

    def draws(self, index: int, epoch: int) -> tuple[np.ndarray, float, int | np.ndarray, int | np.ndarray, int]:
        """Item ``index``'s random choices in ``epoch``: point subset, rotation angle, view,
        variant, template (the order in which they are drawn is part of the contract). With
        ``all_views`` the views are all V of them ([V]) and the variants one per view ([V]), drawn
        where the one view and its variant are drawn otherwise."""
        rng = np.random.default_rng([self.seed, epoch, index])
        pick = rng.choice(self.s.points.shape[1], self.n_points, replace=False)
        angle = rng.uniform(0.0, 2.0 * math.pi) if self.rotate else 0.0
        view = variant = template = 0
        if self.all_views:
            view = np.arange(self.s.image.shape[1])
            variant = np.asarray(self.variants)[rng.integers(len(self.variants), size=len(view))]
        elif self.s.image is not None:
            view = rng.integers(self.s.image.shape[1])
            variant = self.variants[rng.integers(len(self.variants))]
        if self.s.text is not None:
            template = rng.integers(self.s.text.shape[1])
        return pick, angle, view, variant, template

    def batch(self, indices, epoch: int | None = None) -> dict[str, torch.Tensor]:
        """Items ``indices`` of ``epoch`` (default: the current one) as one batch: per-item draws,
        then one vectorised gather, normalisation and rotation."""
        epoch = self.epoch if epoch is None else epoch
        indices = [int(i) for i in indices]
        rows = self.s.rows[indices]
        picks, angles, views, variants, templates = zip(*(self.draws(i, epoch) for i in indices))
        points = np.empty((len(rows), self.n_points, 3), dtype=np.float32)
        for slot, (row, pick) in enumerate(zip(rows, picks)):
            np.take(self.s.points[row], pick, axis=0, out=points[slot])
        points = normalize_batch(points)
        if self.rotate:
            points = rotate_up_batch(points, np.asarray(angles, dtype=np.float64))
        labels = self.s.category_index[rows]
        out = {"points": torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)),
               "label": torch.from_numpy(labels.astype(np.int64)),
               "index": torch.from_numpy(rows.astype(np.int64))}
        if self.s.image is not None:   # [B, D], or [B, V, D] with all_views
            image_rows = self.image_rows(indices, epoch)
            rows_index = image_rows[:, None] if self.all_views else image_rows
            out["img"] = torch.from_numpy(self.s.image[rows_index, np.asarray(views), np.asarray(variants)]
                                          .astype(np.float32))
        if self.s.text is not None:
            out["text"] = torch.from_numpy(self.s.text[labels, np.asarray(templates)].astype(np.float32))
        return out


class MicroBatches(Dataset):
    """``loader_dataset[(epoch, indices)]`` → :meth:`PretrainDataset.batch`: workers build whole
    micro-batches, and the epoch travels with the indices, so persistent workers need no notice."""

    def __init__(self, dataset: PretrainDataset):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, list[int]]) -> dict[str, torch.Tensor]:
        epoch, indices = key
        return self.dataset.batch(indices, epoch)


class EpochBatches(Sampler):
    """Per epoch, the shuffled order of the items cut into micro-batches (the last partial one
    dropped), each yielded as ``(epoch, indices)``. The order is a function of (seed, epoch): a
    seeded ``RandomSampler``, or ``DistributedSampler`` under DDP, as the trainer always used."""

    def __init__(self, dataset: Dataset, micro_batch: int, seed: int, rank: int = 0, world: int = 1):
        self.dataset, self.micro, self.seed, self.rank, self.world = dataset, micro_batch, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> Sampler:
        if self.world > 1:
            order = DistributedSampler(self.dataset, self.world, self.rank, shuffle=True, seed=self.seed, drop_last=True)
            order.set_epoch(self.epoch)
            return order
        return RandomSampler(self.dataset, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))

    def __iter__(self):
        for indices in BatchSampler(self._order(), self.micro, drop_last=True):
            yield self.epoch, indices

    def __len__(self) -> int:
        return len(self._order()) // self.micro


def loader_workers(setting: int | str, device: torch.device, processes: int = 1) -> int:
    """``auto``: none on CPU (the student's step there is ~1000× the data's), else up to 4 per
    process, leaving a core to each training process (one worker builds ~9,000 samples/s,
    bench/README.md)."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // max(processes, 1) - 1))


def make_loader(dataset: PretrainDataset, sampler: EpochBatches, workers: int, pin_memory: bool) -> DataLoader:
    """The trainer's DataLoader: whole micro-batches built by ``workers`` persistent processes,
    prefetched (4 per worker), in pinned memory for an asynchronous copy to the GPU."""
    return DataLoader(MicroBatches(dataset), sampler=sampler, batch_size=None, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None)


def fixed_subset(cloud: np.ndarray, n_points: int, seed: int = 0) -> np.ndarray:
    """A deterministic, evaluation-time subset (same points for every model compared)."""
    pick = np.random.default_rng(seed).permutation(cloud.shape[0])[:n_points]
    return normalize(np.asarray(cloud, dtype=np.float32)[np.sort(pick)]).astype(np.float32)
