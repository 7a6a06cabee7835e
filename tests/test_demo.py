"""Procedural ShapeNet-layout demo set: layout, taxonomy, determinism, variation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.demo import DEMO_CATEGORIES, SHAPENET_NAMES, generate_demo
from pipeline.meshes import load_mesh, load_scene

N = 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("demo")
    return out, generate_demo(out, shapes_per_category=N, seed=0)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_categories() -> None:
    assert len(DEMO_CATEGORIES) >= 10
    assert all(re.fullmatch(r"0\d{7}", s) for s in DEMO_CATEGORIES)
    assert DEMO_CATEGORIES["03001627"] == "chair" and DEMO_CATEGORIES["04379243"] == "table"
    assert DEMO_CATEGORIES["02691156"] == "airplane" and DEMO_CATEGORIES["04256520"] == "sofa"
    assert all(SHAPENET_NAMES[s].split(",")[0] == n for s, n in DEMO_CATEGORIES.items())


def test_layout(demo: tuple[Path, list[Path]]) -> None:
    out, paths = demo
    assert len(paths) == N * len(DEMO_CATEGORIES) and paths == sorted(paths)
    for p in paths:
        rel = p.relative_to(out).parts
        assert len(rel) == 4 and rel[0] in DEMO_CATEGORIES and rel[2:] == ("models", "model_normalized.obj")
        assert re.fullmatch(r"[0-9a-f]{32}", rel[1])
        assert (p.parent / "model_normalized.mtl").is_file()
    assert len({p.parts[-3] for p in paths}) == len(paths)  # unique model ids


def test_taxonomy(demo: tuple[Path, list[Path]]) -> None:
    out, _ = demo
    taxonomy = json.loads((out / "taxonomy.json").read_text())
    assert {t["synsetId"] for t in taxonomy} == set(DEMO_CATEGORIES)
    for entry in taxonomy:
        assert set(entry) == {"synsetId", "name", "children", "numInstances"}
        assert entry["name"] == SHAPENET_NAMES[entry["synsetId"]] and entry["numInstances"] == N
        assert entry["children"] == []


def test_deterministic(tmp_path: Path, demo: tuple[Path, list[Path]]) -> None:
    out, _ = demo
    generate_demo(tmp_path / "again", shapes_per_category=N, seed=0)
    assert _tree(tmp_path / "again") == _tree(out)
    other = generate_demo(tmp_path / "other", shapes_per_category=1, seed=1, categories=["chair"])
    assert other[0].parts[-3] != sorted(out.glob("03001627/*"))[0].name


def test_category_selection(tmp_path: Path) -> None:
    paths = generate_demo(tmp_path, shapes_per_category=2, categories=["chair", "04379243"])
    assert {p.parts[-4] for p in paths} == {"03001627", "04379243"}
    with pytest.raises(ValueError, match="unknown"):
        generate_demo(tmp_path, 1, categories=["unicorn"])


def test_meshes_are_valid_small_coloured(demo: tuple[Path, list[Path]]) -> None:
    _, paths = demo
    for p in paths[:: max(1, len(paths) // 12)]:
        text = p.read_text()
        mtl = (p.parent / "model_normalized.mtl").read_text()
        assert "mtllib model_normalized.mtl" in text and text.count("usemtl") >= 2
        assert all(name in mtl for name in re.findall(r"^usemtl (\S+)", text, re.M))
        assert "Kd " in mtl
        mesh = load_mesh(p)
        assert 0 < len(mesh.faces) < 5000
        diag = np.linalg.norm(mesh.bounds[1] - mesh.bounds[0])
        assert abs(diag - 1.0) < 1e-3 and np.allclose(mesh.bounds.mean(axis=0), 0, atol=1e-3)
        used = set(re.findall(r"^usemtl (\S+)", text, re.M))
        assert len(load_scene(p).geometry) == len(used)  # one geometry per material


def test_intra_class_variation(demo: tuple[Path, list[Path]]) -> None:
    _, paths = demo
    for synset in DEMO_CATEGORIES:
        extents = [load_mesh(p).extents for p in paths if p.parts[-4] == synset]
        assert len(extents) == N
        spread = np.ptp(np.array(extents), axis=0).max()
        assert spread > 0.02, (synset, extents)
