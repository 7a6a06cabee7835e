"""Part-segmentation stores: ShapeNetPart's layout on tiny generated files (with a missing, a
malformed and a mislabelled file), the point choice, and the demo meshes' part labels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from conftest import convert_command
from pipeline import partseg_store as PS
from pipeline.demo import _GENERATORS, build_shape, generate_demo
from pipeline.demo_parts import DEMO_PARTS, part_index, read_obj_parts, sample_parts
from pipeline.meshes import load_mesh
from pipeline.store import open_store, read_failure_log

PLANE, MUG = "02691156", "03797390"


def test_the_part_table_is_shapenetparts():
    table = PS.SHAPENETPART_CATEGORIES
    assert len(table) == 16 and list(table) == sorted(table)
    ids = [p for _, parts in table.values() for p in parts]
    assert ids == list(range(PS.SHAPENETPART_NUM_PARTS))           # 0..49, each once, in category order
    assert {n: len(p) for n, (_, p) in table.items()} == {
        "Airplane": 4, "Bag": 2, "Cap": 2, "Car": 4, "Chair": 4, "Earphone": 3, "Guitar": 3, "Knife": 2,
        "Lamp": 4, "Laptop": 2, "Motorbike": 6, "Mug": 2, "Pistol": 3, "Rocket": 3, "Skateboard": 3, "Table": 3}
    assert table["Chair"] == ("03001627", (12, 13, 14, 15)) and table["Table"] == ("04379243", (47, 48, 49))


def part_file(rng: np.random.Generator, n: int, parts: tuple[int, ...]) -> np.ndarray:
    xyz = rng.normal(size=(n, 3)) * [0.3, 0.2, 0.1] + [0.5, 0.1, -0.2]   # off-centre, not unit size
    normals = rng.normal(size=(n, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    return np.concatenate([xyz, normals, rng.choice(parts, n)[:, None]], 1)


def write_shapenetpart(root: Path) -> dict[str, np.ndarray]:
    """Airplane (3 shapes) and Mug (3 shapes) in the official layout. One listed file is missing
    (mug m3), one has a line of 6 numbers (plane p3), one has an Airplane part in a mug (m2);
    plane p2 has 20 points (fewer than asked), the others 50."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    (root / "synsetoffset2category.txt").write_text(f"Airplane\t{PLANE}\nMug\t{MUG}\n")
    raw = {}
    for synset, token, n, parts in ((PLANE, "p1", 50, (0, 1, 2, 3)), (PLANE, "p2", 20, (1, 2)),
                                    (PLANE, "p3", 50, (0, 1)), (MUG, "m1", 50, (36, 37)),
                                    (MUG, "m2", 50, (3, 36))):
        (root / synset).mkdir(exist_ok=True)
        raw[token] = part_file(rng, n, parts)
        np.savetxt(root / synset / f"{token}.txt", raw[token], fmt="%.6f")
    text = (root / PLANE / "p3.txt").read_text().splitlines()
    text[7] = " ".join(text[7].split()[:6])
    (root / PLANE / "p3.txt").write_text("\n".join(text) + "\n")
    lists = {"train": [f"shape_data/{PLANE}/p1", f"shape_data/{MUG}/m1", f"shape_data/{MUG}/m3"],
             "val": [f"shape_data/{PLANE}/p2"], "test": [f"shape_data/{PLANE}/p3", f"shape_data/{MUG}/m2",
                                                        "shape_data/99999999/zz"]}
    (root / "train_test_split").mkdir()
    for split, entries in lists.items():
        (root / "train_test_split" / f"shuffled_{split}_file_list.json").write_text(json.dumps(entries))
    return raw


def source_rows(stored: np.ndarray, path: Path) -> np.ndarray:
    """For each stored ``x y z nx ny nz`` row, the row of the source file it comes from, after
    normalising the file's xyz over all its points (the reference's pc_normalize)."""
    raw = np.loadtxt(path)
    xyz = raw[:, :3] - raw[:, :3].mean(0)
    xyz /= np.sqrt((xyz ** 2).sum(1)).max()
    dist = np.abs(stored[:, None, :] - np.concatenate([xyz, raw[:, 3:6]], 1)[None]).max(-1)
    assert dist.min(1).max() < 1e-5                                       # every stored row is a source row
    return dist.argmin(1)


