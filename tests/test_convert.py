"""Converters to classification stores, on tiny files written in the real formats and on the real
ModelNet40 sample (skipped when ../shared/data is absent)."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import polars as pl
import pytest
import torch
import typer
from typer.testing import CliRunner

from conftest import shared_dir
from pipeline import convert as C
from pipeline.store import ArraySpec, StoreWriter, open_store, read_failure_log
from recon.network.pointops import farthest_point_sample, fps_indices


def cloud(rng: np.random.Generator, n: int, normals: bool = True) -> np.ndarray:
    xyz = rng.normal(size=(n, 3)).astype(np.float32)
    if not normals:
        return xyz
    nrm = xyz / np.linalg.norm(xyz, axis=1, keepdims=True)
    return np.concatenate([xyz, nrm], 1).astype(np.float32)


def fps_of(c: np.ndarray, k: int) -> np.ndarray:
    return farthest_point_sample(torch.from_numpy(c[None, :, :3].copy()), k)[0].numpy()


def write_modelnet(root, prefix: str = "modelnet40", missing: str | None = "chair_0003"):
    """classes airplane, chair, night_stand; two train and one test shape each; one listed file absent."""
    rng = np.random.default_rng(0)
    classes = ["airplane", "chair", "night_stand"]
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{prefix}_shape_names.txt").write_text("\n".join(classes) + "\n")
    lists = {"train": [], "test": []}
    for c in classes:
        (root / c).mkdir(parents=True)
        for i, split in ((1, "train"), (2, "train"), (3, "test")):
            sid = f"{c}_{i:04d}"
            lists[split].append(sid)
            if sid != missing:
                np.savetxt(root / c / f"{sid}.txt", cloud(rng, 50), delimiter=",", fmt="%.6f")
    for split, ids in lists.items():
        (root / f"{prefix}_{split}.txt").write_text("\n".join(ids) + "\n")
    return classes, lists


def test_modelnet_text_layout_with_a_missing_file(tmp_path):
    root = tmp_path / "modelnet40_normal_resampled"
    classes, lists = write_modelnet(root)
    with pytest.warns(UserWarning, match="chair_0003"):
        result = C.convert_modelnet(tmp_path, tmp_path / "mn.zarr", n_points=32, normals=True, log=lambda *_: None, fps=fps_indices)
    assert (result.rows, result.failed) == (9, 1)
    assert result.failures[0]["id"] == "chair_0003" and result.failures[0]["error"] == "missing_file"
    store = open_store(tmp_path / "mn.zarr")
    assert store.ids.tolist() == lists["train"] + lists["test"]
    assert store.params["class_names"] == classes and store.params["splits"] == ["train", "test"]
    assert store["points"].shape == (9, 32, 3) and store["normals"].shape == (9, 32, 3)
    assert store["label"][:].tolist() == [0, 0, 1, 1, 2, 2, 0, 1, 2]        # night_stand_0001 -> night_stand
    assert store["split"][:].tolist() == [0] * 6 + [1] * 3
    assert store.ok.tolist() == [sid != "chair_0003" for sid in store.ids]
    assert "chair_0003" in read_failure_log(tmp_path / "mn.zarr")
    raw = np.loadtxt(root / "airplane" / "airplane_0001.txt", delimiter=",", dtype=np.float32)
    pick = fps_of(raw, 32)
    np.testing.assert_array_equal(store["points"][0], raw[pick, :3])   # FPS subset, normals aligned
    np.testing.assert_array_equal(store["normals"][0], raw[pick, 3:])
    with pytest.warns(UserWarning, match="1 shapes listed in the split files are missing"):
        again = C.convert_modelnet(tmp_path, tmp_path / "mn.zarr", n_points=32, normals=True, log=lambda *_: None, fps=fps_indices)
    assert again.failed == 1 and again.failures[0]["id"] == "chair_0003"   # up to date, still reported


def test_modelnet10_layout(tmp_path):
    write_modelnet(tmp_path, "modelnet10", missing=None)
    result = C.convert_modelnet(tmp_path, tmp_path / "mn10.zarr", n_points=16, dataset="modelnet10",
                                log=lambda *_: None, fps=fps_indices)
    store = open_store(result.path)
    assert result.failed == 0 and store.params["format"] == "modelnet10" and "normals" not in store.data_arrays()


def test_pointbert_dat_needs_trust_pickle(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 4), ("test", 2)):
        points = [cloud(rng, 40) for _ in range(n)]
        labels = [np.array([i % 2]) for i in range(n)]
        with open(tmp_path / f"modelnet40_{split}_8192pts_fps.dat", "wb") as f:
            pickle.dump([points, labels], f)
    (tmp_path / "modelnet40_train.txt").write_text("\n".join(f"a_{i:04d}" for i in range(4)) + "\n")
    with pytest.raises(C.PickleRefused, match="--trust-pickle") as err:
        C.convert_pointbert_dat(tmp_path, tmp_path / "dat.zarr", fps=fps_indices)
    assert "arbitrary code" in str(err.value)
    assert not (tmp_path / "dat.zarr").exists()
    result = C.convert_pointbert_dat(tmp_path, tmp_path / "dat.zarr", trust_pickle=True, log=lambda *_: None, fps=fps_indices)
    store = open_store(result.path)
    assert store.ids.tolist() == [f"a_{i:04d}" for i in range(4)] + ["test-00000", "test-00001"]
    assert store["points"].shape == (6, 40, 3)                                # native count kept
    assert store["label"][:].tolist() == [0, 1, 0, 1, 0, 1]
    assert store.params["class_names"] == ["class0", "class1"]


def test_fewshot_pkl_needs_trust_pickle(tmp_path):
    rng = np.random.default_rng(2)
    for folder, fold in (("5way10shot", 0), ("5way10shot", 1), ("10way_20shot", 0)):
        (tmp_path / "src" / folder).mkdir(parents=True, exist_ok=True)
        data = {"train": [(cloud(rng, 30), i % 2, 7 + i % 2) for i in range(4)],
                "test": [(cloud(rng, 30), i % 2, 7 + i % 2) for i in range(2)]}
        with open(tmp_path / "src" / folder / f"{fold}.pkl", "wb") as f:
            pickle.dump(data, f)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"name{i}" for i in range(40)) + "\n")
    with pytest.raises(C.PickleRefused, match="--trust-pickle"):
        C.convert_fewshot(tmp_path / "src", tmp_path / "out", fps=fps_indices)
    results = C.convert_fewshot(tmp_path / "src", tmp_path / "out", n_points=16, normals=True, trust_pickle=True,
                                shape_names=names, log=lambda *_: None, fps=fps_indices)
    assert sorted(str(r.path.relative_to(tmp_path / "out")) for r in results) == [
        "10way20shot/0.zarr", "5way10shot/0.zarr", "5way10shot/1.zarr"]
    store = open_store(tmp_path / "out" / "5way10shot" / "1.zarr")
    assert store.params["class_names"] == ["name7", "name8"] and store.params["fold"] == 1
    assert store["label"][:].tolist() == [0, 1, 0, 1, 0, 1]
    assert store["source_label"][:].tolist() == [7, 8, 7, 8, 7, 8]
    assert store["split"][:].tolist() == [0, 0, 0, 0, 1, 1]
    assert store["points"].shape == (6, 16, 3) and store["normals"].shape == (6, 16, 3)


def test_scanobjectnn_h5_variants(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "main_split_nobg"
    folder.mkdir()
    for name, n in (("training_objectdataset.h5", 5), ("test_objectdataset.h5", 3)):
        with h5py.File(folder / name, "w") as f:
            f["data"] = rng.normal(size=(n, 64, 3)).astype(np.float32)
            f["label"] = np.arange(n, dtype=np.int64) % 15
            f["mask"] = np.zeros((n, 64), dtype=np.int64)
    with pytest.raises(FileNotFoundError, match="training_objectdataset_augmentedrot_scale75.h5"):
        C.convert_scanobjectnn(tmp_path, tmp_path / "x.zarr", "PB_T50_RS", fps=fps_indices)
    result = C.convert_scanobjectnn(tmp_path, tmp_path / "so.zarr", "OBJ_ONLY", log=lambda *_: None, fps=fps_indices)
    store = open_store(result.path)
    assert store.params["variant"] == "OBJ_ONLY" and store.params["class_names"][14] == "toilet"
    assert store["points"].shape == (8, 64, 3) and store["label"][:].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    with h5py.File(folder / "test_objectdataset.h5") as f:
        np.testing.assert_array_equal(store["points"][5:], f["data"][:])


def make_points_cache(cache, n_points: int = 64):
    """A shapes table + points store of 6 shapes (2 categories), one failed in sampling."""
    rng = np.random.default_rng(4)
    ids = [f"s{i}" for i in range(6)]
    cache.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"id": ids, "synset": ["x"] * 6, "category": ["mug", "chair"] * 3,
                  "split": ["train", "train", "train", "train", "test", "test"], "mesh_path": [""] * 6,
                  "status": ["ok"] * 6}).write_parquet(cache / "shapes.parquet")
    w = StoreWriter.open(cache / "points.zarr", ids, {"points": ArraySpec((n_points, 3), "float32", 8)},
                         {"points": n_points}, log=lambda *_: None)
    ok = np.array([True, True, False, True, True, True])
    w.write_rows(np.arange(6), {"points": rng.normal(size=(6, n_points, 3)).astype(np.float32)}, ok)
    w.finalise()
    return ids, ok


def test_points_format(tmp_path):
    ids, ok = make_points_cache(tmp_path / "cache")
    with pytest.warns(UserWarning, match="s2: this shape failed an earlier stage"):
        result = C.convert_points(tmp_path / "cache", tmp_path / "d.zarr", n_points=32, log=lambda *_: None, fps=fps_indices)
    store = open_store(result.path)
    assert result.failed == 1 and store.ok.tolist() == ok.tolist() and store.ids.tolist() == ids
    assert store.params["class_names"] == ["chair", "mug"] and store.params["splits"] == ["train", "test"]
    assert store["label"][:].tolist() == [1, 0, 1, 0, 1, 0]
    src = np.asarray(open_store(tmp_path / "cache" / "points.zarr")["points"][0])
    np.testing.assert_array_equal(store["points"][0], src[fps_of(src, 32)])


def test_cli_refuses_pickles_without_the_flag(tmp_path, monkeypatch):
    from cli import convert

    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RECON_PARAMS", str(tmp_path / "params.yaml"))
    with open(tmp_path / "modelnet40_train_8192pts_fps.dat", "wb") as f:
        pickle.dump([[np.ones((20, 3), np.float32)] * 2, [np.array([0]), np.array([1])]], f)
    with open(tmp_path / "modelnet40_test_8192pts_fps.dat", "wb") as f:
        pickle.dump([[np.ones((20, 3), np.float32)], [np.array([1])]], f)
    app = typer.Typer()
    app.command("convert")(convert)
    app.command("noop")(lambda: None)
    runner = CliRunner()
    args = ["convert", "pointbert-dat", str(tmp_path), "--out", str(tmp_path / "o.zarr")]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "--trust-pickle" in refused.output
    accepted = runner.invoke(app, args + ["--trust-pickle"])
    assert accepted.exit_code == 0, accepted.output
    assert open_store(tmp_path / "o.zarr")["points"].shape == (3, 20, 3)
    assert (tmp_path / "cache" / "failures" / "convert.parquet").exists()


def test_real_modelnet40_sample(tmp_path):
    root = shared_dir() / "data" / "modelnet40_sample"
    if not root.is_dir():
        pytest.skip(f"real ModelNet40 sample not present at {root}")
    result = C.convert_modelnet(root, tmp_path / "mn40.zarr", n_points=64, log=lambda *_: None, fps=fps_indices)
    store = open_store(result.path)
    assert (result.rows, result.failed) == (72, 0) and store.ok.all()
    assert len(store.params["class_names"]) == 40 and "door" in store.params["class_names"]
    labels, split = store["label"][:], store["split"][:]
    assert (split == 0).sum() == 39 and (split == 1).sum() == 33
    assert len(np.unique(labels)) == 39 and store.params["class_names"].index("door") not in labels
    first = store.ids[0]
    raw = np.loadtxt(root / "modelnet40_normal_resampled" / C.modelnet_class(first) / f"{first}.txt",
                     delimiter=",", dtype=np.float32)
    np.testing.assert_array_equal(store["points"][0], raw[fps_of(raw, 64), :3])
    assert np.abs(store["points"][:]).max() < 1.5                  # near the unit sphere, as shipped
