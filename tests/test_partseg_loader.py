"""Reading part-segmentation stores for training (split and ok filtering, points aligned with
their parts, wrong stores refused) and the reference's training-time sampling and augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.partseg_store import PartSample, write_partseg_store
from pipeline.store import ArraySpec, StoreError, StoreWriter
from recon.downstream.partseg_data import SegData, SegTrainSet, load_partseg, random_points, scale_and_translate

PARTS = [[0, 1], [2, 3, 4]]
N_POINTS = 12


def cloud(shape: int, label: int) -> np.ndarray:
    """[12, 7]: point k at x = k (+ a per-shape offset) with part PARTS[label][k % parts]."""
    k = np.arange(N_POINTS, dtype=np.float64)
    xyz = np.stack([k + shape, np.sin(k + shape), np.cos(k)], 1)
    normals = np.tile([0.0, 0.0, 1.0], (N_POINTS, 1))
    part = np.asarray(PARTS[label])[np.arange(N_POINTS) % len(PARTS[label])]
    return np.concatenate([xyz, normals, part[:, None]], 1)


def missing() -> np.ndarray:
    raise FileNotFoundError("gone")


# (id, split, label); rows deliberately interleave the splits, s3 fails to load
ROWS = [("s0", "train", 0), ("s1", "test", 1), ("s2", "val", 1), ("s3", "train", 0),
        ("s4", "test", 0), ("s5", "train", 1), ("s6", "val", 0)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("parts") / "parts.zarr"
    samples = [PartSample(sid, split, label, missing if sid == "s3" else (lambda i=i, l=label: cloud(i, l)))
               for i, (sid, split, label) in enumerate(ROWS)]
    with pytest.warns(UserWarning, match="s3: gone"):
        write_partseg_store(path, samples, ["A", "B"], PARTS, N_POINTS, {"format": "test"},
                            chunk_rows=2, log=lambda *_: None)
    return path


def test_load_keeps_ok_rows_of_the_asked_splits(store):
    train = load_partseg(store, ["train", "val"])
    assert train.ids.tolist() == ["s0", "s2", "s5", "s6"]                 # s3 failed; store order
    assert train.label.tolist() == [0, 1, 1, 0]
    assert load_partseg(store, "test").ids.tolist() == ["s1", "s4"]
    assert load_partseg(store, ["val"]).ids.tolist() == ["s2", "s6"]
    assert train.class_names == ["A", "B"] and train.category_parts == PARTS and train.num_parts == 5
    assert train.points.shape == (4, N_POINTS, 3) and train.points.dtype == np.float32
    assert train.part.shape == (4, N_POINTS) and train.part.dtype == np.int64 and train.label.dtype == np.int64
    assert len(train) == 4 and train.num_classes == 2


def test_points_keep_their_parts(store):
    data = load_partseg(store, ["train", "val", "test"])
    for row, (sid, label) in enumerate(zip(data.ids, data.label)):
        k = np.argsort(np.argsort(data.points[row, :, 0]))                # x rank = source index
        assert sorted(k.tolist()) == list(range(N_POINTS))                # all 12 points, each once
        assert data.part[row].tolist() == np.asarray(PARTS[label])[k % len(PARTS[label])].tolist(), sid
        assert np.abs(np.linalg.norm(data.points[row], axis=1).max() - 1) < 1e-6   # unit sphere


def test_subset(store):
    data = load_partseg(store, ["train", "val"]).subset(np.array([3, 1]))
    assert data.ids.tolist() == ["s6", "s2"] and data.label.tolist() == [0, 1]
    assert data.part.shape == (2, N_POINTS) and data.category_parts == PARTS


def test_unknown_split_is_refused(store):
    with pytest.raises(ValueError, match=r"no split \['trainval'\].*'train', 'val', 'test'"):
        load_partseg(store, "trainval")
    with pytest.raises(ValueError, match="no split"):
        load_partseg(store, [])


def test_a_store_of_another_kind_is_refused(tmp_path):
    path = tmp_path / "cls.zarr"
    writer = StoreWriter.open(path, ["a", "b"], {"points": ArraySpec((4, 3), "float32"),
                                                 "label": ArraySpec((), "int64")},
                              {"format": "modelnet40", "splits": ["train"]}, log=lambda *_: None)
    for block in writer.pending_blocks():
        writer.write_rows(block, {"points": np.zeros((len(block), 4, 3), np.float32),
                                  "label": np.zeros(len(block), np.int64)}, np.ones(len(block), bool))
    writer.finalise()
    with pytest.raises(StoreError, match="not a part-segmentation store"):
        load_partseg(path, "train")
    with pytest.raises(StoreError, match="does not exist"):
        load_partseg(tmp_path / "nothing.zarr", "train")


def test_scale_and_translate_is_the_references_isotropic_scale_and_shift():
    base = np.tile(np.array([[[0.0, 0.0, 0.0], [1.0, 2.0, -3.0]]]), (4000, 1, 1))
    out = scale_and_translate(base, np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == base.shape
    shift = out[:, 0].astype(np.float64)                                 # the origin moves by the shift only
    scale = (out[:, 1] - out[:, 0]) / base[:, 1]
    np.testing.assert_allclose(scale, scale[:, :1].repeat(3, 1), atol=1e-5)   # one factor for all axes
    assert 0.8 <= scale.min() < 0.81 and 1.24 < scale.max() <= 1.25
    assert -0.1 <= shift.min() < -0.099 and 0.099 < shift.max() <= 0.1
    assert abs(np.corrcoef(shift[:, 0], shift[:, 1])[0, 1]) < 0.05        # per axis, independent
    again = scale_and_translate(base, np.random.default_rng(0))
    assert np.array_equal(out, again)
    assert not np.array_equal(out, scale_and_translate(base, np.random.default_rng(1)))
    one = scale_and_translate(base[0], np.random.default_rng(0))          # a single [P, 3] cloud
    assert one.shape == (2, 3)


def test_random_points_redraws_with_replacement_per_seed_epoch_row():
    a = random_points(2048, 2048, seed=0, epoch=3, index=7)
    assert a.shape == (2048,) and a.min() >= 0 and a.max() < 2048
    assert np.array_equal(a, random_points(2048, 2048, 0, 3, 7))
    assert 1200 < len(np.unique(a)) < 1400                                # ~ (1 - 1/e) · 2048: with replacement
    for other in (random_points(2048, 2048, 1, 3, 7), random_points(2048, 2048, 0, 4, 7),
                  random_points(2048, 2048, 0, 3, 8)):
        assert not np.array_equal(a, other)
    assert random_points(5, 3, 0, 0, 0).max() < 3


def test_train_set_items(store):
    data = load_partseg(store, ["train", "val"])
    plain = SegTrainSet(data, N_POINTS, seed=0, resample=False, augment=False)[2]
    assert torch.equal(plain["points"], torch.from_numpy(data.points[2]))
    assert plain["part"].tolist() == data.part[2].tolist() and int(plain["label"]) == 1

    train = SegTrainSet(data, 20, seed=5)
    train.set_epoch(2)
    item = train[1]
    pick = random_points(20, N_POINTS, 5, 2, 1)
    expected = scale_and_translate(data.points[1][pick], np.random.default_rng([5, 2, 1, 1]))
    assert torch.equal(item["points"], torch.from_numpy(expected))
    assert item["part"].tolist() == data.part[1][pick].tolist() and item["part"].dtype == torch.int64
    assert torch.equal(train[1]["points"], item["points"])               # same (seed, epoch, row): same item
    train.set_epoch(3)
    assert not torch.equal(train[1]["points"], item["points"])
    with pytest.raises(ValueError, match="stored 12"):
        SegTrainSet(data, 20, seed=0, resample=False)


def test_empty_selection(tmp_path):
    path = tmp_path / "p.zarr"
    with pytest.warns(UserWarning):
        write_partseg_store(path, [PartSample("x", "test", 0, missing)], ["A", "B"], PARTS, N_POINTS,
                            {"format": "test"}, log=lambda *_: None)
    data = load_partseg(path, "test")
    assert isinstance(data, SegData) and len(data) == 0
    assert data.points.shape == (0, N_POINTS, 3) and data.part.shape == (0, N_POINTS)
