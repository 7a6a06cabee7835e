"""Robust mesh loading for rendering (`load_scene`) and surface sampling (`load_mesh`).

Every failure is reported as a `MeshError` whose short `kind` goes into the
per-stage failures table:

==============  ==============================================================
kind            meaning
==============  ==============================================================
unreadable      missing file, parser error, truncated data, invalid face indices
unsupported     file extension not in `SUPPORTED_SUFFIXES`
empty           zero-byte file, or geometry without any faces (e.g. a point cloud)
nan_vertices    a vertex coordinate is NaN or infinite
zero_area       every face is degenerate (total surface area is zero)
==============  ==============================================================

Missing or undecodable texture/material files referenced by an OBJ/MTL or glTF
never fail a load: the scene renders untextured and a `MissingAssetWarning`
naming the file is emitted.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import trimesh
from trimesh.resolvers import FilePathResolver

SUPPORTED_SUFFIXES: frozenset[str] = frozenset({".obj", ".off", ".ply", ".stl", ".glb", ".gltf"})
MESH_ERROR_KINDS: tuple[str, ...] = ("unreadable", "unsupported", "empty", "nan_vertices", "zero_area")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tga", ".tif", ".tiff", ".gif", ".webp"}


class MeshError(Exception):
    """A mesh file that cannot be used; `kind` is one of `MESH_ERROR_KINDS`."""

    def __init__(self, kind: str, message: str, path: str | os.PathLike | None = None) -> None:
        self.kind = kind
        self.path = None if path is None else str(path)
        self.detail = message
        prefix = f"{Path(path).name}: " if path is not None else ""
        super().__init__(f"{prefix}[{kind}] {message}")

    def __reduce__(self):  # raised in the render process, re-raised in the caller's
        return (MeshError, (self.kind, self.detail, self.path))


class MissingAssetWarning(UserWarning):
    """A texture or material file referenced by a mesh is missing or unreadable."""


class _RecordingResolver(FilePathResolver):
    """File resolver that records referenced assets it could not provide."""

    def __init__(self, source: str) -> None:
        super().__init__(source)
        self.missing: list[str] = []

    def get(self, name: str) -> bytes:
        try:
            data = super().get(name)
        except Exception:
            self.missing.append(name.strip())
            raise
        if Path(name.strip()).suffix.lower() in _IMAGE_SUFFIXES and not _image_ok(data):
            self.missing.append(name.strip())
        return data


def _image_ok(data: bytes) -> bool:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        return True
    except Exception:
        return False


def _ply_header_counts(path: Path) -> dict[str, int]:
    """Element counts declared in a PLY header ({} when it cannot be parsed)."""
    counts: dict[str, int] = {}
    with open(path, "rb") as f:
        for _ in range(200):
            line = f.readline()
            if not line:
                break
            parts = line.decode("ascii", "replace").split()
            if parts[:1] == ["element"] and len(parts) >= 3 and parts[2].isdigit():
                counts[parts[1]] = int(parts[2])
            elif parts[:1] == ["end_header"]:
                break
    return counts


def _read_scene(path: str | os.PathLike, materials: bool) -> trimesh.Scene:
    """Parse a file into a scene; raises MeshError for unreadable input."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise MeshError("unsupported", f"unsupported file type {suffix or '(none)'!r}", p)
    if not p.is_file():
        raise MeshError("unreadable", "no such file", p)
    if p.stat().st_size == 0:
        raise MeshError("empty", "file is empty (0 bytes)", p)
    resolver = _RecordingResolver(str(p))
    kwargs: dict = {"process": False}
    if suffix == ".obj" and not materials:
        kwargs["skip_materials"] = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            scene = trimesh.load_scene(str(p), file_type=suffix[1:], resolver=resolver, **kwargs)
    except MeshError:
        raise
    except Exception as e:  # trimesh raises many types for corrupt data
        raise MeshError("unreadable", f"cannot parse: {type(e).__name__}: {e}"[:300], p) from e
    if materials:
        for name in dict.fromkeys(resolver.missing):
            warnings.warn(
                f"{p.name}: referenced file {name!r} is missing or unreadable; rendering without it",
                MissingAssetWarning,
                stacklevel=3,
            )
    if suffix == ".ply":
        _check_ply_counts(p, scene)
    return scene