def test_shapenetpart_layout(tmp_path):
    raw = write_shapenetpart(tmp_path / PS.SHAPENETPART_DIR)
    quiet = dict(log=lambda *_: None)
    with pytest.warns(UserWarning) as caught:
        result = PS.convert_shapenetpart(tmp_path, tmp_path / "parts.zarr", n_points=32, **quiet)
    assert any("unknown_synset" in str(w.message) for w in caught)
    store = open_store(tmp_path / "parts.zarr")
    # rows: splits in order train, val, test, each sorted by id; the unknown synset is not a row
    assert store.ids.tolist() == [f"{PLANE}-p1", f"{MUG}-m1", f"{MUG}-m3", f"{PLANE}-p2", f"{PLANE}-p3", f"{MUG}-m2"]
    assert store["split"][:].tolist() == [0, 0, 0, 1, 2, 2]
    assert store["label"][:].tolist() == [0, 1, 1, 0, 0, 1]
    assert store.params["class_names"] == ["Airplane", "Mug"] and store.params["splits"] == ["train", "val", "test"]
    assert store.params["category_parts"] == [[0, 1, 2, 3], [36, 37]] and store.params["num_parts"] == 38
    assert store.provenance["skipped_list_entries"]["unknown_synset"] == ["shape_data/99999999/zz"]
    assert store["points"].shape == (6, 32, 3) and store["part"].shape == (6, 32) and store["part"].dtype == np.uint8
    # failures: recorded, not fatal
    assert store.ok.tolist() == [True, True, False, True, False, False]
    errors = {f["id"]: (f["error"], f["message"]) for f in result.failures}
    assert errors[f"{MUG}-m3"][0] == "missing_file"
    assert errors[f"{PLANE}-p3"] == ("ValueError", "expected 7 numbers per line in p3.txt, found 349 in 50 lines")
    assert errors[f"{MUG}-m2"][0] == "ValueError" and "[3] are not parts of this category" in errors[f"{MUG}-m2"][1]
    assert set(read_failure_log(tmp_path / "parts.zarr")) == set(errors)
    assert not store["points"][2].any()                                    # a failed row holds zeros
    # every stored point is one of its shape's normalised points, with that point's normal and part
    for row, synset, token in ((0, PLANE, "p1"), (1, MUG, "m1"), (3, PLANE, "p2")):
        got = np.concatenate([store["points"][row], store["normals"][row]], 1)
        idx = source_rows(got, tmp_path / PS.SHAPENETPART_DIR / synset / f"{token}.txt")
        assert store["part"][row].tolist() == raw[token][idx, 6].astype(int).tolist()
        if len(raw[token]) >= 32:
            assert len(set(idx)) == 32                                      # a subset: no point twice
        else:
            assert set(idx) == set(range(len(raw[token])))                  # all 20, 12 repeated
    assert np.abs(np.linalg.norm(store["points"][0], axis=1).max() - 1) < 0.05  # unit sphere (of all points)
    # up to date: nothing rewritten, failures still reported
    with pytest.warns(UserWarning, match="unknown_synset"):
        again = PS.convert_shapenetpart(tmp_path, tmp_path / "parts.zarr", n_points=32, **quiet)
    assert again.failed == 3


def test_point_choice_is_seeded_per_shape():
    a = PS.choose_points(100, 40, 0, "x")
    assert np.array_equal(a, PS.choose_points(100, 40, 0, "x")) and len(set(a.tolist())) == 40
    assert not np.array_equal(a, PS.choose_points(100, 40, 0, "y"))
    assert not np.array_equal(a, PS.choose_points(100, 40, 1, "x"))
    fill = PS.choose_points(10, 40, 0, "x")
    assert set(fill[:10].tolist()) == set(range(10)) and fill.max() < 10
    draws = PS.choose_points(100, 100, 0, "x", "with_replacement")
    assert 50 < len(set(draws.tolist())) < 80 and draws.max() < 100      # the reference's draw: ~63 % distinct
    with pytest.raises(ValueError, match="unknown sampling rule"):
        PS.choose_points(10, 5, 0, "x", "fps")


@pytest.mark.filterwarnings("ignore:.*(split-list entries skipped|No such file|7 numbers|not parts of):UserWarning")
def test_convert_cli_shapenetpart(tmp_path, monkeypatch):
    write_shapenetpart(tmp_path / "data")
    app = convert_command(tmp_path, monkeypatch)
    result = CliRunner().invoke(app, ["convert", "shapenetpart", str(tmp_path / "data"), "--out",
                                      str(tmp_path / "sp.zarr"), "--points", "16"])
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "sp.zarr")
    assert store["points"].shape == (6, 16, 3) and int(store.ok.sum()) == 3
    assert store.params["format"] == "shapenetpart" and store.params["sampling"] == "subset"
    failures = pl.read_parquet(tmp_path / "cache" / "failures" / "convert-shapenetpart.parquet")
    assert sorted(failures["id"]) == [f"{PLANE}-p3", f"{MUG}-m2", f"{MUG}-m3"]
    assert not (tmp_path / "cache" / "failures" / "convert.parquet").exists()   # the classification table


# ----------------------------------------------------------------------------- demo parts


