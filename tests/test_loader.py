"""The pretraining input pipeline: batched items equal the per-item contract, preloaded and
memory-mapped stores give the same batches, workers and epochs change nothing but speed."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from conftest import write_synthetic_cache
from recon.pretraining.data import (
    EpochBatches,
    PretrainDataset,
    loader_workers,
    make_loader,
    normalize,
    open_pretrain_stores,
    rotate_up,
)


@pytest.fixture
def cache(tmp_path):
    return write_synthetic_cache(tmp_path / "cache", n_per_class=5, variants=3)


def reference_item(stores, seed, epoch, index, n_points):
    """The per-item definition the trainer has always used (one rng per (seed, epoch, index),
    draws in this order): what a batch must reproduce."""
    rng = np.random.default_rng([seed, epoch, index])
    row = int(stores.rows[index])
    cloud = np.asarray(stores.points[row], dtype=np.float32)
    pick = rng.choice(cloud.shape[0], n_points, replace=False)
    pts = rotate_up(normalize(cloud[pick]), rng.uniform(0.0, 2.0 * math.pi)).astype(np.float32)
    views, variants = stores.image.shape[1:3]
    view = rng.integers(views)
    variant = 1 + rng.integers(variants - 1) if variants > 1 else 0   # an augmented variant, never the clean one
    img = stores.image[row, view, variant].astype(np.float32)
    text = stores.text[stores.category_index[row], rng.integers(stores.text.shape[1])].astype(np.float32)
    return pts, img, text, int(stores.category_index[row]), row


def test_a_batch_holds_exactly_the_per_item_draws(cache):
    stores = open_pretrain_stores(cache)
    dataset = PretrainDataset(stores, n_points=128, seed=7)
    indices = [9, 0, 4, 4, 13]
    batch = dataset.batch(indices, epoch=3)
    for slot, index in enumerate(indices):
        pts, img, text, label, row = reference_item(stores, 7, 3, index, 128)
        np.testing.assert_allclose(batch["points"][slot].numpy(), pts, rtol=0, atol=2e-7)
        np.testing.assert_array_equal(batch["img"][slot].numpy(), img)
        np.testing.assert_array_equal(batch["text"][slot].numpy(), text)
        assert int(batch["label"][slot]) == label and int(batch["index"][slot]) == row
    assert not torch.equal(batch["points"][2], dataset.batch([4], epoch=4)["points"][0])


def test_memory_mapped_stores_give_the_same_batches_and_are_decompressed_once(cache, monkeypatch):
    preloaded = open_pretrain_stores(cache)
    assert not isinstance(preloaded.points, np.memmap)
    monkeypatch.setenv("RECON_PRELOAD_BYTES", "0")   # as if the stores were bigger than the RAM budget
    messages = []
    mapped = open_pretrain_stores(cache, log=messages.append)
    assert isinstance(mapped.points, np.memmap) and isinstance(mapped.image, np.memmap)
    assert sum("memory-mapped" in m for m in messages) == 2
    files = sorted((cache / "local").glob("*.npy"))
    assert [f.name.split(".")[:3] for f in files] == [["image", "zarr", "features"], ["points", "zarr", "points"]]
    stamps = [f.stat().st_mtime_ns for f in files]
    a = PretrainDataset(preloaded, 64, seed=1).batch(range(10), epoch=2)
    b = PretrainDataset(open_pretrain_stores(cache), 64, seed=1).batch(range(10), epoch=2)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert [f.stat().st_mtime_ns for f in sorted((cache / "local").glob("*.npy"))] == stamps  # reused
    # a rewritten store is another file (the stale copy goes)
    points = cache / "points.zarr" / "points" / "c" / "0" / "0" / "0"
    os.utime(points, ns=(points.stat().st_atime_ns, points.stat().st_mtime_ns + 10**9))
    open_pretrain_stores(cache)
    now = sorted((cache / "local").glob("points*.npy"))
    assert len(now) == 1 and now[0] not in files


def test_workers_and_epochs_give_the_in_process_batches(cache):
    stores = open_pretrain_stores(cache)
    dataset = PretrainDataset(stores, n_points=64, seed=2)
    sampler = EpochBatches(dataset, micro_batch=4, seed=2)
    serial = make_loader(dataset, sampler, workers=0, pin_memory=False)
    parallel = make_loader(dataset, sampler, workers=2, pin_memory=False)
    for epoch in (0, 1):   # persistent workers learn the epoch from the sampler's batches
        sampler.set_epoch(epoch)
        got = [list(serial), list(parallel)]
        assert len(got[0]) == len(got[1]) == len(dataset) // 4
        for a, b in zip(*got):
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(2 * 100003 + epoch))
        assert torch.cat([b["index"] for b in got[0]]).tolist() == stores.rows[order[:len(got[0]) * 4]].tolist()


def test_worker_defaults_fit_the_device():
    assert loader_workers("auto", torch.device("cpu")) == 0
    assert 1 <= loader_workers("auto", torch.device("cuda", 0)) <= 4
    assert loader_workers("auto", torch.device("cuda", 0), processes=10**6) == 1
    assert loader_workers(3, torch.device("cpu")) == 3