def _check_ply_counts(p: Path, scene: trimesh.Scene) -> None:
    """Detect truncated PLY data: fewer vertices/faces than the header declares."""
    declared = _ply_header_counts(p)
    geoms = list(scene.geometry.values())
    n_vert = sum(len(g.vertices) for g in geoms if hasattr(g, "vertices"))
    n_face = sum(len(g.faces) for g in geoms if isinstance(g, trimesh.Trimesh))
    if n_vert < declared.get("vertex", 0) or n_face < declared.get("face", 0):
        raise MeshError(
            "unreadable",
            f"truncated PLY: header declares {declared.get('vertex', 0)} vertices / "
            f"{declared.get('face', 0)} faces, read {n_vert} / {n_face}",
            p,
        )


def scene_to_mesh(scene: trimesh.Scene, path: str | os.PathLike | None = None) -> trimesh.Trimesh:
    """Merge every triangle mesh of a scene into one mesh in world coordinates (geometry only)."""
    vertices, faces, offset = [], [], 0
    for node in scene.graph.nodes_geometry:
        transform, name = scene.graph[node]
        geom = scene.geometry.get(name)
        if not isinstance(geom, trimesh.Trimesh) or len(geom.faces) == 0:
            continue
        v = np.asarray(geom.vertices, dtype=np.float64)
        f = np.asarray(geom.faces, dtype=np.int64)
        if f.min() < 0 or f.max() >= len(v):
            raise MeshError("unreadable", f"face indices out of range in {name!r}", path)
        vertices.append(trimesh.transform_points(v, transform) if not np.allclose(transform, np.eye(4)) else v)
        faces.append(f + offset)
        offset += len(v)
    if not faces:
        return trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64), process=False)
    return trimesh.Trimesh(np.concatenate(vertices), np.concatenate(faces), process=False)


def validate_mesh(mesh: trimesh.Trimesh, path: str | os.PathLike | None = None, parsed_any: bool = True) -> None:
    """Raise MeshError unless `mesh` has faces, finite vertices and positive area."""
    if len(mesh.faces) == 0:
        if not parsed_any:
            raise MeshError("unreadable", "no geometry could be parsed from the file", path)
        raise MeshError("empty", "no faces (not a surface mesh, e.g. a point cloud)", path)
    used = np.asarray(mesh.vertices)
    if not np.isfinite(used).all():
        bad = int((~np.isfinite(used)).any(axis=1).sum())
        raise MeshError("nan_vertices", f"{bad} vertices have NaN/inf coordinates", path)
    with np.errstate(all="ignore"):
        area = float(mesh.area)
        extent = float(np.ptp(used[mesh.faces.reshape(-1)], axis=0).max())
    if not np.isfinite(area) or extent <= 0 or area <= 1e-12 * extent * extent:
        raise MeshError("zero_area", f"total surface area is zero ({area:.3g}): all faces are degenerate", path)


def _parsed_any(scene: trimesh.Scene) -> bool:
    return any(len(getattr(g, "vertices", ())) > 0 for g in scene.geometry.values())


def load_scene(path: str | os.PathLike) -> trimesh.Scene:
    """Load a mesh file as a scene for rendering, keeping materials, textures and colours.

    Non-triangle geometry (points, paths) and face-less meshes are dropped; the rest is
    validated as a whole (see `validate_mesh`). Missing textures warn, never fail.
    """
    scene = _read_scene(path, materials=True)
    validate_mesh(scene_to_mesh(scene, path), path, parsed_any=_parsed_any(scene))
    drop = [n for n, g in scene.geometry.items() if not isinstance(g, trimesh.Trimesh) or len(g.faces) == 0]
    for name in drop:
        scene.delete_geometry(name)
    return scene


def load_mesh(path: str | os.PathLike) -> trimesh.Trimesh:
    """Load a mesh file as one validated triangle mesh in world coordinates (for sampling)."""
    scene = _read_scene(path, materials=False)
    mesh = scene_to_mesh(scene, path)
    validate_mesh(mesh, path, parsed_any=_parsed_any(scene))
    return mesh