def test_every_demo_part_has_a_semantic_part():
    for synset in _GENERATORS:
        lookup = part_index(synset)
        assert sorted(lookup.values()) == sorted(  # each raw name in exactly one semantic part
            k for k, group in enumerate(DEMO_PARTS[synset].values()) for _ in group)
        made = {re.sub(r"_\d+$", "", name) for i in range(12) for name, _, _ in build_shape(synset, 0, i).parts}
        assert made <= set(lookup), (synset, made - set(lookup))


def write_two_part_obj(path: Path) -> None:
    """A 'seat' square at y = 0 and a 'leg' square at y = 2 (x, z in [0, 1]), as the demo writes."""
    square = ["v 0 {y} 0", "v 1 {y} 0", "v 1 {y} 1", "v 0 {y} 1"]
    lines = ["o seat_0", "usemtl a", *[v.format(y=0) for v in square], "f 1 2 3", "f 1 3 4",
             "o leg_1", "usemtl b", *[v.format(y=2) for v in square], "f 5 6 7", "f 5 7 8"]
    path.write_text("\n".join(lines) + "\n")


def test_sampled_points_carry_the_part_of_their_face(tmp_path):
    write_two_part_obj(tmp_path / "m.obj")
    mesh, names = read_obj_parts(tmp_path / "m.obj")
    assert names == ["seat", "seat", "leg", "leg"] and mesh.area == pytest.approx(2.0)
    chair = list(DEMO_PARTS["03001627"])                                  # back, seat, leg, arm
    cloud = sample_parts(tmp_path / "m.obj", "03001627", [10, 11, 12, 13], 400, 0, "s")
    xyz, normals, part = cloud[:, :3], cloud[:, 3:6], cloud[:, 6]
    high = xyz[:, 1] > xyz[:, 1].mean()                                   # the leg square is above the seat
    assert set(part[high]) == {10 + chair.index("leg")} and set(part[~high]) == {10 + chair.index("seat")}
    assert 150 < high.sum() < 250                                          # equal areas, equal shares
    np.testing.assert_allclose(np.abs(normals[:, 1]), 1.0)                # face normals of y-planes
    np.testing.assert_array_equal(cloud, sample_parts(tmp_path / "m.obj", "03001627", [10, 11, 12, 13], 400, 0, "s"))


def test_demo_obj_reading_errors(tmp_path):
    (tmp_path / "a.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(ValueError, match="before any 'o <part>' line"):
        read_obj_parts(tmp_path / "a.obj")
    (tmp_path / "b.obj").write_text("o wing_0\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(ValueError, match=r"raw parts \['wing'\] are not in DEMO_PARTS"):
        sample_parts(tmp_path / "b.obj", "03001627", [0, 1, 2, 3], 10, 0, "b")
    with pytest.raises(ValueError, match="no demo part table"):
        part_index("12345678")


def test_demo_part_store(tmp_path, monkeypatch):
    from stages import convert as stage

    monkeypatch.setenv("RECON_CACHE", str(tmp_path))
    paths = generate_demo(tmp_path / "meshes", shapes_per_category=3, seed=0, categories=["chair", "mug"])
    before = {p: p.read_bytes() for p in paths}
    from stages import index
    table = index.run(index.IndexParams(root=str(tmp_path / "meshes"), test_fraction=0.34, seed=0),
                      out=tmp_path / "shapes.parquet")    # mesh paths relative to the recorded root
    [result] = stage.run(stage.ConvertParams(format="demo-parts", source=str(tmp_path), points=256,
                                             out=str(tmp_path / "demo_parts.zarr")))
    assert result.failed == 0 and (tmp_path / "failures" / "convert-demo-parts.parquet").exists()
    store = open_store(tmp_path / "demo_parts.zarr")
    assert store.ids.tolist() == table["id"].to_list() and store.ok.all()
    assert store.params["class_names"] == ["chair", "mug"]
    assert store.params["category_parts"] == [[0, 1, 2, 3], [4, 5]]
    assert store.params["part_names"] == {"chair": ["back", "seat", "leg", "arm"], "mug": ["body", "handle"]}
    assert store["split"][:].tolist() == [store.params["splits"].index(s) for s in table["split"]]
    labels, parts = store["label"][:], store["part"][:]
    for label, part in zip(labels, parts):
        allowed = store.params["category_parts"][label]
        assert set(part.tolist()) <= set(allowed) and len(set(part.tolist())) >= 2   # several parts per shape
    assert np.abs(np.linalg.norm(store["points"][:], axis=2).max(1) - 1).max() < 1e-3
    for p, mesh_bytes in before.items():                                   # the meshes are only read
        assert p.read_bytes() == mesh_bytes
    # the surface read from the object names is the one the sample stage loads
    for path in paths[:2] + paths[-1:]:
        ours, loaded = read_obj_parts(path)[0], load_mesh(path)
        assert len(ours.faces) == len(loaded.faces) and ours.area == pytest.approx(loaded.area, rel=1e-9)
        np.testing.assert_allclose(ours.bounds, loaded.bounds, atol=1e-9)
