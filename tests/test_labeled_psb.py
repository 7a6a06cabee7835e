"""The Labeled PSB (LabeledDB) reader and its two stores, on tiny OFF meshes and labels files
written here: boxes (parts top / side / bottom, listed in different orders, one list over two
lines), crates (the same boxes labelled lid / body) and tetrahedra (base / cap)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from conftest import convert_command
from pipeline import labeled_psb as LP
from pipeline.store import open_store, read_failure_log
from recon.downstream.cls_data import load_classification
from recon.downstream.partseg_data import load_partseg

# a box [0, sx] x [0, sy] x [0, sz]: 8 vertices, 12 outward triangles (faces 1-2 bottom, 3-4 top, 5-12 sides)
BOX_VERTS = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], float)
BOX_FACES = [(0, 2, 1), (0, 3, 2), (4, 5, 6), (4, 6, 7), (0, 1, 5), (0, 5, 4), (1, 2, 6), (1, 6, 5),
             (2, 3, 7), (2, 7, 6), (3, 0, 4), (3, 4, 7)]
BOTTOM, TOP, SIDES = [1, 2], [3, 4], list(range(5, 13))      # 1-based, as the labels files write them
TET_VERTS = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0.3, 0.3, 1]], float)
TET_FACES = [(0, 2, 1), (0, 1, 3), (1, 2, 3), (2, 0, 3)]   # face 1 is the base


def write_off(path: Path, verts: np.ndarray, faces: list[tuple[int, ...]]) -> None:
    lines = ["OFF", f"{len(verts)} {len(faces)} 0", *(" ".join(f"{v:.6f}" for v in row) for row in verts),
             *(f"{len(f)} " + " ".join(map(str, f)) for f in faces)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_labels(path: Path, parts: list[tuple[str, list[int]]], split_lines: bool = False) -> None:
    lines = []
    for name, idx in parts:
        lines.append(name)
        cut = len(idx) // 2 if split_lines and len(idx) > 1 else len(idx)
        lines += [" ".join(map(str, idx[:cut])) + " ", " ".join(map(str, idx[cut:]))] if cut < len(idx) \
            else [" ".join(map(str, idx)) + " "]
    path.write_text("\n".join(lines) + "\n")


def write_psb(root: Path, per_class: int = 5) -> Path:
    """Box 1..5, Crate 21..25, Tet 41..45 (numbers as the real set: global, per class blocks).
    Boxes are scaled and moved per shape so the normalisation has work to do."""
    base = root / "LabeledDB_new"
    box_orders = [[("top", TOP), ("side", SIDES), ("bottom", BOTTOM)],
                  [("side", SIDES), ("bottom", BOTTOM), ("top", TOP)]]
    for k in range(per_class):
        scale, shift = np.array([1.0 + k, 2.0, 3.0]), np.array([5.0 * k, -2.0, 1.0])
        write_off(base / "Box" / f"{k + 1}.off", BOX_VERTS * scale + shift, BOX_FACES)
        write_labels(base / "Box" / f"{k + 1}_labels.txt", box_orders[k % 2], split_lines=k == 0)
        write_off(base / "Crate" / f"{k + 21}.off", BOX_VERTS * scale, BOX_FACES)
        write_labels(base / "Crate" / f"{k + 21}_labels.txt", [("lid", TOP), ("body", BOTTOM + SIDES)])
        write_off(base / "Tet" / f"{k + 41}.off", TET_VERTS * (1 + k), TET_FACES)
        write_labels(base / "Tet" / f"{k + 41}_labels.txt", [("cap", [2, 3, 4]), ("base", [1])])
    return base


QUIET = dict(log=lambda *_: None)


# ----------------------------------------------------------------------------- labels files


def test_labels_parse_names_and_1_based_indices_over_several_lines(tmp_path):
    base = write_psb(tmp_path, per_class=1)
    parts = LP.read_labels(base / "Box" / "1_labels.txt")               # written with every list on 2 lines
    assert [name for name, _ in parts] == ["top", "side", "bottom"]
    assert [idx.tolist() for _, idx in parts] == [TOP, SIDES, BOTTOM]
    names, part = LP.face_parts(base / "Box" / "1_labels.txt", 12)
    assert names == ["top", "side", "bottom"]
    # index 1 is the first face of the OFF: faces 0-1 bottom, 2-3 top, 4-11 sides
    assert [names[p] for p in part] == ["bottom"] * 2 + ["top"] * 2 + ["side"] * 8
    cover = LP.coverage(parts, 12)
    assert cover.unlabelled.size == 0 and cover.overlapping.size == 0
    # a part name repeated and a face repeated within one part are merged, not errors
    (tmp_path / "x_labels.txt").write_text("a\n1 2 2\nb\n3\na\n4\n")
    names, part = LP.face_parts(tmp_path / "x_labels.txt", 4)
    assert names == ["a", "b"] and part.tolist() == [0, 0, 1, 0]


@pytest.mark.parametrize("text, faces, message", [
    ("top\n0 1 2\nside\n3 4\n", 4, r"Box/9_labels.txt: part 'top' lists face 0, outside 1..4 .*1-based"),
    ("top\n1 2\nside\n3 4 5\n", 4, r"Box/9_labels.txt: part 'side' lists face 5, outside 1..4 \(the mesh has 4 faces"),
    ("top\n1 2 3\nside\n3 4\n", 4, r"Box/9_labels.txt: 1 of 4 faces are in two or more parts \(e.g. faces \[3\]"),
    ("top\n1 2\nside\n3\n", 4, r"Box/9_labels.txt: 1 of 4 faces are in no part \(e.g. faces \[4\]"),
    ("1 2 3 4\ntop\n", 4, r"Box/9_labels.txt: line 1: face indices before any part name"),
    ("top\n1 2 x 4\n", 4, r"Box/9_labels.txt: line 2: expected a part name \(one token\) or a line of face indices"),
    ("top\n1 -2\n", 4, r"Box/9_labels.txt: line 2: negative face index"),
    ("\n\n", 4, r"Box/9_labels.txt: no parts"),
])
def test_malformed_labels_name_the_file(tmp_path, text, faces, message):
    path = tmp_path / "Box" / "9_labels.txt"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        LP.face_parts(path, faces)


def test_missing_labels_file_is_a_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Box/1_labels.txt: labels file not found"):
        LP.read_labels(tmp_path / "Box" / "1_labels.txt")


def test_off_is_loaded_as_written(tmp_path):
    write_off(tmp_path / "A" / "1.off", BOX_VERTS, BOX_FACES)
    mesh = LP.load_off(tmp_path / "A" / "1.off")
    assert mesh.faces.tolist() == [list(f) for f in BOX_FACES]                 # face order kept (process=False)
    np.testing.assert_allclose(mesh.vertices, BOX_VERTS)
    assert LP.off_counts(tmp_path / "A" / "1.off") == (8, 12)
    # a quad is split by the loader: the face indices of a labels file would not match any more
    write_off(tmp_path / "A" / "2.off", BOX_VERTS[:4], [(0, 1, 2, 3)])
    with pytest.raises(ValueError, match=r"A/2.off: the OFF header declares 1 faces but 2 triangles"):
        LP.load_off(tmp_path / "A" / "2.off")
    text = (tmp_path / "A" / "1.off").read_text().splitlines()                 # a file cut short
    (tmp_path / "A" / "3.off").write_text("\n".join(text[:-3]) + "\n")
    with pytest.raises(ValueError, match="declares 12 faces but 9 triangles"):
        LP.load_off(tmp_path / "A" / "3.off")
    (tmp_path / "A" / "4.off").write_text("PLY\n")
    with pytest.raises(ValueError, match="A/4.off: not an OFF file"):
        LP.load_off(tmp_path / "A" / "4.off")


# ----------------------------------------------------------------------------- points and parts


def test_sampled_points_carry_the_part_of_their_face(tmp_path):
    base = write_psb(tmp_path, per_class=2)
    shape = next(s for s in LP.find_shapes(base) if s.id == "Box-2")          # [0,2]x[0,2]x[0,3] moved by (5,-2,1)
    ids = {"bottom": 10, "side": 11, "top": 12}
    cloud = LP.sample_parts(shape, ids, 2000, seed=0)
    xyz, normals, part = cloud[:, :3], cloud[:, 3:6], cloud[:, 6].astype(int)
    # unit sphere over the samples: centred, farthest point at norm 1
    assert np.abs(xyz.mean(0)).max() < 1e-5 and np.linalg.norm(xyz, axis=1).max() == pytest.approx(1, abs=1e-5)
    z_top, z_bottom = xyz[:, 2].max(), xyz[:, 2].min()
    on_top, on_bottom = np.isclose(xyz[:, 2], z_top, atol=1e-5), np.isclose(xyz[:, 2], z_bottom, atol=1e-5)
    assert (part[on_top] == ids["top"]).all() and (part[on_bottom] == ids["bottom"]).all()
    assert (part[~on_top & ~on_bottom] == ids["side"]).all()                   # every other point is on a side
    assert set(np.flatnonzero(part == ids["top"])) == set(np.flatnonzero(on_top))
    np.testing.assert_allclose(normals[on_top], [[0, 0, 1]] * on_top.sum(), atol=1e-6)   # outward face normals
    np.testing.assert_allclose(normals[on_bottom], [[0, 0, -1]] * on_bottom.sum(), atol=1e-6)
    # area-weighted: top and bottom 4 each of the box's 4 + 4 + 24 = 32
    assert 2000 * 4 / 32 * 0.75 < on_top.sum() < 2000 * 4 / 32 * 1.25
    # seeded per shape; the classification row is the same samples without the part
    np.testing.assert_array_equal(cloud, LP.sample_parts(shape, ids, 2000, seed=0))
    np.testing.assert_array_equal(cloud[:, :6], LP.sample_points(shape, 2000, seed=0))
    assert not np.array_equal(cloud, LP.sample_parts(shape, ids, 2000, seed=1))
    with pytest.raises(ValueError, match=r"Box/2_labels.txt: parts \['top'\] are not in the Box vocabulary"):
        LP.sample_parts(shape, {"bottom": 0, "side": 1}, 10)


def test_per_class_sorted_vocabularies_and_global_ids(tmp_path):
    base = write_psb(tmp_path, per_class=2)
    shapes = LP.find_shapes(base)
    assert [s.id for s in shapes] == ["Box-1", "Box-2", "Crate-21", "Crate-22", "Tet-41", "Tet-42"]
    vocab, unread = LP.class_vocabularies(shapes)
    # sorted, not first-seen (Box-1 lists top, side, bottom; Box-2 side, bottom, top)
    assert vocab == {"Box": ["bottom", "side", "top"], "Crate": ["body", "lid"], "Tet": ["base", "cap"]}
    assert unread == {}
    assert LP.global_part_ids(vocab, ["Box", "Crate", "Tet"]) == [[0, 1, 2], [3, 4], [5, 6]]
    assert LP.global_part_ids(vocab, ["Tet", "Box", "Crate"]) == [[0, 1], [2, 3, 4], [5, 6]]
    (base / "Tet" / "42_labels.txt").write_text("cap\n1 2\nwing\n3 4\n")   # a part only one file has
    (base / "Tet" / "41_labels.txt").write_text("1 2 3\n")                   # an unreadable file
    vocab, unread = LP.class_vocabularies(shapes)
    assert vocab["Tet"] == ["cap", "wing"] and list(unread) == ["Tet-41"]
    assert LP.psb_root(tmp_path) == base and LP.psb_root(base) == base       # the folder or its parent
    (base / "Tet" / "x.off").write_text("OFF\n")
    with pytest.raises(ValueError, match="Tet/x.off: expected meshes named <number>.off"):
        LP.find_shapes(base)


def test_split_is_stratified_seeded_and_the_same_in_both_stores(tmp_path):
    base = write_psb(tmp_path, per_class=5)
    shapes = LP.find_shapes(base)
    split = LP.split_of(shapes, test_fraction=0.4, seed=3)
    for cls in ("Box", "Crate", "Tet"):                                        # round(0.4 * 5) = 2 per class
        assert sorted(split[s.id] for s in shapes if s.cls == cls) == ["test"] * 2 + ["train"] * 3
    assert split == LP.split_of(list(reversed(shapes)), 0.4, 3)               # independent of the order
    others = [LP.split_of(shapes, 0.4, s) for s in range(4, 8)]
    assert any(o != split for o in others)                                     # the seed chooses
    assert sum(v == "test" for v in LP.split_of(shapes, 0.2, 0).values()) == 3  # 20 %: 1 of 5 per class
    with pytest.raises(ValueError, match="test_fraction"):
        LP.split_of(shapes, 1.0)
    cls = LP.convert_labeled_psb(base, tmp_path / "cls.zarr", 64, seed=3, test_fraction=0.4, **QUIET)
    parts = LP.convert_labeled_psb_parts(tmp_path, tmp_path / "parts.zarr", 64, seed=3, test_fraction=0.4, **QUIET)
    assert cls.failed == parts.failed == 0
    a, b = open_store(tmp_path / "cls.zarr"), open_store(tmp_path / "parts.zarr")
    assert a.ids.tolist() == b.ids.tolist() and a["split"][:].tolist() == b["split"][:].tolist()
    assert a.params["splits"] == b.params["splits"] == ["train", "test"]
    assert a.params["split_rule"] == b.params["split_rule"] == LP.split_rule(0.4, 3)
    assert [a.params["splits"][k] for k in a["split"][:]] == [split[i] for i in a.ids]
    assert a["split"][:].tolist() == [0] * 9 + [1] * 6                          # train rows, then test rows
    assert b.provenance["split_counts"] == {"train": 9, "test": 6}


def test_stores_load_with_the_project_readers(tmp_path):
    base = write_psb(tmp_path, per_class=5)
    LP.convert_labeled_psb(base, tmp_path / "cls.zarr", 128, normals=True, **QUIET)
    LP.convert_labeled_psb_parts(base, tmp_path / "parts.zarr", 128, **QUIET)
    train = load_classification(tmp_path / "cls.zarr", "train")
    test = load_classification(tmp_path / "cls.zarr", "test")
    assert train.class_names == ["Box", "Crate", "Tet"] and (len(train.labels), len(test.labels)) == (12, 3)
    assert train.points.shape == (12, 128, 3) and sorted(test.labels.tolist()) == [0, 1, 2]
    assert all(i.split("-")[0] == train.class_names[k] for i, k in zip(train.ids, train.labels))   # class = folder
    assert np.linalg.norm(train.points, axis=2).max(1) == pytest.approx(np.ones(12), abs=1e-5)
    store = open_store(tmp_path / "cls.zarr")
    assert store.params["format"] == "labeled-psb" and store["normals"].shape == (15, 128, 3)
    seg = load_partseg(tmp_path / "parts.zarr", ["train"])
    seg_test = load_partseg(tmp_path / "parts.zarr", "test")
    assert (len(seg), len(seg_test)) == (12, 3) and seg.num_parts == 7
    assert seg.class_names == ["Box", "Crate", "Tet"] and seg.category_parts == [[0, 1, 2], [3, 4], [5, 6]]
    parts = open_store(tmp_path / "parts.zarr")
    assert parts.params["part_names"] == {"Box": ["bottom", "side", "top"], "Crate": ["body", "lid"],
                                          "Tet": ["base", "cap"]}
    for label, part in zip(seg.label, seg.part):          # every part of its class in each shape, none of another
        assert set(part.tolist()) == set(seg.category_parts[label])
    # the same samples in both stores (the part store holds them in its seeded order)
    cls_rows = dict(zip(train.ids, train.points))
    for sid, pts in zip(seg.ids, seg.points):
        mine = cls_rows[sid]
        order = np.lexsort(mine.T), np.lexsort(pts.T)
        np.testing.assert_allclose(mine[order[0]], pts[order[1]], atol=1e-5)
    # Crate's lid is its top: in the part store the lid points are the highest ones
    crate = int(np.flatnonzero(seg.label == 1)[0])
    lid = seg.part[crate] == 4
    assert np.allclose(seg.points[crate][lid, 2], seg.points[crate][:, 2].max(), atol=1e-5)


# ----------------------------------------------------------------------------- failures, stage and CLI


def test_broken_mesh_and_labels_are_failure_rows(tmp_path, monkeypatch):
    from stages import convert as stage
    from stages.common import StageError

    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "cache"))
    base = write_psb(tmp_path, per_class=3)
    (base / "Box" / "2.off").write_text("OFF\n8 12 0\n0 0 0\nnot a number\n")      # unreadable mesh
    (base / "Tet" / "42_labels.txt").unlink()                                     # missing labels
    write_labels(base / "Crate" / "23_labels.txt", [("lid", TOP), ("body", SIDES)])  # bottom faces unlabelled
    params = dict(source=str(base), points=32, seed=0)
    with pytest.warns(UserWarning):
        [parts] = stage.run(stage.ConvertParams(format="labeled-psb-parts", out=str(tmp_path / "p.zarr"), **params))
    errors = {f["id"]: (f["error"], f["message"]) for f in parts.failures}
    assert set(errors) == {"Box-2", "Tet-42", "Crate-23"}
    assert errors["Box-2"][0] == "MeshError" and "2.off" in errors["Box-2"][1]
    assert errors["Tet-42"] == ("missing_file", "Tet/42_labels.txt: labels file not found")
    assert errors["Crate-23"] == ("ValueError",
                                  "Crate/23_labels.txt: 2 of 12 faces are in no part (e.g. faces [1, 2], 1-based)")
    store = open_store(tmp_path / "p.zarr")
    assert sorted(store.ids[~store.ok].tolist()) == ["Box-2", "Crate-23", "Tet-42"] and store.ok.sum() == 6
    assert not store["points"][int(np.flatnonzero(store.ids == "Box-2")[0])].any()   # a failed row holds zeros
    table = pl.read_parquet(tmp_path / "cache" / "failures" / "convert-labeled-psb-parts.parquet")
    assert sorted(table["id"]) == ["Box-2", "Crate-23", "Tet-42"]
    assert set(table["stage"]) == {"convert:labeled-psb-parts"}
    assert set(read_failure_log(tmp_path / "p.zarr")) == set(errors)
    # the classification store needs no labels: only the broken mesh fails, and its own table says so
    with pytest.warns(UserWarning):
        [cls] = stage.run(stage.ConvertParams(format="labeled-psb", out=str(tmp_path / "c.zarr"), **params))
    assert [f["id"] for f in cls.failures] == ["Box-2"]
    table = pl.read_parquet(tmp_path / "cache" / "failures" / "convert-labeled-psb.parquet")
    assert table["id"].to_list() == ["Box-2"]
    assert not (tmp_path / "cache" / "failures" / "convert.parquet").exists()
    assert open_store(tmp_path / "c.zarr").ids.tolist() == store.ids.tolist()
    with pytest.raises(StageError, match="3 shapes failed and --strict"):       # the store is up to date
        stage.run(stage.ConvertParams(format="labeled-psb-parts", out=str(tmp_path / "p.zarr"), strict=True, **params))


def test_convert_cli_labeled_psb(tmp_path, monkeypatch):
    base = write_psb(tmp_path, per_class=2)
    app = convert_command(tmp_path, monkeypatch)
    runner = CliRunner()
    for fmt, out in (("labeled-psb", "psb.zarr"), ("labeled-psb-parts", "parts.zarr")):
        result = runner.invoke(app, ["convert", "--set", f"format={fmt}", "--set", f"source={base}",
                                     "--set", f"out={tmp_path / out}", "--points", "16"])
        assert result.exit_code == 0, result.output
    assert open_store(tmp_path / "psb.zarr")["points"].shape == (6, 16, 3)
    assert open_store(tmp_path / "parts.zarr")["part"].shape == (6, 16)
    assert (tmp_path / "cache" / "failures" / "convert-labeled-psb-parts.parquet").exists()
    bad = runner.invoke(app, ["convert", "labeled-psbx", str(base)])
    assert bad.exit_code == 1 and "labeled-psb-parts" in bad.output
