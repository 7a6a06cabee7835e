"""Robust mesh loading: every bad-input kind raises MeshError with the right kind."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import trimesh

from conftest import shared_dir
from pipeline.meshes import MeshError, MissingAssetWarning, load_mesh, load_scene

MESHES = shared_dir() / "data" / "meshes"
needs_shared = pytest.mark.skipif(not MESHES.is_dir(), reason="shared test meshes not available")

_OBJ = "v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 2 3\nf 1 2 4\nf 1 3 4\nf 2 3 4\n"


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _kind(path: Path) -> str:
    kinds = set()
    for loader in (load_scene, load_mesh):
        with pytest.raises(MeshError) as info:
            loader(path)
        kinds.add(info.value.kind)
    assert len(kinds) == 1, kinds
    return kinds.pop()


def test_valid_obj_and_off(tmp_path: Path) -> None:
    mesh = load_mesh(_write(tmp_path / "t.obj", _OBJ))
    assert isinstance(mesh, trimesh.Trimesh) and len(mesh.faces) == 4
    off = "OFF\n4 4 0\n0 0 0\n1 0 0\n0 1 0\n0 0 1\n3 0 1 2\n3 0 1 3\n3 0 2 3\n3 1 2 3\n"
    assert len(load_scene(_write(tmp_path / "t.off", off)).geometry) == 1


@pytest.mark.parametrize(
    ("name", "data", "kind"),
    [
        ("empty.obj", b"", "empty"),
        ("empty.glb", b"", "empty"),
        ("garbage.txt", b"hello, not a mesh", "unsupported"),
        ("garbage.obj", bytes(range(256)) * 4, "unreadable"),
        ("trunc.obj", _OBJ[:20], "empty"),  # cut inside the vertex block: no faces
        ("nan.obj", _OBJ.replace("v 1 0 0", "v 1 nan 0"), "nan_vertices"),
        ("inf.obj", _OBJ.replace("v 0 1 0", "v 0 inf 0"), "nan_vertices"),
        ("flat.obj", "v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\nf 3 2 1\n", "zero_area"),
        ("points.ply", "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
         "property float z\nend_header\n0 0 0\n1 0 0\n0 1 0\n", "empty"),
        ("badidx.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 9\n", "unreadable"),
    ],
)
def test_bad_inputs(tmp_path: Path, name: str, data: bytes | str, kind: str) -> None:
    assert _kind(_write(tmp_path / name, data)) == kind


def test_missing_file(tmp_path: Path) -> None:
    assert _kind(tmp_path / "nope.obj") == "unreadable"


@pytest.mark.parametrize("file_type", ["glb", "ply", "stl"])
def test_truncated_binary(tmp_path: Path, file_type: str) -> None:
    data = trimesh.creation.icosphere(2).export(file_type=file_type)
    if file_type == "glb":
        data = trimesh.Scene(trimesh.creation.icosphere(2)).export(file_type="glb")
    assert _kind(_write(tmp_path / f"t.{file_type}", data[: len(data) // 2])) == "unreadable"


def test_truncated_ascii_ply(tmp_path: Path) -> None:
    data = trimesh.creation.icosphere(2).export(file_type="ply", encoding="ascii")
    assert _kind(_write(tmp_path / "t.ply", data[: len(data) * 2 // 3])) == "unreadable"


def test_error_message_names_file(tmp_path: Path) -> None:
    with pytest.raises(MeshError, match=r"nan\.obj.*nan_vertices"):
        load_mesh(_write(tmp_path / "nan.obj", _OBJ.replace("v 1 0 0", "v nan 0 0")))


def test_multi_mesh_scene_merges_in_world_coordinates(tmp_path: Path) -> None:
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.creation.box([1, 1, 1]), node_name="a", transform=trimesh.transformations.translation_matrix([5, 0, 0]))
    scene.add_geometry(trimesh.creation.icosphere(1), node_name="b")
    path = _write(tmp_path / "two.glb", scene.export(file_type="glb"))
    loaded = load_scene(path)
    assert len(loaded.geometry) == 2
    mesh = load_mesh(path)
    assert len(mesh.faces) == 12 + 80
    assert np.allclose(mesh.bounds, [[-1, -1, -1], [5.5, 1, 1]], atol=1e-4)


def test_obj_with_materials_keeps_parts(tmp_path: Path) -> None:
    (tmp_path / "m.mtl").write_text("newmtl red\nKd 1 0 0\nnewmtl blue\nKd 0 0 1\n")
    text = "mtllib m.mtl\n" + _OBJ.replace("f 1 2 3\n", "usemtl red\nf 1 2 3\nusemtl blue\n")
    path = _write(tmp_path / "m.obj", text)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingAssetWarning)
        scene = load_scene(path)
    assert len(scene.geometry) == 2
    assert len(load_mesh(path).faces) == 4


@needs_shared
def test_missing_texture_warns_and_loads(tmp_path: Path) -> None:
    shutil.copy(MESHES / "fuze.obj", tmp_path / "fuze.obj")
    shutil.copy(MESHES / "fuze.obj.mtl", tmp_path / "fuze.obj.mtl")
    with pytest.warns(MissingAssetWarning, match="fuze uv.jpg"):
        scene = load_scene(tmp_path / "fuze.obj")
    assert sum(len(g.faces) for g in scene.geometry.values()) > 0


@needs_shared
def test_corrupt_texture_warns(tmp_path: Path) -> None:
    shutil.copy(MESHES / "fuze.obj", tmp_path / "fuze.obj")
    shutil.copy(MESHES / "fuze.obj.mtl", tmp_path / "fuze.obj.mtl")
    (tmp_path / "fuze uv.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.warns(MissingAssetWarning, match="fuze uv.jpg"):
        load_scene(tmp_path / "fuze.obj")


@needs_shared
@pytest.mark.parametrize("name", ["fuze.obj", "Duck.glb", "chair_model.obj", "bunny.ply", "airplane.ply", "teapot.stl"])
def test_real_meshes_load(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingAssetWarning)  # chair_model.obj names a missing model.mtl
        scene = load_scene(MESHES / name)
    mesh = load_mesh(MESHES / name)
    assert len(scene.geometry) >= 1 and len(mesh.faces) > 100
    assert np.isfinite(mesh.vertices).all() and mesh.area > 0


@needs_shared
def test_textures_are_kept() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingAssetWarning)
        fuze = next(iter(load_scene(MESHES / "fuze.obj").geometry.values()))
        duck = next(iter(load_scene(MESHES / "Duck.glb").geometry.values()))
    assert fuze.visual.kind == "texture" and fuze.visual.material.image is not None
    assert duck.visual.kind == "texture" and duck.visual.material.baseColorTexture is not None
