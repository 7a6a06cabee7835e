"""Discovery of ShapeNet v1/v2 and plain layouts, and splits."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.discover import build_table, seeded_split

CUBE_OBJ = "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n"


def _write(path: Path, text: str = CUBE_OBJ) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_shapenet_v2_with_taxonomy_and_lists(tmp_path):
    _write(tmp_path / "02691156" / "aaa" / "models" / "model_normalized.obj")
    _write(tmp_path / "02691156" / "bbb" / "models" / "model_normalized.obj")
    _write(tmp_path / "03001627" / "ccc" / "models" / "model_normalized.obj")
    (tmp_path / "03001627" / "ddd").mkdir()  # a model folder without a mesh
    (tmp_path / "taxonomy.json").write_text(json.dumps([
        {"synsetId": "02691156", "name": "airplane,aeroplane,plane", "children": [], "numInstances": 2},
        {"synsetId": "03001627", "name": "chair", "children": [], "numInstances": 1}]))
    _write(tmp_path / "train.txt", "02691156-aaa.npy\n03001627-ccc.npy\n")
    _write(tmp_path / "test.txt", "02691156-bbb.npy\n")
    table, skipped, rule = build_table(tmp_path)
    assert table["id"].to_list() == ["02691156-aaa", "02691156-bbb", "03001627-ccc"]
    assert table["category"].to_list() == ["airplane", "airplane", "chair"]
    assert table["split"].to_list() == ["train", "test", "train"]
    assert "lists" in rule
    assert [(s.id, s.error) for s in skipped] == [("03001627-ddd", "missing_model")]


def test_shapenet_v1_and_unlisted(tmp_path):
    _write(tmp_path / "02691156" / "aaa" / "model.obj")
    _write(tmp_path / "02691156" / "bbb" / "model.obj")
    splits = tmp_path / "lists"
    _write(splits / "train.txt", "02691156-aaa.npy\n")
    table, _, _ = build_table(tmp_path, split_dir=splits)
    assert table["category"].to_list() == ["02691156", "02691156"]  # no taxonomy: synset id
    assert table["split"].to_list() == ["train", "unlisted"]


def test_plain_folders_skip_non_meshes(tmp_path):
    for name in ("a.obj", "b.ply", "c.stl", "d.glb"):
        _write(tmp_path / "mug" / name)
    _write(tmp_path / "mug" / "notes.docx", "hello")
    table, skipped, _ = build_table(tmp_path, test_fraction=0.25, seed=1)
    assert table.height == 4 and set(table["category"]) == {"mug"}
    assert table["id"].to_list() == ["mug-a", "mug-b", "mug-c", "mug-d"]
    assert sorted(table["split"].to_list()) == ["test", "train", "train", "train"]
    assert [s.error for s in skipped] == ["unsupported"]


def test_seeded_split_is_stratified_and_reproducible():
    ids = [f"{c}-{i}" for c in "abc" for i in range(10)]
    cats = [i[0] for i in ids]
    first = seeded_split(ids, cats, 0.2, seed=3)
    assert first == seeded_split(list(reversed(ids)), list(reversed(cats)), 0.2, seed=3)[::-1]
    for c in "abc":
        assert sum(s == "test" for s, k in zip(first, cats) if k == c) == 2
    assert first != seeded_split(ids, cats, 0.2, seed=4)


def test_limit_keeps_first_ids(tmp_path):
    for i in range(5):
        _write(tmp_path / "box" / f"{i}.obj")
    table, _, _ = build_table(tmp_path, limit=2)
    assert table["id"].to_list() == ["box-0", "box-1"]


def test_same_stem_files_get_suffixed_ids_and_relative_paths(tmp_path):
    for name in ("x.obj", "x.ply", "y.obj", "sub/x.stl"):
        _write(tmp_path / "mug" / name)
    table, _, _ = build_table(tmp_path)
    # only the clashing stem gets its suffix; the nested file keeps its path-derived id
    assert table["id"].to_list() == ["mug-sub-x", "mug-x-obj", "mug-x-ply", "mug-y"]
    assert table["mesh_path"].to_list() == ["mug/sub/x.stl", "mug/x.obj", "mug/x.ply", "mug/y.obj"]


def test_ids_that_clash_even_with_suffixes_are_refused(tmp_path):
    import pytest

    from pipeline.discover import DuplicateShapeIds
    _write(tmp_path / "mug" / "a" / "b.obj")
    _write(tmp_path / "mug" / "a-b.obj")
    with pytest.raises(DuplicateShapeIds, match=r"mug-a-b-obj: .*mug/a/b.obj, .*mug/a-b.obj. Rename"):
        build_table(tmp_path)
    _write(tmp_path / "x" / "b-c.obj")   # across category folders: x/b-c.obj and x-b/c.obj
    _write(tmp_path / "x-b" / "c.obj")
    (tmp_path / "mug" / "a-b.obj").unlink()
    with pytest.raises(DuplicateShapeIds, match=r"x-b-c: "):
        build_table(tmp_path)


def test_same_stem_real_meshes_index_render_and_sample_consistently(meshes_dir, tmp_path, monkeypatch):
    """Real files with one stem in one category (fuze.obj next to a fuze.ply copy of the bunny):
    every file is its own row, and the stage summary agrees with the store."""
    import shutil

    import numpy as np

    from pipeline.store import open_store
    from stages import index, sample
    root = tmp_path / "meshes" / "thing"
    root.mkdir(parents=True)
    for name in ("fuze.obj", "fuze.obj.mtl", "fuze uv.jpg"):
        shutil.copy2(meshes_dir / name, root / name)
    shutil.copy2(meshes_dir / "bunny.ply", root / "fuze.ply")
    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "cache"))
    table = index.run(index.IndexParams(root=str(tmp_path / "meshes")))
    assert table["id"].to_list() == ["thing-fuze-obj", "thing-fuze-ply"]
    assert sample.run(sample.SampleParams(points=256, workers=1))
    store = open_store(tmp_path / "cache" / "points.zarr", expect_ids=table["id"].to_list())
    assert store.ok.all()
    a, b = store["points"][:]
    assert not np.allclose(a, b)  # two different meshes, not one read twice
